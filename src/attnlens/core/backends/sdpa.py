"""PyTorch's fused ``scaled_dot_product_attention``: the output only (no lse, no lens, no block primitives).

Gradients flow through PyTorch's own autograd. Causal calls with ``offset == 0`` (and ``scale > 0``) use
its ``is_causal`` (top-left aligned = offset 0) and need no mask; windows, other offsets, ``scale <= 0``
and causal with a user mask need a dense ``(Nq, Nk)`` bool mask — `memory` says so, and ``backend="auto"``
then prefers a linear-memory backend.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..capabilities import Capabilities, Memory
from ..inputs import AttnInputs
from ..lens import MAX_BYTES
from ..masks import band_keep
from . import Backend, fused

_FUSED = fused.FusedCpuBackend()
_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")  # torch >= 2.5


def _dense_band(inp: AttnInputs) -> bool:
    """The call needs a materialised (Nq, Nk) band mask. Not ``is_causal`` for ``scale <= 0`` either: PyTorch's
    CPU flash kernel fills masked scores with -inf *before* scaling, and -inf · 0 = NaN, -inf · (-0.5) = +inf,
    so every row came back NaN; an explicit mask is applied after scaling."""
    return inp.window is not None or (inp.causal and (inp.offset != 0 or inp.mask is not None or inp.scale <= 0))


def _band_mask_bytes(inp: AttnInputs) -> int:
    """Bytes of the dense masks `SdpaBackend.forward` builds for a band (0 without one): the ``(Nq, Nk)`` bool band,
    and with a user mask the band combined with it, at the mask's broadcast shape (float: in q's dtype)."""
    if not _dense_band(inp):
        return 0
    Nq, Nk = inp.shape[3], inp.shape[4]
    n = Nq * Nk
    m = inp.mask
    if m is not None:
        per = 1 if m.dtype == torch.bool else inp.q.element_size()
        n += math.prod(torch.broadcast_shapes(tuple(m.shape), (Nq, Nk))) * per
    return n


class SdpaBackend(Backend):
    """PyTorch's fused kernel. ``max_mask_bytes``: the largest dense band mask (windows, offsets; see
    `_band_mask_bytes`) this backend object builds — a named ``sdpa`` call that needs more is refused with a reason
    (default `attnlens.lens.MAX_BYTES`, 8 GiB; ``None``: no limit), e.g. ``backend=SdpaBackend(max_mask_bytes=None)``."""

    name = "sdpa"
    description = "torch.nn.functional.scaled_dot_product_attention (fused; output only)"
    capabilities = Capabilities(lens=frozenset(), block=False, score_mods=frozenset(), memory=Memory.LINEAR,
                                worst_memory=Memory.DENSE,
                                notes="a dense (Nq, Nk) band mask for windows, offsets other than 0 with causal, or "
                                      "causal with a mask")

    def __init__(self, max_mask_bytes: Optional[int] = MAX_BYTES):
        mb = max_mask_bytes
        if mb is not None and (isinstance(mb, bool) or not isinstance(mb, int) or mb < 0):
            raise ValueError(f"max_mask_bytes must be an int >= 0 or None (no limit), got {mb!r}")
        self.max_mask_bytes = mb

    def extra_reasons(self, inp: AttnInputs, reasons: list[str]) -> list[str]:
        out = []
        n = _band_mask_bytes(inp)
        if self.max_mask_bytes is not None and n > self.max_mask_bytes:
            why = f"window={inp.window}" if inp.window is not None else f"causal with offset={inp.offset}"
            if inp.window is None and inp.offset == 0:
                why = "causal with a mask" if inp.mask is not None else f"causal with scale={inp.scale}"
            out.append(f"{why} needs a dense (Nq, Nk) mask of {n / 1e9:.3g} GB here, above its max_mask_bytes = "
                       f"{self.max_mask_bytes / 1e9:.3g} GB: use backend='torch' (linear memory), or allow it with "
                       f"backend=attnlens.SdpaBackend(max_mask_bytes=None)")
        B, Hq, Hkv, *_ = inp.shape
        if Hq != Hkv and not _HAS_GQA:
            out.append("grouped-query attention needs torch >= 2.5 (enable_gqa)")
        if inp.shape[4] == 0:
            out.append("Nk = 0 (an empty key set; backend='torch' gives every row output 0, lse -inf)")
        if not reasons and not out and not inp.all_finite:
            out.append("q, k or v holds NaN/inf: the fused kernel may zero such rows or spread them to rows "
                       "that give them weight 0")
        return out

    def auto_reasons(self, inp: AttnInputs) -> list[str]:
        """``auto`` passes over SDPA for a plain causal float32 CPU call that the fused kernel serves: the kernel measured
        faster there (`fused.takes_plain`, `fused.PLAIN_RULE`)."""
        if fused.takes_plain(inp) and not _FUSED.not_supported_reasons(inp):
            return [f"the fused CPU kernel serves it and measured faster ({fused.PLAIN_RULE})"]
        return []

    def memory(self, inp: AttnInputs) -> Memory:
        return Memory.DENSE if _dense_band(inp) else Memory.LINEAR

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
