/* Activation quantization kernels for INT8 dynamic Linear layers (torchshrink.quant.kernels).
 *
 * ts_quant_rows_u8:   one asymmetric uint8 grid per row (token): row min/max and the codes in one
 *                     sweep over the row while it sits in L1 (torch needs four passes for this).
 * ts_quant_tensor_u8: one asymmetric uint8 grid for the whole tensor (min/max and codes, one parallel region).
 * ts_rows_epilogue:   y[i,j] = s[i] * (acc[i,j] - z[i] * c[j]) + b[j] (then GELU if asked), in place: undoes the per-row
 *                     grid after an integer GEMM that ran with zero point 0 and scale 1
 *                     (c[j] = sum_k W[j,k], so z[i] * c[j] removes the zero-point offset).
 * ts_rows_epilogue_codes: the epilogue, then the codes of its output for a next per-token layer (same sweep).
 * ts_add_layernorm:   LayerNorm(epilogue(acc) + residual) in one sweep per row (post-LN transformer blocks).
 * Codes span [0, qmax]: 255, or 127 where u8*s8 pairs must not saturate int16 (AVX2 without VNNI).
 * Grids always contain 0.0 exactly (min <= 0 <= max), so a zero row gives exactly the bias.
 */
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#else /* built without OpenMP (torch ships no libgomp here): one thread */
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_threads(void) { return 1; }
#endif
#include <stdint.h>

static inline void row_grid(float mn, float mx, float qmax, float *scale, int32_t *zp) {
    if (mn > 0.f) mn = 0.f;
    if (mx < 0.f) mx = 0.f;
    float s = (mx - mn) / qmax;
    if (!(s > 0.f)) s = 1.f;
    float z = nearbyintf(-mn / s);
    if (z < 0.f) z = 0.f;
    if (z > qmax) z = qmax;
    *scale = s;
    *zp = (int32_t)z;
}

static inline void quant_span(const float *x, int64_t n, float inv, float z, float qmax, uint8_t *q) {
    for (int64_t k = 0; k < n; k++) {
        float v = nearbyintf(x[k] * inv) + z;
        v = v < 0.f ? 0.f : (v > qmax ? qmax : v);
        q[k] = (uint8_t)(int32_t)v;
    }
}

/* one row's grid (from its min / max) and codes */
static inline void quant_row(const float *r, int64_t cols, float qmax, uint8_t *q, float *scale, int32_t *zp) {
    float mn = 0.f, mx = 0.f;
#pragma omp simd reduction(min : mn) reduction(max : mx)
    for (int64_t k = 0; k < cols; k++) {
        mn = r[k] < mn ? r[k] : mn;
        mx = r[k] > mx ? r[k] : mx;
    }
    row_grid(mn, mx, qmax, scale, zp);
    quant_span(r, cols, 1.f / *scale, (float)*zp, qmax, q);
}

void ts_quant_rows_u8(const float *x, int64_t rows, int64_t cols, uint8_t *q, float *scale, int32_t *zp,
                      int qmax, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < rows; i++) quant_row(x + i * cols, cols, (float)qmax, q + i * cols, &scale[i], &zp[i]);
}

void ts_quant_tensor_u8(const float *x, int64_t n, uint8_t *q, float *scale, int32_t *zp, int qmax, int threads) {
    float gmn = 0.f, gmx = 0.f;
    /* one parallel region (min/max, grid, codes): on a loaded machine every region start costs */
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t lo = n * t / nt, hi = n * (t + 1) / nt;
        float mn = 0.f, mx = 0.f;
#pragma omp simd reduction(min : mn) reduction(max : mx)
        for (int64_t k = lo; k < hi; k++) {
            mn = x[k] < mn ? x[k] : mn;
            mx = x[k] > mx ? x[k] : mx;
        }
#pragma omp critical
        {
            gmn = mn < gmn ? mn : gmn;
            gmx = mx > gmx ? mx : gmx;
        }
#pragma omp barrier
#pragma omp single
        row_grid(gmn, gmx, (float)qmax, scale, zp);
        quant_span(x + lo, hi - lo, 1.f / *scale, (float)*zp, (float)qmax, q + lo);
    }
}

/* GELU(v) = v/2 (1 + erf(v/sqrt 2)); erf on [-4, 4] (|erf| rounds to 1 in float beyond) as
 * x * P(x^2) / Q(x^2), the rational minimax fit Eigen uses for its fast float erf; measured max error
 * 4.2e-7 against torch.erf. Plain arithmetic on a clamped x, so the loop vectorizes where a libm
 * erff call would not. */
static inline float gelu_erf(float v) {
    float x = v * 0.70710678118654752f;
    x = fminf(fmaxf(x, -4.f), 4.f);
    const float x2 = x * x;
    float p = -2.72614225801306e-10f;
    p = p * x2 + 2.77068142495902e-08f;
    p = p * x2 - 2.10102402082508e-06f;
    p = p * x2 - 5.69250639462346e-05f;
    p = p * x2 - 7.34990630326855e-04f;
    p = p * x2 - 2.95459980854025e-03f;
    p = p * x2 - 1.60960333262415e-02f;
    float q = -1.45660718464996e-05f;
    q = q * x2 - 2.13374055278905e-04f;
    q = q * x2 - 1.68282697438203e-03f;
    q = q * x2 - 7.37332916720468e-03f;
    q = q * x2 - 1.42647390514189e-02f;
    return 0.5f * v * (1.f + x * p / q);
}

static inline void epilogue_row(float *restrict r, int64_t cols, float s, float z, const float *colsum,
                                const float *bias, int gelu) {
    if (gelu) {
        for (int64_t j = 0; j < cols; j++) r[j] = gelu_erf(s * (r[j] - z * colsum[j]) + bias[j]);
    } else {
        for (int64_t j = 0; j < cols; j++) r[j] = s * (r[j] - z * colsum[j]) + bias[j];
    }
}

void ts_rows_epilogue(float *y, int64_t rows, int64_t cols, const float *scale, const int32_t *zp,
                      const float *colsum, const float *bias, int gelu, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < rows; i++) epilogue_row(y + i * cols, cols, scale[i], (float)zp[i], colsum, bias, gelu);
}

/* ts_rows_epilogue_codes: ts_rows_epilogue, then -- while the row is still in L1 -- its uint8 codes on its
 * own grid, exactly as ts_quant_rows_u8 computes them from y: the next per-token layer that reads y gets its
 * codes without reading y again. */
void ts_rows_epilogue_codes(float *y, int64_t rows, int64_t cols, const float *scale, const int32_t *zp,
                            const float *colsum, const float *bias, int gelu, uint8_t *q, float *qscale,
                            int32_t *qzp, int qmax, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < rows; i++) {
        float *r = y + i * cols;
        epilogue_row(r, cols, scale[i], (float)zp[i], colsum, bias, gelu);
        quant_row(r, cols, (float)qmax, q + i * cols, &qscale[i], &qzp[i]);
    }
}

/* ts_add_layernorm: out[i] = LayerNorm(v[i] + res[i]) * gamma + beta over each row of `cols`, where
 * v[i,j] = y[i,j] (+ bias[j])                                      when scale == NULL (bias may be NULL), or
 * v[i,j] = scale[i] * (y[i,j] - zp[i] * colsum[j]) + bias[j]       (the per-row epilogue) otherwise.
 * The post-LN transformer's "dense -> add residual -> LayerNorm" in one sweep per row while the row sits in
 * L1 (torch: epilogue, add, LayerNorm = three to four passes and parallel regions). Mean and variance
 * are two-pass over the stored row (no cancellation), variance biased as nn.LayerNorm's. out may alias y. */
void ts_add_layernorm(const float *y, const float *res, int64_t rows, int64_t cols, const float *scale,
                      const int32_t *zp, const float *colsum, const float *bias, const float *gamma,
                      const float *beta, float eps, float *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < rows; i++) {
        const float *yr = y + i * cols; /* no restrict: out may be y (same index only, so simd is safe) */
        const float *rr = res + i * cols;
        float *o = out + i * cols;
        float sum = 0.f;
        if (scale) {
            const float s = scale[i], z = (float)zp[i];
#pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < cols; j++) {
                const float v = s * (yr[j] - z * colsum[j]) + bias[j] + rr[j];
                o[j] = v;
                sum += v;
            }
        } else if (bias) {
#pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < cols; j++) {
                const float v = yr[j] + bias[j] + rr[j];
                o[j] = v;
                sum += v;
            }
        } else {
#pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < cols; j++) {
                const float v = yr[j] + rr[j];
                o[j] = v;
                sum += v;
            }
        }
        const float mean = sum / (float)cols;
        float sq = 0.f;
#pragma omp simd reduction(+ : sq)
        for (int64_t j = 0; j < cols; j++) {
            const float d = o[j] - mean;
            sq += d * d;
        }
        const float rstd = 1.f / sqrtf(sq / (float)cols + eps);
#pragma omp simd
        for (int64_t j = 0; j < cols; j++) o[j] = (o[j] - mean) * rstd * gamma[j] + beta[j];
    }
}
