"""PyTorch's fused ``scaled_dot_product_attention``: the output only (no lse, no lens, no block primitives).

Gradients flow through PyTorch's own autograd. Causal calls with ``offset == 0`` (and ``scale > 0``) use
its ``is_causal`` (top-left aligned = offset 0) and need no mask; windows, other offsets, ``scale <= 0``
and causal with a user mask need a dense ``(Nq, Nk)`` bool mask — `memory` says so, and ``backend="auto"``
then prefers a linear-memory backend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._inputs import AttnInputs
from ..masks import band_keep
from . import Backend, Capabilities

_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")  # torch >= 2.5


def _dense_band(inp: AttnInputs) -> bool:
    """The call needs a materialised (Nq, Nk) band mask. Not ``is_causal`` for ``scale <= 0`` either: PyTorch's
    CPU flash kernel fills masked scores with -inf *before* scaling, and -inf · 0 = NaN, -inf · (-0.5) = +inf,
    so every row came back NaN; an explicit mask is applied after scaling."""
    return inp.window is not None or (inp.causal and (inp.offset != 0 or inp.mask is not None or inp.scale <= 0))


class SdpaBackend(Backend):
    name = "sdpa"
    description = "torch.nn.functional.scaled_dot_product_attention (fused; output only)"
    capabilities = Capabilities(lens=frozenset(), block=False, column_weights=False, score_mods=frozenset(),
                                memory="O(N); O(Nq·Nk) with a band mask",
                                notes="a dense (Nq, Nk) mask for windows, offsets other than 0 with causal, or "
                                      "causal with a mask")

    def extra_reasons(self, inp: AttnInputs, reasons: list[str]) -> list[str]:
        out = []
        B, Hq, Hkv, *_ = inp.shape
        if Hq != Hkv and not _HAS_GQA:
            out.append("grouped-query attention needs torch >= 2.5 (enable_gqa)")
        if inp.shape[4] == 0:
            out.append("Nk = 0 (an empty key set; backend='torch' gives every row output 0, lse -inf)")
        if not reasons and not out and not inp.all_finite:
            out.append("q, k or v holds NaN/inf: the fused kernel may zero such rows or spread them to rows "
                       "that give them weight 0")
        return out

    def memory(self, inp: AttnInputs) -> str:
        return "O(Nq·Nk)" if _dense_band(inp) else "O(N)"

    def forward(self, inp: AttnInputs):
        """``(out, None, None)``: differentiable through PyTorch's autograd."""
        q, k, v = inp.q, inp.k, inp.v
        B, Hq, Hkv, Nq, Nk, D, Dv = inp.shape
        kw = {"dropout_p": inp.dropout_p, "scale": inp.scale}
        if Hq != Hkv:
            kw["enable_gqa"] = True
        attn_mask, live = None, None
        if inp.causal and not _dense_band(inp):
            kw["is_causal"] = True  # top-left aligned: query i sees key j <= i, i.e. offset 0
        else:
            keep = None
            if _dense_band(inp):
                keep = band_keep(torch.arange(Nq, device=q.device), torch.arange(Nk, device=q.device), inp.offset,
                                 inp.causal, inp.window)
            m = inp.mask
            if m is None:
                attn_mask = keep
            elif m.dtype == torch.bool:
                attn_mask = m if keep is None else (m & keep)
            else:
                attn_mask = m.to(q.dtype)
                if keep is not None:
                    attn_mask = attn_mask.masked_fill(~keep, float("-inf"))
            if attn_mask is not None:
                live = (attn_mask if attn_mask.dtype == torch.bool else attn_mask > float("-inf")).any(-1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kw)
        if live is not None and not bool(live.all()):
            # rows that see no key: 0 whatever the PyTorch version or kernel does with them
            out = out.masked_fill(~live.unsqueeze(-1), 0.0)
        return out, None, None
