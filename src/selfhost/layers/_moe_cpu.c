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
 *
 * int8 experts (quant/int8.py's Int8Linear: int8 (N, K) rows, one fp32 scale per row) have no
 * kernel module to borrow (quant/_int8_cpu.c lends none), so their products live here, with
 * _int8_cpu.c's arithmetic: each activation row quantized to int8 in blocks of 32 values (one
 * fp32 scale a block), every block's 32 products summed exactly in int32 as eight four-product
 * lanes, the lanes scaled into fp32 accumulators by fused multiply-adds, summed in the same
 * tree and scaled by the row's weight scale; the same bits as Int8Linear's avx2 kernel, on
 * AVX-512 VNNI (vpdpbusd for the lanes), AVX2 (vpmaddubsw + vpmaddwd) or portable C. Rather
 * than a product per expert, a step's chosen experts share two trips to the thread pool: every
 * expert's gate_up rows in chunks, then (after SwiGLU and the activations' quantization) every
 * expert's down rows; a decode step's two experts thus stream their weights on all threads.
 * An int8 expert with many rows (a prompt's) leaves the dots: with AMX, from INT8_WIDENED_ROWS, for
 * the bf16 tile kernels, its integers widened, exact, into their layout (int8_widened_experts);
 * without AMX, from INT8_VNNI_ROWS (2), for a register-blocked VNNI kernel on the same int8 blocks
 * (../quant/_int8_rows_vnni.h), equal to the dots within fp32 summation order.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../_kernel_capsules.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SELFHOST_X86 1
#include <immintrin.h>

#include "../quant/_int8_block_avx2.h"
#include "../quant/_int8_rows_vnni.h"
#else
#define VNNI_STRIP 32 /* the VNNI kernel's strip width; it runs on x86-64 only */
#endif
#include "../_cpu_pool.h"
#include "../quant/_int8_widened_avx512.h"

static const ActivationKernels *activation;
static const Bf16TileKernels *tiles;
static const GemmKernels *gemm;

static int have_pool; /* selfhost._cpu_pool imported: the int8 products' threads */

/* The experts' product kind (moe.py's EXPERT_KINDS). */
enum { BF16_TILES, FP32, INT8, KINDS };
/* A row of the experts table: the gate_up and down weights' addresses, and their per-row scales
 * (int8; 0 for the other kinds). */
enum { GATE_UP_W, DOWN_W, GATE_UP_SCALES, DOWN_SCALES, EXPERT_FIELDS };

#define PTR(type, value) ((type)(uintptr_t)(value))

static int cpu_level(void);

static int kind_available(int kind) {
    if (kind == INT8) return have_pool && cpu_level() >= 1; /* x86-64 with AVX2: where it is fast */
    if (!activation) return 0;
    return kind == BF16_TILES ? tiles != NULL : kind == FP32 ? gemm != NULL : 0;
}

/* y = x @ W^T as the expert's module would compute it; -1 without memory. */
static int product(int kind, Py_ssize_t few_rows_max, const float *x, int64_t w, float *y, Py_ssize_t M,
                   Py_ssize_t N, Py_ssize_t K, int num_threads) {
    if (kind == BF16_TILES) {
        if (M > few_rows_max) return tiles->linear(x, PTR(const uint16_t *, w), NULL, y, M, N, K, num_threads);
        return tiles->linear_few_rows(x, PTR(const uint16_t *, w), NULL, y, M, N, K, num_threads);
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

/* ---- int8 experts: _int8_cpu.c's arithmetic, sizes in multiples of QBLOCK ---- */

#define QBLOCK 32
#define TILE 4          /* weight rows a dot tile reads together */
#define CHUNK_ROWS 128  /* activation rows each weight tile meets while it sits in L1 */
#define CHUNK_N 256     /* weight rows per unit of work handed to the pool (a multiple of TILE) */
#define PREFETCH_BYTES 16384

/* The widest instructions the int8 products may use: 2 AVX-512 VNNI, 1 AVX2, 0 portable C.
 * Tests lower it to check every path on one machine (all give the same bits). */
static int isa_limit = 2;

static int cpu_level(void) {
    static int level = -1; /* asked once */
    if (level >= 0) return level;
    level = 0;
#ifdef SELFHOST_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma"))
        level = 2;
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        level = 1;
#endif
    return level;
}

/* `rows` (1..TILE) weight rows of length K from w against one quantized activation row; `rows` dots
 * out. `prefetch`: the first activation row of a chunk pulls in the weights that follow. */
typedef void (*dot_tile_fn)(const int8_t *xq, const float *xscale, const int8_t *w, Py_ssize_t K, int rows,
                            int prefetch, float *dots);
typedef void (*quantize_fn)(const float *x, Py_ssize_t M, Py_ssize_t K, int8_t *xq, float *xscale);

/* Portable C, lane for lane what the vector paths do: eight int32 lanes of four products per
 * block, each lane's fp32 accumulator advanced by fmaf, the lanes summed in hsum_avx2's tree. */
static void quantize_rows_c(const float *x, Py_ssize_t M, Py_ssize_t K, int8_t *xq, float *xscale) {
    for (Py_ssize_t b = 0; b < M * (K / QBLOCK); b++) {
        const float *xb = x + b * QBLOCK;
        float amax = 0.0f;
        for (int i = 0; i < QBLOCK; i++) amax = fmaxf(amax, fabsf(xb[i]));
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        for (int i = 0; i < QBLOCK; i++) xq[b * QBLOCK + i] = (int8_t)lrintf(xb[i] * inv);
        xscale[b] = amax / 127.0f;
    }
}

static void dot_tile_c(const int8_t *xq, const float *xscale, const int8_t *w, Py_ssize_t K, int rows, int prefetch,
                       float *dots) {
    (void)prefetch;
    for (int r = 0; r < rows; r++) {
        const int8_t *wr = w + r * K;
        float acc[8] = {0};
        for (Py_ssize_t b = 0; b < K / QBLOCK; b++)
            for (int lane = 0; lane < 8; lane++) {
                int32_t p = 0;
                for (int i = 4 * lane; i < 4 * lane + 4; i++) p += (int32_t)xq[b * QBLOCK + i] * wr[b * QBLOCK + i];
                acc[lane] = fmaf((float)p, xscale[b], acc[lane]);
            }
        dots[r] = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    }
}

#ifdef SELFHOST_X86
/* As _int8_cpu.c's quantize_rows_avx2: the same blocks (../quant/_int8_block_avx2.h). */
__attribute__((target("avx2,fma"))) static void quantize_rows_avx2(const float *x, Py_ssize_t M, Py_ssize_t K,
                                                                   int8_t *xq, float *xscale) {
    for (Py_ssize_t b = 0; b < M * (K / QBLOCK); b++) xscale[b] = quantize_block32_avx2(x + b * QBLOCK, xq + b * QBLOCK);
}

__attribute__((target("avx2,fma"))) static inline float hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* One block's eight lanes of four products: |x| times w carrying x's sign (both in [-127, 127], so
 * neither vpmaddubsw's int16 pairs nor vpdpbusd's lanes can overflow: the same integers). */
#define SELFHOST_LANES_AVX2(ax, sw) _mm256_madd_epi16(_mm256_maddubs_epi16((ax), (sw)), _mm256_set1_epi16(1))
#define SELFHOST_LANES_VNNI(ax, sw) _mm256_dpbusd_epi32(_mm256_setzero_si256(), (ax), (sw))

#define SELFHOST_DOT_TILE(name, target_isa, lanes)                                                               \
    __attribute__((target(target_isa))) static void name(const int8_t *xq, const float *xscale, const int8_t *w, \
                                                         Py_ssize_t K, int rows, int prefetch, float *dots) {    \
        __m256 acc[TILE] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()}; \
        for (Py_ssize_t b = 0; b < K / QBLOCK; b++) {                                                            \
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + b * QBLOCK));                           \
            const __m256i ax = _mm256_abs_epi8(xv);                                                              \
            const __m256 d = _mm256_broadcast_ss(xscale + b);                                                    \
            for (int r = 0; r < TILE; r++) {                                                                     \
                if (r >= rows) break;                                                                            \
                const int8_t *wb = w + r * K + b * QBLOCK;                                                       \
                if (prefetch) _mm_prefetch((const char *)(wb + PREFETCH_BYTES), _MM_HINT_T0);                    \
                const __m256i p = lanes(ax, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)wb), xv));      \
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), d, acc[r]);                                      \
            }                                                                                                    \
        }                                                                                                        \
        for (int r = 0; r < rows; r++) dots[r] = hsum_avx2(acc[r]);                                              \
    }

SELFHOST_DOT_TILE(dot_tile_avx2, "avx2,fma", SELFHOST_LANES_AVX2)
SELFHOST_DOT_TILE(dot_tile_vnni, "avx2,fma,avx512vl,avx512vnni", SELFHOST_LANES_VNNI)
#undef SELFHOST_DOT_TILE
#endif /* SELFHOST_X86 */

static int int8_level(void) {
    const int level = cpu_level();
    return level < isa_limit ? level : isa_limit;
}

/* The chosen experts' products of one kind (gate_up or down) as one job for the pool, on the dots
 * (int8_unit: unit c is weight rows [chunk * CHUNK_N, ...) of expert items[2c], chunk items[2c + 1])
 * or on the VNNI kernel (vnni_unit below: unit c is a strip of 32 outputs), against that expert's
 * rows, which are slots starts[e] .. starts[e + 1] of out (rows grouped by expert). */
typedef struct {
    const int8_t *xq;          /* quantized activation rows, K each (the dots) */
    const uint8_t *xu;         /* the same offset to unsigned (the VNNI kernel; NULL where it does not run) */
    const float *xscale;       /* K / QBLOCK scales a row */
    const Py_ssize_t *sources; /* slot -> activation row (NULL: the slot itself) */
    const int64_t *table;
    int weight_field, scales_field;
    const Py_ssize_t *starts;
    const Py_ssize_t *items;
    float *out; /* (slots, N) */
    Py_ssize_t N, K;
    dot_tile_fn dot_tile;
    int failed; /* a VNNI unit found no memory */
} Int8Job;

/* Expert e's int8 weight rows and their scales for the job's product. */
static const int8_t *expert_weight(const Int8Job *j, Py_ssize_t e, const float **wscale) {
    *wscale = PTR(const float *, j->table[e * EXPERT_FIELDS + j->scales_field]);
    return PTR(const int8_t *, j->table[e * EXPERT_FIELDS + j->weight_field]);
}

static void int8_unit(const void *context, long unit) {
    const Int8Job *j = context;
    const Py_ssize_t e = j->items[2 * unit], n_begin = j->items[2 * unit + 1] * CHUNK_N, K = j->K;
    const Py_ssize_t n_end = n_begin + CHUNK_N < j->N ? n_begin + CHUNK_N : j->N, nb = K / QBLOCK;
    const float *wscale;
    const int8_t *w = expert_weight(j, e, &wscale);
    float dots[TILE];
    {   /* the tiles prefetch PREFETCH_BYTES ahead: ask for the first stretch up front */
        const char *start = (const char *)(w + n_begin * K);
        Py_ssize_t bytes = (n_end - n_begin) * K;
        for (Py_ssize_t off = 0; off < (bytes < PREFETCH_BYTES ? bytes : PREFETCH_BYTES); off += 64)
            __builtin_prefetch(start + off, 0, 3);
    }
    for (Py_ssize_t m0 = j->starts[e]; m0 < j->starts[e + 1]; m0 += CHUNK_ROWS) {
        const Py_ssize_t m1 = m0 + CHUNK_ROWS < j->starts[e + 1] ? m0 + CHUNK_ROWS : j->starts[e + 1];
        for (Py_ssize_t n = n_begin; n < n_end; n += TILE) {
            const int rows = (int)(n_end - n < TILE ? n_end - n : TILE);
            for (Py_ssize_t m = m0; m < m1; m++) {
                const Py_ssize_t a = j->sources ? j->sources[m] : m;
                j->dot_tile(j->xq + a * K, j->xscale + a * nb, w + n * K, K, rows, m == m0, dots);
                float *o = j->out + m * j->N + n;
                for (int r = 0; r < rows; r++) o[r] = dots[r] * wscale[n + r] + 0.0f; /* Int8Linear's, no bias */
            }
        }
    }
}

/* Runs `job` over the chunks of N weight rows of every chosen expert with fewer than `widened_rows` rows;
 * `items` has room for them all. */
static void int8_products(Int8Job *job, Py_ssize_t E, Py_ssize_t widened_rows, Py_ssize_t *items, int num_threads) {
    long units = 0;
    for (Py_ssize_t e = 0; e < E; e++) {
        const Py_ssize_t count = job->starts[e + 1] - job->starts[e];
        if (count > 0 && count < widened_rows)
            for (Py_ssize_t c = 0; c * CHUNK_N < job->N; c++) items[2 * units] = e, items[2 * units++ + 1] = c;
    }
    job->items = items;
    pool_run(int8_unit, job, units, num_threads);
}

/* ---- int8 experts with many rows, with AMX: their integers as bf16 weights on the tile kernels ----
 * A prompt's expert meets dozens of rows, where the int8 dots above are bound by their per-block
 * work (~80 GMAC/s on 2 cores). Integers up to 127 are exact in bf16, so an expert's int8 rows are
 * widened into the bf16 tile layout (_bf16_tiles_cpu.c's `pack`) in a scratch buffer and run through
 * the tiles' many-row product on AMX; the row scales multiply its outputs. The weights are exact;
 * the activations are rounded to bf16 (relative 2^-9) instead of to int8 blocks, so these rows are
 * nearer exact weight-only int8 than the few-row path, not its bits. (Without AMX the tiles' AVX-512
 * widening kernel ran 2-2.6x the dots from 32 rows; the VNNI kernel below runs faster still.) */
#define INT8_WIDENED_ROWS 32 /* an expert's rows from which widening its weights pays (16-64 measured alike, noisy VM) */
#define PACK_OUT 64      /* _bf16_tiles_cpu.c's output padding */

static uint32_t bf16_pair_of_int8_pair[65536]; /* two int8 (as a little-endian uint16) -> their two bf16, exact */

static Py_ssize_t round_up(Py_ssize_t v, Py_ssize_t m) { return (v + m - 1) / m * m; }

/* One group of 16 outputs: block (nb, kb) row i holds, per output n, the pair of inputs 32kb + 2i
 * and + 1, as one 32-bit word (the pair of bytes looked up at once). */
static void pack_unit(const void *context, long nb) {
    const Int8PackJob *p = context;
#ifdef SELFHOST_X86
    if (cpu_level() >= 2) { /* the widened path runs only within the AVX-512 cap */
        int8_pack_group_avx512(p, nb);
        return;
    }
#endif
    const Py_ssize_t kblocks = p->K / 32, rows = p->N - nb * 16 < 16 ? p->N - nb * 16 : 16;
    uint32_t *dst = (uint32_t *)(p->packed + (Py_ssize_t)nb * kblocks * 16 * 32);
    const int8_t *q = p->q + nb * 16 * p->K;
    for (Py_ssize_t kb = 0; kb < kblocks; kb++)
        for (Py_ssize_t i = 0; i < 16; i++, dst += 16) {
            Py_ssize_t n = 0;
            for (; n < rows; n++) {
                uint16_t pair;
                memcpy(&pair, q + n * p->K + kb * 32 + 2 * i, sizeof pair);
                dst[n] = bf16_pair_of_int8_pair[pair];
            }
            for (; n < 16; n++) dst[n] = 0; /* padding outputs past N */
        }
}

/* y (M, N) = x (M, K) @ (q * scale)^T on the tile kernels, through `packed` (room for N and K padded); -1 without memory. */
static int int8_widened_experts(const float *x, const int8_t *q, const float *scale, uint16_t *packed, float *y,
                            Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, int num_threads) {
    const Int8PackJob job = {q, packed, N, K};
    pool_run(pack_unit, &job, (long)(round_up(N, PACK_OUT) / 16), num_threads);
    if (tiles->linear(x, packed, NULL, y, M, N, K, num_threads)) return -1;
    for (Py_ssize_t m = 0; m < M; m++)
        for (Py_ssize_t n = 0; n < N; n++) y[m * N + n] *= scale[n];
    return 0;
}

/* silu(gate) * up over rows of [gate | up]: the activation module's kernel where the ISA cap allows
 * it (GatedMLP's, the same bits), else portable C. */
static void silu_mul(const float *gate_up, float *out, Py_ssize_t rows, Py_ssize_t width, int num_threads) {
    if (activation && isa_limit >= 2) {
        activation->silu_mul(gate_up, out, rows, width, num_threads);
        return;
    }
    for (Py_ssize_t r = 0; r < rows; r++)
        for (Py_ssize_t i = 0; i < width; i++) {
            const float g = gate_up[r * 2 * width + i];
            out[r * width + i] = g / (1.0f + expf(-g)) * gate_up[r * 2 * width + width + i];
        }
}

/* ---- int8 experts with many rows on AVX-512 VNNI (no AMX): ../quant/_int8_rows_vnni.h ----
 * Unit c packs strip items[2c + 1] (32 outputs) of expert items[2c]'s weight into a scratch strip
 * of its own (~24 KiB for K = 768: it stays in L1/L2 while every row of the expert passes over it)
 * and runs all the expert's rows against it. The same int8 blocks as the dots. One layer of 16
 * experts (768 x 768, top-2) on two loaded Xeon cores without AMX, 2026-12-07, dots (or widened from
 * 32 rows) -> this kernel: 32 tokens (~4 rows an expert) 1.8-4.5 -> 1.3-1.9 ms, 256 tokens 22 -> 3.3-5.3,
 * 1024 tokens 42-63 -> 10.5-11.9; with one row an expert, packing a strip costs more than the dots'
 * single pass over it (0.10-0.15 -> 0.17-0.22 ms), so single-stream decode keeps the dots. */
#define INT8_VNNI_ROWS 2 /* an expert's rows from which the register-blocked VNNI kernel takes over */

#ifdef SELFHOST_X86
static void vnni_unit(const void *context, long unit) {
    Int8Job *j = (Int8Job *)context;
    const Py_ssize_t e = j->items[2 * unit], n0 = j->items[2 * unit + 1] * VNNI_STRIP;
    const float *wscale;
    const int8_t *w = expert_weight(j, e, &wscale);
    int8_t *strip = aligned_alloc(64, (vnni_strip_bytes(j->K) + 63) / 64 * 64);
    if (!strip) {
        __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    vnni_pack_strip(w, j->N, j->K, n0, strip);
    const Py_ssize_t begin = j->starts[e], width = j->N - n0 < VNNI_STRIP ? j->N - n0 : VNNI_STRIP;
    /* rows through `sources` (tokens), or the expert's own slots from `begin` */
    const Py_ssize_t first = j->sources ? 0 : begin;
    vnni_rows_strip(j->xu + first * j->K, j->xscale + first * (j->K / QBLOCK), j->sources ? j->sources + begin : NULL,
                    j->starts[e + 1] - begin, strip, j->K, wscale, j->out + begin * j->N, j->N, n0, (int)width);
    free(strip);
}
#endif

/* Runs `job` over the strips of every chosen expert with `from_rows` rows or more; -1 without memory. */
static int vnni_products(Int8Job *job, Py_ssize_t E, Py_ssize_t from_rows, Py_ssize_t *items, int num_threads) {
    long units = 0;
    for (Py_ssize_t e = 0; e < E; e++)
        if (job->starts[e + 1] - job->starts[e] >= from_rows)
            for (Py_ssize_t c = 0; c * VNNI_STRIP < job->N; c++) items[2 * units] = e, items[2 * units++ + 1] = c;
    job->items = items, job->failed = 0;
#ifdef SELFHOST_X86
    if (units) pool_run(vnni_unit, job, units, num_threads);
#endif
    return job->failed ? -1 : 0;
}

/* Where an int8 expert with many rows goes: with AMX, to the tile kernels (weights widened to bf16,
 * from INT8_WIDENED_ROWS); without it, to the VNNI kernel (from INT8_VNNI_ROWS); within the ISA cap. */
enum { MANY_DOTS, MANY_WIDENED, MANY_VNNI };

static int int8_many_rows(void) {
    if (int8_level() < 2) return MANY_DOTS;
    if (tiles && tiles->swiglu) return MANY_WIDENED;
#ifdef SELFHOST_X86
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return MANY_VNNI;
#endif
    return MANY_DOTS;
}

/* Activation bytes offset into [1, 255] for vpdpbusd (top bit flipped: + 128). */
static void offset_bytes(const int8_t *q, uint8_t *u, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) u[i] = (uint8_t)q[i] ^ 0x80u;
}

/* Every chosen int8 expert over its rows (`rows`: pair ids grouped by expert, `starts` per expert),
 * each pair's result row to results (pairs, H); -1 without memory. */
static int int8_experts(const int64_t *table, const float *x, Py_ssize_t T, Py_ssize_t k, const Py_ssize_t *starts,
                        const Py_ssize_t *rows, float *results, Py_ssize_t H, Py_ssize_t I, Py_ssize_t E,
                        int num_threads) {
    const Py_ssize_t pairs = T * k;
    dot_tile_fn dot_tile = dot_tile_c;
    quantize_fn quantize = quantize_rows_c;
#ifdef SELFHOST_X86
    const int level = int8_level();
    if (level >= 1) dot_tile = level >= 2 ? dot_tile_vnni : dot_tile_avx2, quantize = quantize_rows_avx2;
#endif
    const Py_ssize_t wide = 2 * I > H ? 2 * I : H, deep = H > I ? H : I;
    const Py_ssize_t most_chunks = (wide + (CHUNK_N < VNNI_STRIP ? CHUNK_N : VNNI_STRIP) - 1) /
                                   (CHUNK_N < VNNI_STRIP ? CHUNK_N : VNNI_STRIP);
    float *floats = malloc(sizeof(float) * (size_t)(T * (H / QBLOCK) + pairs * (2 * I + I + I / QBLOCK + H)));
    int8_t *bytes = malloc((size_t)(T * H + pairs * I));
    Py_ssize_t *index = malloc(sizeof(Py_ssize_t) * (size_t)(pairs + 2 * E * most_chunks));
    if (!floats || !bytes || !index) {
        free(floats), free(bytes), free(index);
        return -1;
    }
    float *xscale = floats, *gate_up = xscale + T * (H / QBLOCK), *act = gate_up + pairs * 2 * I;
    float *act_scale = act + pairs * I, *ys = act_scale + pairs * (I / QBLOCK);
    int8_t *xq = bytes, *act_q = bytes + T * H;
    Py_ssize_t *tokens = index, *items = index + pairs; /* slot -> token; the pool's units */
    for (Py_ssize_t slot = 0; slot < pairs; slot++) tokens[slot] = rows[slot] / k;

    const int many = int8_many_rows();
    const Py_ssize_t vnni_rows = many == MANY_VNNI ? INT8_VNNI_ROWS : PY_SSIZE_T_MAX;
    const Py_ssize_t widened_rows = many == MANY_WIDENED ? INT8_WIDENED_ROWS : PY_SSIZE_T_MAX;
    const Py_ssize_t dots_below = vnni_rows < widened_rows ? vnni_rows : widened_rows;
    /* the most rows any widened expert has */
    Py_ssize_t widened_most = 0, vnni_any = 0;
    for (Py_ssize_t e = 0; e < E; e++) {
        const Py_ssize_t count = starts[e + 1] - starts[e];
        if (count >= widened_rows && count > widened_most) widened_most = count;
        vnni_any |= count >= vnni_rows;
    }
    uint16_t *packed = widened_most ? malloc(sizeof(uint16_t) * (size_t)(round_up(wide, PACK_OUT) * deep)) : NULL;
    float *widened_x = widened_most ? malloc(sizeof(float) * (size_t)(widened_most * H)) : NULL;
    uint8_t *unsigned_bytes = vnni_any ? malloc((size_t)(T * H + pairs * I)) : NULL;
    int status = (widened_most && (!packed || !widened_x)) || (vnni_any && !unsigned_bytes) ? -1 : 0;
    uint8_t *xu = unsigned_bytes, *act_u = unsigned_bytes ? unsigned_bytes + T * H : NULL;

    if (!status) quantize(x, T, H, xq, xscale); /* each token once, however many experts it chose */
    if (!status && vnni_any) offset_bytes(xq, xu, T * H);
    Int8Job job = {xq, xu, xscale, tokens, table, GATE_UP_W, GATE_UP_SCALES, starts, NULL, gate_up, 2 * I, H, dot_tile, 0};
    if (!status) int8_products(&job, E, dots_below, items, num_threads);
    if (!status && vnni_any) status = vnni_products(&job, E, vnni_rows, items, num_threads);
    for (Py_ssize_t e = 0; e < E && !status && widened_most; e++) { /* the widened experts' gate_up into their slots */
        const Py_ssize_t begin = starts[e], count = starts[e + 1] - begin;
        if (count < widened_rows) continue;
        for (Py_ssize_t r = 0; r < count; r++)
            memcpy(widened_x + r * H, x + tokens[begin + r] * H, (size_t)H * sizeof(float));
        const int64_t *w = table + e * EXPERT_FIELDS;
        status = int8_widened_experts(widened_x, PTR(const int8_t *, w[GATE_UP_W]), PTR(const float *, w[GATE_UP_SCALES]),
                                  packed, gate_up + begin * 2 * I, count, 2 * I, H, num_threads);
    }
    if (!status) {
        silu_mul(gate_up, act, pairs, I, num_threads);
        quantize(act, pairs, I, act_q, act_scale);
        job = (Int8Job){act_q, act_u, act_scale, NULL, table, DOWN_W, DOWN_SCALES, starts, NULL, ys, H, I, dot_tile, 0};
        int8_products(&job, E, dots_below, items, num_threads);
    }
    if (!status && vnni_any) {
        offset_bytes(act_q, act_u, pairs * I);
        status = vnni_products(&job, E, vnni_rows, items, num_threads);
    }
    for (Py_ssize_t e = 0; e < E && !status && widened_most; e++) {
        const Py_ssize_t begin = starts[e], count = starts[e + 1] - begin;
        if (count < widened_rows) continue;
        const int64_t *w = table + e * EXPERT_FIELDS;
        status = int8_widened_experts(act + begin * I, PTR(const int8_t *, w[DOWN_W]), PTR(const float *, w[DOWN_SCALES]),
                                  packed, ys + begin * H, count, H, I, num_threads);
    }
    for (Py_ssize_t slot = 0; slot < pairs && !status; slot++)
        memcpy(results + rows[slot] * H, ys + slot * H, (size_t)H * sizeof(float));
    free(floats), free(bytes), free(index), free(packed), free(widened_x), free(unsigned_bytes);
    return status;
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

/* Every chosen expert of a bf16 or fp32 kind through its module's kernels, one expert after another,
 * each pair's result row to results (pairs, H); -1 without memory. */
static int module_experts(const Step *s, const Py_ssize_t *starts, const Py_ssize_t *rows, Py_ssize_t most,
                          float *results) {
    const Py_ssize_t H = s->H, I = s->I;
    float *xs = malloc((size_t)(most * (H + 2 * I + I + H)) * sizeof(float));
    if (!xs) return -1;
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
            if ((status = tiles->swiglu(xs, PTR(const uint16_t *, w[GATE_UP_W]), NULL, PTR(const uint16_t *, w[DOWN_W]),
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
    return status;
}

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
    if (s->kind == INT8 ? int8_experts(s->table, s->x, s->T, s->k, starts, rows, results, H, I, s->E, s->num_threads)
                        : module_experts(s, starts, rows, most, results))
        goto no_memory;
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
    if (T < 0 || H <= 0 || I <= 0 || E <= 0 || k <= 0 || k > E ||
        ((kind == BF16_TILES || kind == INT8) && (H % 32 || I % 32))) {
        PyErr_Format(PyExc_ValueError, "run: sizes the kernels cannot take (T=%zd H=%zd I=%zd E=%zd k=%zd)", T, H, I,
                     E, k);
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

static PyObject *limit_isa(PyObject *self, PyObject *args) {
    (void)self;
    int level;
    if (!PyArg_ParseTuple(args, "i", &level)) return NULL;
    const int before = isa_limit;
    isa_limit = level;
    return PyLong_FromLong(before);
}

static PyObject *int8_isa(PyObject *self, PyObject *args) {
    (void)self, (void)args;
    static const char *names[] = {"c", "avx2", "avx512-vnni"};
    return PyUnicode_FromString(names[int8_level() < 0 ? 0 : int8_level()]);
}

static PyObject *int8_many_rows_py(PyObject *self, PyObject *args) {
    (void)self, (void)args;
    switch (int8_many_rows()) {
        case MANY_WIDENED: return Py_BuildValue("(sn)", "widened", (Py_ssize_t)INT8_WIDENED_ROWS);
        case MANY_VNNI: return Py_BuildValue("(sn)", "vnni", (Py_ssize_t)INT8_VNNI_ROWS);
        default: return Py_BuildValue("(sO)", "dots", Py_None);
    }
}

static PyObject *expert_fields(PyObject *self, PyObject *args) {
    (void)self, (void)args;
    return PyLong_FromLong(EXPERT_FIELDS);
}

static PyMethodDef methods[] = {
    {"available", available, METH_VARARGS,
     "available(kind=0): True when every kernel `run` calls for experts of product `kind` is built for this CPU."},
    {"expert_fields", expert_fields, METH_NOARGS, "Addresses per expert in the table `run` reads."},
    {"int8_isa", int8_isa, METH_NOARGS,
     "int8_isa() -> 'avx512-vnni', 'avx2' or 'c': the instructions int8 experts run on now (CPU and limit_isa)."},
    {"int8_many_rows", int8_many_rows_py, METH_NOARGS,
     "int8_many_rows() -> (path, from_rows): where int8 experts with many rows go now (CPU and limit_isa): "
     "'widened' (bf16 on AMX tiles), 'vnni' (the register-blocked VNNI kernel) or 'dots' (from_rows None)."},
    {"limit_isa", limit_isa, METH_VARARGS,
     "Cap the int8 experts' instruction set (2 AVX-512 VNNI, 1 AVX2, 0 portable C); returns the previous cap. "
     "For tests: every level gives the same bits."},
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
    have_pool = pool_import() == 0; /* without it, int8 experts keep the Python loop */
    if (!have_pool) PyErr_Clear();
    uint16_t bf16_of_int8[256];
    for (int v = -128; v < 128; v++) { /* float(v) has at most 8 significant bits: its top half is exact */
        const float f = (float)v;
        uint32_t bits;
        memcpy(&bits, &f, sizeof bits);
        bf16_of_int8[(uint8_t)(int8_t)v] = (uint16_t)(bits >> 16);
    }
    for (uint32_t pair = 0; pair < 65536; pair++) /* the first input (low byte) in the low half, as `pack` */
        bf16_pair_of_int8_pair[pair] = bf16_of_int8[pair & 0xff] | (uint32_t)bf16_of_int8[pair >> 8] << 16;
    PyObject *m = PyModule_Create(&module);
    if (m && kernels_export(m, "selfhost.layers._moe_cpu._kernels", &kernels) < 0) Py_CLEAR(m);
    return m;
}
