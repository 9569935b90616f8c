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
from . import Backend, _native, stat_dtype

#: masked scores are set to this finite value: exp(NEG - m) underflows to exactly 0, and unlike
#: -inf, 0 · NEG = 0 keeps the entropy reduction finite.
NEG = -1e30
#: bytes of one chunk's score buffer (B·Hq·rows·Nk elements). Chosen with benchmarks/cpu.py
#: (``--chunk-bytes``): small enough to stay in cache on CPU, large enough to amortise op overhead.
CHUNK_BYTES = 16 << 20


def chunk_rows(inp: AttnInputs, elem_bytes: int) -> int:
    B, Hq, _, Nq, Nk, _, _ = inp.shape
    per_row = B * Hq * Nk * elem_bytes
    return int(max(1, min(Nq, CHUNK_BYTES // max(per_row, 1))))


class _Chunk:
    """Scores of query rows [i0, i1) against keys [lo, hi), masked, in (B, Hkv, G·c, nk) layout.

    ``buf`` (optional) is a flat workspace reused across chunks for the score buffer.
    """

    def __init__(self, inp: AttnInputs, qs, kc, i0: int, i1: int, buf=None):
        B, Hq, Hkv, Nq, Nk, D, _ = inp.shape
        G = Hq // Hkv
        self.i0, self.i1, self.c = i0, i1, i1 - i0
        self.lo, self.hi = key_range(i0, i1, Nq, Nk, inp.causal, inp.window)
        self.nk = nk = self.hi - self.lo
        if nk == 0:
            return
        self.qc = qs[:, :, :, i0:i1].reshape(B, Hkv, G * self.c, D)  # (B, Hkv, G·c, D), scale folded in
        shape = (B, Hkv, G * self.c, nk)
        s = None if buf is None else buf[: B * Hkv * G * self.c * nk].view(shape)
        s = torch.matmul(self.qc, kc[:, :, self.lo:self.hi].transpose(-1, -2), out=s)  # (B, Hkv, G·c, nk)
        s5 = s.view(B, Hkv, G, self.c, nk)
        if inp.mask is not None:
            m = inp.mask
            m = m[:, :, i0:i1] if m.shape[2] == Nq else m
            m = m[..., self.lo:self.hi] if m.shape[3] == Nk else m
            m5 = m.reshape(m.shape[0], Hkv, G, m.shape[2], m.shape[3]) if m.shape[1] == Hq else m.unsqueeze(2)
            if m5.dtype == torch.bool:
                s5.masked_fill_(~m5, NEG)
            else:
                # finite entries are scores (HF's finfo.min included: kept above the dead-row line
                # so an all-finfo.min row averages, as in PyTorch); -inf entries mask the key
                mf = m5.to(s.dtype)
                s5.add_(mf).clamp_(min=NEG / 4).masked_fill_(torch.isneginf(mf), NEG)
        # causal / window (after the user mask, whose clamp must not lift NEG): keys [lo_last, hi_first) are seen by every row of the chunk; mask only the
        # columns outside it (for causal, just the diagonal block)
        lo_last = key_range(i1 - 1, i1, Nq, Nk, inp.causal, inp.window)[0]
        hi_first = key_range(i0, i0 + 1, Nq, Nk, inp.causal, inp.window)[1]
        a, b = min(max(lo_last, self.lo), self.hi), max(min(hi_first, self.hi), self.lo)
        if a >= b:
            a = b = self.lo  # no column is seen by every row: mask the whole chunk
        dev = s.device
        rows = torch.arange(i0, i1, device=dev)
        for c0, c1 in ((self.lo, a), (b, self.hi)):
            if c1 > c0:
                keep = band_keep(rows, torch.arange(c0, c1, device=dev), Nq, Nk, inp.causal, inp.window)
                s5[..., c0 - self.lo:c1 - self.lo].masked_fill_(~keep, NEG)
        self.s = s


#: top-k looks for its keys among the k blocks of this many keys with the largest block maxima
#: (a key in the top k lies in such a block), instead of sorting whole rows.
TOPK_BLOCK = 32


def _rowmax_and_topk(s, topk: int):
    """Row max of the scores ``s (..., nk)`` and, if ``topk``, the top-k ``(scores, key indices)``.

    Runs before anything modifies ``s`` in place. The block maxima that pick the candidate
    blocks also give the row max, so top-k costs one small sort per row instead of a full one.
    """
    nk = s.shape[-1]
    nb = nk // TOPK_BLOCK
    if not topk:
        return s.amax(dim=-1, keepdim=True), None
    if nb <= topk:
        vals, idx = torch.topk(s, topk, dim=-1, sorted=True)
        return vals[..., :1], (vals, idx)
    main = s[..., : nb * TOPK_BLOCK].unflatten(-1, (nb, TOPK_BLOCK))
    bmax = main.amax(dim=-1)  # (..., nb)
    if nk > nb * TOPK_BLOCK:
        bmax = torch.cat([bmax, s[..., nb * TOPK_BLOCK:].amax(dim=-1, keepdim=True)], dim=-1)
    m = bmax.amax(dim=-1, keepdim=True)
    blocks = torch.topk(bmax, topk, dim=-1, sorted=False).indices  # (..., k)
    idx = (blocks.unsqueeze(-1) * TOPK_BLOCK + torch.arange(TOPK_BLOCK, device=s.device)).flatten(-2)
    vals = torch.gather(s, -1, idx.clamp(max=nk - 1)).masked_fill_(idx >= nk, float("-inf"))  # short tail block
    vals, pos = torch.topk(vals, topk, dim=-1, sorted=True)
    return m, (vals, torch.gather(idx, -1, pos))


def _nonfinite_keys(vc):
    """Key indices whose value row holds NaN/inf (any batch or head), or None: the common case."""
    if bool(torch.isfinite(vc.sum())):  # NaN/inf propagate through a sum (overflow: harmless slow path)
        return None
    bad = ~torch.isfinite(vc).all(dim=-1).flatten(0, 1).all(dim=0)  # (Nk,)
    return torch.nonzero(bad).flatten() if bool(bad.any()) else None


def _weighted_values(p, vc, vbad, lo: int, hi: int):
    """``p @ v[lo:hi]`` where a key of weight 0 contributes exactly 0, even if its value is NaN/inf.

    A plain matmul would spread 0 · NaN = NaN to every row of the chunk; the few keys with
    non-finite values are added separately, only where their weight is positive.
    """
    v = vc[:, :, lo:hi]
    if vbad is None:
        return torch.matmul(p, v)
    bad = vbad[(vbad >= lo) & (vbad < hi)] - lo
    if bad.numel() == 0:
        return torch.matmul(p, v)
    v = v.clone()
    vb = v[:, :, bad]  # (B, Hkv, nbad, Dv)
    v[:, :, bad] = 0
    out = torch.matmul(p, v)
    pb = p[..., bad]  # (B, Hkv, G·c, nbad)
    contrib = torch.where((pb > 0).unsqueeze(-1), pb.unsqueeze(-1) * vb.unsqueeze(-3), 0.0)
    return out + contrib.sum(dim=-2)


def _row_runs(rows) -> list[tuple[int, int, int]]:
    """Requested rows as maximal runs ``(first query, first place in weights, length)`` of consecutive
    queries at consecutive places: one run for ``"all"`` or a slice, so each chunk writes with one op."""
    runs: list[list[int]] = []
    for pos, r in enumerate(rows):
        if runs and r == runs[-1][0] + runs[-1][2] and pos == runs[-1][1] + runs[-1][2]:
            runs[-1][2] += 1
        else:
            runs.append([r, pos, 1])
    return [tuple(x) for x in runs]


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
        runs = _row_runs(rows)

    vbad = _nonfinite_keys(vc)
    n_buf = B * Hq * min(Nq, rows_per_chunk) * Nk
    sbuf = torch.empty(n_buf, dtype=cdt, device=dev)  # workspaces reused by every chunk
    native = dev.type == "cpu" and cdt == torch.float32 and topk <= _native.MAX_TOPK and _native.load() is not None
    ebuf = torch.empty(n_buf, dtype=cdt, device=dev) if want_h and not native else None
    zero = torch.zeros((), dtype=cdt, device=dev)
    for ci, i0 in enumerate(range(0, Nq, rows_per_chunk)):
        i1 = min(Nq, i0 + rows_per_chunk)
        ch = _Chunk(inp, qs, kc, i0, i1, sbuf)
        if ch.nk == 0:
            continue  # no query in this chunk sees a key: zeros, lse -inf
        c, nk, s = ch.c, ch.nk, ch.s
        kk = min(topk, nk)
        t = None
        if native:  # one fused pass per row (rowsoftmax.c): s becomes e in place
            m, l, t, top = _native.rowsoftmax(s, kk, NEG / 2)
            e = s
        else:
            m, top = _rowmax_and_topk(s, kk)  # m: (B, Hkv, G·c, 1)
            m.masked_fill_(m <= NEG / 2, 0.0)  # rows that see no key: e becomes exactly 0
            s.sub_(m)
            e = torch.exp(s, out=ebuf[: s.numel()].view(s.shape)) if want_h else s.exp_()
            l = e.sum(dim=-1, keepdim=True)
            if want_h:  # Σ_j e·(s - m); s holds s - m (NEG - m on masked keys, where e = 0)
                t = torch.einsum("...j,...j->...", e, s).unsqueeze(-1)
        rl = torch.where(l > 0, 1.0 / l, zero)  # 1/l, 0 for dead rows
        pv = e * _dropout_keep(seed, ci, e.shape, inp, cdt) if inp.dropout_p > 0 else e
        o = _weighted_values(pv, vc, vbad, ch.lo, ch.hi).mul_(rl)  # (B, Hkv, G·c, Dv): out_i = Σ_j p_ij v_j
        out[:, :, :, i0:i1] = o.view(B, Hkv, G, c, Dv)
        lse[:, :, :, i0:i1] = (m + torch.log(l)).view(B, Hkv, G, c)
        if maxw is not None:
            maxw[:, :, :, i0:i1] = rl.view(B, Hkv, G, c)  # max_j e_ij = exp(0) = 1
        if want_h:  # -Σ p log p = log l - Σ e·(s - m) / l
            h = torch.where(l > 0, torch.log(l) - t * rl, zero)
            ent[:, :, :, i0:i1] = h.clamp_(min=0).view(B, Hkv, G, c)
        if want_rec:
            e5 = e.view(B, Hkv, G, c, nk)
            rec[..., ch.lo:ch.hi] += torch.matmul(rl.view(B, Hkv, G, 1, c), e5).view(B, Hkv, G, nk)
        if topk:
            vals, idx = top  # largest raw scores of each row
            w = torch.exp(vals - m).mul_(rl)
            idx = torch.where(w > 0, idx + ch.lo, torch.full((), -1, dtype=torch.int64, device=dev))
            tk_w[:, :, :, i0:i1, :kk] = w.view(B, Hkv, G, c, kk)
            tk_i[:, :, :, i0:i1, :kk] = idx.view(B, Hkv, G, c, kk)
        if rows is not None:  # requested rows in this chunk: p = e / l written straight into `weights`
            e5, rl5 = e.view(B, Hkv, G, c, nk), rl.view(B, Hkv, G, c, 1)
            for r0, pos0, n in runs:
                a, b = max(r0, i0), min(r0 + n, i1)
                if a < b:
                    dst = wrows[:, :, :, pos0 + a - r0:pos0 + b - r0, ch.lo:ch.hi]
                    torch.mul(e5[:, :, :, a - i0:b - i0], rl5[:, :, :, a - i0:b - i0], out=dst)

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


def backward(inp: AttnInputs, q, k, v, out, lse, dout, seed: int, rows_per_chunk: int, acc=None):
    """Gradients (dq, dk, dv), recomputing each chunk's weights from ``lse``; O(chunk · Nk) memory.

    ``acc`` (optional): tensors ``(dq (B, Hq, Nq, D), dk (B, Hkv, Nk, D), dv (B, Hkv, Nk, Dv))`` in the
    compute dtype, possibly strided views into larger buffers; the gradients are *added* into them (no
    gradient-sized temporaries) and they are returned. Ring attention accumulates its blocks this way.
    """
    B, Hq, Hkv, Nq, Nk, D, Dv = inp.shape
    G = Hq // Hkv
    cdt, qs, kc, vc = _prepare(inp, q, k, v)
    dev = q.device
    do = dout.to(cdt).reshape(B, Hkv, G, Nq, Dv)
    # Σ_j p_ij dp_ij = rowsum(dO ∘ O), (B, Hkv, G, Nq), as a batched dot product (no (Nq, Dv) temporary)
    di = torch.einsum("...d,...d->...", do, out.to(cdt).reshape(B, Hkv, G, Nq, Dv))
    lse5 = lse.reshape(B, Hkv, G, Nq)
    lse5 = torch.where(torch.isneginf(lse5), torch.full((), float("inf"), dtype=cdt, device=dev), lse5)
    if acc is None:
        acc = (torch.zeros(B, Hq, Nq, D, dtype=cdt, device=dev), torch.zeros_like(kc), torch.zeros_like(vc))
    dq, dk, dv = acc
    dq5 = dq.unflatten(1, (Hkv, G))  # (B, Hkv, G, Nq, D), a view
    n_buf = B * Hq * min(Nq, rows_per_chunk) * Nk
    sbuf = torch.empty(n_buf, dtype=cdt, device=dev)  # score / weight workspace reused by every chunk
    dpbuf = torch.empty(n_buf, dtype=cdt, device=dev)  # dP workspace
    for ci, i0 in enumerate(range(0, Nq, rows_per_chunk)):
        i1 = min(Nq, i0 + rows_per_chunk)
        ch = _Chunk(inp, qs, kc, i0, i1, sbuf)
        if ch.nk == 0:
            continue
        c, lo, hi = ch.c, ch.lo, ch.hi
        p = ch.s.sub_(lse5[:, :, :, i0:i1].reshape(B, Hkv, G * c, 1)).exp_()  # (B, Hkv, G·c, nk)
        do_c = do[:, :, :, i0:i1].reshape(B, Hkv, G * c, Dv)
        keep = _dropout_keep(seed, ci, p.shape, inp, cdt) if inp.dropout_p > 0 else None
        pd = p * keep if keep is not None else p
        dv[:, :, lo:hi] += torch.matmul(pd.transpose(-1, -2), do_c)
        del pd
        dp = torch.matmul(do_c, vc[:, :, lo:hi].transpose(-1, -2), out=dpbuf[: p.numel()].view(p.shape))
        if keep is not None:
            dp.mul_(keep)
        ds = dp.sub_(di[:, :, :, i0:i1].reshape(B, Hkv, G * c, 1)).mul_(p)  # p ∘ (dp - di)
        dq5[:, :, :, i0:i1] += torch.matmul(ds, kc[:, :, lo:hi]).mul_(inp.scale).view(B, Hkv, G, c, D)
        dk[:, :, lo:hi] += torch.matmul(ds.transpose(-1, -2), ch.qc)
    return dq, dk, dv


def column_sums(inp: AttnInputs, lse):
    """``received`` given each query's ``lse`` ``(B, Hq, Nq)``: ``Σ_i exp(s_ij - lse_i)`` for each key j,
    per query head ``(B, Hq, Nk)``, chunked like the backward. With the call's own lse these are its
    column sums; ring attention passes the global lse of queries that saw other keys too."""
    B, Hq, Hkv, Nq, Nk, D, _ = inp.shape
    G = Hq // Hkv
    cdt, qs, kc, _ = _prepare(inp, inp.q, inp.k, inp.v)
    rows = chunk_rows(inp, torch.finfo(cdt).bits // 8)
    lse5 = lse.to(cdt).reshape(B, Hkv, G, Nq)
    lse5 = torch.where(torch.isneginf(lse5), torch.full((), float("inf"), dtype=cdt, device=lse.device), lse5)
    rec = torch.zeros(B, Hkv, G, Nk, dtype=cdt, device=inp.q.device)
    for i0 in range(0, Nq, rows):
        i1 = min(Nq, i0 + rows)
        ch = _Chunk(inp, qs, kc, i0, i1)
        if ch.nk == 0:
            continue
        p = ch.s.sub_(lse5[:, :, :, i0:i1].reshape(B, Hkv, G * ch.c, 1)).exp_()  # (B, Hkv, G·c, nk)
        rec[..., ch.lo:ch.hi] += p.view(B, Hkv, G, ch.c, ch.nk).sum(-2)
    return rec.reshape(B, Hq, Nk)


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
