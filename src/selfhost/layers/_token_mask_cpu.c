/* Apply allowed-token bitmasks to logits: -inf wherever a row's mask has a 0 bit.
 *
 * Constrained decoding (engine/grammar.py) gives each constrained row one bit per token. In
 * torch this was unpack + masked_fill over the whole vocabulary, ~0.3 ms a row on a 2-core VM
 * (a data-dependent select of 32k elements); here a word at a time: an all-ones word (32
 * allowed tokens) is skipped, an all-zero word (the common case under a grammar: most tokens
 * are forbidden) is 32 stores the compiler vectorises, and a mixed word selects per bit without
 * branching.
 * Portable C: no ISA of its own, so every CPU gets it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

static void forbid_row(float *logits, Py_ssize_t vocab, const int32_t *mask, Py_ssize_t words) {
    const float minus_inf = -INFINITY;
    for (Py_ssize_t w = 0; w < words; w++) {
        uint32_t bits = (uint32_t)mask[w];
        Py_ssize_t first = w * 32;
        if (bits == 0xFFFFFFFFu || first >= vocab) continue;
        Py_ssize_t count = vocab - first < 32 ? vocab - first : 32;
        float *out = logits + first;
        if (bits == 0) {
            for (Py_ssize_t i = 0; i < count; i++) out[i] = minus_inf;
            continue;
        }
        /* Mixed word: a branch-free select on the float's bits (random masks would mispredict a branch). */
        const uint32_t inf_bits = 0xFF800000u; /* -inf */
        for (Py_ssize_t i = 0; i < count; i++) {
            uint32_t keep = 0u - ((bits >> i) & 1u), raw;
            memcpy(&raw, out + i, sizeof raw); /* (memcpy: no aliasing of float as int) */
            raw = (raw & keep) | (inf_bits & ~keep);
            memcpy(out + i, &raw, sizeof raw);
        }
    }
}

/* forbid(logits, row_stride, vocab, rows, n_rows, masks, words): pointers as integers.
 * logits: float32 rows of `row_stride` floats; rows: int64 row indices; masks: int32 (n_rows, words). */
static PyObject *forbid(PyObject *self, PyObject *args) {
    unsigned long long logits_p, rows_p, masks_p;
    Py_ssize_t row_stride, vocab, n_rows, words;
    if (!PyArg_ParseTuple(args, "KnnKnKn", &logits_p, &row_stride, &vocab, &rows_p, &n_rows, &masks_p, &words))
        return NULL;
    float *logits = (float *)(uintptr_t)logits_p;
    const int64_t *rows = (const int64_t *)(uintptr_t)rows_p;
    const int32_t *masks = (const int32_t *)(uintptr_t)masks_p;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < n_rows; r++)
        forbid_row(logits + rows[r] * row_stride, vocab, masks + r * words, words);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"forbid", forbid, METH_VARARGS, "Set logits to -inf where the row's bitmask has a 0 bit."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_token_mask_cpu", NULL, -1, methods};

PyMODINIT_FUNC PyInit__token_mask_cpu(void) { return PyModule_Create(&module); }
