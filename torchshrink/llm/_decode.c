/* Batch-1 decoding of Llama-family causal LMs on weight-only quantized matrices (torchshrink.llm.decode).
 *
 * Matrices ("qmat"): unsigned codes per (row, group of G columns, G a multiple of 32) with an fp16 scale s
 * and an fp16 offset m, w = c * s + m. 4-bit codes are stored per block of 32 as 16 bytes, byte j holding
 * code j in its low nibble and code j + 16 in its high one (so one AND and one shift give the block's 32
 * codes in order); 8-bit codes are one byte each. The (s, m) pairs of a row are interleaved.
 *
 * GEMV: the input vector is quantized once per group of G to int8 (absmax, per group scale d), so a row's
 * group dot product is d * (s * sum(c * q) + m * sum(q)); the integer sum runs on u8 x s8 products:
 * AVX-512 VNNI (vpdpbusd) where the CPU has it, else AVX2 (vpmaddubsw + vpmaddwd; 8-bit codes then take
 * 7-bit activations so a pair of products cannot saturate int16), else plain C. The path is chosen at run
 * time (function target attributes), so one build serves every x86 CPU.
 *
 * ts_lm_forward: T tokens (decoding: 1) through the whole model (RMSNorm, q/k/v, RoPE from tables, grouped-query attention
 * over an fp32 KV cache, o, SwiGLU FFN, final norm, LM head) inside ONE OpenMP parallel region: matrix
 * rows and attention heads are split over the threads, the short serial parts run on one thread between
 * barriers. One call per generated token (and per prompt chunk) from Python; prefill runs the same code
 * with each weight row reused across the chunk's tokens while it sits in L1.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define TS_X86 1
#else
#define TS_X86 0
#endif

typedef struct {
    const uint8_t *codes; const uint16_t *sm; const float *bias;
    int64_t rows, cols, group, bits;
} qmat;

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) bits = sign;
        else {  /* subnormal */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) bits = sign | 0x7f800000u | (man << 13);
    else bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* x (n floats) -> int8 codes per group of g (|q| <= qmax), d[j] = group scale, ds[j] = d * sum(q) */
static void quant_groups(const float *x, int64_t n, int64_t g, int qmax, int8_t *q, float *d, float *ds) {
    for (int64_t j = 0; j < n / g; j++) {
        const float *xs = x + j * g;
        float amax = 0.f;
        for (int64_t k = 0; k < g; k++) amax = fmaxf(amax, fabsf(xs[k]));
        float s = amax / (float)qmax, inv = s > 0.f ? 1.f / s : 0.f;
        int32_t sum = 0;
        for (int64_t k = 0; k < g; k++) {
            int32_t v = (int32_t)nearbyintf(xs[k] * inv);
            q[j * g + k] = (int8_t)v;
            sum += v;
        }
        d[j] = s;
        ds[j] = s * (float)sum;
    }
}

/* code k of a row (c: the row's bytes): 4-bit blocks of 32 hold code j and j + 16 in byte j */
static inline int code_at(const qmat *W, const uint8_t *c, int64_t k) {
    if (W->bits != 4) return c[k];
    int64_t b = k - k % 32, o = k % 32;
    return o < 16 ? c[b / 2 + o] & 15 : c[b / 2 + o - 16] >> 4;
}

static float dot_row_c(const qmat *W, int64_t r, const int8_t *q, const float *d, const float *ds) {
    int64_t ng = W->cols / W->group, rb = W->bits == 4 ? W->cols / 2 : W->cols;
    const uint8_t *c = W->codes + r * rb;
    const uint16_t *sm = W->sm + r * 2 * ng;
    float acc = 0.f;
    for (int64_t j = 0; j < ng; j++) {
        int32_t isum = 0;
        for (int64_t b = j * W->group; b < (j + 1) * W->group; b += 32) {
            for (int k = 0; k < 32; k++) isum += code_at(W, c, b + k) * q[b + k];
        }
        acc += d[j] * half_to_float(sm[2 * j]) * (float)isum + half_to_float(sm[2 * j + 1]) * ds[j];
    }
    return acc;
}

#if TS_X86
#define TS_AVX2 __attribute__((target("avx2,fma,f16c")))
#define TS_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")))

static inline __m256i TS_AVX2 block_codes(const qmat *W, const uint8_t *c, int64_t b) {
    if (W->bits == 4) {
        __m128i v = _mm_loadu_si128((const __m128i *)(c + b / 2));
        __m128i lo = _mm_and_si128(v, _mm_set1_epi8(15)), hi = _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(15));
        return _mm256_set_m128i(hi, lo);
    }
    return _mm256_loadu_si256((const __m256i *)(c + b));
}

static inline float TS_AVX2 hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* one group's integer sum into the float accumulator: acc += s * d * isum; mterm += m * d * sum(q) */
static inline __m256 TS_AVX2 group_epilogue(__m256 acc, float *mterm, __m256i isum, const uint16_t *sm, float d, float ds) {
    int32_t pair;
    memcpy(&pair, sm, 4);
    __m128 f = _mm_cvtph_ps(_mm_cvtsi32_si128(pair));
    *mterm += _mm_cvtss_f32(_mm_shuffle_ps(f, f, 1)) * ds;
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(d * _mm_cvtss_f32(f)), acc);
}

static float TS_AVX2 dot_row_avx2(const qmat *W, int64_t r, const int8_t *q, const float *d, const float *ds) {
    int64_t ng = W->cols / W->group, rb = W->bits == 4 ? W->cols / 2 : W->cols;
    const uint8_t *c = W->codes + r * rb;
    const uint16_t *sm = W->sm + r * 2 * ng;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    float mterm = 0.f;
    for (int64_t j = 0; j < ng; j++) {
        __m256i isum = _mm256_setzero_si256();
        for (int64_t b = j * W->group; b < (j + 1) * W->group; b += 32) {
            __m256i w = block_codes(W, c, b), x = _mm256_loadu_si256((const __m256i *)(q + b));
            isum = _mm256_add_epi32(isum, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones));
        }
        acc = group_epilogue(acc, &mterm, isum, sm + 2 * j, d[j], ds[j]);
    }
    return hsum8(acc) + mterm;
}

static float TS_VNNI dot_row_vnni(const qmat *W, int64_t r, const int8_t *q, const float *d, const float *ds) {
    int64_t ng = W->cols / W->group, rb = W->bits == 4 ? W->cols / 2 : W->cols;
    const uint8_t *c = W->codes + r * rb;
    const uint16_t *sm = W->sm + r * 2 * ng;
    __m256 acc = _mm256_setzero_ps();
    float mterm = 0.f;
    for (int64_t j = 0; j < ng; j++) {
        __m256i isum = _mm256_setzero_si256();
        for (int64_t b = j * W->group; b < (j + 1) * W->group; b += 32)
            isum = _mm256_dpbusd_epi32(isum, block_codes(W, c, b), _mm256_loadu_si256((const __m256i *)(q + b)));
        acc = group_epilogue(acc, &mterm, isum, sm + 2 * j, d[j], ds[j]);
    }
    return hsum8(acc) + mterm;
}

/* One row against FOUR activation rows (prefill): each 32-code block is loaded and unpacked once for the four. */
#define TS_DOT_ROW4(NAME, ATTR, IDOT)                                                                          \
    static void ATTR NAME(const qmat *W, int64_t r, const int8_t *q, const float *d, const float *ds,           \
                          int64_t qs, int64_t gs, float *out) {                                                 \
        int64_t ng = W->cols / W->group, rb = W->bits == 4 ? W->cols / 2 : W->cols;                            \
        const uint8_t *c = W->codes + r * rb;                                                                   \
        const uint16_t *sm = W->sm + r * 2 * ng;                                                                \
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()}; \
        float mterm[4] = {0.f, 0.f, 0.f, 0.f};                                                                  \
        for (int64_t j = 0; j < ng; j++) {                                                                      \
            __m256i is[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),           \
                             _mm256_setzero_si256()};                                                           \
            for (int64_t b = j * W->group; b < (j + 1) * W->group; b += 32) {                                   \
                __m256i w = block_codes(W, c, b);                                                               \
                for (int t = 0; t < 4; t++)                                                                     \
                    is[t] = IDOT(is[t], w, _mm256_loadu_si256((const __m256i *)(q + t * qs + b)));             \
            }                                                                                                   \
            for (int t = 0; t < 4; t++)                                                                         \
                acc[t] = group_epilogue(acc[t], &mterm[t], is[t], sm + 2 * j, d[t * gs + j], ds[t * gs + j]);   \
        }                                                                                                       \
        for (int t = 0; t < 4; t++) out[t] = hsum8(acc[t]) + mterm[t];                                          \
    }

static inline __m256i TS_AVX2 idot_avx2(__m256i acc, __m256i w, __m256i x) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
}
static inline __m256i TS_VNNI idot_vnni(__m256i acc, __m256i w, __m256i x) { return _mm256_dpbusd_epi32(acc, w, x); }
TS_DOT_ROW4(dot_row4_avx2, TS_AVX2, idot_avx2)
TS_DOT_ROW4(dot_row4_vnni, TS_VNNI, idot_vnni)
#endif

/* 0: plain C, 1: AVX2, 2: AVX-512 VNNI; forced lower with ts_lm_set_isa */
static int g_isa = -1;

int ts_lm_isa(void) {
    if (g_isa < 0) {
        g_isa = 0;
#if TS_X86
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) g_isa = 1;
        if (g_isa == 1 && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
            __builtin_cpu_supports("avx512bw")) g_isa = 2;
#endif
    }
    return g_isa;
}

void ts_lm_set_isa(int isa) { ts_lm_isa(); if (isa < g_isa) g_isa = isa; }

/* the activation range a matrix takes: 8-bit codes on the AVX2 path need 7-bit activations */
static int act_qmax(int64_t bits) { return bits == 8 && ts_lm_isa() == 1 ? 63 : 127; }

static float dot_row(const qmat *W, int64_t r, const int8_t *q, const float *d, const float *ds) {
    float v;
#if TS_X86
    int isa = ts_lm_isa();
    v = isa == 2 ? dot_row_vnni(W, r, q, d, ds) : isa == 1 ? dot_row_avx2(W, r, q, d, ds) : dot_row_c(W, r, q, d, ds);
#else
    v = dot_row_c(W, r, q, d, ds);
#endif
    return W->bias ? v + W->bias[r] : v;
}

/* one row against four activation rows (strides qs codes / gs groups): out[t] = row . x_t (+ bias) */
static void dot_row4(const qmat *W, int64_t r, const int8_t *q, const float *d, const float *ds, int64_t qs,
                     int64_t gs, float *out) {
#if TS_X86
    int isa = ts_lm_isa();
    if (isa == 2) dot_row4_vnni(W, r, q, d, ds, qs, gs, out);
    else if (isa == 1) dot_row4_avx2(W, r, q, d, ds, qs, gs, out);
    else
#endif
        for (int t = 0; t < 4; t++) out[t] = dot_row_c(W, r, q + t * qs, d + t * gs, ds + t * gs);
    if (W->bias)
        for (int t = 0; t < 4; t++) out[t] += W->bias[r];
}

static qmat read_qmat(const int64_t *p) {
    qmat m = {(const uint8_t *)(intptr_t)p[0], (const uint16_t *)(intptr_t)p[1], (const float *)(intptr_t)p[2],
              p[3], p[4], p[5], p[6]};
    return m;
}

/* y = W x for one matrix (x quantized inside): the test entry point of the GEMV */
void ts_qgemv(const int64_t *desc, const float *x, float *y, int8_t *q, float *d, float *ds) {
    qmat W = read_qmat(desc);
    quant_groups(x, W.cols, W.group, act_qmax(W.bits), q, d, ds);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < W.rows; r++) y[r] = dot_row(&W, r, q, d, ds);
}

static void rmsnorm(const float *x, const float *w, int64_t n, float eps, float *out) {
    double ss = 0.0;
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float inv = 1.f / sqrtf((float)(ss / (double)n) + eps);
    for (int64_t i = 0; i < n; i++) out[i] = w[i] * (x[i] * inv);
}

static void rope(float *v, int64_t heads, int64_t hd, const float *cs, const float *sn) {
    int64_t h2 = hd / 2;
    for (int64_t h = 0; h < heads; h++) {
        float *x = v + h * hd;
        for (int64_t i = 0; i < h2; i++) {
            float a = x[i], b = x[i + h2];
            x[i] = a * cs[i] - b * sn[i];
            x[i + h2] = b * cs[i + h2] + a * sn[i + h2];
        }
    }
}

/* Rows of up to three matrices sharing one quantized input, for T input rows, split over the team (inside a
 * parallel region): each weight row stays in L1 while the T activation rows stream past it. */
static void gemm3(const qmat *A, float *ya, const qmat *B, float *yb, const qmat *C, float *yc,
                  const int8_t *q, const float *d, const float *ds, int64_t T, int64_t qstride, int64_t gstride) {
    int64_t na = A->rows, nb = B ? B->rows : 0, nc = C ? C->rows : 0;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < na + nb + nc; r++) {
        const qmat *W = r < na ? A : r < na + nb ? B : C;
        float *y = r < na ? ya : r < na + nb ? yb : yc;
        int64_t rr = r < na ? r : r < na + nb ? r - na : r - na - nb, t = 0;
        for (; t + 4 <= T; t += 4) {
            float o4[4];
            dot_row4(W, rr, q + t * qstride, d + t * gstride, ds + t * gstride, qstride, gstride, o4);
            for (int k = 0; k < 4; k++) y[(t + k) * W->rows + rr] = o4[k];
        }
        for (; t < T; t++)
            y[t * W->rows + rr] = dot_row(W, rr, q + t * qstride, d + t * gstride, ds + t * gstride);
    }
}

/* T rows of n floats -> int8 groups (rows split over the team) */
static void quant_rows(const float *x, int64_t T, int64_t n, const qmat *W, int8_t *q, float *d, float *ds,
                       int64_t qstride, int64_t gstride) {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; t++)
        quant_groups(x + t * n, n, W->group, act_qmax(W->bits), q + t * qstride, d + t * gstride, ds + t * gstride);
}

/* CFG_THREADS: the most threads the scratch has attention rows for (a forward never runs more) */
enum { CFG_LAYERS, CFG_HIDDEN, CFG_HEADS, CFG_KV, CFG_HD, CFG_INTER, CFG_VOCAB, CFG_MAXLEN, CFG_TMAX, CFG_THREADS, CFG_N };
/* global words: final norm, RoPE cos / sin tables [maxlen][head_dim], K / V caches [layers][kv][maxlen][head_dim],
 * scratch, then the embedding and LM head qmats (7 words each), then LAYER_WORDS per layer */
enum { G_NORM, G_COS, G_SIN, G_KC, G_VC, G_SCRATCH, G_EMB, G_HEAD = G_EMB + 7, G_LAYERS = G_HEAD + 7 };
#define QM 7
#define LAYER_WORDS (2 + 7 * QM)

static int64_t widest(const int64_t *cfg) {
    int64_t h = cfg[CFG_HIDDEN], a = cfg[CFG_HEADS] * cfg[CFG_HD], f = cfg[CFG_INTER];
    int64_t w = h > f ? h : f;
    return w > a ? w : a;
}

static int max_threads(const int64_t *cfg) {
    int n = 1;
#ifdef _OPENMP
    n = omp_get_max_threads();
#endif
    return n < cfg[CFG_THREADS] ? n : (int)cfg[CFG_THREADS];
}

/* Scratch floats a model needs for up to CFG_TMAX tokens a call (the Python side allocates it). */
int64_t ts_lm_scratch(const int64_t *cfg) {
    int64_t T = cfg[CFG_TMAX], h = cfg[CFG_HIDDEN], a = cfg[CFG_HEADS] * cfg[CFG_HD], kv = cfg[CFG_KV] * cfg[CFG_HD];
    int64_t f = cfg[CFG_INTER], w = widest(cfg);
    return T * (3 * h + 2 * a + 2 * kv + 2 * f + 2 * w + w / 4 + 16) + cfg[CFG_THREADS] * cfg[CFG_MAXLEN] + 64;
}

/* T tokens at positions pos0 .. pos0 + T - 1 (decoding: T = 1; prefill: a chunk of the prompt): fills the KV cache
 * there and writes the vocabulary logits of the LAST token. The embedding rows are dequantized from their own qmat
 * (tied models pass the LM head's). Returns 0, 1 for a position past the cache, 2 for a token outside the
 * vocabulary, 3 for T outside 1..CFG_TMAX. */
int ts_lm_forward(const int64_t *cfg, const int64_t *g, float eps, const int64_t *tokens, int64_t T, int64_t pos0,
                  float *logits) {
    const int64_t L = cfg[CFG_LAYERS], H = cfg[CFG_HIDDEN], NH = cfg[CFG_HEADS], NKV = cfg[CFG_KV], HD = cfg[CFG_HD];
    const int64_t F = cfg[CFG_INTER], V = cfg[CFG_VOCAB], ML = cfg[CFG_MAXLEN], W = widest(cfg);
    if (T < 1 || T > cfg[CFG_TMAX]) return 3;
    if (pos0 < 0 || pos0 + T > ML) return 1;
    for (int64_t t = 0; t < T; t++)
        if (tokens[t] < 0 || tokens[t] >= V) return 2;
    const int64_t A = NH * HD, KVW = NKV * HD, GS = W / 32 + 1, QS = W + 64;
    float *s = (float *)(intptr_t)g[G_SCRATCH];
    float *x = s, *xn = x + T * H, *tmp = xn + T * H, *qv = tmp + T * H, *kv = qv + T * A, *vv = kv + T * KVW;
    float *ao = vv + T * KVW, *gt = ao + T * A, *up = gt + T * F, *d = up + T * F, *ds = d + T * GS;
    float *att0 = ds + T * GS;
    int8_t *q8 = (int8_t *)(att0 + cfg[CFG_THREADS] * ML);
    const float *COS = (const float *)(intptr_t)g[G_COS], *SIN = (const float *)(intptr_t)g[G_SIN];
    float *KC = (float *)(intptr_t)g[G_KC], *VC = (float *)(intptr_t)g[G_VC];
    qmat emb = read_qmat(g + G_EMB), head = read_qmat(g + G_HEAD);
    const float *normf = (const float *)(intptr_t)g[G_NORM];
    const float scale = 1.f / sqrtf((float)HD);
#pragma omp parallel num_threads(max_threads(cfg))
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {  /* embedding rows: w = c * s + m */
            int64_t ng = emb.cols / emb.group, rb = emb.bits == 4 ? emb.cols / 2 : emb.cols;
            const uint8_t *c = emb.codes + tokens[t] * rb;
            const uint16_t *sm = emb.sm + tokens[t] * 2 * ng;
            for (int64_t k = 0; k < H; k++) {
                int64_t j = k / emb.group;
                x[t * H + k] = (float)code_at(&emb, c, k) * half_to_float(sm[2 * j]) + half_to_float(sm[2 * j + 1]);
            }
        }
        for (int64_t l = 0; l < L; l++) {
            const int64_t *lw = g + G_LAYERS + l * LAYER_WORDS;
            const float *n1 = (const float *)(intptr_t)lw[0], *n2 = (const float *)(intptr_t)lw[1];
            qmat Wq = read_qmat(lw + 2), Wk = read_qmat(lw + 2 + QM), Wv = read_qmat(lw + 2 + 2 * QM);
            qmat Wo = read_qmat(lw + 2 + 3 * QM), Wg = read_qmat(lw + 2 + 4 * QM), Wu = read_qmat(lw + 2 + 5 * QM);
            qmat Wd = read_qmat(lw + 2 + 6 * QM);
            float *kc = KC + l * NKV * ML * HD, *vc = VC + l * NKV * ML * HD;
#pragma omp for schedule(static)
            for (int64_t t = 0; t < T; t++) rmsnorm(x + t * H, n1, H, eps, xn + t * H);
            quant_rows(xn, T, H, &Wq, q8, d, ds, QS, GS);
            gemm3(&Wq, qv, &Wk, kv, &Wv, vv, q8, d, ds, T, QS, GS);
#pragma omp for schedule(static)
            for (int64_t t = 0; t < T; t++) {
                const float *cs = COS + (pos0 + t) * HD, *sn = SIN + (pos0 + t) * HD;
                rope(qv + t * A, NH, HD, cs, sn);
                rope(kv + t * KVW, NKV, HD, cs, sn);
                for (int64_t h = 0; h < NKV; h++) {
                    memcpy(kc + (h * ML + pos0 + t) * HD, kv + t * KVW + h * HD, HD * sizeof(float));
                    memcpy(vc + (h * ML + pos0 + t) * HD, vv + t * KVW + h * HD, HD * sizeof(float));
                }
            }
#pragma omp for schedule(dynamic, 1) collapse(2)
            for (int64_t h = 0; h < NH; h++) {
                for (int64_t t = 0; t < T; t++) {
                    int tid = 0;
#ifdef _OPENMP
                    tid = omp_get_thread_num();
#endif
                    int64_t kh = h / (NH / NKV), last = pos0 + t;
                    const float *qh = qv + t * A + h * HD, *kb = kc + kh * ML * HD, *vb = vc + kh * ML * HD;
                    float *a = att0 + tid * ML, mx = -INFINITY, sum = 0.f;
                    for (int64_t u = 0; u <= last; u++) {
                        float dot = 0.f;
                        for (int64_t i = 0; i < HD; i++) dot += qh[i] * kb[u * HD + i];
                        a[u] = dot * scale;
                        mx = fmaxf(mx, a[u]);
                    }
                    for (int64_t u = 0; u <= last; u++) { a[u] = expf(a[u] - mx); sum += a[u]; }
                    float inv = 1.f / sum, *o = ao + t * A + h * HD;
                    for (int64_t i = 0; i < HD; i++) o[i] = 0.f;
                    for (int64_t u = 0; u <= last; u++) {
                        float pr = a[u] * inv;
                        for (int64_t i = 0; i < HD; i++) o[i] += pr * vb[u * HD + i];
                    }
                }
            }
            quant_rows(ao, T, A, &Wo, q8, d, ds, QS, GS);
            gemm3(&Wo, tmp, NULL, NULL, NULL, NULL, q8, d, ds, T, QS, GS);
#pragma omp for schedule(static)
            for (int64_t t = 0; t < T; t++) {
                for (int64_t i = 0; i < H; i++) x[t * H + i] += tmp[t * H + i];
                rmsnorm(x + t * H, n2, H, eps, xn + t * H);
            }
            quant_rows(xn, T, H, &Wg, q8, d, ds, QS, GS);
            gemm3(&Wg, gt, &Wu, up, NULL, NULL, q8, d, ds, T, QS, GS);
#pragma omp for schedule(static)
            for (int64_t i = 0; i < T * F; i++) gt[i] = gt[i] / (1.f + expf(-gt[i])) * up[i];
            quant_rows(gt, T, F, &Wd, q8, d, ds, QS, GS);
            gemm3(&Wd, tmp, NULL, NULL, NULL, NULL, q8, d, ds, T, QS, GS);
#pragma omp for schedule(static)
            for (int64_t i = 0; i < T * H; i++) x[i] += tmp[i];
        }
#pragma omp single
        {
            rmsnorm(x + (T - 1) * H, normf, H, eps, xn);
            quant_groups(xn, H, head.group, act_qmax(head.bits), q8, d, ds);
        }
        gemm3(&head, logits, NULL, NULL, NULL, NULL, q8, d, ds, 1, QS, GS);
    }
    return 0;
}
