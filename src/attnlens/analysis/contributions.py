"""Value-norm contributions (Kobayashi et al. 2020, "Attention is not only a weight"): per head and through all heads
together, for chosen rows at any length."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..core import Lens
from .records import as_numpy

__all__ = ["contributions", "layer_contributions"]


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
        rec: a record of `attnlens.hf.capture` (its kept inputs and output projection, ``rec.output_heads()``) or
            `attnlens.nn.capture` (no projection).
        rows: query rows (ints).
        batch: which sequence.
        key_chunk: keys per step (bounds the ``(len(rows), chunk, E)`` temporary).

    Returns:
        ``C (len(rows), Nk)`` float64. Cost: one pass for the weight rows, then ``O(Nk · H · Dv · E)`` for the
        projected values (in key chunks).
    """
    call = getattr(rec, "call", None)
    if call is None:
        raise ValueError("layer_contributions: needs a record with kept inputs (capture with keep_inputs=True)")
    rows = [int(r) for r in np.atleast_1d(rows)]
    P = call.ask(Lens(lse=False, max_weight=False, entropy=False, received=False, rows=rows), batch=batch).weights[0]
    Hq, R, Nk = P.shape
    v = call.select(batch).v[0].to(P.dtype)  # (Hkv, Nk, Dv)
    v = v.repeat_interleave(Hq // v.shape[0], dim=0)  # (Hq, Nk, Dv)
    heads = getattr(rec, "output_heads", None) if use_output_projection else None
    wo = None if heads is None else heads()  # (Hq, Dv, E): W_O cut by head, from the record (Hugging Face)
    if wo is not None and tuple(wo.shape[:2]) != (Hq, v.shape[-1]):
        wo = None
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
