/* A greedy step's tokens: each row's argmax, in the C call that made the logits (layers/_gemm_cpu.c's
 * fp32 head, layers/_bf16_tiles_cpu.c's bf16 one).
 *
 * After a decode step's layers have streamed the weights through every cache, the Python that
 * follows runs cold: numpy's argmax over one demo-model row (4,096 logits) took ~12 us there and
 * its `.numpy()` view as much again, against ~2 us warm. Here the row is scanned by the thread
 * that waited for the product, as numpy would answer: the first NaN where a row has one, else
 * the first largest value. Two passes over a row that sits in L1/L2: the maximum (NaNs noted),
 * then the first lane equal to it. Header-only; callers guard the include for x86-64 GCC/Clang. */
#ifndef SELFHOST_ROW_ARGMAX_AVX512_H
#define SELFHOST_ROW_ARGMAX_AVX512_H

#include <Python.h>
#include <immintrin.h>

__attribute__((target("avx512f"))) static Py_ssize_t row_argmax(const float *row, Py_ssize_t n) {
    __m512 best = _mm512_set1_ps(-__builtin_inff());
    __mmask16 nan = 0;
    Py_ssize_t i = 0;
    for (; i + 16 <= n && !nan; i += 16) {
        __m512 v = _mm512_loadu_ps(row + i);
        nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        best = _mm512_max_ps(best, v);
    }
    if (nan) return i - 16 + __builtin_ctz(nan);
    float top = _mm512_reduce_max_ps(best);
    for (Py_ssize_t j = i; j < n; j++) {
        if (row[j] != row[j]) return j;
        if (row[j] > top) top = row[j];
    }
    __m512 target = _mm512_set1_ps(top);
    for (Py_ssize_t j = 0; j + 16 <= n; j += 16) {
        __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + j), target, _CMP_EQ_OQ);
        if (hit) return j + __builtin_ctz(hit);
    }
    for (Py_ssize_t j = n - n % 16; j < n; j++)
        if (row[j] == top) return j;
    return 0; /* n == 0 */
}

/* Each of M rows' argmax (n values a row) as a Python list; NULL with an error set. */
static PyObject *rows_argmax(const float *y, Py_ssize_t M, Py_ssize_t n) {
    PyObject *tokens = PyList_New(M);
    for (Py_ssize_t m = 0; tokens && m < M; m++) {
        PyObject *token = PyLong_FromSsize_t(n ? row_argmax(y + m * n, n) : 0);
        if (!token) {
            Py_CLEAR(tokens);
            break;
        }
        PyList_SET_ITEM(tokens, m, token);
    }
    return tokens;
}

#endif
