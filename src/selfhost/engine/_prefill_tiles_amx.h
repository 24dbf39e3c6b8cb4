/* Prompt attention on AMX tiles over a bf16 or int8 cache: the part of _prefill_attention_cpu.c
 * that runs where the CPU has AMX-BF16. Included by that file after its Job, Unit and Scratch.
 *
 * Transposed products. Each 16-query tile computes S^T = K Q^T (16 keys x 16 queries a C tile)
 * and O^T += V^T P^T (16 dims x 16 queries), so one vector of a score tile is one key against
 * 16 queries: a query's running max and sum are lanes of vectors, every softmax reduction is
 * vertical (no horizontal max or sum per row and block, no scalar exp for the rescale), and a
 * pair of probability vectors becomes one row of the B tile of P^T with one conversion and one
 * permutation, without a trip through memory.
 *
 * Keys and values rearranged once per chunk and kv head. The A tiles want key rows (16 keys x 32
 * dims) and value columns (16 dims x 32 keys); the cache keeps keys dims-major in a block and
 * values as rows (int8: in pairs). A first pass over the step writes each chunk's keys [base, hi)
 * as rows and its values as columns (bf16; an int8 cache's integers exactly, with its scales
 * beside them) into one buffer shared by every unit of the chunk, instead of every unit
 * rearranging every key block below its diagonal again (9x the work on a 1024-token prompt).
 * Chunks go through in groups whose buffers stay under REARRANGED_BUDGET bytes. Transposes are
 * shuffles in registers: gathers and scatters cost several times more on the Xeon this was
 * measured on (its microcode guards them).
 *
 * Blocks of 64 keys: a block's keys and values (16 KB), one query tile's scores, probabilities
 * and outputs stay in L1 together; 128-key blocks were 30% slower. Measured on a 2-core Xeon with
 * AMX, a 1024-token prompt, 9 heads over 3, head_dim 64, one layer: 3.1 -> 1.9 ms on one thread,
 * 1.6-1.9 -> 1.1 ms on two, against the row-wise tile kernel this replaced (which re-tiled keys
 * per unit and reduced each row's scores horizontally).
 *
 * The softmax works in base 2 (scores times scale x log2 e, then 2^x) and keeps a query's
 * running max until a block raises it by more than RESCALE_SLACK: probabilities then reach at
 * most 2^RESCALE_SLACK, which fp32 sums and bf16's relative rounding do not mind, and the output
 * tiles are rescaled only in the rare block that moves the max that far. Queries and
 * probabilities are rounded to bf16 (keys and values already are), sums stay fp32: bf16
 * attention, as the bf16 weight products around it.
 */
#ifndef SELFHOST_PREFILL_TILES_AMX_H
#define SELFHOST_PREFILL_TILES_AMX_H

#define TILE_MAX_DIM 256
#define TILE_MAX_ROWS (MAX_ROWS + 16)
#define REARRANGED_BUDGET ((size_t)64 << 20)
#define RESCALE_SLACK 8.0f
#define LOG2_E 1.44269504f

/* One chunk's kv head: keys [base, base + span) as rows, values as columns; zeros from the
 * chunk's last position on (finite: probability 0 times a value must stay 0). */
typedef struct Rearranged {
    uint16_t *keys;                   /* (span, dim) bf16 */
    uint16_t *values;                 /* (dim, span) bf16 */
    float *key_scales, *value_scales; /* int8: (span,), the key's scale times scale x log2 e; else NULL */
    Py_ssize_t base, span;
} Rearranged;

typedef struct {
    uint16_t q[TILE_MAX_ROWS * TILE_MAX_DIM] __attribute__((aligned(64))); /* B tiles of Q^T (query tile, dims/32) */
    float o[TILE_MAX_ROWS * TILE_MAX_DIM] __attribute__((aligned(64)));    /* O^T per query tile: (dim, 16) */
    float scores[TILE_KEY_BLOCK * 16] __attribute__((aligned(64)));        /* S^T of a block: (keys, 16) */
    uint16_t p[TILE_KEY_BLOCK * 16] __attribute__((aligned(64)));          /* B tiles of its P^T (keys/32) */
    float pos[TILE_MAX_ROWS] __attribute__((aligned(64)));   /* each query's position; -1e30 on padding rows */
    float first[TILE_MAX_ROWS] __attribute__((aligned(64))); /* its first visible key (a window), else -1e30 */
    float max[TILE_MAX_ROWS] __attribute__((aligned(64)));   /* running max, base 2 */
    float sum[TILE_MAX_ROWS] __attribute__((aligned(64)));   /* running sum of probabilities */
} TileScratch;

static _Thread_local TileScratch *tile_scratch;
static int tiles_ready; /* set once, when the module loads */

/* The bf16 bits of an integer in [-127, 127]: its fp32 bits' upper half, exactly. */
static inline uint16_t int8_to_bf16(int8_t x) {
    float f = (float)x;
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return (uint16_t)(bits >> 16);
}

/* 32 bytes of an int8 cache holding 16 pairs (x[2i], x[2i + 1]) as 16 pairs of bf16, exactly. */
AMX_TARGET static inline __m512i int8_pairs_as_bf16(const int8_t *pairs) {
    __m512i x = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)pairs));
    __m512i even = _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(x, 16), 16)));
    __m512i odd = _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_srai_epi32(x, 16)));
    return _mm512_or_si512(_mm512_srli_epi32(even, 16), _mm512_and_si512(odd, _mm512_set1_epi32((int)0xffff0000u)));
}

/* 2^x for x <= RESCALE_SLACK (garbage where x is +inf or NaN: callers mask those lanes):
 * x = n + r with |r| <= 1/2, 2^r by the degree-4 Taylor polynomial of e^(r ln 2)
 * (relative error below 5e-5, for results rounded to bf16 next), 2^n by scalef, which takes
 * n down to -1e30 to 0 without a clamp. */
AMX_TARGET static inline __m512 exp2_poly(__m512 x) {
    __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_sub_ps(x, n);
    __m512 poly = _mm512_set1_ps(9.61812911e-3f);
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(5.55041087e-2f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(2.40226507e-1f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(6.93147181e-1f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(poly, n);
}

/* ---- the first pass: keys and values rearranged ------------------------------------------ */

/* Keys [pos, pos + 16) of a chunk (pos - base a multiple of 16) as rows of r->keys. A run inside
 * one cache block (dims-major there) comes as one vector of 16 keys' pairs of dimensions per
 * pair, scattered to the 16 rows; runs that straddle blocks or pass hi go one element at a time. */
AMX_TARGET static void rearrange_keys(const Job *job, const Rearranged *r, const int64_t *table, Py_ssize_t head,
                                      Py_ssize_t pos, Py_ssize_t hi) {
    const Py_ssize_t dim = job->head_dim, bs = job->block_size;
    const int int8 = job->kv_kind == KV_INT8;
    const Py_ssize_t head_first = head * job->num_blocks * dim * bs; /* elements */
    const uint16_t *keys16 = (const uint16_t *)job->k + head_first;
    const int8_t *keys8 = (const int8_t *)job->k + head_first;
    uint16_t *rows = r->keys + (pos - r->base) * dim;
    if (pos >= hi) { /* padding */
        memset(rows, 0, sizeof(uint16_t) * (size_t)(16 * dim));
        return;
    }
    if (bs % 16 == 0 && pos + 16 <= hi) {
        const Py_ssize_t at = table[pos / bs] * dim * bs;
        for (Py_ssize_t p0 = 0; p0 < dim / 2; p0 += 16) { /* 16 pairs of dimensions (32 dims) of the 16 keys */
            __m512i pairs[16];
            for (Py_ssize_t p = 0; p < 16; p++) {
                const Py_ssize_t pair = p0 + p;
                pairs[p] = int8 ? int8_pairs_as_bf16(keys8 + at + 2 * (pos % bs) + pair * 2 * bs)
                                : amx_pair_rows(keys16 + at + pos % bs + 2 * pair * bs, keys16 + at + pos % bs + (2 * pair + 1) * bs);
            }
            transpose_16x16(pairs); /* pairs[j]: key j's 32 dims */
            for (Py_ssize_t j = 0; j < 16; j++) _mm512_store_si512((void *)(rows + j * dim + 2 * p0), pairs[j]);
        }
        return;
    }
    for (Py_ssize_t j = 0; j < 16; j++) {
        const Py_ssize_t key = pos + j, block = key < hi ? table[key / bs] * dim * bs : -1;
        for (Py_ssize_t d = 0; d < dim; d++)
            rows[j * dim + d] = block < 0 ? 0
                                : int8    ? int8_to_bf16(keys8[int8_key_element(block + 2 * (key % bs), d, bs)])
                                          : keys16[block + key % bs + d * bs];
    }
}

/* Values of keys [pos, pos + 32) (pos - base a multiple of 32) as columns of r->values: for each
 * pair of keys, 16 dims' (value of key a, value of key b) as one vector (an int8 cache keeps exactly
 * those pairs; a bf16 one has them from two value rows), 16 such vectors transposed into 16 dims'
 * 32 keys. Past hi: zeros. */
AMX_TARGET static void rearrange_values(const Job *job, const Rearranged *r, const int64_t *table, Py_ssize_t head,
                                        Py_ssize_t pos, Py_ssize_t hi, const uint16_t *zero_row) {
    const Py_ssize_t dim = job->head_dim;
    const int int8 = job->kv_kind == KV_INT8;
    const void *rows[32];
    for (Py_ssize_t j = 0; j < 32; j++) rows[j] = pos + j < hi ? cached_row(job, job->v, table, head, pos + j) : NULL;
    uint16_t *columns = r->values + (pos - r->base);
    for (Py_ssize_t g = 0; g < dim / 16; g++) {
        __m512i pairs[16];
        for (Py_ssize_t i = 0; i < 16; i++) {
            const void *va = rows[2 * i], *vb = rows[2 * i + 1];
            if (int8) /* a's row starts the pair (a is even); b past hi holds finite integers its probability 0 drops */
                pairs[i] = va ? int8_pairs_as_bf16((const int8_t *)va + g * 32) : _mm512_setzero_si512();
            else
                pairs[i] = amx_pair_rows(va ? (const uint16_t *)va + g * 16 : zero_row, vb ? (const uint16_t *)vb + g * 16 : zero_row);
        }
        transpose_16x16(pairs); /* pairs[d]: dim 16g + d of the 32 keys */
        for (Py_ssize_t d = 0; d < 16; d++) _mm512_storeu_si512((void *)(columns + (g * 16 + d) * r->span), pairs[d]);
    }
}

/* The first pass's unit of work: 128 positions of one chunk's kv head. */
typedef struct {
    const Job *job;
    Rearranged *rearranged;   /* (chunks of the group, Hkv) */
    const int64_t *segment_item, *segment_first; /* per unit: its rearranged index and first position */
    Py_ssize_t chunk0;        /* the group's first chunk */
    float log2_scale;         /* scale x log2 e */
} RearrangeJob;

static const uint16_t zero_values[TILE_MAX_DIM] __attribute__((aligned(64)));

AMX_TARGET static void rearrange_segment(const void *whole, long unit) {
    const RearrangeJob *rj = (const RearrangeJob *)whole;
    const Job *job = rj->job;
    const Py_ssize_t item = rj->segment_item[unit], first = rj->segment_first[unit];
    const Py_ssize_t chunk = rj->chunk0 + item / job->num_kv_heads, head = item % job->num_kv_heads;
    const Rearranged *r = rj->rearranged + item;
    const int64_t *table = job->tables + chunk * job->max_blocks;
    const Py_ssize_t hi = job->start[chunk] + job->count[chunk], bs = job->block_size;
    const Py_ssize_t last = first + TILE_KEY_BLOCK < r->base + r->span ? first + TILE_KEY_BLOCK : r->base + r->span;
    for (Py_ssize_t pos = first; pos < last; pos += 16) rearrange_keys(job, r, table, head, pos, hi);
    for (Py_ssize_t pos = first; pos < last; pos += 32) rearrange_values(job, r, table, head, pos, hi, zero_values);
    if (r->key_scales != NULL)
        for (Py_ssize_t pos = first; pos < last; pos++) {
            const Py_ssize_t at = pos < hi ? (head * job->num_blocks + table[pos / bs]) * bs + pos % bs : -1;
            r->key_scales[pos - r->base] = at < 0 ? 0.0f : rj->log2_scale * job->k_scales[at];
            r->value_scales[pos - r->base] = at < 0 ? 0.0f : job->v_scales[at];
        }
}

/* ---- the units: one kv head, up to TILE_QUERY_BLOCK positions of one chunk -------------------- */

/* The unit's query rows as B tiles of Q^T: tile (query tile, dims/32) row i holds, for each of the
 * 16 queries, its dimensions (2i, 2i + 1): each query's 32 dims rounded to bf16 make 16 pairs,
 * and a 16 x 16 transpose of pairs puts them in place. Padding rows are zeros. */
AMX_TARGET static void queries_to_tiles(const Scratch *s, TileScratch *t, Py_ssize_t rows, Py_ssize_t dim) {
    const Py_ssize_t chunks = dim / 32, query_tiles = (rows + 15) / 16;
    for (Py_ssize_t qt = 0; qt < query_tiles; qt++)
        for (Py_ssize_t kc = 0; kc < chunks; kc++) {
            __m512i pairs[16];
            for (Py_ssize_t q = 0; q < 16; q++) {
                const Py_ssize_t row = qt * 16 + q;
                const float *x = row < rows ? s->q_rows[row] + kc * 32 : NULL;
                pairs[q] = x ? (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + 16), _mm512_loadu_ps(x)) : _mm512_setzero_si512();
            }
            transpose_16x16(pairs);
            uint16_t *tile = t->q + (qt * chunks + kc) * AMX_TILE_ELEMS;
            for (Py_ssize_t i = 0; i < 16; i++) _mm512_store_si512((void *)(tile + i * 32), pairs[i]);
        }
}

/* The softmax of one query tile's block of scores S^T (`keys` vectors of 16 queries, keys from k0),
 * in base 2: each query's running max and sum updated, the probabilities (int8: times their
 * values' scales) written as the B tiles of P^T, and the factor its output tiles need returned in
 * *rescale (all ones when no query's max moved). `masked`: some query may not see some key. */
AMX_TARGET static inline __attribute__((always_inline)) int softmax_tile(
    TileScratch *t, Py_ssize_t qt, const float *scores, uint16_t *p_tiles, Py_ssize_t keys, Py_ssize_t k0,
    const int masked, const float *key_scale, const float *value_scale, float log2_scale, __m512 *rescale) {
    const __m512 pos = _mm512_load_ps(t->pos + qt * 16), first = _mm512_load_ps(t->first + qt * 16);
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                                                6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512 constant_scale = _mm512_set1_ps(log2_scale);
#define KEY_SCALE(j) (key_scale ? _mm512_set1_ps(key_scale[j]) : constant_scale)
#define VISIBLE(j) \
    (_mm512_cmp_ps_mask(pos, _mm512_set1_ps((float)(k0 + (j))), _CMP_GE_OQ) & \
     _mm512_cmp_ps_mask(first, _mm512_set1_ps((float)(k0 + (j))), _CMP_LE_OQ))
    __m512 peaks[4]; /* four chains: one would wait on each max's latency */
    for (int c = 0; c < 4; c++) peaks[c] = _mm512_set1_ps(-INFINITY);
    for (Py_ssize_t j = 0; j < keys; j += 4) /* keys: a multiple of 32 */
        for (int c = 0; c < 4; c++) {
            __m512 x = _mm512_load_ps(scores + (j + c) * 16);
            if (key_scale) x = _mm512_mul_ps(x, KEY_SCALE(j + c));
            peaks[c] = masked ? _mm512_mask_max_ps(peaks[c], VISIBLE(j + c), peaks[c], x) : _mm512_max_ps(peaks[c], x);
        }
    __m512 peak = _mm512_max_ps(_mm512_max_ps(peaks[0], peaks[1]), _mm512_max_ps(peaks[2], peaks[3]));
    if (!key_scale) peak = _mm512_mul_ps(peak, constant_scale);
    const __m512 old_max = _mm512_load_ps(t->max + qt * 16);
    /* the max moves only where the block passes it by more than the slack (or none was set) */
    const __mmask16 moves = _mm512_cmp_ps_mask(peak, _mm512_add_ps(old_max, _mm512_set1_ps(RESCALE_SLACK)), _CMP_GT_OQ);
    const __m512 new_max = _mm512_mask_mov_ps(old_max, moves, peak);
    const __mmask16 had_max = _mm512_cmp_ps_mask(old_max, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
    *rescale = _mm512_mask_mov_ps(_mm512_set1_ps(1.0f), moves,
                                  _mm512_maskz_mov_ps(had_max, exp2_poly(_mm512_sub_ps(old_max, new_max))));
    __m512 totals[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (Py_ssize_t j = 0; j < keys; j += 2) {
        __m512 p[2];
        for (int e = 0; e < 2; e++) {
            __m512 x = _mm512_fmsub_ps(_mm512_load_ps(scores + (j + e) * 16), KEY_SCALE(j + e), new_max);
            p[e] = masked ? _mm512_maskz_mov_ps(VISIBLE(j + e), exp2_poly(x)) : exp2_poly(x);
            totals[e] = _mm512_add_ps(totals[e], p[e]);
            if (value_scale) p[e] = _mm512_mul_ps(p[e], _mm512_set1_ps(value_scale[j + e]));
        }
        __m512i packed = _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(p[1], p[0]));
        _mm512_store_si512((void *)(p_tiles + j / 32 * AMX_TILE_ELEMS + j % 32 / 2 * 32), packed);
    }
#undef KEY_SCALE
#undef VISIBLE
    _mm512_store_ps(t->sum + qt * 16, _mm512_fmadd_ps(_mm512_load_ps(t->sum + qt * 16), *rescale, _mm512_add_ps(totals[0], totals[1])));
    _mm512_store_ps(t->max + qt * 16, new_max);
    return moves != 0;
}

/* One key block of a unit: where its rearranged keys, values and (int8) scales start. */
typedef struct {
    Py_ssize_t k0, key_chunks; /* first key; 32-key chunks up to the unit's last key */
    const uint16_t *key_rows, *value_columns;
    const float *key_scale, *value_scale;
} KeyBlock;

/* S^T of query tile qt against the block's keys (key_chunks x 32 keys, up to 64 at a time in C
 * tiles 0-3) into `scores`, (keys, 16) floats. */
#define SCORE_TILE(i, a_tile)                                                                  \
    if (count > (i)) {                                                                         \
        _tile_loadd(a_tile, keys + (i) * 16 * dim + kc * 32, dim * (long)sizeof(uint16_t));    \
        _tile_dpbf16ps(i, a_tile, 4);                                                          \
    }
#define SCORE_TILE_STORE(i) \
    if (count > (i)) _tile_stored(i, scores + (g0 + (i)) * 256, 64)
AMX_TARGET static void score_tile(const TileScratch *t, const KeyBlock *b, Py_ssize_t qt, Py_ssize_t dim, float *scores) {
    const Py_ssize_t chunks = dim / 32, groups = b->key_chunks * 2;
    for (Py_ssize_t g0 = 0; g0 < groups; g0 += 4) {
        const Py_ssize_t count = groups - g0 < 4 ? groups - g0 : 4;
        const uint16_t *keys = b->key_rows + g0 * 16 * dim;
        _tile_zero(0);
        _tile_zero(1);
        if (count > 2) {
            _tile_zero(2);
            _tile_zero(3);
        }
        for (Py_ssize_t kc = 0; kc < chunks; kc++) {
            _tile_loadd(4, t->q + (qt * chunks + kc) * AMX_TILE_ELEMS, 64);
            SCORE_TILE(0, 5);
            SCORE_TILE(1, 6);
            SCORE_TILE(2, 7);
            SCORE_TILE(3, 5);
        }
        SCORE_TILE_STORE(0);
        SCORE_TILE_STORE(1);
        SCORE_TILE_STORE(2);
        SCORE_TILE_STORE(3);
    }
}
#undef SCORE_TILE
#undef SCORE_TILE_STORE

/* The softmax of query tile qt's block of scores into the B tiles of P^T at `p`; where a query's
 * max moved, its output columns rescaled. */
AMX_TARGET static void softmax_stage(TileScratch *t, const KeyBlock *b, Py_ssize_t qt, Py_ssize_t dim,
                                     float log2_scale, const float *scores, uint16_t *p) {
    const Py_ssize_t keys = b->key_chunks * 32;
    /* the whole block visible to every query of the tile: no masks */
    float least_pos = t->pos[qt * 16], last_first = t->first[qt * 16];
    for (int q = 1; q < 16; q++) {
        least_pos = t->pos[qt * 16 + q] < least_pos ? t->pos[qt * 16 + q] : least_pos;
        last_first = t->first[qt * 16 + q] > last_first ? t->first[qt * 16 + q] : last_first;
    }
    const int masked = !((float)(b->k0 + keys - 1) <= least_pos && last_first <= (float)b->k0);
    __m512 rescale;
    const int moved = masked ? softmax_tile(t, qt, scores, p, keys, b->k0, 1, b->key_scale, b->value_scale, log2_scale, &rescale)
                             : softmax_tile(t, qt, scores, p, keys, b->k0, 0, b->key_scale, b->value_scale, log2_scale, &rescale);
    if (moved) {
        float *o = t->o + qt * dim * 16;
        for (Py_ssize_t d = 0; d < dim; d++) _mm512_store_ps(o + d * 16, _mm512_mul_ps(_mm512_load_ps(o + d * 16), rescale));
    }
}

#define OUT_TILE_LOAD(i) \
    if (count > (i)) _tile_loadd(i, o + (g0 + (i)) * 16 * 16, 16 * sizeof(float))
#define OUT_TILE_STORE(i) \
    if (count > (i)) _tile_stored(i, o + (g0 + (i)) * 16 * 16, 16 * sizeof(float))
#define OUT_TILE_ADD(i, a_tile)                                                                                  \
    if (count > (i)) {                                                                                           \
        _tile_loadd(a_tile, b->value_columns + (g0 + (i)) * 16 * span + kc * 32, span * (long)sizeof(uint16_t)); \
        _tile_dpbf16ps(i, a_tile, 4);                                                                            \
    }

/* O^T of query tile qt += V^T P^T, 64 dims x 16 queries at a time. */
AMX_TARGET static void output_tile(TileScratch *t, const KeyBlock *b, Py_ssize_t qt, Py_ssize_t dim, Py_ssize_t span,
                                   const uint16_t *p) {
    const Py_ssize_t groups = dim / 16;
    float *o = t->o + qt * dim * 16;
    for (Py_ssize_t g0 = 0; g0 < groups; g0 += 4) {
        const Py_ssize_t count = groups - g0 < 4 ? groups - g0 : 4;
        OUT_TILE_LOAD(0);
        OUT_TILE_LOAD(1);
        OUT_TILE_LOAD(2);
        OUT_TILE_LOAD(3);
        for (Py_ssize_t kc = 0; kc < b->key_chunks; kc++) {
            _tile_loadd(4, p + kc * AMX_TILE_ELEMS, 64);
            OUT_TILE_ADD(0, 5);
            OUT_TILE_ADD(1, 6);
            OUT_TILE_ADD(2, 7);
            OUT_TILE_ADD(3, 5);
        }
        OUT_TILE_STORE(0);
        OUT_TILE_STORE(1);
        OUT_TILE_STORE(2);
        OUT_TILE_STORE(3);
    }
}
#undef OUT_TILE_LOAD
#undef OUT_TILE_STORE
#undef OUT_TILE_ADD

/* Where the unit's rearranged keys and values are: Job carries the group's. */
static const Rearranged *unit_rearranged(const Job *job, long unit) {
    const Py_ssize_t chunk = job->unit_chunk[unit / job->num_kv_heads];
    return job->rearranged + (chunk - job->group_chunk0) * job->num_kv_heads + unit % job->num_kv_heads;
}

AMX_TARGET static void run_unit_tiles(const void *whole, long unit) {
    const Job *job = (const Job *)whole;
    unit += job->unit_offset;
    Unit u;
    Scratch *s = begin_unit(job, unit, &u);
    if (s == NULL) return;
    if (tile_scratch == NULL && posix_memalign((void **)&tile_scratch, 64, sizeof(TileScratch)) != 0) {
        tile_scratch = NULL;
        atomic_store(job->failed, 1);
        return;
    }
    TileScratch *t = tile_scratch;
    const Rearranged *r = unit_rearranged(job, unit);
    const Py_ssize_t dim = job->head_dim, rows = u.rows;
    const Py_ssize_t query_tiles = (rows + 15) / 16, padded = query_tiles * 16;
    queries_to_tiles(s, t, rows, dim);
    for (Py_ssize_t row = 0; row < padded; row++) {
        const int real = row < rows;
        t->pos[row] = real ? (float)s->row_pos[row] : -1e30f;
        t->first[row] = real && job->window > 0 ? (float)(s->row_pos[row] + 1 - job->window) : -1e30f;
        t->max[row] = -INFINITY, t->sum[row] = 0.0f;
    }
    memset(t->o, 0, sizeof(float) * (size_t)(padded * dim));
    amx_configure();
    const int int8 = job->kv_kind == KV_INT8;
    const float log2_scale = job->scale * LOG2_E;
    const Py_ssize_t k_first = u.lo - u.lo % 32, blocks = (u.hi - k_first + TILE_KEY_BLOCK - 1) / TILE_KEY_BLOCK;
    for (Py_ssize_t i = 0; i < blocks * query_tiles; i++) { /* each block against each query tile */
        const Py_ssize_t qt = i % query_tiles, k0 = k_first + i / query_tiles * TILE_KEY_BLOCK;
        const Py_ssize_t width = u.hi - k0 < TILE_KEY_BLOCK ? u.hi - k0 : TILE_KEY_BLOCK;
        const KeyBlock b = {k0, (width + 31) / 32, r->keys + (k0 - r->base) * dim, r->values + (k0 - r->base),
                            int8 ? r->key_scales + (k0 - r->base) : NULL, int8 ? r->value_scales + (k0 - r->base) : NULL};
        score_tile(t, &b, qt, dim, t->scores);
        softmax_stage(t, &b, qt, dim, log2_scale, t->scores, t->p);
        output_tile(t, &b, qt, dim, r->span, t->p);
    }
    /* out = O / sum, back from O^T: 16 dims x 16 queries transposed at a time */
    for (Py_ssize_t qt = 0; qt < query_tiles; qt++) {
        const float *o = t->o + qt * dim * 16;
        for (Py_ssize_t d0 = 0; d0 < dim; d0 += 16) {
            __m512i x[16];
            for (int d = 0; d < 16; d++) x[d] = _mm512_load_si512((const void *)(o + (d0 + d) * 16));
            transpose_16x16(x); /* x[q]: query q's 16 dims */
            for (Py_ssize_t q = 0; q < 16 && qt * 16 + q < rows; q++) {
                const float total = t->sum[qt * 16 + q];
                const __m512 inv = _mm512_set1_ps(total > 0.0f ? 1.0f / total : 0.0f);
                _mm512_storeu_ps(s->out_rows[qt * 16 + q] + d0, _mm512_mul_ps(_mm512_castsi512_ps(x[q]), inv));
            }
        }
    }
}

/* Positions a chunk's rearranged buffers hold for `keys` keys: a multiple of 32 whose rows of
 * values (span bf16) are an odd number of cache lines apart, so that the 16 rows of a value tile
 * fall in different sets of the L1 (a power-of-two stride put them in two: 14% slower). */
static Py_ssize_t value_span(Py_ssize_t keys) {
    const Py_ssize_t span = (keys + 31) / 32 * 32;
    return span / 32 % 2 == 0 ? span + 32 : span;
}

/* One step's prompt attention on tiles: chunks in groups whose rearranged keys and values fit
 * REARRANGED_BUDGET, each group a first pass (rearrange) and a second (units). Returns 0, or -1
 * when memory could not be had. */
static int run_tiles(Job *job, Py_ssize_t num_chunks, const Py_ssize_t *chunk_units, int threads) {
    const Py_ssize_t hkv = job->num_kv_heads, dim = job->head_dim, int8 = job->kv_kind == KV_INT8;
    Py_ssize_t unit0 = 0;
    for (Py_ssize_t c0 = 0; c0 < num_chunks;) {
        /* the group: chunks c0 .. c1 - 1 */
        Py_ssize_t c1 = c0, bytes = 0, segments = 0, group_units = 0;
        while (c1 < num_chunks) {
            const Py_ssize_t lo = job->window > 0 && job->start[c1] + 1 > job->window ? job->start[c1] + 1 - job->window : 0;
            const Py_ssize_t base = lo - lo % 32, hi = job->start[c1] + job->count[c1];
            const Py_ssize_t span = value_span(hi - base);
            const Py_ssize_t more = hkv * span * (2 * dim * 2 + (int8 ? 8 : 0));
            if (c1 > c0 && (size_t)(bytes + more) > REARRANGED_BUDGET) break;
            bytes += more, segments += hkv * ((span + TILE_KEY_BLOCK - 1) / TILE_KEY_BLOCK), group_units += chunk_units[c1];
            c1++;
        }
        char *memory = NULL;
        Rearranged *rearranged = malloc(sizeof(Rearranged) * (size_t)((c1 - c0) * hkv));
        int64_t *segment_item = malloc(sizeof(int64_t) * (size_t)(segments + 1));
        int64_t *segment_first = malloc(sizeof(int64_t) * (size_t)(segments + 1));
        if (rearranged == NULL || segment_item == NULL || segment_first == NULL ||
            posix_memalign((void **)&memory, 64, (size_t)bytes) != 0) {
            free(rearranged), free(segment_item), free(segment_first);
            return -1;
        }
        char *at = memory;
        Py_ssize_t n = 0;
        for (Py_ssize_t c = c0; c < c1; c++) {
            const Py_ssize_t lo = job->window > 0 && job->start[c] + 1 > job->window ? job->start[c] + 1 - job->window : 0;
            const Py_ssize_t base = lo - lo % 32, hi = job->start[c] + job->count[c];
            const Py_ssize_t span = value_span(hi - base);
            for (Py_ssize_t h = 0; h < hkv; h++) {
                Rearranged *r = rearranged + (c - c0) * hkv + h;
                r->base = base, r->span = span;
                r->keys = (uint16_t *)at, at += span * dim * 2;
                r->values = (uint16_t *)at, at += span * dim * 2;
                r->key_scales = r->value_scales = NULL;
                if (int8) r->key_scales = (float *)at, at += span * 4, r->value_scales = (float *)at, at += span * 4;
                for (Py_ssize_t first = base; first < base + span; first += TILE_KEY_BLOCK)
                    segment_item[n] = (c - c0) * hkv + h, segment_first[n++] = first;
            }
        }
        RearrangeJob rj = {job, rearranged, segment_item, segment_first, c0, job->scale * LOG2_E};
        job->rearranged = rearranged, job->group_chunk0 = c0, job->unit_offset = unit0 * hkv;
        Py_BEGIN_ALLOW_THREADS
        pool_run(rearrange_segment, &rj, (long)segments, threads);
        pool_run(run_unit_tiles, job, (long)(group_units * hkv), threads);
        Py_END_ALLOW_THREADS
        free(memory), free(rearranged), free(segment_item), free(segment_first);
        unit0 += group_units, c0 = c1;
    }
    return 0;
}

#endif /* SELFHOST_PREFILL_TILES_AMX_H */
