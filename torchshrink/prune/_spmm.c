/* CSR sparse x dense kernels for torchshrink's SparseLinear (our own source).
 * y[r, b] = bias[r] + sum_{k in row r} values[k] * xt[col[k], b], xt is [in, B] row-major, y is [out, B].
 * Rows are split over `threads` OpenMP threads (static schedule); threads == 1 runs no parallel region. */
#include <stdint.h>

void csr_spmm_f32(int32_t rows, int32_t batch, const int32_t *crow, const int32_t *col, const float *values,
                  const float *xt, const float *bias, float *y, int32_t threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int32_t r = 0; r < rows; ++r) {
        float *yr = y + (int64_t)r * batch;
        const float b0 = bias ? bias[r] : 0.0f;
        if (batch == 1) {
            float acc0 = 0.0f, acc1 = 0.0f, acc2 = 0.0f, acc3 = 0.0f;
            int32_t k = crow[r], end = crow[r + 1];
            for (; k + 3 < end; k += 4) {
                acc0 += values[k] * xt[col[k]];
                acc1 += values[k + 1] * xt[col[k + 1]];
                acc2 += values[k + 2] * xt[col[k + 2]];
                acc3 += values[k + 3] * xt[col[k + 3]];
            }
            for (; k < end; ++k) acc0 += values[k] * xt[col[k]];
            yr[0] = b0 + ((acc0 + acc1) + (acc2 + acc3));
        } else {
            for (int32_t b = 0; b < batch; ++b) yr[b] = b0;
            for (int32_t k = crow[r]; k < crow[r + 1]; ++k) {
                const float v = values[k];
                const float *xr = xt + (int64_t)col[k] * batch;
                for (int32_t b = 0; b < batch; ++b) yr[b] += v * xr[b];
            }
        }
    }
}
