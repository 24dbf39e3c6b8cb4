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
 * every product of one kind: bf16 "tiles" weights or bf16 weights in rows
 * (both within their few-row kernel's range), fp32 weights on the AVX-512 product, or int8
 * weights on quant/_int8_cpu.c's products (the dots, VNNI or widened by the same row switches as
 * Int8Linear; an int8 embedding's rows dequantized as Int8Embedding does); a bias is added after
 * the product as Linear and Bf16Linear add it (the int8 products add theirs). Anything else
 * keeps the Python path.
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
    /* int8 weights' per-output scales of the qkv, o, gate|up and down products, and the router's (0: not int8) */
    QKV_S, O_S, GATE_UP_S, DOWN_S, ROUTER_S,
    /* a mixture-of-experts MLP (GATE_UP_W 0): router weight and its product's kind and switch, the
     * experts' table (layers/moe.py's ExpertKernel) with their kind, switch and width, the number
     * of experts, how many each token takes, renormalise (0/1), the routed scaling as fp32 bits */
    ROUTER_W, ROUTER_KIND, ROUTER_SWITCH, EXPERTS, EXPERT_KIND, EXPERT_SWITCH, EXPERT_WIDTH, NUM_EXPERTS, TOP_K,
    NORMALIZE, SCALING,
    /* int8 weights' AMX tiles packed at load (Int8Linear.prepare), 0 where there are none */
    QKV_P, O_P, GATE_UP_P, DOWN_P,
    LAYER_FIELDS
};

static const NormKernels *norm;
static const ActivationKernels *activation;
static const Bf16TileKernels *tiles;
static const GemmKernels *gemm;
static const AttentionKernels *attention;
static const MoeKernels *moe;
static const Int8Kernels *int8;

/* The products' kind (decode_layers.py's PRODUCT_KINDS). */
enum { BF16_TILES, FP32, BF16_ROWS, INT8, KINDS };

#define PTR(type, value) ((type)(uintptr_t)(value))

/* x += y over n values */
static void add_into(float *x, const float *y, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) x[i] += y[i];
}

/* y = x @ W^T (+ bias) through the kernel the layer's module would call for `choice` rows (for tiles: the
 * few-row kernel up to `few_rows_max` rows, the many-row product beyond, as Bf16Linear switches): M itself,
 * or in a step with verifications the number of sequences, so that each checked position gets the bits a
 * plain decode step of the same sequences gives it (every kernel's row is the same at any M); -1 without
 * memory. */
static int product(int kind, Py_ssize_t few_rows_max, Py_ssize_t vnni_from, Py_ssize_t amx_from, Py_ssize_t choice,
                   const float *x, int64_t w, int64_t packed, int64_t scales, int64_t bias, float *y, Py_ssize_t M,
                   Py_ssize_t N, Py_ssize_t K, int num_threads) {
    if (kind == INT8) { /* as Int8Linear's closure picks (quant/int8.py): widened, AMX, VNNI or the dots; the bias in the call */
        int (*linear)(const float *, const int8_t *, const float *, const float *, float *, Py_ssize_t, Py_ssize_t,
                      Py_ssize_t, int) = int8->linear;
        if (choice > few_rows_max && int8->linear_widened)
            linear = int8->linear_widened;
        else if (choice >= amx_from && int8->linear_amx)
            return int8->linear_amx(x, PTR(const int8_t *, w), PTR(const int8_t *, packed), PTR(const float *, scales),
                                    PTR(const float *, bias), y, M, N, K, num_threads);
        else if (choice >= vnni_from && int8->linear_vnni)
            linear = int8->linear_vnni;
        return linear(x, PTR(const int8_t *, w), PTR(const float *, scales), PTR(const float *, bias), y, M, N, K,
                      num_threads);
    }
    if (kind == BF16_TILES) { /* the tile kernels add the bias themselves, as Bf16Linear has them do */
        if (choice > few_rows_max)
            return tiles->linear(x, PTR(const uint16_t *, w), PTR(const float *, bias), y, M, N, K, num_threads);
        return tiles->linear_few_rows(x, PTR(const uint16_t *, w), PTR(const float *, bias), y, M, N, K, num_threads);
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
    if (kind == INT8) return int8 != NULL;
    return kind == BF16_TILES ? tiles != NULL : (kind == FP32 || kind == BF16_ROWS) ? gemm != NULL : 0;
}

/* What stays the same from one step to the next: the model's layer table and sizes (decode_layers.py
 * builds it once per model and cache with `model(...)`; a capsule holds it). */
typedef struct {
    const int64_t *table;
    Py_ssize_t num_layers, few_rows_max, vocab, table_rows, hidden, intermediate, num_heads, num_kv_heads, head_dim;
    Py_ssize_t block_size, num_blocks;
    Py_ssize_t vnni_from; /* int8 products: rows from which the VNNI kernel runs (the widened from few_rows_max + 1) */
    Py_ssize_t amx_from;  /* ... and the AMX-INT8 one */
    const float *embed, *cos_table, *sin_table, *final_norm;
    const int8_t *embed_int8; /* an int8 embedding's rows (then `embed` holds its per-row scales); NULL: fp32 rows */
    float eps, qk_eps, final_eps, norm_offset, scale, softcap;
    int kind, kv_kind;
} Model;

/* One pass over the layers: `tokens` single-token queries (ids, positions, their cache slots, each
 * query's block table row of `max_blocks` and context length); `out` gets the final norm's rows. */
typedef struct {
    const int64_t *ids, *positions, *slots, *tables, *lens;
    Py_ssize_t tokens, max_blocks;
    Py_ssize_t choice_rows; /* the rows the products' kernels are chosen for (see product) */
    float *out;
    int num_threads, attention_threads, store_first;
} Pass;

enum { PASS_OK = 0, PASS_NO_MEMORY = -1, PASS_ATTENTION_REFUSED = -2, PASS_BAD_EXPERTS = -3 };

/* The pass (no Python calls: runs with the GIL released); a PASS_ status. Ids and positions are the
 * caller's to check. */
static int forward(const Model *m, const Pass *p) {
    const Py_ssize_t tokens = p->tokens, hidden = m->hidden, intermediate = m->intermediate;
    const Py_ssize_t num_heads = m->num_heads, num_kv_heads = m->num_kv_heads, head_dim = m->head_dim;
    const int kind = m->kind, num_threads = p->num_threads;
    const Py_ssize_t few_rows_max = m->few_rows_max;
    const Py_ssize_t q_size = num_heads * head_dim, qkv_size = (num_heads + 2 * num_kv_heads) * head_dim;
    /* scratch of the mixture-of-experts layers, for the most experts and choices any layer has */
    Py_ssize_t most_experts = 0, most_chosen = 0;
    for (Py_ssize_t l = 0; l < m->num_layers; l++) {
        const int64_t *f = m->table + l * LAYER_FIELDS;
        if (f[GATE_UP_W]) continue;
        if (!moe || f[NUM_EXPERTS] <= 0 || f[TOP_K] <= 0 || f[TOP_K] > f[NUM_EXPERTS]) return PASS_BAD_EXPERTS;
        most_experts = f[NUM_EXPERTS] > most_experts ? f[NUM_EXPERTS] : most_experts;
        most_chosen = f[TOP_K] > most_chosen ? f[TOP_K] : most_chosen;
    }
    /* the pass's buffers in one block: x, h, qkv, attention output, gate|up, activation, cos, sin, then the
     * experts' logits, weights, output and choices */
    const size_t floats = (size_t)(tokens * (2 * hidden + qkv_size + q_size + 3 * intermediate + 2 * head_dim +
                                             most_experts + most_chosen + hidden));
    float *xs = malloc(floats * sizeof(float) + (size_t)(tokens * most_chosen) * sizeof(int64_t));
    if (!xs) return PASS_NO_MEMORY;
    float *hs = xs + tokens * hidden, *qkvs = hs + tokens * hidden, *attns = qkvs + tokens * qkv_size;
    float *gate_ups = attns + tokens * q_size, *acts = gate_ups + tokens * 2 * intermediate;
    float *cos = acts + tokens * intermediate, *sin = cos + tokens * head_dim;
    float *moe_logits = sin + tokens * head_dim, *moe_weights = moe_logits + tokens * most_experts;
    float *moe_out = moe_weights + tokens * most_chosen;
    int64_t *moe_experts = (int64_t *)(xs + floats);
    for (Py_ssize_t t = 0; t < tokens; t++) { /* the embedding rows and the rotary rows, as the model's lookups */
        if (m->embed_int8) { /* Int8Embedding: each integer times its row's scale, one fp32 product as torch's */
            const int8_t *q = m->embed_int8 + p->ids[t] * hidden;
            const float scale = m->embed[p->ids[t]];
            for (Py_ssize_t d = 0; d < hidden; d++) xs[t * hidden + d] = (float)q[d] * scale;
        } else
            memcpy(xs + t * hidden, m->embed + p->ids[t] * hidden, (size_t)hidden * sizeof(float));
        memcpy(cos + t * head_dim, m->cos_table + p->positions[t] * head_dim, (size_t)head_dim * sizeof(float));
        memcpy(sin + t * head_dim, m->sin_table + p->positions[t] * head_dim, (size_t)head_dim * sizeof(float));
    }
    RopeDecodeStep step = {qkvs, cos, sin, p->slots, p->tables, p->lens, NULL, NULL, NULL, NULL, attns,
                           tokens, num_heads, num_kv_heads, head_dim, m->block_size, m->num_blocks, p->max_blocks, 0,
                           m->scale, m->softcap, p->attention_threads, m->kv_kind, p->store_first};
    int status = PASS_OK;
    for (Py_ssize_t l = 0; l < m->num_layers && status == PASS_OK; l++) {
        const int64_t *f = m->table + l * LAYER_FIELDS;
        norm->rms_norm(xs, PTR(const float *, f[INPUT_NORM]), hs, tokens, hidden, m->eps, m->norm_offset);
        if ((status = product(kind, few_rows_max, m->vnni_from, m->amx_from, p->choice_rows, hs, f[QKV_W], f[QKV_P], f[QKV_S], f[QKV_B], qkvs, tokens, qkv_size, hidden, num_threads))) break;
        if (f[Q_NORM]) /* in place: the kernel reads a row's squares before it writes the row */
            for (Py_ssize_t t = 0; t < tokens; t++) {
                float *q = qkvs + t * qkv_size;
                norm->rms_norm(q, PTR(const float *, f[Q_NORM]), q, num_heads, head_dim, m->qk_eps, m->norm_offset);
                norm->rms_norm(q + q_size, PTR(const float *, f[K_NORM]), q + q_size, num_kv_heads, head_dim,
                               m->qk_eps, m->norm_offset);
            }
        step.k = PTR(void *, f[K_CACHE]), step.v = PTR(void *, f[V_CACHE]), step.window = (Py_ssize_t)f[WINDOW];
        step.k_scales = PTR(float *, f[K_SCALES]), step.v_scales = PTR(float *, f[V_SCALES]);
        if (attention->rope_decode_attention(&step)) {
            status = PASS_ATTENTION_REFUSED;
            break;
        }
        if ((status = product(kind, few_rows_max, m->vnni_from, m->amx_from, p->choice_rows, attns, f[O_W], f[O_P], f[O_S], f[O_B], hs, tokens, hidden, q_size, num_threads))) break;
        add_into(xs, hs, tokens * hidden);
        norm->rms_norm(xs, PTR(const float *, f[POST_NORM]), hs, tokens, hidden, m->eps, m->norm_offset);
        if (!f[GATE_UP_W]) { /* mixture of experts, as SparseMoE.forward takes it */
            float scaling;
            const int32_t scaling_bits = (int32_t)f[SCALING];
            memcpy(&scaling, &scaling_bits, sizeof scaling);
            if ((status = product((int)f[ROUTER_KIND], (Py_ssize_t)f[ROUTER_SWITCH], m->vnni_from, m->amx_from, p->choice_rows, hs, f[ROUTER_W], 0, f[ROUTER_S], 0,
                                  moe_logits,
                                  tokens, (Py_ssize_t)f[NUM_EXPERTS], hidden, num_threads)))
                break;
            if (moe->routed_softmax_top_k(PTR(const int64_t *, f[EXPERTS]), (int)f[EXPERT_KIND],
                                          (Py_ssize_t)f[EXPERT_SWITCH], hs, moe_logits, moe_experts, moe_weights,
                                          moe_out, tokens, hidden, (Py_ssize_t)f[EXPERT_WIDTH],
                                          (Py_ssize_t)f[NUM_EXPERTS], (Py_ssize_t)f[TOP_K], (int)f[NORMALIZE],
                                          scaling, num_threads)) {
                status = PASS_NO_MEMORY;
                break;
            }
            add_into(xs, moe_out, tokens * hidden);
            continue;
        }
        if (kind == BF16_TILES && p->choice_rows > few_rows_max && !f[GATE_UP_B] && tiles->swiglu && intermediate % 32 == 0 &&
            hidden % 32 == 0) {
            /* the MLP in one AMX call, as GatedMLP takes it (layers/bf16_linear.py: swiglu_tiles) */
            if ((status = tiles->swiglu(hs, PTR(const uint16_t *, f[GATE_UP_W]), NULL, PTR(const uint16_t *, f[DOWN_W]),
                                        PTR(const float *, f[DOWN_B]), hs, tokens, intermediate, hidden, num_threads)))
                break;
        } else if (kind == INT8 && p->choice_rows >= m->amx_from && p->choice_rows <= few_rows_max && f[GATE_UP_P] &&
                   f[DOWN_P] && !f[GATE_UP_B] && int8->swiglu_amx && intermediate % 32 == 0 && hidden % 32 == 0) {
            /* the MLP in one call on AMX-INT8 tiles, as GatedMLP takes it (quant/int8.py: swiglu_int8) */
            if ((status = int8->swiglu_amx(hs, PTR(const int8_t *, f[GATE_UP_P]), PTR(const float *, f[GATE_UP_S]),
                                           PTR(const int8_t *, f[DOWN_W]), PTR(const int8_t *, f[DOWN_P]),
                                           PTR(const float *, f[DOWN_S]), PTR(const float *, f[DOWN_B]), hs, tokens,
                                           intermediate, hidden, num_threads)))
                break;
        } else {
            if ((status = product(kind, few_rows_max, m->vnni_from, m->amx_from, p->choice_rows, hs, f[GATE_UP_W], f[GATE_UP_P], f[GATE_UP_S], f[GATE_UP_B], gate_ups, tokens, 2 * intermediate,
                                  hidden, num_threads)))
                break;
            activation->silu_mul(gate_ups, acts, tokens, intermediate, num_threads);
            if ((status = product(kind, few_rows_max, m->vnni_from, m->amx_from, p->choice_rows, acts, f[DOWN_W], f[DOWN_P], f[DOWN_S], f[DOWN_B], hs, tokens, hidden, intermediate,
                                  num_threads)))
                break;
        }
        add_into(xs, hs, tokens * hidden);
    }
    if (status == PASS_OK) /* the model's final norm, as CausalLM.forward applies it */
        norm->rms_norm(xs, m->final_norm, p->out, tokens, hidden, m->final_eps, m->norm_offset);
    free(xs);
    return status;
}

/* Sets the Python error of a failed pass; NULL. */
static PyObject *pass_error(int status) {
    if (status == PASS_NO_MEMORY) return PyErr_NoMemory();
    PyErr_SetString(PyExc_ValueError, status == PASS_BAD_EXPERTS
                                          ? "run_layers: a mixture-of-experts layer this build or table cannot run"
                                          : "run_layers: the attention kernel refused the step's sizes");
    return NULL;
}

static void free_model(PyObject *capsule) { free(PyCapsule_GetPointer(capsule, "selfhost.decode_layers.model")); }

static PyObject *model(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long layers, embed, embed_int8, cos_table, sin_table, final_norm;
    Model m;
    if (!PyArg_ParseTuple(args, "KninnnKKnKKnKnnnnnnnffffffi", &layers, &m.num_layers, &m.kind, &m.few_rows_max,
                          &m.vnni_from, &m.amx_from, &embed, &embed_int8, &m.vocab, &cos_table, &sin_table, &m.table_rows,
                          &final_norm, &m.hidden, &m.intermediate, &m.num_heads, &m.num_kv_heads, &m.head_dim,
                          &m.block_size, &m.num_blocks, &m.eps, &m.qk_eps, &m.final_eps, &m.norm_offset, &m.scale,
                          &m.softcap, &m.kv_kind))
        return NULL;
    if (m.kind < 0 || m.kind >= KINDS || !kind_available(m.kind)) {
        PyErr_SetString(PyExc_ValueError, "run_layers: this product kind's kernels are not built for this CPU");
        return NULL;
    }
    if (m.num_layers < 0 || m.hidden <= 0 || m.intermediate <= 0 || m.num_heads <= 0 || m.num_kv_heads <= 0 ||
        m.head_dim <= 0 || m.vocab <= 0 || m.table_rows <= 0 || m.block_size <= 0) {
        PyErr_SetString(PyExc_ValueError, "run_layers: sizes the product kernel cannot take");
        return NULL;
    }
    m.table = PTR(const int64_t *, layers), m.embed = PTR(const float *, embed);
    m.embed_int8 = PTR(const int8_t *, embed_int8);
    m.cos_table = PTR(const float *, cos_table), m.sin_table = PTR(const float *, sin_table);
    m.final_norm = PTR(const float *, final_norm);
    Model *kept = malloc(sizeof m);
    if (!kept) return PyErr_NoMemory();
    *kept = m;
    PyObject *capsule = PyCapsule_New(kept, "selfhost.decode_layers.model", free_model);
    if (!capsule) free(kept);
    return capsule;
}

static const Model *model_of(PyObject *capsule) {
    return PyCapsule_GetPointer(capsule, "selfhost.decode_layers.model");
}

/* Whether every id is a row of the embedding and every position one of the rotary table (one past
 * either would read past it); sets the error if not. */
static int ids_and_positions_valid(const Model *m, const int64_t *ids, const int64_t *positions, Py_ssize_t n) {
    for (Py_ssize_t t = 0; t < n; t++)
        if (ids[t] < 0 || ids[t] >= m->vocab || positions[t] < 0 || positions[t] >= m->table_rows) {
            PyErr_SetString(PyExc_ValueError, "run_layers: a token id or position outside its table");
            return 0;
        }
    return 1;
}

static PyObject *run_layers(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *capsule;
    unsigned long long ids, positions, out, slots, tables, lens;
    Pass p;
    if (!PyArg_ParseTuple(args, "OKKKKKKnnniip", &capsule, &ids, &positions, &out, &slots, &tables, &lens, &p.tokens,
                          &p.choice_rows, &p.max_blocks, &p.num_threads, &p.attention_threads, &p.store_first))
        return NULL;
    const Model *m = model_of(capsule);
    if (!m) return NULL;
    if (p.tokens <= 0 || p.choice_rows <= 0 || p.choice_rows > p.tokens) {
        PyErr_SetString(PyExc_ValueError, "run_layers: a step of no tokens, or kernel rows outside 1..tokens");
        return NULL;
    }
    p.ids = PTR(const int64_t *, ids), p.positions = PTR(const int64_t *, positions);
    p.slots = PTR(const int64_t *, slots), p.tables = PTR(const int64_t *, tables), p.lens = PTR(const int64_t *, lens);
    p.out = PTR(float *, out);
    if (!ids_and_positions_valid(m, p.ids, p.positions, p.tokens)) return NULL;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = forward(m, &p);
    Py_END_ALLOW_THREADS
    return status ? pass_error(status) : (Py_INCREF(Py_None), Py_None);
}

/* The first largest of n values (a proposal: any tie-break would do, this one is numpy's). */
static int64_t first_argmax(const float *row, Py_ssize_t n) {
    Py_ssize_t best = 0;
    for (Py_ssize_t i = 1; i < n; i++)
        if (row[i] > row[best]) best = i;
    return best;
}

/* A draft model's greedy proposals for n sequences in one call (speculative/draft.py): each pass's rows
 * through the layers, the head, the argmax, and the argmax fed to the next pass.
 *
 * `buffer` (int64, written by the caller; see DraftPasses in decode_layers.py): per sequence its length
 * (where its first proposal goes), how many proposals it wants (largest first: pass j's rows are the
 * first ones), and the first position it has no KV for; then its block table rows (n x width); then the
 * proposals (n x passes, written here; column 0 given where rows0 is 0); then the ids of the positions
 * the first pass catches up on, sequence after sequence (rows0 of them). Pass 0 runs those as single
 * queries, every key stored before any query attends (store_first), and each sequence's last row
 * proposes; pass j > 0 feeds proposal j at the sequence's length + j - 1. */
static PyObject *greedy_passes(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *capsule;
    unsigned long long head_w, head_b, buffer;
    Py_ssize_t head_switch, head_rows, n, passes, width, rows0;
    int head_kind, num_threads, attention_threads;
    if (!PyArg_ParseTuple(args, "OKKinnKnnnnii", &capsule, &head_w, &head_b, &head_kind, &head_switch, &head_rows,
                          &buffer, &n, &passes, &width, &rows0, &num_threads, &attention_threads))
        return NULL;
    const Model *m = model_of(capsule);
    if (!m) return NULL;
    if (head_kind < 0 || head_kind >= KINDS || !kind_available(head_kind) || head_rows <= 0 || head_rows > m->vocab ||
        n <= 0 || passes <= 0 || width <= 0 || rows0 < 0) {
        PyErr_SetString(PyExc_ValueError, "greedy_passes: a head or sizes the kernels cannot take");
        return NULL;
    }
    int64_t *fields = PTR(int64_t *, buffer);
    const int64_t *length = fields, *wanted = fields + n, *from = fields + 2 * n, *table = fields + 3 * n;
    int64_t *tokens = fields + 3 * n + n * width;
    const int64_t *catch_up = tokens + n * passes;
    const Py_ssize_t bs = m->block_size;
    Py_ssize_t rows = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const int64_t first = rows0 ? from[i] : length[i] - 1; /* the first position a pass writes */
        const int64_t last = length[i] + wanted[i] - 2;         /* ... and the last: the last fed proposal's */
        rows += rows0 ? length[i] - from[i] : 0;
        if (wanted[i] < 1 || wanted[0] != passes || (i && wanted[i] > wanted[i - 1]) || first < 0 ||
            first > length[i] - 1 || last >= m->table_rows || last >= width * bs ||
            (!rows0 && (tokens[i * passes] < 0 || tokens[i * passes] >= m->vocab))) {
            PyErr_SetString(PyExc_ValueError, "greedy_passes: proposal lengths, positions or rows out of range");
            return NULL;
        }
        for (int64_t b = first / bs; b <= last / bs; b++)
            if (table[i * width + b] < 0 || table[i * width + b] >= m->num_blocks) {
                PyErr_SetString(PyExc_ValueError, "greedy_passes: a block table names no block of the cache");
                return NULL;
            }
    }
    if (rows != rows0) {
        PyErr_SetString(PyExc_ValueError, "greedy_passes: the catch-up rows do not add up");
        return NULL;
    }
    for (Py_ssize_t r = 0; r < rows0; r++)
        if (catch_up[r] < 0 || catch_up[r] >= m->vocab) {
            PyErr_SetString(PyExc_ValueError, "greedy_passes: a token id outside the embedding");
            return NULL;
        }
    const Py_ssize_t hidden = m->hidden, most = rows0 > n ? rows0 : n;
    /* final norm rows, the rows the head reads, logits; then a pass's positions, slots, lengths, the rows of the
     * sequence each row's table is (pass 0), their tables, and each sequence's last row */
    float *states = malloc((size_t)(most * hidden + n * hidden + n * head_rows) * sizeof(float) +
                           (size_t)(3 * most + most * width + n) * sizeof(int64_t));
    if (!states) return PyErr_NoMemory();
    float *heads = states + most * hidden, *logits = heads + n * hidden;
    int64_t *positions = (int64_t *)(logits + n * head_rows), *slots = positions + most, *lens = slots + most;
    int64_t *tables = lens + most, *last_row = tables + most * width;
    int status = PASS_OK;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t pass = rows0 ? 0 : 1; pass < passes && status == PASS_OK; pass++) {
        Py_ssize_t active = 0; /* sequences that want this pass's proposal */
        while (active < n && wanted[active] > pass) active++;
        const float *head_in = states;
        if (pass == 0) { /* catching up: each sequence's own tokens as single queries, its last row proposes */
            Py_ssize_t r = 0;
            for (Py_ssize_t i = 0; i < n; i++) {
                for (int64_t position = from[i]; position < length[i]; position++, r++) {
                    positions[r] = position, lens[r] = position + 1;
                    slots[r] = table[i * width + position / bs] * bs + position % bs;
                    memcpy(tables + r * width, table + i * width, (size_t)width * sizeof(int64_t));
                }
                last_row[i] = r - 1;
            }
            Pass first = {catch_up, positions, slots, tables, lens, rows0, width, rows0, states, num_threads,
                          attention_threads, rows0 > n};
            if ((status = forward(m, &first))) break;
            for (Py_ssize_t i = 0; i < active; i++)
                memcpy(heads + i * hidden, states + last_row[i] * hidden, (size_t)hidden * sizeof(float));
            head_in = heads;
        } else { /* the token the pass before proposed, one position on */
            int64_t *ids = last_row; /* free after pass 0 */
            for (Py_ssize_t i = 0; i < active; i++) {
                const int64_t position = length[i] + pass - 1;
                ids[i] = tokens[i * passes + pass - 1], positions[i] = position, lens[i] = position + 1;
                slots[i] = table[i * width + position / bs] * bs + position % bs;
            }
            Pass next = {ids, positions, slots, table, lens, active, width, active, states, num_threads, attention_threads, 0};
            if ((status = forward(m, &next))) break;
        }
        if ((status = product(head_kind, head_switch, m->vnni_from, m->amx_from, active, head_in, head_w, 0, 0, head_b, logits, active, head_rows, hidden,
                              num_threads)))
            break;
        for (Py_ssize_t i = 0; i < active; i++) tokens[i * passes + pass] = first_argmax(logits + i * head_rows, head_rows);
    }
    Py_END_ALLOW_THREADS
    free(states);
    return status ? pass_error(status) : (Py_INCREF(Py_None), Py_None);
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
    {"model", model, METH_VARARGS, "The model's layer table and sizes, kept for its steps (a capsule)."},
    {"run_layers", run_layers, METH_VARARGS, "A decode step's decoder layers in one call (see the module's source)."},
    {"greedy_passes", greedy_passes, METH_VARARGS, "A draft model's greedy proposals in one call (see the source)."},
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
    int8 = kernels_import_optional("selfhost.quant._int8_cpu", "selfhost.quant._int8_cpu._kernels");
    return PyModule_Create(&module);
}
