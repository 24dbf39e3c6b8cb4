/* A 16 x 16 transpose of 32-bit elements in AVX-512 registers, for the kernels that turn rows into
 * columns: a prompt's keys into a cache block's dims-major columns (engine/_rope_store_avx512.h), keys
 * and values into AMX tiles (engine/_prefill_tiles_amx.h), int8 weights into AMX B tiles
 * (quant/_int8_tiles_amx.h). 64 shuffles, where 16 gathers or scatters cost several times more (and
 * far more on CPUs whose microcode guards gathers).
 * Header-only; include it where <immintrin.h> is (x86-64 GCC or Clang).
 */
#ifndef SELFHOST_TRANSPOSE_AVX512_H
#define SELFHOST_TRANSPOSE_AVX512_H

#include <immintrin.h>

/* x[0..15] transposed in place: lane j of x[i] becomes lane i of x[j]. */
__attribute__((target("avx512f"))) static inline __attribute__((always_inline)) void transpose_16x16(__m512i x[16]) {
    __m512i a[16], b[16];
    for (int i = 0; i < 16; i += 2) { /* lane l: (x_i[4l], x_i+1[4l], x_i[4l+1], x_i+1[4l+1]) and the next two */
        a[i] = _mm512_unpacklo_epi32(x[i], x[i + 1]);
        a[i + 1] = _mm512_unpackhi_epi32(x[i], x[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) { /* b[i + c], lane l: rows i .. i + 3 of column 4l + c */
        b[i] = _mm512_unpacklo_epi64(a[i], a[i + 2]);
        b[i + 1] = _mm512_unpackhi_epi64(a[i], a[i + 2]);
        b[i + 2] = _mm512_unpacklo_epi64(a[i + 1], a[i + 3]);
        b[i + 3] = _mm512_unpackhi_epi64(a[i + 1], a[i + 3]);
    }
    for (int c = 0; c < 4; c++) { /* column 4l + c: lane l of b[c], b[4 + c], b[8 + c], b[12 + c] */
        __m512i low01 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0x44), high01 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0xee);
        __m512i low23 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0x44), high23 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0xee);
        x[c] = _mm512_shuffle_i32x4(low01, low23, 0x88);
        x[4 + c] = _mm512_shuffle_i32x4(low01, low23, 0xdd);
        x[8 + c] = _mm512_shuffle_i32x4(high01, high23, 0x88);
        x[12 + c] = _mm512_shuffle_i32x4(high01, high23, 0xdd);
    }
}

#endif /* SELFHOST_TRANSPOSE_AVX512_H */
