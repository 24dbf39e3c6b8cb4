/* out_r = out_r * rescale_r + sum_j weight_rj * values_j for up to WEIGHTED_ROWS_MAX
 * rows at once, with AVX-512: the second half of attention (probabilities times
 * values), shared by the decode kernel (_paged_attention_cpu.c: the query heads of
 * one kv head) and the prefill kernel (_prefill_attention_cpu.c: a block of query
 * rows). 64 dimensions a pass; each value vector loaded once serves every row.
 * rescale NULL: the rows start from zero. head_dim must be a multiple of 16.
 * Values are fp32 or bf16 (a bf16 KV cache: half the bytes a decode step reads; an int8 cache's
 * pairs of keys go through _paged_attention_cpu.c's VNNI sums or fp32 panels instead);
 * `kv_load` widens 16 of either to fp32, exactly, and `bf16_round_16` is the one
 * rounding the kernels use when they write into a bf16 cache: to nearest even, as
 * torch's own conversion, so the two writers agree bit for bit (NaN stays a NaN).
 * Header-only; callers guard the include for x86-64 GCC/Clang.
 */
#ifndef SELFHOST_WEIGHTED_ROWS_AVX512_H
#define SELFHOST_WEIGHTED_ROWS_AVX512_H

#include <Python.h>
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

/* What a cache holds: fp32, bf16 (half the bytes), or int8 with one fp32 scale per token and
 * kv head (a quarter; paged_cache.py's quantize_rows). */
enum { KV_FP32 = 0, KV_BF16 = 1, KV_INT8 = 2 };

static inline Py_ssize_t kv_bytes(int kind) { return kind == KV_INT8 ? 1 : kind == KV_BF16 ? 2 : 4; }

/* 16 cache values from element `index` of `base` (KV_FP32 or KV_BF16) as fp32, exactly. `kind`
 * is a constant at each call site. (An int8 cache's pair layouts have readers of their own.) */
__attribute__((target("avx512f"))) static inline __attribute__((always_inline)) __m512 kv_load(
    const void *base, Py_ssize_t index, const int kind) {
    if (kind == KV_FP32) return _mm512_loadu_ps((const float *)base + index);
    __m256i halves = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + index));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
}

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* 16 values as bf16: to nearest even, as torch's own conversion (any NaN becomes the quiet 0x7fc0, as
 * torch makes it), so the writers of a bf16 cache agree bit for bit. */
__attribute__((target("avx512f"))) static inline __m256i bf16_rounded(__m512 values) {
    const __m512i bits = _mm512_castps_si512(values);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7fc0)));
}

/* 16 values to bf16 (bf16_rounded) into slots `stride` apart. */
__attribute__((target("avx512f"))) static inline void bf16_round_16(const float *in, uint16_t *out, Py_ssize_t stride) {
    const __m256i rounded = bf16_rounded(_mm512_loadu_ps(in));
    if (stride == 1) {
        _mm256_storeu_si256((__m256i *)out, rounded);
        return;
    }
    uint16_t lanes[16];
    _mm256_storeu_si256((__m256i *)lanes, rounded);
    for (int i = 0; i < 16; i++) out[i * stride] = lanes[i];
}

/* `dim` values (a multiple of 16) to int8, round(x * (127 / max|x|)) to nearest even, value e at
 * out[(e / 2) * pair_stride + (e % 2) * step] (an int8 cache's key: pairs of dimensions, 2 * block_size
 * and 1; its value: pairs of keys, every other byte, 4 and 2; a plain row: 2 and 1); returns the scale max|x| / 127 (0 for a
 * row of zeros). The same IEEE operations as paged_cache.py's quantize_rows, so the torch writer and
 * the kernels write the same bytes. */
__attribute__((target("avx512f,avx512bw,avx512vl"))) static inline float int8_quantize_row(
    const float *in, Py_ssize_t dim, int8_t *out, Py_ssize_t pair_stride, Py_ssize_t step) {
    __m512 peak = _mm512_setzero_ps();
    for (Py_ssize_t d = 0; d < dim; d += 16) peak = _mm512_max_ps(peak, _mm512_abs_ps(_mm512_loadu_ps(in + d)));
    const float largest = _mm512_reduce_max_ps(peak);
    const __m512 inv = _mm512_set1_ps(largest > 0.0f ? 127.0f / largest : 0.0f);
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    for (Py_ssize_t d = 0; d < dim; d += 16) {
        __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(in + d), inv)); /* MXCSR: nearest even */
        __m128i bytes = _mm512_cvtepi32_epi8(_mm512_min_epi32(_mm512_max_epi32(q, lo), hi));
        if (pair_stride == 2 && step == 1) { /* a row: 16 bytes in place */
            _mm_storeu_si128((__m128i *)(out + d), bytes);
            continue;
        }
        if (pair_stride == 4 && step == 2) { /* every other byte: the even bytes of 16 zero-widened words */
            _mm256_mask_storeu_epi8(out + 2 * d, 0x55555555u, _mm256_cvtepu8_epi16(bytes));
            continue;
        }
        int8_t lanes[16];
        _mm_storeu_si128((__m128i *)lanes, bytes);
        for (int i = 0; i < 16; i += 2) {
            int8_t *pair = out + (d + i) / 2 * pair_stride;
            pair[0] = lanes[i], pair[step] = lanes[i + 1];
        }
    }
    return largest / 127.0f;
}

/* Value rows asked for ahead of their use: rows of the next blocks start wherever the block
 * table puts them, and at ~8 cycles a row the prefetch must run a few hundred cycles ahead
 * (8 rows ahead left the loads waiting; 32 and 64 measured alike). */
#define VALUE_PREFETCH 32
#define WEIGHTED_ROWS_MAX 6 /* 6 rows x 4 accumulators + 4 value vectors fit the 32 zmm registers */

__attribute__((target("avx512f"))) static inline __attribute__((always_inline)) void weighted_rows_n(
    const int rows, const int kind, float *const *out, const float *rescale, const float *weights,
    Py_ssize_t weight_stride, const void *const *values, Py_ssize_t count, Py_ssize_t dim) {
    for (Py_ssize_t d0 = 0; d0 < dim; d0 += 64) {
        const int vectors = dim - d0 >= 64 ? 4 : (int)((dim - d0) / 16);
        __m512 acc[WEIGHTED_ROWS_MAX][4];
        for (int r = 0; r < rows; r++) {
            __m512 factor = _mm512_set1_ps(rescale ? rescale[r] : 0.0f);
            for (int c = 0; c < 4; c++) /* all four: the compiler cannot see that vectors >= 1 */
                acc[r][c] = rescale && c < vectors ? _mm512_mul_ps(_mm512_loadu_ps(out[r] + d0 + c * 16), factor)
                                                   : _mm512_setzero_ps();
        }
        for (Py_ssize_t j = 0; j < count; j++) {
            const void *v = values[j];
            if (j + VALUE_PREFETCH < count) { /* rows of another block start anywhere: ask for them early */
                const char *ahead = (const char *)values[j + VALUE_PREFETCH] + d0 * kv_bytes(kind);
                _mm_prefetch(ahead, _MM_HINT_T0); /* 64 dims: two lines of bf16, four of fp32 */
                _mm_prefetch(ahead + 64, _MM_HINT_T0);
                if (kind == KV_FP32 && vectors > 2) { _mm_prefetch(ahead + 128, _MM_HINT_T0); _mm_prefetch(ahead + 192, _MM_HINT_T0); }
            }
            __m512 v0 = kv_load(v, d0, kind), v1 = v0, v2 = v0, v3 = v0;
            if (vectors > 1) v1 = kv_load(v, d0 + 16, kind);
            if (vectors > 2) v2 = kv_load(v, d0 + 32, kind);
            if (vectors > 3) v3 = kv_load(v, d0 + 48, kind);
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

#define WEIGHTED_ROWS_CASE(n)                                                                          \
    case n:                                                                                            \
        if (kind == KV_BF16)                                                                      \
            weighted_rows_n(n, KV_BF16, out, rescale, weights, weight_stride, values, count, dim);     \
        else                                                                                           \
            weighted_rows_n(n, KV_FP32, out, rescale, weights, weight_stride, values, count, dim);     \
        break;

/* weighted_rows_n for any `rows` (1..WEIGHTED_ROWS_MAX) and fp32 or bf16 values, each compiled
 * with its accumulators in registers. */
__attribute__((target("avx512f"))) static void weighted_rows(int rows, int kind, float *const *out,
                                                           const float *rescale, const float *weights,
                                                           Py_ssize_t weight_stride, const void *const *values,
                                                           Py_ssize_t count, Py_ssize_t dim) {
    switch (rows) {
        WEIGHTED_ROWS_CASE(1) WEIGHTED_ROWS_CASE(2) WEIGHTED_ROWS_CASE(3)
        WEIGHTED_ROWS_CASE(4) WEIGHTED_ROWS_CASE(5) WEIGHTED_ROWS_CASE(6)
    }
}

#endif /* SELFHOST_WEIGHTED_ROWS_AVX512_H */
