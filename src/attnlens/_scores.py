"""Scores of chosen (query, key) pairs under a call's rules, on any device: the one place outside the backends'
own kernels where a score is formed.

Any single weight is ``P[i, j] = exp(s_ij - lse_i)``: with the lse of a pass, chosen weights cost O(1) each
(``Lens(at=...)``, exact head scores) — no scores matrix. Every rule that shapes a score (scale, softcap, ALiBi,
float mask, causal / window / offset, bool mask) is applied here exactly as the backends apply it, in that order.
With sinks, the pass's lse includes the sink, so ``exp(s - lse)`` is already the weight of a real key.
"""
from __future__ import annotations

import torch

from ._inputs import AttnInputs, stat_dtype
from .masks import band


def pair_scores(inp: AttnInputs, idx: torch.Tensor) -> torch.Tensor:
    """Scaled, masked scores ``s (B, Hq, Nq, m)`` at key ``idx[b, h, i, m]`` for each query, in the statistics dtype.

    ``idx``: int64 key indices broadcastable to ``(B, Hq, Nq, m)``; ``-1`` (or any index outside ``[0, Nk)``)
    means none. A pair that is not visible — none, outside the band (causal / window around ``i + offset``), a
    bool mask False, a float mask ``-inf`` — scores ``-inf``. Memory O(Nq · m · D).
    """
    B, Hq, Hkv, Nq, Nk, D, _ = inp.shape
    m = idx.shape[-1]
    idx = idx.to(device=inp.q.device, dtype=torch.int64).expand(B, Hq, Nq, m)
    valid = (idx >= 0) & (idx < Nk)
    j = idx.clamp(0, Nk - 1)
    cdt = stat_dtype(inp.q.dtype)
    head = torch.arange(Hq, device=j.device) // (Hq // Hkv)  # kv head of each query head
    row = (torch.arange(B, device=j.device)[:, None] * Hkv + head[None, :])[:, :, None, None] * Nk + j  # (B,Hq,Nq,m)
    kg = inp.k.detach().reshape(B * Hkv * Nk, D).to(cdt)[row]  # (B, Hq, Nq, m, D)
    s = torch.einsum("bhid,bhimd->bhim", inp.q.detach().to(cdt), kg) * inp.scale
    pos = (torch.arange(Nq, device=j.device) + inp.offset)[:, None]  # (Nq, 1): each query's key position
    slopes = None if inp.alibi_slopes is None else inp.alibi_slopes[:, :, None, None]
    s = score_mods(s, inp.softcap, slopes, (pos - j).abs())
    keep = valid
    left, right = band(inp.causal, inp.window)
    if right is not None:
        keep = keep & (j <= pos + right)
    if left is not None:
        keep = keep & (j >= pos - left)
    if inp.mask is not None:
        mk = torch.gather(inp.mask.expand(B, Hq, Nq, Nk), -1, j)
        if mk.dtype == torch.bool:
            keep = keep & mk
        else:
            mk = mk.detach().to(cdt)
            keep = keep & (mk != float("-inf"))
            s = s + mk
    return s.masked_fill(~keep, float("-inf"))


def score_mods(s: torch.Tensor, softcap, slopes, dist) -> torch.Tensor:
    """Softcap then ALiBi on scaled scores ``s``, in place (detached tensors): ``s = c·tanh(s/c)``, then
    ``s -= slope·dist`` with ``slopes`` and ``dist = |i + offset - j|`` shaped by the caller to broadcast against
    ``s``. The torch backend forms its chunks' scores with this too."""
    if softcap is not None:
        s.div_(softcap).tanh_().mul_(softcap)
    if slopes is not None:
        s.addcmul_(slopes.to(s.dtype), dist.to(s.dtype), value=-1.0)
    return s


def pair_weights(inp: AttnInputs, idx: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``P[i, idx]`` ``(B, Hq, Nq, m)`` from the pass's ``lse (B, Hq, Nq)``: ``exp(s - lse)``; 0 where the pair is
    not visible or the row sees no key."""
    s = pair_scores(inp, idx)
    lse = lse.to(s.dtype)[..., None]
    return torch.where(torch.isneginf(lse) | torch.isneginf(s), torch.zeros((), dtype=s.dtype, device=s.device),
                       torch.exp(s - lse))
