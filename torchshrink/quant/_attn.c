/* Attention in float32 (torchshrink.quant.attention): BERT-family encoder blocks and the decoder prefill copy.
 *
 * ts_attention: out[b, i, h*D + d] = sum_j softmax_j(scale * q_i . k_j + mask(b, i, j)) v_j[d]
 *   for every batch b, head h and query i (see its comment below for strides, grouped-query heads, causal).
 *   mask:    NULL, or madd[b*mb + i*mq + j] added to the score (a large negative number masks the key; a boolean
 *            mask arrives converted); mq = 0 for a key-padding mask shared by every query.
 *   out:     [B, Sq, H*D] contiguous, written directly in the layout the output projection reads.
 * One (batch, head) pair per task: K^T staged once in a per-thread buffer (keys padded to a multiple of 16),
 * the scores of 4 queries at a time accumulated in registers, softmax with a polynomial exp (relative error
 * ~2e-7, the Cephes expf reduction), then P V for the same 4 queries. A query whose every key is masked gets
 * zeros (torch's SDPA: NaN). Against torch's flash-attention CPU kernel at MiniLM's shapes:
 * benchmarks/results/attention.md.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define QB 4          /* queries per register block */
#define KB 16         /* keys per register block */
#define PF 16         /* keys (or queries) ahead to prefetch */
#define MASKED -1e30f /* a masked or padded score; exp gives exactly 0 */

static inline float exp_clamped(float xc) { /* exp(xc) for -87 <= xc <= 0 */
    float t = xc * 1.44269504088896341f + 12582912.f; /* 1.5 * 2^23: t - 1.5 * 2^23 = round(xc / ln 2) */
    float n = t - 12582912.f;
    float r = xc - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    union { int32_t i; float f; } two_n;
    two_n.i = ((int32_t)n + 127) << 23;
    return p * two_n.f;
}

/* scores of 4 queries (rows q0..q3, D long) against the first n16 staged keys: sc[r * S16 + j] */
static inline __attribute__((always_inline)) void scores4(const float *q0, const float *q1, const float *q2,
                                                            const float *q3, const float *kt, int64_t S16, int64_t n16,
                                                            int64_t D, float scale, float *sc) {
    for (int64_t j0 = 0; j0 < n16; j0 += KB) {
        float a0[KB] = {0}, a1[KB] = {0}, a2[KB] = {0}, a3[KB] = {0};
        for (int64_t d = 0; d < D; d++) {
            const float *kr = kt + d * S16 + j0;
            float x0 = q0[d], x1 = q1[d], x2 = q2[d], x3 = q3[d];
            for (int u = 0; u < KB; u++) {
                a0[u] += x0 * kr[u];
                a1[u] += x1 * kr[u];
                a2[u] += x2 * kr[u];
                a3[u] += x3 * kr[u];
            }
        }
        for (int u = 0; u < KB; u++) {
            sc[j0 + u] = a0[u] * scale;
            sc[S16 + j0 + u] = a1[u] * scale;
            sc[2 * S16 + j0 + u] = a2[u] * scale;
            sc[3 * S16 + j0 + u] = a3[u] * scale;
        }
    }
}

/* softmax of one row of S scores in place (masked first); returns 1 / sum, or 0 when every key is masked */
static inline float softmax_row(float *row, int64_t S, const float *ma) {
    if (ma)
        for (int64_t j = 0; j < S; j++) row[j] += ma[j];
    float mx = MASKED;
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < S; j++) mx = row[j] > mx ? row[j] : mx;
    if (!(mx > 0.5f * MASKED)) return 0.f;
    for (int64_t j = 0; j < S; j++) { /* masked keys: exp(-87) < 2e-38 instead of 0 */
        float x = row[j] - mx;
        row[j] = x < -87.f ? -87.f : x;
    }
    for (int64_t j = 0; j < S; j++) row[j] = exp_clamped(row[j]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < S; j++) sum += row[j];
    return 1.f / sum;
}

/* acc[r * D + d] = sum_j p_r[j] v_j[d] for the 4 probability rows; 16 value columns at a time in registers
 * (D a multiple of 16), else one pass per key over the accumulators in memory */
static inline __attribute__((always_inline)) void pv4(const float *sc, int64_t S16, const float *vb, int64_t rs,
                                                        int64_t S, int64_t D, float *acc) {
    if (D % KB == 0) {
        for (int64_t d0 = 0; d0 < D; d0 += KB) {
            float a0[KB] = {0}, a1[KB] = {0}, a2[KB] = {0}, a3[KB] = {0};
            for (int64_t j = 0; j < S; j++) {
                const float *vr = vb + j * rs + d0;
                float p0 = sc[j], p1 = sc[S16 + j], p2 = sc[2 * S16 + j], p3 = sc[3 * S16 + j];
                for (int u = 0; u < KB; u++) {
                    a0[u] += p0 * vr[u];
                    a1[u] += p1 * vr[u];
                    a2[u] += p2 * vr[u];
                    a3[u] += p3 * vr[u];
                }
            }
            for (int u = 0; u < KB; u++) {
                acc[d0 + u] = a0[u];
                acc[D + d0 + u] = a1[u];
                acc[2 * D + d0 + u] = a2[u];
                acc[3 * D + d0 + u] = a3[u];
            }
        }
        return;
    }
    memset(acc, 0, sizeof(float) * QB * D);
    for (int64_t j = 0; j < S; j++) {
        const float *vr = vb + j * rs;
        float p0 = sc[j], p1 = sc[S16 + j], p2 = sc[2 * S16 + j], p3 = sc[3 * S16 + j];
        for (int64_t d = 0; d < D; d++) {
            float x = vr[d];
            acc[d] += p0 * x;
            acc[D + d] += p1 * x;
            acc[2 * D + d] += p2 * x;
            acc[3 * D + d] += p3 * x;
        }
    }
}

static inline __attribute__((always_inline)) void head(const float *qb, int64_t qss, const float *kb, int64_t kss,
                                                         const float *vb, int64_t vss, int64_t Sq, int64_t Skv,
                                                         int64_t D, float scale, const float *madd, int64_t mq,
                                                         int causal, float *ob, int64_t orow, float *kt, float *vs,
                                                         float *sc, float *acc) {
    int64_t S16 = (Skv + KB - 1) / KB * KB, off = Skv - Sq; /* causal: query i sees keys j <= i + off */
    /* K^T and V staged key by key: each key's row is read once, contiguously. (Reading K column by column
     * touched every key row D times; rows of a fused Q/K/V output lie 3 * H * D floats apart, a stride that
     * maps them onto a few L1 sets, so those reads came from L2: ~11% of the kernel's time at MiniLM's shapes.) */
    for (int64_t j = 0; j < Skv; j++) {
        const float *kr = kb + j * kss, *vr = vb + j * vss;
        if (j + PF < Skv) /* rows far apart defeat the hardware prefetcher: ask for the row PF keys ahead */
            for (int64_t c = 0; c < D; c += 16) {
                __builtin_prefetch(kr + PF * kss + c);
                __builtin_prefetch(vr + PF * vss + c);
            }
        for (int64_t d = 0; d < D; d++) kt[d * S16 + j] = kr[d];
        memcpy(vs + j * D, vr, sizeof(float) * (size_t)D);
    }
    for (int64_t d = 0; d < D; d++)
        for (int64_t j = Skv; j < S16; j++) kt[d * S16 + j] = 0.f;
    for (int64_t i0 = 0; i0 < Sq; i0 += QB) {
        int64_t nq = Sq - i0 < QB ? Sq - i0 : QB;
        int64_t kmax = causal ? (i0 + nq + off < Skv ? i0 + nq + off : Skv) : Skv;
        const float *q0 = qb + i0 * qss;
        for (int64_t r = QB; r < 2 * QB && i0 + r < Sq; r++)
            for (int64_t c = 0; c < D; c += 16) __builtin_prefetch(q0 + r * qss + c);
        scores4(q0, nq > 1 ? q0 + qss : q0, nq > 2 ? q0 + 2 * qss : q0, nq > 3 ? q0 + 3 * qss : q0, kt, S16,
                (kmax + KB - 1) / KB * KB, D, scale, sc);
        float inv[QB] = {0};
        for (int64_t r = 0; r < nq; r++) {
            int64_t lim = causal ? (i0 + r + 1 + off < Skv ? i0 + r + 1 + off : Skv) : Skv;
            float *row = sc + r * S16;
            inv[r] = lim > 0 ? softmax_row(row, lim, madd ? madd + (i0 + r) * mq : NULL) : 0.f;
            for (int64_t j = lim > 0 ? lim : 0; j < kmax; j++) row[j] = 0.f;
        }
        pv4(sc, S16, vs, D, kmax, D, acc);
        for (int64_t r = 0; r < nq; r++) {
            float *o = ob + (i0 + r) * orow;
            for (int64_t d = 0; d < D; d++) o[d] = acc[r * D + d] * inv[r];
        }
    }
}

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define TS_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

/* float -> bfloat16 bits, round to nearest even (finite inputs) */
static inline uint32_t bf16_bits(float x) {
    union { float f; uint32_t u; } c = {x};
    return (c.u + 0x7FFFu + ((c.u >> 16) & 1u)) >> 16;
}
static inline uint32_t bf16_pair(float lo, float hi) { return bf16_bits(lo) | (bf16_bits(hi) << 16); }

/* The same attention with bfloat16 products and float32 sums (AVX-512 BF16 vdpbf16ps: two products per lane
 * per instruction). K^T staged as pairs over the head dimension ([D/2][S32]: components 2d and 2d+1 of one
 * key in one 32-bit word), V as pairs over keys ([S/2][D]), queries and softmax probabilities rounded to
 * bf16 pairs as they are used; softmax in float32. Register blocks of 4 queries x 32 keys (scores) and
 * 4 queries x 32 value columns (P V): each broadcast query / probability pair serves two instructions.
 * D a multiple of 32; sc holds QB rows of S32 scores. */
#define KB2 32
TS_BF16_TARGET static void head_bf16(const float *qb, int64_t qss, const float *kb, int64_t kss, const float *vb,
                                     int64_t vss, int64_t Sq, int64_t Skv, int64_t D, float scale,
                                     const float *madd, int64_t mq, int causal, float *ob, int64_t orow,
                                     uint32_t *kt, uint32_t *vt, uint32_t *pp, float *sc, float *acc) {
    int64_t S32 = (Skv + KB2 - 1) / KB2 * KB2, off = Skv - Sq, D2 = D / 2, P2 = S32 / 2;
    uint32_t qp[QB][256];
    for (int64_t j = 0; j < Skv; j++) {
        const float *kr = kb + j * kss, *vr = vb + j * vss;
        if (j + PF < Skv)
            for (int64_t c = 0; c < D; c += 16) {
                __builtin_prefetch(kr + PF * kss + c);
                __builtin_prefetch(vr + PF * vss + c);
            }
        for (int64_t d = 0; d < D2; d++) kt[d * S32 + j] = bf16_pair(kr[2 * d], kr[2 * d + 1]);
        uint16_t *vh = (uint16_t *)(vt + (j / 2) * D) + (j & 1);
        for (int64_t d = 0; d < D; d++) vh[2 * d] = (uint16_t)bf16_bits(vr[d]);
    }
    for (int64_t d = 0; d < D2; d++)
        for (int64_t j = Skv; j < S32; j++) kt[d * S32 + j] = 0u;
    if (Skv & 1) /* the odd last key's partner in its V pair */
        for (int64_t d = 0; d < D; d++) ((uint16_t *)(vt + (Skv / 2) * D))[2 * d + 1] = 0;
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int64_t i0 = 0; i0 < Sq; i0 += QB) {
        int64_t nq = Sq - i0 < QB ? Sq - i0 : QB;
        int64_t kmax = causal ? (i0 + nq + off < Skv ? i0 + nq + off : Skv) : Skv;
        for (int64_t r = QB; r < 2 * QB && i0 + r < Sq; r++)
            for (int64_t c = 0; c < D; c += 16) __builtin_prefetch(qb + (i0 + r) * qss + c);
        for (int64_t r = 0; r < QB; r++) {
            const float *qr = qb + (i0 + (r < nq ? r : 0)) * qss;
            for (int64_t d = 0; d < D2; d++) qp[r][d] = bf16_pair(qr[2 * d], qr[2 * d + 1]);
        }
        int64_t n32 = (kmax + KB2 - 1) / KB2 * KB2;
        for (int64_t j0 = 0; j0 < n32; j0 += KB2) {
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
            for (int64_t d = 0; d < D2; d++) {
                __m512bh k0 = (__m512bh)_mm512_loadu_si512((const void *)(kt + d * S32 + j0));
                __m512bh k1 = (__m512bh)_mm512_loadu_si512((const void *)(kt + d * S32 + j0 + 16));
                __m512bh x;
                x = (__m512bh)_mm512_set1_epi32((int)qp[0][d]);
                a0 = _mm512_dpbf16_ps(a0, k0, x);
                b0 = _mm512_dpbf16_ps(b0, k1, x);
                x = (__m512bh)_mm512_set1_epi32((int)qp[1][d]);
                a1 = _mm512_dpbf16_ps(a1, k0, x);
                b1 = _mm512_dpbf16_ps(b1, k1, x);
                x = (__m512bh)_mm512_set1_epi32((int)qp[2][d]);
                a2 = _mm512_dpbf16_ps(a2, k0, x);
                b2 = _mm512_dpbf16_ps(b2, k1, x);
                x = (__m512bh)_mm512_set1_epi32((int)qp[3][d]);
                a3 = _mm512_dpbf16_ps(a3, k0, x);
                b3 = _mm512_dpbf16_ps(b3, k1, x);
            }
            _mm512_storeu_ps(sc + j0, _mm512_mul_ps(a0, vscale));
            _mm512_storeu_ps(sc + j0 + 16, _mm512_mul_ps(b0, vscale));
            _mm512_storeu_ps(sc + S32 + j0, _mm512_mul_ps(a1, vscale));
            _mm512_storeu_ps(sc + S32 + j0 + 16, _mm512_mul_ps(b1, vscale));
            _mm512_storeu_ps(sc + 2 * S32 + j0, _mm512_mul_ps(a2, vscale));
            _mm512_storeu_ps(sc + 2 * S32 + j0 + 16, _mm512_mul_ps(b2, vscale));
            _mm512_storeu_ps(sc + 3 * S32 + j0, _mm512_mul_ps(a3, vscale));
            _mm512_storeu_ps(sc + 3 * S32 + j0 + 16, _mm512_mul_ps(b3, vscale));
        }
        float inv[QB] = {0};
        for (int64_t r = 0; r < nq; r++) {
            int64_t lim = causal ? (i0 + r + 1 + off < Skv ? i0 + r + 1 + off : Skv) : Skv;
            float *row = sc + r * S32;
            inv[r] = lim > 0 ? softmax_row(row, lim, madd ? madd + (i0 + r) * mq : NULL) : 0.f;
            for (int64_t j = lim > 0 ? lim : 0; j < n32; j++) row[j] = 0.f;
        }
        for (int64_t r = nq; r < QB; r++) /* rows past the last query: zeros (their output is not written) */
            for (int64_t j = 0; j < n32; j++) sc[r * S32 + j] = 0.f;
        int64_t kp = (kmax + 1) / 2; /* key pairs (an odd last key pairs with a zeroed score) */
        for (int64_t r = 0; r < QB; r++)
            for (int64_t jp = 0; jp < kp; jp++) pp[r * P2 + jp] = bf16_pair(sc[r * S32 + 2 * jp], sc[r * S32 + 2 * jp + 1]);
        for (int64_t d0 = 0; d0 < D; d0 += 32) {
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
            for (int64_t jp = 0; jp < kp; jp++) {
                __m512bh v0 = (__m512bh)_mm512_loadu_si512((const void *)(vt + jp * D + d0));
                __m512bh v1 = (__m512bh)_mm512_loadu_si512((const void *)(vt + jp * D + d0 + 16));
                __m512bh x;
                x = (__m512bh)_mm512_set1_epi32((int)pp[jp]);
                a0 = _mm512_dpbf16_ps(a0, v0, x);
                b0 = _mm512_dpbf16_ps(b0, v1, x);
                x = (__m512bh)_mm512_set1_epi32((int)pp[P2 + jp]);
                a1 = _mm512_dpbf16_ps(a1, v0, x);
                b1 = _mm512_dpbf16_ps(b1, v1, x);
                x = (__m512bh)_mm512_set1_epi32((int)pp[2 * P2 + jp]);
                a2 = _mm512_dpbf16_ps(a2, v0, x);
                b2 = _mm512_dpbf16_ps(b2, v1, x);
                x = (__m512bh)_mm512_set1_epi32((int)pp[3 * P2 + jp]);
                a3 = _mm512_dpbf16_ps(a3, v0, x);
                b3 = _mm512_dpbf16_ps(b3, v1, x);
            }
            _mm512_storeu_ps(acc + d0, a0);
            _mm512_storeu_ps(acc + d0 + 16, b0);
            _mm512_storeu_ps(acc + D + d0, a1);
            _mm512_storeu_ps(acc + D + d0 + 16, b1);
            _mm512_storeu_ps(acc + 2 * D + d0, a2);
            _mm512_storeu_ps(acc + 2 * D + d0 + 16, b2);
            _mm512_storeu_ps(acc + 3 * D + d0, a3);
            _mm512_storeu_ps(acc + 3 * D + d0 + 16, b3);
        }
        for (int64_t r = 0; r < nq; r++) {
            float *o = ob + (i0 + r) * orow;
            for (int64_t d = 0; d < D; d++) o[d] = acc[r * D + d] * inv[r];
        }
    }
}

int ts_has_bf16(void) { return __builtin_cpu_supports("avx512bf16"); }
#else
int ts_has_bf16(void) { return 0; }
#endif

/* ts_attention: the general form. q [B, H, Sq, D] and k, v [B, Hkv, Skv, D] given by strides (batch, head, row;
 * D contiguous); query head h reads key/value head h / (H / Hkv) (grouped-query attention); causal: query i
 * (of the last Sq positions) sees keys j <= i + Skv - Sq; madd as above over [B, 1, Sq or 1, Skv].
 * bf16: products in bfloat16 (head_bf16) where the CPU has AVX-512 BF16 and D is a multiple of 32, else float32.
 * out: [B, Sq, H * D] contiguous. Returns 0, or -1 when a scratch buffer could not be allocated. */
int ts_attention(const float *q, const float *k, const float *v, int64_t B, int64_t Sq, int64_t Skv, int64_t H,
                 int64_t Hkv, int64_t D, int64_t qsb, int64_t qsh, int64_t qss, int64_t ksb, int64_t ksh, int64_t kss,
                 int64_t vsb, int64_t vsh, int64_t vss, float scale, const float *madd, int64_t mb, int64_t mq,
                 int causal, int bf16, float *out, int threads) {
    int64_t S16 = (Skv + KB - 1) / KB * KB, tasks = B * H, orow = H * D, group = H / Hkv;
#if defined(__x86_64__) || defined(_M_X64)
    bf16 = bf16 && D % 32 == 0 && D <= 512 && ts_has_bf16();
#else
    bf16 = 0;
#endif
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        /* float32: K^T, V, QB score rows of S16, QB output rows; bf16: the same with S32 (>= S16) */
        int64_t S32 = (Skv + 31) / 32 * 32;
        float *kt = (float *)malloc(sizeof(float) * (size_t)(2 * D * S32 + QB * S32 + QB * D));
        if (!kt) failed = 1;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; t++) {
            if (!kt) continue;
            int64_t b = t / H, h = t % H, g = h / group;
            const float *qb = q + b * qsb + h * qsh, *kb = k + b * ksb + g * ksh, *vb = v + b * vsb + g * vsh;
            const float *mab = madd ? madd + b * mb : NULL;
            float *ob = out + b * Sq * orow + h * D, *vs = kt + D * S16, *sc = vs + D * S16, *acc = sc + QB * S16;
#if defined(__x86_64__) || defined(_M_X64)
            if (bf16) { /* K^T pairs, V pairs and probability pairs in the first 2 * D * S32 words */
                uint32_t *kw = (uint32_t *)kt;
                float *sc2 = kt + 2 * D * S32;
                head_bf16(qb, qss, kb, kss, vb, vss, Sq, Skv, D, scale, mab, mq, causal, ob, orow, kw, kw + D / 2 * S32,
                          kw + D * S32, sc2, sc2 + QB * S32);
                continue;
            }
#endif
            if (D == 32)
                head(qb, qss, kb, kss, vb, vss, Sq, Skv, 32, scale, mab, mq, causal, ob, orow, kt, vs, sc, acc);
            else if (D == 64)
                head(qb, qss, kb, kss, vb, vss, Sq, Skv, 64, scale, mab, mq, causal, ob, orow, kt, vs, sc, acc);
            else
                head(qb, qss, kb, kss, vb, vss, Sq, Skv, D, scale, mab, mq, causal, ob, orow, kt, vs, sc, acc);
        }
        free(kt);
    }
    return failed ? -1 : 0;
}
