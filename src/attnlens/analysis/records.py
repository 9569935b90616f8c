"""Reading what a capture recorded: one sequence's arrays from a record, and chosen weights asked again exactly.

A *record* is what `attnlens.hf.capture` / `attnlens.nn.capture` append to ``cap.results``; the analyses read it
through this protocol only (no integration is imported):

    record.result        the `attnlens.LensResult` of the call (rank-4 torch, ``(B, Hq, ...)``)
    record.call          the call's kept inputs, an `attnlens.core.AttnCall` (``None`` with keep_inputs=False):
                         asked again exactly through the block API (``call.ask``, ``weights_at``, ``received_from``)
    record.q_offset      optional: the first query's key position (``Nk - Nq`` by default)
    record.value_norms, record.out_norms, record.output_heads()   optional (Hugging Face records): value norms, W_O
    record.block_parts()  optional (Hugging Face records): the attention block around the call — ``x (B, N, E)`` the
                         residual stream entering it, ``w_o (Hq, Dv, E)``, ``b_o (E,)|None``, ``norm`` ``"post"`` (with
                         ``ln_weight``, ``ln_bias``, ``ln_eps``) or ``"pre"``; raises ``ValueError`` when unknown

A bare `LensResult` also works wherever no re-ask is needed (full weights kept with ``Lens(rows="all")``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from ..core import Lens

__all__ = ["as_numpy", "result_of", "pick", "topk_dense", "query_count", "key_count", "has_full_weights",
           "dense_weights", "dense_view", "row_stats", "weights_at", "weight_sums", "layer_weights", "top_received",
           "start_rows"]


def as_numpy(x) -> Optional[np.ndarray]:
    """A float64 (or int64) NumPy copy of a tensor/array; ``None`` stays ``None``."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return x.numpy().copy() if not x.is_floating_point() else x.double().numpy()
    a = np.asarray(x)
    return a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a.copy()


def result_of(rec):
    """A `LensResult` from a record (``.result``) or the result itself."""
    return getattr(rec, "result", rec)


def pick(a, batch: int, rank: int):
    """``a`` as float64 NumPy with sequence ``batch`` selected when it has a leading batch dim (rank ``rank + 1``)."""
    a = as_numpy(a)
    return a[batch] if a is not None and a.ndim == rank + 1 else a


def topk_dense(indices, weights, nk: int) -> np.ndarray:
    """Scatter top-k ``(..., Nq, k)`` into dense ``(..., Nq, nk)``; keys outside the top k get 0."""
    idx, w = as_numpy(indices), as_numpy(weights)
    out = np.zeros(idx.shape[:-1] + (nk + 1,))  # column nk collects the -1 placeholders
    np.put_along_axis(out, np.where(idx >= 0, idx, nk), w, axis=-1)
    return out[..., :nk]


def query_count(res) -> Optional[int]:
    """The number of queries of a `LensResult` (from a per-query field), or None."""
    for a in (res.entropy, res.lse, res.max_weight):
        if a is not None:
            return a.shape[-1]
    return None


def key_count(rec, batch: int = 0) -> int:
    """The number of keys of a record (from ``received``, ``weights`` or the kept call)."""
    res = result_of(rec)
    for a in (res.received, res.weights):
        if a is not None:
            return a.shape[-1]
    call = getattr(rec, "call", None)
    if call is None:
        raise ValueError("cannot tell the number of keys (the record has no received, weights or kept call)")
    return call.k.shape[2]


def has_full_weights(res) -> bool:
    """Every query row's weights were kept (``Lens(rows="all")``) in the `LensResult` ``res``."""
    if res.weights is None:
        return False
    nq = query_count(res) or res.weights.shape[-2]
    return res.rows == tuple(range(nq))


def dense_weights(res, batch: int) -> Optional[np.ndarray]:
    """The full weights ``(H, Nq, Nk)`` of sequence ``batch`` when every row was kept, else None."""
    return pick(res.weights, batch, 3) if has_full_weights(res) else None


def dense_view(res, batch: int) -> Optional[np.ndarray]:
    """The full weights ``(H, Nq, Nk)`` of sequence ``batch`` as kept, without a copy where it can (a float32 or
    float64 CPU tensor's own memory), when every row was kept, else None. Read it, never write it: analyses that
    gather a few weights or sum rows use it instead of `dense_weights`' float64 copy (``8 · H · N²`` bytes)."""
    if not has_full_weights(res):
        return None
    w = res.weights
    if isinstance(w, torch.Tensor):
        w = w.detach()
        w = w[batch] if w.ndim == 4 else w
        if w.device.type != "cpu" or w.dtype not in (torch.float32, torch.float64):
            w = w.float().cpu()
        return w.numpy()
    w = np.asarray(w)
    return w[batch] if w.ndim == 4 else w


def row_stats(rec, batch: int):
    """``(lse, entropy, max_weight)``, each ``(H, Nq)`` float64 for sequence ``batch``: from the record's result, or
    asked again from its kept call (one pass) when the capture's lens did not have them."""
    res = result_of(rec)
    have = [getattr(res, f) is not None for f in ("lse", "entropy", "max_weight")]
    if all(have[1:]) and (have[0] or has_full_weights(res)):
        lse = pick(res.lse, batch, 2) if have[0] else \
            np.where(dense_view(res, batch).sum(-1, dtype=np.float64) > 0, 0.0, -np.inf)  # live rows only
        return lse, pick(res.entropy, batch, 2), pick(res.max_weight, batch, 2)
    call = getattr(rec, "call", None)
    if call is None:
        raise ValueError("the result lacks lse/entropy/max_weight and the record kept no inputs to ask again; "
                         "capture with the default Lens() and keep_inputs=True")
    again = call.ask(Lens(received=False), batch=batch)
    return tuple(as_numpy(getattr(again, f))[0] for f in ("lse", "entropy", "max_weight"))


def _kept_call(rec):
    call = getattr(rec, "call", None)
    if call is None:
        raise ValueError("needs the full weights (Lens(rows='all')) or a record that kept its inputs "
                         "(hf.capture / nn.capture with keep_inputs=True, the default)")
    return call


def weights_at(rec, idx, *, batch: int = 0) -> np.ndarray:
    """``P[i, idx[i, m]]`` ``(H, Nq, m)`` float64 for one sequence, exact: from the full weights when the record
    kept them, else from the record's call (`attnlens.core.AttnCall.weights_at`: the pass's lse and the chosen pairs'
    dot products, in query chunks, linear memory). ``idx (Nq, m)`` int, ``-1`` = none (weight 0)."""
    res = result_of(rec)
    idx = np.asarray(idx, dtype=np.int64)
    dense = dense_view(res, batch)
    if dense is not None:
        got = np.take_along_axis(dense, np.maximum(idx, 0)[None], axis=-1).astype(np.float64)
        return np.where(idx[None] >= 0, got, 0.0)
    call = _kept_call(rec)
    lse = None if res.lse is None else res.lse[batch][None]
    return as_numpy(call.weights_at(torch.from_numpy(idx), lse=lse, batch=batch))[0]


def weight_sums(rec, idx: np.ndarray, *, batch: int = 0, lse: Optional[np.ndarray] = None) -> np.ndarray:
    """``Σ_m P[i, idx[i, m]]`` ``(H, Nq)`` float64 (``-1`` = none): from the full weights when the record kept them,
    else from the record's call (`attnlens.core.AttnCall.weight_sums`: only the pairs that exist, so a few long key
    sets among many short ones cost the sum of the sizes), with the call's ``lse (H, Nq)`` when known."""
    res = result_of(rec)
    if has_full_weights(res) or getattr(rec, "call", None) is None:
        return weights_at(rec, idx, batch=batch).sum(-1)
    call = rec.call
    if res.lse is not None:
        lse_t = res.lse[batch][None]
    else:
        lse_t = None if lse is None else torch.from_numpy(lse)[None].to(call.q.device)
    return as_numpy(call.weight_sums(torch.from_numpy(np.asarray(idx, dtype=np.int64)), lse=lse_t, batch=batch))[0]


def layer_weights(records: Sequence, *, batch: int = 0, allow_topk: bool = False):
    """Per layer, one sequence's weights ``(H, Nq, Nk)`` from records (or `LensResult`s).

    Uses the full weights when every row was kept; otherwise, with ``allow_topk``, the top-k
    weights scattered into a dense matrix (an approximation; returns the fraction of weight kept).

    Returns ``(list of (H, Nq, Nk) arrays, coverage)``: coverage 1.0 when exact.
    """
    mats, kept = [], []
    for rec in records:
        res = result_of(rec)
        if has_full_weights(res):
            mats.append(pick(res.weights, batch, 3))
            kept.append(1.0)
        elif allow_topk and res.topk_indices is not None:
            nk = res.received.shape[-1] if res.received is not None else None
            if nk is None:
                raise ValueError("layer_weights: top-k needs received (for the number of keys) in the lens")
            w = topk_dense(pick(res.topk_indices, batch, 3), pick(res.topk_weights, batch, 3), nk)
            mats.append(w)
            kept.append(float(w.sum(-1).mean()))
        else:
            raise ValueError("layer_weights: a record has no full weight rows (Lens(rows='all'))"
                             + (" and no top-k (Lens(topk=k))" if allow_topk else "; pass allow_topk=True "
                                "to approximate from top-k"))
    return mats, float(np.mean(kept)) if kept else 1.0


def top_received(rec, k: int = 5, *, batch: int = 0, heads=None):
    """The ``k`` keys that receive the most attention, averaged over ``heads`` (default all).

    Returns ``(indices (k,), mean received per query (k,))`` — ``received / Nq``: the average
    weight a query puts on that key (exact, from the column view).
    """
    res = result_of(rec)
    if res.received is None:
        raise ValueError("top_received: the lens has no received; capture with Lens(received=True)")
    r = pick(res.received, batch, 2)  # (H, Nk)
    nq = query_count(res) or r.shape[-1]
    if heads is not None:
        r = r[np.asarray(heads)]
    m = r.mean(0) / nq
    k = min(k, m.shape[0])
    idx = np.argsort(-m, kind="stable")[:k]
    return idx, m[idx]


def start_rows(rows, n: int, *, who: str = "rollout") -> np.ndarray:
    """``(N, T)`` float64 for carrying rows down the layers: column t selects row ``rows[t]`` (ints, negative from the
    end), or is row t of a ``(T, N)`` float array of row combinations (block means for a pooled map)."""
    arr = np.asarray(as_numpy(rows))
    if arr.ndim == 2 and np.issubdtype(arr.dtype, np.floating):
        if arr.shape[1] != n:
            raise ValueError(f"{who}: rows as combinations must be (T, N={n}), got {arr.shape}")
        return arr.T.astype(np.float64)
    picked = [int(r) for r in np.atleast_1d(arr)]
    if any(not -n <= r < n for r in picked):
        raise ValueError(f"{who}: rows {picked} out of range for N={n}")
    u = np.zeros((n, len(picked)))
    u[[r % n for r in picked], np.arange(len(picked))] = 1.0
    return u
