/* Many activation rows against int8 weights on AVX-512 VNNI, register-blocked: the int8 products'
 * arithmetic (activations in int8 blocks of 32 with an fp32 scale each, every block's products
 * summed exactly in int32, one fp32 scale per weight row) at several times the dots' rate.
 *
 * Why: the dots (one activation row against four weight rows, 256-bit) spend five instructions per
 * 32 products and convert each block's lanes to fp32 separately, ~140 GOP/s on two Xeon cores at
 * any row count; widening the weights to bf16 instead (_int8_widened_avx512.h) runs on fp32 FMAs
 * without AMX, 64 flops a cycle at best. vpdpbusd does 64 multiply-adds per instruction; here
 * ROWS x 2 of them share each loaded weight vector and each broadcast activation word, and a
 * block's int32 sums go to fp32 once per 32 inputs.
 *
 * vpdpbusd multiplies unsigned by signed bytes. The activations (in [-127, 127]) are offset by 128
 * into [1, 255] (a flip of the top bit), which adds 128 x the block's weight sum to each sum: the
 * packed strip carries minus that per block and output, the starting value of each block's sum.
 * The sums stay exact: a block's is at most 32 x 255 x 127 in magnitude.
 *
 * Layout of a strip (32 outputs n0..n0+31 of an (N, K) int8 weight, K % 32 == 0): for each group g
 * of 16 outputs and each quad q of 4 inputs, 64 bytes: output n0 + 16g + j's inputs 4q..4q+3 at
 * bytes 4j..4j+3 (vpdpbusd's lanes); then per block b and group g, 16 int32: -128 x sum of the
 * block's weights per output. Outputs past N are zero weights.
 *
 * The result per output is sum over blocks of fp32(block sum) x activation scale, times the row
 * scale: the same integers as the dots, summed in fp32 in another order (one conversion per block,
 * not per lane), so equal to them within fp32 rounding, not bit for bit.
 *
 * Include after <immintrin.h> and <stdint.h>; x86-64 GCC/Clang only.
 */
#ifndef SELFHOST_INT8_ROWS_VNNI_H
#define SELFHOST_INT8_ROWS_VNNI_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define VNNI_STRIP 32 /* outputs per strip: two groups of 16 */
#define VNNI_ROWS 6   /* activation rows a pass: 12 fp32 and 12 int32 sums, 29 of the 32 registers */

#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

/* Bytes of a packed strip of K inputs. */
static inline size_t vnni_strip_bytes(Py_ssize_t K) {
    return (size_t)(VNNI_STRIP * K) + (size_t)(K / 32) * 2 * 16 * sizeof(int32_t);
}

/* Outputs [n0, n0 + 32) of q (N, K) into `strip` (vnni_strip_bytes(K), 64-byte aligned). */
VNNI_TARGET static void vnni_pack_strip(const int8_t *q, Py_ssize_t N, Py_ssize_t K, Py_ssize_t n0, int8_t *strip) {
    const Py_ssize_t quads = K / 4, blocks = K / 32;
    int32_t *corrections = (int32_t *)(strip + VNNI_STRIP * K);
    const __m512i ones = _mm512_set1_epi8(1);
    for (int g = 0; g < 2; g++) {
        const Py_ssize_t first = n0 + 16 * g, left = N - first;
        const int rows = left <= 0 ? 0 : left < 16 ? (int)left : 16;
        const __mmask16 present = (__mmask16)((1u << rows) - 1);
        const __m512i offsets = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                   _mm512_set1_epi32((int)K));
        const int8_t *base = rows ? q + first * K : q; /* padding groups: every lane masked off */
        int8_t *dst = strip + g * quads * 64;
        for (Py_ssize_t b = 0; b < blocks; b++) {
            __m512i sum = _mm512_setzero_si512();
            for (int i = 0; i < 8; i++) {
                const Py_ssize_t quad = b * 8 + i;
                const __m512i w = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), present, offsets, base + 4 * quad, 1);
                _mm512_store_si512(dst + quad * 64, w);
                sum = _mm512_dpbusd_epi32(sum, ones, w);
            }
            _mm512_store_si512(corrections + (b * 2 + g) * 16, _mm512_mullo_epi32(sum, _mm512_set1_epi32(-128)));
        }
    }
}

/* ROWS activation rows (u8, offset) x the strip's 32 outputs over all of K, into out rows
 * (stride N, outputs n0.. up to `width`), each times its row scale. `xs[r]`/`scales[r]`: row r's
 * K offset bytes and K / 32 block scales. */
VNNI_TARGET static inline __attribute__((always_inline)) void vnni_rows_kernel(
    const int ROWS, const uint8_t *const *xs, const float *const *scales, const int8_t *strip, Py_ssize_t K,
    const float *wscale, float *const *outs, int width) {
    const Py_ssize_t quads = K / 4, blocks = K / 32;
    const int32_t *corrections = (const int32_t *)(strip + VNNI_STRIP * K);
    __m512 acc[VNNI_ROWS][2];
    for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (Py_ssize_t b = 0; b < blocks; b++) {
        const __m512i c0 = _mm512_load_si512(corrections + (b * 2) * 16);
        const __m512i c1 = _mm512_load_si512(corrections + (b * 2 + 1) * 16);
        __m512i sums[VNNI_ROWS][2];
        for (int r = 0; r < ROWS; r++) sums[r][0] = c0, sums[r][1] = c1;
        for (int i = 0; i < 8; i++) {
            const Py_ssize_t quad = b * 8 + i;
            const __m512i w0 = _mm512_load_si512(strip + quad * 64);
            const __m512i w1 = _mm512_load_si512(strip + (quads + quad) * 64);
            for (int r = 0; r < ROWS; r++) {
                int32_t word;
                memcpy(&word, xs[r] + quad * 4, sizeof word);
                const __m512i x = _mm512_set1_epi32(word);
                sums[r][0] = _mm512_dpbusd_epi32(sums[r][0], x, w0);
                sums[r][1] = _mm512_dpbusd_epi32(sums[r][1], x, w1);
            }
        }
        for (int r = 0; r < ROWS; r++) {
            const __m512 d = _mm512_set1_ps(scales[r][b]);
            acc[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[r][0]), d, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[r][1]), d, acc[r][1]);
        }
    }
    const __mmask16 m0 = (__mmask16)(width >= 16 ? 0xffff : (1u << width) - 1);
    const __mmask16 m1 = (__mmask16)(width >= 32 ? 0xffff : width <= 16 ? 0 : (1u << (width - 16)) - 1);
    const __m512 s0 = _mm512_maskz_loadu_ps(m0, wscale), s1 = _mm512_maskz_loadu_ps(m1, wscale + 16);
    for (int r = 0; r < ROWS; r++) {
        _mm512_mask_storeu_ps(outs[r], m0, _mm512_mul_ps(acc[r][0], s0));
        _mm512_mask_storeu_ps(outs[r] + 16, m1, _mm512_mul_ps(acc[r][1], s1));
    }
}

/* Rows [0, M) against a packed strip: row m's activations xu + src(m) * K, scales xscale + src(m) * K / 32,
 * src(m) = sources ? sources[m] : m; results to out + m * N + n0 (the strip's `width` outputs). */
VNNI_TARGET static void vnni_rows_strip(const uint8_t *xu, const float *xscale, const Py_ssize_t *sources,
                                        Py_ssize_t M, const int8_t *strip, Py_ssize_t K, const float *wscale,
                                        float *out, Py_ssize_t N, Py_ssize_t n0, int width) {
    const Py_ssize_t nb = K / 32;
    for (Py_ssize_t m = 0; m < M; m += VNNI_ROWS) {
        const int rows = M - m < VNNI_ROWS ? (int)(M - m) : VNNI_ROWS;
        const uint8_t *xs[VNNI_ROWS];
        const float *scales[VNNI_ROWS];
        float *outs[VNNI_ROWS];
        for (int r = 0; r < rows; r++) {
            const Py_ssize_t a = sources ? sources[m + r] : m + r;
            xs[r] = xu + a * K, scales[r] = xscale + a * nb, outs[r] = out + (m + r) * N + n0;
        }
        switch (rows) { /* each a kernel of its own, its sums in registers */
            case 1: vnni_rows_kernel(1, xs, scales, strip, K, wscale + n0, outs, width); break;
            case 2: vnni_rows_kernel(2, xs, scales, strip, K, wscale + n0, outs, width); break;
            case 3: vnni_rows_kernel(3, xs, scales, strip, K, wscale + n0, outs, width); break;
            case 4: vnni_rows_kernel(4, xs, scales, strip, K, wscale + n0, outs, width); break;
            case 5: vnni_rows_kernel(5, xs, scales, strip, K, wscale + n0, outs, width); break;
            default: vnni_rows_kernel(VNNI_ROWS, xs, scales, strip, K, wscale + n0, outs, width); break;
        }
    }
}

#endif /* SELFHOST_INT8_ROWS_VNNI_H */
