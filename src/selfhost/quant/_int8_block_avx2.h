/* One block of 32 fp32 activations to int8 for the int8 products (quant/_int8_cpu.c's rows,
 * layers/_moe_cpu.c's experts): round(x * 127 / max|x|) to nearest even (the default rounding
 * mode, as lrintf in the scalar paths), into q[0..32); returns the block's scale max|x| / 127.
 * Header-only; callers guard the include for x86-64 GCC/Clang.
 */
#ifndef SELFHOST_INT8_BLOCK_AVX2_H
#define SELFHOST_INT8_BLOCK_AVX2_H

#include <immintrin.h>
#include <stdint.h>

__attribute__((target("avx2,fma"))) static inline float quantize_block32_avx2(const float *p, int8_t *q) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 v0 = _mm256_loadu_ps(p), v1 = _mm256_loadu_ps(p + 8);
    __m256 v2 = _mm256_loadu_ps(p + 16), v3 = _mm256_loadu_ps(p + 24);
    __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v0, abs_mask), _mm256_and_ps(v1, abs_mask)),
                              _mm256_max_ps(_mm256_and_ps(v2, abs_mask), _mm256_and_ps(v3, abs_mask)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, inv)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, inv));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, inv)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, inv));
    /* packs work per 128-bit lane; the permute puts the 32 bytes back in order */
    __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    _mm256_storeu_si256((__m256i *)q, _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    return amax / 127.0f;
}

#endif /* SELFHOST_INT8_BLOCK_AVX2_H */
