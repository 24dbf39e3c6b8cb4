/* Single-query attention read straight from the paged KV cache, on CPU: fp32 queries and
 * outputs over an fp32 cache, or (AVX-512 only, `kv_kind`) a bf16 one, half the bytes, or an
 * int8 one with a scale per token and kv head, a quarter (the scales: k_scales and v_scales,
 * (Hkv, NB, BS) fp32; a key's scale multiplies its scores, a value's its weight).
 *
 * Built at install time as an optional extension (setup.py). The torch path in
 * paged_cache.py first gathers every sequence's blocks into a padded copy, once
 * per layer per step; with 32 sequences of ~500 tokens that copy is the largest
 * cost of a decode step. Here each (sequence, kv head) pair walks its block
 * table and reads keys and values where they lie, so nothing is copied.
 *
 * Layouts (all contiguous):
 *   q, out        (S, H, D)             query head i uses kv head i / (H / Hkv)
 *   k             (Hkv, NB, D, BS)      one layer of the cache, keys dims-major in a block
 *   v             (Hkv, NB, BS, D)      values as rows
 *   block_tables  (S, MB) int64         block of each position / BS
 *   context_lens  (S,) int64            keys visible to each query, itself included
 * Per pair: the scores of all G query heads sharing the kv head, block by block
 * (a vector load holds one dimension of 8 or 16 consecutive keys, serving every
 * head: no horizontal sums); then per head soft-cap and softmax; then the
 * weighted sum of values, all heads at once on AVX-512 (each value row loaded
 * once). On AVX-512 this took a 32-sequence decode step's attention from 0.43 to
 * ~0.32 ms per layer (17.3 MB of keys and values).
 * Chunks of pairs go to the threads of the shared pool (../_cpu_pool.h) as
 * they are free; the engine step decides how many threads take part.
 *
 * `rope_decode_attention` is the same walk for a decode-only step, fused with
 * what precedes it: each pair first applies the rotary embedding to its query
 * heads and key (straight from the q/k/v projection's output) and writes the
 * key and value into the cache slot. One call per layer instead of ~10 small
 * torch ops saved ~0.4 ms per token on a 30-layer model.
 * A speculative verification enters as one single-token query per checked position (all
 * with the sequence's block table, each with its own length); `store_first` then writes
 * every key and value before any query attends.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "../_kernel_capsules.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SELFHOST_X86 1
#include <immintrin.h>

#include "../_cpu_pool.h"
#include "../_exp_avx512.h"
#include "_weighted_rows_avx512.h"
#include "../_transpose_avx512.h"
#include "_rope_store_avx512.h"
#endif

#define PAIRS_PER_CHUNK 4 /* (sequence, kv head) pairs per unit of work handed to the pool */

typedef struct {
    const float *q;
    const void *k, *v; /* fp32, bf16 or int8 (kv_kind) */
    float *k_scales, *v_scales; /* int8: the layer's (Hkv, NB, BS) scales, read and written */
    const int64_t *tables, *lens;
    float *out;
    Py_ssize_t num_heads, num_kv_heads, head_dim, block_size, num_blocks, max_blocks;
    float scale, softcap; /* softcap 0: none */
    Py_ssize_t window;    /* 0: every earlier key is visible */
    Py_ssize_t item_begin, item_end; /* pairs: seq * num_kv_heads + kv_head */
    Py_ssize_t item_end_all;         /* the step's pairs (a chunk's job sees its own range above) */
    /* Fused decode step (rope_decode_attention): q, k, v are still the projection's
     * (S, H + 2 Hkv, D) rows, unrotated; each pair rotates its query heads and its key,
     * and writes the key and value into the cache slot before attending. */
    const float *cos, *sin; /* (S, D) per token; NULL: q is (S, H, D), rotated, keys already cached */
    const int64_t *slots;   /* (S,) flat cache slot (block * BS + offset) of each token */
    void *k_cache, *v_cache;
    int use_avx2, use_avx512;
    int kv_kind; /* KV_FP32, or KV_BF16 / KV_INT8 (AVX-512 paths only; _weighted_rows_avx512.h) */
    int use_key_runs; /* rope_store writes keys a block's run at a time (_rope_store_avx512.h): AVX-512 BW + VL */
    /* Several queries of one sequence in the step (a speculative verification): every key and
     * value is written in a first pass, so each query sees the step's earlier tokens whichever
     * thread wrote them; the attention pass then only rotates its queries. */
    int store_first, keys_stored;
    int block_shift; /* log2(block_size) */
    float *q_out;    /* rope_store: the rotated query heads land here, (S, H, D); NULL: scratch */
    int *failed; /* set when scratch memory could not be had */
} Job;

/* ---- portable C: any CPU ---- */

/* Keys are stored dims-major inside each block: dim d of the block's key j is at
 * block[d * BS + j], so one vector load holds a dimension of consecutive keys. */
static const void *key_block(const Job *job, Py_ssize_t seq, Py_ssize_t head, Py_ssize_t block_index) {
    int64_t block = job->tables[seq * job->max_blocks + block_index];
    Py_ssize_t element = (head * job->num_blocks + block) * job->head_dim * job->block_size;
    return (const char *)job->k + element * (job->kv_kind == 1 ? 2 : 4); /* fp32 or bf16: int8 is AVX-512 only */
}

/* scores[g * count + p] = scale * q_g . key(first + p) for the group's query heads. */
static void scores_scalar(const Job *job, Py_ssize_t seq, Py_ssize_t head, const float *q, Py_ssize_t first,
                          Py_ssize_t len, float *scores) {
    Py_ssize_t group = job->num_heads / job->num_kv_heads, dim = job->head_dim, bs = job->block_size;
    Py_ssize_t count = len - first;
    for (Py_ssize_t pos = first; pos < len; pos++) {
        const float *key = (const float *)key_block(job, seq, head, pos / bs) + pos % bs;
        for (Py_ssize_t g = 0; g < group; g++) {
            float acc = 0.0f;
            for (Py_ssize_t d = 0; d < dim; d++) acc += q[g * dim + d] * key[d * bs];
            scores[g * count + pos - first] = acc * job->scale;
        }
    }
}

static void exp_shifted_scalar(float *row, Py_ssize_t count, float peak) {
    for (Py_ssize_t p = 0; p < count; p++) row[p] = expf(row[p] - peak);
}

static void weighted_sum_scalar(const Job *job, const float *weights, const float *const *values, Py_ssize_t count,
                                float *out) {
    for (Py_ssize_t d = 0; d < job->head_dim; d++) out[d] = 0.0f;
    for (Py_ssize_t p = 0; p < count; p++)
        for (Py_ssize_t d = 0; d < job->head_dim; d++) out[d] += weights[p] * values[p][d];
}

#ifdef SELFHOST_X86
/* ---- AVX2 + FMA ---- */
#define AVX2 __attribute__((target("avx2,fma")))

/* Eight keys at a time (one vector per dimension, from the dims-major block) against
 * up to four query heads: each key vector loaded once serves every head, and no
 * horizontal sums are needed. `heads` is a constant at each call site. */
AVX2 static inline __attribute__((always_inline)) void run_scores_256(const int heads, const float *const *q,
                                                                      const float *keys, Py_ssize_t bs,
                                                                      Py_ssize_t dim, float scale, float *const *out,
                                                                      __m256i keep) {
    __m256 acc[4];
    for (int h = 0; h < heads; h++) acc[h] = _mm256_setzero_ps();
    for (Py_ssize_t d = 0; d < dim; d++) {
        __m256 k = _mm256_loadu_ps(keys + d * bs);
        for (int h = 0; h < heads; h++) acc[h] = _mm256_fmadd_ps(_mm256_set1_ps(q[h][d]), k, acc[h]);
    }
    for (int h = 0; h < heads; h++) _mm256_maskstore_ps(out[h], keep, _mm256_mul_ps(acc[h], _mm256_set1_ps(scale)));
}

/* Requires BS % 8 == 0. */
AVX2 static void scores_avx2(const Job *job, Py_ssize_t seq, Py_ssize_t head, const float *q, Py_ssize_t first,
                             Py_ssize_t len, float *scores) {
    Py_ssize_t group = job->num_heads / job->num_kv_heads, dim = job->head_dim, bs = job->block_size;
    Py_ssize_t count = len - first;
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (Py_ssize_t g0 = 0; g0 < group; g0 += 4) {
        int heads = group - g0 < 4 ? (int)(group - g0) : 4;
        const float *q_heads[4];
        for (int h = 0; h < heads; h++) q_heads[h] = q + (g0 + h) * dim;
        for (Py_ssize_t b = first / bs; b * bs < len; b++) {
            const float *block = (const float *)key_block(job, seq, head, b);
            for (Py_ssize_t j0 = 0; j0 < bs; j0 += 8) {
                Py_ssize_t pos0 = b * bs + j0;
                if (pos0 + 8 <= first || pos0 >= len) continue;
                /* lanes whose position is in [first, len): the others are not written */
                __m256i position = _mm256_add_epi32(lane, _mm256_set1_epi32((int)(pos0 - first)));
                __m256i keep = _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_setzero_si256(), position),
                                                   _mm256_cmpgt_epi32(_mm256_set1_epi32((int)count), position));
                float *out[4];
                for (int h = 0; h < heads; h++) out[h] = scores + (g0 + h) * count + (pos0 - first);
                switch (heads) {
                    case 1: run_scores_256(1, q_heads, block + j0, bs, dim, job->scale, out, keep); break;
                    case 2: run_scores_256(2, q_heads, block + j0, bs, dim, job->scale, out, keep); break;
                    case 3: run_scores_256(3, q_heads, block + j0, bs, dim, job->scale, out, keep); break;
                    default: run_scores_256(4, q_heads, block + j0, bs, dim, job->scale, out, keep); break;
                }
            }
        }
    }
}

/* ---- AVX-512: a whole 16-key run of a block per vector ---- */
#define AVX512 __attribute__((target("avx512f")))
#define MAX_HEADS_AT_ONCE 8

#define MAX_RUNS 4 /* 16-key runs scored at once */

/* Scores of `heads` query heads for `runs` runs of 16 consecutive keys, run r starting at
 * element runs_at[r] of the layer's keys (dims-major: dim d of the run is 16 values at
 * runs_at[r] + d * bs); lanes outside keep[r] are not written. Several runs at once give
 * heads x runs independent accumulators: with one run, three heads' FMA chains waited on
 * their own latency every dimension. `heads`, `runs` and `bf16` are constants at each
 * call site (registers, no branch in the loop). */
AVX512 static inline __attribute__((always_inline)) void run_scores_512(const int heads, const int runs, const int kind,
                                                                        const float *const *q, const void *keys,
                                                                        const Py_ssize_t *runs_at, const Py_ssize_t *next_at,
                                                                        Py_ssize_t bs, Py_ssize_t dim, float scale,
                                                                        float *const *out, const __mmask16 *keep) {
    __m512 acc[MAX_HEADS_AT_ONCE][MAX_RUNS];
    for (int h = 0; h < heads; h++)
        for (int r = 0; r < runs; r++) acc[h][r] = _mm512_setzero_ps();
    for (Py_ssize_t d = 0; d < dim; d++) {
        __m512 k[MAX_RUNS];
        for (int r = 0; r < runs; r++) k[r] = kv_load(keys, runs_at[r] + d * bs, kind);
        /* the next runs' keys, a line at a time while these are scored: each block starts where
         * its table says, a stream the hardware prefetcher finds a few lines late; asking for a
         * whole block at once ran out of line-fill buffers and stalled */
        for (int r = 0; r < runs; r++)
            _mm_prefetch((const char *)keys + (next_at[r] + d * bs) * kv_bytes(kind), _MM_HINT_T0);
        for (int h = 0; h < heads; h++) {
            __m512 x = _mm512_set1_ps(q[h][d]);
            for (int r = 0; r < runs; r++) acc[h][r] = _mm512_fmadd_ps(x, k[r], acc[h][r]);
        }
    }
    const __m512 factor = _mm512_set1_ps(scale);
    for (int h = 0; h < heads; h++)
        for (int r = 0; r < runs; r++) _mm512_mask_storeu_ps(out[h * MAX_RUNS + r], keep[r], _mm512_mul_ps(acc[h][r], factor));
}

/* runs per call for a group of `heads`: at most 16 accumulators */
#define RUNS_FOR(heads) ((heads) <= 4 ? 4 : 2)

#define RUN_SCORES_CASE(n)                                                                                  \
    case n:                                                                                                 \
        if (kind == KV_BF16)                                                                                \
            run_scores_512(n, RUNS_FOR(n), KV_BF16, q, keys, runs_at, next_at, bs, dim, scale, out, keep);  \
        else                                                                                                \
            run_scores_512(n, RUNS_FOR(n), KV_FP32, q, keys, runs_at, next_at, bs, dim, scale, out, keep);  \
        break;

AVX512 static void run_scores(int heads, int kind, const float *const *q, const void *keys, const Py_ssize_t *runs_at,
                              const Py_ssize_t *next_at, Py_ssize_t bs, Py_ssize_t dim, float scale, float *const *out,
                              const __mmask16 *keep) {
    switch (heads) {
        RUN_SCORES_CASE(1) RUN_SCORES_CASE(2) RUN_SCORES_CASE(3) RUN_SCORES_CASE(4)
        RUN_SCORES_CASE(5) RUN_SCORES_CASE(6) RUN_SCORES_CASE(7) RUN_SCORES_CASE(8)
    }
}

/* Element index of the 16-key run starting at position pos (its block from the table); past
 * len, the run before (a harmless address to prefetch). Block sizes are powers of two. */
static inline Py_ssize_t run_start(const Job *job, const int64_t *table, Py_ssize_t head_start, Py_ssize_t pos,
                                   Py_ssize_t len) {
    if (pos >= len) pos = len - 1 - (len - 1) % 16;
    const Py_ssize_t bs = job->block_size, dim = job->head_dim;
    return head_start + table[pos >> job->block_shift] * dim * bs + (pos & (bs - 1));
}

/* Requires BS % 16 == 0. The 16-key runs of positions [first, len) are scored RUNS_FOR(heads)
 * at a time for `group` query vectors (q: group x dim; scores: group rows of len - first); a
 * last call short of runs repeats its first run with nothing kept. */
AVX512 static void scores_avx512(const Job *job, Py_ssize_t seq, Py_ssize_t head, const float *q, Py_ssize_t group,
                                 Py_ssize_t first, Py_ssize_t len, float *scores) {
    Py_ssize_t dim = job->head_dim, bs = job->block_size;
    Py_ssize_t count = len - first;
    const int64_t *table = job->tables + seq * job->max_blocks;
    const Py_ssize_t head_start = head * job->num_blocks * dim * bs; /* elements */
    for (Py_ssize_t g0 = 0; g0 < group; g0 += MAX_HEADS_AT_ONCE) {
        int heads = group - g0 < MAX_HEADS_AT_ONCE ? (int)(group - g0) : MAX_HEADS_AT_ONCE;
        const int runs = RUNS_FOR(heads);
        const float *q_heads[MAX_HEADS_AT_ONCE];
        for (int h = 0; h < heads; h++) q_heads[h] = q + (g0 + h) * dim;
        Py_ssize_t pos0 = first - first % 16;
        Py_ssize_t runs_at[MAX_RUNS], next_at[MAX_RUNS];
        for (int r = 0; r < runs; r++) next_at[r] = run_start(job, table, head_start, pos0 + r * 16, len);
        while (pos0 < len) {
            __mmask16 keep[MAX_RUNS];
            float *out[MAX_HEADS_AT_ONCE * MAX_RUNS];
            for (int r = 0; r < runs; r++, pos0 += 16) {
                if (pos0 >= len) { /* nothing left: score run 0 again, keep nothing */
                    runs_at[r] = runs_at[0], keep[r] = 0;
                    for (int h = 0; h < heads; h++) out[h * MAX_RUNS + r] = out[h * MAX_RUNS];
                    continue;
                }
                runs_at[r] = next_at[r];
                __mmask16 mask = 0xffff;
                if (pos0 < first) mask &= (__mmask16)(0xffffu << (first - pos0));
                if (pos0 + 16 > len) mask &= (__mmask16)((1u << (len - pos0)) - 1);
                keep[r] = mask;
                /* out + lane = the score slot of position pos0 + lane (masked lanes unused) */
                for (int h = 0; h < heads; h++) out[h * MAX_RUNS + r] = scores + (g0 + h) * count + (pos0 - first);
            }
            for (int r = 0; r < runs; r++) next_at[r] = run_start(job, table, head_start, pos0 + r * 16, len);
            run_scores(heads, job->kv_kind, q_heads, job->k, runs_at, next_at, bs, dim, job->scale, out, keep);
        }
    }
}

/* ---- an int8 cache: scores with AVX512-VNNI ------------------------------------------------
 * Its keys are stored in pairs of dimensions: inside a block, row p holds (dim 2p, dim 2p + 1)
 * of each key in turn, (D/2, BS, 2), so 16 keys' pair is 32 bytes; widened to 16-bit they are
 * the operand of one vpdpwssd against the pair of one query head's dimensions. Each query head
 * is rounded to 16-bit integers (max |q| -> QUERY_INT16_MAX: a relative 1.5e-5, far below the
 * keys' own 8-bit rounding), products sum exactly in int32; the float score is that sum times
 * the head's and the key's scales. Against widening every key to fp32 (two instructions per 16
 * values, then one FMA per head) this is one widening per 32 values and one product per head. */
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define QUERY_INT16_MAX 32767

/* Query heads `heads` (group * dim floats) as 16-bit pairs: pairs[g * dim/2 + p] holds dims 2p and
 * 2p + 1 of head g; factors[g] = the head's scale times `scale`. |q16| * 127 * dim stays within
 * int32 for any head_dim (the largest integer shrinks past dim 512). */
AVX512 static void query_int16_pairs(const float *q, Py_ssize_t group, Py_ssize_t dim, float scale, int32_t *pairs,
                                     float *factors) {
    const float top = dim <= 512 ? (float)QUERY_INT16_MAX : (float)(2147483647.0 / (127.0 * (double)dim));
    for (Py_ssize_t g = 0; g < group; g++) { /* dim % 16 == 0 (check_pairs) */
        const float *row = q + g * dim;
        __m512 peak = _mm512_setzero_ps();
        for (Py_ssize_t d = 0; d < dim; d += 16) peak = _mm512_max_ps(peak, _mm512_abs_ps(_mm512_loadu_ps(row + d)));
        const float largest = _mm512_reduce_max_ps(peak);
        const __m512 inv = _mm512_set1_ps(largest > 0.0f ? top / largest : 0.0f);
        for (Py_ssize_t d = 0; d < dim; d += 16) /* 16 int16, nearest even: dims d, d + 1 in one int32 pair */
            _mm256_storeu_si256((__m256i *)(pairs + g * (dim / 2) + d / 2),
                                _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(row + d), inv))));
        factors[g] = largest > 0.0f ? scale * (largest / top) : 0.0f;
    }
}

/* Scores of `heads` query heads for `runs` runs of 16 keys (run r's pair rows start at element
 * runs_at[r], 2 * bs apart; its keys' scales at key_scales + scales_at[r]). */
VNNI static inline __attribute__((always_inline)) void run_scores_int8(const int heads, const int runs,
                                                                       const int32_t *pairs, const int8_t *keys,
                                                                       const Py_ssize_t *runs_at,
                                                                       const Py_ssize_t *next_at, Py_ssize_t bs,
                                                                       Py_ssize_t dim, const float *factors,
                                                                       const float *key_scales,
                                                                       const Py_ssize_t *scales_at,
                                                                       float *const *out, const __mmask16 *keep) {
    __m512i acc[MAX_HEADS_AT_ONCE][MAX_RUNS];
    for (int h = 0; h < heads; h++)
        for (int r = 0; r < runs; r++) acc[h][r] = _mm512_setzero_si512();
    const Py_ssize_t half = dim / 2;
    for (Py_ssize_t p = 0; p < half; p++) {
        __m512i k[MAX_RUNS];
        for (int r = 0; r < runs; r++)
            k[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(keys + runs_at[r] + p * 2 * bs)));
        for (int r = 0; r < runs; r++) _mm_prefetch((const char *)keys + next_at[r] + p * 2 * bs, _MM_HINT_T0);
        for (int h = 0; h < heads; h++) {
            __m512i x = _mm512_set1_epi32(pairs[h * half + p]);
            for (int r = 0; r < runs; r++) acc[h][r] = _mm512_dpwssd_epi32(acc[h][r], x, k[r]);
        }
    }
    for (int r = 0; r < runs; r++) {
        const __m512 key_scale = _mm512_loadu_ps(key_scales + scales_at[r]);
        for (int h = 0; h < heads; h++)
            _mm512_mask_storeu_ps(out[h * MAX_RUNS + r], keep[r],
                                  _mm512_mul_ps(_mm512_cvtepi32_ps(acc[h][r]),
                                                _mm512_mul_ps(key_scale, _mm512_set1_ps(factors[h]))));
    }
}

#define RUN_SCORES_INT8_CASE(n)                                                                             \
    case n:                                                                                                 \
        run_scores_int8(n, RUNS_FOR(n), pairs, keys, runs_at, next_at, bs, dim, factors, key_scales,        \
                        scales_at, out, keep);                                                              \
        break;

VNNI static void run_scores_int8_any(int heads, const int32_t *pairs, const int8_t *keys, const Py_ssize_t *runs_at,
                                     const Py_ssize_t *next_at, Py_ssize_t bs, Py_ssize_t dim, const float *factors,
                                     const float *key_scales, const Py_ssize_t *scales_at, float *const *out,
                                     const __mmask16 *keep) {
    switch (heads) {
        RUN_SCORES_INT8_CASE(1) RUN_SCORES_INT8_CASE(2) RUN_SCORES_INT8_CASE(3) RUN_SCORES_INT8_CASE(4)
        RUN_SCORES_INT8_CASE(5) RUN_SCORES_INT8_CASE(6) RUN_SCORES_INT8_CASE(7) RUN_SCORES_INT8_CASE(8)
    }
}

/* scores_avx512 over an int8 cache (block_size % 16 == 0); `pairs` is scratch for group * dim / 2
 * int32, `factors` for group floats. */
static void scores_int8(const Job *job, Py_ssize_t seq, Py_ssize_t head, const float *q, Py_ssize_t first,
                        Py_ssize_t len, float *scores, int32_t *pairs, float *factors) {
    const Py_ssize_t group = job->num_heads / job->num_kv_heads, dim = job->head_dim, bs = job->block_size;
    const Py_ssize_t count = len - first, half = dim / 2;
    const int64_t *table = job->tables + seq * job->max_blocks;
    const Py_ssize_t head_blocks = head * job->num_blocks;
    query_int16_pairs(q, group, dim, job->scale, pairs, factors);
    const int8_t *keys = job->k;
    for (Py_ssize_t g0 = 0; g0 < group; g0 += MAX_HEADS_AT_ONCE) {
        const int heads = group - g0 < MAX_HEADS_AT_ONCE ? (int)(group - g0) : MAX_HEADS_AT_ONCE;
        const int runs = RUNS_FOR(heads);
        Py_ssize_t pos0 = first - first % 16;
        Py_ssize_t runs_at[MAX_RUNS], next_at[MAX_RUNS], scales_at[MAX_RUNS];
        while (pos0 < len) {
            __mmask16 keep[MAX_RUNS];
            float *out[MAX_HEADS_AT_ONCE * MAX_RUNS];
            for (int r = 0; r < runs; r++, pos0 += 16) {
                if (pos0 >= len) { /* nothing left: score run 0 again, keep nothing */
                    runs_at[r] = runs_at[0], scales_at[r] = scales_at[0], keep[r] = 0;
                    for (int h = 0; h < heads; h++) out[h * MAX_RUNS + r] = out[h * MAX_RUNS];
                    continue;
                }
                const Py_ssize_t block = head_blocks + table[pos0 >> job->block_shift], j0 = pos0 & (bs - 1);
                runs_at[r] = block * dim * bs + 2 * j0;
                scales_at[r] = block * bs + j0;
                __mmask16 mask = 0xffff;
                if (pos0 < first) mask &= (__mmask16)(0xffffu << (first - pos0));
                if (pos0 + 16 > len) mask &= (__mmask16)((1u << (len - pos0)) - 1);
                keep[r] = mask;
                for (int h = 0; h < heads; h++) out[h * MAX_RUNS + r] = scores + (g0 + h) * count + (pos0 - first);
            }
            for (int r = 0; r < runs; r++) { /* the next runs, to prefetch (past len: the last run again) */
                Py_ssize_t pos = pos0 + r * 16 < len ? pos0 + r * 16 : len - 1 - (len - 1) % 16;
                next_at[r] = (head_blocks + table[pos >> job->block_shift]) * dim * bs + 2 * (pos & (bs - 1));
            }
            run_scores_int8_any(heads, pairs + g0 * half, keys, runs_at, next_at, bs, dim, factors + g0,
                                job->k_scales, scales_at, out, keep);
        }
    }
}

/* ---- an int8 cache: the weighted sum of values with AVX512-VNNI ------------------------------
 * Its values are stored in pairs of keys: inside a block, row m holds keys 2m and 2m + 1 side by
 * side for every dimension, (BS/2, D, 2), so 16 dimensions of a pair of keys are 32 bytes; widened
 * to 16-bit they meet the pair of those keys' weights in one vpdpwssd. Each head's weights (its
 * probabilities times the values' scales) are rounded to 16-bit integers with one scale per
 * WEIGHT_CHUNK keys (the chunk's largest weight -> 32767: each weight within 1.5e-5 of its chunk's
 * largest); int32 sums are flushed into the fp32 outputs chunk by chunk (within range: 32 pairs
 * of 2 x 32767 x 127). */
#define WEIGHT_CHUNK 64
#define INT8_SUM_HEADS 6 /* heads x 4 int32 accumulators + 4 value vectors fit the 32 registers */

/* One chunk's int16 weights of each head: w16 rows `padded` apart; `stage` holds `padded` floats. */
AVX512 static void weights_int16(const float *weights, Py_ssize_t group, Py_ssize_t count, Py_ssize_t lead,
                                 Py_ssize_t padded, float *stage, int16_t *w16, float *chunk_scales) {
    const Py_ssize_t chunks = padded / WEIGHT_CHUNK;
    for (Py_ssize_t g = 0; g < group; g++) {
        memset(stage, 0, sizeof(float) * (size_t)padded);
        memcpy(stage + lead, weights + g * count, sizeof(float) * (size_t)count);
        for (Py_ssize_t k = 0; k < chunks; k++) {
            const float *chunk = stage + k * WEIGHT_CHUNK;
            __m512 peak = _mm512_setzero_ps(); /* weights are >= 0 */
            for (int c = 0; c < WEIGHT_CHUNK; c += 16) peak = _mm512_max_ps(peak, _mm512_loadu_ps(chunk + c));
            const float largest = _mm512_reduce_max_ps(peak);
            const __m512 inv = _mm512_set1_ps(largest > 0.0f ? 32767.0f / largest : 0.0f);
            for (int c = 0; c < WEIGHT_CHUNK; c += 16)
                _mm256_storeu_si256((__m256i *)(w16 + g * padded + k * WEIGHT_CHUNK + c),
                                    _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(chunk + c), inv))));
            chunk_scales[g * chunks + k] = largest / 32767.0f;
        }
    }
}

/* out[h][d0 .. d0 + 64) += the chunks' sums for `heads` heads (a constant at each call site). */
VNNI static inline __attribute__((always_inline)) void int8_sums_n(const int heads, const int16_t *w16,
                                                                  Py_ssize_t padded, const float *chunk_scales,
                                                                  Py_ssize_t npairs, const int8_t *const *pairs,
                                                                  Py_ssize_t d0, int vectors, float *const *out) {
    const Py_ssize_t chunks = padded / WEIGHT_CHUNK;
    for (Py_ssize_t k = 0; k < chunks; k++) {
        __m512i acc[INT8_SUM_HEADS][4];
        for (int h = 0; h < heads; h++)
            for (int c = 0; c < 4; c++) acc[h][c] = _mm512_setzero_si512();
        const Py_ssize_t end = (k + 1) * WEIGHT_CHUNK / 2 < npairs ? (k + 1) * WEIGHT_CHUNK / 2 : npairs;
        for (Py_ssize_t m = k * WEIGHT_CHUNK / 2; m < end; m++) {
            const int8_t *src = pairs[m] + 2 * d0;
            if (m + VALUE_PREFETCH / 2 < npairs) _mm_prefetch((const char *)pairs[m + VALUE_PREFETCH / 2] + 2 * d0, _MM_HINT_T0);
            __m512i x[4];
            for (int c = 0; c < 4; c++)
                x[c] = c < vectors ? _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(src + 32 * c)))
                                   : _mm512_setzero_si512();
            for (int h = 0; h < heads; h++) {
                int32_t pair;
                memcpy(&pair, w16 + h * padded + 2 * m, sizeof pair);
                const __m512i w = _mm512_set1_epi32(pair);
                for (int c = 0; c < 4; c++)
                    if (c < vectors) acc[h][c] = _mm512_dpwssd_epi32(acc[h][c], w, x[c]);
            }
        }
        for (int h = 0; h < heads; h++) {
            const __m512 factor = _mm512_set1_ps(chunk_scales[h * chunks + k]);
            for (int c = 0; c < vectors; c++) {
                float *o = out[h] + d0 + 16 * c;
                _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[h][c]), factor, _mm512_loadu_ps(o)));
            }
        }
    }
}

#define INT8_SUMS_CASE(n) \
    case n: int8_sums_n(n, w16, padded, chunk_scales, npairs, pairs, d0, vectors, out); break;

VNNI static void int8_sums(int heads, const int16_t *w16, Py_ssize_t padded, const float *chunk_scales,
                           Py_ssize_t npairs, const int8_t *const *pairs, Py_ssize_t d0, int vectors,
                           float *const *out) {
    switch (heads) { INT8_SUMS_CASE(1) INT8_SUMS_CASE(2) INT8_SUMS_CASE(3) INT8_SUMS_CASE(4) INT8_SUMS_CASE(5) INT8_SUMS_CASE(6) }
}

/* out[g] = sum_p weights[g][p] * value(first + p) over an int8 cache, `pairs[m]` the row pair of
 * positions (first & ~1) + 2m. Scratch: `stage` (padded floats), `w16` (group x padded), chunk_scales
 * (group x padded / WEIGHT_CHUNK), padded = count + (first & 1) rounded up to WEIGHT_CHUNK. */
static void weighted_sums_int8(const Job *job, Py_ssize_t group, const float *weights, Py_ssize_t first,
                               Py_ssize_t count, const int8_t *const *pairs, float *out, float *stage, int16_t *w16,
                               float *chunk_scales) {
    const Py_ssize_t dim = job->head_dim, lead = first & 1;
    const Py_ssize_t padded = (count + lead + WEIGHT_CHUNK - 1) / WEIGHT_CHUNK * WEIGHT_CHUNK;
    const Py_ssize_t npairs = (count + lead + 1) / 2;
    weights_int16(weights, group, count, lead, padded, stage, w16, chunk_scales);
    memset(out, 0, sizeof(float) * (size_t)(group * dim));
    const Py_ssize_t chunks = padded / WEIGHT_CHUNK;
    for (Py_ssize_t h0 = 0; h0 < group; h0 += INT8_SUM_HEADS) {
        const int heads = group - h0 < INT8_SUM_HEADS ? (int)(group - h0) : INT8_SUM_HEADS;
        float *rows[INT8_SUM_HEADS];
        for (int h = 0; h < heads; h++) rows[h] = out + (h0 + h) * dim;
        for (Py_ssize_t d0 = 0; d0 < dim; d0 += 64)
            int8_sums(heads, w16 + h0 * padded, padded, chunk_scales + h0 * chunks, npairs, pairs, d0,
                      dim - d0 >= 64 ? 4 : (int)((dim - d0) / 16), rows);
    }
}

/* row = softmax(row) over `count` scores, 16 at a time (max, e^(x - max), sum, scale). */
AVX512 static void softmax_avx512(float *row, Py_ssize_t count) {
    __m512 peak = _mm512_set1_ps(-INFINITY), total = _mm512_setzero_ps();
    for (Py_ssize_t p = 0; p < count; p += 16) {
        __mmask16 mask = count - p >= 16 ? 0xffff : (__mmask16)((1u << (count - p)) - 1);
        peak = _mm512_mask_max_ps(peak, mask, peak, _mm512_maskz_loadu_ps(mask, row + p));
    }
    __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(peak));
    for (Py_ssize_t p = 0; p < count; p += 16) {
        __mmask16 mask = count - p >= 16 ? 0xffff : (__mmask16)((1u << (count - p)) - 1);
        __m512 e = _mm512_maskz_mov_ps(mask, exp_nonpositive_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, row + p), shift)));
        _mm512_mask_storeu_ps(row + p, mask, e);
        total = _mm512_add_ps(total, e);
    }
    __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
    for (Py_ssize_t p = 0; p < count; p += 16) {
        __mmask16 mask = count - p >= 16 ? 0xffff : (__mmask16)((1u << (count - p)) - 1);
        _mm512_mask_storeu_ps(row + p, mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, row + p), inv));
    }
}

/* row[p] *= scales[p]: an int8 cache's value scales into the weights of their rows. */
AVX512 static void scale_weights_avx512(float *row, const float *scales, Py_ssize_t count) {
    for (Py_ssize_t p = 0; p < count; p += 16) {
        __mmask16 mask = count - p >= 16 ? 0xffff : (__mmask16)((1u << (count - p)) - 1);
        _mm512_mask_storeu_ps(row + p, mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, row + p),
                                                           _mm512_maskz_loadu_ps(mask, scales + p)));
    }
}

/* out[g] = sum_p weights[g][p] * values[p] for the group's heads, WEIGHTED_ROWS_MAX at
 * a time (_weighted_rows_avx512.h): each value row is loaded once for all of them. */
AVX512 static void weighted_sums_avx512(const Job *job, Py_ssize_t group, const float *weights,
                                        const void *const *values, Py_ssize_t count, float *out) {
    float *rows[WEIGHTED_ROWS_MAX];
    for (Py_ssize_t g0 = 0; g0 < group; g0 += WEIGHTED_ROWS_MAX) {
        int heads = group - g0 < WEIGHTED_ROWS_MAX ? (int)(group - g0) : WEIGHTED_ROWS_MAX;
        for (int h = 0; h < heads; h++) rows[h] = out + (g0 + h) * job->head_dim;
        weighted_rows(heads, job->kv_kind, rows, NULL, weights + g0 * count, count, values, count, job->head_dim);
    }
}

/* e^x for x <= 0: x = n ln2 + r with |r| <= ln2/2, e^r by its degree-6 Taylor
 * polynomial (relative error below 2e-7), 2^n built in the exponent bits. */
AVX2 static __m256 exp_nonpositive_avx2(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f)); /* keeps 2^n a normal float; e^-87 is ~0 after softmax */
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);  /* ln2 split: exact high part ... */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);      /* ... and the rest */
    __m256 poly = _mm256_set1_ps(1.0f / 720.0f);
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.0f / 120.0f));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.0f / 24.0f));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.0f / 6.0f));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(0.5f));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.0f));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.0f));
    __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(poly, _mm256_castsi256_ps(two_n));
}

AVX2 static void exp_shifted_avx2(float *row, Py_ssize_t count, float peak) {
    __m256 shift = _mm256_set1_ps(peak);
    Py_ssize_t p = 0;
    for (; p + 8 <= count; p += 8)
        _mm256_storeu_ps(row + p, exp_nonpositive_avx2(_mm256_sub_ps(_mm256_loadu_ps(row + p), shift)));
    exp_shifted_scalar(row + p, count - p, peak);
}

/* out = sum_p weights[p] * values[p], 64 dims at a time held in eight registers. */
AVX2 static void weighted_sum_avx2(const Job *job, const float *weights, const float *const *values, Py_ssize_t count,
                                   float *out) {
    Py_ssize_t dim = job->head_dim, d0 = 0;
    for (; d0 + 64 <= dim; d0 += 64) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        for (Py_ssize_t p = 0; p < count; p++) {
            __m256 w = _mm256_set1_ps(weights[p]);
            const float *v = values[p] + d0;
            a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v), a0);
            a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8), a1);
            a2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 16), a2);
            a3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 24), a3);
            a4 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 32), a4);
            a5 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 40), a5);
            a6 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 48), a6);
            a7 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 56), a7);
        }
        float *o = out + d0;
        _mm256_storeu_ps(o, a0), _mm256_storeu_ps(o + 8, a1), _mm256_storeu_ps(o + 16, a2), _mm256_storeu_ps(o + 24, a3);
        _mm256_storeu_ps(o + 32, a4), _mm256_storeu_ps(o + 40, a5), _mm256_storeu_ps(o + 48, a6), _mm256_storeu_ps(o + 56, a7);
    }
    for (; d0 + 8 <= dim; d0 += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (Py_ssize_t p = 0; p < count; p++) acc = _mm256_fmadd_ps(_mm256_set1_ps(weights[p]), _mm256_loadu_ps(values[p] + d0), acc);
        _mm256_storeu_ps(out + d0, acc);
    }
    for (; d0 < dim; d0++) {
        float acc = 0.0f;
        for (Py_ssize_t p = 0; p < count; p++) acc += weights[p] * values[p][d0];
        out[d0] = acc;
    }
}
#endif

/* out = x * cos + roll(x, D/2) * signed_sin: layers/rotary.py's apply_rotary, computed
 * the same way (a rounded product, then one fused multiply-add, as torch's addcmul
 * does) so that a key rotated here is bit for bit the key a prompt chunk rotates. */
#ifdef SELFHOST_X86
AVX2 static void rotate_avx2(const float *x, const float *cos, const float *sin, Py_ssize_t dim, float *out) {
    Py_ssize_t half = dim / 2;
    for (Py_ssize_t d = 0; d < dim; d += 8) {
        const float *rolled = d < half ? x + d + half : x + d - half;
        __m256 product = _mm256_mul_ps(_mm256_loadu_ps(x + d), _mm256_loadu_ps(cos + d));
        _mm256_storeu_ps(out + d, _mm256_fmadd_ps(_mm256_loadu_ps(rolled), _mm256_loadu_ps(sin + d), product));
    }
}
#endif

static void rotate(const Job *job, const float *x, const float *cos, const float *sin, float *out) {
    Py_ssize_t dim = job->head_dim, half = dim / 2;
#ifdef SELFHOST_X86
    if (job->use_avx512 && half % 16 == 0) {
        rotate_avx512(x, cos, sin, dim, out);
        return;
    }
    if (job->use_avx2 && half % 8 == 0) {
        rotate_avx2(x, cos, sin, dim, out);
        return;
    }
#endif
    for (Py_ssize_t d = 0; d < dim; d++) {
        float product = x[d] * cos[d];
        out[d] = fmaf(d < half ? x[d + half] : x[d - half], sin[d], product);
    }
}

/* The pair's query heads, rotated, into q_rotated (group * dim floats). */
static void rotate_queries(const Job *job, Py_ssize_t seq, Py_ssize_t head, float *q_rotated) {
    Py_ssize_t group = job->num_heads / job->num_kv_heads, dim = job->head_dim;
    const float *row = job->q + seq * (job->num_heads + 2 * job->num_kv_heads) * dim;
    const float *cos = job->cos + seq * dim, *sin = job->sin + seq * dim;
    for (Py_ssize_t g = 0; g < group; g++) rotate(job, row + (head * group + g) * dim, cos, sin, q_rotated + g * dim);
}

/* The value of token `seq` for kv head `head` into its cache slot (with its scale: an int8 cache). */
static void store_value(const Job *job, Py_ssize_t seq, Py_ssize_t head) {
    const Py_ssize_t dim = job->head_dim, bs = job->block_size, slot = job->slots[seq];
    const float *value = job->q + (seq * (job->num_heads + 2 * job->num_kv_heads) + job->num_heads +
                                   job->num_kv_heads + head) * dim;
    const Py_ssize_t row_offset = (head * job->num_blocks * bs + slot) * dim;
#ifdef SELFHOST_X86 /* bf16 and int8 caches are taken on AVX-512 only (check_pairs) */
    if (job->kv_kind == KV_INT8) { /* into its pair of keys' rows (weighted_sums_int8): dim d of key j at
                                    * (j / 2) * 2 D + 2 d + j % 2; its scale beside it: (Hkv, NB, BS), the slot's */
        const Py_ssize_t j = slot % bs, block_at = (head * job->num_blocks + slot / bs) * dim * bs;
        job->v_scales[head * job->num_blocks * bs + slot] =
            int8_quantize_row(value, dim, (int8_t *)job->v_cache + block_at + j / 2 * 2 * dim + j % 2, 4, 2);
        return;
    }
    if (job->kv_kind == KV_BF16) {
        for (Py_ssize_t d = 0; d < dim; d += 16) bf16_round_16(value + d, (uint16_t *)job->v_cache + row_offset + d, 1);
        return;
    }
#endif
    memcpy((float *)job->v_cache + row_offset, value, sizeof(float) * (size_t)dim);
}

/* Fused step: rotate the pair's key into its cache slot, copy its value, rotate its query
 * heads into `q_rotated` (group * dim floats, then room for the key), or into their rows of
 * job->q_out where the job has one. */
static void rotate_and_store(const Job *job, Py_ssize_t seq, Py_ssize_t head, float *q_rotated) {
    Py_ssize_t group = job->num_heads / job->num_kv_heads, dim = job->head_dim;
    const float *row = job->q + seq * (job->num_heads + 2 * job->num_kv_heads) * dim;
    const float *cos = job->cos + seq * dim, *sin = job->sin + seq * dim;
    Py_ssize_t bs = job->block_size, slot = job->slots[seq];
    /* the key is rotated next to the queries, then spread into its block's dims-major column */
    float *key = q_rotated + group * dim;
    rotate(job, row + (job->num_heads + head) * dim, cos, sin, key);
    Py_ssize_t column = (head * job->num_blocks + slot / bs) * dim * bs + slot % bs;
#ifdef SELFHOST_X86 /* bf16 and int8 caches are taken on AVX-512 only (check_pairs) */
    if (job->kv_kind == KV_INT8) /* into its block's pair rows (scores_int8): dims 2p, 2p + 1 of key j at
                                  * p * 2 BS + 2 j; its scale as the value's */
        job->k_scales[head * job->num_blocks * bs + slot] = int8_quantize_row(
            key, dim, (int8_t *)job->k_cache + (head * job->num_blocks + slot / bs) * dim * bs + 2 * (slot % bs), 2 * bs, 1);
    else if (job->kv_kind == KV_BF16)
        for (Py_ssize_t d = 0; d < dim; d += 16) /* head_dim % 16 == 0 with a bf16 cache (check_pairs) */
            bf16_round_16(key + d, (uint16_t *)job->k_cache + column + d * bs, bs);
    else
#endif
        for (Py_ssize_t d = 0; d < dim; d++) ((float *)job->k_cache)[column + d * bs] = key[d];
    store_value(job, seq, head);
    rotate_queries(job, seq, head, job->q_out ? job->q_out + (seq * job->num_heads + head * group) * dim : q_rotated);
}

#ifdef SELFHOST_X86
/* rope_store's keys of tokens [seq, end) for kv head `head`, from `seq` on as long as their slots follow one
 * another inside one block (at most KEY_RUN_MAX): rotated into `keys` (KEY_RUN_MAX x dim floats), then written
 * as one run (_rope_store_avx512.h). Returns how many tokens it took. */
static Py_ssize_t store_key_run_from(const Job *job, Py_ssize_t seq, Py_ssize_t end, Py_ssize_t head, float *keys,
                                     int8_t *bytes) {
    const Py_ssize_t dim = job->head_dim, bs = job->block_size, slot = job->slots[seq], j0 = slot & (bs - 1);
    Py_ssize_t n = 1;
    while (n < KEY_RUN_MAX && seq + n < end && job->slots[seq + n] == slot + n && j0 + n < bs) n++;
    const Py_ssize_t stride = job->num_heads + 2 * job->num_kv_heads;
    for (Py_ssize_t i = 0; i < n; i++)
        rotate(job, job->q + ((seq + i) * stride + job->num_heads + head) * dim, job->cos + (seq + i) * dim,
               job->sin + (seq + i) * dim, keys + i * dim);
    const Py_ssize_t block = head * job->num_blocks + (slot >> job->block_shift);
    void *at = (char *)job->k_cache + block * dim * bs * kv_bytes(job->kv_kind);
    float *scales = job->kv_kind == KV_INT8 ? job->k_scales + block * bs + j0 : NULL;
    store_key_run(keys, (int)n, dim, bs, job->kv_kind, at, j0, scales, bytes);
    return n;
}
#endif

/* values[p] = the address of the value at position first + p (values are rows), for
 * p < count: one block-table lookup per block, no division per position (an integer
 * division per key cost as much as the key's share of the attention itself). */
static void value_rows(const Job *job, Py_ssize_t seq, Py_ssize_t head, Py_ssize_t first, Py_ssize_t count,
                       const void **values) {
    const Py_ssize_t bs = job->block_size, row_bytes = job->head_dim * (job->kv_kind == 1 ? 2 : 4);
    const char *head_rows = (const char *)job->v + head * job->num_blocks * bs * row_bytes;
    const int64_t *table = job->tables + seq * job->max_blocks;
    Py_ssize_t pos = first, end = first + count;
    while (pos < end) {
        const char *block = head_rows + table[pos / bs] * bs * row_bytes;
        for (Py_ssize_t j = pos % bs; j < bs && pos < end; j++, pos++) values[pos - first] = block + j * row_bytes;
    }
}

/* An int8 cache: pairs[m] = the row pair of positions (first & ~1) + 2m, m < (count + (first & 1) + 1) / 2
 * (values in pairs of keys: a pair's rows start at its first key's (pos % BS) * D), and scales[p] =
 * the scale of the value at first + p. */
static void int8_value_pairs(const Job *job, Py_ssize_t seq, Py_ssize_t head, Py_ssize_t first, Py_ssize_t count,
                             const int8_t **pairs, float *scales) {
    const Py_ssize_t bs = job->block_size, dim = job->head_dim, end = first + count;
    const int8_t *head_values = (const int8_t *)job->v + head * job->num_blocks * bs * dim;
    const float *head_scales = job->v_scales + head * job->num_blocks * bs;
    const int64_t *table = job->tables + seq * job->max_blocks;
    for (Py_ssize_t pos = first & ~(Py_ssize_t)1, m = 0; pos < end; pos += 2, m++)
        pairs[m] = head_values + (table[pos / bs] * bs + pos % bs) * dim;
    for (Py_ssize_t pos = first; pos < end;) {
        const Py_ssize_t j0 = pos % bs, n = bs - j0 < end - pos ? bs - j0 : end - pos;
        memcpy(scales + pos - first, head_scales + table[pos / bs] * bs + j0, sizeof(float) * (size_t)n);
        pos += n;
    }
}

/* Scratch of one (sequence, kv head) pair (run_job): scores, values, the values' scales, rotated query
 * heads and key; an int8 cache's query pairs and factors, staged weights, their int16 copies and scales. */
typedef struct {
    float *scores, *value_scales, *q_rotated, *query_factors, *stage, *chunk_scales;
    const void **values;
    int32_t *query_pairs;
    int16_t *w16;
} PairScratch;

/* A speculative verification's queries (store_first): one sequence's consecutive positions, each with
 * the same block table and one more key than the query before. Where the kernels below serve them
 * (AVX-512, an fp32 or bf16 cache, every key visible: no window cut), they attend as one group: the
 * keys and values are read once for all of them, where single queries read them once each (a demo
 * model's nine-row verification read ~0.5 MB of keys and values per query). Each query's scores
 * are the single query's (the same sums), its softmax runs over its own keys, and the weights of the
 * keys past its own are zeros in the shared sum of values (adding a zero product leaves every sum
 * as it was): the outputs are the single queries', bit for bit. */
#define GROUP_QUERIES_MAX 16

#ifdef SELFHOST_X86
static int groups_queries(const Job *job) {
    return job->store_first && job->use_avx512 && (job->kv_kind == KV_FP32 || job->kv_kind == KV_BF16) &&
           job->block_size % 16 == 0 && job->head_dim % 16 == 0;
}

/* Whether query b attends in query a's group (b right after a, see above). */
static int same_verification(const Job *job, Py_ssize_t a, Py_ssize_t b) {
    const Py_ssize_t len = job->lens[b];
    if (job->lens[a] + 1 != len || (job->window > 0 && len > job->window)) return 0;
    const Py_ssize_t blocks = (len + job->block_size - 1) / job->block_size;
    return memcmp(job->tables + a * job->max_blocks, job->tables + b * job->max_blocks,
                  sizeof(int64_t) * (size_t)blocks) == 0;
}

/* How many queries attend with `seq` as their group's first (1: alone), or 0 where seq is in the group
 * of a query before it. Groups are cut at GROUP_QUERIES_MAX queries. */
static Py_ssize_t group_queries(const Job *job, Py_ssize_t seq, Py_ssize_t num_seqs) {
    if (!groups_queries(job)) return 1;
    Py_ssize_t start = seq;
    while (start > 0 && same_verification(job, start - 1, start)) start--;
    if ((seq - start) % GROUP_QUERIES_MAX) return 0;
    Py_ssize_t n = 1;
    while (n < GROUP_QUERIES_MAX && seq + n < num_seqs && same_verification(job, seq + n - 1, seq + n)) n++;
    return n;
}

/* `n` queries from `seq` on as one group (see GROUP_QUERIES_MAX) for kv head `head`. */
static void attend_group(const Job *job, Py_ssize_t seq, Py_ssize_t n, Py_ssize_t head, const PairScratch *scratch) {
    const Py_ssize_t group = job->num_heads / job->num_kv_heads, dim = job->head_dim, rows = n * group;
    const Py_ssize_t count = job->lens[seq + n - 1]; /* the last query's keys: every query's, and more */
    float *scores = scratch->scores, *q = scratch->q_rotated;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (job->cos != NULL)
            rotate_queries(job, seq + i, head, q + i * group * dim); /* keys stored in the step's first pass */
        else
            memcpy(q + i * group * dim, job->q + ((seq + i) * job->num_heads + head * group) * dim,
                   sizeof(float) * (size_t)(group * dim));
    }
    value_rows(job, seq, head, 0, count, scratch->values);
    scores_avx512(job, seq, head, q, rows, 0, count, scores);
    float *out[WEIGHTED_ROWS_MAX];
    for (Py_ssize_t r = 0; r < rows; r++) {
        float *row = scores + r * count;
        const Py_ssize_t own = job->lens[seq + r / group];
        if (job->softcap > 0.0f)
            for (Py_ssize_t p = 0; p < own; p++) row[p] = tanhf(row[p] / job->softcap) * job->softcap;
        softmax_avx512(row, own);
        memset(row + own, 0, sizeof(float) * (size_t)(count - own));
    }
    for (Py_ssize_t r0 = 0; r0 < rows; r0 += WEIGHTED_ROWS_MAX) {
        const int take = rows - r0 < WEIGHTED_ROWS_MAX ? (int)(rows - r0) : WEIGHTED_ROWS_MAX;
        for (int r = 0; r < take; r++) {
            const Py_ssize_t i = (r0 + r) / group, g = (r0 + r) % group;
            out[r] = job->out + ((seq + i) * job->num_heads + head * group + g) * dim;
        }
        weighted_rows(take, job->kv_kind, out, NULL, scores + r0 * count, count, scratch->values, count, dim);
    }
}
#else
static Py_ssize_t group_queries(const Job *job, Py_ssize_t seq, Py_ssize_t num_seqs) {
    (void)job, (void)seq, (void)num_seqs;
    return 1; /* the grouped kernels are AVX-512's */
}
#endif

static void attend_pair(const Job *job, Py_ssize_t seq, Py_ssize_t head, const PairScratch *scratch) {
#ifdef SELFHOST_X86
    const Py_ssize_t queries = group_queries(job, seq, job->item_end_all / job->num_kv_heads);
    if (queries == 0) return; /* attended in its group */
    if (queries > 1) {
        attend_group(job, seq, queries, head, scratch);
        return;
    }
#endif
    float *scores = scratch->scores, *value_scales = scratch->value_scales, *q_rotated = scratch->q_rotated;
    const void **values = scratch->values;
    Py_ssize_t group = job->num_heads / job->num_kv_heads, dim = job->head_dim;
    Py_ssize_t len = job->lens[seq];
    Py_ssize_t first = (job->window > 0 && len > job->window) ? len - job->window : 0;
    Py_ssize_t count = len - first;
    const float *q = job->q + (seq * job->num_heads + head * group) * dim;
    if (job->cos != NULL) {
        if (job->keys_stored)
            rotate_queries(job, seq, head, q_rotated);
        else
            rotate_and_store(job, seq, head, q_rotated);
        q = q_rotated;
    }
    float *out = job->out + (seq * job->num_heads + head * group) * dim;
    if (count <= 0) {
        memset(out, 0, sizeof(float) * (size_t)(group * dim));
        return;
    }
    if (job->kv_kind == 2)
        int8_value_pairs(job, seq, head, first, count, (const int8_t **)values, value_scales);
    else
        value_rows(job, seq, head, first, count, values);
#ifdef SELFHOST_X86
    if (job->kv_kind == KV_INT8) /* check_pairs: VNNI, block_size % 16 == 0 */
        scores_int8(job, seq, head, q, first, len, scores, scratch->query_pairs, scratch->query_factors);
    else if (job->use_avx512 && job->block_size % 16 == 0)
        scores_avx512(job, seq, head, q, group, first, len, scores);
    else if (job->use_avx2 && job->block_size % 8 == 0)
        scores_avx2(job, seq, head, q, first, len, scores);
    else
#endif
        scores_scalar(job, seq, head, q, first, len, scores);
#ifdef SELFHOST_X86
    const int grouped_sums = job->use_avx512 && dim % 16 == 0; /* AVX-512: every head's softmax, then one pass of sums */
#endif
    for (Py_ssize_t g = 0; g < group; g++) {
        float *row = scores + g * count;
        if (job->softcap > 0.0f)
            for (Py_ssize_t p = 0; p < count; p++) row[p] = tanhf(row[p] / job->softcap) * job->softcap;
#ifdef SELFHOST_X86
        if (grouped_sums) { /* AVX-512 */
            softmax_avx512(row, count);
            if (job->kv_kind == KV_INT8) scale_weights_avx512(row, value_scales, count);
            continue;
        }
#endif
        float peak = row[0], total = 0.0f;
        for (Py_ssize_t p = 1; p < count; p++) peak = row[p] > peak ? row[p] : peak;
#ifdef SELFHOST_X86
        if (job->use_avx2)
            exp_shifted_avx2(row, count, peak);
        else
#endif
            exp_shifted_scalar(row, count, peak);
        for (Py_ssize_t p = 0; p < count; p++) total += row[p];
        float inv = 1.0f / total;
        for (Py_ssize_t p = 0; p < count; p++) row[p] *= inv;
#ifdef SELFHOST_X86
        if (job->use_avx2)
            weighted_sum_avx2(job, row, (const float *const *)values, count, out + g * dim);
        else
#endif
            weighted_sum_scalar(job, row, (const float *const *)values, count, out + g * dim);
    }
#ifdef SELFHOST_X86
    if (job->kv_kind == KV_INT8)
        weighted_sums_int8(job, group, scores, first, count, (const int8_t *const *)values, out, scratch->stage,
                           scratch->w16, scratch->chunk_scales);
    else if (grouped_sums)
        weighted_sums_avx512(job, group, scores, values, count, out);
#endif
}

static void run_job(Job *job) {
    Py_ssize_t longest = 1, most_queries = 1; /* the longest context, the largest group of queries (attend_group) */
    const Py_ssize_t num_seqs = job->item_end_all / job->num_kv_heads;
    for (Py_ssize_t item = job->item_begin; item < job->item_end; item++) {
        const Py_ssize_t seq = item / job->num_kv_heads, queries = group_queries(job, seq, num_seqs);
        Py_ssize_t len = job->lens[queries > 1 ? seq + queries - 1 : seq];
        if (len > longest) longest = len;
        if (queries > most_queries) most_queries = queries;
    }
    const Py_ssize_t group = job->num_heads / job->num_kv_heads, dim = job->head_dim, rows = group * most_queries;
    const Py_ssize_t padded = longest + 1 + 64; /* an int8 cache's staged weights: WEIGHT_CHUNK multiples */
    const size_t floats = (size_t)((rows + 1) * longest + (rows + 1) * dim + group + group * dim / 2 + padded +
                                   group * (padded / 64 + 1) + (group * padded + 1) / 2);
    float *block = malloc(sizeof(float) * floats);
    const void **values = malloc(sizeof(void *) * (size_t)longest);
    if (block == NULL || values == NULL) {
        free(block), free(values);
        *job->failed = 1;
        return;
    }
    PairScratch scratch = {.scores = block, .values = values};
    scratch.value_scales = block + rows * longest;
    scratch.q_rotated = scratch.value_scales + longest;
    scratch.query_factors = scratch.q_rotated + (rows + 1) * dim;
    scratch.query_pairs = (int32_t *)(scratch.query_factors + group);
    scratch.stage = (float *)(scratch.query_pairs + group * dim / 2);
    scratch.chunk_scales = scratch.stage + padded;
    scratch.w16 = (int16_t *)(scratch.chunk_scales + group * (padded / 64 + 1));
    for (Py_ssize_t item = job->item_begin; item < job->item_end; item++)
        attend_pair(job, item / job->num_kv_heads, item % job->num_kv_heads, &scratch);
    free(block), free(values);
}

/* The first pass of a step with store_first: PAIRS_PER_CHUNK pairs' keys and values into the cache. */
static void store_chunk(const void *whole, long chunk) {
    const Job *job = whole;
    Py_ssize_t begin = (Py_ssize_t)chunk * PAIRS_PER_CHUNK, end = begin + PAIRS_PER_CHUNK;
    if (end > job->item_end) end = job->item_end;
    Py_ssize_t group = job->num_heads / job->num_kv_heads;
    float *scratch = malloc(sizeof(float) * (size_t)((group + 1) * job->head_dim));
    if (scratch == NULL) {
        *job->failed = 1;
        return;
    }
    for (Py_ssize_t item = begin; item < end; item++)
        rotate_and_store(job, item / job->num_kv_heads, item % job->num_kv_heads, scratch);
    free(scratch);
}

/* rope_store's unit of work: every kv head of TOKENS_PER_STORE consecutive tokens. A key goes
 * into a column of its block (dims-major), so two threads writing neighbouring tokens would
 * pass the block's cache lines back and forth; a block's worth of tokens at a time keeps
 * them apart (measured: the writes took ~1 ms a layer of a 1024-token prompt). */
#define TOKENS_PER_STORE 16
static void store_tokens_chunk(const void *whole, long chunk) {
    const Job *job = whole;
    Py_ssize_t tokens = job->item_end / job->num_kv_heads;
    Py_ssize_t begin = (Py_ssize_t)chunk * TOKENS_PER_STORE, end = begin + TOKENS_PER_STORE;
    if (end > tokens) end = tokens;
    const Py_ssize_t group = job->num_heads / job->num_kv_heads, dim = job->head_dim;
    size_t floats = (size_t)((group + 1) * dim); /* the one-token path's queries and key */
#ifdef SELFHOST_X86
    const size_t run_floats = (size_t)(KEY_RUN_MAX * dim + KEY_RUN_MAX * dim / 4); /* a run's keys, their int8 bytes */
    if (run_floats > floats) floats = run_floats;
#endif
    float *scratch = malloc(sizeof(float) * floats);
    if (scratch == NULL) {
        *job->failed = 1;
        return;
    }
    for (Py_ssize_t head = 0; head < job->num_kv_heads; head++) {
#ifdef SELFHOST_X86
        if (job->use_key_runs) {
            for (Py_ssize_t token = begin; token < end;)
                token += store_key_run_from(job, token, end, head, scratch, (int8_t *)(scratch + KEY_RUN_MAX * dim));
            for (Py_ssize_t token = begin; token < end; token++) {
                store_value(job, token, head);
                rotate_queries(job, token, head, job->q_out + (token * job->num_heads + head * group) * dim);
            }
            continue;
        }
#endif
        for (Py_ssize_t token = begin; token < end; token++) rotate_and_store(job, token, head, scratch);
    }
    free(scratch);
}

/* One unit of pool work: PAIRS_PER_CHUNK consecutive (sequence, kv head) pairs. */
static void run_chunk(const void *whole, long chunk) {
    Job job = *(const Job *)whole;
    job.item_begin = (Py_ssize_t)chunk * PAIRS_PER_CHUNK;
    if (job.item_begin + PAIRS_PER_CHUNK < job.item_end) job.item_end = job.item_begin + PAIRS_PER_CHUNK;
    run_job(&job);
}

static int cpu_has_avx2(void) {
#ifdef SELFHOST_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

static int cpu_has_avx512(void) {
#ifdef SELFHOST_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
#else
    return 0;
#endif
}

static int cpu_has_avx512_bw_vl(void) {
#ifdef SELFHOST_X86
    return cpu_has_avx512() && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
#else
    return 0;
#endif
}

/* The widest instruction set the kernels may use: 2 AVX-512, 1 AVX2, 0 portable C.
 * Tests lower it to check every path on one machine. */
static int isa_limit = 2;

static PyObject *limit_isa(PyObject *self, PyObject *args) {
    (void)self;
    int level;
    if (!PyArg_ParseTuple(args, "i", &level)) return NULL;
    int before = isa_limit;
    isa_limit = level;
    return PyLong_FromLong(before);
}

/* Whether the kernels take a cache of this kind here: bf16 on AVX-512, int8 on AVX-512 with
 * BW, VL and VNNI (scores_int8, int8_quantize_row). */
static int cache_kind_available(int kind) {
#ifdef SELFHOST_X86
    if (kind == KV_INT8)
        return isa_limit >= 2 && cpu_has_avx512_bw_vl() && __builtin_cpu_supports("avx512vnni");
#endif
    return kind == 0 || (kind == 1 && isa_limit >= 2 && cpu_has_avx512());
}

static PyObject *narrow_cache_available(PyObject *self, PyObject *args) {
    (void)self;
    int kind;
    if (!PyArg_ParseTuple(args, "i", &kind)) return NULL;
    return PyBool_FromLong(cache_kind_available(kind));
}

/* Checks a job's sizes against this CPU's kernels; a message for a ValueError, or NULL. */
static const char *check_pairs(Job *whole) {
    if (whole->num_kv_heads <= 0 || whole->num_heads % whole->num_kv_heads != 0 || whole->head_dim <= 0 ||
        whole->block_size <= 0 || (whole->block_size & (whole->block_size - 1)) != 0 ||
        (whole->cos != NULL && whole->head_dim % 2 != 0))
        return "decode_attention: inconsistent head counts or sizes (block_size: a power of two)";
    whole->block_shift = __builtin_ctzll((unsigned long long)whole->block_size);
    whole->use_avx2 = isa_limit >= 1 && cpu_has_avx2();
    whole->use_avx512 = isa_limit >= 2 && cpu_has_avx512();
    whole->use_key_runs = whole->use_avx512 && cpu_has_avx512_bw_vl() && whole->head_dim % 16 == 0;
    if (whole->kv_kind < 0 || whole->kv_kind > 2 || (whole->kv_kind == 2 && !(whole->k_scales && whole->v_scales)))
        return "decode_attention: kv_kind is 0 (fp32), 1 (bf16) or 2 (int8, with its scales)";
    if (whole->kv_kind && !(cache_kind_available(whole->kv_kind) && whole->block_size % 16 == 0 &&
                            whole->head_dim % 16 == 0))
        return "decode_attention: a bf16 cache needs AVX-512 (int8: with BW and VNNI), head_dim and block_size % 16 == 0";
    return NULL;
}

/* A checked job over every (sequence, kv head) pair, without the GIL; -1 when scratch memory
 * could not be had. */
static int attend_pairs(Job *whole, Py_ssize_t num_seqs, int num_threads) {
    int failed = 0;
    whole->item_begin = 0;
    whole->item_end = whole->item_end_all = num_seqs * whole->num_kv_heads;
    whole->failed = &failed;
    long num_chunks = (long)((whole->item_end + PAIRS_PER_CHUNK - 1) / PAIRS_PER_CHUNK);
    int threads = num_threads < 1 ? 1 : num_threads;
    if (whole->store_first && whole->cos != NULL) {
#ifdef SELFHOST_X86
        pool_run(store_chunk, whole, num_chunks, threads); /* ../_cpu_pool.h; returns once every chunk is done */
#else
        for (long c = 0; c < num_chunks; c++) store_chunk(whole, c);
#endif
        whole->keys_stored = 1;
    }
    if (!failed) {
#ifdef SELFHOST_X86
        pool_run(run_chunk, whole, num_chunks, threads);
#else
        for (long c = 0; c < num_chunks; c++) run_chunk(whole, c);
#endif
    }
    (void)threads;
    return failed ? -1 : 0;
}

static PyObject *run_pairs(Job *whole, Py_ssize_t num_seqs, int num_threads) {
    const char *problem = check_pairs(whole);
    if (problem) {
        PyErr_SetString(PyExc_ValueError, problem);
        return NULL;
    }
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = attend_pairs(whole, num_seqs, num_threads);
    Py_END_ALLOW_THREADS
    if (status < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static Job rope_decode_job(const RopeDecodeStep *step) {
    Job whole = {.q = step->qkv, .k = step->k, .v = step->v, .kv_kind = step->kv_kind, .k_scales = step->k_scales,
                 .v_scales = step->v_scales, .tables = step->tables,
                 .lens = step->lens, .out = step->out, .num_heads = step->num_heads,
                 .num_kv_heads = step->num_kv_heads, .head_dim = step->head_dim, .block_size = step->block_size,
                 .num_blocks = step->num_blocks, .max_blocks = step->max_blocks, .scale = step->scale,
                 .softcap = step->softcap, .window = step->window, .cos = step->cos, .sin = step->sin,
                 .slots = step->slots, .k_cache = step->k, .v_cache = step->v, .store_first = step->store_first};
    return whole;
}

/* The fused decode step for the decode-step runner (../_kernel_capsules.h): -2 where the
 * sizes do not suit this CPU's kernels, -1 without scratch memory, 0 done. No GIL needed. */
static int rope_decode_step(const RopeDecodeStep *step) {
    Job whole = rope_decode_job(step);
    if (check_pairs(&whole) != NULL) return -2;
    return attend_pairs(&whole, step->num_seqs, step->num_threads);
}

static AttentionKernels kernels = {SELFHOST_KERNELS_VERSION, rope_decode_step};

static PyObject *decode_attention(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long q, k, v, tables, lens, out;
    Py_ssize_t num_seqs, num_heads, num_kv_heads, head_dim, block_size, num_blocks, max_blocks, window;
    float scale, softcap;
    int num_threads, kv_kind = 0;
    unsigned long long k_scales = 0, v_scales = 0;
    if (!PyArg_ParseTuple(args, "KKKKKKnnnnnnnffni|iKK", &q, &k, &v, &tables, &lens, &out, &num_seqs, &num_heads,
                          &num_kv_heads, &head_dim, &block_size, &num_blocks, &max_blocks, &scale, &softcap,
                          &window, &num_threads, &kv_kind, &k_scales, &v_scales))
        return NULL;
    Job whole = {.q = (const float *)q, .k = (const void *)k, .v = (const void *)v, .kv_kind = kv_kind,
                 .k_scales = (float *)k_scales, .v_scales = (float *)v_scales,
                 .tables = (const int64_t *)tables, .lens = (const int64_t *)lens, .out = (float *)out,
                 .num_heads = num_heads, .num_kv_heads = num_kv_heads, .head_dim = head_dim,
                 .block_size = block_size, .num_blocks = num_blocks, .max_blocks = max_blocks,
                 .scale = scale, .softcap = softcap, .window = window};
    return run_pairs(&whole, num_seqs, num_threads);
}

static PyObject *rope_decode_attention(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long qkv, cos, sin, slots, k, v, tables, lens, out;
    Py_ssize_t num_seqs, num_heads, num_kv_heads, head_dim, block_size, num_blocks, max_blocks, window;
    float scale, softcap;
    int num_threads, kv_kind = 0, store_first = 0;
    unsigned long long k_scales = 0, v_scales = 0;
    if (!PyArg_ParseTuple(args, "KKKKKKKKKnnnnnnnffni|ipKK", &qkv, &cos, &sin, &slots, &k, &v, &tables, &lens, &out,
                          &num_seqs, &num_heads, &num_kv_heads, &head_dim, &block_size, &num_blocks, &max_blocks,
                          &scale, &softcap, &window, &num_threads, &kv_kind, &store_first, &k_scales, &v_scales))
        return NULL;
    RopeDecodeStep step = {(const float *)qkv, (const float *)cos, (const float *)sin, (const int64_t *)slots,
                           (const int64_t *)tables, (const int64_t *)lens, (void *)k, (void *)v,
                           (float *)k_scales, (float *)v_scales, (float *)out,
                           num_seqs, num_heads, num_kv_heads, head_dim, block_size, num_blocks, max_blocks, window,
                           scale, softcap, num_threads, kv_kind, store_first};
    Job whole = rope_decode_job(&step);
    return run_pairs(&whole, num_seqs, num_threads);
}

/* A step's rotary and cache writes, for steps with prompt chunks (their attention then reads
 * the cache in place): every token's key rotated into its slot, its value copied, its query
 * heads rotated into q_out (T, H, D). The rotation is the decode step's, so a key is the same
 * whichever kind of step wrote it. */
static PyObject *rope_store(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long qkv, cos, sin, slots, k, v, q_out;
    Py_ssize_t num_tokens, num_heads, num_kv_heads, head_dim, block_size, num_blocks;
    int num_threads, kv_kind = 0;
    unsigned long long k_scales = 0, v_scales = 0;
    if (!PyArg_ParseTuple(args, "KKKKKKKnnnnnni|iKK", &qkv, &cos, &sin, &slots, &k, &v, &q_out, &num_tokens, &num_heads,
                          &num_kv_heads, &head_dim, &block_size, &num_blocks, &num_threads, &kv_kind, &k_scales,
                          &v_scales))
        return NULL;
    int failed = 0;
    Job whole = {.q = (const float *)qkv, .k = (const void *)k, .v = (const void *)v, .kv_kind = kv_kind,
                 .k_scales = (float *)k_scales, .v_scales = (float *)v_scales,
                 .num_heads = num_heads, .num_kv_heads = num_kv_heads, .head_dim = head_dim,
                 .block_size = block_size, .num_blocks = num_blocks, .cos = (const float *)cos,
                 .sin = (const float *)sin, .slots = (const int64_t *)slots, .k_cache = (void *)k,
                 .v_cache = (void *)v, .store_first = 1, .q_out = (float *)q_out, .failed = &failed};
    const char *problem = check_pairs(&whole);
    if (problem) {
        PyErr_SetString(PyExc_ValueError, problem);
        return NULL;
    }
    whole.item_end = num_tokens * num_kv_heads;
    long num_chunks = (long)((num_tokens + TOKENS_PER_STORE - 1) / TOKENS_PER_STORE);
    Py_BEGIN_ALLOW_THREADS
#ifdef SELFHOST_X86
    pool_run(store_tokens_chunk, &whole, num_chunks, num_threads < 1 ? 1 : num_threads);
#else
    for (long c = 0; c < num_chunks; c++) store_tokens_chunk(&whole, c);
    (void)num_threads;
#endif
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"narrow_cache_available", narrow_cache_available, METH_VARARGS,
     "narrow_cache_available(kv_kind): True when the kernels take a bf16 (1: AVX-512) or int8 (2: AVX-512 BW and "
     "VNNI) cache here, within the limit_isa cap."},
    {"decode_attention", decode_attention, METH_VARARGS,
     "Single-query attention over the paged cache (fp32 q/out; an fp32, bf16 or int8 cache by kv_kind 0/1/2, "
     "int8 with its k and v scales; data pointers)."},
    {"limit_isa", limit_isa, METH_VARARGS,
     "Cap the instruction set (2 AVX-512, 1 AVX2, 0 portable C); returns the previous cap. For tests."},
    {"rope_decode_attention", rope_decode_attention, METH_VARARGS,
     "A decode step's attention from the unrotated q/k/v projection: rotary, cache write and attention "
     "(store_first: every key and value written before any query attends)."},
    {"rope_store", rope_store, METH_VARARGS,
     "rope_store(qkv, cos, sin, slots, k, v, q_out, T, H, Hkv, D, block_size, num_blocks, num_threads, kv_kind, "
     "k_scales, v_scales): "
     "rotary on the step's q and k, keys and values into their cache slots, rotated queries into q_out."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_paged_attention_cpu", NULL, -1, methods};

PyMODINIT_FUNC PyInit__paged_attention_cpu(void) {
#ifdef SELFHOST_X86
    if (pool_import() < 0) return NULL; /* the process's one worker pool (../_cpu_pool.h) */
#endif
    PyObject *m = PyModule_Create(&module);
    if (m && kernels_export(m, "selfhost.engine._paged_attention_cpu._kernels", &kernels) < 0) Py_CLEAR(m);
    return m;
}
