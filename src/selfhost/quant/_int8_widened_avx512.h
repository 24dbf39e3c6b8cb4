/* int8 weights (N, K) widened into the bf16 tile layout of layers/_bf16_tiles_cpu.c, so products of
 * many rows can run on that module's many-row product (AMX tiles, or without AMX its AVX-512
 * widening kernel): integers up to 127 are exact in bf16, so the weights lose nothing, and the
 * activations stay as exact as that product keeps them (fp32 without AMX, bf16 on tiles). The row
 * scales multiply the outputs afterwards. Shared by layers/_moe_cpu.c (a prompt's experts) and
 * quant/_int8_cpu.c (int8 linear layers).
 *
 * Include after ../_cpu_pool.h (and <immintrin.h> on x86-64): the job's struct is portable, the
 * rest needs AVX-512 (SELFHOST_X86). */
#ifndef SELFHOST_INT8_WIDENED_H
#define SELFHOST_INT8_WIDENED_H

#include <stdint.h>

typedef struct {
    const int8_t *q; /* (N, K), K % 32 == 0 */
    uint16_t *packed;
    Py_ssize_t N, K;
} Int8PackJob;

#ifdef SELFHOST_X86
/* One group of 16 outputs (nb): each block row's 16 pairs gathered from the 16 weight rows at once, both
 * bytes sign-extended, converted to fp32 and cut to their top halves (exact for integers). Block (nb, kb)
 * row i holds, per output n, the pair of inputs 32kb + 2i and + 1, as one 32-bit word. */
__attribute__((target("avx512f"))) static void int8_pack_group_avx512(const Int8PackJob *p, long nb) {
    const Py_ssize_t kblocks = p->K / 32, left = p->N - nb * 16, rows = left < 0 ? 0 : left < 16 ? left : 16;
    uint32_t *dst = (uint32_t *)(p->packed + (Py_ssize_t)nb * kblocks * 16 * 32);
    const int8_t *q = p->q + nb * 16 * p->K; /* past the weight for padding groups: every lane masked off */
    const __mmask16 present = (__mmask16)((1u << rows) - 1);
    const __m512i offsets = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               _mm512_set1_epi32((int)p->K));
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    for (Py_ssize_t kb = 0; kb < kblocks; kb++)
        for (Py_ssize_t i = 0; i < 16; i++, dst += 16) {
            /* 4 bytes from each row: the pair, and two bytes it ignores (never past the row: 2i + 3 < 32) */
            const __m512i words = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), present, offsets,
                                                              q + kb * 32 + 2 * i, 1);
            const __m512 first = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(words, 24), 24));
            const __m512 second = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(words, 16), 24));
            _mm512_storeu_si512(dst, _mm512_or_si512(_mm512_srli_epi32(_mm512_castps_si512(first), 16),
                                                     _mm512_and_si512(_mm512_castps_si512(second), high)));
        }
}

static void int8_pack_group_unit(const void *context, long nb) { int8_pack_group_avx512(context, nb); }

typedef struct {
    float *y;
    const float *scale, *bias; /* (N,); bias may be NULL */
    Py_ssize_t M, N;
} Int8ScaleJob;

enum { INT8_SCALE_ROWS = 16 }; /* rows a unit of the scaling pass */

/* Rows [16u, 16u + 16) of y times the row scales, plus the bias. */
__attribute__((target("avx512f"))) static void int8_scale_rows_unit(const void *context, long unit) {
    const Int8ScaleJob *j = (const Int8ScaleJob *)context;
    const Py_ssize_t m_end = (unit + 1) * INT8_SCALE_ROWS < j->M ? (unit + 1) * INT8_SCALE_ROWS : j->M;
    for (Py_ssize_t m = (Py_ssize_t)unit * INT8_SCALE_ROWS; m < m_end; m++) {
        float *row = j->y + m * j->N;
        for (Py_ssize_t n = 0; n < j->N; n += 16) {
            const __mmask16 mask = j->N - n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (j->N - n)) - 1);
            const __m512 scaled = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, row + n), _mm512_maskz_loadu_ps(mask, j->scale + n));
            _mm512_mask_storeu_ps(row + n, mask,
                                  j->bias ? _mm512_add_ps(scaled, _mm512_maskz_loadu_ps(mask, j->bias + n)) : scaled);
        }
    }
}

/* q (N, K) widened into the bf16 tile layout by the pool's threads; NULL without memory. */
static inline uint16_t *int8_widened(const int8_t *q, Py_ssize_t N, Py_ssize_t K, int num_threads) {
    const Py_ssize_t groups = (N + 63) / 64 * 4; /* the tile layout pads outputs to 64 */
    uint16_t *packed = aligned_alloc(64, sizeof(uint16_t) * (size_t)(groups * 16 * K) + 64);
    if (!packed) return NULL;
    const Int8PackJob job = {q, packed, N, K};
    pool_run(int8_pack_group_unit, &job, (long)groups, num_threads);
    return packed;
}

/* y *= scale (+ bias) per output, by the pool's threads (one scalar pass on the calling thread had
 * taken ~6% of an int8 1024-token prompt on a 2-core Xeon with AMX, 2026-12-07). */
static inline void int8_scale_outputs(float *y, const float *scale, const float *bias, Py_ssize_t M, Py_ssize_t N,
                                      int num_threads) {
    const Int8ScaleJob scaling = {y, scale, bias, M, N};
    pool_run(int8_scale_rows_unit, &scaling, (long)((M + INT8_SCALE_ROWS - 1) / INT8_SCALE_ROWS), num_threads);
}

/* y (M, N) = x (M, K) @ (q * scale)^T (+ bias) through `linear` (a Bf16TileKernels product) on the
 * widened weights; K % 32 == 0. Without the GIL; -1 without memory. */
static inline int int8_widened_product(int (*linear)(const float *, const uint16_t *, const float *, float *, Py_ssize_t,
                                                     Py_ssize_t, Py_ssize_t, int),
                                       const float *x, const int8_t *q, const float *scale, const float *bias, float *y,
                                       Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, int num_threads) {
    uint16_t *packed = int8_widened(q, N, K, num_threads);
    if (!packed) return -1;
    int status = linear(x, packed, NULL, y, M, N, K, num_threads);
    free(packed);
    if (!status) int8_scale_outputs(y, scale, bias, M, N, num_threads);
    return status;
}

/* y (M, K) = down(silu(gate(x)) * up(x)) for int8 gate|up (2I, K) and down (K, I) with their row scales,
 * through `swiglu` (Bf16TileKernels.swiglu: the MLP in one AMX call) on the widened weights: the same bits
 * as int8_widened_product, SwiGLU, int8_widened_product. I and K multiples of 32, gate|up without bias;
 * y may be x. Without the GIL; -1 without memory. */
static inline int int8_widened_swiglu(int (*swiglu)(const float *, const uint16_t *, const float *, const uint16_t *,
                                                    const float *, float *, Py_ssize_t, Py_ssize_t, Py_ssize_t, int),
                                      const float *x, const int8_t *gate_up, const float *gate_up_scale,
                                      const int8_t *down, const float *down_scale, const float *down_bias, float *y,
                                      Py_ssize_t M, Py_ssize_t I, Py_ssize_t K, int num_threads) {
    uint16_t *gate_up_packed = int8_widened(gate_up, 2 * I, K, num_threads), *down_packed = int8_widened(down, K, I, num_threads);
    int status = gate_up_packed && down_packed
                     ? swiglu(x, gate_up_packed, gate_up_scale, down_packed, NULL, y, M, I, K, num_threads)
                     : -1;
    free(gate_up_packed), free(down_packed);
    if (!status) int8_scale_outputs(y, down_scale, down_bias, M, K, num_threads);
    return status;
}

#endif /* SELFHOST_X86 */

#endif /* SELFHOST_INT8_WIDENED_H */
