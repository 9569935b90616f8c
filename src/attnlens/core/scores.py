"""Scores of chosen (query, key) pairs under a call's rules, on any device: the one place outside the backends'
own kernels where a score is formed.

Any single weight is ``P[i, j] = exp(s_ij - lse_i)``: with the lse of a pass, chosen weights cost O(1) each
(``Lens(at=...)``, exact head scores) — no scores matrix. Every rule that shapes a score (scale, softcap, ALiBi,
float mask, causal / window / offset, bool mask) is applied here exactly as the backends apply it, in that order.
With sinks, the pass's lse includes the sink, so ``exp(s - lse)`` is already the weight of a real key.
"""
from __future__ import annotations

import torch

from .inputs import AttnInputs, stat_dtype
from .masks import band


def pair_scores(inp: AttnInputs, idx: torch.Tensor) -> torch.Tensor:
    """Scaled, masked scores ``s (B, Hq, Nq, m)`` at key ``idx[b, h, i, m]`` for each query, in the statistics dtype.

    ``idx``: int64 key indices broadcastable to ``(B, Hq, Nq, m)``; ``-1`` (or any index outside ``[0, Nk)``)
    means none. A pair that is not visible — none, outside the band (causal / window around ``i + offset``), a
    bool mask False, a float mask ``-inf`` — scores ``-inf``; a visible pair whose score is not finite scores NaN. Memory O(Nq · m · D). Every query has ``m`` slots:
    for key sets of very different sizes, `flat_pair_scores` costs the sum of the sizes instead.
    """
    B, Hq, Hkv, Nq, Nk, D, _ = inp.shape
    m = idx.shape[-1]
    idx = idx.to(device=inp.q.device, dtype=torch.int64).expand(B, Hq, Nq, m)
    j = idx.clamp(0, Nk - 1)
    cdt = stat_dtype(inp.q.dtype)
    kg = inp.k.detach().reshape(B * Hkv * Nk, D).to(cdt)[_key_rows(inp, j)]  # (B, Hq, Nq, m, D)
    s = torch.einsum("bhid,bhimd->bhim", inp.q.detach().to(cdt), kg) * inp.scale
    i = torch.arange(Nq, device=j.device)[:, None]  # (Nq, 1)
    return _visible(inp, s, i, idx)


def flat_pair_scores(inp: AttnInputs, qi: torch.Tensor, kj: torch.Tensor) -> torch.Tensor:
    """Scores ``s (B, Hq, P)`` of a flat list of pairs, query ``qi[p]`` with key ``kj[b, h, p]``, under the same
    rules as `pair_scores` (``-1`` or an index outside ``[0, Nk)`` = none, ``-inf`` when not visible).

    ``qi (P,)`` int64 in ``[0, Nq)``; ``kj`` int64 broadcastable to ``(B, Hq, P)``. Ragged key sets cost the
    number of pairs, not queries × the largest set. Memory O(P · D): the caller chunks the pairs.
    """
    B, Hq, Hkv, _, Nk, D, _ = inp.shape
    qi = qi.to(device=inp.q.device, dtype=torch.int64)
    kj = kj.to(device=inp.q.device, dtype=torch.int64).expand(B, Hq, qi.shape[0])
    j = kj.clamp(0, Nk - 1)
    cdt = stat_dtype(inp.q.dtype)
    kg = inp.k.detach().reshape(B * Hkv * Nk, D).to(cdt)[_key_rows(inp, j)]  # (B, Hq, P, D)
    qg = inp.q.detach().to(cdt).index_select(2, qi)  # (B, Hq, P, D)
    s = torch.linalg.vecdot(qg, kg) * inp.scale  # row-wise dot products
    return _visible(inp, s, qi, kj)


def _key_rows(inp: AttnInputs, j: torch.Tensor) -> torch.Tensor:
    """Rows of ``k`` flattened to ``(B·Hkv·Nk, D)`` for key indices ``j (B, Hq, ...)`` in ``[0, Nk)``: each query
    head reads its kv head (grouped-query attention)."""
    B, Hq, Hkv, _, Nk, _, _ = inp.shape
    head = torch.arange(Hq, device=j.device) // (Hq // Hkv)  # kv head of each query head
    base = torch.arange(B, device=j.device)[:, None] * Hkv + head[None, :]  # (B, Hq)
    return base.reshape(B, Hq, *(1,) * (j.ndim - 2)) * Nk + j


def _visible(inp: AttnInputs, s: torch.Tensor, i: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The score rule after the scaled dot products ``s (B, Hq, ...)`` of queries ``i`` and keys ``idx`` (both
    broadcastable to ``s``; ``idx`` outside ``[0, Nk)`` = none): softcap, ALiBi, float mask added, then ``-inf``
    where the pair is none, outside the band (causal / window around ``i + offset``) or masked out."""
    B, Hq, _, Nq, Nk, _, _ = inp.shape
    lead = (1,) * (s.ndim - 2)
    valid = (idx >= 0) & (idx < Nk)
    j = idx.clamp(0, Nk - 1)
    sl = inp.seqlens
    if sl is None:
        pos = i + inp.offset  # each query's key position
    else:  # a padded batch: each sequence's own offset, and only its own queries and keys
        per_seq = (B, 1, *lead)
        pos = i + sl.offset.reshape(per_seq)
        valid = valid & (i < sl.q.reshape(per_seq)) & (idx < sl.k.reshape(per_seq))
    slopes = None if inp.alibi_slopes is None else inp.alibi_slopes.reshape(*inp.alibi_slopes.shape, *lead)
    s = score_mods(s, inp.softcap, slopes, (pos - j).abs())
    keep = valid
    left, right = band(inp.causal, inp.window)
    if right is not None:
        keep = keep & (j <= pos + right)
    if left is not None:
        keep = keep & (j >= pos - left)
    if inp.mask is not None:
        b = torch.arange(B, device=j.device).reshape(B, 1, *lead)
        h = torch.arange(Hq, device=j.device).reshape(1, Hq, *lead)
        mk = inp.mask.expand(B, Hq, Nq, Nk)[b, h, i, j]
        if mk.dtype == torch.bool:
            keep = keep & mk
        else:
            mk = mk.detach().to(s.dtype)
            keep = keep & (mk != float("-inf"))
            s = s + mk
    # a visible score that is not finite (NaN, ±inf from inf in q or k, overflow) is NaN, as in the backends' passes:
    # its weight is NaN, not 0 (the NaN/inf rule); hidden pairs are -inf
    s = s.masked_fill(~torch.isfinite(s), float("nan"))
    return s.masked_fill(~keep, float("-inf"))


def score_mods(s: torch.Tensor, softcap, slopes, dist) -> torch.Tensor:
    """Softcap then ALiBi on scaled scores ``s``, in place (detached tensors): ``s = c·tanh(s/c)``, then
    ``s -= slope·dist`` with ``slopes`` and ``dist = |i + offset - j|`` shaped by the caller to broadcast against
    ``s``. The torch backend applies ALiBi to its chunks with this (its softcap rides in the ``q kᵀ`` product, the
    same formula)."""
    if softcap is not None:
        s.div_(softcap).tanh_().mul_(softcap)
    if slopes is not None:
        s.addcmul_(slopes.to(s.dtype), dist.to(s.dtype), value=-1.0)
    return s


def pair_weights(inp: AttnInputs, idx: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``P[i, idx]`` ``(B, Hq, Nq, m)`` from the pass's ``lse (B, Hq, Nq)``: ``exp(s - lse)``; 0 where the pair is
    not visible or the row sees no key."""
    return _weights(pair_scores(inp, idx), lse[..., None])


def flat_pair_weights(inp: AttnInputs, qi: torch.Tensor, kj: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``P[qi[p], kj[b, h, p]]`` ``(B, Hq, P)`` from the pass's ``lse (B, Hq, Nq)``, as `pair_weights` for a flat
    list of pairs (`flat_pair_scores`)."""
    return _weights(flat_pair_scores(inp, qi, kj), lse.index_select(-1, qi.to(device=lse.device)))


def _weights(s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``exp(s - lse)``, 0 where ``s`` or ``lse`` is ``-inf`` (a pair not visible, a row that sees no key)."""
    lse = lse.to(s.dtype)
    return torch.where(torch.isneginf(lse) | torch.isneginf(s), torch.zeros((), dtype=s.dtype, device=s.device),
                       torch.exp(s - lse))
