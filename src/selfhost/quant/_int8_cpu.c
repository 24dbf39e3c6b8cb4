/* int8-weight linear layers on CPU: y = x @ (q * scale)^T + b, on x86-64 CPUs
 * with AVX2 and on aarch64 (NEON; the dotprod extension where the CPU has it).
 *
 * Built at install time as an optional extension (setup.py); selfhost.quant.int8
 * falls back to PyTorch kernels when it is missing or an x86-64 CPU lacks AVX2.
 *
 * Each activation row is quantized to int8 in blocks of 32 values, one fp32
 * scale per block, so every product of 32 values is an exact integer sum:
 *   y[m, n] = scale[n] * sum_b xscale[m, b] * sum_{k in b} xq[m, k] * q[n, k]
 * The weight stays in its stored (out, in) int8 layout; nothing is repacked.
 *
 * Inner product of 32 int8 pairs: vpmaddubsw multiplies unsigned by signed
 * bytes, so |x| is paired with q carrying x's sign. Both sides lie in
 * [-127, 127] (the quantizers clamp there), so each pair sum is at most
 * 2 * 127 * 127 = 32258 and never saturates int16. On aarch64, vmull_s8 and
 * vmlal_s8 sum two signed products into each int16 lane, within the same bound;
 * the dotprod extension's sdot sums four into int32 directly.
 *
 * Work split: rows of the weight in tiles of 4, each tile kept in L1 while it
 * meets every activation row of a chunk (prefill reads each weight once per
 * chunk of CHUNK_ROWS rows). Threads of a persistent pool (../_cpu_pool.h) take
 * chunks of CHUNK_N weight rows as they are free; the engine step picks how many.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SELFHOST_X86 1
#include <immintrin.h>

#include "_int8_block_avx2.h"
#elif defined(__aarch64__) && defined(__ARM_NEON) && (defined(__GNUC__) || defined(__clang__))
#define SELFHOST_NEON 1
#include <arm_neon.h>
#if defined(__linux__)
#include <sys/auxv.h> /* getauxval: whether this CPU has the dotprod extension */
#endif
#endif

#if defined(SELFHOST_X86) || defined(SELFHOST_NEON)
#define SELFHOST_INT8 1
#include "../_cpu_pool.h"
#endif
#ifdef SELFHOST_X86
#include "../_kernel_capsules.h"
#include "_int8_widened_avx512.h"
#include "_int8_rows_vnni.h"
#include "../_exp_avx512.h"
#include "../layers/_swiglu_avx512.h"
#include "_int8_tiles_amx.h"

/* layers._bf16_tiles_cpu's products (AVX-512 CPUs): many rows through the widened weights. NULL elsewhere. */
static const Bf16TileKernels *tiles;
#endif

#define QBLOCK 32
#define TILE 4
#define CHUNK_ROWS 128
/* Weight rows per unit of work handed to the pool (a multiple of TILE). Each tile prefetches
 * PREFETCH_BYTES ahead, past the end of its chunk into rows another thread may take: with 64-row
 * chunks that wasted ~40% of the streamed bytes and two threads ran no faster than one
 * (159 tok/s against 167); 256-row chunks waste ~10% and two threads reach ~193. */
#define CHUNK_N 256
/* Bytes ahead of the rows being read that each tile asks the caches for; 8-32 KiB measured
 * equally fast here, nearly 3x faster than leaving it to the hardware prefetcher. */
#define PREFETCH_BYTES 16384

#ifdef SELFHOST_INT8

typedef struct {
    const int8_t *xq;    /* (M, K) quantized activations */
    const float *xscale; /* (M, nblocks) */
    const int8_t *w;     /* (N, K) */
    const float *wscale; /* (N,) */
    const float *bias;   /* (N,) or NULL */
    float *out;          /* (M, N) */
    Py_ssize_t M, N, K, n_begin, n_end;
} Job;

static Py_ssize_t nblocks_of(Py_ssize_t K) { return (K + QBLOCK - 1) / QBLOCK; }

/* One ISA's tile: `rows` (1..TILE) weight rows from w against one activation row, into dots. */
typedef void (*dot_tile_fn)(const int8_t *xq, const float *xscale, const int8_t *w, Py_ssize_t K, int rows,
                            int prefetch, float *dots);

/* Scalar quantization of one (possibly partial) block. */
static void quantize_block_scalar(const float *x, Py_ssize_t len, int8_t *q, float *scale) {
    float amax = 0.0f;
    for (Py_ssize_t i = 0; i < len; i++) amax = fmaxf(amax, fabsf(x[i]));
    float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    for (Py_ssize_t i = 0; i < len; i++) q[i] = (int8_t)lrintf(x[i] * inv);
    *scale = amax / 127.0f;
}

/* Sum over the partial last block, in exact integers. */
static float tail_dot(const int8_t *xq, const int8_t *w, Py_ssize_t from, Py_ssize_t K, float xscale) {
    int32_t acc = 0;
    for (Py_ssize_t k = from; k < K; k++) acc += (int32_t)xq[k] * (int32_t)w[k];
    return (float)acc * xscale;
}

#endif /* SELFHOST_INT8 */

#ifdef SELFHOST_X86

__attribute__((target("avx2,fma"))) static void quantize_rows_avx2(const float *x, Py_ssize_t M, Py_ssize_t K,
                                                                   int8_t *xq, float *xscale) {
    const Py_ssize_t nb = nblocks_of(K), full = K / QBLOCK;
    for (Py_ssize_t m = 0; m < M; m++) {
        const float *xr = x + m * K;
        int8_t *qr = xq + m * K;
        float *sr = xscale + m * nb;
        for (Py_ssize_t b = 0; b < full; b++) sr[b] = quantize_block32_avx2(xr + b * QBLOCK, qr + b * QBLOCK);
        if (full < nb) quantize_block_scalar(xr + full * QBLOCK, K - full * QBLOCK, qr + full * QBLOCK, sr + full);
    }
}

__attribute__((target("avx2,fma"))) static inline float hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* `rows` (1..TILE) weight rows starting at w against one activation row; writes `rows` dots.
 * `prefetch`: the first activation row of a chunk pulls in the weights that follow. */
__attribute__((target("avx2,fma"))) static void dot_tile_avx2(const int8_t *xq, const float *xscale, const int8_t *w,
                                                              Py_ssize_t K, int rows, int prefetch, float *dots) {
    const Py_ssize_t full = K / QBLOCK;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[TILE] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    if (rows == TILE) {
        const int8_t *w0 = w, *w1 = w + K, *w2 = w + 2 * K, *w3 = w + 3 * K;
        for (Py_ssize_t b = 0; b < full; b++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + b * QBLOCK));
            const __m256i ax = _mm256_abs_epi8(xv);
            const __m256 d = _mm256_broadcast_ss(xscale + b);
#define SELFHOST_ROW(r, wr)                                                                                   \
    {                                                                                                         \
        const __m256i wv = _mm256_loadu_si256((const __m256i *)(wr + b * QBLOCK));                            \
        if (prefetch) _mm_prefetch((const char *)(wr + b * QBLOCK + PREFETCH_BYTES), _MM_HINT_T0);             \
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv, xv)), ones);        \
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), d, acc[r]);                                           \
    }
            SELFHOST_ROW(0, w0) SELFHOST_ROW(1, w1) SELFHOST_ROW(2, w2) SELFHOST_ROW(3, w3)
#undef SELFHOST_ROW
        }
    } else {
        for (int r = 0; r < rows; r++) {
            const int8_t *wr = w + r * K;
            for (Py_ssize_t b = 0; b < full; b++) {
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + b * QBLOCK));
                const __m256i wv = _mm256_loadu_si256((const __m256i *)(wr + b * QBLOCK));
                const __m256i p =
                    _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(xv), _mm256_sign_epi8(wv, xv)), ones);
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(xscale + b), acc[r]);
            }
        }
    }
    for (int r = 0; r < rows; r++) {
        dots[r] = hsum_avx2(acc[r]);
        if (full * QBLOCK < K) dots[r] += tail_dot(xq, w + r * K, full * QBLOCK, K, xscale[full]);
    }
}

static int cpu_has_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

/* What the shared driver below calls, whatever the instruction set. */
static const char *isa_of_cpu(void) { return cpu_has_avx2() ? "avx2" : NULL; }
static void quantize_rows(const float *x, Py_ssize_t M, Py_ssize_t K, int8_t *xq, float *xscale) {
    quantize_rows_avx2(x, M, K, xq, xscale);
}
static dot_tile_fn dot_tile_of_cpu(void) { return dot_tile_avx2; }

#endif /* SELFHOST_X86 */

#ifdef SELFHOST_NEON

#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20) /* <asm/hwcap.h>'s bit, for C libraries whose headers predate it */
#endif
/* GCC's arm_neon.h declares sdot for armv8.2-a+dotprod; that is no wider than the CPUs that have
 * it, since dotprod is an Armv8.2 extension. */
#if defined(__clang__)
#define DOTPROD __attribute__((target("dotprod")))
#else
#define DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))
#endif

static int neon_has_dotprod; /* read once when the module loads */

static int cpu_has_dotprod(void) {
#if defined(__linux__)
    return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#else
    return 0; /* no portable query elsewhere: plain NEON is correct on every aarch64 CPU */
#endif
}

/* As quantize_rows_avx2, four lanes at a time: the same maxima, products and rounding
 * (vcvtnq: to nearest even, as lrintf), and narrowings that saturate as packs does. */
static void quantize_rows_neon(const float *x, Py_ssize_t M, Py_ssize_t K, int8_t *xq, float *xscale) {
    const Py_ssize_t nb = nblocks_of(K), full = K / QBLOCK;
    for (Py_ssize_t m = 0; m < M; m++) {
        const float *xr = x + m * K;
        int8_t *qr = xq + m * K;
        float *sr = xscale + m * nb;
        for (Py_ssize_t b = 0; b < full; b++) {
            float32x4_t v[8];
            for (int i = 0; i < 8; i++) v[i] = vld1q_f32(xr + b * QBLOCK + 4 * i);
            float32x4_t mx = vabsq_f32(v[0]);
            for (int i = 1; i < 8; i++) mx = vmaxq_f32(mx, vabsq_f32(v[i]));
            const float amax = vmaxvq_f32(mx);
            const float32x4_t inv = vdupq_n_f32(amax > 0.0f ? 127.0f / amax : 0.0f);
            sr[b] = amax / 127.0f;
            int16x8_t h[4];
            for (int i = 0; i < 4; i++) {
                h[i] = vcombine_s16(vqmovn_s32(vcvtnq_s32_f32(vmulq_f32(v[2 * i], inv))),
                                    vqmovn_s32(vcvtnq_s32_f32(vmulq_f32(v[2 * i + 1], inv))));
            }
            vst1q_s8(qr + b * QBLOCK, vcombine_s8(vqmovn_s16(h[0]), vqmovn_s16(h[1])));
            vst1q_s8(qr + b * QBLOCK + 16, vcombine_s8(vqmovn_s16(h[2]), vqmovn_s16(h[3])));
        }
        if (full < nb) quantize_block_scalar(xr + full * QBLOCK, K - full * QBLOCK, qr + full * QBLOCK, sr + full);
    }
}

/* Four int32 lanes that together hold one block's 32 products (x0, x1: its activations; w: its weights).
 * Plain NEON: vmull_s8 and vmlal_high_s8 put two products in each int16 lane (at most
 * 2 * 127 * 128 = 32512 even for a weight of -128: exact), then pairwise widening adds. */
static inline int32x4_t block_sum_neon(int8x16_t x0, int8x16_t x1, const int8_t *w) {
    const int8x16_t w0 = vld1q_s8(w), w1 = vld1q_s8(w + 16);
    const int16x8_t p0 = vmlal_high_s8(vmull_s8(vget_low_s8(x0), vget_low_s8(w0)), x0, w0);
    const int16x8_t p1 = vmlal_high_s8(vmull_s8(vget_low_s8(x1), vget_low_s8(w1)), x1, w1);
    return vpadalq_s16(vpaddlq_s16(p0), p1);
}

/* The dotprod extension (Cortex-A55/A76 onwards, Graviton 2 onwards, Apple M1): sdot sums four products a lane. */
DOTPROD static inline int32x4_t block_sum_dotprod(int8x16_t x0, int8x16_t x1, const int8_t *w) {
    return vdotq_s32(vdotq_s32(vdupq_n_s32(0), x0, vld1q_s8(w)), x1, vld1q_s8(w + 16));
}

/* dot_tile_avx2's work: `rows` (1..TILE) weight rows from w against one activation row, `rows`
 * dots out. Written once as a macro and defined per block sum, because sdot may only appear in a
 * function built for dotprod, and a call per block would cost more than the block itself. */
#define SELFHOST_NEON_DOT_TILE(name, attributes, block_sum)                                                         \
    attributes static void name(const int8_t *xq, const float *xscale, const int8_t *w, Py_ssize_t K, int rows,     \
                                int prefetch, float *dots) {                                                        \
        const Py_ssize_t full = K / QBLOCK, tail = full * QBLOCK;                                                   \
        if (rows == TILE) {                                                                                         \
            float32x4_t acc[TILE] = {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)}; \
            for (Py_ssize_t b = 0; b < full; b++) {                                                                 \
                const int8x16_t x0 = vld1q_s8(xq + b * QBLOCK), x1 = vld1q_s8(xq + b * QBLOCK + 16);               \
                for (int r = 0; r < TILE; r++) {                                                                    \
                    const int8_t *wb = w + r * K + b * QBLOCK;                                                      \
                    if (prefetch) __builtin_prefetch(wb + PREFETCH_BYTES, 0, 3);                                    \
                    acc[r] = vfmaq_n_f32(acc[r], vcvtq_f32_s32(block_sum(x0, x1, wb)), xscale[b]);                  \
                }                                                                                                   \
            }                                                                                                       \
            for (int r = 0; r < TILE; r++) dots[r] = vaddvq_f32(acc[r]);                                            \
        } else {                                                                                                    \
            for (int r = 0; r < rows; r++) {                                                                        \
                float32x4_t acc = vdupq_n_f32(0.0f);                                                                \
                for (Py_ssize_t b = 0; b < full; b++) {                                                             \
                    const int8x16_t x0 = vld1q_s8(xq + b * QBLOCK), x1 = vld1q_s8(xq + b * QBLOCK + 16);           \
                    acc = vfmaq_n_f32(acc, vcvtq_f32_s32(block_sum(x0, x1, w + r * K + b * QBLOCK)), xscale[b]);    \
                }                                                                                                   \
                dots[r] = vaddvq_f32(acc);                                                                          \
            }                                                                                                       \
        }                                                                                                           \
        if (tail < K)                                                                                               \
            for (int r = 0; r < rows; r++) dots[r] += tail_dot(xq, w + r * K, tail, K, xscale[full]);              \
    }

SELFHOST_NEON_DOT_TILE(dot_tile_neon, , block_sum_neon)
SELFHOST_NEON_DOT_TILE(dot_tile_dotprod, DOTPROD, block_sum_dotprod)
#undef SELFHOST_NEON_DOT_TILE

/* What the shared driver below calls, whatever the instruction set. */
static const char *isa_of_cpu(void) { return neon_has_dotprod ? "neon-dotprod" : "neon"; }
static void quantize_rows(const float *x, Py_ssize_t M, Py_ssize_t K, int8_t *xq, float *xscale) {
    quantize_rows_neon(x, M, K, xq, xscale);
}
static dot_tile_fn dot_tile_of_cpu(void) { return neon_has_dotprod ? dot_tile_dotprod : dot_tile_neon; }

#endif /* SELFHOST_NEON */

#ifdef SELFHOST_INT8

/* A job's weight rows against every activation row, through this CPU's tile (called
 * through a pointer: each call does a whole K-long tile, so the indirection costs nothing). */
static void run_job(const Job *j) {
    const dot_tile_fn dot_tile = dot_tile_of_cpu();
    const Py_ssize_t nb = nblocks_of(j->K);
    float dots[TILE];
    {   /* the tiles prefetch PREFETCH_BYTES ahead: ask for the first stretch up front */
        const char *start = (const char *)(j->w + j->n_begin * j->K);
        Py_ssize_t bytes = (j->n_end - j->n_begin) * j->K;
        if (bytes > PREFETCH_BYTES) bytes = PREFETCH_BYTES;
        for (Py_ssize_t off = 0; off < bytes; off += 64) __builtin_prefetch(start + off, 0, 3);
    }
    for (Py_ssize_t m0 = 0; m0 < j->M; m0 += CHUNK_ROWS) {
        const Py_ssize_t m1 = m0 + CHUNK_ROWS < j->M ? m0 + CHUNK_ROWS : j->M;
        for (Py_ssize_t n = j->n_begin; n < j->n_end; n += TILE) {
            const int rows = (int)(j->n_end - n < TILE ? j->n_end - n : TILE);
            for (Py_ssize_t m = m0; m < m1; m++) {
                dot_tile(j->xq + m * j->K, j->xscale + m * nb, j->w + n * j->K, j->K, rows, m == m0, dots);
                float *o = j->out + m * j->N + n;
                for (int r = 0; r < rows; r++) o[r] = dots[r] * j->wscale[n + r] + (j->bias ? j->bias[n + r] : 0.0f);
            }
        }
    }
}

/* One chunk of the product: weight rows [chunk * CHUNK_N, ...) against every activation row. */
static void run_chunk(const void *whole, long chunk) {
    Job job = *(const Job *)whole;
    job.n_begin = (Py_ssize_t)chunk * CHUNK_N;
    job.n_end = job.n_begin + CHUNK_N < job.N ? job.n_begin + CHUNK_N : job.N;
    run_job(&job);
}

/* Returns 0, or -1 when memory or threads could not be had. Runs without the GIL. */
static int linear_cpu(const float *x, const int8_t *w, const float *wscale, const float *bias, float *out,
                      Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, int num_threads) {
    const Py_ssize_t nb = nblocks_of(K);
    int8_t *xq = malloc((size_t)(M * K) + 1); /* + 1: never malloc(0), which may return NULL */
    float *xscale = malloc(sizeof(float) * (size_t)(M * nb + 1));
    if (!xq || !xscale) {
        free(xq), free(xscale);
        return -1;
    }
    quantize_rows(x, M, K, xq, xscale);

    /* Chunks of weight rows go to whichever thread of the pool is free (../_cpu_pool.h). */
    const Job whole = {xq, xscale, w, wscale, bias, out, M, N, K, 0, N};
    pool_run(run_chunk, &whole, (long)((N + CHUNK_N - 1) / CHUNK_N), num_threads < 1 ? 1 : num_threads);
    free(xq), free(xscale);
    return 0;
}

#endif /* SELFHOST_INT8 */

#ifdef SELFHOST_X86
/* ---- several rows on AVX-512 VNNI (_int8_rows_vnni.h): the dots' int8 blocks, register-blocked ----
 * Unit s packs weight strip s (32 outputs) and runs every row against it. */
typedef struct {
    const uint8_t *xu;
    const float *xscale, *wscale, *bias;
    const int8_t *w;
    float *out;
    Py_ssize_t M, N, K;
    int failed;
} VnniLinear;

static void vnni_linear_unit(const void *context, long s) {
    VnniLinear *j = (VnniLinear *)context;
    const Py_ssize_t n0 = (Py_ssize_t)s * VNNI_STRIP, width = j->N - n0 < VNNI_STRIP ? j->N - n0 : VNNI_STRIP;
    int8_t *strip = aligned_alloc(64, (vnni_strip_bytes(j->K) + 63) / 64 * 64);
    if (!strip) {
        __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    vnni_pack_strip(j->w, j->N, j->K, n0, strip);
    vnni_rows_strip(j->xu, j->xscale, NULL, j->M, strip, j->K, j->wscale, j->out, j->N, n0, (int)width);
    free(strip);
    if (j->bias)
        for (Py_ssize_t m = 0; m < j->M; m++)
            for (Py_ssize_t n = n0; n < n0 + width; n++) j->out[m * j->N + n] += j->bias[n];
}

static int vnni_ready(void) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

/* linear_cpu's product (K % 32 == 0) on the VNNI kernel; -1 without memory. Without the GIL. */
static int linear_vnni_cpu(const float *x, const int8_t *w, const float *wscale, const float *bias, float *out,
                           Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, int num_threads) {
    int8_t *xq = malloc((size_t)(M * K));
    float *xscale = malloc(sizeof(float) * (size_t)(M * (K / QBLOCK)));
    if (!xq || !xscale) {
        free(xq), free(xscale);
        return -1;
    }
    quantize_rows(x, M, K, xq, xscale);
    for (Py_ssize_t i = 0; i < M * K; i++) xq[i] = (int8_t)((uint8_t)xq[i] ^ 0x80u); /* offset to unsigned */
    VnniLinear job = {(const uint8_t *)xq, xscale, wscale, bias, w, out, M, N, K, 0};
    pool_run(vnni_linear_unit, &job, (long)((N + VNNI_STRIP - 1) / VNNI_STRIP), num_threads < 1 ? 1 : num_threads);
    free(xq), free(xscale);
    return job.failed ? -1 : 0;
}

/* linear_widened's product, for the capsule. */
static int linear_widened_cpu(const float *x, const int8_t *w, const float *wscale, const float *bias, float *out,
                              Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, int num_threads) {
    return int8_widened_product(tiles->linear, x, w, wscale, bias, out, M, N, K, num_threads < 1 ? 1 : num_threads);
}

#ifdef SELFHOST_AMX_TILES
/* swiglu_amx's MLP, for the capsule. */
static int swiglu_amx_cpu(const float *x, const int8_t *gate_up_packed, const float *gate_up_scale, const int8_t *down,
                          const int8_t *down_packed, const float *down_scale, const float *down_bias, float *y,
                          Py_ssize_t M, Py_ssize_t I, Py_ssize_t hidden, int num_threads) {
    return amx_swiglu_product(x, gate_up_packed, gate_up_scale, down, down_packed, down_scale, down_bias, y, M, I,
                              hidden, num_threads < 1 ? 1 : num_threads);
}

/* linear_amx's product, for the capsule. */
static int linear_amx_cpu(const float *x, const int8_t *w, const int8_t *packed, const float *wscale, const float *bias,
                          float *out, Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, int num_threads) {
    return amx_int8_product(x, w, packed, wscale, bias, out, M, N, K, num_threads < 1 ? 1 : num_threads);
}
#endif

/* What the decode-step runner calls (engine/_decode_layers_cpu.c): the same four products and the AMX MLP. */
static Int8Kernels kernels = {SELFHOST_KERNELS_VERSION, linear_cpu, NULL, NULL, NULL, NULL};
#endif

PyDoc_STRVAR(available_doc, "available() -> bool: this build and this CPU can run `linear`.");

static PyObject *available(PyObject *self, PyObject *unused) {
#ifdef SELFHOST_INT8
    return PyBool_FromLong(isa_of_cpu() != NULL);
#else
    return PyBool_FromLong(0);
#endif
}

PyDoc_STRVAR(isa_doc, "isa() -> str | None: the instructions `linear` runs on here\n"
                      "('avx2', 'neon' or 'neon-dotprod'); None where it cannot run.");

static PyObject *isa(PyObject *self, PyObject *unused) {
#ifdef SELFHOST_INT8
    const char *name = isa_of_cpu();
    if (name) return PyUnicode_FromString(name);
#endif
    Py_RETURN_NONE;
}

PyDoc_STRVAR(linear_doc,
             "linear(x, w, wscale, bias, out, M, N, K, num_threads)\n\n"
             "Addresses (ints) of C-contiguous buffers: x float32 (M, K), w int8 (N, K) in [-127, 127],\n"
             "wscale float32 (N,), bias float32 (N,) or 0, out float32 (M, N). Writes out.");

static PyObject *linear(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 9) {
        PyErr_Format(PyExc_TypeError, "linear takes 9 arguments, got %zd", nargs);
        return NULL;
    }
    void *ptr[5];
    for (int i = 0; i < 5; i++) {
        ptr[i] = PyLong_AsVoidPtr(args[i]);
        if (PyErr_Occurred()) return NULL;
    }
    Py_ssize_t dims[3];
    for (int i = 0; i < 3; i++) {
        dims[i] = PyLong_AsSsize_t(args[5 + i]);
        if (dims[i] == -1 && PyErr_Occurred()) return NULL;
        if (dims[i] < 0) {
            PyErr_Format(PyExc_ValueError, "linear: dimension %zd is negative", dims[i]);
            return NULL;
        }
    }
    const long num_threads = PyLong_AsLong(args[8]);
    if (num_threads == -1 && PyErr_Occurred()) return NULL;
#ifdef SELFHOST_INT8
    if (!isa_of_cpu()) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU lacks AVX2/FMA");
        return NULL;
    }
    if (!ptr[0] || !ptr[1] || !ptr[2] || !ptr[4]) {
        PyErr_SetString(PyExc_ValueError, "linear: null buffer address");
        return NULL;
    }
    if (dims[0] == 0 || dims[1] == 0) Py_RETURN_NONE;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = linear_cpu(ptr[0], ptr[1], ptr[2], ptr[3], ptr[4], dims[0], dims[1], dims[2], (int)num_threads);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
#else
    (void)ptr, (void)num_threads;
    PyErr_SetString(PyExc_RuntimeError, "built without AVX2 (x86-64) or NEON (aarch64) support");
    return NULL;
#endif
}

PyDoc_STRVAR(linear_widened_doc,
             "linear_widened(x, w, wscale, bias, out, M, N, K, num_threads)\n\n"
             "The same product for many rows, K a multiple of 32: w's integers widened (exactly) into the bf16\n"
             "tile layout and multiplied by layers._bf16_tiles_cpu's many-row product on the exact fp32 rows\n"
             "(AMX: rounded to bf16), instead of quantizing the activations. Needs widened_available().");

static PyObject *widened_available(PyObject *self, PyObject *unused) {
#ifdef SELFHOST_X86
    return PyBool_FromLong(tiles != NULL);
#else
    Py_RETURN_FALSE;
#endif
}

static PyObject *linear_widened(PyObject *self, PyObject *args) {
    unsigned long long x, w, wscale, bias, out;
    Py_ssize_t M, N, K;
    int num_threads;
    if (!PyArg_ParseTuple(args, "KKKKKnnni", &x, &w, &wscale, &bias, &out, &M, &N, &K, &num_threads)) return NULL;
#ifdef SELFHOST_X86
    if (!tiles) {
        PyErr_SetString(PyExc_RuntimeError, "linear_widened: needs AVX-512 and selfhost's bf16 tile kernels");
        return NULL;
    }
    if (M < 0 || N < 0 || K <= 0 || K % 32 || !x || !w || !wscale || !out) {
        PyErr_SetString(PyExc_ValueError, "linear_widened: K must be a positive multiple of 32, buffers non-null");
        return NULL;
    }
    if (M == 0 || N == 0) Py_RETURN_NONE;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = int8_widened_product(tiles->linear, (const float *)x, (const int8_t *)w, (const float *)wscale,
                              bias ? (const float *)bias : NULL, (float *)out, M, N, K, num_threads < 1 ? 1 : num_threads);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
#else
    (void)x, (void)w, (void)wscale, (void)bias, (void)out, (void)M, (void)N, (void)K, (void)num_threads;
    PyErr_SetString(PyExc_RuntimeError, "linear_widened: built without x86-64 support");
    return NULL;
#endif
}

PyDoc_STRVAR(swiglu_widened_doc,
             "swiglu_widened(x, gate_up, gate_up_scale, down, down_scale, down_bias, out, M, I, K, num_threads)\n\n"
             "out (M, K) = down(silu(gate(x)) * up(x)) for int8 gate|up (2I, K) and down (K, I) with their row scales,\n"
             "both widened as in linear_widened and multiplied in one AMX call (layers._bf16_tiles_cpu's SwiGLU):\n"
             "the same bits as linear_widened, silu(gate) * up, linear_widened. I and K multiples of 32, gate|up\n"
             "without bias, down_bias 0 for none; out may be x. Needs swiglu_available().");

PyDoc_STRVAR(swiglu_amx_doc,
             "swiglu_amx(x, gate_up_packed, gate_up_scale, down, down_packed, down_scale, down_bias, out, M, I, hidden,\n"
             "           num_threads)\n\n"
             "out = down(silu(gate(x)) * up(x)) on AMX-INT8 tiles: gate|up (2I outputs, no bias) given by its tiles as\n"
             "pack_amx wrote them, down by its (hidden, I) weights and their tiles (down_packed 0: packed per call);\n"
             "I and hidden multiples of 32. The bits of linear_amx, the SwiGLU pass and linear_amx in turn.");

static PyObject *swiglu_amx(PyObject *self, PyObject *args) {
    unsigned long long x, gate_up_packed, gate_up_scale, down, down_packed, down_scale, down_bias, out;
    Py_ssize_t M, I, hidden;
    int num_threads;
    if (!PyArg_ParseTuple(args, "KKKKKKKKnnni", &x, &gate_up_packed, &gate_up_scale, &down, &down_packed, &down_scale,
                          &down_bias, &out, &M, &I, &hidden, &num_threads))
        return NULL;
#ifdef SELFHOST_AMX_TILES
    if (!amx_int8_ready) {
        PyErr_SetString(PyExc_RuntimeError, "swiglu_amx: this CPU or kernel does not offer AMX-INT8");
        return NULL;
    }
    if (M < 0 || I <= 0 || I % 32 || hidden <= 0 || hidden % 32 || !x || !gate_up_packed || !gate_up_scale || !down ||
        !down_scale || !out) {
        PyErr_SetString(PyExc_ValueError, "swiglu_amx: I and hidden must be positive multiples of 32, buffers non-null");
        return NULL;
    }
    if (M == 0) Py_RETURN_NONE;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = amx_swiglu_product((const float *)x, (const int8_t *)gate_up_packed, (const float *)gate_up_scale,
                            (const int8_t *)down, (const int8_t *)down_packed, (const float *)down_scale,
                            down_bias ? (const float *)down_bias : NULL, (float *)out, M, I, hidden,
                            num_threads < 1 ? 1 : num_threads);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
#else
    (void)x, (void)gate_up_packed, (void)gate_up_scale, (void)down, (void)down_packed, (void)down_scale;
    (void)down_bias, (void)out, (void)M, (void)I, (void)hidden, (void)num_threads;
    PyErr_SetString(PyExc_RuntimeError, "swiglu_amx: built without AMX support");
    return NULL;
#endif
}

static PyObject *swiglu_available(PyObject *self, PyObject *unused) {
#ifdef SELFHOST_X86
    return PyBool_FromLong(tiles != NULL && tiles->swiglu != NULL);
#else
    Py_RETURN_FALSE;
#endif
}

static PyObject *swiglu_widened(PyObject *self, PyObject *args) {
    unsigned long long x, gate_up, gate_up_scale, down, down_scale, down_bias, out;
    Py_ssize_t M, I, K;
    int num_threads;
    if (!PyArg_ParseTuple(args, "KKKKKKKnnni", &x, &gate_up, &gate_up_scale, &down, &down_scale, &down_bias, &out, &M,
                          &I, &K, &num_threads))
        return NULL;
#ifdef SELFHOST_X86
    if (!tiles || !tiles->swiglu) {
        PyErr_SetString(PyExc_RuntimeError, "swiglu_widened: needs AMX and selfhost's bf16 tile kernels");
        return NULL;
    }
    if (M < 0 || I <= 0 || I % 32 || K <= 0 || K % 32 || !x || !gate_up || !gate_up_scale || !down || !down_scale || !out) {
        PyErr_SetString(PyExc_ValueError, "swiglu_widened: I and K must be positive multiples of 32, buffers non-null");
        return NULL;
    }
    if (M == 0) Py_RETURN_NONE;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = int8_widened_swiglu(tiles->swiglu, (const float *)x, (const int8_t *)gate_up, (const float *)gate_up_scale,
                             (const int8_t *)down, (const float *)down_scale, down_bias ? (const float *)down_bias : NULL,
                             (float *)out, M, I, K, num_threads < 1 ? 1 : num_threads);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
#else
    (void)x, (void)gate_up, (void)gate_up_scale, (void)down, (void)down_scale, (void)down_bias, (void)out, (void)M,
        (void)I, (void)K, (void)num_threads;
    PyErr_SetString(PyExc_RuntimeError, "swiglu_widened: built without x86-64 support");
    return NULL;
#endif
}

PyDoc_STRVAR(linear_amx_doc,
             "linear_amx(x, w, wscale, bias, out, M, N, K, num_threads, packed=0)\n\n"
             "y = x @ (w * wscale)^T + bias on AMX-INT8 tiles, K a multiple of 32: each row of x quantized to int8\n"
             "with one scale (its largest magnitude / 127), exact int32 sums over K (W8A8, as vLLM's CPU path).\n"
             "packed: w's tiles as pack_amx wrote them (read in order, no packing per call), or 0.\n"
             "Needs amx_available().");

PyDoc_STRVAR(pack_amx_doc,
             "pack_amx(w, packed, N, K)\n\n"
             "w (N, K) int8, K a multiple of 32, as linear_amx's tiles into `packed` (amx_packed_bytes(N, K) bytes).");

static PyObject *amx_packed_bytes_py(PyObject *self, PyObject *args) {
    Py_ssize_t N, K;
    if (!PyArg_ParseTuple(args, "nn", &N, &K)) return NULL;
    if (N <= 0 || K <= 0 || K % 32) {
        PyErr_SetString(PyExc_ValueError, "amx_packed_bytes: N positive, K a positive multiple of 32");
        return NULL;
    }
#ifdef SELFHOST_AMX_TILES
    return PyLong_FromSsize_t(amx_packed_bytes(N, K));
#else
    PyErr_SetString(PyExc_RuntimeError, "amx_packed_bytes: built without AMX support");
    return NULL;
#endif
}

static PyObject *pack_amx(PyObject *self, PyObject *args) {
    unsigned long long w, packed;
    Py_ssize_t N, K;
    if (!PyArg_ParseTuple(args, "KKnn", &w, &packed, &N, &K)) return NULL;
#ifdef SELFHOST_AMX_TILES
    if (!amx_int8_ready) {
        PyErr_SetString(PyExc_RuntimeError, "pack_amx: this CPU or kernel does not offer AMX-INT8");
        return NULL;
    }
    if (N <= 0 || K <= 0 || K % 32 || !w || !packed) {
        PyErr_SetString(PyExc_ValueError, "pack_amx: N positive, K a positive multiple of 32, buffers non-null");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    amx_pack_weights((const int8_t *)w, N, K, (int8_t *)packed);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
#else
    (void)w, (void)packed, (void)N, (void)K;
    PyErr_SetString(PyExc_RuntimeError, "pack_amx: built without AMX support");
    return NULL;
#endif
}

static PyObject *amx_available(PyObject *self, PyObject *unused) {
#ifdef SELFHOST_AMX_TILES
    return PyBool_FromLong(amx_int8_ready);
#else
    Py_RETURN_FALSE;
#endif
}

static PyObject *linear_amx(PyObject *self, PyObject *args) {
    unsigned long long x, w, wscale, bias, out, packed = 0;
    Py_ssize_t M, N, K;
    int num_threads;
    if (!PyArg_ParseTuple(args, "KKKKKnnni|K", &x, &w, &wscale, &bias, &out, &M, &N, &K, &num_threads, &packed))
        return NULL;
#ifdef SELFHOST_AMX_TILES
    if (!amx_int8_ready) {
        PyErr_SetString(PyExc_RuntimeError, "linear_amx: this CPU or kernel does not offer AMX-INT8");
        return NULL;
    }
    if (M < 0 || N < 0 || K <= 0 || K % 32 || !x || !w || !wscale || !out) {
        PyErr_SetString(PyExc_ValueError, "linear_amx: K must be a positive multiple of 32, buffers non-null");
        return NULL;
    }
    if (M == 0 || N == 0) Py_RETURN_NONE;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = amx_int8_product((const float *)x, (const int8_t *)w, (const int8_t *)packed, (const float *)wscale,
                          bias ? (const float *)bias : NULL, (float *)out, M, N, K, num_threads < 1 ? 1 : num_threads);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
#else
    (void)x, (void)w, (void)wscale, (void)bias, (void)out, (void)M, (void)N, (void)K, (void)num_threads, (void)packed;
    PyErr_SetString(PyExc_RuntimeError, "linear_amx: built without AMX support");
    return NULL;
#endif
}

PyDoc_STRVAR(linear_vnni_doc,
             "linear_vnni(x, w, wscale, bias, out, M, N, K, num_threads)\n\n"
             "`linear`'s product (activations in int8 blocks of 32, exact int32 block sums) on a register-blocked\n"
             "AVX-512 VNNI kernel, K a multiple of 32: the same integers, summed in fp32 in another order.\n"
             "Needs vnni_available().");

static PyObject *vnni_available(PyObject *self, PyObject *unused) {
#ifdef SELFHOST_X86
    return PyBool_FromLong(vnni_ready());
#else
    Py_RETURN_FALSE;
#endif
}

static PyObject *linear_vnni(PyObject *self, PyObject *args) {
    unsigned long long x, w, wscale, bias, out;
    Py_ssize_t M, N, K;
    int num_threads;
    if (!PyArg_ParseTuple(args, "KKKKKnnni", &x, &w, &wscale, &bias, &out, &M, &N, &K, &num_threads)) return NULL;
#ifdef SELFHOST_X86
    if (!vnni_ready()) {
        PyErr_SetString(PyExc_RuntimeError, "linear_vnni: needs AVX-512 VNNI");
        return NULL;
    }
    if (M < 0 || N < 0 || K <= 0 || K % 32 || !x || !w || !wscale || !out) {
        PyErr_SetString(PyExc_ValueError, "linear_vnni: K must be a positive multiple of 32, buffers non-null");
        return NULL;
    }
    if (M == 0 || N == 0) Py_RETURN_NONE;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = linear_vnni_cpu((const float *)x, (const int8_t *)w, (const float *)wscale, bias ? (const float *)bias : NULL,
                         (float *)out, M, N, K, num_threads);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
#else
    (void)x, (void)w, (void)wscale, (void)bias, (void)out, (void)M, (void)N, (void)K, (void)num_threads;
    PyErr_SetString(PyExc_RuntimeError, "linear_vnni: built without x86-64 support");
    return NULL;
#endif
}

static PyMethodDef methods[] = {
    {"available", available, METH_NOARGS, available_doc},
    {"vnni_available", vnni_available, METH_NOARGS, "vnni_available() -> bool: `linear_vnni` runs here."},
    {"linear_vnni", linear_vnni, METH_VARARGS, linear_vnni_doc},
    {"amx_available", amx_available, METH_NOARGS, "amx_available() -> bool: `linear_amx` runs here."},
    {"linear_amx", linear_amx, METH_VARARGS, linear_amx_doc},
    {"pack_amx", pack_amx, METH_VARARGS, pack_amx_doc},
    {"amx_packed_bytes", amx_packed_bytes_py, METH_VARARGS, "amx_packed_bytes(N, K) -> int: bytes pack_amx writes."},
    {"widened_available", widened_available, METH_NOARGS, "widened_available() -> bool: `linear_widened` runs here."},
    {"linear_widened", linear_widened, METH_VARARGS, linear_widened_doc},
    {"swiglu_available", swiglu_available, METH_NOARGS, "swiglu_available() -> bool: `swiglu_widened` runs here."},
    {"swiglu_widened", swiglu_widened, METH_VARARGS, swiglu_widened_doc},
    {"swiglu_amx", swiglu_amx, METH_VARARGS, swiglu_amx_doc},
    {"isa", isa, METH_NOARGS, isa_doc},
    {"linear", (PyCFunction)(void (*)(void))linear, METH_FASTCALL, linear_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_int8_cpu",
                                    "int8-weight linear layers (x86-64 AVX2, aarch64 NEON).", -1, methods};

PyMODINIT_FUNC PyInit__int8_cpu(void) {
#ifdef SELFHOST_INT8
    if (pool_import() < 0) return NULL; /* the process's one worker pool (../_cpu_pool.h) */
#endif
#ifdef SELFHOST_X86
    __builtin_cpu_init();
#ifdef SELFHOST_AMX_TILES
    amx_int8_ready = amx_int8_request();
#endif
    if (__builtin_cpu_supports("avx512f"))
        tiles = kernels_import_optional("selfhost.layers._bf16_tiles_cpu", "selfhost.layers._bf16_tiles_cpu._kernels");
#endif
#ifdef SELFHOST_NEON
    neon_has_dotprod = cpu_has_dotprod();
#endif
    PyObject *m = PyModule_Create(&module);
#ifdef SELFHOST_X86
    kernels.linear_vnni = vnni_ready() ? linear_vnni_cpu : NULL;
    kernels.linear_widened = tiles ? linear_widened_cpu : NULL;
#ifdef SELFHOST_AMX_TILES
    kernels.linear_amx = amx_int8_ready ? linear_amx_cpu : NULL;
    kernels.swiglu_amx = amx_int8_ready ? swiglu_amx_cpu : NULL;
#endif
    if (m && isa_of_cpu() && kernels_export(m, "selfhost.quant._int8_cpu._kernels", &kernels) < 0) Py_CLEAR(m);
#endif
    return m;
}
