/* attnlens: exact attention and its lens on the CPU in one fused, tiled kernel (float32 compute).
 *
 * Three entry points on one argument block (`Args`, mirrored by fused.py's ctypes structure):
 *
 *   attnlens_fused_forward   per query tile (the G query heads of one key/value head × a few positions), over
 *                            the key tiles its band can see, with online softmax (running max m, sum l):
 *                            out, lse, max weight (1/l), entropy (running t = Σ e·(s − m), rescaled with the
 *                            max), top-k (a sorted list per row, k <= 64, a key vector scanned only when it
 *                            holds a score above the k-th) and the sink weight — in the same loop; and, when
 *                            asked, received: the tile's weights stay in a per-thread buffer (rows × keys seen)
 *                            and are summed per column once the rows' m and l are final (no second Q·Kᵀ).
 *   attnlens_fused_columns   with a known lse, key-tile-major: each work item owns a range of keys and runs
 *                            every query row that sees it, so the column accumulators stay in cache:
 *                            received (Σ_i P_ij), Pᵀ W, pooled block sums, and weight rows for chosen queries.
 *   attnlens_fused_backward  flash-style: per key tile, every query row that sees it recomputes P = exp(s − lse),
 *                            dV += Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP − Δ) with Δ = rowsum(dO ∘ O) − dlse,
 *                            dK += dSᵀ Q, dQ += dS K — added into
 *                            the caller's float32 buffers; the G query heads of a key/value head add into one
 *                            dK, dV tile (GQA without copies).
 *
 * Scores: s = (q·k)·scale; softcap c: s = c·tanh(s/c); ALiBi: s −= slope·|i + offset − j|; a float mask is added;
 * then keys outside the band (causal / window around i + offset), False in a bool mask or −inf in a float mask are
 * −inf (no finite sentinel). A row that sees no key: out 0, lse −inf. With `check` (the caller found that scores
 * may be non-finite), a row with a visible non-finite score is NaN in every field (the NaN/inf rule of
 * attnlens.reference). A value row holding NaN/inf reaches only the rows that give its key a weight > 0.
 *
 * q, k, v are read through their strides in float32, float16 or bfloat16 and packed once per call in float32:
 * q scaled, K transposed per key tile of BK keys (the inner loop runs over keys), V with rows padded to 16.
 * SIMD: GCC vector extensions of 16 floats (any x86-64, ARM); AVX-512 intrinsics only when asked (see below); on
 * AVX2 + FMA without them, the per-score work (online_row, col_exp, col_wsum) on 8-float AVX2 registers, lane for lane
 * what the generic path computes (benchmarks/results/cpu-2026-12-03.md, "After").
 * OpenMP shares PyTorch's runtime and thread count. Built on first use by fused.py through native.py. */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BK 64               /* keys per tile (a multiple of 16) */
#define NVK (BK / 16)       /* vectors per tile row */
#define RQ 6                /* query rows per S = Q Kᵀ call of mk_qk (the register blocks without AVX-512 are 6 rows) */
#define RT 48               /* target rows of a forward query tile (a multiple of 12) */
#define MAXK 64             /* largest top-k */
#define EXP_LO (-87.0f)     /* exp(x) for x below is 0 (below FLT_MIN), as rowsoftmax.c */

/* ---------------------------------------------------------------------------------------------------------
 * SIMD: 16 float32 lanes. The AVX-512 intrinsics path is compiled only with -DATTNLENS_FUSED_AVX512 on a target
 * that has AVX-512F: it has not yet run on AVX-512 hardware under the tests (the machine this was written on has
 * AVX2), so by default every target builds the portable path, which the tests check. */
#if defined(__AVX512F__) && defined(ATTNLENS_FUSED_AVX512)
#define FUSED_AVX512 1
#else
#define FUSED_AVX512 0
#endif
#if FUSED_AVX512
#include <immintrin.h>
typedef __m512 vf;
typedef __mmask16 vm;
static inline vf vzero(void) { return _mm512_setzero_ps(); }
static inline vf vld(const float *p) { return _mm512_loadu_ps(p); }
static inline vf vldz(vm m, const float *p) { return _mm512_maskz_loadu_ps(m, p); }
static inline vf vldf(vm m, const float *p, float fill) { return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), m, p); }
static inline void vst(float *p, vf x) { _mm512_storeu_ps(p, x); }
static inline void vstm(float *p, vm m, vf x) { _mm512_mask_storeu_ps(p, m, x); }
static inline vf vset(float x) { return _mm512_set1_ps(x); }
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); } /* b where either is NaN */
static inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); } /* b where either is NaN */
static inline vf vabs(vf a) { return _mm512_abs_ps(a); }
static inline vm vlt(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
static inline vm vgt(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
static inline vm vne(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_NEQ_UQ); } /* NaN: not equal */
static inline vm vnonfinite(vf a) { return _mm512_fpclass_ps_mask(a, 0x99); }      /* NaN, +inf, -inf */
static inline vf vsel(vm m, vf a, vf b) { return _mm512_mask_blend_ps(m, b, a); }  /* m ? a : b */
static inline vf vmaskz(vm m, vf a) { return _mm512_maskz_mov_ps(m, a); }
static inline float vhmax(vf a) { return _mm512_reduce_max_ps(a); }
static inline float vhsum(vf a) { return _mm512_reduce_add_ps(a); }
static inline vf viota(void) { return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
/* 2^n · y for integral n in [-127, 127] */
static inline vf vscale2(vf y, vf n) { return _mm512_scalef_ps(y, n); }
static inline vf vround(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
#if defined(__AVX512BW__) && defined(__AVX512VL__)
static inline vm vbytes(const uint8_t *p, vm valid) {
    __m128i x = _mm_maskz_loadu_epi8(valid, p);
    return _mm_test_epi8_mask(x, x);
}
#else
static inline vm vbytes(const uint8_t *p, vm valid) {
    vm r = 0;
    for (int l = 0; l < 16; ++l) r |= (vm)((valid >> l & 1) && p[l] ? 1u << l : 0u);
    return r;
}
#endif
#else /* portable: GCC/Clang vector extensions, lowered to whatever the target has */
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vm;
static const vi LANEBIT = {1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5, 1 << 6, 1 << 7,
                           1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12, 1 << 13, 1 << 14, 1 << 15};
#if defined(__AVX__)
#include <immintrin.h>
/* the sign bits of the two 8-lane halves (vmovmskps): the per-lane loop below costs ~16 scalar extractions */
static inline vm vbits(vi c) {
    __m256 lo, hi;
    memcpy(&lo, &c, 32);
    memcpy(&hi, (const char *)&c + 32, 32);
    return (vm)_mm256_movemask_ps(lo) | (vm)_mm256_movemask_ps(hi) << 8;
}
#else
static inline vm vbits(vi c) {
    vm r = 0;
    for (int l = 0; l < 16; ++l) r |= c[l] ? 1u << l : 0u;
    return r;
}
#endif
static inline vi vlanes(vm m) { return (LANEBIT & (int32_t)m) != 0; }
static inline vf vzero(void) { vf r = {0}; return r; }
static inline vf vld(const float *p) { vf r; memcpy(&r, p, sizeof r); return r; }
static inline vf vldz(vm m, const float *p) {
    vf r = vzero();
    for (int l = 0; l < 16; ++l) if (m >> l & 1) r[l] = p[l];
    return r;
}
static inline vf vldf(vm m, const float *p, float fill) {
    if (m == 0xffff) return vld(p);
    vf r = vzero() + fill;
    for (int l = 0; l < 16; ++l) if (m >> l & 1) r[l] = p[l];
    return r;
}
static inline void vst(float *p, vf x) { memcpy(p, &x, sizeof x); }
static inline void vstm(float *p, vm m, vf x) { for (int l = 0; l < 16; ++l) if (m >> l & 1) p[l] = x[l]; }
static inline vf vset(float x) { return vzero() + x; }
static inline vf vadd(vf a, vf b) { return a + b; }
static inline vf vsub(vf a, vf b) { return a - b; }
static inline vf vmul(vf a, vf b) { return a * b; }
static inline vf vdiv(vf a, vf b) { return a / b; }
static inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
static inline vf vsel(vm m, vf a, vf b) { vi k = vlanes(m); return (vf)(((vi)a & k) | ((vi)b & ~k)); }
static inline vf vselv(vi k, vf a, vf b) { return (vf)(((vi)a & k) | ((vi)b & ~k)); }
static inline vf vmax(vf a, vf b) { return vselv(a > b, a, b); }
static inline vf vmin(vf a, vf b) { return vselv(a < b, a, b); }
static inline vf vabs(vf a) { return (vf)((vi)a & 0x7fffffff); }
static inline vm vlt(vf a, vf b) { return vbits(a < b); }
static inline vm vgt(vf a, vf b) { return vbits(a > b); }
static inline vm vne(vf a, vf b) { return vbits(~(a == b)); }
static inline vm vnonfinite(vf a) { return vbits(((vi)a & 0x7f800000) == 0x7f800000); }
static inline vf vmaskz(vm m, vf a) { return vsel(m, a, vzero()); }
static inline float vhmax(vf a) { float r = a[0]; for (int l = 1; l < 16; ++l) r = a[l] > r ? a[l] : r; return r; }
static inline float vhsum(vf a) { float r = 0; for (int l = 0; l < 16; ++l) r += a[l]; return r; }
static inline vf viota(void) { vf r = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}; return r; }
static inline vf vround(vf x) { /* to nearest, halves away from zero */
    vf half = (vf)(((vi)x & (int32_t)0x80000000) | (vi)(vzero() + 0.5f));
    return __builtin_convertvector(__builtin_convertvector(x + half, vi), vf);
}
static inline vf vscale2(vf y, vf n) {
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    return y * (vf)e;
}
static inline vm vbytes(const uint8_t *p, vm valid) {
    vm r = 0;
    for (int l = 0; l < 16; ++l) r |= (vm)((valid >> l & 1) && p[l] ? 1u << l : 0u);
    return r;
}
#endif

static inline vm lanes_below(int64_t n) { /* lanes l < n */
    return n >= 16 ? (vm)0xffff : n <= 0 ? (vm)0 : (vm)((1u << n) - 1u);
}
static inline vm lanes_in(int64_t a, int64_t b) { return lanes_below(b) & (vm)~lanes_below(a); } /* a <= l < b */

/* exp(x); 0 below EXP_LO (and for -inf); NaN stays NaN. Range reduction x = n ln2 + r (Cody-Waite, |r| <= ln2/2),
 * exp(r) by Cephes' degree-6 polynomial (~1 ulp) in Horner form, then 2^n. */
#if FUSED_AVX512
static inline vf vexp(vf x) { /* scalef gives 2^n for any n (inf above the range); -inf lanes are zeroed by the mask */
    const vm live = _mm512_cmp_ps_mask(x, vset(EXP_LO), _CMP_NLT_UQ); /* x >= EXP_LO or NaN */
    const vf n = vround(vmul(x, vset(1.44269504088896341f)));
    vf r = vfma(n, vset(-0.693359375f), x);
    r = vfma(n, vset(2.12194440e-4f), r);
    vf y = vfma(vset(1.9875691500e-4f), r, vset(1.3981999507e-3f));
    y = vfma(y, r, vset(8.3334519073e-3f));
    y = vfma(y, r, vset(4.1665795894e-2f));
    y = vfma(y, r, vset(1.6666665459e-1f));
    y = vfma(y, r, vset(5.0000001201e-1f));
    y = vfma(y, r, vset(1.0f));
    y = vfma(y, r, vset(1.0f));
    return _mm512_maskz_scalef_ps(live, y, n);
}
#else
static inline vf vexp(vf x) {
    const vi under = x < vset(EXP_LO); /* a lane mask, not bits: no round trip through vbits / vlanes */
    vf xc = vmin(vset(88.0f), vmax(vset(EXP_LO), x)); /* constant first: NaN passes through */
    vf n = vround(vmul(xc, vset(1.44269504088896341f)));
    vf r = vfma(n, vset(-0.693359375f), xc);
    r = vfma(n, vset(2.12194440e-4f), r);
    vf y = vfma(vset(1.9875691500e-4f), r, vset(1.3981999507e-3f));
    y = vfma(y, r, vset(8.3334519073e-3f));
    y = vfma(y, r, vset(4.1665795894e-2f));
    y = vfma(y, r, vset(1.6666665459e-1f));
    y = vfma(y, r, vset(5.0000001201e-1f));
    y = vfma(y, r, vset(1.0f));
    y = vfma(y, r, vset(1.0f));
    return vselv(under, vzero(), vscale2(y, n));
}
#endif

/* tanh(x) by Eigen's rational approximation (float, a few ulp; |x| > 9 gives ±1); NaN stays NaN. */
static inline vf vtanh(vf x) {
    vf xc = vmin(vset(9.0f), vmax(vset(-9.0f), x));
    vf x2 = vmul(xc, xc);
    vf p = vfma(x2, vset(-2.76076847742355e-16f), vset(2.00018790482477e-13f));
    p = vfma(x2, p, vset(-8.60467152213735e-11f));
    p = vfma(x2, p, vset(5.12229709037114e-08f));
    p = vfma(x2, p, vset(1.48572235717979e-05f));
    p = vfma(x2, p, vset(6.37261928875436e-04f));
    p = vfma(x2, p, vset(4.89352455891786e-03f));
    p = vmul(xc, p);
    vf q = vfma(x2, vset(1.19825839466702e-06f), vset(1.18534705686654e-04f));
    q = vfma(x2, q, vset(2.26843463243900e-03f));
    q = vfma(x2, q, vset(4.89352518554385e-03f));
    vf t = vdiv(p, q);
#if FUSED_AVX512
    return vsel(vlt(vabs(xc), vset(4e-4f)), xc, t);
#else
    return vselv(vabs(xc) < vset(4e-4f), xc, t);
#endif
}

/* which SIMD path this library was built with */
const char *attnlens_fused_isa(void) {
#if FUSED_AVX512
    return "avx512";
#else
    return "vector extensions";
#endif
}

/* ---------------------------------------------------------------------------------------------------------
 * the argument block (fused.py: _Args) */
typedef struct {
    int64_t B, Hq, Hkv, Nq, Nk, D, Dv;
    const void *q, *k, *v;
    int64_t sq[4], sk[4], sv[4];
    int32_t dtype;   /* q, k, v (and dout, out): 0 float32, 1 float16, 2 bfloat16 */
    int32_t causal;
    float scale;     /* of q·k */
    float softcap;   /* 0: none */
    int64_t offset;  /* query i sits at key position i + offset */
    int64_t win_left, win_right; /* -1: unbounded */
    const void *mask;
    int32_t mask_kind; /* 0 none, 1 bool (uint8), 2 float32 */
    int32_t check;     /* scores may be non-finite */
    int64_t sm[4];     /* mask strides over (B, Hq, Nq, Nk), 0 where broadcast; sm[3] is 0 or 1 */
    const float *alibi;
    int64_t alibi_sb;  /* slope of (b, h): alibi[b·sb + h] */
    const float *sinks;
    int64_t sinks_sb;
    int32_t nthreads;
    int32_t topk;
    /* forward: contiguous float32 outputs (NULL: not asked); topk_i int64 */
    float *out, *lse, *maxw, *ent, *sinkw, *topk_w;
    int64_t *topk_i;
    /* columns: lse_in (B, Hq, Nq) contiguous; outputs contiguous, zero-filled by the caller */
    const float *lse_in;
    float *received;            /* (B, Hq, Nk) */
    float *rf;                  /* (B, Hq, Nk, T) = Pᵀ W */
    const float *w;             /* W (B|1, Hq|1, Nq, T) through sw */
    int64_t sw[4], T;
    float *pooled;              /* (B, Hq, ceil(Nq/bq), ceil(Nk/bk)) */
    int64_t bq, bk;
    float *wrows;               /* (B, Hq, nwrows, Nk) */
    const int64_t *wpos;        /* (Nq,): place of query i in wrows, or -1 */
    int64_t nwrows;
    const int64_t *rowlist;     /* sorted query indices to run when only weight rows are asked, else NULL */
    int64_t nrowlist;
    /* backward: dout and out in q's dtype through their strides; dq, dk, dv contiguous float32, added into */
    const void *dout, *outp;
    int64_t sdo[4], so[4];
    float *dq, *dk, *dv;
    const float *dlse;          /* backward: (B, Hq, Nq) contiguous, the lse's own gradient, or NULL */
    float *lse_delta;           /* forward (optional): (B, Hq, Nq) the lse's rounding, (m - lse) + log l */
    const float *rowd;          /* columns, backward (optional): (B, Hq, Nq) weights are exp(s - lse - rowd) */
} Args;

/* ---------------------------------------------------------------------------------------------------------
 * reading inputs */
static inline float ld1(const void *p, int64_t i, int32_t dt) {
    if (dt == 0) return ((const float *)p)[i];
    if (dt == 1) return (float)((const _Float16 *)p)[i];
    uint32_t b = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

/* n elements at stride st from x (of dtype dt) into dst as float32, times mul */
static void load_row(float *dst, const void *x, int64_t base, int64_t st, int64_t n, int32_t dt, float mul) {
    if (dt == 0 && st == 1) {
        const float *s = (const float *)x + base;
        for (int64_t c = 0; c < n; ++c) dst[c] = s[c] * mul;
    } else {
        for (int64_t c = 0; c < n; ++c) dst[c] = ld1(x, base + c * st, dt) * mul;
    }
}

static inline int64_t rup16(int64_t n) { return (n + 15) / 16 * 16; }
static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

static void *amalloc(size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, 64, n ? n : 64) != 0) return NULL;
    return p;
}

/* the keys [lo, hi) query i may see by causal / window (within [0, Nk)) */
static inline void band(const Args *a, int64_t i, int64_t *lo, int64_t *hi) {
    int64_t pos = i + a->offset, right = a->win_right;
    if (a->causal) right = right < 0 ? 0 : imin(right, 0);
    int64_t l = a->win_left < 0 ? 0 : imin(a->Nk, imax(0, pos - a->win_left));
    int64_t h = right < 0 ? a->Nk : imax(0, imin(a->Nk, pos + right + 1));
    *lo = l;
    *hi = h < l ? l : h;
}

/* the query rows [r0, r1) whose band reaches keys [j0, j1) (rows see ranges that move right with i) */
static void rows_of_keys(const Args *a, int64_t j0, int64_t j1, int64_t *r0, int64_t *r1) {
    int64_t right = a->win_right;
    if (a->causal) right = right < 0 ? 0 : imin(right, 0);
    /* hi_i > j0  <=>  i + offset + right + 1 > j0 ;  lo_i < j1  <=>  i + offset - left < j1 */
    int64_t lo = right < 0 ? 0 : j0 - a->offset - right;
    int64_t hi = a->win_left < 0 ? a->Nq : j1 - a->offset + a->win_left;
    *r0 = imax(0, imin(a->Nq, lo));
    *r1 = imax(*r0, imin(a->Nq, hi));
}

/* ---------------------------------------------------------------------------------------------------------
 * packing (once per call, in parallel) */
enum { PACK_FWD = 1, PACK_COL = 2, PACK_BWD = 3 };

typedef struct {
    float *qs;      /* (B, Hq, Nq, Dp): q · qscale, rows padded with zeros */
    float *kt;      /* (B, Hkv, nt, D, BK): K transposed per tile, zero past Nk */
    float *vp;      /* forward: (B, Hkv, Nk, Dvp) V, rows with NaN/inf zeroed (kept in vbad); or V itself (vborrowed) */
    int vborrowed;  /* vp is the caller's V: float32, contiguous, Dv a multiple of 16, every value finite */
    uint8_t *vbad;  /* forward: (B, Hkv, Nk): the value row holds NaN/inf */
    uint8_t *tbad;  /* forward: (B, Hkv, nt): a tile holds such a row */
    float *kp;      /* backward: (B, Hkv, Nk, Dp) K · scale, rows padded */
    float *vt;      /* backward: (B, Hkv, nt, Dv, BK) V transposed per tile */
    float *dop;     /* backward: (B, Hq, Nq, Dvp) dO, rows padded */
    float *delta;   /* backward: (B, Hq, Nq) rowsum(dO ∘ O) */
    float *zero;    /* a zero row of max(Dp, Dvp) floats, for padding rows */
    int64_t nt, Dp, Dvp;
    float qscale;
} Pack;

static void pack_free(Pack *p) {
    free(p->qs); free(p->kt); if (!p->vborrowed) free(p->vp); free(p->vbad); free(p->tbad); free(p->kp); free(p->vt); free(p->dop);
    free(p->delta); free(p->zero);
    memset(p, 0, sizeof *p);
}

/* V can be read in place (no padded copy: Nk·Dv·4 bytes less per key/value head, 8 MB at 32k keys and Dv = 64):
 * float32, rows of Dv (a multiple of 16) floats one after another, and no NaN/inf (a copy zeroes such rows) */
static int v_borrowable(const Args *a) {
    const int64_t B = a->B, H = a->Hkv, N = a->Nk, Dv = a->Dv;
    if (a->dtype != 0 || Dv % 16 || (Dv > 1 && a->sv[3] != 1) || (N > 1 && a->sv[2] != Dv) ||
        (H > 1 && a->sv[1] != N * Dv) || (B > 1 && a->sv[0] != H * N * Dv))
        return 0;
    const float *v = (const float *)a->v;
    const int64_t n = B * H * N * Dv;
    if (n == 0 || !v) return 0; /* no keys: an empty V may have no storage at all; the copy path handles it */
    int bad = 0;
#pragma omp parallel for reduction(| : bad) num_threads(a->nthreads) schedule(static)
    for (int64_t x = 0; x < n; ++x) bad |= !isfinite(v[x]);
    return !bad;
}

static int pack_alloc(const Args *a, Pack *p, int mode) {
    memset(p, 0, sizeof *p);
    const size_t B = (size_t)a->B, Hq = (size_t)a->Hq, Hkv = (size_t)a->Hkv, Nq = (size_t)a->Nq, Nk = (size_t)a->Nk;
    p->nt = (a->Nk + BK - 1) / BK;
    p->Dp = rup16(a->D);
    p->Dvp = rup16(a->Dv);
    p->qscale = a->softcap > 0 ? a->scale / a->softcap : a->scale;
    const size_t nt = (size_t)p->nt, Dp = (size_t)p->Dp, Dvp = (size_t)p->Dvp, D = (size_t)a->D, Dv = (size_t)a->Dv;
    p->qs = amalloc(B * Hq * Nq * Dp * 4);
    p->kt = amalloc(B * Hkv * nt * D * BK * 4);
    p->zero = amalloc((Dp > Dvp ? Dp : Dvp) * 4);
    if (!p->qs || !p->kt || !p->zero) return -1;
    memset(p->zero, 0, (Dp > Dvp ? Dp : Dvp) * 4);
    if (mode == PACK_FWD) {
        p->vborrowed = v_borrowable(a);
        p->vp = p->vborrowed ? (float *)a->v : amalloc(B * Hkv * Nk * Dvp * 4);
        p->vbad = amalloc(B * Hkv * Nk);
        p->tbad = amalloc(B * Hkv * nt);
        if (!p->vp || !p->vbad || !p->tbad) return -1;
    }
    if (mode == PACK_BWD) {
        p->kp = amalloc(B * Hkv * Nk * Dp * 4);
        p->vt = amalloc(B * Hkv * nt * Dv * BK * 4);
        p->dop = amalloc(B * Hq * Nq * Dvp * 4);
        p->delta = amalloc(B * Hq * Nq * 4);
        if (!p->kp || !p->vt || !p->dop || !p->delta) return -1;
    }
    return 0;
}

/* rows of x (B, H, N, n) through strides st, transposed per tile of BK rows into dst (B, H, nt, n, BK), zeros past N */
static void pack_tiles(float *dst, const void *x, const int64_t *st, int64_t B, int64_t H, int64_t N, int64_t n,
                       int64_t nt, int32_t dt) {
#pragma omp for schedule(static) nowait
    for (int64_t t = 0; t < B * H * nt; ++t) {
        const int64_t tt = t % nt, h = t / nt % H, b = t / (nt * H);
        float *out = dst + t * n * BK, row[256];
        for (int64_t j = 0; j < BK; ++j) {
            const int64_t key = tt * BK + j;
            for (int64_t d0 = 0; d0 < n; d0 += 256) {
                const int64_t m = imin(256, n - d0);
                if (key < N) load_row(row, x, b * st[0] + h * st[1] + key * st[2] + d0 * st[3], st[3], m, dt, 1.0f);
                else memset(row, 0, (size_t)m * 4);
                for (int64_t d = 0; d < m; ++d) out[(d0 + d) * BK + j] = row[d];
            }
        }
    }
}

/* rows of x (B, H, N, n) through strides st into dst (B, H, N, np) times mul, padded with zeros */
static void pack_rows(float *dst, const void *x, const int64_t *st, int64_t B, int64_t H, int64_t N, int64_t n,
                      int64_t np, int32_t dt, float mul) {
#pragma omp for schedule(static) nowait
    for (int64_t r = 0; r < B * H * N; ++r) {
        const int64_t i = r % N, h = r / N % H, b = r / (N * H);
        load_row(dst + r * np, x, b * st[0] + h * st[1] + i * st[2], st[3], n, dt, mul);
        for (int64_t c = n; c < np; ++c) dst[r * np + c] = 0.0f;
    }
}

/* inside a parallel region: fill the packs (ends with a barrier) */
static void pack_fill(const Args *a, Pack *p, int mode) {
    const int64_t B = a->B, Hq = a->Hq, Hkv = a->Hkv, Nq = a->Nq, Nk = a->Nk, D = a->D, Dv = a->Dv, Dvp = p->Dvp;
    const int32_t dt = a->dtype;
    pack_rows(p->qs, a->q, a->sq, B, Hq, Nq, D, p->Dp, dt, p->qscale);
    pack_tiles(p->kt, a->k, a->sk, B, Hkv, Nk, D, p->nt, dt);
    if (mode == PACK_FWD && p->vborrowed) {
#pragma omp for schedule(static) nowait
        for (int64_t r = 0; r < B * Hkv * Nk; ++r) p->vbad[r] = 0;
    } else if (mode == PACK_FWD) {
#pragma omp for schedule(static) nowait
        for (int64_t r = 0; r < B * Hkv * Nk; ++r) {
            const int64_t j = r % Nk, h = r / Nk % Hkv, b = r / (Nk * Hkv);
            float *dst = p->vp + r * Dvp;
            load_row(dst, a->v, b * a->sv[0] + h * a->sv[1] + j * a->sv[2], a->sv[3], Dv, dt, 1.0f);
            int bad = 0;
            for (int64_t c = 0; c < Dv; ++c) bad |= !isfinite(dst[c]);
            if (bad) memset(dst, 0, (size_t)Dv * 4);
            for (int64_t c = Dv; c < Dvp; ++c) dst[c] = 0.0f;
            p->vbad[r] = (uint8_t)bad;
        }
    }
    if (mode == PACK_BWD) {
        pack_rows(p->kp, a->k, a->sk, B, Hkv, Nk, D, p->Dp, dt, a->scale);
        pack_tiles(p->vt, a->v, a->sv, B, Hkv, Nk, Dv, p->nt, dt);
        pack_rows(p->dop, a->dout, a->sdo, B, Hq, Nq, Dv, Dvp, dt, 1.0f);
#pragma omp for schedule(static) nowait
        for (int64_t r = 0; r < B * Hq * Nq; ++r) { /* Δ = rowsum(dO ∘ O) − dlse */
            const int64_t i = r % Nq, h = r / Nq % Hq, b = r / (Nq * Hq);
            const int64_t od = b * a->sdo[0] + h * a->sdo[1] + i * a->sdo[2], oo = b * a->so[0] + h * a->so[1] + i * a->so[2];
            float acc = 0.0f;
            for (int64_t c = 0; c < Dv; ++c) acc += ld1(a->dout, od + c * a->sdo[3], dt) * ld1(a->outp, oo + c * a->so[3], dt);
            p->delta[r] = a->dlse ? acc - a->dlse[r] : acc;
        }
    }
#pragma omp barrier
    if (mode == PACK_FWD) {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < B * Hkv * p->nt; ++t) {
            const int64_t tt = t % p->nt, bh = t / p->nt;
            uint8_t any = 0;
            for (int64_t j = tt * BK; j < imin(Nk, tt * BK + BK); ++j) any |= p->vbad[bh * Nk + j];
            p->tbad[t] = any;
        }
    }
}

/* ---------------------------------------------------------------------------------------------------------
 * rows of a tile */
typedef struct {
    const float *q;      /* packed query row (D floats), or the zero row */
    int64_t i, h;        /* query index and head; h < 0: a padding row */
    int64_t lo, hi;      /* keys the band lets it see */
    const void *mrow;    /* mask row (key stride a->sm[3]) or NULL */
    float slope;         /* ALiBi slope */
    int64_t pos;         /* i + offset */
} Row;

static void row_init(const Args *a, const Pack *p, Row *rw, int64_t b, int64_t h, int64_t i) {
    rw->i = i;
    rw->h = h;
    if (h < 0) {
        rw->q = p->zero; rw->lo = rw->hi = 0; rw->mrow = NULL; rw->slope = 0; rw->pos = 0;
        return;
    }
    rw->q = p->qs + ((b * a->Hq + h) * a->Nq + i) * p->Dp;
    band(a, i, &rw->lo, &rw->hi);
    rw->pos = i + a->offset;
    rw->slope = a->alibi ? a->alibi[b * a->alibi_sb + h] : 0.0f;
    rw->mrow = NULL;
    if (a->mask_kind) {
        int64_t off = b * a->sm[0] + h * a->sm[1] + i * a->sm[2];
        rw->mrow = a->mask_kind == 1 ? (const void *)((const uint8_t *)a->mask + off)
                                     : (const void *)((const float *)a->mask + off);
    }
}

/* The score rule on one tile row s[0:BK) (keys j0..): softcap, ALiBi, float mask; then -inf where not visible.
 * Writes 1 - tanh² into dcap when given (softcap's derivative, for the backward). Returns 1 when `check` and a
 * visible score is not finite. Skips everything the row does not need. */
static int prep_row(const Args *a, const Row *rw, float *s, float *dcap, int64_t j0) {
    const int softcap = a->softcap > 0, alibi = a->alibi != NULL, mk = a->mask_kind;
    const int64_t lo = rw->lo - j0, hi = imin(rw->hi, a->Nk) - j0;
    if (!softcap && !alibi && !mk && !a->check && lo <= 0 && hi >= BK) return 0;
    const vf c = vset(a->softcap), slope = vset(rw->slope), ninf = vset(-INFINITY);
    const int64_t kst = a->sm[3];
    int bad = 0;
    for (int v = 0; v < NVK; ++v) {
        const int64_t jv = j0 + 16 * v;
        vm vis = lanes_in(lo - 16 * v, hi - 16 * v);
        if (!vis && !a->check) {
            vst(s + 16 * v, ninf);
            if (dcap) vst(dcap + 16 * v, vzero());
            continue;
        }
        vf x = vld(s + 16 * v);
        if (softcap) {
            vf t = vtanh(x);
            if (dcap) vst(dcap + 16 * v, vsub(vset(1.0f), vmul(t, t)));
            x = vmul(t, c);
        }
        if (alibi) { /* - slope·|pos - j| */
            vf dist = vabs(vsub(vset((float)(rw->pos - jv)), viota()));
            x = vfma(vmul(slope, vset(-1.0f)), dist, x);
        }
        if (mk && vis) {
            vm inb = lanes_below(a->Nk - jv);
            if (mk == 2) {
                const float *m = (const float *)rw->mrow;
                vf mv = kst ? vldz(inb, m + jv) : vset(m[0]);
                x = vadd(x, mv);
                vis &= vne(mv, ninf);
            } else {
                const uint8_t *m = (const uint8_t *)rw->mrow;
                vis &= kst ? vbytes(m + jv, inb) : (m[0] ? (vm)0xffff : (vm)0);
            }
        }
        if (a->check) { /* a visible non-finite score (-inf by arithmetic too) makes the row NaN: it reads as NaN */
            const vm nf = vis & vnonfinite(x);
            bad |= nf != 0;
            x = vsel(nf, vset(NAN), x);
        }
        vst(s + 16 * v, vsel(vis, x, ninf));
    }
    return bad;
}

/* ---------------------------------------------------------------------------------------------------------
 * microkernels */

#if defined(__AVX512F__) /* 32 registers of 16 floats: register blocks of 16-float vectors */
/* C[r][0:BK) = Σ_d A_r[d] · BT[d][0:BK) for RQ rows; BT packed (K, BK) */
static void mk_qk(const float *const *arow, int64_t K, const float *bt, float *c, int64_t ldc) {
    vf acc[RQ][NVK];
#pragma GCC unroll 8
    for (int r = 0; r < RQ; ++r)
#pragma GCC unroll 8
        for (int v = 0; v < NVK; ++v) acc[r][v] = vzero();
    for (int64_t d = 0; d < K; ++d) {
        const float *b = bt + d * BK;
        vf bv[NVK];
#pragma GCC unroll 8
        for (int v = 0; v < NVK; ++v) bv[v] = vld(b + 16 * v);
#pragma GCC unroll 8
        for (int r = 0; r < RQ; ++r) {
            vf x = vset(arow[r][d]);
#pragma GCC unroll 8
            for (int v = 0; v < NVK; ++v) acc[r][v] = vfma(x, bv[v], acc[r][v]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < RQ; ++r)
#pragma GCC unroll 8
        for (int v = 0; v < NVK; ++v) vst(c + r * ldc + 16 * v, acc[r][v]);
}

/* C_r[c0 : c0 + 16·NV) = alpha_r · C_r + Σ_{j < nk} P[r][j] · Bm[j][c0 ...] for RB rows (rows of C by pointer) */
static inline __attribute__((always_inline)) void mk_pv_t(const int RB, const int NV, float *const *crow,
                                                          const float *alpha, const float *P, int64_t ldp,
                                                          const float *bm, int64_t ldb, int64_t nk, int64_t c0) {
    vf acc[12][4];
#pragma GCC unroll 12
    for (int r = 0; r < RB; ++r) {
        vf al = vset(alpha ? alpha[r] : 1.0f);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = alpha ? vmul(vld(crow[r] + c0 + 16 * v), al) : vld(crow[r] + c0 + 16 * v);
    }
    for (int64_t j = 0; j < nk; ++j) {
        vf bv[4];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) bv[v] = vld(bm + j * ldb + c0 + 16 * v);
#pragma GCC unroll 12
        for (int r = 0; r < RB; ++r) {
            vf x = vset(P[r * ldp + j]);
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) acc[r][v] = vfma(x, bv[v], acc[r][v]);
        }
    }
#pragma GCC unroll 12
    for (int r = 0; r < RB; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) vst(crow[r] + c0 + 16 * v, acc[r][v]);
}

static void mk_pv_12x1(float *const *c, const float *al, const float *P, int64_t ldp, const float *bm, int64_t ldb,
                       int64_t nk, int64_t c0) { mk_pv_t(12, 1, c, al, P, ldp, bm, ldb, nk, c0); }
static void mk_pv_12x2(float *const *c, const float *al, const float *P, int64_t ldp, const float *bm, int64_t ldb,
                       int64_t nk, int64_t c0) { mk_pv_t(12, 2, c, al, P, ldp, bm, ldb, nk, c0); }
static void mk_pv_6x3(float *const *c, const float *al, const float *P, int64_t ldp, const float *bm, int64_t ldb,
                      int64_t nk, int64_t c0) { mk_pv_t(6, 3, c, al, P, ldp, bm, ldb, nk, c0); }
static void mk_pv_6x4(float *const *c, const float *al, const float *P, int64_t ldp, const float *bm, int64_t ldb,
                      int64_t nk, int64_t c0) { mk_pv_t(6, 4, c, al, P, ldp, bm, ldb, nk, c0); }

/* C rows (R rows, a multiple of 12; width Xp, a multiple of 16) = alpha ∘ C + P · Bm over nk keys */
static void pv(int64_t R, int64_t Xp, float *const *crow, const float *alpha, const float *P, int64_t ldp,
               const float *bm, int64_t ldb, int64_t nk) {
    int64_t nv = Xp / 16;
    for (int64_t c0 = 0; c0 < nv;) {
        int64_t left = nv - c0, w = left >= 4 ? (left == 5 ? 3 : 4) : left;
        for (int64_t r = 0; r < R; r += w <= 2 ? 12 : 6) {
            const float *al = alpha ? alpha + r : NULL;
            const float *pp = P + r * ldp;
            if (w == 1) mk_pv_12x1(crow + r, al, pp, ldp, bm, ldb, nk, 16 * c0);
            else if (w == 2) mk_pv_12x2(crow + r, al, pp, ldp, bm, ldb, nk, 16 * c0);
            else if (w == 3) mk_pv_6x3(crow + r, al, pp, ldp, bm, ldb, nk, 16 * c0);
            else mk_pv_6x4(crow + r, al, pp, ldp, bm, ldb, nk, 16 * c0);
        }
        c0 += w;
    }
}

/* Acc[j][c0 ...] += Σ_{r < R} P[r][j] · A_r[c0 ...] for JB keys j0.. (the outer-product update of dV, dK) */
static inline __attribute__((always_inline)) void mk_outer_t(const int JB, const int NV, float *acc_, int64_t lda,
                                                             const float *P, int64_t ldp, int64_t j0,
                                                             const float *const *arow, int64_t R, int64_t c0) {
    vf acc[16][4];
#pragma GCC unroll 16
    for (int j = 0; j < JB; ++j)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[j][v] = vld(acc_ + (j0 + j) * lda + c0 + 16 * v);
    for (int64_t r = 0; r < R; ++r) {
        vf av[4];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) av[v] = vld(arow[r] + c0 + 16 * v);
        const float *pr = P + r * ldp + j0;
#pragma GCC unroll 16
        for (int j = 0; j < JB; ++j) {
            vf x = vset(pr[j]);
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) acc[j][v] = vfma(x, av[v], acc[j][v]);
        }
    }
#pragma GCC unroll 16
    for (int j = 0; j < JB; ++j)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) vst(acc_ + (j0 + j) * lda + c0 + 16 * v, acc[j][v]);
}

static void mk_outer_16x1(float *acc, int64_t lda, const float *P, int64_t ldp, int64_t j0, const float *const *arow,
                          int64_t R, int64_t c0) { mk_outer_t(16, 1, acc, lda, P, ldp, j0, arow, R, c0); }
static void mk_outer_8x2(float *acc, int64_t lda, const float *P, int64_t ldp, int64_t j0, const float *const *arow,
                         int64_t R, int64_t c0) { mk_outer_t(8, 2, acc, lda, P, ldp, j0, arow, R, c0); }
static void mk_outer_4x4(float *acc, int64_t lda, const float *P, int64_t ldp, int64_t j0, const float *const *arow,
                         int64_t R, int64_t c0) { mk_outer_t(4, 4, acc, lda, P, ldp, j0, arow, R, c0); }

/* Acc (BK × Xp) += Pᵀ A: P (R × BK), A rows (R rows of Xp floats) */
static void outer(float *acc, int64_t Xp, const float *P, int64_t ldp, const float *const *arow, int64_t R) {
    int64_t nv = Xp / 16;
    for (int64_t c0 = 0; c0 < nv;) {
        int64_t left = nv - c0, w = left >= 4 ? 4 : left == 3 ? 2 : left;
        for (int64_t j0 = 0; j0 < BK; j0 += w == 1 ? 16 : w == 2 ? 8 : 4) {
            if (w == 1) mk_outer_16x1(acc, Xp, P, ldp, j0, arow, R, 16 * c0);
            else if (w == 2) mk_outer_8x2(acc, Xp, P, ldp, j0, arow, R, 16 * c0);
            else mk_outer_4x4(acc, Xp, P, ldp, j0, arow, R, 16 * c0);
        }
        c0 += w;
    }
}

#else /* 16 registers of 8 floats (AVX2; SSE2 and NEON as pairs): blocks of 6 rows × 16 columns, whose 12 accumulators
     * fit with the B vectors and a broadcast (the 16-float blocks above need 48 and spill:
     * benchmarks/results/cpu-2026-12-03.md; 3 × 32 blocks need 19: benchmarks/results/fused-auto-2026-12-03.md) */
typedef float v8 __attribute__((vector_size(32)));
static inline v8 ld8(const float *p) { v8 r; memcpy(&r, p, sizeof r); return r; }
static inline void st8(float *p, v8 x) { memcpy(p, &x, sizeof x); }
static inline v8 splat8(float x) { v8 r = {x, x, x, x, x, x, x, x}; return r; }

/* Register blocks of 6 rows × 16 columns: 12 accumulators, 2 registers of B and 1 broadcast of A (15 of the 16
 * registers), so each B vector is loaded once per k for 6 FMAs. (Blocks of 3 × 32 need 19 registers: the compiler
 * then folds the 4 B loads into each of the 12 FMAs, 15 loads per 12 FMAs, and the loads, not the FMAs, set the
 * pace.) */

/* C[r][0:BK) = Σ_d A_r[d] · BT[d][0:BK) for RQ rows (a multiple of 6); BT packed (K, BK) */
static void mk_qk(const float *const *arow, int64_t K, const float *bt, float *c, int64_t ldc) {
    for (int r0 = 0; r0 < RQ; r0 += 6)
        for (int c0 = 0; c0 < BK; c0 += 16) {
            const float *a[6];
#pragma GCC unroll 6
            for (int r = 0; r < 6; ++r) a[r] = arow[r0 + r];
            v8 acc[6][2];
#pragma GCC unroll 6
            for (int r = 0; r < 6; ++r) acc[r][0] = acc[r][1] = splat8(0.0f);
            for (int64_t d = 0; d < K; ++d) {
                const v8 b0 = ld8(bt + d * BK + c0), b1 = ld8(bt + d * BK + c0 + 8);
#pragma GCC unroll 6
                for (int r = 0; r < 6; ++r) {
                    const v8 x = splat8(a[r][d]);
                    acc[r][0] += x * b0;
                    acc[r][1] += x * b1;
                }
            }
#pragma GCC unroll 6
            for (int r = 0; r < 6; ++r) {
                st8(c + (r0 + r) * ldc + c0, acc[r][0]);
                st8(c + (r0 + r) * ldc + c0 + 8, acc[r][1]);
            }
        }
}

/* C_r[c0 : c0 + 16) = alpha_r · C_r + Σ_{j < nk} P[r][j] · Bm[j][c0 ...] for 6 rows */
static void mk_pv6(float *const *crow, const float *alpha, const float *P, int64_t ldp, const float *bm, int64_t ldb,
                   int64_t nk, int64_t c0) {
    v8 acc[6][2];
#pragma GCC unroll 6
    for (int r = 0; r < 6; ++r) {
        const v8 c0v = ld8(crow[r] + c0), c1v = ld8(crow[r] + c0 + 8);
        const v8 al = splat8(alpha ? alpha[r] : 1.0f);
        acc[r][0] = alpha ? c0v * al : c0v;
        acc[r][1] = alpha ? c1v * al : c1v;
    }
    for (int64_t j = 0; j < nk; ++j) {
        const v8 b0 = ld8(bm + j * ldb + c0), b1 = ld8(bm + j * ldb + c0 + 8);
#pragma GCC unroll 6
        for (int r = 0; r < 6; ++r) {
            const v8 x = splat8(P[r * ldp + j]);
            acc[r][0] += x * b0;
            acc[r][1] += x * b1;
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < 6; ++r) {
        st8(crow[r] + c0, acc[r][0]);
        st8(crow[r] + c0 + 8, acc[r][1]);
    }
}

/* C rows (R rows, a multiple of 6; width Xp, a multiple of 16) = alpha ∘ C + P · Bm over nk keys */
static void pv(int64_t R, int64_t Xp, float *const *crow, const float *alpha, const float *P, int64_t ldp,
               const float *bm, int64_t ldb, int64_t nk) {
    for (int64_t c0 = 0; c0 < Xp; c0 += 16)
        for (int64_t r = 0; r < R; r += 6) mk_pv6(crow + r, alpha ? alpha + r : NULL, P + r * ldp, ldp, bm, ldb, nk, c0);
}

/* Acc[j0 + j][c0 ...16) += Σ_{r < R} P[r][j0 + j] · A_r[c0 ...16) for JB keys (6: 12 accumulators, as above) */
static inline __attribute__((always_inline)) void mk_outer_t(const int JB, float *acc, int64_t Xp, const float *P,
                                                             int64_t ldp, int64_t j0, const float *const *arow,
                                                             int64_t R, int64_t c0) {
    v8 a[6][2];
#pragma GCC unroll 6
    for (int j = 0; j < JB; ++j) {
        a[j][0] = ld8(acc + (j0 + j) * Xp + c0);
        a[j][1] = ld8(acc + (j0 + j) * Xp + c0 + 8);
    }
    for (int64_t r = 0; r < R; ++r) {
        const v8 av0 = ld8(arow[r] + c0), av1 = ld8(arow[r] + c0 + 8);
        const float *pr = P + r * ldp + j0;
#pragma GCC unroll 6
        for (int j = 0; j < JB; ++j) {
            const v8 x = splat8(pr[j]);
            a[j][0] += x * av0;
            a[j][1] += x * av1;
        }
    }
#pragma GCC unroll 6
    for (int j = 0; j < JB; ++j) {
        st8(acc + (j0 + j) * Xp + c0, a[j][0]);
        st8(acc + (j0 + j) * Xp + c0 + 8, a[j][1]);
    }
}
static void mk_outer6(float *acc, int64_t Xp, const float *P, int64_t ldp, int64_t j0, const float *const *arow,
                      int64_t R, int64_t c0) { mk_outer_t(6, acc, Xp, P, ldp, j0, arow, R, c0); }
static void mk_outer4(float *acc, int64_t Xp, const float *P, int64_t ldp, int64_t j0, const float *const *arow,
                      int64_t R, int64_t c0) { mk_outer_t(4, acc, Xp, P, ldp, j0, arow, R, c0); }

/* Acc (BK × Xp) += Pᵀ A: P (R × BK), A rows (R rows of Xp floats); blocks of 6 keys × 16 columns (BK = 10·6 + 4) */
static void outer(float *acc, int64_t Xp, const float *P, int64_t ldp, const float *const *arow, int64_t R) {
    for (int64_t c0 = 0; c0 < Xp; c0 += 16) {
        int64_t j0 = 0;
        for (; j0 + 6 <= BK; j0 += 6) mk_outer6(acc, Xp, P, ldp, j0, arow, R, c0);
        for (; j0 < BK; j0 += 4) mk_outer4(acc, Xp, P, ldp, j0, arow, R, c0);
    }
}
#endif

/* S (R × BK) = A Bᵀ: rows of A by pointer (R a multiple of RQ), BT packed (K, BK) */
static void qk(int64_t R, const float *const *arow, int64_t K, const float *bt, float *S) {
    for (int64_t r = 0; r < R; r += RQ) mk_qk(arow + r, K, bt, S + r * BK, BK);
}

/* ---------------------------------------------------------------------------------------------------------
 * top-k of a row's raw scores, streaming: cv[0:k) holds the k largest so far (largest first; ties: the lower key
 * first). A tile row's scores above the k-th are inserted at once, in key order, so the k-th — the filter of the
 * next scores — rises with every insertion (few scores of a row ever pass it: about k·ln(N/k) on random scores).
 * An insertion moves a score only past strictly smaller ones, so among equal scores the lower key stays first. */
/* one tile row s (raw scores, keys j0..) into the row's list */
#if !FUSED_AVX512 && defined(__AVX2__)
/* On AVX2 the list is ceil(k/8) registers long (slots past k hold smaller scores and are never read) and x goes in
 * without a branch: lanes holding a score strictly smaller than x (a suffix of the sorted list) take their left
 * neighbour's, the first of them x — the same list as topk_insert, whose data-dependent loop mispredicts. An x no
 * larger than every slot changes nothing. */
typedef struct { __m256 v; __m256i i; } TopReg; /* 8 slots of a list in registers */

/* x (key j) into the 8 slots c, returning the slots after and, in carry/carry_i/carry_lt, the slot pushed out of
 * lane 7 (and whether it moved): the next register of the list takes it in lane 0 */
static inline TopReg topk_insert_reg(TopReg c, __m256 vx, __m256i vj, __m256 *carry, __m256i *carry_i, __m256 *carry_lt) {
    const __m256i right = _mm256_setr_epi32(7, 0, 1, 2, 3, 4, 5, 6); /* lane l takes lane l - 1 (lane 0: the carry) */
    const __m256 lane0 = _mm256_castsi256_ps(_mm256_setr_epi32(-1, 0, 0, 0, 0, 0, 0, 0));
    const __m256 lt = _mm256_cmp_ps(c.v, vx, _CMP_LT_OQ);
    const __m256 left = _mm256_blendv_ps(_mm256_permutevar8x32_ps(c.v, right), *carry, lane0);
    const __m256 left_i = _mm256_blendv_ps(_mm256_castsi256_ps(_mm256_permutevar8x32_epi32(c.i, right)),
                                           _mm256_castsi256_ps(*carry_i), lane0);
    const __m256 left_lt = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lt, right), *carry_lt, lane0);
    /* a moving lane takes its left neighbour when that one moves too, else x */
    const __m256 nv = _mm256_blendv_ps(vx, left, left_lt);
    const __m256 ni = _mm256_blendv_ps(_mm256_castsi256_ps(vj), left_i, left_lt);
    const __m256i seven = _mm256_set1_epi32(7);
    *carry = _mm256_permutevar8x32_ps(c.v, seven);
    *carry_i = _mm256_permutevar8x32_epi32(c.i, seven);
    *carry_lt = _mm256_permutevar8x32_ps(lt, seven);
    TopReg r;
    r.v = _mm256_blendv_ps(c.v, nv, lt);
    r.i = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(c.i), ni, lt));
    return r;
}

static inline void topk_insert8(float *cv, int32_t *ci, int nb, float x, int32_t j) {
    const __m256 vx = _mm256_set1_ps(x);
    const __m256i vj = _mm256_set1_epi32(j);
    __m256 carry = vx, carry_lt = _mm256_setzero_ps(); /* before the list: x, "not moved" */
    __m256i carry_i = vj;
    for (int b = 0; b < nb; ++b) {
        TopReg c = {_mm256_loadu_ps(cv + 8 * b), _mm256_loadu_si256((const __m256i *)(ci + 8 * b))};
        c = topk_insert_reg(c, vx, vj, &carry, &carry_i, &carry_lt);
        _mm256_storeu_ps(cv + 8 * b, c.v);
        _mm256_storeu_si256((__m256i *)(ci + 8 * b), c.i);
    }
}

/* The candidates of a tile row are the keys above the list's k-th at the start of the tile, gathered in one 64-bit
 * mask (a branch per key vector mispredicts), then inserted in key order. For k <= 8 a key below the tile's own k-th
 * largest cannot be in the top-k either; the smallest of the 8 lane-wise maxima (maxima of 8 disjoint sets of
 * keys) is a lower bound of it, so keys below it are skipped too (keys equal to it may be in: the bound is not
 * strict), which spares most insertions of a row's first tile; and the list stays in one register. */
static inline void topk_add(float *cv, int32_t *ci, int k, const float *s, int64_t j0) {
    const int nb = (k + 7) / 8;
    __m256 floor_ = _mm256_set1_ps(-INFINITY);
    if (k <= 8) {
        __m256 mx = _mm256_loadu_ps(s);
        for (int c = 8; c < BK; c += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(s + c));
        __m128 h = _mm_min_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        h = _mm_min_ps(h, _mm_movehl_ps(h, h));
        h = _mm_min_ss(h, _mm_shuffle_ps(h, h, 1));
        floor_ = _mm256_broadcastss_ps(h);
        /* k <= 8: the list is one register, kept there for the whole tile row */
        TopReg c = {_mm256_loadu_ps(cv), _mm256_loadu_si256((const __m256i *)ci)};
        /* the candidates of the whole tile row in one 64-bit mask (no branch per key vector; the filter is the k-th
         * at the start of the tile: a candidate that no longer passes it changes nothing) */
        const __m256 thr = _mm256_broadcastss_ps(_mm_load_ss(cv + k - 1));
        uint64_t bits = 0;
        for (int g = 0; g < BK; g += 8) {
            const __m256 x = _mm256_loadu_ps(s + g);
            bits |= (uint64_t)(unsigned)_mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(x, thr, _CMP_GT_OQ),
                                                                          _mm256_cmp_ps(x, floor_, _CMP_GE_OQ))) << g;
        }
        for (; bits; bits &= bits - 1) {
            const int l = __builtin_ctzll(bits);
            __m256 carry = _mm256_set1_ps(s[l]), carry_lt = _mm256_setzero_ps();
            __m256i carry_i = _mm256_set1_epi32((int32_t)(j0 + l));
            c = topk_insert_reg(c, carry, carry_i, &carry, &carry_i, &carry_lt);
        }
        _mm256_storeu_ps(cv, c.v);
        _mm256_storeu_si256((__m256i *)ci, c.i);
        return;
    }
    const __m256 thr = _mm256_set1_ps(cv[k - 1]);
    uint64_t bits = 0;
    for (int g = 0; g < BK; g += 8)
        bits |= (uint64_t)(unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(s + g), thr, _CMP_GT_OQ)) << g;
    for (; bits; bits &= bits - 1) {
        const int l = __builtin_ctzll(bits);
        if (s[l] > cv[k - 1]) topk_insert8(cv, ci, nb, s[l], (int32_t)(j0 + l));
    }
}
#define TOPK_SLOTS(k) (((k) + 7) / 8 * 8)
#else
static inline void topk_insert(float *cv, int32_t *ci, int k, float x, int32_t j) {
    if (!(x > cv[k - 1])) return; /* NaN and -inf never enter */
    int pos = k - 1;
    while (pos > 0 && x > cv[pos - 1]) { cv[pos] = cv[pos - 1]; ci[pos] = ci[pos - 1]; --pos; }
    cv[pos] = x;
    ci[pos] = j;
}

/* the lanes set in bits (lowest first) of scores s (keys j0..) */
static inline void topk_lanes(float *cv, int32_t *ci, int k, const float *s, unsigned bits, int64_t j0) {
    for (; bits; bits &= bits - 1) {
        const int l = __builtin_ctz(bits);
        topk_insert(cv, ci, k, s[l], (int32_t)(j0 + l));
    }
}

static inline void topk_add(float *cv, int32_t *ci, int k, const float *s, int64_t j0) {
    for (int v = 0; v < NVK; ++v) topk_lanes(cv, ci, k, s + 16 * v, (unsigned)vgt(vld(s + 16 * v), vset(cv[k - 1])), j0 + 16 * v);
}
#define TOPK_SLOTS(k) (k)
#endif

/* ---------------------------------------------------------------------------------------------------------
 * forward */

/* per-thread workspace of the forward. Per row: the reference max m (a scalar), the sums l and t as vectors of
 * lane partial sums (added up once, at the end), the running true maximum as a vector. */
#define RMAX (RT + 12)
typedef struct {
    vf lv[RMAX], tv_[RMAX], mv[RMAX];
    Row rows[RMAX];
    const float *qrow[RMAX];
    float *orow[RMAX];
    float *S, *O;
    float m[RMAX], alpha[RMAX];
    uint8_t bad[RMAX];
    float *tv;      /* top-k lists: RMAX rows of MAXK */
    int32_t *ti;
    float mk[RMAX], rl[RMAX]; /* finished rows: the key weights are exp(s - mk) · rl */
} Fwd;

/* a score may exceed the row's reference max m by this much before m moves (and l, t, O are rescaled): e <= e^8 */
#define LAZY 8.0f

/* One row's share of a key tile, online: s (BK prepared scores) becomes e = exp(s - m) with the row's reference
 * max m, which moves (rescaling l, t and O by alpha = exp(m - m')) only when a score exceeds it by more than LAZY
 * — after the first tiles almost never. Returns 1 when the row was rescaled (alpha != 1). */
/* The row's reference max moves to the tile's max mt: l and t are rescaled by alpha = exp(m - mt) (kept in
 * f->alpha for O) and m becomes mt. Returns 1 instead when nothing in the tile is visible yet (mt = -inf; NaN: the
 * row is marked bad): the tile row becomes zeros and nothing is rescaled. Both SIMD paths of online_row use it. */
static inline int move_max(Fwd *f, int r, float *s, float mt) {
    const float m = f->m[r];
    if (!(mt > -INFINITY)) {
        if (mt != mt) f->m[r] = mt;
        for (int v = 0; v < NVK; ++v) vst(s + 16 * v, vzero());
        f->alpha[r] = 1.0f;
        return 1;
    }
    const float al = m == -INFINITY ? 0.0f : expf(m - mt);
    const vf va = vset(al);
    f->tv_[r] = vmul(va, vfma(f->lv[r], vset(m == -INFINITY ? 0.0f : m - mt), f->tv_[r]));
    f->lv[r] = vmul(va, f->lv[r]);
    f->m[r] = mt;
    f->alpha[r] = al;
    return 0;
}

#if !FUSED_AVX512 && defined(__AVX2__) && defined(__FMA__)
/* AVX2 (16 registers of 8 floats): the per-score work of online_row on 8-float registers. The generic 16-float
 * vectors went through the stack and per-lane scalar code (mask bits, selects); here every 16-float vector of the
 * generic path is a pair (lanes 0-7, 8-15) of __m256, so each lane computes exactly what it computes there. */
static inline __m256 exp8(__m256 x) { /* vexp on 8 lanes: the same operations in the same order */
    const __m256 under = _mm256_cmp_ps(x, _mm256_set1_ps(EXP_LO), _CMP_LT_OQ);
    const __m256 xc = _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(_mm256_set1_ps(EXP_LO), x)); /* NaN stays */
    const __m256 t = _mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f));
    const __m256 half = _mm256_or_ps(_mm256_and_ps(t, _mm256_set1_ps(-0.0f)), _mm256_set1_ps(0.5f));
    const __m256i ni = _mm256_cvttps_epi32(_mm256_add_ps(t, half)); /* to nearest, halves away from zero */
    const __m256 n = _mm256_cvtepi32_ps(ni);
    __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693359375f), xc);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
    __m256 y = _mm256_fmadd_ps(_mm256_set1_ps(1.9875691500e-4f), r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

static inline int online_row(Fwd *f, int r, float *s, int want_t, int k, int64_t j0) {
    __m256 x[2 * NVK];
    x[0] = _mm256_loadu_ps(s);
    x[1] = _mm256_loadu_ps(s + 8);
    __m256 mx0 = x[0], mx1 = x[1]; /* max(a, b) is b where either is NaN, as vmax */
    for (int v = 1; v < NVK; ++v) {
        x[2 * v] = _mm256_loadu_ps(s + 16 * v);
        x[2 * v + 1] = _mm256_loadu_ps(s + 16 * v + 8);
        mx0 = _mm256_max_ps(mx0, x[2 * v]);
        mx1 = _mm256_max_ps(mx1, x[2 * v + 1]);
    }
    float m = f->m[r], al = 1.0f;
    int moved = 0;
    if (m == -INFINITY || _mm256_movemask_ps(_mm256_or_ps(_mm256_cmp_ps(mx0, _mm256_set1_ps(m + LAZY), _CMP_GT_OQ),
                                                          _mm256_cmp_ps(mx1, _mm256_set1_ps(m + LAZY), _CMP_GT_OQ)))) {
        vf mxv;
        memcpy(&mxv, &mx0, 32);
        memcpy((char *)&mxv + 32, &mx1, 32);
        if (move_max(f, r, s, vhmax(mxv))) return 0;
        m = f->m[r];
        al = f->alpha[r];
        moved = 1;
    }
    float *mvp = (float *)&f->mv[r], *lvp = (float *)&f->lv[r], *tvp = (float *)&f->tv_[r];
    _mm256_storeu_ps(mvp, _mm256_max_ps(_mm256_loadu_ps(mvp), mx0));
    _mm256_storeu_ps(mvp + 8, _mm256_max_ps(_mm256_loadu_ps(mvp + 8), mx1));
    f->alpha[r] = al;
    float *cv = f->tv + r * MAXK;
    if (k) {
        const __m256 thr = _mm256_set1_ps(cv[k - 1]);
        if (_mm256_movemask_ps(_mm256_or_ps(_mm256_cmp_ps(mx0, thr, _CMP_GT_OQ), _mm256_cmp_ps(mx1, thr, _CMP_GT_OQ))))
            topk_add(cv, f->ti + r * MAXK, k, s, j0);
    }
    const __m256 vm_ = _mm256_set1_ps(m), lo = _mm256_set1_ps(EXP_LO);
    __m256 ls0 = _mm256_loadu_ps(lvp), ls1 = _mm256_loadu_ps(lvp + 8);
    if (want_t) {
        __m256 ts0 = _mm256_loadu_ps(tvp), ts1 = _mm256_loadu_ps(tvp + 8);
        for (int v = 0; v < NVK; ++v) {
            const __m256 d0 = _mm256_sub_ps(x[2 * v], vm_), d1 = _mm256_sub_ps(x[2 * v + 1], vm_);
            const __m256 e0 = exp8(d0), e1 = exp8(d1);
            _mm256_storeu_ps(s + 16 * v, e0);
            _mm256_storeu_ps(s + 16 * v + 8, e1);
            ls0 = _mm256_add_ps(ls0, e0);
            ls1 = _mm256_add_ps(ls1, e1);
            /* e = 0 wherever d < EXP_LO (masked keys: d = -inf) */
            ts0 = _mm256_fmadd_ps(e0, _mm256_max_ps(lo, d0), ts0);
            ts1 = _mm256_fmadd_ps(e1, _mm256_max_ps(lo, d1), ts1);
        }
        _mm256_storeu_ps(tvp, ts0);
        _mm256_storeu_ps(tvp + 8, ts1);
    } else {
        for (int v = 0; v < NVK; ++v) {
            const __m256 e0 = exp8(_mm256_sub_ps(x[2 * v], vm_)), e1 = exp8(_mm256_sub_ps(x[2 * v + 1], vm_));
            _mm256_storeu_ps(s + 16 * v, e0);
            _mm256_storeu_ps(s + 16 * v + 8, e1);
            ls0 = _mm256_add_ps(ls0, e0);
            ls1 = _mm256_add_ps(ls1, e1);
        }
    }
    _mm256_storeu_ps(lvp, ls0);
    _mm256_storeu_ps(lvp + 8, ls1);
    return moved;
}
#else
static inline int online_row(Fwd *f, int r, float *s, int want_t, int k, int64_t j0) {
    vf x[NVK];
    x[0] = vld(s);
    vf mx = x[0];
    for (int v = 1; v < NVK; ++v) { x[v] = vld(s + 16 * v); mx = vmax(mx, x[v]); }
    float m = f->m[r], al = 1.0f;
    int moved = 0;
    if (m == -INFINITY || vgt(mx, vset(m + LAZY))) {
        if (move_max(f, r, s, vhmax(mx))) return 0;
        m = f->m[r];
        al = f->alpha[r];
        moved = 1;
    }
    f->mv[r] = vmax(f->mv[r], mx);
    f->alpha[r] = al;
    float *cv = f->tv + r * MAXK;
    if (k && vgt(mx, vset(cv[k - 1]))) topk_add(cv, f->ti + r * MAXK, k, s, j0);
    vf vm_ = vset(m), ls = f->lv[r], ts = f->tv_[r], lo = vset(EXP_LO);
    for (int v = 0; v < NVK; ++v) {
        vf d = vsub(x[v], vm_);
        vf e = vexp(d);
        vst(s + 16 * v, e);
        ls = vadd(ls, e);
        if (want_t) ts = vfma(e, vmax(lo, d), ts); /* e = 0 wherever d < EXP_LO (masked keys: d = -inf) */
    }
    f->lv[r] = ls;
    f->tv_[r] = ts;
    return moved;
}
#endif

/* value rows with NaN/inf in this tile: added only where their weight is > 0 */
static void add_bad_values(const Args *a, const Pack *p, Fwd *f, const float *S, int64_t R, int64_t bh, int64_t j0) {
    for (int64_t j = j0; j < imin(a->Nk, j0 + BK); ++j) {
        if (!p->vbad[bh * a->Nk + j]) continue;
        int64_t b = bh / a->Hkv, h = bh % a->Hkv, base = b * a->sv[0] + h * a->sv[1] + j * a->sv[2];
        for (int64_t r = 0; r < R; ++r) {
            float w = S[r * BK + (j - j0)];
            if (!(w > 0.0f)) continue;
            for (int64_t c = 0; c < a->Dv; ++c) f->orow[r][c] += w * ld1(a->v, base + c * a->sv[3], a->dtype);
        }
    }
}

/* lse, out, the lens fields of one finished row. Weights are built from the row's own m and l (e = exp(s - m),
 * p = e · a_keys / l), never from the rounded lse: exact also where fp32 cannot hold m + log l (scores near -1e30).
 * delta (when asked) is that rounding, (m - lse) + log l, so that exp(s - lse - delta) is the row's own weight. */
static void finish_row(const Args *a, Fwd *f, int r, int64_t b) {
    const Row *rw = &f->rows[r];
    const int64_t h = rw->h, i = rw->i, k = a->topk;
    const int64_t o = (b * a->Hq + h) * a->Nq + i;
    float m = f->m[r], l = vhsum(f->lv[r]), t = vhsum(f->tv_[r]), *O = f->orow[r];
    const float mk = m, mtrue = vhmax(f->mv[r]);
    int bad = f->bad[r] || m != m;
    float a_keys = 1.0f, es = 0.0f; /* the keys' weights are a_keys · e / l ; the sink's is es / l */
    if (!bad && a->sinks) {
        const float sk = a->sinks[b * a->sinks_sb + h];
        if (sk != sk || sk == INFINITY) {
            bad = 1; /* a non-finite visible logit (the reference's rule) */
        } else if (l == 0.0f) { /* no key: all weight on the sink (none for a -inf sink) */
            if (sk > -INFINITY) { m = sk; l = 1.0f; es = 1.0f; }
            t = 0.0f;
            a_keys = 0.0f;
        } else {
            const float m2 = sk > m ? sk : m;
            a_keys = expf(m - m2);
            es = sk > -INFINITY ? expf(sk - m2) : 0.0f;
            /* a_keys = 0: the keys' term is 0 (l·(m - m2) may overflow to -inf, and 0·-inf is NaN) */
            t = (a_keys > 0.0f ? a_keys * (t + l * (m - m2)) : 0.0f) + (es > 0.0f ? es * (sk - m2) : 0.0f);
            l = l * a_keys + es;
            m = m2;
        }
    }
    const float nan = NAN;
    const float inv = l > 0.0f ? 1.0f / l : 0.0f, rl = a_keys * inv;
    f->mk[r] = mk;
    f->rl[r] = bad ? 0.0f : rl;
    const float lse = bad ? nan : l > 0.0f ? m + logf(l) : -INFINITY;
    float *out = a->out + o * a->Dv;
    for (int64_t c = 0; c < a->Dv; ++c) out[c] = bad ? nan : O[c] * rl;
    if (a->lse) a->lse[o] = lse;
    if (a->lse_delta) a->lse_delta[o] = bad || !(l > 0.0f) ? 0.0f : (m - lse) + logf(l);
    if (a->maxw) a->maxw[o] = bad ? nan : mtrue > -INFINITY && rl > 0.0f ? expf(mtrue - mk) * rl : 0.0f;
    if (a->ent) {
        float e = l > 0.0f ? logf(l) - t * inv : 0.0f;
        a->ent[o] = bad ? nan : (e > 0.0f ? e : 0.0f);
    }
    if (a->sinkw) a->sinkw[o] = bad ? nan : es * inv;
    if (k) {
        const float *tv = f->tv + r * MAXK;
        const int32_t *ti = f->ti + r * MAXK;
        for (int64_t x = 0; x < k; ++x) {
            float w = bad ? nan : (rl > 0.0f && tv[x] > -INFINITY ? expf(tv[x] - mk) * rl : 0.0f);
            a->topk_w[o * k + x] = w;
            a->topk_i[o * k + x] = w > 0.0f ? ti[x] : -1;
        }
    }
}

/* acc[0:n) += Σ_{r < R} c[r] · E[r][0:n) (E rows BK apart; each column summed over the rows in row order, then
 * added to acc); c = NULL: every weight 1 (the column pass's plain column sums). All BK sums stay in registers. */
#if !FUSED_AVX512 && defined(__AVX2__) && defined(__FMA__)
static inline void col_wsum(float *acc, const float *E, const float *c, int64_t R, int64_t n) {
    __m256 s[BK / 8];
    for (int v = 0; v < BK / 8; ++v) s[v] = _mm256_setzero_ps();
    for (int64_t r = 0; r < R; ++r) {
        if (!c) {
            for (int v = 0; v < BK / 8; ++v) s[v] = _mm256_add_ps(s[v], _mm256_loadu_ps(E + r * BK + 8 * v));
            continue;
        }
        if (c[r] == 0.0f) continue; /* a row that gives this tile no weight */
        const __m256 cr = _mm256_set1_ps(c[r]);
        for (int v = 0; v < BK / 8; ++v) s[v] = _mm256_fmadd_ps(cr, _mm256_loadu_ps(E + r * BK + 8 * v), s[v]);
    }
    float t[BK];
    for (int v = 0; v < BK / 8; ++v) _mm256_storeu_ps(t + 8 * v, s[v]);
    for (int64_t j = 0; j < n; ++j) acc[j] += t[j];
}
#else
static inline void col_wsum(float *acc, const float *E, const float *c, int64_t R, int64_t n) {
    float t[BK];
    for (int v = 0; v < NVK; ++v) {
        vf x = vzero();
        for (int64_t r = 0; r < R; ++r)
            if (!c) x = vadd(x, vld(E + r * BK + 16 * v));
            else if (c[r] != 0.0f) x = vfma(vset(c[r]), vld(E + r * BK + 16 * v), x);
        vst(t + 16 * v, x);
    }
    for (int64_t j = 0; j < n; ++j) acc[j] += t[j];
}
#endif

/* The geometry of forward work item x: query heads [g0, g1) of key/value head hk of batch b (a head group, gt of
 * ngh), positions [i0, i1). Items run in order of x with positions fastest, so a range of items covers consecutive
 * head groups. */
typedef struct {
    int64_t gh, bq, ngh, nqt, nitems;
} FwdGrid;

static FwdGrid fwd_grid(const Args *a) {
    FwdGrid g;
    const int64_t G = a->Hq / a->Hkv;
    g.gh = imin(G, RT);          /* query heads per tile */
    g.bq = imax(1, RT / g.gh);   /* positions per tile */
    g.ngh = (G + g.gh - 1) / g.gh;
    g.nqt = (a->Nq + g.bq - 1) / g.bq;
    g.nitems = a->B * a->Hkv * g.ngh * g.nqt;
    return g;
}

/* received in the pass: each thread's share of the column sums. Thread t runs items [x0, x1) (contiguous, of about
 * equal work: whole head groups but at its ends) and adds its rows' column sums into buf, rows of Nkp floats for
 * the query heads of groups grp0 .. grp1 (grp = x / nqt); the buffers are added in thread order at the end, so the
 * sums do not depend on timing. */
typedef struct {
    int64_t x0, x1, grp0, grp1;
    float *buf;
} RecShare;

/* the work of item x for splitting items among threads: padded rows × key tiles seen (+ one tile of setup) */
static int64_t fwd_cost(const Args *a, const FwdGrid *g, int64_t x) {
    const int64_t G = a->Hq / a->Hkv, qt = x % g->nqt, gt = x / g->nqt % g->ngh;
    const int64_t i0 = qt * g->bq, i1 = imin(a->Nq, i0 + g->bq), ng = imin(G, gt * g->gh + g->gh) - gt * g->gh;
    int64_t lo0, hi0, lo1, hi1;
    band(a, i0, &lo0, &hi0);
    band(a, i1 - 1, &lo1, &hi1);
    const int64_t lo = imin(lo0, lo1), hi = imax(hi0, hi1);
    const int64_t tiles = hi > lo ? (hi + BK - 1) / BK - lo / BK : 0;
    return ((ng * (i1 - i0) + 11) / 12 * 12) * (tiles + 1);
}

/* One forward work item. E (in-pass received) or NULL: the item's weights are kept there tile after tile (rows
 * RMAX·BK apart per tile) with the reference max each row's tile used in mt, and folded into share->buf once the
 * rows are finished: received_j += Σ_r exp(m_r(tile) − m_r) · rl_r · e_rj, the rows' own weights. */
static void fwd_item(const Args *a, const Pack *p, Fwd *f, const FwdGrid *gr, int64_t x, float *E, float *mt,
                     const RecShare *share) {
    const int64_t Hkv = a->Hkv, G = a->Hq / Hkv, Nq = a->Nq, Dvp = p->Dvp, D = a->D, Nkp = p->nt * BK;
    const int k = a->topk, want_t = a->ent != NULL;
    const int64_t qt = x % gr->nqt, gt = x / gr->nqt % gr->ngh, bh = x / (gr->nqt * gr->ngh), b = bh / Hkv, hk = bh % Hkv;
    const int64_t i0 = qt * gr->bq, i1 = imin(Nq, i0 + gr->bq), g0 = gt * gr->gh, g1 = imin(G, g0 + gr->gh);
    float *tv = f->tv, *O = f->O;
    int32_t *ti = f->ti;
    int64_t R = 0, klo = a->Nk, khi = 0;
    for (int64_t g = g0; g < g1; ++g)
        for (int64_t i = i0; i < i1; ++i) {
            Row *rw = &f->rows[R++];
            row_init(a, p, rw, b, hk * G + g, i);
            if (rw->hi > rw->lo) { klo = imin(klo, rw->lo); khi = imax(khi, rw->hi); }
        }
    const int64_t Rreal = R;
    while (R % 12) row_init(a, p, &f->rows[R++], b, -1, 0);
    for (int64_t r = 0; r < R; ++r) {
        f->qrow[r] = f->rows[r].q;
        f->orow[r] = O + r * Dvp;
        f->m[r] = -INFINITY; f->bad[r] = 0;
        f->lv[r] = f->tv_[r] = vzero();
        f->mv[r] = vset(-INFINITY);
        memset(O + r * Dvp, 0, (size_t)Dvp * 4);
        if (k) for (int x2 = 0; x2 < TOPK_SLOTS(k); ++x2) { tv[r * MAXK + x2] = -INFINITY; ti[r * MAXK + x2] = -1; }
    }
    const float *ktb = p->kt + bh * p->nt * D * BK;
    const float *vb = p->vp + bh * a->Nk * Dvp;
    const int64_t tfirst = klo / BK, tend = khi > klo ? (khi + BK - 1) / BK : tfirst;
    for (int64_t tt = tfirst; tt < tend; ++tt) {
        const int64_t j0 = tt * BK, nk = imin(BK, a->Nk - j0);
        float *S = E ? E + (tt - tfirst) * RMAX * BK : f->S;
        qk(R, f->qrow, D, ktb + tt * D * BK, S);
        int moved = 0;
        for (int64_t r = 0; r < R; ++r) {
            float *s = S + r * BK;
            if (r < Rreal) f->bad[r] |= (uint8_t)prep_row(a, &f->rows[r], s, NULL, j0);
            else for (int v = 0; v < NVK; ++v) vst(s + 16 * v, vset(-INFINITY));
            moved |= online_row(f, (int)r, s, want_t, r < Rreal ? k : 0, j0);
        }
        if (E) memcpy(mt + (tt - tfirst) * RMAX, f->m, (size_t)R * 4);
        pv(R, Dvp, f->orow, moved ? f->alpha : NULL, S, BK, vb + j0 * Dvp, Dvp, nk);
        if (p->tbad[bh * p->nt + tt]) add_bad_values(a, p, f, S, R, bh, j0);
    }
    for (int64_t r = 0; r < Rreal; ++r) finish_row(a, f, (int)r, b);
    if (!E) return;
    const int64_t ni = i1 - i0, grp = x / gr->nqt;
    for (int64_t tt = tfirst; tt < tend; ++tt) {
        const int64_t j0 = tt * BK, nk = imin(BK, a->Nk - j0);
        const float *Et = E + (tt - tfirst) * RMAX * BK, *m = mt + (tt - tfirst) * RMAX;
        for (int64_t g = g0; g < g1; ++g) {
            const int64_t r0 = (g - g0) * ni;
            float c[RT];
            for (int64_t r = 0; r < ni; ++r) {
                const float rl = f->rl[r0 + r], mr = m[r0 + r];
                c[r] = rl > 0.0f && mr > -INFINITY ? expf(mr - f->mk[r0 + r]) * rl : 0.0f;
            }
            col_wsum(share->buf + ((grp - share->grp0) * gr->gh + (g - g0)) * Nkp + j0, Et + r0 * BK, c, ni, nk);
        }
    }
}

/* bytes the forward holds, at most, to compute `received` in the pass with a->nthreads threads (fused.py's budget):
 * each thread's weights buffer (rows × keys) and per-tile maxima, and the threads' shares of the column sums (every
 * head group once, plus one group at each end of a thread's range) */
int64_t attnlens_fused_inpass_bytes(const Args *a) {
    const FwdGrid g = fwd_grid(a);
    const int64_t nt = (a->Nk + BK - 1) / BK, nth = imax(1, a->nthreads);
    const int64_t per_thread = (int64_t)RMAX * nt * (BK + 1) * 4;
    const int64_t shares = (a->B * a->Hkv * g.ngh + nth) * g.gh * nt * BK * 4;
    return nth * per_thread + shares;
}

int attnlens_fused_forward(const Args *a) {
    const int64_t B = a->B, Hq = a->Hq, Hkv = a->Hkv, Nk = a->Nk, G = Hq / Hkv;
    Pack p;
    if (pack_alloc(a, &p, PACK_FWD)) { pack_free(&p); return -1; }
    const FwdGrid gr = fwd_grid(a);
    const int64_t nitems = gr.nitems, Dvp = p.Dvp, Nkp = p.nt * BK;
    const int inpass = a->received != NULL;
    RecShare *shares = inpass ? calloc((size_t)imax(1, a->nthreads), sizeof(RecShare)) : NULL;
    int err = inpass && !shares ? -1 : 0, nth = 1;
    if (!err) {
#pragma omp parallel num_threads(a->nthreads)
    {
        pack_fill(a, &p, PACK_FWD);
        Fwd *f = amalloc(sizeof(Fwd));
        float *S = amalloc((size_t)RMAX * BK * 4), *O = amalloc((size_t)RMAX * Dvp * 4);
        float *tv = amalloc((size_t)RMAX * MAXK * 4);
        int32_t *ti = amalloc((size_t)RMAX * MAXK * 4);
        float *E = inpass ? amalloc((size_t)RMAX * Nkp * 4) : NULL, *mt = inpass ? amalloc((size_t)RMAX * p.nt * 4) : NULL;
        if (!f || !S || !O || !tv || !ti || (inpass && (!E || !mt))) {
#pragma omp atomic write
            err = -1;
        } else {
            f->S = S; f->O = O; f->tv = tv; f->ti = ti;
        }
        if (inpass) {
#pragma omp single
            { /* contiguous ranges of items of about equal work, one per thread */
                nth = omp_get_num_threads();
                int64_t total = 0, acc = 0, t = 0;
                for (int64_t x = 0; x < nitems; ++x) total += fwd_cost(a, &gr, x);
                shares[0].x0 = 0;
                for (int64_t x = 0; x < nitems; ++x) {
                    acc += fwd_cost(a, &gr, x);
                    while (t + 1 < nth && acc * nth >= total * (t + 1)) { shares[t].x1 = x + 1; shares[++t].x0 = x + 1; }
                }
                for (; t < nth; ++t) { shares[t].x1 = nitems; if (t + 1 < nth) shares[t + 1].x0 = nitems; }
            }
            RecShare *sh = &shares[omp_get_thread_num()];
            if (sh->x1 > sh->x0) {
                sh->grp0 = sh->x0 / gr.nqt;
                sh->grp1 = (sh->x1 - 1) / gr.nqt;
                sh->buf = calloc((size_t)((sh->grp1 - sh->grp0 + 1) * gr.gh * Nkp), 4);
                if (!sh->buf) {
#pragma omp atomic write
                    err = -1;
                }
            }
        }
#pragma omp barrier
        if (!err && inpass) {
            const RecShare *sh = &shares[omp_get_thread_num()];
            for (int64_t x = sh->x1 - 1; x >= sh->x0; --x) fwd_item(a, &p, f, &gr, x, E, mt, sh);
        } else if (!err) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t it = 0; it < nitems; ++it) /* the last query tiles first: they see the most keys when causal */
                fwd_item(a, &p, f, &gr, nitems - 1 - it, NULL, NULL, NULL);
        }
        if (inpass) {
#pragma omp barrier
            if (!err) { /* the threads' shares, added in thread order */
#pragma omp for schedule(static)
                for (int64_t bhq = 0; bhq < B * Hq; ++bhq) {
                    const int64_t b = bhq / Hq, h = bhq % Hq, grp = (b * Hkv + h / G) * gr.ngh + h % G / gr.gh;
                    float *dst = a->received + bhq * Nk;
                    for (int t = 0; t < nth; ++t) {
                        const RecShare *sh = &shares[t];
                        if (sh->x1 <= sh->x0 || grp < sh->grp0 || grp > sh->grp1) continue;
                        const float *src = sh->buf + ((grp - sh->grp0) * gr.gh + h % G % gr.gh) * Nkp;
                        for (int64_t j = 0; j < Nk; ++j) dst[j] += src[j];
                    }
                }
            }
        }
        free(f); free(S); free(O); free(tv); free(ti); free(E); free(mt);
    }
    }
    if (shares) for (int t = 0; t < imax(1, a->nthreads); ++t) free(shares[t].buf);
    free(shares);
    pack_free(&p);
    return err;
}

/* ---------------------------------------------------------------------------------------------------------
 * column pass: received, Pᵀ W, pooled, weight rows, from a known lse */

#define CR 48 /* rows per block of the column pass and the backward (a multiple of 12) */

/* the query rows to run for keys [j0, j1): all rows the band lets see them, or those of rowlist among them */
static int64_t gather_rows(const Args *a, int64_t j0, int64_t j1, int64_t *idx) {
    int64_t r0, r1, n = 0;
    rows_of_keys(a, j0, j1, &r0, &r1);
    if (!a->rowlist) {
        for (int64_t i = r0; i < r1; ++i) idx[n++] = i;
        return n;
    }
    for (int64_t x = 0; x < a->nrowlist; ++x)
        if (a->rowlist[x] >= r0 && a->rowlist[x] < r1) idx[n++] = a->rowlist[x];
    return n;
}

static inline void atomic_addf(float *p, float x) {
#pragma omp atomic
    *p += x;
}

/* add the block sums of pacc (keys j0.., nk of them) into one row of pooled, then clear pacc. Key blocks that lie
 * inside this item's keys [ka, kb) are its own; a block it shares with another item is added atomically. */
static void pool_flush(const Args *a, float *pl, float *pacc, int64_t j0, int64_t nk, int64_t ka, int64_t kb) {
    for (int64_t j = 0; j < nk;) {
        const int64_t blk = (j0 + j) / a->bk, end = imin(nk, (blk + 1) * a->bk - j0);
        float sum = 0.0f;
        for (int64_t x = j; x < end; ++x) sum += pacc[x];
        if (blk * a->bk >= ka && (blk + 1) * a->bk <= kb) pl[blk] += sum;
        else atomic_addf(pl + blk, sum);
        j = end;
    }
    memset(pacc, 0, BK * 4);
}

/* one tile row of scores s (BK) becomes its weights exp(s - lse - rd); with `check`, a NaN lse gives NaN where the
 * key is visible (the row's NaN rule) and 0 elsewhere */
#if !FUSED_AVX512 && defined(__AVX2__) && defined(__FMA__)
static inline void col_exp(float *s, float lse, float rd, int check) { /* on 8-float registers, as online_row */
    const __m256 vl = _mm256_set1_ps(lse), vd = _mm256_set1_ps(rd), ninf = _mm256_set1_ps(-INFINITY);
    for (int c = 0; c < BK; c += 8) {
        const __m256 sv = _mm256_loadu_ps(s + c);
        __m256 e = exp8(_mm256_sub_ps(_mm256_sub_ps(sv, vl), vd));
        if (check) e = _mm256_and_ps(_mm256_cmp_ps(sv, ninf, _CMP_NEQ_UQ), e);
        _mm256_storeu_ps(s + c, e);
    }
}
#else
static inline void col_exp(float *s, float lse, float rd, int check) {
    const vf vl = vset(lse), vd = vset(rd);
    for (int v = 0; v < NVK; ++v) {
        const vf sv = vld(s + 16 * v);
        vf e = vexp(vsub(vsub(sv, vl), vd));
        if (check) e = vmaskz(vne(sv, vset(-INFINITY)), e);
        vst(s + 16 * v, e);
    }
}
#endif

/* The column pass. A work item owns CT key tiles of one (batch, kv head) — its columns of received, Pᵀ W and the
 * weight rows are its own — and runs, per query head of the group, the query rows that see them in blocks of CR:
 * a block's rows are set up once and meet the item's tiles one after another (the block's q rows stay in L1). */
#define CT 4

int attnlens_fused_columns(const Args *a) {
    const int64_t B = a->B, Hq = a->Hq, Hkv = a->Hkv, Nq = a->Nq, Nk = a->Nk, G = Hq / Hkv, D = a->D, T = a->T;
    Pack p;
    if (pack_alloc(a, &p, PACK_COL)) { pack_free(&p); return -1; }
    const int64_t nt = p.nt, nr = (nt + CT - 1) / CT, nitems = B * Hkv * nr;
    const int64_t nbk = a->pooled ? (Nk + a->bk - 1) / a->bk : 0, nbq = a->pooled ? (Nq + a->bq - 1) / a->bq : 0;
    const int want_e = a->received || a->pooled || a->rf || a->wrows;
    int err = 0;
#pragma omp parallel num_threads(a->nthreads)
    {
        pack_fill(a, &p, PACK_COL);
        float *S = amalloc((size_t)CR * BK * 4), *rec = amalloc((size_t)CT * BK * 4), *pacc = amalloc((size_t)CT * BK * 4);
        float *racc = amalloc((size_t)CT * imax(T, 1) * BK * 4), *wb = amalloc((size_t)CR * imax(T, 1) * 4);
        int64_t *idx = amalloc((size_t)imax(Nq, 1) * 8);
        Row *rows = amalloc(sizeof(Row) * CR);
        const float **qrow = amalloc(sizeof(float *) * CR);
        float *lse = amalloc(2 * CR * 4), *rd = lse + CR; /* the rows' lse and their rounding (rowd) */
        if (!S || !rec || !pacc || !racc || !wb || !idx || !rows || !qrow || !lse) {
#pragma omp atomic write
            err = -1;
        }
#pragma omp barrier
        if (!err && want_e) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t it = 0; it < nitems; ++it) {
                const int64_t rr = it % nr, bh = it / nr, b = bh / Hkv, hk = bh % Hkv;
                const int64_t t0 = rr * CT, t1 = imin(nt, t0 + CT), ka = t0 * BK, kb = imin(Nk, t1 * BK);
                const int64_t nrow = gather_rows(a, ka, kb, idx);
                for (int64_t g = 0; g < G; ++g) {
                    const int64_t h = hk * G + g, bhq = b * Hq + h;
                    int64_t cur_qb[CT];
                    for (int64_t x = 0; x < CT; ++x) cur_qb[x] = -1;
                    memset(rec, 0, (size_t)CT * BK * 4);
                    memset(pacc, 0, (size_t)CT * BK * 4);
                    if (a->rf) memset(racc, 0, (size_t)CT * T * BK * 4);
                    for (int64_t x0 = 0; x0 < nrow; x0 += CR) {
                        const int64_t n = imin(CR, nrow - x0);
                        int64_t R = 0;
                        for (; R < n; ++R) {
                            row_init(a, &p, &rows[R], b, h, idx[x0 + R]);
                            const float ls = a->lse_in[bhq * Nq + rows[R].i];
                            lse[R] = ls == -INFINITY ? INFINITY : ls; /* a row that sees nothing: weight 0 */
                            rd[R] = a->rowd ? a->rowd[bhq * Nq + rows[R].i] : 0.0f;
                        }
                        while (R % RQ) { row_init(a, &p, &rows[R], b, -1, 0); lse[R] = INFINITY; rd[R] = 0.0f; ++R; }
                        for (int64_t r = 0; r < R; ++r) qrow[r] = rows[r].q;
                        if (a->rf)
                            for (int64_t r = 0; r < n; ++r) {
                                const int64_t wo = b * a->sw[0] + h * a->sw[1] + rows[r].i * a->sw[2];
                                for (int64_t t = 0; t < T; ++t) wb[r * T + t] = a->w[wo + t * a->sw[3]];
                            }
                        for (int64_t tt = t0; tt < t1; ++tt) {
                            const int64_t j0 = tt * BK, nk = imin(BK, Nk - j0), tl = tt - t0;
                            int64_t ra, rb;
                            rows_of_keys(a, j0, j0 + nk, &ra, &rb);
                            if (rows[0].i >= rb || rows[n - 1].i < ra) continue; /* no row of the block sees this tile */
                            qk(R, qrow, D, p.kt + (bh * nt + tt) * D * BK, S);
                            for (int64_t r = 0; r < n; ++r) { /* P = exp(s - lse) */
                                float *s = S + r * BK;
                                prep_row(a, &rows[r], s, NULL, j0);
                                col_exp(s, lse[r], rd[r], a->check);
                                if (a->wrows && a->wpos[rows[r].i] >= 0)
                                    memcpy(a->wrows + ((bhq * a->nwrows + a->wpos[rows[r].i]) * Nk) + j0, s, (size_t)nk * 4);
                                if (a->pooled) {
                                    const int64_t qb = rows[r].i / a->bq;
                                    if (qb != cur_qb[tl]) {
                                        if (cur_qb[tl] >= 0)
                                            pool_flush(a, a->pooled + (bhq * nbq + cur_qb[tl]) * nbk, pacc + tl * BK, j0, nk, ka, kb);
                                        cur_qb[tl] = qb;
                                    }
                                    for (int v = 0; v < NVK; ++v)
                                        vst(pacc + tl * BK + 16 * v, vadd(vld(pacc + tl * BK + 16 * v), vld(s + 16 * v)));
                                }
                            }
                            if (a->received) col_wsum(rec + tl * BK, S, NULL, n, BK); /* column sums of the block's weights */
                            if (a->rf)
                                for (int64_t t = 0; t < T; ++t)
                                    for (int v = 0; v < NVK; ++v) {
                                        float *ra_ = racc + (tl * T + t) * BK + 16 * v;
                                        vf acc = vld(ra_);
                                        for (int64_t r = 0; r < n; ++r) acc = vfma(vset(wb[r * T + t]), vld(S + r * BK + 16 * v), acc);
                                        vst(ra_, acc);
                                    }
                        }
                    }
                    for (int64_t tt = t0; tt < t1; ++tt) {
                        const int64_t j0 = tt * BK, nk = imin(BK, Nk - j0), tl = tt - t0;
                        if (a->pooled && cur_qb[tl] >= 0)
                            pool_flush(a, a->pooled + (bhq * nbq + cur_qb[tl]) * nbk, pacc + tl * BK, j0, nk, ka, kb);
                        if (a->received) memcpy(a->received + bhq * Nk + j0, rec + tl * BK, (size_t)nk * 4);
                        if (a->rf)
                            for (int64_t j = 0; j < nk; ++j)
                                for (int64_t t = 0; t < T; ++t) a->rf[(bhq * Nk + j0 + j) * T + t] = racc[(tl * T + t) * BK + j];
                    }
                }
            }
        }
        free(S); free(rec); free(pacc); free(racc); free(wb); free(idx); free(rows); free(qrow); free(lse);
    }
    pack_free(&p);
    return err;
}

/* ---------------------------------------------------------------------------------------------------------
 * backward: key-tile-major. A work item owns a range of keys (so dK, dV tiles are its own) and runs every query
 * row that sees them, for the G query heads of its key/value head. dQ rows are shared by items: they are added
 * into one accumulator when each (b, kv head) is one item, else into one per thread, summed at the end. */
int attnlens_fused_backward(const Args *a) {
    const int64_t B = a->B, Hq = a->Hq, Hkv = a->Hkv, Nq = a->Nq, Nk = a->Nk, G = Hq / Hkv, D = a->D, Dv = a->Dv;
    Pack p;
    if (pack_alloc(a, &p, PACK_BWD)) { pack_free(&p); return -1; }
    const int64_t nt = p.nt, Dp = p.Dp, Dvp = p.Dvp, nthr = imax(1, a->nthreads);
    /* key ranges per (b, kv head): one when there are enough (b, kv head) items for the threads */
    const int64_t nsplit = B * Hkv >= 2 * nthr ? 1 : imax(1, imin(nt, (4 * nthr + B * Hkv - 1) / (B * Hkv)));
    const int64_t per = (nt + nsplit - 1) / nsplit, nitems = B * Hkv * nsplit;
    const int64_t ndq = nsplit > 1 ? nthr : 1;
    const size_t dqn = (size_t)(B * Hq * Nq * Dp);
    float *dqa = amalloc(dqn * 4 * (size_t)ndq);
    const float cfac = a->softcap > 0 ? a->softcap : 1.0f; /* dK = c · dS'ᵀ (q · scale / c) */
    int err = dqa ? 0 : -1;
    if (!err) {
#pragma omp parallel num_threads(a->nthreads)
        {
            pack_fill(a, &p, PACK_BWD);
            const int tid = omp_get_thread_num();
            float *mydq = dqa + (ndq > 1 ? (size_t)tid : 0) * dqn;
#pragma omp for schedule(static)
            for (int64_t x = 0; x < (int64_t)(dqn * (size_t)ndq); ++x) dqa[x] = 0.0f;
            float *S = amalloc((size_t)CR * BK * 4), *dP = amalloc((size_t)CR * BK * 4);
            float *dc = a->softcap > 0 ? amalloc((size_t)CR * BK * 4) : NULL;
            float *dK = amalloc((size_t)BK * Dp * 4), *dV = amalloc((size_t)BK * Dvp * 4);
            float *scratch = amalloc((size_t)Dp * 4);
            int64_t *idx = amalloc((size_t)imax(Nq, 1) * 8);
            Row *rows = amalloc(sizeof(Row) * CR);
            const float **qrow = amalloc(sizeof(float *) * CR), **dorow = amalloc(sizeof(float *) * CR);
            float **dqrow = amalloc(sizeof(float *) * CR);
            float *lse = amalloc(2 * CR * 4), *rd = lse + CR, *dl = amalloc(CR * 4);
            if (!S || !dP || (a->softcap > 0 && !dc) || !dK || !dV || !scratch || !idx || !rows || !qrow || !dorow ||
                !dqrow || !lse || !dl) {
#pragma omp atomic write
                err = -1;
            }
#pragma omp barrier
            if (!err) {
#pragma omp for schedule(dynamic, 1)
                for (int64_t it = 0; it < nitems; ++it) {
                    const int64_t rr = it % nsplit, bh = it / nsplit, b = bh / Hkv, hk = bh % Hkv;
                    for (int64_t tt = rr * per; tt < imin(nt, rr * per + per); ++tt) {
                        const int64_t j0 = tt * BK, nk = imin(BK, Nk - j0);
                        const int64_t nrow = gather_rows(a, j0, j0 + nk, idx);
                        if (!nrow) continue;
                        memset(dK, 0, (size_t)BK * Dp * 4);
                        memset(dV, 0, (size_t)BK * Dvp * 4);
                        const float *kt = p.kt + (bh * nt + tt) * D * BK, *vt = p.vt + (bh * nt + tt) * Dv * BK;
                        const float *kp = p.kp + (bh * Nk + j0) * Dp;
                        for (int64_t g = 0; g < G; ++g) {
                            const int64_t h = hk * G + g, bhq = b * Hq + h;
                            for (int64_t x0 = 0; x0 < nrow; x0 += CR) {
                                const int64_t n = imin(CR, nrow - x0);
                                int64_t R = 0;
                                for (; R < n; ++R) {
                                    const int64_t i = idx[x0 + R];
                                    row_init(a, &p, &rows[R], b, h, i);
                                    dorow[R] = p.dop + (bhq * Nq + i) * Dvp;
                                    dqrow[R] = mydq + (bhq * Nq + i) * Dp;
                                    const float ls = a->lse_in[bhq * Nq + i];
                                    lse[R] = ls == -INFINITY ? INFINITY : ls; /* a row that sees nothing: P = 0 */
                                    rd[R] = a->rowd ? a->rowd[bhq * Nq + i] : 0.0f;
                                    dl[R] = p.delta[bhq * Nq + i];
                                }
                                while (R % 12) {
                                    row_init(a, &p, &rows[R], b, -1, 0);
                                    dorow[R] = p.zero;
                                    dqrow[R] = scratch;
                                    lse[R] = INFINITY;
                                    rd[R] = 0.0f;
                                    dl[R] = 0.0f;
                                    ++R;
                                }
                                for (int64_t r = 0; r < R; ++r) qrow[r] = rows[r].q;
                                qk(R, qrow, D, kt, S);                           /* S = Q Kᵀ */
                                for (int64_t r = 0; r < R; ++r) {                 /* P = exp(s - lse) */
                                    float *s = S + r * BK;
                                    if (r < n) prep_row(a, &rows[r], s, dc ? dc + r * BK : NULL, j0);
                                    else if (dc) memset(dc + r * BK, 0, BK * 4); /* a padding row: no stale NaN */
                                    if (r < n) col_exp(s, lse[r], rd[r], a->check);
                                    else memset(s, 0, BK * 4);
                                }
                                outer(dV, Dvp, S, BK, dorow, R);                  /* dV += Pᵀ dO */
                                qk(R, dorow, Dv, vt, dP);                         /* dP = dO Vᵀ */
                                for (int64_t r = 0; r < R; ++r) {                 /* dS = P ∘ (dP - Δ) [∘ (1 - tanh²)] */
                                    const vf vd = vset(dl[r]);
                                    for (int v = 0; v < NVK; ++v) {
                                        vf ds = vmul(vld(S + r * BK + 16 * v), vsub(vld(dP + r * BK + 16 * v), vd));
                                        if (dc) ds = vmul(ds, vld(dc + r * BK + 16 * v));
                                        vst(dP + r * BK + 16 * v, ds);
                                    }
                                }
                                outer(dK, Dp, dP, BK, qrow, R);                   /* dK += dSᵀ Q */
                                pv(R, Dp, dqrow, NULL, dP, BK, kp, Dp, nk);       /* dQ += dS K */
                            }
                        }
                        float *dk = a->dk + (bh * Nk + j0) * D, *dv = a->dv + (bh * Nk + j0) * Dv;
                        for (int64_t j = 0; j < nk; ++j) {
                            for (int64_t c = 0; c < D; ++c) dk[j * D + c] += cfac * dK[j * Dp + c];
                            for (int64_t c = 0; c < Dv; ++c) dv[j * Dv + c] += dV[j * Dvp + c];
                        }
                    }
                }
            }
#pragma omp barrier
            if (!err) {
#pragma omp for schedule(static)
                for (int64_t r = 0; r < B * Hq * Nq; ++r) {
                    float *dq = a->dq + r * D;
                    for (int64_t t = 0; t < ndq; ++t) {
                        const float *src = dqa + (size_t)t * dqn + (size_t)r * Dp;
                        for (int64_t c = 0; c < D; ++c) dq[c] += src[c];
                    }
                }
            }
            free(S); free(dP); free(dc); free(dK); free(dV); free(scratch); free(idx); free(rows); free(qrow);
            free(dorow); free(dqrow); free(lse); free(dl);
        }
    }
    free(dqa);
    pack_free(&p);
    return err;
}
