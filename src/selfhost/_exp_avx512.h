/* e^x for x <= 0 on AVX-512, shared by the prefill attention kernel (softmax) and the
 * SwiGLU kernel (sigmoid): x = n ln2 + r with |r| <= ln2/2, e^r by its degree-6 Taylor
 * polynomial (relative error below 2e-7), 2^n built in the exponent bits. Below -87 the
 * input is clamped, which keeps 2^n a normal float; e^-87 is ~0 to every caller.
 * Header-only; callers guard the include for x86-64 GCC/Clang.
 */
#ifndef SELFHOST_EXP_AVX512_H
#define SELFHOST_EXP_AVX512_H

#include <immintrin.h>

__attribute__((target("avx512f"))) static inline __m512 exp_nonpositive_avx512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x); /* ln2 split: exact high part ... */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);     /* ... and the rest */
    __m512 poly = _mm512_set1_ps(1.0f / 720.0f);
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f / 120.0f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f / 24.0f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f / 6.0f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(0.5f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f));
    __m512i two_n = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(poly, _mm512_castsi512_ps(two_n));
}

#endif /* SELFHOST_EXP_AVX512_H */
