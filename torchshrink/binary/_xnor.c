/* torchshrink XNOR-popcount kernels (plain C, loaded with ctypes; no Python API).
 *
 * Bit layout: row r of a packed matrix is `words` uint64 values; bit j of word w stands for
 * column 64*w + j, 1 for +1 (x >= 0) and 0 for -1. Bits past the real column count are 0 in both
 * operands, so they never differ and add nothing to the popcount.
 *
 *   dot(a, w) over k real columns = k - 2 * popcount(a XOR w)
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

int ts_has_avx2(void) {
#ifdef __AVX2__
    return 1;
#else
    return 0;
#endif
}

/* Pack the signs of (x[r, c] - tau[c]) (tau may be NULL: 0) for one row of `cols` floats. */
static void pack_row(const float *xr, const float *tau, int64_t cols, uint64_t *o, int64_t words) {
    for (int64_t w = 0; w < words; w++) {
        int64_t c = w * 64;
        uint64_t v = 0;
        if (c + 64 <= cols) {
#ifdef __AVX2__
            for (int b = 0; b < 8; b++) {
                __m256 f = _mm256_loadu_ps(xr + c + 8 * b);
                __m256 t = tau ? _mm256_loadu_ps(tau + c + 8 * b) : _mm256_setzero_ps();
                uint64_t m = (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(f, t, _CMP_GE_OQ));
                v |= m << (8 * b);
            }
#else
            for (int j = 0; j < 64; j++) v |= (uint64_t)(xr[c + j] - (tau ? tau[c + j] : 0.0f) >= 0.0f) << j;
#endif
        } else {
            for (int64_t j = 0; c + j < cols; j++) v |= (uint64_t)(xr[c + j] - (tau ? tau[c + j] : 0.0f) >= 0.0f) << j;
        }
        o[w] = v;
    }
}

/* Pack the signs of a rows x cols float matrix (row stride ld floats) into rows x words uint64. */
void ts_pack_signs(const float *x, int64_t rows, int64_t cols, int64_t ld, uint64_t *out, int64_t words) {
    for (int64_t r = 0; r < rows; r++) pack_row(x + r * ld, NULL, cols, out + r * words, words);
}

#ifdef __AVX2__
/* popcount of each 64-bit lane of v (Mula's nibble lookup + sad). */
static inline __m256i popcnt256(__m256i v) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f);
    __m256i lo = _mm256_and_si256(v, low);
    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    __m256i cnt = _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
    return cnt; /* byte counts (<= 8 each); caller sums bytes */
}

/* popcount(a XOR b) over `words` (a multiple of 4 is the fast part), for 1 row of a and 4 of b. */
static inline void xor_pop_1x4(const uint64_t *a, const uint64_t *b0, const uint64_t *b1, const uint64_t *b2,
                               const uint64_t *b3, int64_t words, int64_t *res) {
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
    int64_t w = 0;
    while (w + 4 <= words) {
        /* byte counters hold <= 8 per step: flush every 31 steps */
        __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0;
        int64_t end = w + 4 * 31;
        if (end > words) end = words;
        for (; w + 4 <= end; w += 4) {
            __m256i av = _mm256_loadu_si256((const __m256i *)(a + w));
            c0 = _mm256_add_epi8(c0, popcnt256(_mm256_xor_si256(av, _mm256_loadu_si256((const __m256i *)(b0 + w)))));
            c1 = _mm256_add_epi8(c1, popcnt256(_mm256_xor_si256(av, _mm256_loadu_si256((const __m256i *)(b1 + w)))));
            c2 = _mm256_add_epi8(c2, popcnt256(_mm256_xor_si256(av, _mm256_loadu_si256((const __m256i *)(b2 + w)))));
            c3 = _mm256_add_epi8(c3, popcnt256(_mm256_xor_si256(av, _mm256_loadu_si256((const __m256i *)(b3 + w)))));
        }
        s0 = _mm256_add_epi64(s0, _mm256_sad_epu8(c0, _mm256_setzero_si256()));
        s1 = _mm256_add_epi64(s1, _mm256_sad_epu8(c1, _mm256_setzero_si256()));
        s2 = _mm256_add_epi64(s2, _mm256_sad_epu8(c2, _mm256_setzero_si256()));
        s3 = _mm256_add_epi64(s3, _mm256_sad_epu8(c3, _mm256_setzero_si256()));
    }
    /* s* hold 4 x 64-bit partial sums each */
    int64_t r0 = 0, r1 = 0, r2 = 0, r3 = 0;
    int64_t t[4];
    _mm256_storeu_si256((__m256i *)t, s0); r0 = t[0] + t[1] + t[2] + t[3];
    _mm256_storeu_si256((__m256i *)t, s1); r1 = t[0] + t[1] + t[2] + t[3];
    _mm256_storeu_si256((__m256i *)t, s2); r2 = t[0] + t[1] + t[2] + t[3];
    _mm256_storeu_si256((__m256i *)t, s3); r3 = t[0] + t[1] + t[2] + t[3];
    for (; w < words; w++) {
        r0 += __builtin_popcountll(a[w] ^ b0[w]);
        r1 += __builtin_popcountll(a[w] ^ b1[w]);
        r2 += __builtin_popcountll(a[w] ^ b2[w]);
        r3 += __builtin_popcountll(a[w] ^ b3[w]);
    }
    res[0] = r0; res[1] = r1; res[2] = r2; res[3] = r3;
}
#endif

static inline int64_t xor_pop_1x1(const uint64_t *a, const uint64_t *b, int64_t words) {
    int64_t s = 0;
    for (int64_t w = 0; w < words; w++) s += __builtin_popcountll(a[w] ^ b[w]);
    return s;
}

/* Where results go: int32 dot products, or floats dot * scale[n] * beta[m] + bias[n] (any NULL: skipped). */
typedef struct {
    int32_t *i32;
    float *f32;
    const float *scale, *beta, *bias;
} sink_t;

static inline void emit(const sink_t *s, int64_t m, int64_t n, int64_t N, int64_t dot) {
    if (s->i32) {
        s->i32[m * N + n] = (int32_t)dot;
        return;
    }
    float v = (float)dot;
    if (s->scale) v = v * s->scale[n];
    if (s->beta) v = v * s->beta[m];
    if (s->bias) v = v + s->bias[n];
    s->f32[m * N + n] = v;
}

#ifndef TS_PREFETCH_BYTES
#define TS_PREFETCH_BYTES 4096
#endif

/* All M x N dot products kbits - 2 * popcount(a[m] XOR b[n]); a: M x words, b: N x words.
 * n outer in blocks of 4 (those 4 weight rows stay in L1 while every a row passes), m inner; the
 * weight stream is prefetched TS_PREFETCH_BYTES ahead, which matters when it comes from DRAM. */
static void xnor_gemm(const uint64_t *a, const uint64_t *b, int64_t M, int64_t N, int64_t words, int64_t kbits,
                      int use_simd, const sink_t *s) {
    int64_t n = 0;
#ifdef __AVX2__
    if (use_simd && words >= 4) {
        const char *end = (const char *)(b + N * words);
        for (; n + 4 <= N; n += 4) {
            const uint64_t *b0 = b + n * words, *b1 = b0 + words, *b2 = b1 + words, *b3 = b2 + words;
            const char *pf = (const char *)b0 + TS_PREFETCH_BYTES, *pf_end = pf + 4 * words * 8;
            for (; pf < pf_end && pf < end; pf += 64) _mm_prefetch(pf, _MM_HINT_T0);
            for (int64_t m = 0; m < M; m++) {
                int64_t r[4];
                xor_pop_1x4(a + m * words, b0, b1, b2, b3, words, r);
                for (int j = 0; j < 4; j++) emit(s, m, n + j, N, kbits - 2 * r[j]);
            }
        }
    }
#endif
    for (; n + 2 <= N; n += 2) {
        const uint64_t *b0 = b + n * words, *b1 = b0 + words;
        for (int64_t m = 0; m < M; m++) {
            const uint64_t *am = a + m * words;
            int64_t s0 = 0, s1 = 0;
            for (int64_t w = 0; w < words; w++) {
                uint64_t av = am[w];
                s0 += __builtin_popcountll(av ^ b0[w]);
                s1 += __builtin_popcountll(av ^ b1[w]);
            }
            emit(s, m, n, N, kbits - 2 * s0);
            emit(s, m, n + 1, N, kbits - 2 * s1);
        }
    }
    for (; n < N; n++) {
        for (int64_t m = 0; m < M; m++) emit(s, m, n, N, kbits - 2 * xor_pop_1x1(a + m * words, b + n * words, words));
    }
}

/* out[m * N + n] = kbits - 2 * popcount(a[m] XOR b[n]) as int32. */
void ts_xnor_gemm(const uint64_t *a, const uint64_t *b, int32_t *out, int64_t M, int64_t N, int64_t words,
                  int64_t kbits, int use_simd) {
    sink_t s = {out, NULL, NULL, NULL, NULL};
    xnor_gemm(a, b, M, N, words, kbits, use_simd, &s);
}

/* A whole fully binary Linear in one call: x is M x K floats, tau K thresholds (NULL: 0), w N x words
 * packed weight signs. out[m, n] = dot(sign(x[m] - tau), w[n]) (* scale[n]) (* beta[m]) (+ bias[n]);
 * scale, beta, bias may be NULL. Returns 0, or -1 when out of memory. */
int ts_binary_linear(const float *x, const float *tau, int64_t M, int64_t K, const uint64_t *w, int64_t N,
                     int64_t words, const float *scale, const float *beta, const float *bias, float *out) {
    uint64_t *a = (uint64_t *)malloc((size_t)(M * words) * sizeof(uint64_t));
    if (!a) return -1;
    for (int64_t m = 0; m < M; m++) pack_row(x + m * K, tau, K, a + m * words, words);
    sink_t s = {NULL, out, scale, beta, bias};
    xnor_gemm(a, w, M, N, words, K, 1, &s);
    free(a);
    return 0;
}
