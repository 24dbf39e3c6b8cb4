/* A decode step's decoder layers in one C call, on CPU: the kernels the Python layers call one
 * by one (RMSNorm, the bf16 few-row products, rotary + paged attention, SwiGLU), called here
 * in the same order on the same buffers, with the residual adds between them.
 *
 * Why: on a 2-core VM a decoded token of a 30-layer ~125M model spent ~3-4 ms of its ~16 in
 * Python between kernels (~10 kernel calls and a dozen tensor ops per layer), while the other
 * core waited. The kernels are the very functions the Python path calls (reached through the
 * modules' `_kernels` capsules, ../_kernel_capsules.h), so the outputs are the same bits.
 *
 * Layers this runs (engine/decode_layers.py decides, once per model): pre-norm Llama-style
 * blocks (RMSNorm, fused q|k|v projection with optional bias, optional q/k head norms, full-width rotary, attention
 * over the paged cache with its C kernel, o projection, RMSNorm, fused gate|up, SwiGLU, down),
 * every product of one kind: bf16 "tiles" weights (K a multiple of 32) or bf16 weights in rows
 * (both within their few-row kernel's range), or fp32 weights on the AVX-512 product; a bias
 * is added after the product as Linear and Bf16Linear add it. Anything else keeps the
 * Python path.
 *
 * The call takes the step's token ids and positions and returns the final norm's output: it gathers
 * the embedding rows and the rotary rows itself (a copy, as the model's lookups) and keeps its
 * buffers in one block, so a small model's step spends no Python on them (~60 us of a ~395 us
 * demo-model token went to that glue).
 *
 * Per layer the runner reads LAYER_FIELDS int64 values from `layers`: the addresses of the
 * input norm's weight, qkv weight and bias (0: none), o weight and bias, post-attention norm's
 * weight, gate|up weight and bias, down weight and bias, the layer's key and value cache and
 * their scales (an int8 cache; 0 otherwise), its sliding window (0: none), and the q and k heads' norm weights (0: none; Qwen3 style, each
 * head's D values normalised before rotary, with `qk_eps`). A mixture-of-experts layer (Mixtral,
 * Qwen3-MoE: softmax top-k routing, no shared expert) has no gate|up weight and names its router
 * and experts instead: the router's product, then the experts in one call of layers/_moe_cpu.c.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../_kernel_capsules.h"

enum {
    INPUT_NORM, QKV_W, QKV_B, O_W, O_B, POST_NORM, GATE_UP_W, GATE_UP_B, DOWN_W, DOWN_B, K_CACHE, V_CACHE, K_SCALES,
    V_SCALES, WINDOW,
    Q_NORM, K_NORM,
    /* a mixture-of-experts MLP (GATE_UP_W 0): router weight and its product's kind and switch, the
     * experts' table (layers/moe.py's ExpertKernel) with their kind, switch and width, the number
     * of experts, how many each token takes, renormalise (0/1), the routed scaling as fp32 bits */
    ROUTER_W, ROUTER_KIND, ROUTER_SWITCH, EXPERTS, EXPERT_KIND, EXPERT_SWITCH, EXPERT_WIDTH, NUM_EXPERTS, TOP_K,
    NORMALIZE, SCALING,
    LAYER_FIELDS
};

static const NormKernels *norm;
static const ActivationKernels *activation;
static const Bf16TileKernels *tiles;
static const GemmKernels *gemm;
static const AttentionKernels *attention;
static const MoeKernels *moe;

/* The products' kind (decode_layers.py's PRODUCT_KINDS). */
enum { BF16_TILES, FP32, BF16_ROWS, KINDS };

#define PTR(type, value) ((type)(uintptr_t)(value))

/* x += y over n values */
static void add_into(float *x, const float *y, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) x[i] += y[i];
}

/* y = x @ W^T (+ bias) through the kernel the layer's module would call (for tiles: the few-row
 * kernel up to `few_rows_max` rows, the many-row product beyond, as Bf16Linear switches); -1 without memory. */
static int product(int kind, Py_ssize_t few_rows_max, const float *x, int64_t w, int64_t bias, float *y,
                   Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, int num_threads) {
    if (kind == BF16_TILES) { /* the tile kernels add the bias themselves, as Bf16Linear has them do */
        if (M > few_rows_max)
            return tiles->linear(x, PTR(const uint16_t *, w), PTR(const float *, bias), y, M, N, K, num_threads);
        tiles->linear_few_rows(x, PTR(const uint16_t *, w), PTR(const float *, bias), y, M, N, K, num_threads);
        return 0;
    }
    if (kind == FP32)
        gemm->gemm(x, PTR(const float *, w), y, M, N, K, num_threads);
    else if (gemm->gemm_bf16w(x, PTR(const uint16_t *, w), y, M, N, K, num_threads) < 0)
        return -1;
    if (bias)
        for (Py_ssize_t m = 0; m < M; m++) add_into(y + m * N, PTR(const float *, bias), N);
    return 0;
}

static int kind_available(int kind) {
    if (!(norm && activation && attention)) return 0;
    return kind == BF16_TILES ? tiles != NULL : (kind == FP32 || kind == BF16_ROWS) ? gemm != NULL : 0;
}

static PyObject *run_layers(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long layers, ids, positions, embed, cos_table, sin_table, final_norm, out, slots, tables, lens;
    Py_ssize_t num_layers, vocab, table_rows, tokens, hidden, intermediate, num_heads, num_kv_heads, head_dim;
    Py_ssize_t block_size, num_blocks, max_blocks;
    float eps, qk_eps, final_eps, norm_offset, scale, softcap;
    int kind, num_threads, attention_threads, kv_kind, store_first;
    Py_ssize_t few_rows_max;
    if (!PyArg_ParseTuple(args, "KninKKKnKKnKKKKKnnnnnnnnnffffffiiip", &layers, &num_layers, &kind, &few_rows_max, &ids,
                          &positions, &embed, &vocab, &cos_table, &sin_table, &table_rows, &final_norm, &out, &slots,
                          &tables, &lens, &tokens, &hidden, &intermediate, &num_heads, &num_kv_heads, &head_dim,
                          &block_size, &num_blocks, &max_blocks, &eps, &qk_eps, &final_eps, &norm_offset, &scale,
                          &softcap, &num_threads, &attention_threads, &kv_kind, &store_first))
        return NULL;
    if (kind < 0 || kind >= KINDS || !kind_available(kind)) {
        PyErr_SetString(PyExc_ValueError, "run_layers: this product kind's kernels are not built for this CPU");
        return NULL;
    }
    if (num_layers < 0 || tokens <= 0 || hidden <= 0 || intermediate <= 0 || num_heads <= 0 || num_kv_heads <= 0 ||
        head_dim <= 0 || (kind == BF16_TILES && (hidden % 32 || intermediate % 32 || (num_heads * head_dim) % 32))) {
        PyErr_SetString(PyExc_ValueError, "run_layers: sizes the product kernel cannot take");
        return NULL;
    }
    const int64_t *table = PTR(const int64_t *, layers), *token_ids = PTR(const int64_t *, ids);
    const int64_t *token_positions = PTR(const int64_t *, positions);
    for (Py_ssize_t t = 0; t < tokens; t++) /* an id or position past its table would read past it */
        if (token_ids[t] < 0 || token_ids[t] >= vocab || token_positions[t] < 0 || token_positions[t] >= table_rows) {
            PyErr_SetString(PyExc_ValueError, "run_layers: a token id or position outside its table");
            return NULL;
        }
    const Py_ssize_t q_size = num_heads * head_dim, qkv_size = (num_heads + 2 * num_kv_heads) * head_dim;
    /* the step's buffers in one block: x, h, qkv, attention output, gate|up, activation, cos, sin */
    float *xs = malloc((size_t)(tokens * (2 * hidden + qkv_size + q_size + 3 * intermediate + 2 * head_dim)) *
                       sizeof(float));
    if (!xs) return PyErr_NoMemory();
    float *hs = xs + tokens * hidden, *qkvs = hs + tokens * hidden, *attns = qkvs + tokens * qkv_size;
    float *gate_ups = attns + tokens * q_size, *acts = gate_ups + tokens * 2 * intermediate;
    float *cos = acts + tokens * intermediate, *sin = cos + tokens * head_dim;
    for (Py_ssize_t t = 0; t < tokens; t++) { /* the embedding rows and the rotary rows, as the model's lookups */
        memcpy(xs + t * hidden, PTR(const float *, embed) + token_ids[t] * hidden, (size_t)hidden * sizeof(float));
        memcpy(cos + t * head_dim, PTR(const float *, cos_table) + token_positions[t] * head_dim,
               (size_t)head_dim * sizeof(float));
        memcpy(sin + t * head_dim, PTR(const float *, sin_table) + token_positions[t] * head_dim,
               (size_t)head_dim * sizeof(float));
    }
    RopeDecodeStep step = {qkvs, cos, sin, PTR(const int64_t *, slots),
                           PTR(const int64_t *, tables), PTR(const int64_t *, lens), NULL, NULL, NULL, NULL, attns,
                           tokens, num_heads, num_kv_heads, head_dim, block_size, num_blocks, max_blocks, 0, scale,
                           softcap, attention_threads, kv_kind, store_first};
    /* scratch of the mixture-of-experts layers, for the most experts and choices any layer has */
    Py_ssize_t most_experts = 0, most_chosen = 0;
    for (Py_ssize_t l = 0; l < num_layers; l++) {
        const int64_t *f = table + l * LAYER_FIELDS;
        if (f[GATE_UP_W]) continue;
        if (!moe || f[NUM_EXPERTS] <= 0 || f[TOP_K] <= 0 || f[TOP_K] > f[NUM_EXPERTS]) {
            PyErr_SetString(PyExc_ValueError, "run_layers: a mixture-of-experts layer this build or table cannot run");
            free(xs);
            return NULL;
        }
        most_experts = f[NUM_EXPERTS] > most_experts ? f[NUM_EXPERTS] : most_experts;
        most_chosen = f[TOP_K] > most_chosen ? f[TOP_K] : most_chosen;
    }
    float *moe_logits = NULL, *moe_weights = NULL, *moe_out = NULL;
    int64_t *moe_experts = NULL;
    if (most_experts) {
        moe_logits = malloc((size_t)(tokens * (most_experts + most_chosen + hidden)) * sizeof(float));
        moe_experts = malloc((size_t)(tokens * most_chosen) * sizeof(int64_t));
        if (!moe_logits || !moe_experts) {
            free(moe_logits), free(moe_experts), free(xs);
            return PyErr_NoMemory();
        }
        moe_weights = moe_logits + tokens * most_experts, moe_out = moe_weights + tokens * most_chosen;
    }
    int status = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t l = 0; l < num_layers && status == 0; l++) {
        const int64_t *f = table + l * LAYER_FIELDS;
        norm->rms_norm(xs, PTR(const float *, f[INPUT_NORM]), hs, tokens, hidden, eps, norm_offset);
        if ((status = product(kind, few_rows_max, hs, f[QKV_W], f[QKV_B], qkvs, tokens, qkv_size, hidden, num_threads))) break;
        if (f[Q_NORM]) /* in place: the kernel reads a row's squares before it writes the row */
            for (Py_ssize_t t = 0; t < tokens; t++) {
                float *q = qkvs + t * qkv_size;
                norm->rms_norm(q, PTR(const float *, f[Q_NORM]), q, num_heads, head_dim, qk_eps, norm_offset);
                norm->rms_norm(q + q_size, PTR(const float *, f[K_NORM]), q + q_size, num_kv_heads, head_dim, qk_eps,
                               norm_offset);
            }
        step.k = PTR(void *, f[K_CACHE]), step.v = PTR(void *, f[V_CACHE]), step.window = (Py_ssize_t)f[WINDOW];
        step.k_scales = PTR(float *, f[K_SCALES]), step.v_scales = PTR(float *, f[V_SCALES]);
        if ((status = attention->rope_decode_attention(&step))) break;
        if ((status = product(kind, few_rows_max, attns, f[O_W], f[O_B], hs, tokens, hidden, q_size, num_threads))) break;
        add_into(xs, hs, tokens * hidden);
        norm->rms_norm(xs, PTR(const float *, f[POST_NORM]), hs, tokens, hidden, eps, norm_offset);
        if (!f[GATE_UP_W]) { /* mixture of experts, as SparseMoE.forward takes it */
            float scaling;
            const int32_t scaling_bits = (int32_t)f[SCALING];
            memcpy(&scaling, &scaling_bits, sizeof scaling);
            if ((status = product((int)f[ROUTER_KIND], (Py_ssize_t)f[ROUTER_SWITCH], hs, f[ROUTER_W], 0, moe_logits,
                                  tokens, (Py_ssize_t)f[NUM_EXPERTS], hidden, num_threads)) ||
                (status = moe->routed_softmax_top_k(PTR(const int64_t *, f[EXPERTS]), (int)f[EXPERT_KIND],
                                                    (Py_ssize_t)f[EXPERT_SWITCH], hs, moe_logits, moe_experts,
                                                    moe_weights, moe_out, tokens, hidden, (Py_ssize_t)f[EXPERT_WIDTH],
                                                    (Py_ssize_t)f[NUM_EXPERTS], (Py_ssize_t)f[TOP_K],
                                                    (int)f[NORMALIZE], scaling, num_threads)))
                break;
            add_into(xs, moe_out, tokens * hidden);
            continue;
        }
        if (kind == BF16_TILES && tokens > few_rows_max && !f[GATE_UP_B] && tiles->swiglu && intermediate % 32 == 0) {
            /* the MLP in one AMX call, as GatedMLP takes it (layers/bf16_linear.py: swiglu_tiles) */
            if ((status = tiles->swiglu(hs, PTR(const uint16_t *, f[GATE_UP_W]), PTR(const uint16_t *, f[DOWN_W]),
                                        PTR(const float *, f[DOWN_B]), hs, tokens, intermediate, hidden, num_threads)))
                break;
        } else {
            if ((status = product(kind, few_rows_max, hs, f[GATE_UP_W], f[GATE_UP_B], gate_ups, tokens, 2 * intermediate,
                                  hidden, num_threads)))
                break;
            activation->silu_mul(gate_ups, acts, tokens, intermediate, num_threads);
            if ((status = product(kind, few_rows_max, acts, f[DOWN_W], f[DOWN_B], hs, tokens, hidden, intermediate,
                                  num_threads)))
                break;
        }
        add_into(xs, hs, tokens * hidden);
    }
    if (status == 0) /* the model's final norm, as CausalLM.forward applies it */
        norm->rms_norm(xs, PTR(const float *, final_norm), PTR(float *, out), tokens, hidden, final_eps, norm_offset);
    Py_END_ALLOW_THREADS
    free(moe_logits), free(moe_experts), free(xs);
    if (status == -1) return PyErr_NoMemory();
    if (status) {
        PyErr_SetString(PyExc_ValueError, "run_layers: the attention kernel refused the step's sizes");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *available(PyObject *self, PyObject *args) {
    (void)self;
    int kind = BF16_TILES;
    if (!PyArg_ParseTuple(args, "|i", &kind)) return NULL;
    return PyBool_FromLong(kind >= 0 && kind < KINDS && kind_available(kind));
}

static PyObject *layer_fields(PyObject *self, PyObject *args) {
    (void)self, (void)args;
    return PyLong_FromLong(LAYER_FIELDS);
}

static PyMethodDef methods[] = {
    {"available", available, METH_VARARGS,
     "available(kind=0): True when every kernel the runner calls for products of `kind` is built for this CPU."},
    {"layer_fields", layer_fields, METH_NOARGS, "int64 values per layer in the runner's layer table."},
    {"run_layers", run_layers, METH_VARARGS, "A decode step's decoder layers in one call (see the module's source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_decode_layers_cpu", NULL, -1, methods, NULL, NULL, NULL, NULL};

/* A module that lends no kernels on this CPU leaves its pointer NULL: `available(kind)` says
 * False and the Python path runs. */
PyMODINIT_FUNC PyInit__decode_layers_cpu(void) {
    norm = kernels_import_optional("selfhost.layers._norm_cpu", "selfhost.layers._norm_cpu._kernels");
    activation = kernels_import_optional("selfhost.layers._activation_cpu", "selfhost.layers._activation_cpu._kernels");
    tiles = kernels_import_optional("selfhost.layers._bf16_tiles_cpu", "selfhost.layers._bf16_tiles_cpu._kernels");
    gemm = kernels_import_optional("selfhost.layers._gemm_cpu", "selfhost.layers._gemm_cpu._kernels");
    attention = kernels_import_optional("selfhost.engine._paged_attention_cpu", "selfhost.engine._paged_attention_cpu._kernels");
    moe = kernels_import_optional("selfhost.layers._moe_cpu", "selfhost.layers._moe_cpu._kernels");
    return PyModule_Create(&module);
}
