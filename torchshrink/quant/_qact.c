/* Activation quantization kernels for INT8 dynamic Linear layers (torchshrink.quant.kernels).
 *
 * ts_quant_rows_u8:   one asymmetric uint8 grid per row (token): row min/max and the codes in one
 *                     sweep over the row while it sits in L1 (torch needs four passes for this).
 * ts_quant_tensor_u8: one asymmetric uint8 grid for the whole tensor (min/max and codes, one parallel region).
 * ts_rows_epilogue:   y[i,j] = s[i] * (acc[i,j] - z[i] * c[j]) + b[j] (then GELU if asked), in place: undoes the per-row
 *                     grid after an integer GEMM that ran with zero point 0 and scale 1
 *                     (c[j] = sum_k W[j,k], so z[i] * c[j] removes the zero-point offset).
 * Codes span [0, qmax]: 255, or 127 where u8*s8 pairs must not saturate int16 (AVX2 without VNNI).
 * Grids always contain 0.0 exactly (min <= 0 <= max), so a zero row gives exactly the bias.
 */
#include <math.h>
#include <omp.h>
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

void ts_quant_rows_u8(const float *x, int64_t rows, int64_t cols, uint8_t *q, float *scale, int32_t *zp,
                      int qmax, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < rows; i++) {
        const float *r = x + i * cols;
        float mn = 0.f, mx = 0.f;
#pragma omp simd reduction(min : mn) reduction(max : mx)
        for (int64_t k = 0; k < cols; k++) {
            mn = r[k] < mn ? r[k] : mn;
            mx = r[k] > mx ? r[k] : mx;
        }
        row_grid(mn, mx, (float)qmax, &scale[i], &zp[i]);
        quant_span(r, cols, 1.f / scale[i], (float)zp[i], (float)qmax, q + i * cols);
    }
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

void ts_rows_epilogue(float *y, int64_t rows, int64_t cols, const float *scale, const int32_t *zp,
                      const float *colsum, const float *bias, int gelu, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < rows; i++) {
        float *restrict r = y + i * cols;
        const float s = scale[i], z = (float)zp[i];
        if (gelu) {
            for (int64_t j = 0; j < cols; j++) {
                r[j] = gelu_erf(s * (r[j] - z * colsum[j]) + bias[j]);
            }
        } else {
            for (int64_t j = 0; j < cols; j++) r[j] = s * (r[j] - z * colsum[j]) + bias[j];
        }
    }
}
