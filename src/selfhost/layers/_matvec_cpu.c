/* fp32 products of a few activation rows with a weight matrix: y = x @ W^T, on CPU.
 *
 * Built at install time as an optional extension (setup.py); layers/linear.py
 * uses it for steps of up to 31 rows (decode) and numpy's BLAS otherwise.
 *
 * Why not the BLAS: a decode step streams every weight once, so speed is
 * memory bandwidth. Two things were measured on this class of machine:
 *  - software prefetching a few KiB ahead of the rows being read streams
 *    faster than the hardware prefetcher alone (as in quant/_int8_cpu.c);
 *  - OpenBLAS splits a product between its threads in fixed shares, so when
 *    another process holds a core the caller waits for a descheduled worker
 *    and a step takes 10-40x longer.
 * Here the caller and a persistent worker pool (../_cpu_pool.h) take chunks of
 * weight rows from one atomic counter until none are left. A worker that is not
 * running simply takes no chunks: the caller does the whole product itself, at
 * one-thread speed, and never waits for a chunk nobody started.
 *
 * Two instruction sets: AVX2 with FMA on x86-64 (when the CPU has them) and
 * NEON on aarch64, the decode product of a Raspberry Pi or a Graviton. Both
 * form the same tiles; only the register width differs.
 *
 * Layouts: x (M, K), W (N, K), y (M, N), all contiguous fp32.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#if (defined(__GNUC__) || defined(__clang__)) && !defined(__STDC_NO_ATOMICS__)
#if defined(__x86_64__)
#define SELFHOST_MATVEC_AVX2 1 /* chosen at run time: the CPU must have AVX2 and FMA */
#include <immintrin.h>
#elif defined(__aarch64__) && defined(__ARM_NEON)
#define SELFHOST_MATVEC_NEON 1 /* every aarch64 CPU has NEON with FMA (Raspberry Pi 3 onwards, Graviton, Apple) */
#include <arm_neon.h>
#endif
#endif

#if defined(SELFHOST_MATVEC_AVX2) || defined(SELFHOST_MATVEC_NEON)
#define SELFHOST_MATVEC 1
#include "../_cpu_pool.h"
#endif

#ifdef SELFHOST_MATVEC

#define TILE 4              /* weight rows whose dot products are formed together */
#define CHUNK_ROWS 32       /* weight rows per unit of work taken from the counter */
#define PREFETCH_BYTES 8192 /* how far ahead of each weight row to ask for cache lines */

typedef struct {
    const float *x, *w;
    float *y;
    Py_ssize_t M, N, K;
} Product;

#endif /* SELFHOST_MATVEC */

#ifdef SELFHOST_MATVEC_AVX2

#define AVX2 __attribute__((target("avx2,fma")))

AVX2 static float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* y[m, n0:n0+rows] for every m: the tile's weight rows stay in L1 while each activation row meets them. */
AVX2 static void tile_dots(const Product *p, Py_ssize_t n0, int rows) {
    const Py_ssize_t K = p->K, vec_k = K & ~(Py_ssize_t)7;
    const float *w = p->w + n0 * K;
    for (Py_ssize_t m = 0; m < p->M; m++) {
        const float *x = p->x + m * K;
        float *y = p->y + m * p->N + n0;
        if (rows == TILE) {
            const float *w0 = w, *w1 = w + K, *w2 = w + 2 * K, *w3 = w + 3 * K;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (Py_ssize_t k = 0; k < vec_k; k += 8) {
                if (m == 0 && (k & 15) == 0) { /* one prefetch per 64-byte line, first pass only */
                    _mm_prefetch((const char *)(w0 + k) + PREFETCH_BYTES, _MM_HINT_T0);
                    _mm_prefetch((const char *)(w1 + k) + PREFETCH_BYTES, _MM_HINT_T0);
                    _mm_prefetch((const char *)(w2 + k) + PREFETCH_BYTES, _MM_HINT_T0);
                    _mm_prefetch((const char *)(w3 + k) + PREFETCH_BYTES, _MM_HINT_T0);
                }
                __m256 xv = _mm256_loadu_ps(x + k);
                a0 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w0 + k), a0);
                a1 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w1 + k), a1);
                a2 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w2 + k), a2);
                a3 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w3 + k), a3);
            }
            float d0 = hsum(a0), d1 = hsum(a1), d2 = hsum(a2), d3 = hsum(a3);
            for (Py_ssize_t k = vec_k; k < K; k++) {
                d0 += x[k] * w0[k], d1 += x[k] * w1[k], d2 += x[k] * w2[k], d3 += x[k] * w3[k];
            }
            y[0] = d0, y[1] = d1, y[2] = d2, y[3] = d3;
        } else {
            for (int r = 0; r < rows; r++) {
                const float *wr = w + r * K;
                __m256 acc = _mm256_setzero_ps();
                for (Py_ssize_t k = 0; k < vec_k; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_loadu_ps(wr + k), acc);
                float d = hsum(acc);
                for (Py_ssize_t k = vec_k; k < K; k++) d += x[k] * wr[k];
                y[r] = d;
            }
        }
    }
}

static int cpu_can_run(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

#endif /* SELFHOST_MATVEC_AVX2 */

#ifdef SELFHOST_MATVEC_NEON

/* The AVX2 path's tiles on 4-lane registers: 8 floats a step, in two halves with an
 * accumulator each, so every row keeps two FMA chains in flight instead of waiting on one.
 * The prefetch distance is the x86 one, not measured on an ARM core. */
static void tile_dots(const Product *p, Py_ssize_t n0, int rows) {
    const Py_ssize_t K = p->K, vec_k = K & ~(Py_ssize_t)7;
    const float *w = p->w + n0 * K;
    for (Py_ssize_t m = 0; m < p->M; m++) {
        const float *x = p->x + m * K;
        float *y = p->y + m * p->N + n0;
        if (rows == TILE) {
            const float *w0 = w, *w1 = w + K, *w2 = w + 2 * K, *w3 = w + 3 * K;
            float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
            for (Py_ssize_t k = 0; k < vec_k; k += 8) {
                if (m == 0 && (k & 15) == 0) { /* one prefetch per 64-byte line, first pass only */
                    __builtin_prefetch((const char *)(w0 + k) + PREFETCH_BYTES, 0, 3);
                    __builtin_prefetch((const char *)(w1 + k) + PREFETCH_BYTES, 0, 3);
                    __builtin_prefetch((const char *)(w2 + k) + PREFETCH_BYTES, 0, 3);
                    __builtin_prefetch((const char *)(w3 + k) + PREFETCH_BYTES, 0, 3);
                }
                const float32x4_t xl = vld1q_f32(x + k), xh = vld1q_f32(x + k + 4);
                a0 = vfmaq_f32(a0, xl, vld1q_f32(w0 + k)), b0 = vfmaq_f32(b0, xh, vld1q_f32(w0 + k + 4));
                a1 = vfmaq_f32(a1, xl, vld1q_f32(w1 + k)), b1 = vfmaq_f32(b1, xh, vld1q_f32(w1 + k + 4));
                a2 = vfmaq_f32(a2, xl, vld1q_f32(w2 + k)), b2 = vfmaq_f32(b2, xh, vld1q_f32(w2 + k + 4));
                a3 = vfmaq_f32(a3, xl, vld1q_f32(w3 + k)), b3 = vfmaq_f32(b3, xh, vld1q_f32(w3 + k + 4));
            }
            float d0 = vaddvq_f32(vaddq_f32(a0, b0)), d1 = vaddvq_f32(vaddq_f32(a1, b1));
            float d2 = vaddvq_f32(vaddq_f32(a2, b2)), d3 = vaddvq_f32(vaddq_f32(a3, b3));
            for (Py_ssize_t k = vec_k; k < K; k++) {
                d0 += x[k] * w0[k], d1 += x[k] * w1[k], d2 += x[k] * w2[k], d3 += x[k] * w3[k];
            }
            y[0] = d0, y[1] = d1, y[2] = d2, y[3] = d3;
        } else {
            for (int r = 0; r < rows; r++) {
                const float *wr = w + r * K;
                float32x4_t a = vdupq_n_f32(0.0f), b = a;
                for (Py_ssize_t k = 0; k < vec_k; k += 8) {
                    a = vfmaq_f32(a, vld1q_f32(x + k), vld1q_f32(wr + k));
                    b = vfmaq_f32(b, vld1q_f32(x + k + 4), vld1q_f32(wr + k + 4));
                }
                float d = vaddvq_f32(vaddq_f32(a, b));
                for (Py_ssize_t k = vec_k; k < K; k++) d += x[k] * wr[k];
                y[r] = d;
            }
        }
    }
}

static int cpu_can_run(void) { return 1; }

#endif /* SELFHOST_MATVEC_NEON */

#ifdef SELFHOST_MATVEC

static void run_chunk(const Product *p, Py_ssize_t chunk) {
    Py_ssize_t end = (chunk + 1) * CHUNK_ROWS < p->N ? (chunk + 1) * CHUNK_ROWS : p->N;
    for (Py_ssize_t n = chunk * CHUNK_ROWS; n < end; n += TILE) tile_dots(p, n, end - n < TILE ? (int)(end - n) : TILE);
}

static void run_chunk_of(const void *product, long chunk) { run_chunk((const Product *)product, chunk); }

static int cpu_supported; /* cpu_can_run(), read once when the module loads */

#endif /* SELFHOST_MATVEC */

static PyObject *available(PyObject *self, PyObject *args) {
    (void)self, (void)args;
#ifdef SELFHOST_MATVEC
    return PyBool_FromLong(cpu_supported);
#else
    Py_RETURN_FALSE;
#endif
}

static PyObject *matvec(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x, w, y;
    Py_ssize_t M, N, K;
    int num_threads;
    if (!PyArg_ParseTuple(args, "KKKnnni", &x, &w, &y, &M, &N, &K, &num_threads)) return NULL;
#ifdef SELFHOST_MATVEC
    if (!cpu_supported) { /* AVX2 instructions on a CPU without them would kill the process */
        PyErr_SetString(PyExc_RuntimeError, "matvec: this CPU lacks AVX2/FMA");
        return NULL;
    }
    if (M < 0 || N < 0 || K < 0 || N >= ((Py_ssize_t)1 << 31) * CHUNK_ROWS) {
        PyErr_SetString(PyExc_ValueError, "matvec: sizes out of range");
        return NULL;
    }
    Product p = {(const float *)x, (const float *)w, (float *)y, M, N, K};
    long num_chunks = (long)((N + CHUNK_ROWS - 1) / CHUNK_ROWS);
    Py_BEGIN_ALLOW_THREADS
    pool_run(run_chunk_of, &p, num_chunks, num_threads < 1 ? 1 : num_threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
#else
    (void)x, (void)w, (void)y, (void)M, (void)N, (void)K, (void)num_threads;
    PyErr_SetString(PyExc_RuntimeError, "matvec: built without AVX2 (x86-64) or NEON (aarch64) support");
    return NULL;
#endif
}

static PyMethodDef methods[] = {
    {"available", available, METH_NOARGS,
     "True when the kernel was built for this CPU and can run: x86-64 with AVX2 and FMA, or aarch64 (NEON)."},
    {"matvec", matvec, METH_VARARGS, "y = x @ W^T for fp32 contiguous tensors passed as data pointers."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_matvec_cpu", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__matvec_cpu(void) {
#ifdef SELFHOST_MATVEC
    if (pool_import() < 0) return NULL; /* the process's one worker pool (../_cpu_pool.h) */
    cpu_supported = cpu_can_run();
#endif
    return PyModule_Create(&module);
}
