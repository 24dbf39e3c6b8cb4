/* Causal attention of prompt chunks over the paged KV cache, on CPU, fp32, bf16 or int8 cache, AVX-512.
 *
 * Built at install time as an optional extension (setup.py); paged_cache.py uses it
 * for the multi-token chunks of a step (prompts) where the CPU has AVX-512, and
 * torch's scaled_dot_product_attention elsewhere.
 *
 * Why our own: torch's CPU attention reached ~90 GFLOP/s on a 512-token prompt here,
 * and a chunk that continues a cached prefix first had every key and value gathered
 * into a copy, once per layer. This kernel reads keys and values where they lie in
 * the cache blocks and skips every block above the causal diagonal or outside the
 * sliding window.
 *
 * The scheme is the usual online-softmax ("flash") attention. A work unit is one kv
 * head and QUERY_BLOCK consecutive positions of one chunk: its rows are those
 * positions' queries for every head of the group, so the keys and values it loads
 * serve G heads at once. For each block of KEY_BLOCK keys:
 *   - the keys are copied into a (head_dim x KEY_BLOCK) panel: the cache keeps
 *     keys dims-major inside each block, so a 16-key run of one block is one
 *     vector per dimension (runs that straddle blocks are gathered);
 *   - ROWS query rows at a time, the scores come from a register-blocked product
 *     (ROWS x KEY_BLOCK accumulators, one broadcast query element per head_dim step);
 *   - each row's running max, sum and output are rescaled and the block's
 *     probabilities times the values are added to the output (kept in a buffer).
 *
 * Layouts (all fp32 unless said):
 *   q, out            (T, H, D) rows of the step, q with row stride q_stride floats
 *   k                 (Hkv, NB, D, BS) one layer of the cache, keys dims-major in a block
 *   v                 (Hkv, NB, BS, D) values as rows; this step's keys and values written
 *                     (k and v fp32, or bf16 (kv_kind 1): widened exactly as they are read, or
 *                     int8 (kv_kind 2) with k_scales and v_scales (Hkv, NB, BS): the integers
 *                     go into the products, a key's scale multiplies its scores and a value's
 *                     its probabilities; int8 keys are in pairs of dimensions inside a block,
 *                     (Hkv, NB, D/2, BS, 2), as the decode kernel's VNNI products read them)
 *   tables            (C, MB) int64, the block table of each chunk
 *   first, count, start (C,) int64: the chunk's first row in the step, its number of
 *                     tokens, the position of its first token
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__STDC_NO_ATOMICS__)
#define SELFHOST_PREFILL 1
#include <immintrin.h>

#include "../_cpu_pool.h"
#include "../_exp_avx512.h"
#include "_weighted_rows_avx512.h"
#include "../_amx_tiles.h"
#include "../_transpose_avx512.h"
#endif

#ifdef SELFHOST_PREFILL

#define AVX512 __attribute__((target("avx512f")))
#define QUERY_BLOCK 32 /* query positions per unit of work */
#define TILE_QUERY_BLOCK 64 /* the same on AMX tiles (_prefill_tiles_amx.h) */
#define MAX_QUERY_BLOCK TILE_QUERY_BLOCK
#define KEY_BLOCK 64   /* keys per step of the online softmax: four zmm of scores per row */
#define TILE_KEY_BLOCK 64 /* the same on AMX tiles: a block's keys and values, 16 KB, stay in L1 with the rest (128: 30% slower) */
#define ROWS 6         /* query rows per score product: 6 x 4 accumulators */
#define MAX_GROUP 16   /* query heads per kv head this kernel takes (GQA groups are 1-16) */
#define MAX_ROWS (MAX_QUERY_BLOCK * MAX_GROUP)

typedef struct {
    const float *q;
    const void *k, *v; /* fp32, bf16 or int8 (kv_kind) */
    float *out;
    const int64_t *tables, *first, *count, *start;
    const int64_t *unit_chunk, *unit_position; /* per unit: its chunk and first query index in it */
    Py_ssize_t q_stride, num_heads, num_kv_heads, head_dim, block_size, num_blocks, max_blocks, window;
    float scale;
    _Atomic int *failed; /* set when a thread's scratch memory could not be had */
    int kv_kind; /* KV_FP32, KV_BF16 or KV_INT8 (_weighted_rows_avx512.h) */
    int tiles; /* AMX products (bf16 or int8 cache) */
    const float *k_scales, *v_scales; /* int8: the layer's (Hkv, NB, BS) scales */
    Py_ssize_t query_block; /* query positions per unit: QUERY_BLOCK, or TILE_QUERY_BLOCK with tiles */
    /* tiles (_prefill_tiles_amx.h): the keys and values its group of chunks rearranged, the group's
     * first chunk, and the index of its first unit */
    const struct Rearranged *rearranged;
    Py_ssize_t group_chunk0;
    long unit_offset;
} Job;


/* The row of position `pos` in a cache of rows (values; fp32 or bf16), or, in an int8 cache of
 * values in pairs of keys, the start of the pair's rows for an even `pos`. */
static const void *cached_row(const Job *job, const void *cache, const int64_t *table, Py_ssize_t head,
                              Py_ssize_t pos) {
    Py_ssize_t row = (head * job->num_blocks + table[pos / job->block_size]) * job->block_size + pos % job->block_size;
    return (const char *)cache + row * job->head_dim * kv_bytes(job->kv_kind);
}

/* scores[r][0:64] = q_r . key_j for `rows` query rows against the transposed key panel. */
AVX512 static inline __attribute__((always_inline)) void score_rows(const int rows, const float *const *q,
                                                                    const float *panel, Py_ssize_t dim,
                                                                    float *scores) {
    __m512 acc[ROWS][4];
    for (int r = 0; r < rows; r++) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = _mm512_setzero_ps();
    for (Py_ssize_t d = 0; d < dim; d++) {
        const float *keys = panel + d * KEY_BLOCK;
        __m512 k0 = _mm512_load_ps(keys), k1 = _mm512_load_ps(keys + 16), k2 = _mm512_load_ps(keys + 32),
               k3 = _mm512_load_ps(keys + 48);
        for (int r = 0; r < rows; r++) {
            __m512 x = _mm512_set1_ps(q[r][d]);
            acc[r][0] = _mm512_fmadd_ps(x, k0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(x, k1, acc[r][1]);
            acc[r][2] = _mm512_fmadd_ps(x, k2, acc[r][2]);
            acc[r][3] = _mm512_fmadd_ps(x, k3, acc[r][3]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < 4; c++) _mm512_store_ps(scores + r * KEY_BLOCK + c * 16, acc[r][c]);
}

#define SCORE_CASE(n) \
    case n: score_rows(n, q, panel, dim, scores); break;

AVX512 static void score_block(int rows, const float *const *q, const float *panel, Py_ssize_t dim, float *scores) {
    switch (rows) { SCORE_CASE(1) SCORE_CASE(2) SCORE_CASE(3) SCORE_CASE(4) SCORE_CASE(5) SCORE_CASE(6) }
}

/* 16 keys of an int8 cache's block, in pairs of dimensions (row p: dims 2p and 2p + 1 of each
 * key, 2 * bs bytes apart), into the panel's dims-major columns as the integers they hold. */
__attribute__((target("avx512f,avx512bw"))) static void int8_pairs_to_panel(const int8_t *pairs, Py_ssize_t bs,
                                                                         Py_ssize_t dim, float *column) {
    for (Py_ssize_t d = 0; d < dim; d += 2) {
        __m512i x = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(pairs + d / 2 * 2 * bs)));
        __m512i even = _mm512_srai_epi32(_mm512_slli_epi32(x, 16), 16), odd = _mm512_srai_epi32(x, 16);
        _mm512_store_ps(column + d * KEY_BLOCK, _mm512_cvtepi32_ps(even));
        _mm512_store_ps(column + (d + 1) * KEY_BLOCK, _mm512_cvtepi32_ps(odd));
    }
}

/* Values of keys [0, width) of an int8 cache's block (s->values[j]: key j's pair of rows, values in
 * pairs of keys: dim d of the pair's two keys side by side) into fp32 rows of `panel`, dim apart, as
 * the integers they hold. An odd width also fills the row after it (the pair's other key). */
__attribute__((target("avx512f,avx512bw"))) static void int8_value_panel(const void *const *pairs, Py_ssize_t width,
                                                                      Py_ssize_t dim, float *panel) {
    for (Py_ssize_t j = 0; j < width; j += 2) {
        const int8_t *pair = pairs[j];
        float *even_row = panel + j * dim, *odd_row = even_row + dim;
        for (Py_ssize_t d = 0; d < dim; d += 16) {
            __m512i x = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(pair + 2 * d)));
            _mm512_store_ps(even_row + d, _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(x, 16), 16)));
            _mm512_store_ps(odd_row + d, _mm512_cvtepi32_ps(_mm512_srai_epi32(x, 16)));
        }
    }
}

/* Element of dimension d of the key whose pairs start at `at` in an int8 block. */
static inline Py_ssize_t int8_key_element(Py_ssize_t at, Py_ssize_t d, Py_ssize_t bs) {
    return at + d / 2 * 2 * bs + (d & 1);
}

/* Per-unit scratch, one per thread. */
typedef struct {
    float panel[1024 * KEY_BLOCK] __attribute__((aligned(64))); /* head_dim <= 1024 */
    float scores[QUERY_BLOCK * MAX_GROUP * KEY_BLOCK] __attribute__((aligned(64)));
    float row_max[MAX_ROWS], row_sum[MAX_ROWS], rescale[MAX_ROWS];
    const float *q_rows[MAX_ROWS];
    float *out_rows[MAX_ROWS];
    Py_ssize_t row_pos[MAX_ROWS];
    const void *values[KEY_BLOCK]; /* int8: each key's pair of rows (values in pairs of keys) */
    float value_panel[KEY_BLOCK * 1024] __attribute__((aligned(64))); /* int8, AVX-512: the block's values */
    float key_scales[KEY_BLOCK] __attribute__((aligned(64)));   /* int8: scale x each key's scale */
    float value_scales[KEY_BLOCK] __attribute__((aligned(64))); /* int8: each value's scale */
} Scratch;

static _Thread_local Scratch *scratch;

/* An int8 cache: the scales of keys [k0, k0 + width) into the scratch (key scales times the
 * softmax scale), zeros up to `block`. */
static void block_scales(const Job *job, Scratch *s, const int64_t *table, Py_ssize_t head, Py_ssize_t k0,
                         Py_ssize_t width, int block) {
    const Py_ssize_t bs = job->block_size, head_first = head * job->num_blocks * bs;
    for (Py_ssize_t j = 0; j < width; j++) {
        const Py_ssize_t pos = k0 + j, at = head_first + table[pos / bs] * bs + pos % bs;
        s->key_scales[j] = job->scale * job->k_scales[at];
        s->value_scales[j] = job->v_scales[at];
    }
    for (Py_ssize_t j = width; j < block; j++) s->key_scales[j] = s->value_scales[j] = 0.0f;
}

/* rows x width probabilities times their values' scales (an int8 cache), rows `block` apart. */
AVX512 static void scale_probabilities(Scratch *s, Py_ssize_t rows, Py_ssize_t width, int block) {
    for (Py_ssize_t r = 0; r < rows; r++)
        for (Py_ssize_t j = 0; j < width; j += 16) {
            float *p = s->scores + r * block + j;
            _mm512_store_ps(p, _mm512_mul_ps(_mm512_load_ps(p), _mm512_load_ps(s->value_scales + j)));
        }
}

/* Scores of keys [k0, k0 + KEY_BLOCK) -> probabilities in place (0 where a row may not look),
 * each row's running max and sum updated and its output's rescale factor set. Rows are
 * KEY_BLOCK floats apart. A row's scores stay in registers between its two passes; a block
 * the row sees whole needs no mask. With an int8 cache (`per_key`) each key's scores take its
 * scale from s->key_scales. */
AVX512 static inline __attribute__((always_inline)) void softmax_block(const Job *job, Scratch *s, Py_ssize_t rows,
                                                                     Py_ssize_t k0, const int per_key) {
    const int block = KEY_BLOCK;
    const __m512 lane = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512 scale = _mm512_set1_ps(job->scale);
    for (Py_ssize_t r = 0; r < rows; r++) {
        const Py_ssize_t pos = s->row_pos[r];
        const Py_ssize_t first_key = job->window > 0 && pos + 1 > job->window ? pos + 1 - job->window : 0;
        float *row = s->scores + r * block;
        __m512 x[KEY_BLOCK / 16];
        __mmask16 keep[KEY_BLOCK / 16];
        __m512 peak = _mm512_set1_ps(-INFINITY);
        if (first_key <= k0 && k0 + block - 1 <= pos) {
            for (int c = 0; c < block / 16; c++) {
                keep[c] = 0xffff;
                x[c] = _mm512_mul_ps(_mm512_load_ps(row + c * 16), per_key ? _mm512_load_ps(s->key_scales + c * 16) : scale);
                peak = _mm512_max_ps(peak, x[c]);
            }
        } else { /* keys k0 + c in [first_key, pos] count; others get probability 0 */
            const __m512 key_lo = _mm512_set1_ps((float)(first_key - k0)), key_hi = _mm512_set1_ps((float)(pos - k0));
            for (int c = 0; c < block / 16; c++) {
                __m512 index = _mm512_add_ps(lane, _mm512_set1_ps((float)(c * 16)));
                keep[c] = _mm512_cmp_ps_mask(index, key_lo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(index, key_hi, _CMP_LE_OQ);
                x[c] = _mm512_mul_ps(_mm512_load_ps(row + c * 16), per_key ? _mm512_load_ps(s->key_scales + c * 16) : scale);
                peak = _mm512_mask_max_ps(peak, keep[c], peak, x[c]);
            }
        }
        float block_max = _mm512_reduce_max_ps(peak);
        if (block_max == -INFINITY) { /* nothing visible to this row here */
            memset(row, 0, sizeof(float) * (size_t)block);
            s->rescale[r] = 1.0f;
            continue;
        }
        float new_max = block_max > s->row_max[r] ? block_max : s->row_max[r];
        float rescale = s->row_max[r] == -INFINITY ? 0.0f : new_max == s->row_max[r] ? 1.0f : expf(s->row_max[r] - new_max);
        __m512 shift = _mm512_set1_ps(new_max), total = _mm512_setzero_ps();
        for (int c = 0; c < block / 16; c++) {
            __m512 shifted = _mm512_sub_ps(x[c], shift);
            __m512 p = _mm512_maskz_mov_ps(keep[c], exp_nonpositive_avx512(shifted));
            _mm512_store_ps(row + c * 16, p);
            total = _mm512_add_ps(total, p);
        }
        s->row_sum[r] = s->row_sum[r] * rescale + _mm512_reduce_add_ps(total);
        s->row_max[r] = new_max;
        s->rescale[r] = rescale;
    }
}

/* What a unit covers: one kv head, n query positions of one chunk (rows = n x group
 * query rows), keys [lo, hi) visible to some of them. */
typedef struct {
    Py_ssize_t head, rows, lo, hi;
    const int64_t *table;
} Unit;

/* The unit's rows in the scratch (row r = g * n + i: head g of the group, position i),
 * each with its running max and sum reset. Returns NULL when scratch memory cannot be had. */
static Scratch *begin_unit(const Job *job, long unit, Unit *u) {
    if (scratch == NULL && posix_memalign((void **)&scratch, 64, sizeof(Scratch)) != 0) {
        scratch = NULL;
        atomic_store(job->failed, 1);
        return NULL;
    }
    Scratch *s = scratch;
    const Py_ssize_t dim = job->head_dim, group = job->num_heads / job->num_kv_heads;
    const Py_ssize_t head = unit % job->num_kv_heads, unit_in_heads = unit / job->num_kv_heads;
    const Py_ssize_t chunk = job->unit_chunk[unit_in_heads], i0 = job->unit_position[unit_in_heads];
    const Py_ssize_t n = job->count[chunk] - i0 < job->query_block ? job->count[chunk] - i0 : job->query_block;
    const Py_ssize_t pos0 = job->start[chunk] + i0;  /* position of the unit's first query */
    const Py_ssize_t row0 = job->first[chunk] + i0;  /* its row in the step */
    for (Py_ssize_t i = 0; i < n; i++)
        for (Py_ssize_t g = 0; g < group; g++) {
            Py_ssize_t r = g * n + i;
            s->q_rows[r] = job->q + (row0 + i) * job->q_stride + (head * group + g) * dim;
            s->out_rows[r] = job->out + ((row0 + i) * job->num_heads + head * group + g) * dim;
            s->row_pos[r] = pos0 + i;
            s->row_max[r] = -INFINITY, s->row_sum[r] = 0.0f;
        }
    u->head = head, u->rows = n * group;
    u->table = job->tables + chunk * job->max_blocks;
    u->lo = job->window > 0 && pos0 + 1 > job->window ? pos0 + 1 - job->window : 0;
    u->hi = pos0 + n;
    return s;
}

AVX512 static void run_unit(const void *whole, long unit) {
    const Job *job = (const Job *)whole;
    Unit u;
    Scratch *s = begin_unit(job, unit, &u);
    if (s == NULL) return;
    const Py_ssize_t dim = job->head_dim, rows = u.rows, head = u.head, lo = u.lo, hi = u.hi;
    const int64_t *table = u.table;
    for (Py_ssize_t r = 0; r < rows; r++) memset(s->out_rows[r], 0, sizeof(float) * (size_t)dim);
    const Py_ssize_t bs = job->block_size;
    /* Blocks start on a multiple of 16 keys (the mask drops those before lo) so that
     * whole 16-key runs of a cache block load as vectors. */
    for (Py_ssize_t k0 = lo - lo % 16; k0 < hi; k0 += KEY_BLOCK) {
        Py_ssize_t width = hi - k0 < KEY_BLOCK ? hi - k0 : KEY_BLOCK;
        /* The panel holds the block's keys dims-major, as the cache stores them inside
         * each of its blocks: 16 keys of one cache block are one vector load per
         * dimension; 16 keys spanning blocks (or past the end, which repeat the first
         * key: finite numbers the mask below ignores) are gathered. */
        const Py_ssize_t head_offset = head * job->num_blocks * dim * bs; /* elements */
        for (int group16 = 0; group16 < KEY_BLOCK / 16; group16++) {
            Py_ssize_t pos = k0 + group16 * 16;
            float *column = s->panel + group16 * 16;
            if (bs % 16 == 0 && pos % 16 == 0 && pos + 16 <= hi) {
                Py_ssize_t keys = head_offset + table[pos / bs] * dim * bs + pos % bs;
                if (job->kv_kind == KV_INT8)
                    int8_pairs_to_panel((const int8_t *)job->k + keys + pos % bs, bs, dim, column); /* 2 (pos % bs) */
                else if (job->kv_kind == KV_BF16)
                    for (Py_ssize_t d = 0; d < dim; d++) _mm512_store_ps(column + d * KEY_BLOCK, kv_load(job->k, keys + d * bs, KV_BF16));
                else
                    for (Py_ssize_t d = 0; d < dim; d++) _mm512_store_ps(column + d * KEY_BLOCK, kv_load(job->k, keys + d * bs, KV_FP32));
                continue;
            }
            int32_t offsets[16] __attribute__((aligned(64)));
            for (int j = 0; j < 16; j++) {
                Py_ssize_t key = pos + j < hi ? pos + j : k0;
                offsets[j] = (int32_t)(table[key / bs] * dim * bs + key % bs);
            }
            if (job->kv_kind == KV_BF16) { /* no 16-bit gather: one at a time (runs that straddle blocks are rare) */
                const uint16_t *head_keys = (const uint16_t *)job->k + head_offset;
                for (Py_ssize_t d = 0; d < dim; d++)
                    for (int j = 0; j < 16; j++) column[d * KEY_BLOCK + j] = bf16_to_float(head_keys[offsets[j] + d * bs]);
                continue;
            }
            if (job->kv_kind == KV_INT8) { /* offsets[j] + key % bs: where key j's pairs start */
                const int8_t *head_keys = (const int8_t *)job->k + head_offset;
                for (int j = 0; j < 16; j++) {
                    const Py_ssize_t key = pos + j < hi ? pos + j : k0, at = offsets[j] + key % bs;
                    for (Py_ssize_t d = 0; d < dim; d++) column[d * KEY_BLOCK + j] = (float)head_keys[int8_key_element(at, d, bs)];
                }
                continue;
            }
            const float *head_keys = (const float *)job->k + head_offset;
            __m512i index = _mm512_load_si512(offsets);
            for (Py_ssize_t d = 0; d < dim; d++)
                _mm512_store_ps(column + d * KEY_BLOCK, _mm512_i32gather_ps(
                    _mm512_add_epi32(index, _mm512_set1_epi32((int)(d * bs))), head_keys, 4));
        }
        const int int8 = job->kv_kind == KV_INT8;
        if (int8) { /* the block's values widened once into fp32 rows, for every query row of the unit */
            for (Py_ssize_t j = 0; j < width; j++) s->values[j] = cached_row(job, job->v, table, head, k0 + (j & ~1));
            int8_value_panel(s->values, width, dim, s->value_panel);
            for (Py_ssize_t j = 0; j < width; j++) s->values[j] = s->value_panel + j * dim;
            block_scales(job, s, table, head, k0, width, KEY_BLOCK);
        } else
            for (Py_ssize_t j = 0; j < width; j++) s->values[j] = cached_row(job, job->v, table, head, k0 + j);
        for (Py_ssize_t r0 = 0; r0 < rows; r0 += ROWS) {
            int block_rows = rows - r0 < ROWS ? (int)(rows - r0) : ROWS;
            score_block(block_rows, s->q_rows + r0, s->panel, dim, s->scores + r0 * KEY_BLOCK);
        }
        if (int8) {
            softmax_block(job, s, rows, k0, 1);
            scale_probabilities(s, rows, width, KEY_BLOCK);
        } else
            softmax_block(job, s, rows, k0, 0);
        for (Py_ssize_t r0 = 0; r0 < rows; r0 += WEIGHTED_ROWS_MAX)
            weighted_rows(rows - r0 < WEIGHTED_ROWS_MAX ? (int)(rows - r0) : WEIGHTED_ROWS_MAX, int8 ? KV_FP32 : job->kv_kind,
                          s->out_rows + r0, s->rescale + r0, s->scores + r0 * KEY_BLOCK, KEY_BLOCK, s->values, width,
                          dim);
    }
    for (Py_ssize_t r = 0; r < rows; r++) {
        float inv = s->row_sum[r] > 0.0f ? 1.0f / s->row_sum[r] : 0.0f;
        for (Py_ssize_t d = 0; d < dim; d++) s->out_rows[r][d] *= inv;
    }
}

#ifdef SELFHOST_AMX_TILES
#include "_prefill_tiles_amx.h"
#endif /* SELFHOST_AMX_TILES */

static int cpu_has_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
}

#endif /* SELFHOST_PREFILL */

static PyObject *available(PyObject *self, PyObject *args) {
    (void)self, (void)args;
#ifdef SELFHOST_PREFILL
    return PyBool_FromLong(cpu_has_avx512());
#else
    Py_RETURN_FALSE;
#endif
}

static PyObject *tiles_available(PyObject *self, PyObject *args) {
    (void)self, (void)args;
#ifdef SELFHOST_AMX_TILES
    return PyBool_FromLong(tiles_ready);
#else
    Py_RETURN_FALSE;
#endif
}

static PyObject *prefill_attention(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long q, k, v, out, tables, first, count, start;
    Py_ssize_t num_chunks, q_stride, num_heads, num_kv_heads, head_dim, block_size, num_blocks, max_blocks, window;
    float scale;
    int num_threads, kv_kind = 0, tiles = 0;
    unsigned long long k_scales = 0, v_scales = 0;
    if (!PyArg_ParseTuple(args, "KKKKKKKKnnnnnnnnnfi|ipKK", &q, &k, &v, &out, &tables, &first, &count, &start,
                          &num_chunks, &q_stride, &num_heads, &num_kv_heads, &head_dim, &block_size, &num_blocks,
                          &max_blocks, &window, &scale, &num_threads, &kv_kind, &tiles, &k_scales, &v_scales))
        return NULL;
#ifdef SELFHOST_PREFILL
    if (num_kv_heads <= 0 || num_heads % num_kv_heads != 0 || num_heads / num_kv_heads > MAX_GROUP ||
        head_dim <= 0 || head_dim % 16 != 0 || head_dim > 1024 || block_size <= 0 || num_chunks < 0 ||
        num_blocks * block_size * head_dim >= INT32_MAX) { /* key offsets within a head are gathered as int32 */
        PyErr_SetString(PyExc_ValueError, "prefill_attention: unsupported head counts or sizes");
        return NULL;
    }
    if (kv_kind < 0 || kv_kind > 2 || (kv_kind == KV_INT8 && !(k_scales && v_scales))) {
        PyErr_SetString(PyExc_ValueError, "prefill_attention: kv_kind is 0 (fp32), 1 (bf16) or 2 (int8, with its scales)");
        return NULL;
    }
#ifdef SELFHOST_AMX_TILES
    const int tiles_ok = tiles_ready && kv_kind != KV_FP32 && head_dim % 32 == 0 && head_dim <= TILE_MAX_DIM;
#else
    const int tiles_ok = 0;
#endif
    if (tiles && !tiles_ok) {
        PyErr_SetString(PyExc_ValueError, "prefill_attention: tiles need AMX, a bf16 or int8 cache and head_dim a multiple of 32 up to 256");
        return NULL;
    }
    const int64_t *counts = (const int64_t *)count;
    const Py_ssize_t query_block = tiles ? TILE_QUERY_BLOCK : QUERY_BLOCK;
    Py_ssize_t blocks = 0;
    for (Py_ssize_t c = 0; c < num_chunks; c++) blocks += (counts[c] + query_block - 1) / query_block;
    int64_t *unit_chunk = malloc(sizeof(int64_t) * (size_t)(blocks + 1)), *unit_position = malloc(sizeof(int64_t) * (size_t)(blocks + 1));
    Py_ssize_t *chunk_units = malloc(sizeof(Py_ssize_t) * (size_t)(num_chunks + 1)); /* units of each chunk, per kv head */
    if (unit_chunk == NULL || unit_position == NULL || chunk_units == NULL) {
        free(unit_chunk), free(unit_position), free(chunk_units);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t c = 0; c < num_chunks; c++) chunk_units[c] = (counts[c] + query_block - 1) / query_block;
    Py_ssize_t u = 0;
    for (Py_ssize_t c = 0; c < num_chunks; c++)
        for (Py_ssize_t i = 0; i < counts[c]; i += query_block) unit_chunk[u] = c, unit_position[u++] = i;
    _Atomic int failed = 0;
    Job job = {(const float *)q, (const void *)k, (const void *)v, (float *)out, (const int64_t *)tables,
               (const int64_t *)first, counts, (const int64_t *)start, unit_chunk, unit_position, q_stride,
               num_heads, num_kv_heads, head_dim, block_size, num_blocks, max_blocks, window, scale, &failed,
               kv_kind, tiles, (const float *)k_scales, (const float *)v_scales, query_block, NULL, 0, 0};
    const int threads = num_threads < 1 ? 1 : num_threads;
    int out_of_memory = 0;
#ifdef SELFHOST_AMX_TILES
    if (tiles) out_of_memory = run_tiles(&job, num_chunks, chunk_units, threads) != 0;
#endif
    if (!tiles) {
        Py_BEGIN_ALLOW_THREADS
        pool_run(run_unit, &job, (long)(blocks * num_kv_heads), threads);
        Py_END_ALLOW_THREADS
    }
    free(unit_chunk), free(unit_position), free(chunk_units);
    if (out_of_memory || atomic_load(&failed)) return PyErr_NoMemory();
    Py_RETURN_NONE;
#else
    (void)q, (void)k, (void)v, (void)out, (void)tables, (void)first, (void)count, (void)start, (void)num_chunks;
    (void)q_stride, (void)num_heads, (void)num_kv_heads, (void)head_dim, (void)block_size, (void)num_blocks;
    (void)max_blocks, (void)window, (void)scale, (void)num_threads, (void)kv_kind, (void)tiles, (void)k_scales;
    (void)v_scales;
    PyErr_SetString(PyExc_RuntimeError, "prefill_attention: built without x86-64 support");
    return NULL;
#endif
}

static PyMethodDef methods[] = {
    {"available", available, METH_NOARGS, "True when this CPU has AVX-512F and the kernel was built for it."},
    {"tiles_available", tiles_available, METH_NOARGS,
     "True when this CPU has AMX-BF16, the OS granted it, and the kernel was built for it (bf16 and int8 caches)."},
    {"prefill_attention", prefill_attention, METH_VARARGS,
     "Causal attention of prompt chunks over the paged cache (fp32 q/out; an fp32, bf16 or int8 cache by kv_kind "
     "0/1/2, int8 with its k and v scales; with tiles, on AMX)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_prefill_attention_cpu", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__prefill_attention_cpu(void) {
#ifdef SELFHOST_PREFILL
    if (pool_import() < 0) return NULL; /* the process's one worker pool (../_cpu_pool.h) */
#ifdef SELFHOST_AMX_TILES
    tiles_ready = amx_request();
#endif
#endif
    return PyModule_Create(&module);
}
