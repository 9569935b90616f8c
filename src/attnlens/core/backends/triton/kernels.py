"""Triton kernels of the ``triton`` backend: fused attention with the lens, and its backward.

Imported lazily by `ops` (never at ``import attnlens``): ``@triton.jit`` reads ``TRITON_INTERPRET``
when a kernel is defined, so the interpreter mode must be set before this module is imported.

Structure follows Triton's fused-attention tutorial: an inner ``@triton.jit`` loop per kernel
(online softmax over K/V tiles, or over Q tiles for the column/backward kernels) called from an
outer kernel that sets up pointers and writes the epilogue. UPPERCASE = pointers and
constexprs, lowercase = tiles.

Math (scores in log2 units, ``s2 = log2(e) · (scale · q kᵀ + bias)``, masked entries ``-inf``):

    m  = running row max of s2          (starts at -inf; ``m_safe`` = 0 while a row has seen no key, so no NaN)
    l  = Σ_j 2^(s2_ij - m)              acc = Σ_j 2^(s2_ij - m) v_j         out = acc / l
    t  = Σ_j 2^(s2_ij - m) (s2_ij - m)  (rescaled like acc: t' = α (t + l (m - m')) + tile term)
    lse = ln2 (m + log2 l)      max_weight = 1 / l      entropy = ln2 (log2 l - t / l)

``t`` is ``Σ p·s`` taken relative to the running max, so ``H = lse - Σ p·s / l`` never subtracts
two numbers of the size of the scores (scores of ±1e4 keep full precision).

Score modifications (`_score_mods`, in `_scores` / `_scores_t`, so every kernel forms the same scores):
softcap ``c·tanh(scale·q kᵀ / c)`` before everything else, then ALiBi ``- slope·|i + OFFSET - j|``, then the
key bias and the band. Sinks enter the forward's epilogue as one more entry of the online softmax
(``m' = max(m, sink2)``, ``l' = α l + 2^(sink2 - m')``, the same for ``t`` and ``acc``); the other kernels
need nothing for them, as the saved lse includes the sink. The backward multiplies ``dS`` by the softcap's
derivative ``1 - tanh²`` (``dcap``).

Band (causal and sliding window folded into ``(LEFT, RIGHT)`` by `masks.band`): query i at key
position ``p = i + OFFSET`` (a runtime argument; ``NK - NQ`` is bottom-right) sees key j iff
``p - LEFT <= j <= p + RIGHT``. Each program
visits only the tiles that intersect the band, split into three ranges: partial tiles before
(masked), tiles every row of the program sees completely (no mask at all), partial tiles after
(masked; this range also holds the ragged last tile ``j >= NK``).

Padded batches (HAS_SEQLENS, `attnlens.masks.SeqLens`): each program reads its batch's query length, key length
and offset (`_seq_geometry`) and uses them for the band, the tile ranges and the loads in place of NQ, NK and
OFFSET (the output layout keeps NQ, NK): keys past the sequence's length are masked (a tile holding them is never
full), padded query rows are dead in the forward's epilogue and read their lse as +inf everywhere else.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
I64_MIN = tl.constexpr(-(2**63))
I32_MIN = tl.constexpr(-(2**31))


# ------------------------------------------------------------------------------------------
# shared helpers: band bounds and masks


@triton.jit
def _key_bounds(row0, NQ, NK, OFFSET, LEFT, RIGHT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SEQLENS: tl.constexpr):
    """Key tiles for query rows [row0, row0 + BLOCK_M): masked [lo, fl), full [fl, fh), masked [fh, hi). With
    HAS_SEQLENS (NQ, NK: this sequence's lengths) nothing when no row is a query of it."""
    off = OFFSET
    row1 = tl.minimum(row0 + BLOCK_M, NQ)
    lo = row0 * 0
    full_lo = row0 * 0
    hi = NK + row0 * 0
    full_hi = NK + row0 * 0
    if HAS_LEFT:
        lo = tl.maximum(row0 + off - LEFT, 0)
        full_lo = tl.maximum(row1 - 1 + off - LEFT, 0)
    if HAS_RIGHT:
        hi = tl.minimum(tl.maximum(row1 + off + RIGHT, 0), NK)  # the last row sees up to row1-1+off+RIGHT
        full_hi = tl.minimum(tl.maximum(row0 + off + RIGHT + 1, 0), NK)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.maximum(hi, lo)
    fl = tl.minimum((full_lo + BLOCK_N - 1) // BLOCK_N, (hi + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    fl = tl.maximum(fl, lo)
    fh = tl.maximum((full_hi // BLOCK_N) * BLOCK_N, fl)
    if HAS_SEQLENS:  # a program of padded rows only: no tile (its rows are dead in the epilogue)
        none = row0 >= NQ
        fl, fh, hi = tl.where(none, lo, fl), tl.where(none, lo, fh), tl.where(none, lo, hi)
    return lo, fl, fh, hi


@triton.jit
def _query_bounds(col0, NQ, NK, OFFSET, LEFT, RIGHT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SEQLENS: tl.constexpr):
    """Query tiles that see keys [col0, col0 + BLOCK_N): masked [lo, fl), full [fl, fh), masked [fh, hi).

    Query i sees key j iff i >= j - off - RIGHT and i <= j - off + LEFT. Rows >= NQ need no mask:
    their lse is loaded as +inf, so their weights are 0. With HAS_SEQLENS (NQ, NK: this sequence's lengths) a
    tile holding padded keys (>= NK, whose gradients and column sums are stored) is never full, and a tile of
    padded keys only gets no query tile.
    """
    off = OFFSET
    col1 = tl.minimum(col0 + BLOCK_N, NK)
    lo = col0 * 0
    full_lo = col0 * 0
    hi = NQ + col0 * 0
    full_hi = NQ + col0 * 0
    if HAS_RIGHT:
        lo = tl.maximum(col0 - off - RIGHT, 0)
        full_lo = tl.maximum(col1 - 1 - off - RIGHT, 0)
    if HAS_LEFT:
        hi = tl.minimum(tl.maximum(col1 - off + LEFT, 0), NQ)
        full_hi = tl.minimum(tl.maximum(col0 - off + LEFT + 1, 0), NQ)
    lo = (lo // BLOCK_M) * BLOCK_M
    hi = tl.maximum(hi, lo)
    fl = tl.minimum((full_lo + BLOCK_M - 1) // BLOCK_M, (hi + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    fl = tl.maximum(fl, lo)
    fh = tl.maximum((full_hi // BLOCK_M) * BLOCK_M, fl)
    if HAS_SEQLENS:
        fh = tl.where(col0 + BLOCK_N <= NK, fh, fl)
        none = col0 >= NK
        fl, fh, hi = tl.where(none, lo, fl), tl.where(none, lo, fh), tl.where(none, lo, hi)
    return lo, fl, fh, hi


@triton.jit
def _band_mask(rows, cols, NQ, NK, OFFSET, LEFT, RIGHT, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """keep[a, b] for query rows (BLOCK_M,) and key cols (BLOCK_N,): in the band and cols < NK."""
    pos = rows[:, None] + OFFSET
    keep = (cols[None, :] < NK) & (rows[:, None] >= 0)  # broadcast to (BLOCK_M, BLOCK_N)
    if HAS_LEFT:
        keep = keep & (cols[None, :] >= pos - LEFT)
    if HAS_RIGHT:
        keep = keep & (cols[None, :] <= pos + RIGHT)
    return keep


@triton.jit
def _band_mask_t(rows, cols, NQ, NK, OFFSET, LEFT, RIGHT, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """The transpose of `_band_mask`: keep[b, a] of shape (BLOCK_N, BLOCK_M)."""
    pos = rows[None, :] + OFFSET
    keep = (cols[:, None] < NK) & (rows[None, :] >= 0)
    if HAS_LEFT:
        keep = keep & (cols[:, None] >= pos - LEFT)
    if HAS_RIGHT:
        keep = keep & (cols[:, None] <= pos + RIGHT)
    return keep


@triton.jit
def _seq_geometry(SEQ, stride_seq, off_b, NQ, NK, OFFSET, HAS_SEQLENS: tl.constexpr):
    """``(nq, nk, offset)`` of batch ``off_b``: with HAS_SEQLENS a padded batch's own lengths and offset from
    ``SEQ (3, B)`` int64 (rows: query lengths, key lengths, offsets; ``stride_seq`` = B), else the call's. Band
    geometry, loads and masks use these; output layout keeps NQ, NK."""
    if HAS_SEQLENS:
        nq = tl.load(SEQ + off_b)
        nk = tl.load(SEQ + stride_seq + off_b)
        off = tl.load(SEQ + 2 * stride_seq + off_b)
    else:
        nq = NQ
        nk = NK
        off = OFFSET
    return nq, nk, off


@triton.jit
def _load_tile(BASE, idx, offs, stride_i, stride_c, N_I, N_C, CHECK_IDX: tl.constexpr):
    """The tile ``BASE[idx[a], offs[c]]`` of shape (len(idx), len(offs)); 0 where ``offs >= N_C`` (head-dim
    padding) and, with CHECK_IDX, where ``idx >= N_I`` (a ragged last tile of rows or keys)."""
    mask = offs[None, :] < N_C
    if CHECK_IDX:
        mask = (idx[:, None] < N_I) & mask
    return tl.load(BASE + idx[:, None] * stride_i + offs[None, :] * stride_c, mask=mask, other=0.0)


@triton.jit
def _key_bias2(BIAS_BASE, cols, stride_bn, NK):
    """The key mask's additive bias for key ``cols``, in log2 units (0 past the last key)."""
    return tl.load(BIAS_BASE + cols * stride_bn, mask=cols < NK, other=0.0) * LOG2E


@triton.jit
def _load_lse2(LSE_BASE, rows, rmask):
    """Saved lse of ``rows`` in log2 units, +inf for rows past the end and for dead rows (lse -inf), so that
    every weight ``2^(s2 - lse2)`` of such a row is exactly 0."""
    lse = tl.load(LSE_BASE + rows, mask=rmask, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def _tanh(x):
    """tanh from exp2 (no tanh in every Triton version): ``1 - 2 / (e^(2x) + 1)``, exact to fp32 rounding; ±1 at
    the ends (e^(2x) = inf gives 1, 0 gives -1)."""
    return 1.0 - 2.0 / (tl.math.exp2(x * (2.0 * LOG2E)) + 1.0)


@triton.jit
def _load_slope2(SLOPES, off_b, off_h, stride_slb, stride_slh, HAS_ALIBI: tl.constexpr):
    """The ALiBi slope of (batch, head) in log2 units (0.0 without ALiBi)."""
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(SLOPES + off_b * stride_slb + off_h * stride_slh).to(tl.float32) * LOG2E
    return slope2


@triton.jit
def _score_mods(x, delta, qk_scale, cap_in, cap_out, slope2, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Raw dot products ``x = q·k`` to log2-unit scores: ``log2(e)·scale·x``; with HAS_SOFTCAP
    ``log2(e)·c·tanh(scale·x / c)`` (``cap_in = scale / c``, ``cap_out = c·log2(e)``); then with HAS_ALIBI
    ``- slope2·|delta|`` (``delta = i + offset - j``). Also returns ``dcap = 1 - tanh²``, the softcap's
    derivative (1.0 without softcap), for the backward."""
    if HAS_SOFTCAP:
        th = _tanh(x * cap_in)
        s = th * cap_out
        dcap = 1.0 - th * th
    else:
        s = x * qk_scale
        dcap = 1.0
    if HAS_ALIBI:
        s = s - slope2 * tl.abs(delta).to(tl.float32)
    return s, dcap


@triton.jit
def _scores(q, k, BIAS_BASE, stride_bn, rows, cols, NQ, NK, qk_scale, OFFSET, LEFT, RIGHT, MASKED: tl.constexpr,
            HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, cap_in, cap_out, slope2,
            HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, DOT_PREC: tl.constexpr):
    """s2 = log2(e)·(scale·q kᵀ, softcapped, minus ALiBi, + bias) of shape (BLOCK_M, BLOCK_N); -inf outside the
    band on MASKED tiles. Returns ``(s2, dcap)`` (see `_score_mods`)."""
    s, dcap = _score_mods(tl.dot(q, tl.trans(k), input_precision=DOT_PREC), rows[:, None] + OFFSET - cols[None, :],
                          qk_scale, cap_in, cap_out, slope2, HAS_SOFTCAP, HAS_ALIBI)
    if HAS_BIAS:
        s = s + _key_bias2(BIAS_BASE, cols, stride_bn, NK)[None, :]
    if MASKED:
        s = tl.where(_band_mask(rows, cols, NQ, NK, OFFSET, LEFT, RIGHT, HAS_LEFT, HAS_RIGHT), s, float("-inf"))
    return s, dcap


@triton.jit
def _scores_t(k, q, bias2, rows, cols, NQ, NK, qk_scale, OFFSET, LEFT, RIGHT, MASKED: tl.constexpr,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, cap_in, cap_out, slope2,
              HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, DOT_PREC: tl.constexpr):
    """The transpose of `_scores`, (BLOCK_N, BLOCK_M), for kernels that hold a key tile; ``bias2`` is the key
    tile's bias already in log2 units."""
    st, dcap = _score_mods(tl.dot(k, tl.trans(q), input_precision=DOT_PREC), rows[None, :] + OFFSET - cols[:, None],
                           qk_scale, cap_in, cap_out, slope2, HAS_SOFTCAP, HAS_ALIBI)
    if HAS_BIAS:
        st = st + bias2[:, None]
    if MASKED:
        st = tl.where(_band_mask_t(rows, cols, NQ, NK, OFFSET, LEFT, RIGHT, HAS_LEFT, HAS_RIGHT), st, float("-inf"))
    return st, dcap


# ------------------------------------------------------------------------------------------
# top-k: a per-row running list of packed (score, key) int64s in registers


@triton.jit
def _unpack_score(packed):
    """float32 score of a packed (score, index) key; -inf for an empty slot."""
    hi = (packed >> 32).to(tl.int32)
    bits = hi ^ ((hi >> 31) & 0x7FFFFFFF)
    s = bits.to(tl.float32, bitcast=True)
    return tl.where(hi > I32_MIN, s, float("-inf"))


@triton.jit
def _topk_merge(tk, thr, s, cols):
    """Merge a tile of scores ``s (BLOCK_M, BLOCK_N)`` into the running top lists ``tk (BLOCK_M, TOPK_P)``.

    Each entry is packed as ``(order-preserving int32 of s) << 32 | (2^31 - 1 - key)``: one int64
    max gives the score and its key, larger score first, smaller key on ties (as a stable sort).
    ``thr`` is each row's smallest kept score; a tile whose row maxima do not beat it (the common
    case once the lists fill) costs one compare. Otherwise the tile's best entry replaces a row's
    smallest while it is larger — a data-dependent number of rounds (<= TOPK_P, usually a few).
    """
    need = tl.max((tl.max(s, 1) > thr).to(tl.int32), 0)
    if need > 0:
        bits = s.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        packed = (key.to(tl.int64) << 32) | (0x7FFFFFFF - cols).to(tl.int64)[None, :]
        packed = tl.where(s > float("-inf"), packed, I64_MIN)  # masked keys never enter
        best = tl.max(packed, 1)
        cur = tl.min(tk, 1)
        go = tl.max((best > cur).to(tl.int32), 0)
        while go > 0:
            ins = best > cur
            tk = tl.where((tk == cur[:, None]) & ins[:, None], best[:, None], tk)  # entries are unique
            packed = tl.where(packed == best[:, None], I64_MIN, packed)
            best = tl.max(packed, 1)
            cur = tl.min(tk, 1)
            go = tl.max((best > cur).to(tl.int32), 0)
        thr = _unpack_score(cur)
    return tk, thr


# ------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_inner(acc, l_i, m_i, t_i, tk, thr, q, K_BASE, V_BASE, BIAS_BASE, stride_kn, stride_kd, stride_vn,
               stride_vd, stride_bn, rows, offs_d, offs_dv, start, end, NQ, NK, D, DV, qk_scale, OFFSET, LEFT, RIGHT,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
               HAS_BIAS: tl.constexpr, cap_in, cap_out, slope2,
               HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, WANT_ENT: tl.constexpr, TOPK: tl.constexpr,
               DOT_PREC: tl.constexpr):
    """Online softmax over key tiles [start, end): the tutorial's inner loop, plus t (entropy) and top-k."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        k = _load_tile(K_BASE, cols, offs_d, stride_kn, stride_kd, NK, D, MASKED)
        s, dcap = _scores(q, k, BIAS_BASE, stride_bn, rows, cols, NQ, NK, qk_scale, OFFSET, LEFT, RIGHT, MASKED,
        HAS_LEFT,
                    HAS_RIGHT, HAS_BIAS, cap_in, cap_out, slope2, HAS_SOFTCAP, HAS_ALIBI, DOT_PREC)
        m_ij = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)  # no key seen yet: every p and alpha is 0, not NaN
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        if WANT_ENT:
            if MASKED or HAS_BIAS:
                ps = p * tl.where(p > 0.0, s - m_safe[:, None], 0.0)  # 0·(-inf) would be NaN
            else:
                ps = p * (s - m_safe[:, None])
            t_i = alpha * (t_i + tl.where(l_i > 0.0, l_i * (m_i - m_safe), 0.0)) + tl.sum(ps, 1)
        if TOPK > 0:
            tk, thr = _topk_merge(tk, thr, s, cols)
        acc = acc * alpha[:, None]
        v = _load_tile(V_BASE, cols, offs_dv, stride_vn, stride_vd, NK, DV, MASKED)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_ij
    return acc, l_i, m_i, t_i, tk, thr


@triton.jit
def attn_fwd_kernel(Q, K, V, BIAS, OUT, LSE, MAXW, ENT, TK_IDX, TK_W, SINKS, SINKW, stride_sib, stride_sih,
                    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                    stride_vb, stride_vh, stride_vn, stride_vd, stride_bb, stride_bh, stride_bn,
                    stride_ob, stride_oh, stride_om, stride_od,
                    HQ, GROUP, NQ, NK, D, DV, qk_scale, OFFSET, LEFT, RIGHT, SLOPES, stride_slb, stride_slh, cap_in,
                    cap_out, SEQ, stride_seq,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                    HAS_SINKS: tl.constexpr, WANT_ENT: tl.constexpr, TOPK: tl.constexpr, TOPK_P: tl.constexpr,
                    HAS_SEQLENS: tl.constexpr, DOT_PREC: tl.constexpr):
    """One program = BLOCK_M queries of one (batch, query head); K/V of head ``h // GROUP`` by index."""
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // HQ).to(tl.int64)
    nq, nk, off = _seq_geometry(SEQ, stride_seq, off_b, NQ, NK, OFFSET, HAS_SEQLENS)
    off_h = (off_bh % HQ).to(tl.int64)
    off_kh = off_h // GROUP
    slope2 = _load_slope2(SLOPES, off_b, off_h, stride_slb, stride_slh, HAS_ALIBI)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_kh * stride_kh
    v_base = V + off_b * stride_vb + off_kh * stride_vh
    bias_base = BIAS + off_b * stride_bb + off_h * stride_bh

    row0 = start_m * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(q_base, rows, offs_d, stride_qm, stride_qd, NQ, D, True)  # (BLOCK_M, BLOCK_D), resident

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + float("-inf")  # no sentinel a finite score could reach
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    t_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # top-k lists start with distinct sentinels below every real entry (and above masked ones)
    tk = tl.zeros([BLOCK_M, TOPK_P], dtype=tl.int64) + (I64_MIN + 1) + tl.arange(0, TOPK_P)[None, :]
    thr = tl.zeros([BLOCK_M], dtype=tl.float32) + float("-inf")

    lo, fl, fh, hi = _key_bounds(row0, nq, nk, off, LEFT, RIGHT, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT,
                                 HAS_SEQLENS)
    acc, l_i, m_i, t_i, tk, thr = _fwd_inner(
        acc, l_i, m_i, t_i, tk, thr, q, k_base, v_base, bias_base, stride_kn, stride_kd, stride_vn, stride_vd,
        stride_bn, rows, offs_d, offs_dv, lo, fl, nq, nk, D, DV, qk_scale, off, LEFT, RIGHT,
        BLOCK_N, True, HAS_LEFT, HAS_RIGHT, HAS_BIAS, cap_in, cap_out, slope2, HAS_SOFTCAP, HAS_ALIBI, WANT_ENT, TOPK,
        DOT_PREC)
    acc, l_i, m_i, t_i, tk, thr = _fwd_inner(
        acc, l_i, m_i, t_i, tk, thr, q, k_base, v_base, bias_base, stride_kn, stride_kd, stride_vn, stride_vd,
        stride_bn, rows, offs_d, offs_dv, fl, fh, nq, nk, D, DV, qk_scale, off, LEFT, RIGHT,
        BLOCK_N, False, HAS_LEFT, HAS_RIGHT, HAS_BIAS, cap_in, cap_out, slope2, HAS_SOFTCAP, HAS_ALIBI, WANT_ENT,
        TOPK, DOT_PREC)
    acc, l_i, m_i, t_i, tk, thr = _fwd_inner(
        acc, l_i, m_i, t_i, tk, thr, q, k_base, v_base, bias_base, stride_kn, stride_kd, stride_vn, stride_vd,
        stride_bn, rows, offs_d, offs_dv, fh, hi, nq, nk, D, DV, qk_scale, off, LEFT, RIGHT,
        BLOCK_N, True, HAS_LEFT, HAS_RIGHT, HAS_BIAS, cap_in, cap_out, slope2, HAS_SOFTCAP, HAS_ALIBI, WANT_ENT, TOPK,
        DOT_PREC)

    # the sink: one more softmax entry with logit sink2 and no value, folded in like one more key
    top_e = l_i * 0.0 + 1.0  # 2^(row max - m): the largest key's e (1 until the sink raises m)
    if HAS_SINKS:
        sink2 = tl.load(SINKS + off_b * stride_sib + off_h * stride_sih).to(tl.float32) * LOG2E
        m_new = tl.maximum(m_i, sink2)
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key and a sink of -inf: nothing to weigh
        alpha = tl.math.exp2(m_i - m_new)  # 0 for a row with no key (m_i = -inf)
        e_sink = tl.math.exp2(sink2 - m_new)  # 0 for a sink of -inf
        t_i = alpha * (t_i + tl.where(l_i > 0.0, l_i * (m_i - m_new), 0.0)) + tl.where(
            e_sink > 0.0, e_sink * (sink2 - m_new), 0.0)
        acc = acc * alpha[:, None]
        top_e = tl.where(l_i > 0.0, alpha, 0.0)
        l_i = l_i * alpha + e_sink
        m_i = m_new
    # epilogue: rows that saw no key (l = 0) get out 0, lse -inf, max_weight 0, entropy 0
    dead = l_i == 0.0
    if HAS_SEQLENS:  # padded rows (a shorter sequence's), whatever their sink or the keys a full tile gave them
        dead = dead | (rows >= nq)
        acc = tl.where(dead[:, None], 0.0, acc)
    l_safe = tl.where(dead, 1.0, l_i)
    out = acc / l_safe[:, None]
    rmask = rows < NQ
    o_ptrs = OUT + off_b * stride_ob + off_h * stride_oh + rows[:, None] * stride_om + offs_dv[None, :] * stride_od
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=rmask[:, None] & (offs_dv[None, :] < DV))
    stat = off_bh.to(tl.int64) * NQ + rows  # (B, HQ, NQ) contiguous
    log2l = tl.math.log2(l_safe)
    tl.store(LSE + stat, tl.where(dead, float("-inf"), (m_i + log2l) * LN2), mask=rmask)
    tl.store(MAXW + stat, tl.where(dead, 0.0, top_e / l_safe), mask=rmask)
    if HAS_SINKS:
        tl.store(SINKW + stat, tl.where(dead, 0.0, e_sink / l_safe), mask=rmask)
    if WANT_ENT:
        tl.store(ENT + stat, tl.where(dead, 0.0, tl.maximum((log2l - t_i / l_safe) * LN2, 0.0)), mask=rmask)
    if TOPK > 0:
        tk = tl.sort(tk, dim=1, descending=True)
        w = tl.math.exp2(_unpack_score(tk) - m_i[:, None]) / l_safe[:, None]
        w = tl.where(dead[:, None], 0.0, w)
        idx = 0x7FFFFFFF - (tk & 0x7FFFFFFF).to(tl.int32)
        idx = tl.where(w > 0.0, idx, -1).to(tl.int64)
        slot = tl.arange(0, TOPK_P)
        t_ptr = stat[:, None] * TOPK + slot[None, :]
        t_mask = rmask[:, None] & (slot[None, :] < TOPK)
        tl.store(TK_W + t_ptr, w, mask=t_mask)
        tl.store(TK_IDX + t_ptr, idx, mask=t_mask)


# ------------------------------------------------------------------------------------------
# column statistics once lse is known: received (column sums) and weight rows


@triton.jit
def _received_inner(rec, k, bias2, Q_BASE, LSE_BASE, W_BASE, stride_qm, stride_qd, stride_wm, stride_wt, cols,
                    offs_d, offs_t, start, end, NQ, NK, D, T, qk_scale, OFFSET, LEFT, RIGHT, BLOCK_M: tl.constexpr,
                    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                    cap_in, cap_out, slope2,
                    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                    WEIGHTED: tl.constexpr, DOT_PREC: tl.constexpr):
    for start_m in range(start, end, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + tl.arange(0, BLOCK_M)
        rmask = rows < NQ
        q = _load_tile(Q_BASE, rows, offs_d, stride_qm, stride_qd, NQ, D, True)
        lse2 = _load_lse2(LSE_BASE, rows, rmask)
        st, dcap = _scores_t(k, q, bias2, rows, cols, NQ, NK, qk_scale, OFFSET, LEFT, RIGHT, MASKED, HAS_LEFT,
        HAS_RIGHT,
                       HAS_BIAS, cap_in, cap_out, slope2, HAS_SOFTCAP, HAS_ALIBI, DOT_PREC)
        pt = tl.math.exp2(st - lse2[None, :])  # P^T (BLOCK_N, BLOCK_M)
        if WEIGHTED:  # rec (BLOCK_N, BLOCK_T) += P^T W
            w = _load_tile(W_BASE, rows, offs_t, stride_wm, stride_wt, NQ, T, True)
            rec = tl.dot(pt, w, rec, input_precision="ieee")
        else:
            rec += tl.sum(pt, 1)
    return rec


@triton.jit
def attn_received_kernel(Q, K, BIAS, LSE, W, REC,
                         stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                         stride_bb, stride_bh, stride_bn, stride_wb, stride_wh, stride_wm, stride_wt,
                         HQ, GROUP, NQ, NK, D, T, qk_scale, OFFSET, LEFT, RIGHT, SLOPES, stride_slb, stride_slh,
                         cap_in, cap_out, SEQ, stride_seq,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
                         HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                         HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                         WEIGHTED: tl.constexpr, HAS_SEQLENS: tl.constexpr, DOT_PREC: tl.constexpr):
    """REC[b, h, j] = Σ_i 2^(s2_ij - lse2_i), or with WEIGHTED, REC[b, h, j, t] = Σ_i 2^(s2_ij - lse2_i) W[b, h, i, t]
    (``Pᵀ W``): one program per key tile loops over query tiles (no atomics)."""
    start_n = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // HQ).to(tl.int64)
    nq, nk, off = _seq_geometry(SEQ, stride_seq, off_b, NQ, NK, OFFSET, HAS_SEQLENS)
    off_h = (off_bh % HQ).to(tl.int64)
    off_kh = off_h // GROUP
    slope2 = _load_slope2(SLOPES, off_b, off_h, stride_slb, stride_slh, HAS_ALIBI)
    col0 = start_n * BLOCK_N
    cols = col0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, BLOCK_T)
    k = _load_tile(K + off_b * stride_kb + off_kh * stride_kh, cols, offs_d, stride_kn, stride_kd, NK, D, True)
    bias2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_BIAS:
        bias2 = _key_bias2(BIAS + off_b * stride_bb + off_h * stride_bh, cols, stride_bn, NK)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    lse_base = LSE + off_bh.to(tl.int64) * NQ
    w_base = W + off_b * stride_wb + off_h * stride_wh
    if WEIGHTED:
        rec = tl.zeros([BLOCK_N, BLOCK_T], dtype=tl.float32)
    else:
        rec = tl.zeros([BLOCK_N], dtype=tl.float32)
    lo, fl, fh, hi = _query_bounds(col0, nq, nk, off, LEFT, RIGHT, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT,
                                 HAS_SEQLENS)
    rec = _received_inner(rec, k, bias2, q_base, lse_base, w_base, stride_qm, stride_qd, stride_wm, stride_wt, cols,
                          offs_d, offs_t, lo, fl, nq, nk, D, T, qk_scale, off, LEFT, RIGHT, BLOCK_M, True, HAS_LEFT,
                          HAS_RIGHT, HAS_BIAS, cap_in, cap_out, slope2, HAS_SOFTCAP, HAS_ALIBI, WEIGHTED, DOT_PREC)
    rec = _received_inner(rec, k, bias2, q_base, lse_base, w_base, stride_qm, stride_qd, stride_wm, stride_wt, cols,
                          offs_d, offs_t, fl, fh, nq, nk, D, T, qk_scale, off, LEFT, RIGHT, BLOCK_M, False, HAS_LEFT,
                          HAS_RIGHT, HAS_BIAS, cap_in, cap_out, slope2, HAS_SOFTCAP, HAS_ALIBI, WEIGHTED, DOT_PREC)
    rec = _received_inner(rec, k, bias2, q_base, lse_base, w_base, stride_qm, stride_qd, stride_wm, stride_wt, cols,
                          offs_d, offs_t, fh, hi, nq, nk, D, T, qk_scale, off, LEFT, RIGHT, BLOCK_M, True, HAS_LEFT,
                          HAS_RIGHT, HAS_BIAS, cap_in, cap_out, slope2, HAS_SOFTCAP, HAS_ALIBI, WEIGHTED, DOT_PREC)
    if WEIGHTED:
        r_ptrs = REC + (off_bh.to(tl.int64) * NK + cols[:, None]) * T + offs_t[None, :]
        tl.store(r_ptrs, rec, mask=(cols[:, None] < NK) & (offs_t[None, :] < T))
    else:
        tl.store(REC + off_bh.to(tl.int64) * NK + cols, rec, mask=cols < NK)


@triton.jit
def attn_weights_kernel(Q, K, BIAS, LSE, ROWS, W,
                        stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                        stride_bb, stride_bh, stride_bn,
                        HQ, GROUP, NQ, NK, D, R, qk_scale, OFFSET, LEFT, RIGHT, SLOPES, stride_slb, stride_slh,
                        cap_in, cap_out, SEQ, stride_seq,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                        HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                        HAS_SEQLENS: tl.constexpr, DOT_PREC: tl.constexpr):
    """W[b, h, r, j] = weight of query ROWS[r] on key j, from the final lse (one (row block, key tile) each)."""
    start_r = tl.program_id(0)
    start_n = tl.program_id(1)
    off_bh = tl.program_id(2)
    off_b = (off_bh // HQ).to(tl.int64)
    nq, nk, off = _seq_geometry(SEQ, stride_seq, off_b, NQ, NK, OFFSET, HAS_SEQLENS)
    off_h = (off_bh % HQ).to(tl.int64)
    off_kh = off_h // GROUP
    slope2 = _load_slope2(SLOPES, off_b, off_h, stride_slb, stride_slh, HAS_ALIBI)
    slots = start_r * BLOCK_M + tl.arange(0, BLOCK_M)
    smask = slots < R
    rows = tl.load(ROWS + slots, mask=smask, other=0)
    cols = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=smask[:, None] & (offs_d[None, :] < D), other=0.0)
    k = _load_tile(K + off_b * stride_kb + off_kh * stride_kh, cols, offs_d, stride_kn, stride_kd, NK, D, True)
    lmask = smask
    if HAS_SEQLENS:  # padded rows: lse read as +inf, weights 0
        lmask = lmask & (rows < nq)
    lse2 = _load_lse2(LSE + off_bh.to(tl.int64) * NQ, rows, lmask)
    s, _ = _scores(q, k, BIAS + off_b * stride_bb + off_h * stride_bh, stride_bn, rows, cols, nq, nk, qk_scale, off,
                LEFT, RIGHT, True, HAS_LEFT, HAS_RIGHT, HAS_BIAS, cap_in, cap_out, slope2, HAS_SOFTCAP, HAS_ALIBI,
                DOT_PREC)
    p = tl.math.exp2(s - lse2[:, None])  # 0 outside the band (s = -inf) and on dead rows (lse2 = +inf)
    w_ptrs = W + (off_bh.to(tl.int64) * R + slots[:, None]) * NK + cols[None, :]
    tl.store(w_ptrs, p, mask=smask[:, None] & (cols[None, :] < NK))


# ------------------------------------------------------------------------------------------
# backward (FlashAttention-2): D_i = rowsum(dO ∘ O); dK/dV per key tile; dQ per query tile


@triton.jit
def attn_bwd_preprocess_kernel(OUT, DO, DELTA, stride_ob, stride_oh, stride_om, stride_od,
                               stride_db, stride_dh, stride_dm, stride_dd, HQ, NQ, DV,
                               BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // HQ).to(tl.int64)
    off_h = (off_bh % HQ).to(tl.int64)
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (rows[:, None] < NQ) & (offs_dv[None, :] < DV)
    o = tl.load(OUT + off_b * stride_ob + off_h * stride_oh + rows[:, None] * stride_om + offs_dv[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_db + off_h * stride_dh + rows[:, None] * stride_dm + offs_dv[None, :] * stride_dd,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + off_bh.to(tl.int64) * NQ + rows, tl.sum(o * do, 1), mask=rows < NQ)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, bias2, Q_BASE, DO_BASE, LSE_BASE, DELTA_BASE, stride_qm, stride_qd,
                    stride_dm, stride_dd, cols, offs_d, offs_dv, start, end, NQ, NK, D, DV, qk_scale, OFFSET, LEFT,
                    RIGHT,
                    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                    HAS_BIAS: tl.constexpr, cap_in, cap_out, slope2,
                    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, DOT_PREC: tl.constexpr):
    for start_m in range(start, end, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + tl.arange(0, BLOCK_M)
        rmask = rows < NQ
        q = _load_tile(Q_BASE, rows, offs_d, stride_qm, stride_qd, NQ, D, True)
        do = _load_tile(DO_BASE, rows, offs_dv, stride_dm, stride_dd, NQ, DV, True)
        lse2 = _load_lse2(LSE_BASE, rows, rmask)
        delta = tl.load(DELTA_BASE + rows, mask=rmask, other=0.0)
        st, dcap = _scores_t(k, q, bias2, rows, cols, NQ, NK, qk_scale, OFFSET, LEFT, RIGHT, MASKED, HAS_LEFT,
        HAS_RIGHT,
                       HAS_BIAS, cap_in, cap_out, slope2, HAS_SOFTCAP, HAS_ALIBI, DOT_PREC)
        pt = tl.math.exp2(st - lse2[None, :])  # P^T, recomputed from the saved lse
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dst = pt * (dpt - delta[None, :])
        if HAS_SOFTCAP:
            dst = dst * dcap  # through c·tanh(x/c)
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def attn_bwd_dkdv_kernel(Q, K, V, BIAS, DO, LSE, DELTA, DK, DV_,
                         stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                         stride_vb, stride_vh, stride_vn, stride_vd, stride_bb, stride_bh, stride_bn,
                         stride_db, stride_dh, stride_dm, stride_dd,
                         stride_dkb, stride_dkh, stride_dkn, stride_dkd, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                         HQ, HKV, GROUP, NQ, NK, D, DV, scale, qk_scale, OFFSET, LEFT, RIGHT, SLOPES, stride_slb,
                         stride_slh, cap_in, cap_out, SEQ, stride_seq,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                         HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                         HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                         HAS_SEQLENS: tl.constexpr, DOT_PREC: tl.constexpr):
    """One program = one key tile of one (batch, kv head); sums over the GROUP query heads that share it."""
    start_n = tl.program_id(0)
    off_bkh = tl.program_id(1)
    off_b = (off_bkh // HKV).to(tl.int64)
    nq, nk, off = _seq_geometry(SEQ, stride_seq, off_b, NQ, NK, OFFSET, HAS_SEQLENS)
    off_kh = (off_bkh % HKV).to(tl.int64)
    col0 = start_n * BLOCK_N
    cols = col0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    cmask = cols < NK
    k = _load_tile(K + off_b * stride_kb + off_kh * stride_kh, cols, offs_d, stride_kn, stride_kd, NK, D, True)
    v = _load_tile(V + off_b * stride_vb + off_kh * stride_vh, cols, offs_dv, stride_vn, stride_vd, NK, DV, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    lo, fl, fh, hi = _query_bounds(col0, nq, nk, off, LEFT, RIGHT, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT,
                                 HAS_SEQLENS)
    for g in range(0, GROUP):
        off_h = off_kh * GROUP + g
        slope2 = _load_slope2(SLOPES, off_b, off_h, stride_slb, stride_slh, HAS_ALIBI)
        off_bh = off_b * HQ + off_h
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_db + off_h * stride_dh
        lse_base = LSE + off_bh * NQ
        delta_base = DELTA + off_bh * NQ
        bias2 = tl.zeros([BLOCK_N], dtype=tl.float32)
        if HAS_BIAS:
            bias2 = _key_bias2(BIAS + off_b * stride_bb + off_h * stride_bh, cols, stride_bn, NK)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, bias2, q_base, do_base, lse_base, delta_base, stride_qm, stride_qd,
                                 stride_dm, stride_dd, cols, offs_d, offs_dv, lo, fl, NQ, NK, D, DV, qk_scale, off,
                                 LEFT, RIGHT, BLOCK_M, True, HAS_LEFT, HAS_RIGHT, HAS_BIAS, cap_in, cap_out, slope2,
                                 HAS_SOFTCAP, HAS_ALIBI, DOT_PREC)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, bias2, q_base, do_base, lse_base, delta_base, stride_qm, stride_qd,
                                 stride_dm, stride_dd, cols, offs_d, offs_dv, fl, fh, NQ, NK, D, DV, qk_scale, off,
                                 LEFT, RIGHT, BLOCK_M, False, HAS_LEFT, HAS_RIGHT, HAS_BIAS, cap_in, cap_out, slope2,
                                 HAS_SOFTCAP, HAS_ALIBI, DOT_PREC)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, bias2, q_base, do_base, lse_base, delta_base, stride_qm, stride_qd,
                                 stride_dm, stride_dd, cols, offs_d, offs_dv, fh, hi, NQ, NK, D, DV, qk_scale, off,
                                 LEFT, RIGHT, BLOCK_M, True, HAS_LEFT, HAS_RIGHT, HAS_BIAS, cap_in, cap_out, slope2,
                                 HAS_SOFTCAP, HAS_ALIBI, DOT_PREC)
    dk = dk * scale
    if HAS_SEQLENS:  # the loops bound rows and keys by NQ, NK (fewer live registers: sm_80 spilled with nq, nk):
        # padded rows weigh 0 through their saved lse (-inf); padded keys' columns are zeroed here
        real = cols[:, None] < tl.load(SEQ + stride_seq + off_b)
        dk = tl.where(real, dk, 0.0)
        dv = tl.where(real, dv, 0.0)
    dk_ptrs = DK + off_b * stride_dkb + off_kh * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    dk_mask = cmask[:, None] & (offs_d[None, :] < D)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=dk_mask)
    dv_ptrs = DV_ + off_b * stride_dvb + off_kh * stride_dvh + cols[:, None] * stride_dvn + offs_dv[None,
    :] * stride_dvd
    dv_mask = cmask[:, None] & (offs_dv[None, :] < DV)
    tl.store(dv_ptrs, dv.to(DV_.dtype.element_ty), mask=dv_mask)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, K_BASE, V_BASE, BIAS_BASE, stride_kn, stride_kd, stride_vn, stride_vd,
                  stride_bn, rows, offs_d, offs_dv, start, end, NQ, NK, D, DV, qk_scale, OFFSET, LEFT, RIGHT,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                  HAS_BIAS: tl.constexpr, cap_in, cap_out, slope2,
                  HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        k = _load_tile(K_BASE, cols, offs_d, stride_kn, stride_kd, NK, D, MASKED)
        v = _load_tile(V_BASE, cols, offs_dv, stride_vn, stride_vd, NK, DV, MASKED)
        s, dcap = _scores(q, k, BIAS_BASE, stride_bn, rows, cols, NQ, NK, qk_scale, OFFSET, LEFT, RIGHT, MASKED,
        HAS_LEFT,
                    HAS_RIGHT, HAS_BIAS, cap_in, cap_out, slope2, HAS_SOFTCAP, HAS_ALIBI, DOT_PREC)
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * dcap  # through c·tanh(x/c)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def attn_bwd_dq_kernel(Q, K, V, BIAS, DO, LSE, DELTA, DQ,
                       stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                       stride_vb, stride_vh, stride_vn, stride_vd, stride_bb, stride_bh, stride_bn,
                       stride_db, stride_dh, stride_dm, stride_dd, stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                       HQ, GROUP, NQ, NK, D, DV, scale, qk_scale, OFFSET, LEFT, RIGHT, SLOPES, stride_slb, stride_slh,
                       cap_in, cap_out, SEQ, stride_seq,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                       HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                       HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                       HAS_SEQLENS: tl.constexpr, DOT_PREC: tl.constexpr):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // HQ).to(tl.int64)
    nq, nk, off = _seq_geometry(SEQ, stride_seq, off_b, NQ, NK, OFFSET, HAS_SEQLENS)
    off_h = (off_bh % HQ).to(tl.int64)
    off_kh = off_h // GROUP
    slope2 = _load_slope2(SLOPES, off_b, off_h, stride_slb, stride_slh, HAS_ALIBI)
    row0 = start_m * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < NQ
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(Q + off_b * stride_qb + off_h * stride_qh, rows, offs_d, stride_qm, stride_qd, NQ, D, True)
    do = _load_tile(DO + off_b * stride_db + off_h * stride_dh, rows, offs_dv, stride_dm, stride_dd, NQ, DV, True)
    stat_base = off_bh.to(tl.int64) * NQ
    lmask = rmask
    if HAS_SEQLENS:  # padded rows: lse read as +inf, so their weights and dq are 0 whatever lse is passed
        lmask = lmask & (rows < nq)
    lse2 = _load_lse2(LSE + stat_base, rows, lmask)
    delta = tl.load(DELTA + stat_base + rows, mask=rmask, other=0.0)
    k_base = K + off_b * stride_kb + off_kh * stride_kh
    v_base = V + off_b * stride_vb + off_kh * stride_vh
    bias_base = BIAS + off_b * stride_bb + off_h * stride_bh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, fl, fh, hi = _key_bounds(row0, nq, nk, off, LEFT, RIGHT, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT,
                                 HAS_SEQLENS)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, bias_base, stride_kn, stride_kd, stride_vn, stride_vd,
                       stride_bn, rows, offs_d, offs_dv, lo, fl, nq, nk, D, DV, qk_scale, off, LEFT, RIGHT,
                       BLOCK_N, True, HAS_LEFT, HAS_RIGHT, HAS_BIAS, cap_in, cap_out, slope2, HAS_SOFTCAP, HAS_ALIBI,
                       DOT_PREC)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, bias_base, stride_kn, stride_kd, stride_vn, stride_vd,
                       stride_bn, rows, offs_d, offs_dv, fl, fh, nq, nk, D, DV, qk_scale, off, LEFT, RIGHT,
                       BLOCK_N, False, HAS_LEFT, HAS_RIGHT, HAS_BIAS, cap_in, cap_out, slope2, HAS_SOFTCAP, HAS_ALIBI,
                       DOT_PREC)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, bias_base, stride_kn, stride_kd, stride_vn, stride_vd,
                       stride_bn, rows, offs_d, offs_dv, fh, hi, nq, nk, D, DV, qk_scale, off, LEFT, RIGHT,
                       BLOCK_N, True, HAS_LEFT, HAS_RIGHT, HAS_BIAS, cap_in, cap_out, slope2, HAS_SOFTCAP, HAS_ALIBI,
                       DOT_PREC)
    dq = dq * scale
    dq_ptrs = DQ + off_b * stride_dqb + off_h * stride_dqh + rows[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    dq_mask = rmask[:, None] & (offs_d[None, :] < D)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=dq_mask)
