/* SwiGLU on CPU in one pass: out = silu(gate) * up, from the fused [gate | up] projection.
 *
 * torch computes this as two passes (silu into a temporary, then a multiply) over a
 * strided half of each row, on however many threads torch's pool has for the step;
 * at a prompt's 1024 rows x 1536 that was ~5% of a batched run on a 2-core machine.
 * Here each row is read once and written once, 16 values per AVX-512 step, on the
 * engine step's threads (../_cpu_pool.h). The arithmetic is _swiglu_avx512.h's, which the
 * fused gate|up product on AMX shares.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SELFHOST_X86 1
#include <immintrin.h>

#include "../_cpu_pool.h"
#include "../_exp_avx512.h"
#include "../_kernel_capsules.h"
#include "_swiglu_avx512.h"

#define AVX512 __attribute__((target("avx512f")))
#define ROWS_PER_CHUNK 4

typedef struct {
    const float *gate_up; /* (rows, 2 * width): gate then up */
    float *out;           /* (rows, width) */
    Py_ssize_t rows, width;
} Job;


AVX512 static void run_chunk(const void *context, long chunk) {
    const Job *job = (const Job *)context;
    Py_ssize_t end = (chunk + 1) * ROWS_PER_CHUNK < job->rows ? (chunk + 1) * ROWS_PER_CHUNK : job->rows;
    for (Py_ssize_t m = chunk * ROWS_PER_CHUNK; m < end; m++) {
        const float *gate = job->gate_up + m * 2 * job->width, *up = gate + job->width;
        float *out = job->out + m * job->width;
        for (Py_ssize_t k = 0; k < job->width; k += 16) {
            __mmask16 mask = job->width - k >= 16 ? 0xffff : (__mmask16)((1u << (job->width - k)) - 1);
            __m512 g = _mm512_maskz_loadu_ps(mask, gate + k), u = _mm512_maskz_loadu_ps(mask, up + k);
            _mm512_mask_storeu_ps(out + k, mask, silu_times(g, u));
        }
    }
}

static int cpu_has_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
}

/* Without the GIL: also the decode-step runner's (../_kernel_capsules.h). */
static void silu_mul_rows(const float *gate_up, float *out, Py_ssize_t rows, Py_ssize_t width, int num_threads) {
    Job job = {gate_up, out, rows, width};
    pool_run(run_chunk, &job, (long)((rows + ROWS_PER_CHUNK - 1) / ROWS_PER_CHUNK), num_threads < 1 ? 1 : num_threads);
}

static ActivationKernels kernels = {SELFHOST_KERNELS_VERSION, silu_mul_rows};
#endif /* SELFHOST_X86 */

static PyObject *available(PyObject *self, PyObject *args) {
    (void)self, (void)args;
#ifdef SELFHOST_X86
    return PyBool_FromLong(cpu_has_avx512());
#else
    Py_RETURN_FALSE;
#endif
}

static PyObject *silu_mul(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long gate_up, out;
    Py_ssize_t rows, width;
    int num_threads;
    if (!PyArg_ParseTuple(args, "KKnni", &gate_up, &out, &rows, &width, &num_threads)) return NULL;
#ifdef SELFHOST_X86
    if (rows < 0 || width < 0) {
        PyErr_SetString(PyExc_ValueError, "silu_mul: negative size");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    silu_mul_rows((const float *)gate_up, (float *)out, rows, width, num_threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
#else
    (void)gate_up, (void)out, (void)rows, (void)width, (void)num_threads;
    PyErr_SetString(PyExc_RuntimeError, "silu_mul: built without x86-64 support");
    return NULL;
#endif
}

static PyMethodDef methods[] = {
    {"available", available, METH_NOARGS, "True when this CPU has AVX-512F and the kernel was built for it."},
    {"silu_mul", silu_mul, METH_VARARGS,
     "silu_mul(gate_up, out, rows, width, num_threads): out = silu(gate) * up, fp32, contiguous, data pointers."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_activation_cpu", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__activation_cpu(void) {
#ifdef SELFHOST_X86
    if (pool_import() < 0) return NULL; /* the process's one worker pool (../_cpu_pool.h) */
#endif
    PyObject *m = PyModule_Create(&module);
#ifdef SELFHOST_X86
    if (m && cpu_has_avx512() && kernels_export(m, "selfhost.layers._activation_cpu._kernels", &kernels) < 0) Py_CLEAR(m);
#endif
    return m;
}
