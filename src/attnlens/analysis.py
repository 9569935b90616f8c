"""What captured attention says about a sequence: rollout, value-norm contributions, head summaries.

Everything here works on one sequence at a time (``batch=`` picks it) from what a capture recorded
(`attnlens.hf.capture`, `attnlens.nn.capture`) or from plain arrays, and returns float64 NumPy.

- `rollout` (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers"): average the
  heads, add the identity for the residual connection, re-normalise the rows, multiply through
  the layers. Row i: how much the top layer's token i draws on each input token.
- `contributions` (Kobayashi et al. 2020, "Attention is not only a weight"): ``‖α_ij v_j‖`` — a
  large weight on a tiny value vector moves little; with the output projection,
  ``‖α_ij v_j W_O^h‖`` (what head h actually adds to the residual stream).
- `layer_contributions`: the same through all heads together, ``‖Σ_h α^h_ij v_j W_O^h‖`` — the figure the
  paper reports (the per-head sum is only an upper bound) — for chosen query rows.
- `head_summary`: per head, mean entropy and max weight, and how much each head attends to the first
  token (attention sinks), itself, the previous token, earlier copies of the current token (duplicate-token
  heads) and the token after them (induction heads), or a pattern of your own.
- `head_kinds`: a name for each head from those scores (previous-token, first-token sink, induction, broad, ...).

All of it is exact at any length, in linear memory, without full weights: a record of `hf.capture` /
`nn.capture` keeps its layer's inputs (``keep_inputs=True``, the default), and ``record.ask(lens)``
recomputes the layer with what an analysis needs — ``Lens(received_from=W)`` (``Pᵀ W``: rollout rows carried
down through the layers) or the weights at chosen keys (``P[i, j] = exp(s_ij − lse_i)``: head scores). Full
weights (``Lens(rows="all")``), when kept, are used directly. Only ``rollout(allow_topk=True)`` approximates
(top-k weights only), and only when asked.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

__all__ = ["as_numpy", "layer_weights", "rollout", "contributions", "layer_contributions", "head_summary",
           "HeadSummary", "weights_at", "earlier_same_token", "top_received", "topk_dense", "head_kinds",
           "HEAD_KINDS", "KIND_SCORE", "BROAD_ENTROPY", "BROAD_MAX_WEIGHT"]


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


def rollout(layers: Sequence, *, residual: float = 0.5, batch: int = 0, rows=None, allow_topk: bool = False,
            return_coverage: bool = False, on_layer: Optional[Callable[[int], None]] = None):
    """Attention rollout (Abnar & Zuidema 2020) through the layers, bottom to top.

    ::

        Ā_l = mean over heads of A_l                       (Nq, Nk), rows sum to 1
        Â_l = rownorm(residual · I + (1 - residual) · Ā_l)  the residual connection as identity
        R   = Â_L · … · Â_2 · Â_1                           R[i, j]: top-layer token i ← input token j

    With ``rows``, only those rows of ``R``, exactly and in linear memory at any length, without full weights:
    each row vector is carried down from the top layer, ``w ← Â_lᵀ w = r·(w/d) + (1 − r)·mean_h P_hᵀ (w/d)``
    (``d`` = the row sums that ``rownorm`` divides by), the product ``Pᵀ W`` coming from
    ``record.ask(Lens(received_from=W))`` — one attention pass per layer for all the rows together.

    Args:
        layers: per layer, weights ``(H, N, N)`` / ``(N, N)`` / ``(B, H, N, N)`` (arrays or tensors), or capture
            records / `LensResult`s: their full weights (``Lens(rows="all")``) or, with ``rows``, the records'
            kept inputs (``hf.capture`` / ``nn.capture``, ``keep_inputs=True``). Self-attention only (Nq == Nk).
        residual: the identity's share (0.5 in the paper; 0 = plain product of the head means).
        batch: which sequence, for inputs with a batch dimension.
        rows: the rows of ``R`` to return (ints, negative from the end), or a ``(T, N)`` float array of row
            combinations (``c R`` for each row ``c``, e.g. block means for a pooled rollout); ``None`` = all
            (needs full weights).
        allow_topk: an *approximation* for records with neither full weights nor kept inputs: each layer's
            top-k weights only, re-normalised. Measured (issue 10, all-MiniLM-L6-v2, 512 tokens, k = 8): rows
            ~54% off in total variation. Never the default; prefer ``rows=`` (exact).
        return_coverage: also return the mean fraction of attention weight kept (1.0 = exact).
        on_layer: called with the number of layers done (a progress bar), with ``rows``.

    Returns:
        ``R (N, N)`` float64, rows summing to 1 — or ``(len(rows), N)`` with ``rows`` — (and the coverage if
        asked).
    """
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual must be in [0, 1], got {residual}")
    if len(layers) == 0:
        raise ValueError("rollout: expected at least one layer, got none")
    if rows is not None:
        R = _rollout_rows(list(layers), rows, residual, batch, on_layer)
        return (R, 1.0) if return_coverage else R
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


def _dense_layer(layer, batch: int) -> Optional[np.ndarray]:
    """One layer's weights ``(H, N, N)`` for sequence ``batch`` when they are at hand (an array, or full weights)."""
    if isinstance(layer, np.ndarray) or _is_tensor(layer):
        w = as_numpy(layer)
        w = w[batch] if w.ndim == 4 else w
        return w if w.ndim == 3 else w[None]
    return _dense_of(_result_of(layer), batch)


def _row_mass(layer, dense, batch: int) -> np.ndarray:
    """``(N,)``: mean over heads of each row's weight sum over the keys: ``1 - sink weight`` for a query that sees
    a key (1 without attention sinks), 0 otherwise."""
    if dense is not None:
        return dense.sum(-1).mean(0)
    lse = _stats_of(layer, batch)[0]
    sink = _pick(_result_of(layer).sink_weight, batch, 2)
    if sink is None and getattr(getattr(layer, "call", None), "sinks", None) is not None:
        from .lens import Lens

        sink = as_numpy(layer.ask(Lens(received=False), batch=batch).sink_weight)[0]  # (H, N), one more pass
    return np.where(np.isfinite(lse), 1.0 - (0.0 if sink is None else sink), 0.0).mean(0)


def _carry(layer, dense, x: np.ndarray, batch: int) -> np.ndarray:
    """``mean_h P_hᵀ x`` ``(N, T)`` for ``x (N, T)``: from the dense weights, else the record's call
    (``Lens(received_from=x)`` from the layer's lse: one column-sum pass, `AttnCall.received_from`)."""
    if dense is not None:
        return np.einsum("hit,hij->jt", np.broadcast_to(x, (dense.shape[0],) + x.shape), dense) / dense.shape[0]
    if getattr(layer, "call", None) is None:
        raise ValueError("rollout(rows=...): a layer has neither full weights nor kept inputs; capture with "
                         "keep_inputs=True (the default) or Lens(rows='all')")
    res = _result_of(layer)
    lse = None if res.lse is None else res.lse[batch][None]
    rf = layer.call.received_from(torch.from_numpy(x), lse=lse, batch=batch)  # (1, Hq, N, T): Pᵀ x, one pass
    return as_numpy(rf)[0].mean(0)  # (N, T)


def _start_rows(rows, n: int) -> np.ndarray:
    """``(N, T)``: column t selects row ``rows[t]`` (ints), or is row t of a ``(T, N)`` float array of combinations."""
    arr = np.asarray(as_numpy(rows))
    if arr.ndim == 2 and np.issubdtype(arr.dtype, np.floating):
        if arr.shape[1] != n:
            raise ValueError(f"rollout: rows as combinations must be (T, N={n}), got {arr.shape}")
        return arr.T.astype(np.float64)
    picked = [int(r) for r in np.atleast_1d(arr)]
    if any(not -n <= r < n for r in picked):
        raise ValueError(f"rollout: rows {picked} out of range for N={n}")
    u = np.zeros((n, len(picked)))
    u[[r % n for r in picked], np.arange(len(picked))] = 1.0
    return u


def _rollout_rows(layers: list, rows, residual: float, batch: int, on_layer) -> np.ndarray:
    """Rows of the rollout, carried from the top layer down (see `rollout`)."""
    n = None
    for li, layer in enumerate(reversed(layers)):
        dense = _dense_layer(layer, batch)
        mass = _row_mass(layer, dense, batch)  # (N,)
        if n is None:
            n = mass.shape[0]
            u = _start_rows(rows, n)
        if mass.shape[0] != n:
            raise ValueError(f"rollout: layers have different lengths {n} and {mass.shape[0]}")
        d = (residual + (1.0 - residual) * mass)[:, None]
        x = np.divide(u, d, out=np.zeros_like(u), where=d > 0)
        carried = _carry(layer, dense, x, batch)
        if carried.shape != x.shape:
            raise ValueError(f"rollout: needs self-attention (Nq == Nk), got {x.shape[0]} queries and "
                             f"{carried.shape[0]} keys")
        u = residual * x + (1.0 - residual) * carried
        if on_layer is not None:
            on_layer(li + 1)
    return u.T.copy()


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


def layer_contributions(rec, rows, *, batch: int = 0, use_output_projection: bool = True,
                        key_chunk: Optional[int] = None) -> np.ndarray:
    """Layer-level value-norm contributions (Kobayashi et al. 2020) for chosen query rows, exact, linear memory:

        C[i, j] = ‖Σ_h P_h[i, j] · f_h(v_j)‖      f_h(v) = v_hᵀ W_O^h (head h's slice of the output projection)

    — the norm of what token j adds, through all heads together, to query i's attention output: the figure
    the paper reports. The per-head sum ``contributions(...).sum(0)`` is only an upper bound of it (triangle
    inequality). Without an output projection (or ``use_output_projection=False``), ``f_h(v) = v_h`` placed
    in head h's slice of the concatenation, so ``C[i, j] = sqrt(Σ_h P_h[i, j]² ‖v_h,j‖²)``.

    Args:
        rec: a record of `attnlens.hf.capture` (its kept inputs and output projection) or `attnlens.nn.capture`
            (no projection).
        rows: query rows (ints).
        batch: which sequence.
        key_chunk: keys per step (bounds the ``(len(rows), chunk, E)`` temporary).

    Returns:
        ``C (len(rows), Nk)`` float64. Cost: one pass for the weight rows, then ``O(Nk · H · Dv · E)`` for the
        projected values (in key chunks).
    """
    from .lens import Lens

    call = getattr(rec, "call", None)
    if call is None:
        raise ValueError("layer_contributions: needs a record with kept inputs (capture with keep_inputs=True)")
    rows = [int(r) for r in np.atleast_1d(rows)]
    P = rec.ask(Lens(lse=False, max_weight=False, entropy=False, received=False, rows=rows), batch=batch).weights[0]
    Hq, R, Nk = P.shape
    v = call.select(batch).v[0].to(P.dtype)  # (Hkv, Nk, Dv)
    v = v.repeat_interleave(Hq // v.shape[0], dim=0)  # (Hq, Nk, Dv)
    proj = getattr(rec, "out_proj", None) if use_output_projection else None
    wo = None if proj is None else head_slices(proj, Hq, v.shape[-1])
    if wo is None:
        sq = torch.einsum("hrn,hn->rn", P.square(), v.square().sum(-1))
        return as_numpy(sq.clamp_(min=0).sqrt_())
    wo = wo.to(device=P.device, dtype=P.dtype)  # (Hq, Dv, E)
    step = key_chunk or max(1, (1 << 24) // max(1, R * wo.shape[-1]))
    out = torch.empty(R, Nk, dtype=P.dtype, device=P.device)
    for a in range(0, Nk, step):
        f = torch.einsum("hnd,hde->hne", v[:, a:a + step], wo)  # (Hq, c, E): each head's value, projected
        out[:, a:a + step] = torch.linalg.vector_norm(torch.einsum("hrn,hne->rne", P[..., a:a + step], f), dim=-1)
    return as_numpy(out)


def head_slices(proj, Hq: int, Dv: int) -> Optional[torch.Tensor]:
    """``W_O`` as ``(Hq, Dv, E)`` head slices (``y = x W``), or None when its input is not ``Hq · Dv`` wide: the one
    place that cuts an output projection (``nn.Linear`` or GPT-2's ``Conv1D``) by head."""
    w = proj.weight.detach().float()
    w = w.t() if isinstance(proj, torch.nn.Linear) else w  # GPT-2's Conv1D stores (in, out)
    if w.shape[0] != Hq * Dv:
        return None
    return w.reshape(Hq, Dv, w.shape[1])


@dataclass
class HeadSummary:
    """Per-head statistics of one layer for one sequence; arrays of shape ``(H,)``, every one exact.

    Each is a mean over the *live* queries (padded queries and queries that see no key are left out; see
    `head_summary`) of a sum of weights ``P[i, j]`` over a set of keys ``S_i``, taken over the live queries
    whose set is not empty. ``duplicate`` / ``induction`` are ``None`` without ``input_ids``, ``custom``
    without a ``pattern``. ``self_lo`` … ``prev_hi`` equal ``self`` / ``prev`` (kept for readers of the older
    bounds; ``exact`` is always True).
    """

    entropy: np.ndarray  # mean entropy of the query rows, nats
    max_weight: np.ndarray  # mean largest weight of the query rows
    first: np.ndarray  # mean P[i, 0] (the first token; attention sinks)
    self: np.ndarray  # mean P[i, pos(i)]
    prev: np.ndarray  # mean P[i, pos(i) - 1] over queries with pos(i) >= 1
    self_lo: np.ndarray
    self_hi: np.ndarray
    prev_lo: np.ndarray
    prev_hi: np.ndarray
    exact: bool = True
    duplicate: Optional[np.ndarray] = None  # Σ P[i, j] over earlier j with the same token as pos(i)
    induction: Optional[np.ndarray] = None  # Σ P[i, j + 1] over those j
    custom: Optional[np.ndarray] = None  # Σ P[i, j] over the pattern's keys


def _positions(rec, res, nq: int, nk: int, q_offset) -> np.ndarray:
    """Each query's own key position ``i + q_offset`` (default ``Nk - Nq``, or the record's ``q_offset``)."""
    if q_offset is None:
        q_offset = getattr(rec, "q_offset", None)
    return np.arange(nq) + (nk - nq if q_offset is None else q_offset)


def _dense_of(res, batch: int):
    """The full weights ``(H, Nq, Nk)`` of one sequence when every row was kept, else None."""
    return _pick(res.weights, batch, 3) if _has_full(res) else None


def _stats_of(rec, batch: int):
    """``(lse, entropy, max_weight)``, each ``(H, Nq)`` float64 for sequence ``batch``: from the record's
    result, or asked again (``record.ask``) when the capture's lens did not have them."""
    res = _result_of(rec)
    have = [getattr(res, f) is not None for f in ("lse", "entropy", "max_weight")]
    if all(have[1:]) and (have[0] or _has_full(res)):
        dense = _dense_of(res, batch)
        lse = _pick(res.lse, batch, 2) if have[0] else np.where(dense.sum(-1) > 0, 0.0, -np.inf)  # live rows only
        return lse, _pick(res.entropy, batch, 2), _pick(res.max_weight, batch, 2)
    if getattr(rec, "call", None) is None:
        raise ValueError("head_summary: the result lacks lse/entropy/max_weight and the record kept no inputs to "
                         "ask again; capture with the default Lens() and keep_inputs=True")
    from .lens import Lens

    again = rec.ask(Lens(received=False), batch=batch)
    return tuple(as_numpy(getattr(again, f))[0] for f in ("lse", "entropy", "max_weight"))


def weights_at(rec, idx, *, batch: int = 0) -> np.ndarray:
    """``P[i, idx[i, m]]`` ``(H, Nq, m)`` float64 for one sequence, exact: from the full weights when the record
    kept them, else from the record's call (`attnlens._capture.AttnCall.weights_at`: the pass's lse and the
    chosen pairs' dot products, in query chunks, linear memory). ``idx (Nq, m)`` int, ``-1`` = none (weight 0)."""
    res = _result_of(rec)
    idx = np.asarray(idx, dtype=np.int64)
    dense = _dense_of(res, batch)
    if dense is not None:
        got = np.take_along_axis(dense, np.maximum(idx, 0)[None], axis=-1)
        return np.where(idx[None] >= 0, got, 0.0)
    call = getattr(rec, "call", None)
    if call is None:
        raise ValueError("needs the full weights (Lens(rows='all')) or a record that kept its inputs "
                         "(hf.capture / nn.capture with keep_inputs=True, the default)")
    lse = None if res.lse is None else res.lse[batch][None]
    return as_numpy(call.weights_at(torch.from_numpy(idx), lse=lse, batch=batch))[0]


def _live_queries(rec, res, lse: np.ndarray, pos: np.ndarray, batch: int, live) -> np.ndarray:
    """Queries that count: they see a key (finite lse in some head) and their own position is not padding — per
    ``live`` (key positions, ``(B, Nk)`` / ``(Nk,)``) when given, else a key no query may see (from the call's
    bool mask; with full weights only, a key of weight 0 everywhere)."""
    ok = np.isfinite(lse).any(0)
    seen = None
    call = getattr(rec, "call", None)
    if live is not None:
        seen = np.asarray(as_numpy(live)).astype(bool)
        seen = seen[batch] if seen.ndim == 2 else seen
    elif call is not None and call.mask is not None and call.mask.dtype == torch.bool:
        m = call.mask[batch] if call.mask.shape[0] > 1 else call.mask[0]
        seen = as_numpy(m.reshape(-1, m.shape[-1]).any(0)).astype(bool)  # (Nk,)
    elif call is None and _has_full(res):
        seen = (_dense_of(res, batch) > 0).any((0, 1))
    if seen is not None:
        inside = (pos >= 0) & (pos < seen.shape[0])
        ok &= ~inside | seen[np.clip(pos, 0, seen.shape[0] - 1)]
    return ok


def earlier_same_token(tokens) -> np.ndarray:
    """``(N, m)`` int64: row p lists the earlier positions j < p with ``tokens[j] == tokens[p]`` (ascending),
    padded with -1; ``m`` = the most earlier occurrences of any position (at least 1)."""
    tok = np.asarray(tokens).reshape(-1)
    n = tok.shape[0]
    order = np.lexsort((np.arange(n), tok))  # by token, then position
    st = tok[order]
    start = np.r_[0, np.flatnonzero(st[1:] != st[:-1]) + 1]  # first slot of each token's group
    first = np.repeat(start, np.diff(np.r_[start, n]))  # (n,) group start of each sorted slot
    rank = np.arange(n) - first  # earlier occurrences of each sorted slot
    m = max(1, int(rank.max()) if n else 1)
    cols = np.arange(m)
    src = np.minimum(first[:, None] + cols, n - 1)
    rows = np.where(cols < rank[:, None], order[src], -1)  # (n, m) in sorted order
    out = np.empty_like(rows)
    out[order] = rows
    return out


def _pattern_index(pattern, pos: np.ndarray, nk: int) -> np.ndarray:
    """A user pattern as ``(Nq, m)`` key indices: a function of the query positions ``pos (Nq,)`` returning
    ``(Nq, m)`` indices, or an index map ``(Nq, m)`` itself; -1 = none."""
    idx = pattern(pos.copy()) if callable(pattern) else pattern
    idx = np.asarray(as_numpy(idx))
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"pattern: expected integer key indices, got dtype {idx.dtype}")
    idx = idx.reshape(pos.shape[0], -1) if idx.ndim == 1 else idx
    if idx.ndim != 2 or idx.shape[0] != pos.shape[0] or (idx.size and (idx.min() < -1 or idx.max() >= nk)):
        raise ValueError(f"pattern: expected (Nq={pos.shape[0]}, m) key indices in [-1, {nk}), got shape "
                         f"{idx.shape}")
    return idx.astype(np.int64)


def _score(rec, idx: np.ndarray, live: np.ndarray, batch: int, exclude_first: bool, H: int, lse: np.ndarray
           ) -> np.ndarray:
    """Mean over live queries with a non-empty key set of ``Σ_m P[i, idx[i, m]]`` ``(H,)``; ``lse (H, Nq)`` from
    `_stats_of` (so no key set costs another lse pass)."""
    if exclude_first:
        idx = np.where(idx == 0, -1, idx)
    has = live & (idx >= 0).any(-1)
    if not has.any():
        return np.zeros(H)
    idx = np.where(has[:, None], idx, -1)
    return _weight_sums(rec, idx, batch, lse)[:, has].mean(-1)


def _weight_sums(rec, idx: np.ndarray, batch: int, lse: np.ndarray) -> np.ndarray:
    """``Σ_m P[i, idx[i, m]]`` ``(H, Nq)`` float64 (``-1`` = none): from the full weights when the record kept them,
    else from the record's call (`attnlens._capture.AttnCall.weight_sums`: only the pairs that exist, so a few
    long key sets among many short ones cost the sum of the sizes), with the call's ``lse (H, Nq)``."""
    res = _result_of(rec)
    call = getattr(rec, "call", None)
    if _dense_of(res, batch) is not None or call is None:
        return weights_at(rec, idx, batch=batch).sum(-1)
    lse_t = res.lse[batch][None] if res.lse is not None else torch.from_numpy(lse)[None].to(call.q.device)
    return as_numpy(call.weight_sums(torch.from_numpy(idx), lse=lse_t, batch=batch))[0]


def head_summary(rec, input_ids=None, *, batch: int = 0, q_offset: Optional[int] = None, exclude_first: bool = False,
                 pattern=None, live=None) -> HeadSummary:
    """Exact summaries of each head of one captured call (a record of `hf.capture` / `nn.capture`, or a
    `LensResult` with full weights), at any length: no full weights needed (the weights at the chosen keys
    come from the record's inputs and lse, `weights_at`).

    With ``pos(i) = i + q_offset`` the key position of query i (``Nk - Nq`` by default: a generation step's
    query sits after the cache), every figure is a mean over the live queries with a non-empty key set::

        first     = mean P[i, 0]
        self      = mean P[i, pos(i)]
        prev      = mean over queries with pos(i) >= 1 of P[i, pos(i) - 1]             (previous-token heads)
        duplicate = mean over queries whose token occurred before, of Σ P[i, j] over the earlier positions j
                    with the same token                                                (duplicate-token heads)
        induction = mean over the same queries of Σ P[i, j + 1] over those j (j + 1 <= pos(i)): attention to
                    the token that followed the earlier occurrence                     (induction heads)
        custom    = mean of Σ P[i, j] over the keys j the ``pattern`` gives query i
        entropy, max_weight: means of the rows' entropy (nats) and largest weight.

    Args:
        input_ids: the token ids of the keys ``(B, Nk)`` / ``(Nk,)`` (tensor or array); enables ``duplicate`` and
            ``induction``.
        batch: which sequence.
        q_offset: the position of the first query among the keys; default from the record (``Nk - Nq``).
        exclude_first: drop key 0 from every key set (TransformerLens's ``exclude_bos``): a query left with an
            empty set does not count.
        pattern: a user pattern: a function of the query positions ``pos (Nq,)`` returning key indices
            ``(Nq, m)`` (-1 = none), or such an index map; gives ``custom``.
        live: which key positions hold real tokens ``(B, Nk)`` / ``(Nk,)`` bool (e.g. the attention mask); by
            default a query counts unless it sees no key or its own position is a key no query may see
            (key padding in the call's bool mask).

    Cost: one weight per query and key set member (O(Nq · m) dot products, in query chunks), plus
    ``entropy``/``max_weight``/``lse`` from the record (or one more pass when its lens lacked them).
    """
    res = _result_of(rec)
    lse, ent, mw = _stats_of(rec, batch)
    H, nq = lse.shape
    nk = _nk_of(rec, res, batch)
    pos = _positions(rec, res, nq, nk, q_offset)
    ok = _live_queries(rec, res, lse, pos, batch, live)
    inside = (pos >= 0) & (pos < nk)
    own = np.where(inside, pos, -1)[:, None]
    prev = np.where(inside & (pos >= 1), pos - 1, -1)[:, None]
    sets = {"first": np.zeros((nq, 1), dtype=np.int64), "self": own, "prev": prev}
    if input_ids is not None:
        dup = _duplicates(input_ids, batch, nk, pos)
        sets.update(duplicate=dup, induction=np.where(dup >= 0, dup + 1, -1))
    if pattern is not None:
        sets["custom"] = _pattern_index(pattern, pos, nk)
    hs = {name: _score(rec, idx, ok, batch, exclude_first and name != "first", H, lse) for name, idx in sets.items()}
    n = max(int(ok.sum()), 1)
    return HeadSummary(entropy=np.where(ok, ent, 0).sum(-1) / n, max_weight=np.where(ok, mw, 0).sum(-1) / n,
                       self_lo=hs["self"], self_hi=hs["self"], prev_lo=hs["prev"], prev_hi=hs["prev"], **hs)


#: the kinds `head_kinds` names: the pattern kinds in the order it tries them, then "broad", then "mixed"
HEAD_KINDS = ("induction", "duplicate", "previous-token", "self", "first-token sink", "broad", "mixed")
_PATTERNS = (("induction", "induction"), ("duplicate", "duplicate"), ("previous-token", "prev"), ("self", "self"),
             ("first-token sink", "first"))
#: a pattern kind applies when its score (the mean weight a query puts on the pattern's keys) is at least this
KIND_SCORE = 0.5
#: "broad": mean entropy at least this fraction of log(n_tokens) ...
BROAD_ENTROPY = 0.75
#: ... or a mean largest weight below this
BROAD_MAX_WEIGHT = 0.25


def head_kinds(summary: HeadSummary, n_tokens: int | None = None) -> list:
    """Name each head of one layer from its exact scores (`head_summary`): ``[(kind, score), ...]``, one per head.

    The rules, for each head; the first that applies names it:

    1. A *pattern kind*, when its score is at least ``KIND_SCORE`` (0.5: more than half of a query's weight, on
       average, goes to the pattern's keys), tried in this order::

           "induction"         summary.induction: the token after an earlier copy of the query's token
           "duplicate"         summary.duplicate: earlier copies of the query's token
           "previous-token"    summary.prev: the token just before the query
           "self"              summary.self: the query's own position
           "first-token sink"  summary.first: position 0 ([CLS], BOS), where a head puts weight it does not
                               need (an attention sink)

       The key sets can overlap (a token repeated right after itself: its earlier copy is also the previous
       token, and the token after that copy is the query itself); the more specific reading then wins, which is
       why induction, whose keys define an induction head, is tried first. ``duplicate`` / ``induction`` are
       skipped when they are ``None`` (no token ids). The score is the pattern's score.
    2. ``"broad"``: no pattern dominates and the head spreads its weight: its mean entropy is at least
       ``BROAD_ENTROPY`` (0.75) of ``log(n_tokens)`` (the entropy of a uniform row over every token; only when
       ``n_tokens >= 2`` is given), or its mean largest weight is below ``BROAD_MAX_WEIGHT`` (0.25: on average no
       key gets a quarter of a query's weight). The score is the mean largest weight (``summary.max_weight``).
    3. ``"mixed"``: anything else: the head focuses on keys that none of the patterns describes (where the
       content heads are: look at its links). The score is the mean largest weight.

    A figure that is NaN (non-finite inputs) never applies: a head whose figures are all NaN is ``"mixed"``.
    The thresholds were looked at on MiniLM (BERT, 6 × 12) and on a small trained induction model
    (tests/test_induction.py): their previous-token heads score 0.94 to 1.00 and the induction heads 0.78 to 0.98,
    far above 0.5, while MiniLM's first-token scores run evenly from 0.04 to 0.9, so for sinks 0.5 is a convention
    (more than half), not a gap in the data. In MiniLM's first layer the heads with no pattern have entropies of
    0.76 to 0.91 of log(n) on a 16-token sentence (broad); its later heads mostly 0.3 to 0.7 (sinks, mixed).

    Args:
        summary: one layer's `HeadSummary` (arrays ``(H,)``).
        n_tokens: the number of keys (tokens) in the sequence, for the entropy test of ``"broad"``.
    """
    if not isinstance(summary, HeadSummary):
        raise TypeError(f"summary: expected an attnlens.analysis.HeadSummary, got {type(summary).__name__}")
    if n_tokens is not None and (isinstance(n_tokens, bool) or not isinstance(n_tokens, (int, np.integer))
                                 or n_tokens < 1):
        raise ValueError(f"n_tokens: expected an int >= 1 or None, got {n_tokens!r}")
    ent, mw = np.asarray(summary.entropy, dtype=np.float64), np.asarray(summary.max_weight, dtype=np.float64)
    spread = BROAD_ENTROPY * np.log(n_tokens) if n_tokens is not None and n_tokens >= 2 else np.inf
    scores = [(kind, np.asarray(getattr(summary, f), dtype=np.float64)) for kind, f in _PATTERNS
              if getattr(summary, f) is not None]
    out = []
    for h in range(ent.shape[0]):
        kind = next(((k, float(s[h])) for k, s in scores if s[h] >= KIND_SCORE), None)
        if kind is None:
            kind = ("broad" if ent[h] >= spread or mw[h] < BROAD_MAX_WEIGHT else "mixed", float(mw[h]))
        out.append(kind)
    return out


def _nk_of(rec, res, batch: int) -> int:
    for a in (res.received, res.weights):
        if a is not None:
            return a.shape[-1]
    call = getattr(rec, "call", None)
    if call is None:
        raise ValueError("head_summary: cannot tell the number of keys (no received, weights or call)")
    return call.k.shape[2]


def _duplicates(input_ids, batch: int, nk: int, pos: np.ndarray) -> np.ndarray:
    """``(Nq, m)``: for each query, the earlier key positions with its token (``earlier_same_token``)."""
    ids = as_numpy(input_ids)
    ids = ids[batch] if ids.ndim == 2 else ids
    if ids.shape[-1] != nk:
        raise ValueError(f"input_ids: expected one token id per key position ({nk}), got shape {ids.shape}")
    table = earlier_same_token(ids)  # (Nk, m)
    inside = (pos >= 0) & (pos < nk)
    return np.where(inside[:, None], table[np.clip(pos, 0, nk - 1)], -1)


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
