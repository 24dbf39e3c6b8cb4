/* silu(gate) * up on 16 fp32 lanes, shared by the SwiGLU pass (_activation_cpu.c) and the
 * fused gate|up product (_bf16_tiles_cpu.c), so both give the same bits.
 *
 * silu(x) = x * sigmoid(x), with sigmoid from t = e^-|x| in (0, 1]: 1 / (1 + t) for
 * x >= 0 and t / (1 + t) below, so no exponent overflows; e^y for y <= 0 is
 * ../_exp_avx512.h's (clamped below -87: e^-87 times any finite x is zero to fp32
 * precision after the multiply by t/(1+t)).
 * Header-only; include it after ../_exp_avx512.h where AVX-512 code is compiled.
 */
#ifndef SELFHOST_SWIGLU_AVX512_H
#define SELFHOST_SWIGLU_AVX512_H

#include <immintrin.h>

__attribute__((target("avx512f"))) static inline __m512 silu_times(__m512 gate, __m512 up) {
    __m512 magnitude = _mm512_abs_ps(gate);
    __m512 t = exp_nonpositive_avx512(_mm512_sub_ps(_mm512_setzero_ps(), magnitude));
    __m512 denominator = _mm512_add_ps(_mm512_set1_ps(1.0f), t);
    __mmask16 negative = _mm512_cmp_ps_mask(gate, _mm512_setzero_ps(), _CMP_LT_OQ);
    __m512 numerator = _mm512_mask_mov_ps(_mm512_set1_ps(1.0f), negative, t);
    return _mm512_mul_ps(_mm512_mul_ps(gate, _mm512_div_ps(numerator, denominator)), up);
}

#endif /* SELFHOST_SWIGLU_AVX512_H */
