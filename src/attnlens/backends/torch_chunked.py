"""Exact attention in eager PyTorch over chunks of query rows, with the lens, on any device.

Each chunk of queries sees all of its keys at once, so its softmax is exact in one step (no
online rescaling) and every lens statistic comes from the same buffer of scores:

    s  = (q·scale) kᵀ  masked               (B, Hkv, G·c, nk)    G = Hq // Hkv query heads per kv head
    m  = max_j s ;  e = exp(s - m) ;  l = Σ_j e        lse = m + log l
    out = (e @ v) / l                                 (row view: out_i = Σ_j p_ij v_j)
    entropy = log l - Σ_j e·(s - m) / l               (= -Σ p log p, one row-wise reduction)
    max_weight = 1 / l                                (the max of e is exp(0) = 1)
    received += (1/l)ᵀ @ e                            (column sums, one matrix-vector product)

Memory is O(chunk · Nk): the chunk is sized so its few score buffers fit in ``CHUNK_BYTES``.
Keys that no query of a chunk may see (causal, window) are skipped, not masked.
The backward pass recomputes each chunk's weights from the saved ``lse``.
"""
from __future__ import annotations

import torch

from .._inputs import AttnInputs
from ..lens import LensResult
from ..masks import band_keep, key_range
from . import Backend, stat_dtype

#: masked scores are set to this finite value: exp(NEG - m) underflows to exactly 0, and unlike
#: -inf, 0 · NEG = 0 keeps the entropy reduction finite.
NEG = -1e30
#: bytes of one chunk's score buffer (B·Hq·rows·Nk elements). Chosen with benchmarks/cpu.py
#: (``--chunk-bytes``): small enough to stay in cache on CPU, large enough to amortise op overhead.
CHUNK_BYTES = 4 << 20


def chunk_rows(inp: AttnInputs, elem_bytes: int) -> int:
    B, Hq, _, Nq, Nk, _, _ = inp.shape
    per_row = B * Hq * Nk * elem_bytes
    return int(max(1, min(Nq, CHUNK_BYTES // max(per_row, 1))))


class _Chunk:
    """Scores of query rows [i0, i1) against keys [lo, hi), masked, in (B, Hkv, G·c, nk) layout."""

    def __init__(self, inp: AttnInputs, qs, kc, i0: int, i1: int):
        B, Hq, Hkv, Nq, Nk, D, _ = inp.shape
        G = Hq // Hkv
        self.i0, self.i1, self.c = i0, i1, i1 - i0
        self.lo, self.hi = key_range(i0, i1, Nq, Nk, inp.causal, inp.window)
        self.nk = self.hi - self.lo
        if self.nk == 0:
            return
        self.qc = qs[:, :, :, i0:i1].reshape(B, Hkv, G * self.c, D)  # (B, Hkv, G·c, D), scale folded in
        s = torch.matmul(self.qc, kc[:, :, self.lo:self.hi].transpose(-1, -2))  # (B, Hkv, G·c, nk)
        s5 = s.view(B, Hkv, G, self.c, self.nk)
        # causal / window: mask only when some row of the chunk does not see all of [lo, hi)
        first = key_range(i0, i0 + 1, Nq, Nk, inp.causal, inp.window)
        last = key_range(i1 - 1, i1, Nq, Nk, inp.causal, inp.window)
        if first[1] < self.hi or last[0] > self.lo:
            dev = s.device
            keep = band_keep(torch.arange(i0, i1, device=dev), torch.arange(self.lo, self.hi, device=dev),
                             Nq, Nk, inp.causal, inp.window)
            s5.masked_fill_(~keep, NEG)
        if inp.mask is not None:
            m = inp.mask
            m = m[:, :, i0:i1] if m.shape[2] == Nq else m
            m = m[..., self.lo:self.hi] if m.shape[3] == Nk else m
            m5 = m.reshape(m.shape[0], Hkv, G, m.shape[2], m.shape[3]) if m.shape[1] == Hq else m.unsqueeze(2)
            if m5.dtype == torch.bool:
                s5.masked_fill_(~m5, NEG)
            else:
                s5.add_(m5.to(s.dtype)).clamp_(min=NEG)  # -inf → NEG
        self.s = s


def _dropout_keep(seed: int, chunk_index: int, shape, inp: AttnInputs, dtype):
    """The dropout mask of one chunk, scaled by 1/(1-p); regenerated identically in backward."""
    g = torch.Generator(device=inp.q.device)
    g.manual_seed(seed + 1_000_003 * chunk_index)
    keep = torch.rand(shape, generator=g, device=inp.q.device, dtype=dtype) >= inp.dropout_p
    return keep.to(dtype).mul_(1.0 / (1.0 - inp.dropout_p))


def _prepare(inp: AttnInputs, q, k, v):
    B, Hq, Hkv, Nq, Nk, D, Dv = inp.shape
    cdt = stat_dtype(q.dtype)
    qs = (q.to(cdt) * inp.scale).reshape(B, Hkv, Hq // Hkv, Nq, D)  # (B, Hkv, G, Nq, D)
    return cdt, qs, k.to(cdt), v.to(cdt)


def forward(inp: AttnInputs, q, k, v, seed: int, rows_per_chunk: int):
    """Returns ``out (B, Hq, Nq, Dv)`` in the compute dtype, ``lse (B, Hq, Nq)`` and a rank-4 `LensResult`."""
    B, Hq, Hkv, Nq, Nk, D, Dv = inp.shape
    G = Hq // Hkv
    cdt, qs, kc, vc = _prepare(inp, q, k, v)
    dev = q.device
    lens = inp.lens
    want_h = lens is not None and lens.entropy
    want_rec = lens is not None and lens.received
    topk = lens.topk if lens is not None else 0
    rows = inp.rows

    out = torch.zeros(B, Hkv, G, Nq, Dv, dtype=cdt, device=dev)
    lse = torch.full((B, Hkv, G, Nq), float("-inf"), dtype=cdt, device=dev)
    ent = torch.zeros(B, Hkv, G, Nq, dtype=cdt, device=dev) if want_h else None
    maxw = torch.zeros(B, Hkv, G, Nq, dtype=cdt, device=dev) if lens is not None and lens.max_weight else None
    rec = torch.zeros(B, Hkv, G, Nk, dtype=cdt, device=dev) if want_rec else None
    if topk:
        tk_w = torch.zeros(B, Hkv, G, Nq, topk, dtype=cdt, device=dev)
        tk_i = torch.full((B, Hkv, G, Nq, topk), -1, dtype=torch.int64, device=dev)
    if rows is not None:
        wrows = torch.zeros(B, Hkv, G, len(rows), Nk, dtype=cdt, device=dev)

    for ci, i0 in enumerate(range(0, Nq, rows_per_chunk)):
        i1 = min(Nq, i0 + rows_per_chunk)
        ch = _Chunk(inp, qs, kc, i0, i1)
        if ch.nk == 0:
            continue  # no query in this chunk sees a key: zeros, lse -inf
        c, nk, s = ch.c, ch.nk, ch.s
        m = s.amax(dim=-1, keepdim=True)  # (B, Hkv, G·c, 1)
        m.masked_fill_(m <= NEG / 2, 0.0)  # rows that see no key: e becomes exactly 0
        s.sub_(m)
        e = torch.exp(s) if want_h else s.exp_()
        l = e.sum(dim=-1, keepdim=True)
        rl = torch.where(l > 0, 1.0 / l, torch.zeros((), dtype=cdt, device=dev))  # 0 for dead rows
        pv = e * _dropout_keep(seed, ci, e.shape, inp, cdt) if inp.dropout_p > 0 else e
        o = torch.matmul(pv, vc[:, :, ch.lo:ch.hi]).mul_(rl)  # (B, Hkv, G·c, Dv)
        out[:, :, :, i0:i1] = o.view(B, Hkv, G, c, Dv)
        lse[:, :, :, i0:i1] = (m + torch.log(l)).view(B, Hkv, G, c)
        if maxw is not None:
            maxw[:, :, :, i0:i1] = rl.view(B, Hkv, G, c)
        if want_h:
            # -Σ p log p = log l - Σ e·(s - m) / l ; s holds s - m (NEG - m on masked keys, where e = 0)
            t = s.mul_(e).sum(dim=-1, keepdim=True)
            h = torch.where(l > 0, torch.log(l) - t * rl, torch.zeros((), dtype=cdt, device=dev))
            ent[:, :, :, i0:i1] = h.clamp_(min=0).view(B, Hkv, G, c)
        if want_rec:
            e5 = e.view(B, Hkv, G, c, nk)
            rec[..., ch.lo:ch.hi] += torch.matmul(rl.view(B, Hkv, G, 1, c), e5).view(B, Hkv, G, nk)
        if topk:
            kk = min(topk, nk)
            vals, idx = torch.topk(e, kk, dim=-1, sorted=True)
            w = vals.mul_(rl)
            idx = torch.where(w > 0, idx + ch.lo, torch.full((), -1, dtype=torch.int64, device=dev))
            tk_w[:, :, :, i0:i1, :kk] = w.view(B, Hkv, G, c, kk)
            tk_i[:, :, :, i0:i1, :kk] = idx.view(B, Hkv, G, c, kk)
        if rows is not None:
            e5 = e.view(B, Hkv, G, c, nk)
            rl5 = rl.view(B, Hkv, G, c, 1)
            for n, r in enumerate(rows):
                if i0 <= r < i1:
                    wrows[:, :, :, n, ch.lo:ch.hi] = e5[:, :, :, r - i0] * rl5[:, :, :, r - i0]

    def flat(t):  # (B, Hkv, G, ...) -> (B, Hq, ...)
        return t.reshape(B, Hq, *t.shape[3:])

    res = None
    if lens is not None:
        res = LensResult(lse=flat(lse) if lens.lse else None, max_weight=None if maxw is None else flat(maxw),
                         entropy=None if ent is None else flat(ent), received=None if rec is None else flat(rec))
        if topk:
            res.topk_weights, res.topk_indices = flat(tk_w), flat(tk_i)
        if rows is not None:
            res.weights, res.rows = flat(wrows), rows
    return flat(out), flat(lse), res


def backward(inp: AttnInputs, q, k, v, out, lse, dout, seed: int, rows_per_chunk: int):
    """Gradients (dq, dk, dv), recomputing each chunk's weights from ``lse``; O(chunk · Nk) memory."""
    B, Hq, Hkv, Nq, Nk, D, Dv = inp.shape
    G = Hq // Hkv
    cdt, qs, kc, vc = _prepare(inp, q, k, v)
    dev = q.device
    do = dout.to(cdt).reshape(B, Hkv, G, Nq, Dv)
    di = (do * out.to(cdt).reshape(B, Hkv, G, Nq, Dv)).sum(-1)  # (B, Hkv, G, Nq): Σ_j p_ij dp_ij
    lse5 = lse.reshape(B, Hkv, G, Nq)
    lse5 = torch.where(torch.isneginf(lse5), torch.full((), float("inf"), dtype=cdt, device=dev), lse5)
    dq = torch.zeros(B, Hkv, G, Nq, D, dtype=cdt, device=dev)
    dk = torch.zeros_like(kc)
    dv = torch.zeros_like(vc)
    for ci, i0 in enumerate(range(0, Nq, rows_per_chunk)):
        i1 = min(Nq, i0 + rows_per_chunk)
        ch = _Chunk(inp, qs, kc, i0, i1)
        if ch.nk == 0:
            continue
        c, lo, hi = ch.c, ch.lo, ch.hi
        p = ch.s.sub_(lse5[:, :, :, i0:i1].reshape(B, Hkv, G * c, 1)).exp_()  # (B, Hkv, G·c, nk)
        do_c = do[:, :, :, i0:i1].reshape(B, Hkv, G * c, Dv)
        keep = _dropout_keep(seed, ci, p.shape, inp, cdt) if inp.dropout_p > 0 else None
        pd = p * keep if keep is not None else p
        dv[:, :, lo:hi] += torch.matmul(pd.transpose(-1, -2), do_c)
        dp = torch.matmul(do_c, vc[:, :, lo:hi].transpose(-1, -2))
        if keep is not None:
            dp.mul_(keep)
        ds = dp.sub_(di[:, :, :, i0:i1].reshape(B, Hkv, G * c, 1)).mul_(p)  # p ∘ (dp - di)
        dq[:, :, :, i0:i1] = torch.matmul(ds, kc[:, :, lo:hi]).mul_(inp.scale).view(B, Hkv, G, c, D)
        dk[:, :, lo:hi] += torch.matmul(ds.transpose(-1, -2), ch.qc)
    return dq.reshape(B, Hq, Nq, D), dk, dv


class _Attention(torch.autograd.Function):
    """Autograd wrapper: forward saves q, k, v, out and lse; backward recomputes per chunk."""

    @staticmethod
    def forward(ctx, q, k, v, inp, seed, rows_per_chunk, holder):
        out, lse, res = forward(inp, q, k, v, seed, rows_per_chunk)
        out = out.to(q.dtype)
        holder.append(res)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.inp, ctx.seed, ctx.rows = inp, seed, rows_per_chunk
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = backward(ctx.inp, q, k, v, out, lse, dout, ctx.seed, ctx.rows)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


class TorchChunkedBackend(Backend):
    name = "torch"
    description = "eager PyTorch over query chunks: exact, lens, autograd, O(chunk·Nk) memory"
    capabilities = {"devices": "any torch device", "dtypes": "fp16/bf16 (fp32 inside), fp32, fp64", "lens": "yes",
                    "grad": "yes (recomputing backward)", "dropout": "yes", "memory": "O(chunk·Nk)"}

    def not_supported_reasons(self, inp: AttnInputs) -> list[str]:
        reasons = []
        if inp.mask is not None and inp.mask.requires_grad and torch.is_grad_enabled():
            reasons.append("no gradient with respect to a float mask (use backend='sdpa')")
        return reasons

    def run(self, inp: AttnInputs):
        cdt = stat_dtype(inp.q.dtype)
        rows = chunk_rows(inp, torch.finfo(cdt).bits // 8)
        seed = int(torch.randint(0, 2**62, (1,)).item()) if inp.dropout_p > 0 else 0
        if inp.requires_grad:
            holder: list = []
            out = _Attention.apply(inp.q, inp.k, inp.v, inp, seed, rows, holder)
            return out, holder[0]
        out, _, res = forward(inp, inp.q, inp.k, inp.v, seed, rows)
        return out.to(inp.q.dtype), res
