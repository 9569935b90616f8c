"""The float64 NumPy oracle as a backend (CPU, no autograd, no dropout; dense n × n memory)."""
from __future__ import annotations

import numpy as np
import torch

from .._inputs import AttnInputs
from ..reference import reference_attention, reference_lens
from . import Backend, stat_dtype


class ReferenceBackend(Backend):
    name = "reference"
    description = "NumPy float64, dense weights: the oracle (small inputs only)"
    capabilities = {"devices": "any (computes on CPU)", "dtypes": "all (float64 inside)", "lens": "yes",
                    "grad": "no", "dropout": "no", "memory": "O(Nq·Nk)"}

    def not_supported_reasons(self, inp: AttnInputs) -> list[str]:
        reasons = []
        if inp.dropout_p > 0:
            reasons.append("dropout is not supported (the oracle is deterministic)")
        if inp.requires_grad:
            reasons.append("no autograd (NumPy); use backend='torch' for gradients")
        return reasons

    def run(self, inp: AttnInputs):
        def np64(t):
            return t.detach().cpu().to(torch.float64 if t.dtype != torch.bool else torch.bool).numpy()

        mask = None if inp.mask is None else np64(inp.mask)
        out, w, lse = reference_attention(np64(inp.q), np64(inp.k), np64(inp.v), mask=mask, causal=inp.causal,
                                          window=inp.window, scale=inp.scale)
        dev, dt = inp.q.device, inp.q.dtype
        out_t = torch.from_numpy(out).to(device=dev, dtype=dt)
        if inp.lens is None:
            return out_t, None
        res = reference_lens(w, lse, topk=inp.lens.topk, rows=inp.rows)
        sd = stat_dtype(dt)
        res = _select(inp.lens, res).map_arrays(
            lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device=dev, dtype=torch.int64 if a.dtype == np.int64 else sd))
        if res.topk_indices is not None:  # a weight that underflows to 0 in the output precision has no key
            res.topk_indices = res.topk_indices.masked_fill(res.topk_weights == 0, -1)
        return out_t, res


def _select(lens, res):
    """Drop the fields the caller did not ask for."""
    for name in ("lse", "max_weight", "entropy", "received"):
        if not getattr(lens, name):
            setattr(res, name, None)
    return res
