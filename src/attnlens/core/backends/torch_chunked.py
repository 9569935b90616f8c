"""Exact attention in eager PyTorch over chunks of query rows, with the lens, on any device.

Each chunk of queries sees all of its keys at once, so its softmax is exact in one step (no
online rescaling) and every lens statistic comes from the same buffer of scores:

    s  = (q·scale) kᵀ  masked               (B, Hkv, G·c, nk)    G = Hq // Hkv query heads per kv head
    m  = max_j s ;  e = exp(s - m) ;  l = Σ_j e        lse = m + log l
    out = (e @ v) / l                                 (row view: out_i = Σ_j p_ij v_j)
    entropy = log l - Σ_j e·(s - m) / l               (= -Σ p log p, one row-wise reduction)
    max_weight = 1 / l                                (the max of e is exp(0) = 1)
    received += (1/l)ᵀ @ e                            (column sums, one matrix-vector product)
    received_from += pᵀ W ;  pooled += block sums of p   (Lens(received_from=W), Lens(pool=...))
    weights_at = p[i, at]                             (Lens(at=...): gathered, not rebuilt from lse)

Score modifications: softcap and ALiBi change the scores right after ``q kᵀ`` (`attnlens.core.scores.score_mods`, before any
mask); a sink is one more entry of the row's softmax folded into ``m, l, t`` once the row's keys are done
(`_Outputs.write`): ``m' = max(m, σ)``, ``a = exp(m - m')``, ``l' = a l + exp(σ - m')``, and the keys' weights
are ``a e / l'``. The backward needs only the softcap's derivative ``1 - tanh²``; the lse includes the sink.

Masked scores are ``-inf`` (no finite sentinel: any finite score, of any size, is exact); a row whose
maximum is ``-inf`` sees no key (output 0, lse ``-inf``). The NaN/inf rule of `attnlens.reference`
holds: when scores can be non-finite (NaN/inf in q, k or a float mask, or ``|q·k·scale| + |mask|``
that may overflow the compute dtype — `_scores_may_be_nonfinite`, checked once per call), every
non-finite visible score becomes NaN before masking, and such a row is NaN in its output and every
lens field (its weights NaN at its visible keys only).

Memory is O(chunk · Nk): the chunk is sized so its few score buffers fit in ``chunk_bytes``
(`TorchChunkedBackend(chunk_bytes=...)`, default `CHUNK_BYTES`). Keys that no query of a chunk
may see (causal, window, offset) are skipped, not masked. The backward pass and the column sums
recompute each chunk's weights from a given ``lse`` as ``exp(s - lse)``, and, in calls with rows of huge
|lse| (scores near -1e30 or finfo.min, where fp32 rounds ``m + log l`` to ``m``), as the row's own weights
``exp(s - lse) / r`` wherever ``lse`` is the row's own, rounded (`_own_row_factors`).
"""
from __future__ import annotations

import torch

from ..capabilities import Capabilities, MaskFeature, Memory
from ..inputs import AttnInputs, stat_dtype
from ..lens import LensResult
from ..masks import band_keep, key_range
from ..scores import score_mods
from . import Backend, add_sink_grad, sink_weights
from . import native as _native

NAN = float("nan")
NEG_INF = float("-inf")
#: default bytes of one chunk's score buffer (B·Hq·rows·Nk elements). Chosen with benchmarks/cpu.py
#: (``--chunk-bytes``): small enough to stay in cache on CPU, large enough to amortise op overhead.
CHUNK_BYTES = 16 << 20


def chunk_rows(inp: AttnInputs, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Query rows per chunk so that one score buffer fits in ``chunk_bytes`` (at least one row)."""
    B, Hq, _, Nq, Nk, _, _ = inp.shape
    per_row = B * Hq * Nk * (torch.finfo(stat_dtype(inp.q.dtype)).bits // 8)
    return int(max(1, min(Nq, chunk_bytes // max(per_row, 1))))


class _Chunk:
    """Scores of query rows [i0, i1) against keys [lo, hi), masked, in (B, Hkv, G·c, nk) layout.

    ``buf`` (optional) is a flat workspace reused across chunks for the score buffer. ``check``: scores may be
    non-finite (see the module docstring): every non-finite score a row can see becomes NaN. ``want_dcap``: keep
    the softcap's derivative ``1 - tanh²`` as ``dcap`` (the backward's), else ``dcap`` is None.
    """

    def __init__(self, inp: AttnInputs, qs, kc, i0: int, i1: int, buf=None, check: bool = False,
                 want_dcap: bool = False):
        B, Hq, Hkv, Nq, Nk, D, _ = inp.shape
        G = Hq // Hkv
        self.i0, self.i1, self.c = i0, i1, i1 - i0
        off, sl = inp.offset, inp.seqlens
        if sl is None:
            self.lo, self.hi = key_range(i0, i1, Nk, off, inp.causal, inp.window)
        else:  # a padded batch: the hull of the sequences' key ranges; `SeqLens.keep` masks the rest below
            self.lo, self.hi = sl.key_range(i0, i1, Nk, inp.causal, inp.window)
        self.nk = nk = self.hi - self.lo
        if nk == 0:
            return
        self.qc = qs[:, :, :, i0:i1].reshape(B, Hkv, G * self.c, D)  # (B, Hkv, G·c, D), scale folded in
        shape = (B, Hkv, G * self.c, nk)
        s = torch.empty(shape, dtype=qs.dtype, device=qs.device) if buf is None else buf[: B * Hkv * G * self.c * nk].view(shape)
        kt = kc[:, :, self.lo:self.hi].transpose(-1, -2)
        self.dcap = None
        if inp.softcap is None:
            torch.matmul(self.qc, kt, out=s)  # (B, Hkv, G·c, nk)
        else:  # c·tanh(s/c), before ALiBi and masks, as `attnlens.core.scores.score_mods`: the 1/c rides in the product
            s3 = s.view(B * Hkv, G * self.c, nk)
            torch.baddbmm(s3, self.qc.reshape(B * Hkv, G * self.c, D), kt.reshape(B * Hkv, D, nk), beta=0.0,
                          alpha=1.0 / inp.softcap, out=s3)
            s.tanh_()
            if want_dcap:
                self.dcap = torch.square(s).neg_().add_(1.0)  # 1 - tanh²
            s.mul_(inp.softcap)
        s5 = s.view(B, Hkv, G, self.c, nk)
        if inp.alibi_slopes is not None:  # - slope·|i + offset - j|
            rows = torch.arange(i0, i1, device=s.device)
            pos = rows[:, None] + off if sl is None else sl.positions(rows)[:, None, None, :, None]  # (c,1)|(B,1,1,c,1)
            dist = (pos - torch.arange(self.lo, self.hi, device=s.device)).abs()  # (c, nk) | (B, 1, 1, c, nk)
            score_mods(s5, None, inp.alibi_slopes.reshape(-1, Hkv, G, 1, 1), dist)
        m5 = None
        if inp.mask is not None:
            m = inp.mask
            m = m[:, :, i0:i1] if m.shape[2] == Nq else m
            m = m[..., self.lo:self.hi] if m.shape[3] == Nk else m
            m5 = m.reshape(m.shape[0], Hkv, G, m.shape[2], m.shape[3]) if m.shape[1] == Hq else m.unsqueeze(2)
            if m5.dtype != torch.bool:  # finite entries are scores (HF's finfo.min too); -inf masks the key
                m5 = m5.detach().to(s.dtype)
                s5.add_(m5)
        if check:  # a score that is not finite (NaN, ±inf from inf in q/k, overflow) marks its row, if visible
            s.masked_fill_(~torch.isfinite(s), NAN)
        if m5 is not None and (check or m5.dtype == torch.bool):
            s5.masked_fill_(~m5 if m5.dtype == torch.bool else torch.isneginf(m5), NEG_INF)
        if sl is not None:  # each sequence's band and lengths: (B, 1, 1, c, nk), the size of one head's scores
            keep = sl.keep(torch.arange(i0, i1, device=s.device), torch.arange(self.lo, self.hi, device=s.device),
                           inp.causal, inp.window)
            s5.masked_fill_(~keep[:, None, None], NEG_INF)
            self.s = s
            return
        # causal / window: keys [lo_last, hi_first) are seen by every row of the chunk; mask only the
        # columns outside it (for causal, just the diagonal block)
        lo_last = key_range(i1 - 1, i1, Nk, off, inp.causal, inp.window)[0]
        hi_first = key_range(i0, i0 + 1, Nk, off, inp.causal, inp.window)[1]
        a, b = min(max(lo_last, self.lo), self.hi), max(min(hi_first, self.hi), self.lo)
        if a >= b:
            a = b = self.lo  # no column is seen by every row: mask the whole chunk
        dev = s.device
        rows = torch.arange(i0, i1, device=dev)
        for c0, c1 in ((self.lo, a), (b, self.hi)):
            if c1 > c0:
                keep = band_keep(rows, torch.arange(c0, c1, device=dev), off, inp.causal, inp.window)
                s5[..., c0 - self.lo:c1 - self.lo].masked_fill_(~keep, NEG_INF)
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


def _dropout_keep(inp: AttnInputs, chunk_index: int, shape, dtype):
    """The dropout mask of one chunk, scaled by 1/(1-p); regenerated identically in backward from ``inp.seed``."""
    g = torch.Generator(device=inp.q.device)
    g.manual_seed(inp.seed + 1_000_003 * chunk_index)
    keep = torch.rand(shape, generator=g, device=inp.q.device, dtype=dtype) >= inp.dropout_p
    return keep.to(dtype).mul_(1.0 / (1.0 - inp.dropout_p))


def _prepare(inp: AttnInputs):
    """The compute dtype, scaled queries ``(B, Hkv, G, Nq, D)``, keys and values in it (detached)."""
    B, Hq, Hkv, Nq, Nk, D, Dv = inp.shape
    cdt = stat_dtype(inp.q.dtype)
    qs = (inp.q.detach().to(cdt) * inp.scale).reshape(B, Hkv, Hq // Hkv, Nq, D)
    return cdt, qs, inp.k.detach().to(cdt), inp.v.detach().to(cdt)



def _key_block_sums(x, lo: int, bk: int):
    """Sums of ``x (..., n)``, whose column 0 is key ``lo``, over the key blocks ``[b·bk, (b + 1)·bk)`` it touches:
    ``(..., nbk)`` from block ``lo // bk`` on. The whole blocks by a reshape-sum of a view, the partial first and
    last blocks (a chunk's key range need not start or end on a block boundary) each by a sum."""
    n = x.shape[-1]
    hi = lo + n
    a = min(-(-lo // bk) * bk, hi)  # the first block boundary at or after lo (or hi)
    b = max(a, hi // bk * bk)  # the last block boundary at or before hi (or a)
    parts = []
    if a > lo:
        parts.append(x[..., : a - lo].sum(-1, keepdim=True))
    if b > a:
        parts.append(x[..., a - lo:b - lo].unflatten(-1, ((b - a) // bk, bk)).sum(-1))
    if hi > b:
        parts.append(x[..., b - lo:].sum(-1, keepdim=True))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


class _Outputs:
    """The forward's output, lse and lens buffers in ``(B, Hkv, G, ...)`` layout, written a chunk at a time."""

    def __init__(self, inp: AttnInputs, cdt):
        B, Hq, Hkv, Nq, Nk, D, Dv = inp.shape
        G, dev, lens = Hq // Hkv, inp.q.device, inp.lens
        self.inp, self.lead = inp, (B, Hkv, G)

        def new(*shape, fill=0.0, dtype=cdt):
            return torch.full((B, Hkv, G, *shape), fill, dtype=dtype, device=dev)

        self.out = new(Nq, Dv)
        self.lse = new(Nq, fill=float("-inf"))
        self.ent = new(Nq) if lens is not None and lens.entropy else None
        self.maxw = new(Nq) if lens is not None and lens.max_weight else None
        self.rec = new(Nk) if lens is not None and lens.received else None
        self.topk = lens.topk if lens is not None else 0
        if self.topk:
            self.tk_w, self.tk_i = new(Nq, self.topk), new(Nq, self.topk, fill=-1, dtype=torch.int64)
        self.rows = inp.rows
        if self.rows is not None:
            self.wrows, self.runs = new(len(self.rows), Nk), _row_runs(self.rows)
        self.w5 = self.rf = self.pooled = None
        if inp.received_from is not None:  # Pᵀ W in the pass, like dV = Pᵀ dO in the backward
            T = inp.received_from.shape[-1]
            self.w5 = inp.received_from.to(cdt).expand(B, Hq, Nq, T).reshape(B, Hkv, G, Nq, T)
            self.rf = new(Nk, T)
        self.pool = lens.pool if lens is not None else None
        if self.pool is not None:
            self.pooled = new(-(-Nq // self.pool[0]), -(-Nk // self.pool[1]))
        self.sinks = None if inp.sinks is None else inp.sinks.detach().to(cdt).reshape(-1, Hkv, G, 1, 1)
        if self.sinks is not None and inp.seqlens is not None:  # padded query rows see no sink either: -inf there
            alive = (torch.arange(Nq, device=dev)[None, :] < inp.seqlens.q[:, None]).reshape(B, 1, 1, Nq, 1)
            self.sinks = self.sinks.expand(B, Hkv, G, Nq, 1).masked_fill(~alive, NEG_INF)
        self.sinkw = new(Nq) if lens is not None and self.sinks is not None else None
        self.at, self.wat = inp.at, None
        if self.at is not None:  # Lens(at=...): P[i, at] gathered from each chunk's weights
            self.wat = new(Nq, self.at.shape[-1])

    def _sinks(self, ch: _Chunk):
        """The sink logits of the chunk's rows, ``(B|1, Hkv, G, c|1, 1)`` (per row in a padded batch)."""
        return self.sinks if self.sinks.shape[3] == 1 else self.sinks[:, :, :, ch.i0:ch.i1]

    def write_keyless(self, ch: _Chunk):
        """A chunk whose queries see no key (``ch.nk == 0``): zeros and lse ``-inf`` as initialised; with sinks every
        row puts all its weight on its sink: lse = σ, sink weight 1 (0 for σ = -inf)."""
        if self.sinks is None:
            return
        B, Hkv, G = self.lead
        sk = self._sinks(ch).expand(B, Hkv, G, ch.c, 1)[..., 0]  # (B, Hkv, G, c)
        # exp(σ - σ): 1, NaN for a NaN or +inf sink (as the reference: a non-finite visible logit)
        sw = torch.where(torch.isneginf(sk), torch.zeros((), dtype=sk.dtype, device=sk.device), torch.exp(sk - sk))
        self.lse[:, :, :, ch.i0:ch.i1] = torch.where(sw.isnan(), sw, sk)
        if self.sinkw is not None:
            self.sinkw[:, :, :, ch.i0:ch.i1] = sw

    def write(self, ch: _Chunk, e, m, l, t, top, o, bad=None):
        """Chunk results: ``e = exp(s - m)`` ``(B, Hkv, G·c, nk)``, ``m, l, t`` ``(B, Hkv, G·c, 1)``
        (``t = Σ e·(s - m)``), ``top`` = (raw scores, key indices) of the top-k, ``o`` unnormalised output;
        ``bad`` (or None): rows with a non-finite visible score, whose ``e`` already holds their weights (NaN at
        their visible keys): every statistic of theirs is NaN."""
        B, Hkv, G = self.lead
        i0, i1, c, nk = ch.i0, ch.i1, ch.c, ch.nk
        zero = torch.zeros((), dtype=e.dtype, device=e.device)
        m_keys = m  # e = exp(s - m_keys)
        a = None
        if self.sinks is not None:  # one more entry per row, logit σ, no value
            sk = self._sinks(ch).expand(-1, Hkv, G, c, 1).reshape(-1, Hkv, G * c, 1)
            m2 = torch.where((l == 0) & (sk > float("-inf")), sk, torch.maximum(m, sk))  # no key: exactly 1 on σ
            # rows that see no key: their keys' weights stay 0 (exp(m - m2) may be inf there: m = 0, σ < -88)
            a, es = torch.where(l == 0, zero, torch.exp(m - m2)), torch.exp(sk - m2)  # es = 0 for σ = -inf
            if t is not None:  # a = 0: the keys' term is 0 (l·(m - m2) may overflow to -inf there, and 0·-inf = NaN)
                t = torch.where(a > 0, a * (t + l * (m - m2)), zero) + torch.where(es > 0, es * (sk - m2), zero)
            l, m = l * a + es, m2
        inv = torch.where(l == 0, zero, 1.0 / l)  # 1/l, 0 for dead rows
        rl = inv if a is None else a * inv  # the keys' weights are rl · e
        stat_nan = None
        if bad is not None:
            stat_nan = torch.where(bad, torch.full((), NAN, dtype=e.dtype, device=e.device), zero)  # NaN or 0
            rl = torch.where(bad, torch.ones((), dtype=e.dtype, device=e.device), rl)  # p = e on those rows

        def put(buf, val):
            buf[:, :, :, i0:i1] = val.view(B, Hkv, G, c, *buf.shape[4:])

        def row_stat(val):  # NaN on the rows with a non-finite visible score
            return val if stat_nan is None else val + stat_nan

        put(self.out, o.mul_(rl))  # out_i = Σ_j p_ij v_j
        put(self.lse, row_stat(m + torch.log(l)))
        if self.maxw is not None:
            put(self.maxw, row_stat(rl))  # max_j e_ij = exp(0) = 1
        if self.ent is not None:  # -Σ p log p = log l - Σ e·(s - m) / l (the sink's term included)
            put(self.ent, row_stat(torch.where(l == 0, zero, torch.log(l) - t * inv).clamp_(min=0)))
        if self.sinkw is not None:
            put(self.sinkw, row_stat(es * inv))
        if self.rec is not None:
            self.rec[..., ch.lo:ch.hi] += torch.matmul(rl.view(B, Hkv, G, 1, c), e.view(B, Hkv, G, c, nk)).view(
                B, Hkv, G, nk)
        if self.topk:
            self._write_topk(ch, top, m_keys, rl, stat_nan)
        if self.rows is not None:
            self._write_rows(ch, e, rl)
        if self.wat is not None:
            self._write_at(ch, e, rl)
        if self.rf is not None:
            p5 = (e * rl).view(B, Hkv, G, c, nk)  # the chunk's weights
            self.rf[..., ch.lo:ch.hi, :] += _pt_w(p5, self.w5[:, :, :, i0:i1])
        if self.pooled is not None:
            self._write_pool(ch, e, rl)

    def _write_pool(self, ch: _Chunk, e, rl):
        """Block sums of the chunk's weights ``p = rl · e`` (``e (B, Hkv, G·c, nk)``, ``rl (B, Hkv, G·c, 1)``) added
        into ``pooled``: ``pooled[a, b] += Σ_{i in query block a} rl_i · Σ_{j in key block b} e_ij``.

        The key blocks are summed on ``e`` itself (`_key_block_sums`: views, no copy of the chunk), then scaled by
        each row's ``rl`` and added into the query blocks on the small ``(c, nbk)`` sums. Scaling per row keeps a
        NaN row (a non-finite visible score) to its own query block. Blocks may straddle chunk boundaries and need
        not divide N."""
        B, Hkv, G = self.lead
        bq, bk = self.pool
        x = _key_block_sums(e.view(B, Hkv, G, ch.c, ch.nk), ch.lo, bk)  # (B, Hkv, G, c, nbk)
        x.mul_(rl.view(B, Hkv, G, ch.c, 1))
        qb = torch.arange(ch.i0, ch.i1, device=x.device) // bq
        kb = ch.lo // bk
        self.pooled[..., kb:kb + x.shape[-1]].index_add_(3, qb, x)

    def _write_topk(self, ch: _Chunk, top, m, rl, stat_nan=None):
        B, Hkv, G = self.lead
        vals, idx = top  # largest raw scores of each row
        kk = vals.shape[-1]
        w = torch.exp(vals - m).mul_(rl)
        if stat_nan is not None:
            w = w + stat_nan  # weights NaN, indices -1 on rows with a non-finite visible score
            if kk < self.topk:  # and in the slots beyond the chunk's nk keys (0 elsewhere)
                self.tk_w[:, :, :, ch.i0:ch.i1, kk:] = stat_nan.view(B, Hkv, G, ch.c, 1)
        idx = torch.where(w > 0, idx + ch.lo, torch.full((), -1, dtype=torch.int64, device=idx.device))
        self.tk_w[:, :, :, ch.i0:ch.i1, :kk] = w.view(B, Hkv, G, ch.c, kk)
        self.tk_i[:, :, :, ch.i0:ch.i1, :kk] = idx.view(B, Hkv, G, ch.c, kk)

    def _write_at(self, ch: _Chunk, e, rl):
        """``weights_at`` of the chunk's rows: ``p = rl · e`` gathered at ``Lens(at=...)``'s keys, 0 at a key outside
        the chunk's range ``[lo, hi)`` (no row of the chunk sees it) or -1. The same weights as every other field:
        exact whatever the scores' magnitude, NaN at the visible keys of a row with a non-finite visible score."""
        B, Hkv, G = self.lead
        i0, i1, c = ch.i0, ch.i1, ch.c
        at = self.at[:, :, i0:i1] if self.at.shape[2] > 1 else self.at  # (B|1, Hq|1, c|1, m)
        m = at.shape[-1]
        idx = at.expand(B, Hkv * G, c, m).reshape(B, Hkv, G * c, m) - ch.lo
        inside = (idx >= 0) & (idx < ch.nk)
        w = torch.gather(e, -1, idx.clamp(0, ch.nk - 1)).mul_(rl)
        self.wat[:, :, :, i0:i1] = torch.where(inside, w, torch.zeros((), dtype=w.dtype, device=w.device)).view(
            B, Hkv, G, c, m)

    def _write_rows(self, ch: _Chunk, e, rl):
        """Requested rows in this chunk: ``p = e / l`` written straight into ``weights``."""
        B, Hkv, G = self.lead
        i0, i1 = ch.i0, ch.i1
        e5, rl5 = e.view(B, Hkv, G, ch.c, ch.nk), rl.view(B, Hkv, G, ch.c, 1)
        for r0, pos0, n in self.runs:
            a, b = max(r0, i0), min(r0 + n, i1)
            if a < b:
                dst = self.wrows[:, :, :, pos0 + a - r0:pos0 + b - r0, ch.lo:ch.hi]
                torch.mul(e5[:, :, :, a - i0:b - i0], rl5[:, :, :, a - i0:b - i0], out=dst)

    def result(self):
        """``out (B, Hq, Nq, Dv)`` in q's dtype, ``lse (B, Hq, Nq)`` and the `LensResult` (or None)."""
        B, Hkv, G = self.lead

        def flat(t):  # (B, Hkv, G, ...) -> (B, Hq, ...)
            return None if t is None else t.reshape(B, Hkv * G, *t.shape[3:])

        lens, lse = self.inp.lens, flat(self.lse)
        res = None
        if lens is not None:
            res = LensResult(lse=lse if lens.lse else None, max_weight=flat(self.maxw), entropy=flat(self.ent),
                             received=flat(self.rec))
            if self.topk:
                res.topk_weights, res.topk_indices = flat(self.tk_w), flat(self.tk_i)
            if self.rows is not None:
                res.weights, res.rows = flat(self.wrows), self.rows
            res.received_from, res.pooled, res.weights_at = flat(self.rf), flat(self.pooled), flat(self.wat)
            res.sink_weight = flat(self.sinkw)
        return flat(self.out).to(self.inp.q.dtype), lse, res


def _softmax_stats(s, topk: int, want_t: bool, native: bool, ebuf):
    """One chunk's row statistics from its masked scores ``s`` (overwritten): ``e = exp(s - m)`` and
    ``m, l = Σ e, t = Σ e·(s - m)`` (``None`` unless ``want_t``), ``top`` (raw scores, indices) or None.
    A row that sees no key (max ``-inf``) gets ``m = 0``, so its ``e`` and ``l`` are exactly 0."""
    if native:  # one fused pass per row (rowsoftmax.c): s becomes e in place
        m, l, t, top = _native.rowsoftmax(s, topk, NEG_INF)
        return s, m, l, t, top
    m, top = _rowmax_and_topk(s, topk)  # m: (..., 1)
    m.masked_fill_(torch.isneginf(m), 0.0)  # rows that see no key: e becomes exactly 0
    s.sub_(m)
    e = torch.exp(s, out=ebuf[: s.numel()].view(s.shape)) if want_t else s.exp_()
    l = e.sum(dim=-1, keepdim=True)
    t = None
    if want_t:  # s holds s - m: -inf at masked keys, where e = 0 (0 · -inf would be NaN)
        torch.nan_to_num(s, nan=NAN, neginf=0.0, out=s)
        t = torch.einsum("...j,...j->...", e, s).unsqueeze(-1)
    return e, m, l, t, top


def _scores_may_be_nonfinite(inp: AttnInputs) -> bool:
    """Whether a score ``q·k·scale + mask`` of this call can be non-finite in the compute dtype: NaN/inf in q or k,
    NaN/+inf in a float mask, or magnitudes whose score may overflow (a bound: max|q| · max|k| · D · |scale| +
    max|finite mask|). False for every ordinary call, which then skips the per-chunk NaN marking."""
    cdt = stat_dtype(inp.q.dtype)
    bound = _absmax(inp.q) * _absmax(inp.k) * inp.shape[5] * abs(inp.scale)
    m = inp.mask
    if m is not None and m.dtype != torch.bool:
        mf = m.detach()
        bound += _absmax(mf.masked_fill(torch.isneginf(mf), 0.0))
    return not bound < torch.finfo(cdt).max / 4  # NaN bound (NaN input) compares False: checked


def _absmax(x) -> float:
    """``max |x|`` as a Python float: NaN if ``x`` holds a NaN, inf if an inf, 0 if empty. One ``aminmax`` pass
    (exact in any float dtype: the largest magnitude is one of the two); ``linalg.vector_norm(x, inf)`` gives the
    same but is ~5x slower on CPU (0.37 vs 0.07 ms per (1, 12, 512, 32) tensor, twice per attention call)."""
    if x.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(x.detach())
    return float(torch.maximum(lo.abs(), hi.abs()))


def _mark_nonfinite_rows(e, vis, rowbad):
    """Rows with a non-finite visible score: weights NaN at their visible keys, 0 at the others (the reference's
    rule); ``e`` is returned with those rows replaced."""
    return torch.where(rowbad, torch.where(vis, torch.full((), NAN, dtype=e.dtype, device=e.device),
                                           torch.zeros((), dtype=e.dtype, device=e.device)), e)


def forward(inp: AttnInputs, rows_per_chunk: int):
    """``out (B, Hq, Nq, Dv)`` in q's dtype, ``lse (B, Hq, Nq)`` and a rank-4 `LensResult` (or None)."""
    B, Hq, Hkv, Nq, Nk, D, Dv = inp.shape
    cdt, qs, kc, vc = _prepare(inp)
    dev = qs.device
    outs = _Outputs(inp, cdt)
    want_t = outs.ent is not None
    vbad = _nonfinite_keys(vc)
    check = _scores_may_be_nonfinite(inp)
    n_buf = B * Hq * min(Nq, rows_per_chunk) * Nk
    sbuf = torch.empty(n_buf, dtype=cdt, device=dev)  # workspaces reused by every chunk
    native = dev.type == "cpu" and cdt == torch.float32 and outs.topk <= _native.MAX_TOPK and _native.load() is not None
    ebuf = torch.empty(n_buf, dtype=cdt, device=dev) if want_t and not native else None
    for ci, i0 in enumerate(range(0, Nq, rows_per_chunk)):
        ch = _Chunk(inp, qs, kc, i0, min(Nq, i0 + rows_per_chunk), sbuf, check)
        if ch.nk == 0:  # no query in this chunk sees a key: zeros, lse -inf (or the sink's)
            outs.write_keyless(ch)
            continue
        bad = vis = None
        if check:  # rows with a non-finite visible score (NaN after _Chunk's marking)
            bad = torch.isnan(ch.s).any(dim=-1, keepdim=True)
            vis = ~torch.isneginf(ch.s) if bool(bad.any()) else None
            bad = bad if vis is not None else None
        e, m, l, t, top = _softmax_stats(ch.s, min(outs.topk, ch.nk), want_t, native, ebuf)
        if bad is not None:
            e = _mark_nonfinite_rows(e, vis, bad)
        pv = e * _dropout_keep(inp, ci, e.shape, cdt) if inp.dropout_p > 0 else e
        o = _weighted_values(pv, vc, vbad, ch.lo, ch.hi)  # (B, Hkv, G·c, Dv), unnormalised
        outs.write(ch, e, m, l, t, top, o, bad)
    return outs.result()


def _lse_inf(lse, B, Hkv, G, Nq, cdt):
    """``lse`` as ``(B, Hkv, G, Nq)`` with dead rows (-inf) read as +inf, so that ``exp(s - lse)`` is 0 there."""
    lse5 = lse.to(cdt).reshape(B, Hkv, G, Nq)
    return torch.where(torch.isneginf(lse5), torch.full((), float("inf"), dtype=cdt, device=lse.device), lse5)


#: rows whose |lse| exceeds this many ulps of 1 (``|lse| · eps``: 2**-12 is |lse| > 2**11 in float32, 2**40 in float64)
#: have their weights rebuilt by `_own_row_factors`: below it the lse's rounding moves a weight by at most 2**-13
#: relative, like the scores' own rounding at that size; above it ``exp(s - lse)`` drifts from the pass's weights
#: (by a factor l once fp32 cannot hold ``m + log l``: scores near -1e30 or finfo.min). Calls without such rows skip
#: the extra row sum.
LSE_RENORM_ULPS = 2.0 ** -12


def _needs_own_rows(lse) -> bool:
    """Whether some finite row of ``lse`` is large enough for `_own_row_factors` (one reduction, once per call)."""
    eps = torch.finfo(lse.dtype).eps
    return bool((torch.isfinite(lse) & (lse.abs() * eps > LSE_RENORM_ULPS)).any())


def _own_row_factors(p, lse_c, sinks):
    """Row factors ``f (B, Hkv, G·c, 1)`` that make ``f · p`` the pass's own weights where ``lse`` is the row's own
    log-sum-exp, for ``p = exp(s - lse)`` over the chunk's keys (all of the row's keys in the block).

    ``lse = m + log l`` is rounded to the statistics dtype; where it is the row's own, the row's weights (sink
    included) sum to ``r = 1`` up to that rounding, and ``p / r`` is ``e / l`` exactly — also when fp32 keeps none
    of ``log l`` (``lse`` = m for scores near -1e30: ``p`` sums to l). A row is taken as its own where
    ``|log r| <= eps · (|lse| / 2 + 1)`` (half an ulp of lse, plus the sums' rounding); elsewhere (the global lse of a
    row that also sees other blocks' keys, dead and NaN rows) ``f = 1``: ``exp(s - lse)`` as given."""
    r = p.sum(-1, keepdim=True)
    if sinks is not None:
        r = r + torch.exp(sinks - lse_c)  # 0 for a dead row (lse read as +inf) or a -inf sink
    eps = torch.finfo(p.dtype).eps
    own = torch.isfinite(lse_c) & (r > 0) & (r.log().abs() <= eps * (0.5 * lse_c.abs() + 1.0))
    return torch.where(own, 1.0 / r, torch.ones((), dtype=p.dtype, device=p.device))


def _chunk_weights(inp: AttnInputs, ch: _Chunk, lse5, own: bool):
    """``p = exp(s - lse)`` of the chunk's rows in place on its scores ``(B, Hkv, G·c, nk)``, and `_own_row_factors`
    (or None when ``own`` is False: the call has no row that needs them): the weights are ``f · p``."""
    B, Hkv, G = lse5.shape[:3]
    lse_c = lse5[:, :, :, ch.i0:ch.i1].reshape(B, Hkv, G * ch.c, 1)
    p = ch.s.sub_(lse_c).exp_()
    if not own:
        return p, None
    sk = None
    if inp.sinks is not None:
        sk = inp.sinks.detach().to(p.dtype).reshape(-1, Hkv, G, 1, 1).expand(B, Hkv, G, ch.c, 1).reshape(
            B, Hkv, G * ch.c, 1)
    return p, _own_row_factors(p, lse_c, sk)


def backward(inp: AttnInputs, out, lse, dout, dq, dk, dv, rows_per_chunk: int, dsinks=None, dlse=None) -> None:
    """Add the gradients into ``dq (B, Hq, Nq, D)``, ``dk (B, Hkv, Nk, D)``, ``dv (B, Hkv, Nk, Dv)`` (any float
    dtype, strided views allowed), and ``dsinks`` (`add_sink_grad`), recomputing each chunk's weights from ``lse``
    (`_chunk_weights`); O(chunk · Nk) memory. ``dlse``: the lse's own gradient (`Backend.backward`)."""
    B, Hq, Hkv, Nq, Nk, D, Dv = inp.shape
    G = Hq // Hkv
    cdt, qs, kc, vc = _prepare(inp)
    dev = qs.device
    do = dout.to(cdt).reshape(B, Hkv, G, Nq, Dv)
    # Σ_j p_ij dp_ij = rowsum(dO ∘ O), (B, Hkv, G, Nq), as a batched dot product (no (Nq, Dv) temporary)
    di = torch.einsum("...d,...d->...", do, out.to(cdt).reshape(B, Hkv, G, Nq, Dv))
    if dlse is not None:  # ∂lse_i/∂s_ij = P_ij: the lse's gradient joins the row term, dS = P ∘ (dP - (D - dlse))
        di = di - dlse.to(cdt).reshape(B, Hkv, G, Nq)
    lse5 = _lse_inf(lse, B, Hkv, G, Nq, cdt)
    own = _needs_own_rows(lse.to(cdt))
    # the sinks' weights get the rows' own factors too (the sink is one more entry of each row)
    p_sink = sink_weights(inp, lse).reshape(B, Hkv, G, Nq) if own and dsinks is not None and inp.sinks is not None \
        else None
    dq5 = dq.unflatten(1, (Hkv, G))  # (B, Hkv, G, Nq, D), a view
    n_buf = B * Hq * min(Nq, rows_per_chunk) * Nk
    sbuf = torch.empty(n_buf, dtype=cdt, device=dev)  # score / weight workspace reused by every chunk
    dpbuf = torch.empty(n_buf, dtype=cdt, device=dev)  # dP workspace
    for ci, i0 in enumerate(range(0, Nq, rows_per_chunk)):
        i1 = min(Nq, i0 + rows_per_chunk)
        ch = _Chunk(inp, qs, kc, i0, i1, sbuf, want_dcap=True)
        if ch.nk == 0:
            continue
        c, lo, hi = ch.c, ch.lo, ch.hi
        p, f = _chunk_weights(inp, ch, lse5, own)  # the weights are f · p: f scales rows of the small operands
        if p_sink is not None:
            p_sink[:, :, :, i0:i1] *= f.view(B, Hkv, G, c)
        do_c = do[:, :, :, i0:i1].reshape(B, Hkv, G * c, Dv)
        keep = _dropout_keep(inp, ci, p.shape, cdt) if inp.dropout_p > 0 else None
        pd = p * keep if keep is not None else p
        dv[:, :, lo:hi] += torch.matmul(pd.transpose(-1, -2), do_c if f is None else do_c * f)
        del pd
        dp = torch.matmul(do_c, vc[:, :, lo:hi].transpose(-1, -2), out=dpbuf[: p.numel()].view(p.shape))
        if keep is not None:
            dp.mul_(keep)
        ds = dp.sub_(di[:, :, :, i0:i1].reshape(B, Hkv, G * c, 1)).mul_(p)  # p ∘ (dp - di)
        if ch.dcap is not None:
            ds.mul_(ch.dcap)  # through c·tanh(s/c)
        dqc = torch.matmul(ds, kc[:, :, lo:hi]).mul_(inp.scale)
        dq5[:, :, :, i0:i1] += (dqc if f is None else dqc.mul_(f)).view(B, Hkv, G, c, D)
        dk[:, :, lo:hi] += torch.matmul(ds.transpose(-1, -2), ch.qc if f is None else ch.qc * f)
    add_sink_grad(inp, out, lse, dout, dsinks, None if p_sink is None else p_sink.reshape(B, Hq, Nq), dlse=dlse)


def _pt_w(p5, w5):
    """``pᵀ W`` ``(..., nk, T)`` for weights ``p5 (..., c, nk)`` and ``w5 (..., c, T)``, as ``(Wᵀ p)ᵀ``: a row-major pass
    over ``p`` (on CPU ~17x faster than multiplying by the transposed view at c = 128, nk = 4096, T = 1)."""
    return torch.matmul(w5.transpose(-1, -2), p5).transpose(-1, -2)


def column_sums(inp: AttnInputs, lse, weights, rows_per_chunk: int):
    """``Σ_i exp(s_ij - lse_i) · W_i`` per query head: ``(B, Hq, Nk)`` without ``weights``, ``(B, Hq, Nk, T)`` with
    ``weights (B|1, Hq|1, Nq, T)``; chunked like the backward."""
    B, Hq, Hkv, Nq, Nk, D, _ = inp.shape
    G = Hq // Hkv
    cdt, qs, kc, _ = _prepare(inp)
    lse5 = _lse_inf(lse, B, Hkv, G, Nq, cdt)
    w5 = None
    if weights is not None:
        T = weights.shape[-1]
        w5 = weights.to(cdt).expand(B, Hq, Nq, T).reshape(B, Hkv, G, Nq, T)
    rec = torch.zeros((B, Hkv, G, Nk) + (() if w5 is None else (w5.shape[-1],)), dtype=cdt, device=qs.device)
    own = _needs_own_rows(lse.to(cdt))
    for i0 in range(0, Nq, rows_per_chunk):
        i1 = min(Nq, i0 + rows_per_chunk)
        ch = _Chunk(inp, qs, kc, i0, i1)
        if ch.nk == 0:
            continue
        p, f = _chunk_weights(inp, ch, lse5, own)  # (B, Hkv, G·c, nk): the weights are f · p
        p5 = p.view(B, Hkv, G, ch.c, ch.nk)
        if w5 is None:
            rec[..., ch.lo:ch.hi] += p5.sum(-2) if f is None else (f.view(B, Hkv, G, 1, ch.c) @ p5)[..., 0, :]
        else:
            wc = w5[:, :, :, i0:i1]
            rec[..., ch.lo:ch.hi, :] += _pt_w(p5, wc if f is None else wc * f.view(B, Hkv, G, ch.c, 1))
    return rec.reshape(B, Hq, *rec.shape[3:])


class TorchChunkedBackend(Backend):
    """Eager PyTorch over query chunks. ``chunk_bytes``: the size of one chunk's score buffer (the
    workspace is a few of them), a per-instance setting: ``backend=TorchChunkedBackend(chunk_bytes=1 << 20)``."""

    name = "torch"
    description = "eager PyTorch over query chunks: exact, lens, autograd, O(chunk·Nk) memory"
    capabilities = Capabilities(masks=frozenset({MaskFeature.BOOL, MaskFeature.FLOAT, MaskFeature.QUERY}),
                                memory=Memory.CHUNKED, seqlens=True,
                                notes="any torch device; fp16/bf16 computed in fp32")

    def __init__(self, chunk_bytes: int = CHUNK_BYTES):
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be an int >= 1, got {chunk_bytes!r}")
        self.chunk_bytes = chunk_bytes

    def forward(self, inp: AttnInputs):
        return forward(inp, chunk_rows(inp, self.chunk_bytes))

    def backward(self, inp: AttnInputs, out, lse, dout, dq, dk, dv, dsinks=None, dlse=None) -> None:
        backward(inp, out, lse, dout, dq, dk, dv, chunk_rows(inp, self.chunk_bytes), dsinks, dlse)

    def column_sums(self, inp: AttnInputs, lse, weights=None):
        return column_sums(inp, lse, weights, chunk_rows(inp, self.chunk_bytes))
