"""Attention rollout (Abnar & Zuidema 2020), dense or exact rows at any length, in linear memory."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..core import Lens
from .records import as_numpy, dense_weights, layer_weights, pick, result_of, row_stats, start_rows

__all__ = ["rollout"]


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
    ``record.call.ask(Lens(received_from=W))`` — one attention pass per layer for all the rows together.

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
    covered = []
    if hasattr(result_of(layers[0]), "received") and not isinstance(layers[0], np.ndarray) \
            and not isinstance(layers[0], torch.Tensor):
        def one_by_one():  # a layer's float64 weights at a time, not all layers' at once
            for layer in layers:
                mats, cov = layer_weights([layer], batch=batch, allow_topk=allow_topk)
                covered.append(cov)
                yield mats[0]

        mats = one_by_one()
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
    coverage = float(np.mean(covered)) if covered else 1.0
    return (R, coverage) if return_coverage else R


def _dense_layer(layer, batch: int) -> Optional[np.ndarray]:
    """One layer's weights ``(H, N, N)`` for sequence ``batch`` when they are at hand (an array, or full weights)."""
    if isinstance(layer, np.ndarray) or isinstance(layer, torch.Tensor):
        w = as_numpy(layer)
        w = w[batch] if w.ndim == 4 else w
        return w if w.ndim == 3 else w[None]
    return dense_weights(result_of(layer), batch)


def _row_mass(layer, dense, batch: int) -> np.ndarray:
    """``(N,)``: mean over heads of each row's weight sum over the keys: ``1 - sink weight`` for a query that sees
    a key (1 without attention sinks), 0 otherwise."""
    if dense is not None:
        return dense.sum(-1).mean(0)
    lse = row_stats(layer, batch)[0]
    sink = pick(result_of(layer).sink_weight, batch, 2)
    if sink is None and getattr(getattr(layer, "call", None), "sinks", None) is not None:
        sink = as_numpy(layer.call.ask(Lens(received=False), batch=batch).sink_weight)[0]  # (H, N), one more pass
    return np.where(np.isfinite(lse), 1.0 - (0.0 if sink is None else sink), 0.0).mean(0)


def _carry(layer, dense, x: np.ndarray, batch: int) -> np.ndarray:
    """``mean_h P_hᵀ x`` ``(N, T)`` for ``x (N, T)``: from the dense weights, else the record's call
    (``Lens(received_from=x)`` from the layer's lse: one column-sum pass, `AttnCall.received_from`)."""
    if dense is not None:
        return np.einsum("hit,hij->jt", np.broadcast_to(x, (dense.shape[0],) + x.shape), dense) / dense.shape[0]
    if getattr(layer, "call", None) is None:
        raise ValueError("rollout(rows=...): a layer has neither full weights nor kept inputs; capture with "
                         "keep_inputs=True (the default) or Lens(rows='all')")
    res = result_of(layer)
    lse = None if res.lse is None else res.lse[batch][None]
    rf = layer.call.received_from(torch.from_numpy(x), lse=lse, batch=batch)  # (1, Hq, N, T): Pᵀ x, one pass
    return as_numpy(rf)[0].mean(0)  # (N, T)


def _rollout_rows(layers: list, rows, residual: float, batch: int, on_layer) -> np.ndarray:
    """Rows of the rollout, carried from the top layer down (see `rollout`)."""
    n = None
    for li, layer in enumerate(reversed(layers)):
        dense = _dense_layer(layer, batch)
        mass = _row_mass(layer, dense, batch)  # (N,)
        if n is None:
            n = mass.shape[0]
            u = start_rows(rows, n)
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
