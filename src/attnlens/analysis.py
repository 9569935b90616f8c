"""What captured attention says about a sequence: rollout, value-norm contributions, head summaries.

Everything here works on one sequence at a time (``batch=`` picks it) from what a capture recorded
(`attnlens.hf.capture`, `attnlens.nn.capture`) or from plain arrays, and returns float64 NumPy.

- `rollout` (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers"): average the
  heads, add the identity for the residual connection, re-normalise the rows, multiply through
  the layers. Row i: how much the top layer's token i draws on each input token.
- `contributions` (Kobayashi et al. 2020, "Attention is not only a weight"): ``‖α_ij v_j‖`` — a
  large weight on a tiny value vector moves little; with the output projection,
  ``‖α_ij v_j W_O^h‖`` (what head h actually adds to the residual stream).
- `head_summary`: per head, mean entropy, and how much each head attends to the first token
  (attention sinks), to the previous token and to itself.

At lengths where the full weights were not kept (``Lens(rows=None)``), what the lens statistics
determine is answered from them: mean entropy and max weight exactly from ``entropy`` /
``max_weight``; attention to the first token exactly from ``received`` (column 0 summed over
queries, divided by their number); attention to self / the previous token as an interval from
top-k (exact where that key is among a row's top k; otherwise between 0 and the row's k-th
weight); `rollout` approximately, from the top-k weights only (the mass outside the top k is
dropped before re-normalising; ``coverage`` says how much was kept).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

__all__ = ["as_numpy", "layer_weights", "rollout", "contributions", "head_summary", "HeadSummary",
           "top_received", "topk_dense"]


def as_numpy(x) -> Optional[np.ndarray]:
    """A float64 (or int64) NumPy copy of a tensor/array; ``None`` stays ``None``."""
    if x is None:
        return None
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().cpu()
            return x.numpy().copy() if not x.is_floating_point() else x.double().numpy()
    except ImportError:  # pragma: no cover
        pass
    a = np.asarray(x)
    return a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a.copy()


def _result_of(rec):
    """A `LensResult` from a record (``.result``) or the result itself."""
    return getattr(rec, "result", rec)


def _pick(a, batch: int, rank: int):
    """Select ``batch`` from an array with a leading batch dim (rank ``rank + 1``)."""
    a = as_numpy(a)
    return a[batch] if a is not None and a.ndim == rank + 1 else a


def topk_dense(indices, weights, nk: int) -> np.ndarray:
    """Scatter top-k ``(..., Nq, k)`` into dense ``(..., Nq, nk)``; keys outside the top k get 0."""
    idx, w = as_numpy(indices), as_numpy(weights)
    out = np.zeros(idx.shape[:-1] + (nk + 1,))  # column nk collects the -1 placeholders
    np.put_along_axis(out, np.where(idx >= 0, idx, nk), w, axis=-1)
    return out[..., :nk]


def _nq(res) -> Optional[int]:
    for a in (res.entropy, res.lse, res.max_weight):
        if a is not None:
            return a.shape[-1]
    return None


def _has_full(res) -> bool:
    """Every query row's weights were kept (``Lens(rows="all")``)."""
    if res.weights is None:
        return False
    nq = _nq(res) or res.weights.shape[-2]
    return res.rows == tuple(range(nq))


def layer_weights(records: Sequence, *, batch: int = 0, allow_topk: bool = False):
    """Per layer, one sequence's weights ``(H, Nq, Nk)`` from records (or `LensResult`s).

    Uses the full weights when every row was kept; otherwise, with ``allow_topk``, the top-k
    weights scattered into a dense matrix (an approximation; returns the fraction of weight kept).

    Returns ``(list of (H, Nq, Nk) arrays, coverage)``: coverage 1.0 when exact.
    """
    mats, kept = [], []
    for rec in records:
        res = _result_of(rec)
        if _has_full(res):
            mats.append(_pick(res.weights, batch, 3))
            kept.append(1.0)
        elif allow_topk and res.topk_indices is not None:
            nk = res.received.shape[-1] if res.received is not None else None
            if nk is None:
                raise ValueError("layer_weights: top-k needs received (for the number of keys) in the lens")
            w = topk_dense(_pick(res.topk_indices, batch, 3), _pick(res.topk_weights, batch, 3), nk)
            mats.append(w)
            kept.append(float(w.sum(-1).mean()))
        else:
            raise ValueError("layer_weights: a record has no full weight rows (Lens(rows='all'))"
                             + (" and no top-k (Lens(topk=k))" if allow_topk else "; pass allow_topk=True "
                                "to approximate from top-k"))
    return mats, float(np.mean(kept)) if kept else 1.0


def rollout(layers: Sequence, *, residual: float = 0.5, batch: int = 0, allow_topk: bool = False,
            return_coverage: bool = False):
    """Attention rollout (Abnar & Zuidema 2020) through the layers, bottom to top.

    ::

        Ā_l = mean over heads of A_l                       (Nq, Nk), rows sum to 1
        Â_l = rownorm(residual · I + (1 - residual) · Ā_l)  the residual connection as identity
        R   = Â_L · … · Â_2 · Â_1                           R[i, j]: top-layer token i ← input token j

    Args:
        layers: per layer, weights ``(H, N, N)`` / ``(N, N)`` / ``(B, H, N, N)`` (arrays or
            tensors), or capture records / `LensResult`s (their full weights, or top-k with
            ``allow_topk``). Self-attention only (``Nq == Nk``).
        residual: the identity's share (0.5 in the paper; 0 = plain product of the head means).
        batch: which sequence, for inputs with a batch dimension.
        allow_topk: approximate a layer without full weights from its top-k weights.
        return_coverage: also return the mean fraction of attention weight kept (1.0 = exact).

    Returns:
        ``R (N, N)`` float64, rows summing to 1 (and the coverage if asked).
    """
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual must be in [0, 1], got {residual}")
    if len(layers) == 0:
        raise ValueError("rollout: expected at least one layer, got none")
    coverage = 1.0
    if hasattr(_result_of(layers[0]), "received") and not isinstance(layers[0], np.ndarray) \
            and not _is_tensor(layers[0]):
        mats, coverage = layer_weights(layers, batch=batch, allow_topk=allow_topk)
    else:
        mats = []
        for w in layers:
            w = as_numpy(w)
            if w.ndim == 4:
                w = w[batch]
            mats.append(w if w.ndim == 3 else w[None])
    R = None
    for w in mats:
        a = w.mean(axis=0)  # (N, N): head average
        n, m = a.shape
        if n != m:
            raise ValueError(f"rollout: needs self-attention weights (Nq == Nk), got {a.shape}")
        a = residual * np.eye(n) + (1.0 - residual) * a
        s = a.sum(-1, keepdims=True)
        a = np.divide(a, s, out=np.zeros_like(a), where=s > 0)
        if R is not None and R.shape != a.shape:
            raise ValueError(f"rollout: layers have different lengths {R.shape} and {a.shape}")
        R = a if R is None else a @ R
    return (R, coverage) if return_coverage else R


def _is_tensor(x) -> bool:
    try:
        import torch

        return isinstance(x, torch.Tensor)
    except ImportError:  # pragma: no cover
        return False


def contributions(weights, norms=None, *, batch: int = 0, use_output_projection: bool = True):
    """Value-norm contributions ``‖α_ij v_j‖`` per head (Kobayashi et al. 2020).

    Because ``α_ij >= 0`` is a scalar, ``‖α_ij f(v_j)‖ = α_ij ‖f(v_j)‖``: the weights scaled
    column-wise by the value norms. With the output projection (``use_output_projection`` and a
    record whose ``out_norms`` is known) ``f(v_j) = v_j W_O^h``, what head h adds to the residual
    stream from token j; otherwise ``f(v_j) = v_j``.

    Args:
        weights: ``(H, Nq, Nk)`` / ``(B, H, Nq, Nk)``, or an `attnlens.hf.HFRecord` (its full
            weights and norms).
        norms: ``(H, Nk)`` / ``(B, H, Nk)``; taken from the record when ``weights`` is one.

    Returns:
        ``C (H, Nq, Nk)`` float64. ``C.sum(0)`` adds the heads' norms: an upper bound (triangle
        inequality) of the norm of their sum.
    """
    if hasattr(weights, "result"):
        rec = weights
        res = rec.result
        if res.weights is None:
            raise ValueError("contributions: the record has no full weight rows; capture with Lens(rows='all')")
        if norms is None:
            norms = rec.out_norms if (use_output_projection and rec.out_norms is not None) else rec.value_norms
        if norms is None:
            raise ValueError("contributions: the record has no value norms; capture with values=True")
        weights = res.weights
    w = as_numpy(weights)
    nv = as_numpy(norms)
    if w.ndim == 4:
        w = w[batch]
    if nv.ndim == 3:
        nv = nv[batch]
    if w.ndim != 3 or nv.shape != (w.shape[0], w.shape[2]):
        raise ValueError(f"contributions: weights (H, Nq, Nk) and norms (H, Nk) must agree, got {w.shape} "
                         f"and {nv.shape}")
    return w * nv[:, None, :]


@dataclass
class HeadSummary:
    """Per-head statistics of one layer for one sequence; arrays of shape ``(H,)``.

    ``first``, ``entropy`` and ``max_weight`` are exact. ``self`` / ``prev`` are exact when
    ``exact`` (full weights were kept); otherwise they lie in ``[self_lo, self_hi]`` /
    ``[prev_lo, prev_hi]``, from top-k, and ``self`` / ``prev`` hold the lower bounds.
    """

    entropy: np.ndarray  # mean entropy of the query rows, nats
    max_weight: np.ndarray  # mean largest weight of the query rows
    first: np.ndarray  # mean weight on key 0 (the first token; attention sinks)
    self: np.ndarray  # mean weight on the query's own position
    prev: np.ndarray  # mean weight on the previous position (queries that have one)
    self_lo: np.ndarray
    self_hi: np.ndarray
    prev_lo: np.ndarray
    prev_hi: np.ndarray
    exact: bool


def head_summary(rec, *, batch: int = 0, q_offset: Optional[int] = None) -> HeadSummary:
    """Summaries of each head of one captured call (a record or a `LensResult`).

    Needs ``entropy``, ``max_weight`` and ``received`` in the lens, and either full weight rows
    (``rows="all"``, exact) or ``topk`` (bounds for self / previous token).
    ``q_offset``: position of the first query among the keys (``Nk - Nq``; default from the record).
    """
    res = _result_of(rec)
    if q_offset is None:
        q_offset = getattr(rec, "q_offset", None)
    for name in ("entropy", "max_weight", "received"):
        if getattr(res, name) is None:
            raise ValueError(f"head_summary: the lens has no {name}; capture with Lens({name}=True)")
    ent = _pick(res.entropy, batch, 2)  # (H, Nq)
    mw = _pick(res.max_weight, batch, 2)
    rec_ = _pick(res.received, batch, 2)  # (H, Nk)
    H, nq = ent.shape
    nk = rec_.shape[-1]
    off = nk - nq if q_offset is None else q_offset
    pos = np.arange(nq) + off  # each query's own key position
    has_self = (pos >= 0) & (pos < nk)  # queries whose own position is a key (never wrap to the end)
    has_prev = (pos >= 1) & (pos - 1 < nk)
    first = rec_[:, 0] / nq  # Σ_i P[i, 0] / Nq, exact from the column view
    if _has_full(res):
        w = _pick(res.weights, batch, 3)  # (H, Nq, Nk)
        rows = np.arange(nq)
        s = w[:, rows[has_self], pos[has_self]].mean(-1) if has_self.any() else np.zeros(H)
        p = w[:, np.arange(nq)[has_prev], pos[has_prev] - 1].mean(-1) if has_prev.any() else np.zeros(H)
        return HeadSummary(entropy=ent.mean(-1), max_weight=mw.mean(-1), first=first, self=s, prev=p, self_lo=s,
                           self_hi=s, prev_lo=p, prev_hi=p, exact=True)
    if res.topk_indices is None:
        raise ValueError("head_summary: needs full weights (Lens(rows='all')) or top-k (Lens(topk=k))")
    ti = _pick(res.topk_indices, batch, 3)  # (H, Nq, k)
    tw = _pick(res.topk_weights, batch, 3)
    kth = tw[..., -1]  # a key outside the top k has at most this weight

    def bounds(target, rows):
        hit = ti[:, rows] == target[rows][None, :, None]  # (H, r, k)
        found = hit.any(-1)
        lo = np.where(hit, tw[:, rows], 0.0).sum(-1)
        hi = np.where(found, lo, kth[:, rows])
        return lo.mean(-1), hi.mean(-1)

    all_rows = np.arange(nq)
    if has_self.any():
        s_lo, s_hi = bounds(pos, all_rows[has_self])
    else:
        s_lo = s_hi = np.zeros(H)
    if has_prev.any():
        p_lo, p_hi = bounds(pos - 1, all_rows[has_prev])
    else:
        p_lo = p_hi = np.zeros(H)
    return HeadSummary(entropy=ent.mean(-1), max_weight=mw.mean(-1), first=first, self=s_lo, prev=p_lo,
                       self_lo=s_lo, self_hi=s_hi, prev_lo=p_lo, prev_hi=p_hi, exact=False)


def top_received(rec, k: int = 5, *, batch: int = 0, heads=None):
    """The ``k`` keys that receive the most attention, averaged over ``heads`` (default all).

    Returns ``(indices (k,), mean received per query (k,))`` — ``received / Nq``: the average
    weight a query puts on that key (exact, from the column view).
    """
    res = _result_of(rec)
    if res.received is None:
        raise ValueError("top_received: the lens has no received; capture with Lens(received=True)")
    r = _pick(res.received, batch, 2)  # (H, Nk)
    nq = _nq(res) or r.shape[-1]
    if heads is not None:
        r = r[np.asarray(heads)]
    m = r.mean(0) / nq
    k = min(k, m.shape[0])
    idx = np.argsort(-m, kind="stable")[:k]
    return idx, m[idx]
