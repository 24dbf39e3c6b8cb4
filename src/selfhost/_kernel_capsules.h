/* C entry points the kernel modules lend one another through capsules, so that one C call
 * can run a whole decode step's layers (engine/_decode_layers_cpu.c) without a trip back to
 * Python per product: a decoded token of a 30-layer model made ~300 Python-level kernel calls,
 * ~3-4 ms of its ~16 on a 2-core VM, more than a fifth of single-stream decode.
 *
 * Each module fills its struct and exposes it as the capsule `<module>._kernels`. Every
 * function runs without the GIL (the caller releases it) and sets no Python error: it
 * returns 0, or -1 when scratch memory could not be had. Sizes are checked by the caller.
 */
#ifndef SELFHOST_KERNEL_CAPSULES_H
#define SELFHOST_KERNEL_CAPSULES_H

#include <Python.h>
#include <stdint.h>

#define SELFHOST_KERNELS_VERSION 7 /* 2: RopeDecodeStep took an int8 cache's scales; 3: Bf16TileKernels.linear never
                                    * NULL; 4: Bf16TileKernels.linear_few_rows takes any K; 5: its swiglu takes
                                    * gate|up output scales, Int8Kernels.linear_amx; 6: which takes packed tiles;
                                    * 7: Int8Kernels.swiglu_amx */

typedef struct { /* layers._norm_cpu */
    int version;
    void (*rms_norm)(const float *x, const float *w, float *out, Py_ssize_t rows, Py_ssize_t dim, float eps,
                     float offset);
} NormKernels;

typedef struct { /* layers._activation_cpu (x86-64 with AVX-512 only) */
    int version;
    void (*silu_mul)(const float *gate_up, float *out, Py_ssize_t rows, Py_ssize_t width, int num_threads);
} ActivationKernels;

typedef struct { /* layers._bf16_tiles_cpu: products on the packed layout */
    int version;
    /* few rows on AVX-512, exact activations, any K (past a multiple of 32 through a zero-padded copy of x);
     * -1 without memory for that copy */
    int (*linear_few_rows)(const float *x, const uint16_t *w, const float *bias, float *y, Py_ssize_t M,
                           Py_ssize_t N, Py_ssize_t K, int num_threads);
    /* many rows: on AMX tiles, activations rounded to bf16; without AMX the few-row kernel (exact
     * activations, any K); -1 without memory */
    int (*linear)(const float *x, const uint16_t *w, const float *bias, float *y, Py_ssize_t M, Py_ssize_t N,
                  Py_ssize_t K, int num_threads);
    /* y = down(silu(gate(x)) * up(x)) on AMX tiles, the same bits as linear, SwiGLU, linear; gate|up
     * without bias, I and K multiples of 32; gate_up_scale: NULL, or (2I,) factors of gate|up's outputs
     * (int8 weights widened: their row scales); y may be x; NULL without AMX; -1 without memory */
    int (*swiglu)(const float *x, const uint16_t *gate_up, const float *gate_up_scale, const uint16_t *down,
                  const float *down_bias, float *y, Py_ssize_t M, Py_ssize_t I, Py_ssize_t K, int num_threads);
} Bf16TileKernels;

typedef struct { /* layers._gemm_cpu (AVX-512): fp32 weights, and bf16 weights in their (N, K) rows */
    int version;
    void (*gemm)(const float *x, const float *w, float *y, Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, int num_threads);
    int (*gemm_bf16w)(const float *x, const uint16_t *w, float *y, Py_ssize_t M, Py_ssize_t N, Py_ssize_t K,
                      int num_threads);
} GemmKernels;

typedef struct { /* engine._paged_attention_cpu: rope_decode_attention's step */
    const float *qkv, *cos, *sin;
    const int64_t *slots, *tables, *lens;
    void *k, *v;
    float *k_scales, *v_scales; /* an int8 cache's (Hkv, NB, BS) scales; NULL otherwise */
    float *out;
    Py_ssize_t num_seqs, num_heads, num_kv_heads, head_dim, block_size, num_blocks, max_blocks, window;
    float scale, softcap;
    int num_threads, kv_kind, store_first; /* kv_kind: 0 fp32, 1 bf16, 2 int8 */
} RopeDecodeStep;

typedef struct {
    int version;
    int (*rope_decode_attention)(const RopeDecodeStep *step);
} AttentionKernels;

typedef struct { /* layers._moe_cpu: a layer's routed experts, softmax top-k routing in the call */
    int version;
    /* experts (T, k) and weights (T, k) are scratch the call fills; out (T, H) may not be x */
    int (*routed_softmax_top_k)(const int64_t *table, int kind, Py_ssize_t few_rows_max, const float *x,
                                const float *logits, int64_t *experts, float *weights, float *out, Py_ssize_t T,
                                Py_ssize_t H, Py_ssize_t I, Py_ssize_t E, Py_ssize_t k, int normalize, float scaling,
                                int num_threads);
} MoeKernels;

typedef struct { /* quant._int8_cpu (x86-64): int8 weights (N, K), one fp32 scale per output row; -1 without memory */
    int version;
    /* the activations in int8 blocks of 32 (AVX2 dots); any K */
    int (*linear)(const float *x, const int8_t *w, const float *wscale, const float *bias, float *y, Py_ssize_t M,
                  Py_ssize_t N, Py_ssize_t K, int num_threads);
    /* the same integers on the register-blocked VNNI kernel, K % 32 == 0; NULL without AVX-512 VNNI */
    int (*linear_vnni)(const float *x, const int8_t *w, const float *wscale, const float *bias, float *y,
                       Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, int num_threads);
    /* the weights widened exactly onto the bf16 tiles' many-row product, K % 32 == 0; NULL without them */
    int (*linear_widened)(const float *x, const int8_t *w, const float *wscale, const float *bias, float *y,
                          Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, int num_threads);
    /* AMX-INT8 tiles, each activation row quantized with one scale (W8A8), K % 32 == 0; `packed`: w's tiles as
     * _int8_cpu.pack_amx wrote them, or NULL (packed per call); NULL without AMX-INT8 */
    int (*linear_amx)(const float *x, const int8_t *w, const int8_t *packed, const float *wscale, const float *bias,
                      float *y, Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, int num_threads);
    /* a SwiGLU MLP on those tiles, the activation applied as the gate|up sums leave them (gate|up by its packed
     * tiles, no bias; down by its weights and tiles), I and hidden % 32 == 0, y may be x; NULL without AMX-INT8 */
    int (*swiglu_amx)(const float *x, const int8_t *gate_up_packed, const float *gate_up_scale, const int8_t *down,
                      const int8_t *down_packed, const float *down_scale, const float *down_bias, float *y,
                      Py_ssize_t M, Py_ssize_t I, Py_ssize_t hidden, int num_threads);
} Int8Kernels;

/* The struct behind capsule `name` of module `module`, NULL with a Python error set. */
static inline const void *kernels_import(const char *module, const char *name) {
    PyObject *imported = PyImport_ImportModule(module);
    if (!imported) return NULL;
    Py_DECREF(imported);
    const int *api = (const int *)PyCapsule_Import(name, 0);
    if (api && *api != SELFHOST_KERNELS_VERSION) {
        PyErr_Format(PyExc_ImportError, "%s has another kernel API version: reinstall selfhost", module);
        return NULL;
    }
    return api;
}

/* The struct behind `module`'s `_kernels` capsule, or NULL with no Python error where the module is
 * not built or lends no kernels on this CPU (its caller then reports itself unavailable). */
static inline const void *kernels_import_optional(const char *module, const char *name) {
    PyObject *imported = PyImport_ImportModule(module);
    if (!imported) {
        PyErr_Clear();
        return NULL;
    }
    int lends = PyObject_HasAttrString(imported, "_kernels");
    Py_DECREF(imported);
    if (!lends) return NULL;
    const void *api = kernels_import(module, name);
    if (!api) PyErr_Clear();
    return api;
}

/* Adds `kernels` to `module` as its `_kernels` capsule; -1 with a Python error on failure. */
static inline int kernels_export(PyObject *module, const char *name, void *kernels) {
    PyObject *capsule = PyCapsule_New(kernels, name, NULL);
    if (!capsule) return -1;
    if (PyModule_AddObject(module, "_kernels", capsule) < 0) {
        Py_DECREF(capsule);
        return -1;
    }
    return 0;
}

#endif /* SELFHOST_KERNEL_CAPSULES_H */
