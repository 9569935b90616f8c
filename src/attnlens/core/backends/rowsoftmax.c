/* attnlens: one fused pass per row of a chunk of attention scores (float32).
 *
 * For each row x[0..n) of a contiguous (R, n) block, in place:
 *   m  = max_j x_j                      (rows whose max is <= dead_below, i.e. -inf: no key seen, m := 0)
 *   top-k (value, index) of x, largest first, before x is overwritten   (k <= 64)
 *   x_j := e_j = exp(x_j - m) ;  l = sum_j e_j ;  t = sum_{j: e_j > 0} e_j (x_j - m)
 * Masked keys hold -inf (e_j = 0; they are left out of t, where 0 * -inf would be NaN); a NaN score makes
 * e_j and l NaN (the caller marks such rows).
 * The row is read from memory once; the later loops run while it sits in L1/L2.
 * Built on first use by attnlens/_backends/_native.py with the machine's C compiler. */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* exp for x <= 0, vectorisable: x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 polynomial
 * (Cephes expf coefficients, ~1 ulp); x < -87 (below FLT_MIN) gives exactly 0; NaN stays NaN. */
static inline float exp_neg(float x) {
    float xc = x < -87.0f ? -87.0f : x;
    float n = floorf(xc * 1.44269504088896341f + 0.5f);
    float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float p2;
    memcpy(&p2, &bits, sizeof p2);
    return x < -87.0f ? 0.0f : y * p2;
}

void attnlens_rowsoftmax_f32(float *s, int64_t R, int64_t n, int64_t k, float dead_below, float *m_out,
                             float *l_out, float *t_out, float *top_v, int64_t *top_i, int32_t nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t r = 0; r < R; ++r) {
        float *x = s + r * n;
        float m = -INFINITY;
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
        if (k > 0) {
            float *tv = top_v + r * k;
            int64_t *ti = top_i + r * k;
            for (int64_t a = 0; a < k; ++a) { tv[a] = -INFINITY; ti[a] = -1; }
            for (int64_t j0 = 0; j0 < n; j0 += 16) { /* skip blocks that cannot beat the k-th value */
                int64_t j1 = j0 + 16 < n ? j0 + 16 : n;
                float bm = -INFINITY;
#pragma omp simd reduction(max : bm)
                for (int64_t j = j0; j < j1; ++j) bm = x[j] > bm ? x[j] : bm;
                if (!(bm > tv[k - 1])) continue;
                for (int64_t j = j0; j < j1; ++j) {
                    float v = x[j];
                    if (v > tv[k - 1]) { /* insert, keeping tv sorted descending; ties keep the lower index */
                        int64_t a = k - 1;
                        while (a > 0 && tv[a - 1] < v) { tv[a] = tv[a - 1]; ti[a] = ti[a - 1]; --a; }
                        tv[a] = v; ti[a] = j;
                    }
                }
            }
        }
        if (m <= dead_below) m = 0.0f; /* every key masked: e becomes exactly 0 */
        float l = 0.0f, t = 0.0f;
#pragma omp simd reduction(+ : l, t)
        for (int64_t j = 0; j < n; ++j) {
            float d = x[j] - m;
            float e = exp_neg(d);
            x[j] = e;
            l += e;
            t += e > 0.0f ? e * d : 0.0f;
        }
        m_out[r] = m; l_out[r] = l; t_out[r] = t;
    }
}
