/* y = x @ W^T with bf16 weights in the AMX tile layout: fp32 x and y, fp32 sums.
 *
 * Two products read the one packed copy of the weights:
 * - many rows (`linear`, prompts and batched decode): Intel AMX tiles where the CPU has
 *   them and the OS grants them; elsewhere the few-row kernel below (see `widened_product`);
 * - few rows (`linear_few_rows`, single-stream decode, which only streams weights):
 *   AVX-512 FMAs on the exact fp32 rows, each packed row widened in registers.
 * Which is faster for how many rows depends on the CPU: the caller measures it.
 *
 * Why AMX: one TDPBF16PS multiplies a 16x32 bf16 tile by a 32x16 one into 16x16
 * fp32 sums, 8192 multiply-adds in one instruction, about 16x what AVX-512 FMAs
 * give per cycle. PyTorch reaches the same units through oneDNN, but only with
 * bf16 inputs and bf16 outputs and with the weights reordered on every call; here
 * the weights are reordered once, at load (`pack`), the activations are rounded
 * to bf16 inside the call, and the sums leave the tiles as fp32, so a layer's
 * output is as exact as its bf16 weights allow.
 *
 * Packed layout (`pack`): W (N, K) bf16, zero-padded to N rounded up to 64
 * and K32 = K rounded up to 32, stored as blocks of 16 outputs x 32 inputs. Block
 * (nb, kb) is the B tile TDPBF16PS wants: row i holds, for each of the 16 outputs
 * n, the input pair (W[n][32kb + 2i], W[n][32kb + 2i + 1]). The blocks of one
 * 16-output group lie together, so a thread that owns some outputs streams one
 * contiguous stretch of memory.
 *
 * A call: the rows of x are rounded to bf16 into a zero-padded buffer (M rounded
 * up to 16, K32 wide) laid out as A tiles, 16 rows x 32 values contiguous (a tile
 * load from a strided row-major copy stalled the loop more than the products); then each chunk takes 32 outputs (two B tiles) and walks all
 * rows 32 at a time (two A tiles), 4 fp32 C tiles accumulating over K. The two B
 * tiles of a chunk stay in L1/L2 while every row passes, so each weight is read
 * from memory once per call whatever M is: bandwidth-bound for a decode step,
 * compute-bound for a prompt.
 *
 * Each chunk makes sure its thread has the tile configuration (../_amx_tiles.h).
 * Linux hands out AMX state only to processes that ask (arch_prctl
 * ARCH_REQ_XCOMP_PERM), done once when the module loads.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../_cpu_pool.h"
#include "../_kernel_capsules.h"

/* Outputs are padded (with zero weights) to a multiple of 64: whole chunks for both products. */
#define PACK_OUT 64

#include "../_amx_tiles.h"
#ifdef SELFHOST_AMX_TILES
#define SELFHOST_AMX 1
#define AMX AMX_TARGET
#include "../_exp_avx512.h"
#include "_row_argmax_avx512.h"
#include "_swiglu_avx512.h"

enum { TILE_ROWS = 16, TILE_K = 32, TILE_ELEMS = TILE_ROWS * TILE_K, OUT_PER_CHUNK = 32 };
/* From this many rows a chunk takes up to OUTPUTS_PER_ROW_PASS outputs (run_chunk). */
enum { MANY_ROWS = 128, OUTPUTS_PER_ROW_PASS = 512 };

typedef struct {
    const uint16_t *xb; /* Mp x K32 bf16, zero-padded, as (Mp/16, K32/32) tiles of 16 x 32 */
    const uint16_t *w;  /* packed, see above */
    const float *bias;  /* N or NULL */
    float *y;           /* (M, N) */
    Py_ssize_t M, N, K32, Mp;
    Py_ssize_t group_rows;    /* rows a chunk covers: a multiple of 32 whose bf16 copy fits a quarter of L2 */
    Py_ssize_t out_per_chunk; /* outputs a chunk covers: a multiple of 32 */
    Py_ssize_t out_chunks;    /* chunks across N per row group */
} Product;

typedef struct {
    const float *x;
    uint16_t *xb;
    Py_ssize_t M, K, K32;
} Rounding;

static int amx_ready;          /* set once, when the module loads */
static Py_ssize_t l2_bytes;     /* per core, as the C library reports it; set once, when the module loads */

/* Rows per group: the group's bf16 rows take about a quarter of L2, leaving room for the
 * weights streaming through and the outputs written; at least 32 rows (two A tiles). */
static Py_ssize_t group_rows_for(Py_ssize_t K32, Py_ssize_t Mp) {
    Py_ssize_t rows = (l2_bytes / 4) / (K32 * (Py_ssize_t)sizeof(uint16_t)) / 32 * 32;
    if (rows < 32) rows = 32;
    return rows < Mp ? rows : Mp;
}

/* Rows [16c, 16c + 16) of x to bf16 (round to nearest even), zeros past M and past K. */
AMX static void round_rows(const void *context, long chunk) {
    const Rounding *r = (const Rounding *)context;
    for (Py_ssize_t m = chunk * TILE_ROWS; m < (chunk + 1) * TILE_ROWS; m++) {
        /* row m's 32 values of block kb go to row m % 16 of tile (m / 16, kb) */
        uint16_t *out = r->xb + (m / TILE_ROWS) * r->K32 * TILE_ROWS + (m % TILE_ROWS) * TILE_K;
        const float *in = r->x + m * r->K;
        for (Py_ssize_t k = 0; k < r->K32; k += 32) {
            Py_ssize_t left = m < r->M ? r->K - k : 0;
            __mmask16 lo = left >= 16 ? 0xffff : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
            __mmask16 hi = left >= 32 ? 0xffff : left > 16 ? (__mmask16)((1u << (left - 16)) - 1) : 0;
            __m512 a = _mm512_maskz_loadu_ps(lo, in + k), b = _mm512_maskz_loadu_ps(hi, in + k + 16);
            _mm512_storeu_si512((void *)(out + k / TILE_K * TILE_ELEMS), (__m512i)_mm512_cvtne2ps_pbh(b, a));
        }
    }
}

/* C tile t holds rows [m, m+16) x outputs [n, n+16): to y, with bias, only what lies inside (M, N). */
#define STORE_TILE(t, m, n)                                                                          \
    do {                                                                                             \
        if (!p->bias && (m) + TILE_ROWS <= p->M && (n) + 16 <= p->N) {                               \
            _tile_stored(t, p->y + (m) * p->N + (n), (long)(p->N * sizeof(float)));                  \
        } else {                                                                                     \
            _tile_stored(t, staging, 64);                                                            \
            store_partial(p, staging, (m), (n));                                                     \
        }                                                                                            \
    } while (0)

AMX static void store_partial(const Product *p, const float *staging, Py_ssize_t m0, Py_ssize_t n0) {
    Py_ssize_t cols = p->N - n0 < 16 ? p->N - n0 : 16;
    if (cols <= 0) return;
    __mmask16 mask = (__mmask16)((1u << cols) - 1);
    __m512 bias = p->bias ? _mm512_maskz_loadu_ps(mask, p->bias + n0) : _mm512_setzero_ps();
    for (Py_ssize_t r = 0; r < TILE_ROWS && m0 + r < p->M; r++)
        _mm512_mask_storeu_ps(p->y + (m0 + r) * p->N + n0, mask, _mm512_add_ps(_mm512_loadu_ps(staging + 16 * r), bias));
}

/* The first pass over a chunk's rows reads its weights from memory, and a tile load waits for
 * all 16 of its lines: ask for the tiles two K blocks ahead into L1 and eight ahead into L2
 * (a batched decode step, 32 rows, took ~8% less time; past a chunk's end the addresses are
 * the next chunk's, harmless). Later passes find the tiles in L1/L2. */
AMX static inline __attribute__((always_inline)) void prefetch_weights(const uint16_t *b0, const uint16_t *b1,
                                                                       Py_ssize_t kb) {
    AMX_PREFETCH_TILE(b0 + (kb + 2) * TILE_ELEMS, _MM_HINT_T0);
    AMX_PREFETCH_TILE(b1 + (kb + 2) * TILE_ELEMS, _MM_HINT_T0);
    AMX_PREFETCH_TILE(b0 + (kb + 8) * TILE_ELEMS, _MM_HINT_T1);
    AMX_PREFETCH_TILE(b1 + (kb + 8) * TILE_ELEMS, _MM_HINT_T1);
}

/* C tiles 0-3 = rows a0 (and a1, unless `single`) x the 16 outputs of b0 and of b1, summed over
 * K's kblocks in order: tile 0 (a0, b0), 1 (a0, b1), 2 (a1, b0), 3 (a1, b1). `prefetch`: the first
 * pass over these weights (prefetch_weights). */
AMX static inline __attribute__((always_inline)) void multiply_into_tiles(const uint16_t *a0, const uint16_t *a1,
                                                                          const uint16_t *b0, const uint16_t *b1,
                                                                          Py_ssize_t kblocks, int single, int prefetch) {
    _tile_zero(0);
    _tile_zero(1);
    if (!single) {
        _tile_zero(2);
        _tile_zero(3);
    }
    for (Py_ssize_t kb = 0; kb < kblocks; kb++) {
        if (prefetch) prefetch_weights(b0, b1, kb);
        _tile_loadd(4, a0 + kb * TILE_ELEMS, 64);
        _tile_loadd(6, b0 + kb * TILE_ELEMS, 64);
        _tile_loadd(7, b1 + kb * TILE_ELEMS, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (!single) {
            _tile_loadd(5, a1 + kb * TILE_ELEMS, 64);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
}

/* Rows [m, m + 32) (or 16 with `single`) x outputs [n0, n0 + 32) over all of K into y. */
AMX static inline __attribute__((always_inline)) void tile_block(const Product *p, Py_ssize_t m, Py_ssize_t n0,
                                                                 int single, int prefetch, float *staging) {
    const Py_ssize_t kblocks = p->K32 / TILE_K;
    const uint16_t *b0 = p->w + (n0 / 16) * kblocks * TILE_ELEMS, *b1 = b0 + kblocks * TILE_ELEMS;
    const uint16_t *a0 = p->xb + m * p->K32; /* tiles of 16 rows */
    multiply_into_tiles(a0, a0 + TILE_ROWS * p->K32, b0, b1, kblocks, single, prefetch);
    STORE_TILE(0, m, n0);
    STORE_TILE(1, m, n0 + 16);
    if (!single) {
        STORE_TILE(2, m + TILE_ROWS, n0);
        STORE_TILE(3, m + TILE_ROWS, n0 + 16);
    }
}

/* A chunk: `out_per_chunk` outputs (32 at a time) for one group of rows. Chunks of the same row
 * group are numbered together, so threads working at the same time share that group's rows (in
 * L2/L3) and sweep the outputs. Each 32 rows meet all of the chunk's outputs before the next 32:
 * those rows' tiles stay in L1 while the outputs' weights come from L2, and y's rows are written
 * out_per_chunk x 4 bytes at a time instead of 128 (a tile store that touches 16 cold lines a
 * row apart cost more than the products: 1,450 against 2,150 GFLOP/s in a trial on one core).
 * The first pass over each 32 outputs reads their weights from memory and prefetches them. */
AMX static void run_chunk(const void *context, long chunk) {
    const Product *p = (const Product *)context;
    const Py_ssize_t n_begin = (Py_ssize_t)(chunk % p->out_chunks) * p->out_per_chunk;
    const Py_ssize_t n_end = n_begin + p->out_per_chunk < p->N ? n_begin + p->out_per_chunk : p->N;
    const Py_ssize_t m_begin = (Py_ssize_t)(chunk / p->out_chunks) * p->group_rows;
    const Py_ssize_t m_end = m_begin + p->group_rows < p->Mp ? m_begin + p->group_rows : p->Mp;
    float staging[TILE_ROWS * 16] __attribute__((aligned(64)));
    amx_configure();
    for (Py_ssize_t m = m_begin; m < m_end; m += 2 * TILE_ROWS)
        for (Py_ssize_t n0 = n_begin; n0 < n_end; n0 += OUT_PER_CHUNK)
            tile_block(p, m, n0, m + 2 * TILE_ROWS > m_end, m == m_begin, staging);
}


static Py_ssize_t round_up(Py_ssize_t v, Py_ssize_t to);

/* ---- few rows: AVX-512 on the packed layout ---------------------------------------
 * Row i of block (nb, kb) is 16 pairs (W[n][32kb+2i], W[n][32kb+2i+1]); a bf16 value is
 * the top half of an fp32, so the even members widen exactly as lane << 16 and the odd
 * as lane & 0xffff0000. Each then meets one broadcast x value per row: the 16 lanes are
 * 16 outputs, so sums need no horizontal reduction. A chunk is 4 blocks (64 outputs)
 * and walks the rows (run_few_rows_chunk); the chunk's weights stay in L2 across row passes. */
enum { FEW_BLOCKS = 4, PREFETCH_LINES = 32 };

typedef struct {
    const float *x; /* (M, K32): K32 == K, or a zero-padded copy */
    const uint16_t *w;
    const float *bias;
    float *y;
    Py_ssize_t M, N, K32;
    Py_ssize_t group_rows; /* the many-row driver's rows a chunk (run_wide_chunk) */
} FewRows;

#define FEW_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

/* Rows [m0, m0 + rows) x outputs of blocks [nb0, nb0 + blocks) over all of K. `rows`, `blocks` and
 * `stream` are constants at every call, so each call site compiles to its own fully unrolled kernel
 * with the sums in registers (rows x blocks of the 32 zmm registers). Every output's sum runs over K
 * in the same order whatever the rows and blocks of the pass: the same bits at any row count.
 * `stream`: the weights come from memory once (a few-row product), so each block's line is asked
 * for PREFETCH_LINES ahead; the many-row driver's stay in L1/L2 while its rows pass. */
FEW_AVX512 static inline __attribute__((always_inline)) void widened_kernel(const FewRows *p, int rows, int blocks,
                                                                            int stream, Py_ssize_t m0, Py_ssize_t nb0) {
    enum { MOST_ROWS = 12, MOST_BLOCKS = 4 };
    const Py_ssize_t kblocks = p->K32 / TILE_K;
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    __m512 acc[MOST_ROWS][MOST_BLOCKS];
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < blocks; c++) acc[r][c] = _mm512_setzero_ps();
    for (Py_ssize_t kb = 0; kb < kblocks; kb++) {
        const uint16_t *tile = p->w + (nb0 * kblocks + kb) * TILE_ELEMS;
        for (int i = 0; i < 16; i++) {
            __m512 even[MOST_BLOCKS], odd[MOST_BLOCKS];
            for (int c = 0; c < blocks; c++) {
                const uint16_t *line = tile + c * kblocks * TILE_ELEMS + i * 32;
                /* Few rows only stream the weights: ask for each block's line PREFETCH_LINES ahead */
                if (stream) _mm_prefetch((const char *)line + 64 * PREFETCH_LINES, _MM_HINT_T0);
                __m512i pairs = _mm512_loadu_si512((const void *)line);
                even[c] = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
                odd[c] = _mm512_castsi512_ps(_mm512_and_si512(pairs, high));
            }
            for (int r = 0; r < rows; r++) {
                const float *x = p->x + (m0 + r) * p->K32 + kb * TILE_K + 2 * i;
                __m512 xe = _mm512_set1_ps(x[0]), xo = _mm512_set1_ps(x[1]);
                for (int c = 0; c < blocks; c++) {
                    acc[r][c] = _mm512_fmadd_ps(xe, even[c], acc[r][c]);
                    acc[r][c] = _mm512_fmadd_ps(xo, odd[c], acc[r][c]);
                }
            }
        }
    }
    for (int c = 0; c < blocks; c++) {
        Py_ssize_t n0 = (nb0 + c) * 16, cols = p->N - n0 < 16 ? p->N - n0 : 16;
        if (cols <= 0) break;
        __mmask16 mask = (__mmask16)((1u << cols) - 1);
        __m512 bias = p->bias ? _mm512_maskz_loadu_ps(mask, p->bias + n0) : _mm512_setzero_ps();
        for (int r = 0; r < rows; r++)
            _mm512_mask_storeu_ps(p->y + (m0 + r) * p->N + n0, mask, _mm512_add_ps(acc[r][c], bias));
    }
}

/* 5..12 rows over two of the chunk's blocks at a time: rows x 2 sums and 4 widened vectors in registers. */
#define FEW_ROWS_CASE(n)                                                                  \
    case n:                                                                               \
        for (int half = 0; half < FEW_BLOCKS; half += 2) widened_kernel(p, n, 2, 1, m0, nb0 + half); \
        break;

/* A chunk's 64 outputs for every row: up to 4 rows in one pass over all 4 blocks, 5 to 12 rows in one
 * pass over each half, 12 at a time beyond. Each pass widens the chunk's weights again: 4 rows a pass
 * had widened a speculative verification's 9 rows three times (4 + 4 + 1), now once. */
FEW_AVX512 static void run_few_rows_chunk(const void *context, long chunk) {
    const FewRows *p = (const FewRows *)context;
    const Py_ssize_t nb0 = (Py_ssize_t)chunk * FEW_BLOCKS;
    for (Py_ssize_t m0 = 0; m0 < p->M;) {
        const int rows = p->M - m0 < 12 ? (int)(p->M - m0) : 12;
        switch (rows) {
            case 1: widened_kernel(p, 1, FEW_BLOCKS, 1, m0, nb0); break;
            case 2: widened_kernel(p, 2, FEW_BLOCKS, 1, m0, nb0); break;
            case 3: widened_kernel(p, 3, FEW_BLOCKS, 1, m0, nb0); break;
            case 4: widened_kernel(p, 4, FEW_BLOCKS, 1, m0, nb0); break;
            FEW_ROWS_CASE(5) FEW_ROWS_CASE(6) FEW_ROWS_CASE(7) FEW_ROWS_CASE(8)
            FEW_ROWS_CASE(9) FEW_ROWS_CASE(10) FEW_ROWS_CASE(11) FEW_ROWS_CASE(12)
        }
        m0 += rows;
    }
}

/* ---- many rows without AMX: the same widening, 12 rows x 32 outputs a pass -------------
 * The few-row kernel spends two widening instructions per weight pair on 4 rows (8 FMAs per
 * 2 of the ports' slots): ~80% of the FMA peak once rows abound. Twelve rows share each
 * widened pair (24 FMAs per 2), the sums of 12 x 2 blocks fill 24 registers. A chunk is 32
 * outputs of a group of rows; its weights (32 x K bf16) stay in L1/L2 while the group passes. */
enum { WIDE_ROWS = 12, WIDE_BLOCKS = 2 };

FEW_AVX512 static void run_wide_chunk(const void *context, long chunk) {
    const FewRows *p = (const FewRows *)context;
    const long out_chunks = (long)(round_up(p->N, 16 * WIDE_BLOCKS) / (16 * WIDE_BLOCKS));
    const Py_ssize_t nb0 = (Py_ssize_t)(chunk % out_chunks) * WIDE_BLOCKS;
    const Py_ssize_t m_begin = (Py_ssize_t)(chunk / out_chunks) * p->group_rows;
    const Py_ssize_t m_end = m_begin + p->group_rows < p->M ? m_begin + p->group_rows : p->M;
    Py_ssize_t m0 = m_begin;
    for (; m0 + WIDE_ROWS <= m_end; m0 += WIDE_ROWS) widened_kernel(p, WIDE_ROWS, WIDE_BLOCKS, 0, m0, nb0);
    /* what is left: 8 and 4 rows (a 32-row decode batch is 12 + 12 + 8), then one at a time */
    for (; m0 + 8 <= m_end; m0 += 8) widened_kernel(p, 8, WIDE_BLOCKS, 0, m0, nb0);
    for (; m0 + 4 <= m_end; m0 += 4) widened_kernel(p, 4, WIDE_BLOCKS, 0, m0, nb0);
    for (; m0 < m_end; m0++) widened_kernel(p, 1, WIDE_BLOCKS, 0, m0, nb0);
}

static int few_rows_ready; /* AVX-512 F/BW/VL; set once, when the module loads */


/* y = x @ W^T (+ bias) for rows of K32 inputs (a multiple of 32), without the GIL: also the
 * decode-step runner's (../_kernel_capsules.h). */
static void few_rows_product(const float *x, const uint16_t *w, const float *bias, float *y, Py_ssize_t M,
                             Py_ssize_t N, Py_ssize_t K32, int num_threads) {
    const int threads = num_threads < 1 ? 1 : num_threads;
    if (M < 2 * WIDE_ROWS) {
        FewRows p = {x, w, bias, y, M, N, K32, 0};
        pool_run(run_few_rows_chunk, &p, (long)(round_up(N, PACK_OUT) / (16 * FEW_BLOCKS)), threads);
        return;
    }
    /* Many rows: the 12-row passes (run_wide_chunk). Every output's sum runs over K in the same order
     * with the same FMAs in both drivers, so the bits do not depend on which one a row count takes.
     * A group's rows take about a quarter of L2 (as group_rows_for's tiles do), 12 at least. */
    Py_ssize_t group = (l2_bytes / 4) / (K32 * (Py_ssize_t)sizeof(float)) / WIDE_ROWS * WIDE_ROWS;
    if (group < WIDE_ROWS) group = WIDE_ROWS;
    FewRows p = {x, w, bias, y, M, N, K32, group};
    const long chunks = (long)(round_up(N, 16 * WIDE_BLOCKS) / (16 * WIDE_BLOCKS) * ((M + group - 1) / group));
    pool_run(run_wide_chunk, &p, chunks, threads);
}

/* y = x @ W^T (+ bias) on the widening kernels for any M (K need not be a multiple of 32): also the
 * many-row product of CPUs with AVX-512 but no AMX. Widening each weight pair costs two
 * instructions for every 2 x rows FMAs, so with 12 rows a pass it runs near the fp32 FMA peak
 * (~300-380 of ~400 GFLOP/s on two Xeon cores without AMX, 2026-12-07), where torch's bf16 matmul
 * reached ~170 and VDPBF16PS itself half the FMA rate (100 against 200 GFLOP/s a core, measured);
 * the activations stay exact. -1 without memory for the zero-padded copy. */
static int widened_product(const float *x, const uint16_t *w, const float *bias, float *y, Py_ssize_t M,
                           Py_ssize_t N, Py_ssize_t K, int num_threads) {
    const Py_ssize_t K32 = round_up(K, 32);
    float *padded = NULL; /* the kernel reads whole blocks of 32 inputs: past K it must read zeros */
    if (K32 != K) {
        padded = calloc((size_t)(M * K32), sizeof(float));
        if (!padded) return -1;
        for (Py_ssize_t m = 0; m < M; m++) memcpy(padded + m * K32, x + m * K, (size_t)K * sizeof(float));
    }
    few_rows_product(padded ? padded : x, w, bias, y, M, N, K32, num_threads);
    free(padded);
    return 0;
}

/* x's M rows rounded to bf16 as A tiles (Mp x K32, zero-padded); NULL without memory. */
static uint16_t *rounded_tiles(const float *x, Py_ssize_t M, Py_ssize_t K, int threads) {
    const Py_ssize_t K32 = round_up(K, 32), Mp = round_up(M, TILE_ROWS);
    uint16_t *xb = aligned_alloc(64, (size_t)(Mp * K32) * sizeof(uint16_t) + 64);
    if (!xb) return NULL;
    Rounding rounding = {x, xb, M, K, K32};
    pool_run(round_rows, &rounding, (long)(Mp / TILE_ROWS), threads);
    return xb;
}

/* y = xb @ W^T (+ bias) for A tiles already rounded (K32 wide). */
static void product_of_tiles(const uint16_t *xb, const uint16_t *w, const float *bias, float *y, Py_ssize_t M,
                             Py_ssize_t N, Py_ssize_t K32, int threads) {
    const Py_ssize_t Mp = round_up(M, TILE_ROWS), group_rows = group_rows_for(K32, Mp);
    /* Few rows (a decode batch) stream the weights once: 32 outputs a chunk keeps the threads
     * balanced. Many rows: up to OUTPUTS_PER_ROW_PASS outputs a chunk (see run_chunk), while
     * leaving a few chunks per thread. */
    Py_ssize_t out_per_chunk = OUT_PER_CHUNK;
    if (Mp >= MANY_ROWS) {
        const Py_ssize_t groups = (Mp + group_rows - 1) / group_rows, pairs = round_up(N, OUT_PER_CHUNK) / OUT_PER_CHUNK;
        Py_ssize_t per_chunk = pairs * groups / (4 * (Py_ssize_t)threads);
        if (per_chunk > OUTPUTS_PER_ROW_PASS / OUT_PER_CHUNK) per_chunk = OUTPUTS_PER_ROW_PASS / OUT_PER_CHUNK;
        if (per_chunk > 1) out_per_chunk = per_chunk * OUT_PER_CHUNK;
    }
    const Py_ssize_t out_chunks = (N + out_per_chunk - 1) / out_per_chunk;
    Product p = {xb, w, bias, y, M, N, K32, Mp, group_rows, out_per_chunk, out_chunks};
    pool_run(run_chunk, &p, (long)(out_chunks * ((Mp + group_rows - 1) / group_rows)), threads);
}

/* y = x @ W^T (+ bias) on AMX tiles, x rounded to bf16; M, N > 0. Without the GIL; -1 when the
 * rounded copy of x could not be had. Also the decode-step runner's (../_kernel_capsules.h). */
static int tiles_product(const float *x, const uint16_t *w, const float *bias, float *y, Py_ssize_t M, Py_ssize_t N,
                         Py_ssize_t K, int num_threads) {
    int threads = num_threads < 1 ? 1 : num_threads;
    uint16_t *xb = rounded_tiles(x, M, K, threads);
    if (!xb) return -1;
    product_of_tiles(xb, w, bias, y, M, N, round_up(K, 32), threads);
    free(xb);
    return 0;
}

/* ---- a SwiGLU MLP on tiles: down(silu(gate(x)) * up(x)) ------------------------------------
 * The gate|up product's fp32 output (rows x 2I) was written out, read back by the SwiGLU pass,
 * whose fp32 result was read again to round it into the down product's A tiles: at a 1024-row
 * prompt chunk and I = 1536, ~50 MB of traffic a layer for 3 MB of result. Here a chunk takes
 * 16 gate and the matching 16 up outputs (two B tiles), applies silu(g) * u to the C tiles as
 * they leave the tile registers and rounds the result straight into the down product's A
 * tiles. The sums, the activation (_swiglu_avx512.h) and the rounding (to nearest even) are the
 * separate passes' own, so the output has the same bits. */
typedef struct {
    const uint16_t *xb; /* the input rows as A tiles (Mp x K32) */
    const uint16_t *w;  /* gate|up, packed: gate outputs [0, I), up outputs [I, 2I) */
    const float *scale; /* NULL, or (2I,) factors of gate|up's sums (int8 weights' row scales) */
    uint16_t *act;      /* out: silu(gate) * up as A tiles (Mp x I) */
    Py_ssize_t I, K32, Mp, group_rows, act_blocks; /* act_blocks = I / 32 */
} SwiGluProduct;

/* silu(g) * u of C tiles g, u (16 rows x 16 outputs, in staging), each output times its factor in
 * gs, us where given (NULL: none), to bf16 into the 16-column half `half` of act tile (row tile, block). */
AMX static inline __attribute__((always_inline)) void swiglu_into_tile(const float *g, const float *u, const float *gs,
                                                                       const float *us, uint16_t *tile, int half) {
    const __m512 gscale = gs ? _mm512_loadu_ps(gs) : _mm512_set1_ps(1.0f), uscale = us ? _mm512_loadu_ps(us) : gscale;
    for (int r = 0; r < TILE_ROWS; r++) {
        __m512 gate = _mm512_load_ps(g + 16 * r), up = _mm512_load_ps(u + 16 * r);
        if (gs) gate = _mm512_mul_ps(gate, gscale), up = _mm512_mul_ps(up, uscale); /* as linear's scaling pass */
        __m512 a = silu_times(gate, up);
        _mm256_store_si256((__m256i *)(tile + r * TILE_K + 16 * half), (__m256i)_mm512_cvtneps_pbh(a));
    }
}

/* One group of rows x 32 act columns (block t): gate/up outputs 32t..32t+31 in two halves. */
AMX static void run_swiglu_chunk(const void *context, long chunk) {
    const SwiGluProduct *p = (const SwiGluProduct *)context;
    const Py_ssize_t kblocks = p->K32 / TILE_K, up_offset = p->I / 16; /* 16-output blocks from gate to up */
    const Py_ssize_t t = (Py_ssize_t)(chunk % p->act_blocks);
    const Py_ssize_t m_begin = (Py_ssize_t)(chunk / p->act_blocks) * p->group_rows;
    const Py_ssize_t m_end = m_begin + p->group_rows < p->Mp ? m_begin + p->group_rows : p->Mp;
    float staging[4][TILE_ROWS * 16] __attribute__((aligned(64)));
    amx_configure();
    for (int half = 0; half < 2; half++) {
        const Py_ssize_t j = 2 * t + half; /* gate block j, up block j + I/16 */
        const uint16_t *b0 = p->w + j * kblocks * TILE_ELEMS, *b1 = p->w + (j + up_offset) * kblocks * TILE_ELEMS;
        const float *gs = p->scale ? p->scale + 16 * j : NULL, *us = p->scale ? p->scale + 16 * (j + up_offset) : NULL;
        for (Py_ssize_t m = m_begin; m < m_end; m += 2 * TILE_ROWS) {
            const int pair = m + 2 * TILE_ROWS <= m_end; /* else one 16-row tile left */
            const uint16_t *a0 = p->xb + m * p->K32;
            multiply_into_tiles(a0, a0 + TILE_ROWS * p->K32, b0, b1, kblocks, !pair, m == m_begin);
            _tile_stored(0, staging[0], 64);
            _tile_stored(1, staging[1], 64);
            uint16_t *tile = p->act + (m / TILE_ROWS) * p->I * TILE_ROWS + t * TILE_ELEMS;
            swiglu_into_tile(staging[0], staging[1], gs, us, tile, half);
            if (pair) {
                _tile_stored(2, staging[2], 64);
                _tile_stored(3, staging[3], 64);
                swiglu_into_tile(staging[2], staging[3], gs, us, tile + p->I * TILE_ROWS, half);
            }
        }
    }
}

/* y = down(silu(gate(x)) * up(x)) (+ down bias) for M > 0 rows of K inputs; I % 32 == 0 and the
 * gate|up product without bias. y may be x (x is read whole into tiles first). -1 without
 * memory. Also the decode-step runner's (../_kernel_capsules.h). */
static int swiglu_product(const float *x, const uint16_t *gate_up, const float *gate_up_scale, const uint16_t *down,
                          const float *down_bias, float *y, Py_ssize_t M, Py_ssize_t I, Py_ssize_t K, int num_threads) {
    const int threads = num_threads < 1 ? 1 : num_threads;
    const Py_ssize_t K32 = round_up(K, 32), Mp = round_up(M, TILE_ROWS);
    uint16_t *xb = rounded_tiles(x, M, K, threads);
    uint16_t *act = aligned_alloc(64, (size_t)(Mp * I) * sizeof(uint16_t) + 64);
    if (!xb || !act) {
        free(xb), free(act);
        return -1;
    }
    const Py_ssize_t group_rows = group_rows_for(K32, Mp);
    SwiGluProduct p = {xb, gate_up, gate_up_scale, act, I, K32, Mp, group_rows, I / 32};
    pool_run(run_swiglu_chunk, &p, (long)(p.act_blocks * ((Mp + group_rows - 1) / group_rows)), threads);
    product_of_tiles(act, down, down_bias, y, M, K, I, threads);
    free(xb), free(act);
    return 0;
}

static Bf16TileKernels kernels = {SELFHOST_KERNELS_VERSION, widened_product, NULL, NULL};

#endif /* SELFHOST_AMX */

static Py_ssize_t round_up(Py_ssize_t v, Py_ssize_t to) { return (v + to - 1) / to * to; }


static PyObject *available(PyObject *self, PyObject *args) {
    (void)self, (void)args;
#ifdef SELFHOST_AMX
    return PyBool_FromLong(few_rows_ready);
#else
    Py_RETURN_FALSE;
#endif
}

static PyObject *amx_available(PyObject *self, PyObject *args) {
    (void)self, (void)args;
#ifdef SELFHOST_AMX
    return PyBool_FromLong(amx_ready);
#else
    Py_RETURN_FALSE;
#endif
}

static PyObject *few_rows_available(PyObject *self, PyObject *args) {
    (void)self, (void)args;
#ifdef SELFHOST_AMX
    return PyBool_FromLong(few_rows_ready);
#else
    Py_RETURN_FALSE;
#endif
}

static PyObject *packed_size(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t N, K;
    if (!PyArg_ParseTuple(args, "nn", &N, &K)) return NULL;
    if (N < 0 || K < 0) {
        PyErr_SetString(PyExc_ValueError, "packed_size: negative size");
        return NULL;
    }
    return PyLong_FromSsize_t(round_up(N, PACK_OUT) * round_up(K, 32));
}

static PyObject *pack(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long w, packed;
    Py_ssize_t N, K;
    if (!PyArg_ParseTuple(args, "KKnn", &w, &packed, &N, &K)) return NULL;
    if (N < 0 || K < 0) {
        PyErr_SetString(PyExc_ValueError, "pack: negative size");
        return NULL;
    }
    const uint16_t *src = (const uint16_t *)w;
    uint16_t *dst = (uint16_t *)packed;
    const Py_ssize_t N16 = round_up(N, PACK_OUT), K32 = round_up(K, 32), kblocks = K32 / 32;
    for (Py_ssize_t nb = 0; nb < N16 / 16; nb++)
        for (Py_ssize_t kb = 0; kb < kblocks; kb++)
            for (Py_ssize_t i = 0; i < 16; i++)
                for (Py_ssize_t n = 0; n < 16; n++)
                    for (Py_ssize_t j = 0; j < 2; j++) {
                        Py_ssize_t row = nb * 16 + n, col = kb * 32 + 2 * i + j;
                        dst[((nb * kblocks + kb) * 16 + i) * 32 + 2 * n + j] =
                            row < N && col < K ? src[row * K + col] : 0;
                    }
    Py_RETURN_NONE;
}

static PyObject *linear(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x, w, bias, y;
    Py_ssize_t M, N, K;
    int num_threads;
    if (!PyArg_ParseTuple(args, "KKKKnnni", &x, &w, &bias, &y, &M, &N, &K, &num_threads)) return NULL;
#ifdef SELFHOST_AMX
    if (!few_rows_ready) {
        PyErr_SetString(PyExc_RuntimeError, "linear: this CPU or kernel does not offer AVX-512");
        return NULL;
    }
    if (M < 0 || N < 0 || K < 0 || N >= ((Py_ssize_t)1 << 31) * OUT_PER_CHUNK) {
        PyErr_SetString(PyExc_ValueError, "linear: sizes out of range");
        return NULL;
    }
    if (M == 0 || N == 0) Py_RETURN_NONE;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = kernels.linear((const float *)x, (const uint16_t *)w, bias ? (const float *)bias : NULL, (float *)y, M,
                            N, K, num_threads);
    Py_END_ALLOW_THREADS
    if (status < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
#else
    (void)x, (void)w, (void)bias, (void)y, (void)M, (void)N, (void)K, (void)num_threads;
    PyErr_SetString(PyExc_RuntimeError, "linear: built without AMX support");
    return NULL;
#endif
}


static PyObject *linear_few_rows(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x, w, bias, y;
    Py_ssize_t M, N, K;
    int num_threads;
    if (!PyArg_ParseTuple(args, "KKKKnnni", &x, &w, &bias, &y, &M, &N, &K, &num_threads)) return NULL;
#ifdef SELFHOST_AMX
    if (!few_rows_ready) {
        PyErr_SetString(PyExc_RuntimeError, "linear_few_rows: this CPU or kernel does not offer AVX-512");
        return NULL;
    }
    if (M < 0 || N < 0 || K < 0 || N >= ((Py_ssize_t)1 << 31) * 16) {
        PyErr_SetString(PyExc_ValueError, "linear_few_rows: sizes out of range");
        return NULL;
    }
    if (M == 0 || N == 0) Py_RETURN_NONE;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = widened_product((const float *)x, (const uint16_t *)w, bias ? (const float *)bias : NULL, (float *)y, M,
                             N, K, num_threads);
    Py_END_ALLOW_THREADS
    if (status < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
#else
    (void)x, (void)w, (void)bias, (void)y, (void)M, (void)N, (void)K, (void)num_threads;
    PyErr_SetString(PyExc_RuntimeError, "linear_few_rows: built without AVX-512 support");
    return NULL;
#endif
}

/* linear_few_rows(), then each row's argmax (_row_argmax_avx512.h) as a list: a greedy decode step's
 * tokens from a bf16 head (engine/decode_head.py). */
static PyObject *linear_few_rows_argmax(PyObject *self, PyObject *args) {
    PyObject *none = linear_few_rows(self, args);
    if (!none) return NULL;
    Py_DECREF(none);
#ifdef SELFHOST_AMX
    unsigned long long x, w, bias, y;
    Py_ssize_t M, N, K;
    int num_threads;
    if (!PyArg_ParseTuple(args, "KKKKnnni", &x, &w, &bias, &y, &M, &N, &K, &num_threads)) return NULL;
    return rows_argmax((const float *)y, M, N);
#else
    return NULL; /* linear_few_rows() raised */
#endif
}

static PyObject *swiglu_mlp(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x, gate_up, down, down_bias, y;
    Py_ssize_t M, I, K;
    int num_threads;
    if (!PyArg_ParseTuple(args, "KKKKKnnni", &x, &gate_up, &down, &down_bias, &y, &M, &I, &K, &num_threads)) return NULL;
#ifdef SELFHOST_AMX
    if (!amx_ready) {
        PyErr_SetString(PyExc_RuntimeError, "swiglu_mlp: this CPU or kernel does not offer AMX");
        return NULL;
    }
    if (M < 0 || I <= 0 || I % 32 || K <= 0 || K % 32) {
        PyErr_SetString(PyExc_ValueError, "swiglu_mlp: the intermediate and hidden sizes must be multiples of 32");
        return NULL;
    }
    if (M == 0) Py_RETURN_NONE;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = swiglu_product((const float *)x, (const uint16_t *)gate_up, NULL, (const uint16_t *)down,
                            down_bias ? (const float *)down_bias : NULL, (float *)y, M, I, K, num_threads);
    Py_END_ALLOW_THREADS
    if (status < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
#else
    (void)x, (void)gate_up, (void)down, (void)down_bias, (void)y, (void)M, (void)I, (void)K, (void)num_threads;
    PyErr_SetString(PyExc_RuntimeError, "swiglu_mlp: built without AMX support");
    return NULL;
#endif
}

static PyMethodDef methods[] = {
    {"available", available, METH_NOARGS, "True when the layout's products run here (AVX-512 F/BW/VL; AMX is used where granted)."},
    {"amx_available", amx_available, METH_NOARGS, "True when this CPU has AMX-BF16, the OS granted it, and the kernel was built for it."},
    {"few_rows_available", few_rows_available, METH_NOARGS, "True when `linear_few_rows` can run here (AVX-512 F/BW/VL)."},
    {"packed_size", packed_size, METH_VARARGS, "packed_size(N, K) -> bf16 values `pack` writes for an (N, K) weight."},
    {"pack", pack, METH_VARARGS, "pack(w, packed, N, K): bf16 (N, K) weight -> the tile layout `linear` reads."},
    {"linear", linear, METH_VARARGS,
     "linear(x, packed_w, bias_or_0, y, M, N, K, num_threads): y = x @ W^T (+ bias) on AMX, x rounded to bf16 "
     "(without AMX: the few-row kernel, x exact)."},
    {"linear_few_rows_argmax", linear_few_rows_argmax, METH_VARARGS,
     "linear_few_rows(), then each row's first largest value's index (the first NaN's), as a list."},
    {"linear_few_rows", linear_few_rows, METH_VARARGS,
     "linear_few_rows(x, packed_w, bias_or_0, y, M, N, K, num_threads): the same product on AVX-512, x exact."},
    {"swiglu_mlp", swiglu_mlp, METH_VARARGS,
     "swiglu_mlp(x, gate_up_w, down_w, down_bias_or_0, y, M, I, K, num_threads): y = down(silu(gate(x)) * up(x)) "
     "on AMX, packed weights, gate|up without bias; the same bits as the three separate passes."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_bf16_tiles_cpu", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__bf16_tiles_cpu(void) {
#ifdef SELFHOST_AMX
    if (pool_import() < 0) return NULL; /* the process's one worker pool (../_cpu_pool.h) */
    __builtin_cpu_init();
    few_rows_ready = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                     __builtin_cpu_supports("avx512vl");
    amx_ready = few_rows_ready && amx_request();
    long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    l2_bytes = l2 > 0 ? l2 : 1 << 20; /* unknown: assume 1 MiB, common to recent server cores */
#endif
    PyObject *m = PyModule_Create(&module);
#ifdef SELFHOST_AMX
    kernels.linear = amx_ready ? tiles_product : widened_product; /* many rows */
    kernels.swiglu = amx_ready ? swiglu_product : NULL;
    if (m && few_rows_ready && kernels_export(m, "selfhost.layers._bf16_tiles_cpu._kernels", &kernels) < 0) Py_CLEAR(m);
#endif
    return m;
}
