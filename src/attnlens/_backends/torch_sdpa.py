"""PyTorch's fused ``scaled_dot_product_attention``: the output only (no lens)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._inputs import AttnInputs
from ..masks import band_keep
from . import Backend

_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")  # torch >= 2.5


class SdpaBackend(Backend):
    name = "sdpa"
    description = "torch.nn.functional.scaled_dot_product_attention (fused; output only)"
    capabilities = {"devices": "any torch device", "dtypes": "as PyTorch", "lens": "no", "grad": "yes",
                    "dropout": "yes", "memory": "O(N) when causal Nq == Nk, no mask and scale > 0, else a dense mask"}

    def not_supported_reasons(self, inp: AttnInputs) -> list[str]:
        reasons = []
        if inp.lens is not None:
            reasons.append("no lens (PyTorch's fused kernel returns the output only)")
        B, Hq, Hkv, *_ = inp.shape
        if Hq != Hkv and not _HAS_GQA:
            reasons.append("grouped-query attention needs torch >= 2.5 (enable_gqa)")
        if not reasons and not inp.all_finite:
            reasons.append("q, k or v holds NaN/inf: the fused kernel may zero such rows or spread them to rows "
                           "that give them weight 0")
        return reasons

    def run(self, inp: AttnInputs):
        q, k, v = inp.q, inp.k, inp.v
        B, Hq, Hkv, Nq, Nk, D, Dv = inp.shape
        kw = {"dropout_p": inp.dropout_p, "scale": inp.scale}
        if Hq != Hkv:
            kw["enable_gqa"] = True
        attn_mask, live = None, None
        # is_causal: top-left == bottom-right when Nq == Nk; no dense mask. Not for scale <= 0: PyTorch's
        # CPU flash kernel fills masked scores with -inf *before* scaling, and -inf * 0 = NaN,
        # -inf * (-0.5) = +inf, so every row came back NaN; an explicit mask is applied after scaling.
        if inp.mask is None and inp.window is None and inp.causal and Nq == Nk and inp.scale > 0:
            kw["is_causal"] = True
        else:
            keep = band_keep(torch.arange(Nq, device=q.device), torch.arange(Nk, device=q.device), Nq, Nk,
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
        return out, None
