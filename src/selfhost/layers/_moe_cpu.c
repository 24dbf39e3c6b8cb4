/* A mixture-of-experts layer's routed experts in one call (layers/moe.py).
 *
 * The Python path groups a step's (token, expert) pairs with a sort and then, per chosen
 * expert, gathers its rows, calls the gate_up product, SwiGLU and the down product, and
 * writes a slice back: ~10 Python-level calls per expert, and a batched step touches every
 * expert. On a 2-core VM that Python was ~30% of a 32-request step's MoE layers and ~25% of
 * a single-stream one's. Here the same kernels (the `_kernels` capsules of
 * _bf16_tiles_cpu, _gemm_cpu and _activation_cpu, ../_kernel_capsules.h) run in the same
 * order on the same rows, without the GIL and without a trip back to Python per expert:
 *
 *   route (softmax top-k in C, or the caller's experts and weights for other methods)
 *   -> count the pairs per expert, list each expert's rows in token order (a counting sort)
 *   -> per expert with rows: gather them, gate_up, silu(gate) * up, down, each result row
 *      to its pair's slot
 *   -> out[t] = sum over the token's k pairs (in order) of weight * result.
 *
 * Products are the layer's modules' own: bf16 tile weights take the few-row AVX-512 kernel up
 * to `few_rows_max` rows and, beyond, the whole SwiGLU MLP in one AMX call (as GatedMLP does),
 * fp32 weights the AVX-512 product; so each expert's output equals the Python path's bit for bit.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../_kernel_capsules.h"

static const ActivationKernels *activation;
static const Bf16TileKernels *tiles;
static const GemmKernels *gemm;

/* The experts' product kind (moe.py's EXPERT_KINDS). */
enum { BF16_TILES, FP32, KINDS };
/* A row of the experts table: the gate_up and down weights' addresses. */
enum { GATE_UP_W, DOWN_W, EXPERT_FIELDS };

#define PTR(type, value) ((type)(uintptr_t)(value))

static int kind_available(int kind) {
    if (!activation) return 0;
    return kind == BF16_TILES ? tiles != NULL : kind == FP32 ? gemm != NULL : 0;
}

/* y = x @ W^T as the expert's module would compute it; -1 without memory. */
static int product(int kind, Py_ssize_t few_rows_max, const float *x, int64_t w, float *y, Py_ssize_t M,
                   Py_ssize_t N, Py_ssize_t K, int num_threads) {
    if (kind == BF16_TILES) {
        if (M > few_rows_max) return tiles->linear(x, PTR(const uint16_t *, w), NULL, y, M, N, K, num_threads);
        tiles->linear_few_rows(x, PTR(const uint16_t *, w), NULL, y, M, N, K, num_threads);
        return 0;
    }
    gemm->gemm(x, PTR(const float *, w), y, M, N, K, num_threads);
    return 0;
}

/* softmax over a row's E logits, its k largest (ties: the lower expert first), optionally
 * renormalised, then scaled: as layers/router.py's softmax_top_k does in fp32. */
static void route_softmax_top_k(const float *logits, int64_t *experts, float *weights, Py_ssize_t T, Py_ssize_t E,
                                Py_ssize_t k, int normalize, float scaling, float *probs) {
    for (Py_ssize_t t = 0; t < T; t++) {
        const float *l = logits + t * E;
        float max = l[0], sum = 0.0f;
        for (Py_ssize_t e = 1; e < E; e++) max = l[e] > max ? l[e] : max;
        for (Py_ssize_t e = 0; e < E; e++) sum += probs[e] = expf(l[e] - max);
        for (Py_ssize_t e = 0; e < E; e++) probs[e] /= sum;
        float kept = 0.0f;
        for (Py_ssize_t j = 0; j < k; j++) {
            Py_ssize_t best = -1;
            for (Py_ssize_t e = 0; e < E; e++)
                if (probs[e] >= 0.0f && (best < 0 || probs[e] > probs[best])) best = e;
            experts[t * k + j] = best;
            weights[t * k + j] = probs[best];
            kept += probs[best];
            probs[best] = -1.0f; /* taken */
        }
        for (Py_ssize_t j = 0; j < k; j++) {
            if (normalize) weights[t * k + j] /= kept + 1e-20f;
            weights[t * k + j] *= scaling;
        }
    }
}

typedef struct {
    const int64_t *table;
    int kind;
    Py_ssize_t few_rows_max;
    const float *x;
    const int64_t *experts;
    const float *weights;
    float *out;
    Py_ssize_t T, H, I, E, k;
    int num_threads;
} Step;

/* The routed experts' weighted sum into out (T, H); -1 without memory. */
static int run_experts(const Step *s) {
    const Py_ssize_t pairs = s->T * s->k, H = s->H, I = s->I;
    Py_ssize_t *starts = calloc((size_t)(s->E + 1), sizeof(Py_ssize_t));
    Py_ssize_t *rows = malloc((size_t)pairs * sizeof(Py_ssize_t)); /* pair ids grouped by expert */
    float *results = malloc((size_t)(pairs * H) * sizeof(float));  /* per pair (t * k + j) */
    Py_ssize_t most = 0;
    if (!starts || !rows || !results) goto no_memory;
    for (Py_ssize_t p = 0; p < pairs; p++) starts[s->experts[p] + 1]++;
    for (Py_ssize_t e = 0; e < s->E; e++) {
        most = starts[e + 1] > most ? starts[e + 1] : most;
        starts[e + 1] += starts[e];
    }
    {
        Py_ssize_t *next = malloc((size_t)s->E * sizeof(Py_ssize_t));
        if (!next) goto no_memory;
        memcpy(next, starts, (size_t)s->E * sizeof(Py_ssize_t));
        for (Py_ssize_t p = 0; p < pairs; p++) rows[next[s->experts[p]]++] = p;
        free(next);
    }
    float *xs = malloc((size_t)(most * (H + 2 * I + I + H)) * sizeof(float));
    if (!xs) goto no_memory;
    float *gate_up = xs + most * H, *act = gate_up + most * 2 * I, *ys = act + most * I;
    int status = 0;
    for (Py_ssize_t e = 0; e < s->E && status == 0; e++) {
        const Py_ssize_t begin = starts[e], count = starts[e + 1] - begin;
        if (!count) continue;
        const int64_t *w = s->table + e * EXPERT_FIELDS;
        for (Py_ssize_t r = 0; r < count; r++)
            memcpy(xs + r * H, s->x + (rows[begin + r] / s->k) * H, (size_t)H * sizeof(float));
        if (s->kind == BF16_TILES && count > s->few_rows_max && tiles->swiglu) {
            /* past the switch, GatedMLP's own choice: the whole MLP in one AMX call, the same bits */
            if ((status = tiles->swiglu(xs, PTR(const uint16_t *, w[GATE_UP_W]), PTR(const uint16_t *, w[DOWN_W]),
                                        NULL, ys, count, I, H, s->num_threads)))
                break;
        } else {
            if ((status = product(s->kind, s->few_rows_max, xs, w[GATE_UP_W], gate_up, count, 2 * I, H,
                                  s->num_threads)))
                break;
            activation->silu_mul(gate_up, act, count, I, s->num_threads);
            if ((status = product(s->kind, s->few_rows_max, act, w[DOWN_W], ys, count, H, I, s->num_threads))) break;
        }
        for (Py_ssize_t r = 0; r < count; r++)
            memcpy(results + rows[begin + r] * H, ys + r * H, (size_t)H * sizeof(float));
    }
    free(xs);
    if (status) goto no_memory;
    for (Py_ssize_t t = 0; t < s->T; t++) {
        float *o = s->out + t * H;
        const float *wt = s->weights + t * s->k, *r0 = results + t * s->k * H;
        for (Py_ssize_t h = 0; h < H; h++) o[h] = r0[h] * wt[0];
        for (Py_ssize_t j = 1; j < s->k; j++) {
            const float *rj = r0 + j * H;
            for (Py_ssize_t h = 0; h < H; h++) o[h] += rj[h] * wt[j];
        }
    }
    free(starts), free(rows), free(results);
    return 0;
no_memory:
    free(starts), free(rows), free(results);
    return -1;
}

/* Softmax top-k routing, then the experts, without the GIL: `run` with logits, and the decode-step
 * runner's (../_kernel_capsules.h). -1 without memory. */
static int routed_softmax_top_k(const int64_t *table, int kind, Py_ssize_t few_rows_max, const float *x,
                                const float *logits, int64_t *experts, float *weights, float *out, Py_ssize_t T,
                                Py_ssize_t H, Py_ssize_t I, Py_ssize_t E, Py_ssize_t k, int normalize, float scaling,
                                int num_threads) {
    float *probs = malloc((size_t)E * sizeof(float));
    if (!probs) return -1;
    route_softmax_top_k(logits, experts, weights, T, E, k, normalize, scaling, probs);
    free(probs);
    Step step = {table, kind, few_rows_max, x, experts, weights, out, T, H, I, E, k, num_threads < 1 ? 1 : num_threads};
    return run_experts(&step);
}

static MoeKernels kernels = {SELFHOST_KERNELS_VERSION, routed_softmax_top_k};

static PyObject *run(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long table, x, logits, experts, weights, out;
    Py_ssize_t few_rows_max, T, H, I, E, k;
    int kind, normalize, num_threads;
    float scaling;
    if (!PyArg_ParseTuple(args, "KinKKKKKnnnnnpfi", &table, &kind, &few_rows_max, &x, &logits, &experts, &weights,
                          &out, &T, &H, &I, &E, &k, &normalize, &scaling, &num_threads))
        return NULL;
    if (kind < 0 || kind >= KINDS || !kind_available(kind)) {
        PyErr_Format(PyExc_ValueError, "run: product kind %d's kernels are not built for this CPU", kind);
        return NULL;
    }
    if (T < 0 || H <= 0 || I <= 0 || E <= 0 || k <= 0 || k > E || (kind == BF16_TILES && (H % 32 || I % 32))) {
        PyErr_Format(PyExc_ValueError, "run: sizes the kernels cannot take (T=%zd H=%zd I=%zd E=%zd k=%zd)", T, H, I,
                     E, k);
        return NULL;
    }
    if (kind == BF16_TILES && T * k > few_rows_max && tiles->linear == NULL) {
        PyErr_SetString(PyExc_ValueError, "run: the many-row bf16 product (AMX) is not available here");
        return NULL;
    }
    if (T == 0) Py_RETURN_NONE;
    int64_t *chosen = PTR(int64_t *, experts);
    float *chosen_weights = PTR(float *, weights);
    if (!logits) /* the caller routed: check what it hands over, a bad id would index past the table */
        for (Py_ssize_t p = 0; p < T * k; p++)
            if (chosen[p] < 0 || chosen[p] >= E) {
                PyErr_Format(PyExc_ValueError, "run: expert id %lld outside [0, %zd)", (long long)chosen[p], E);
                return NULL;
            }
    Step step = {PTR(const int64_t *, table), kind, few_rows_max, PTR(const float *, x), chosen, chosen_weights,
                 PTR(float *, out), T, H, I, E, k, num_threads < 1 ? 1 : num_threads};
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = logits ? routed_softmax_top_k(step.table, kind, few_rows_max, step.x, PTR(const float *, logits), chosen,
                                           chosen_weights, step.out, T, H, I, E, k, normalize, scaling, num_threads)
                    : run_experts(&step);
    Py_END_ALLOW_THREADS
    if (status) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *available(PyObject *self, PyObject *args) {
    (void)self;
    int kind = 0;
    if (!PyArg_ParseTuple(args, "|i", &kind)) return NULL;
    return PyBool_FromLong(kind >= 0 && kind < KINDS && kind_available(kind));
}

static PyObject *expert_fields(PyObject *self, PyObject *args) {
    (void)self, (void)args;
    return PyLong_FromLong(EXPERT_FIELDS);
}

static PyMethodDef methods[] = {
    {"available", available, METH_VARARGS,
     "available(kind=0): True when every kernel `run` calls for experts of product `kind` is built for this CPU."},
    {"expert_fields", expert_fields, METH_NOARGS, "Addresses per expert in the table `run` reads."},
    {"run", run, METH_VARARGS,
     "run(table, kind, few_rows_max, x, logits_or_0, experts, weights, out, T, H, I, E, k, normalize, scaling, "
     "num_threads): the routed experts' weighted sum into out (T, H). With logits, routes by softmax top-k into "
     "experts (T, k) int64 and weights (T, k) fp32; without, reads them."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_moe_cpu", NULL, -1, methods, NULL, NULL, NULL, NULL};

/* A module that lends no kernels on this CPU leaves its pointer NULL: `available(kind)` says
 * False and the Python path runs. */
PyMODINIT_FUNC PyInit__moe_cpu(void) {
    activation = kernels_import_optional("selfhost.layers._activation_cpu", "selfhost.layers._activation_cpu._kernels");
    tiles = kernels_import_optional("selfhost.layers._bf16_tiles_cpu", "selfhost.layers._bf16_tiles_cpu._kernels");
    gemm = kernels_import_optional("selfhost.layers._gemm_cpu", "selfhost.layers._gemm_cpu._kernels");
    PyObject *m = PyModule_Create(&module);
    if (m && kernels_export(m, "selfhost.layers._moe_cpu._kernels", &kernels) < 0) Py_CLEAR(m);
    return m;
}
