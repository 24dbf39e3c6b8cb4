/* out_r = out_r * rescale_r + sum_j weight_rj * values_j for up to WEIGHTED_ROWS_MAX
 * rows at once, with AVX-512: the second half of attention (probabilities times
 * values), shared by the decode kernel (_paged_attention_cpu.c: the query heads of
 * one kv head) and the prefill kernel (_prefill_attention_cpu.c: a block of query
 * rows). 64 dimensions a pass; each value vector loaded once serves every row.
 * rescale NULL: the rows start from zero. head_dim must be a multiple of 16.
 * Header-only; callers guard the include for x86-64 GCC/Clang.
 */
#ifndef SELFHOST_WEIGHTED_ROWS_AVX512_H
#define SELFHOST_WEIGHTED_ROWS_AVX512_H

#include <Python.h>
#include <immintrin.h>

#define WEIGHTED_ROWS_MAX 6 /* 6 rows x 4 accumulators + 4 value vectors fit the 32 zmm registers */

__attribute__((target("avx512f"))) static inline __attribute__((always_inline)) void weighted_rows_n(
    const int rows, float *const *out, const float *rescale, const float *weights, Py_ssize_t weight_stride,
    const float *const *values, Py_ssize_t count, Py_ssize_t dim) {
    for (Py_ssize_t d0 = 0; d0 < dim; d0 += 64) {
        const int vectors = dim - d0 >= 64 ? 4 : (int)((dim - d0) / 16);
        __m512 acc[WEIGHTED_ROWS_MAX][4];
        for (int r = 0; r < rows; r++) {
            __m512 factor = _mm512_set1_ps(rescale ? rescale[r] : 0.0f);
            for (int c = 0; c < vectors; c++)
                acc[r][c] = rescale ? _mm512_mul_ps(_mm512_loadu_ps(out[r] + d0 + c * 16), factor) : _mm512_setzero_ps();
        }
        for (Py_ssize_t j = 0; j < count; j++) {
            const float *v = values[j] + d0;
            __m512 v0 = _mm512_loadu_ps(v), v1 = v0, v2 = v0, v3 = v0;
            if (vectors > 1) v1 = _mm512_loadu_ps(v + 16);
            if (vectors > 2) v2 = _mm512_loadu_ps(v + 32);
            if (vectors > 3) v3 = _mm512_loadu_ps(v + 48);
            for (int r = 0; r < rows; r++) {
                __m512 w = _mm512_set1_ps(weights[r * weight_stride + j]);
                acc[r][0] = _mm512_fmadd_ps(w, v0, acc[r][0]);
                if (vectors > 1) acc[r][1] = _mm512_fmadd_ps(w, v1, acc[r][1]);
                if (vectors > 2) acc[r][2] = _mm512_fmadd_ps(w, v2, acc[r][2]);
                if (vectors > 3) acc[r][3] = _mm512_fmadd_ps(w, v3, acc[r][3]);
            }
        }
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < vectors; c++) _mm512_storeu_ps(out[r] + d0 + c * 16, acc[r][c]);
    }
}

#define WEIGHTED_ROWS_CASE(n) \
    case n: weighted_rows_n(n, out, rescale, weights, weight_stride, values, count, dim); break;

/* weighted_rows_n for any `rows` (1..WEIGHTED_ROWS_MAX), each count compiled with its accumulators in registers. */
__attribute__((target("avx512f"))) static void weighted_rows(int rows, float *const *out, const float *rescale,
                                                           const float *weights, Py_ssize_t weight_stride,
                                                           const float *const *values, Py_ssize_t count,
                                                           Py_ssize_t dim) {
    switch (rows) {
        WEIGHTED_ROWS_CASE(1) WEIGHTED_ROWS_CASE(2) WEIGHTED_ROWS_CASE(3)
        WEIGHTED_ROWS_CASE(4) WEIGHTED_ROWS_CASE(5) WEIGHTED_ROWS_CASE(6)
    }
}

#endif /* SELFHOST_WEIGHTED_ROWS_AVX512_H */
