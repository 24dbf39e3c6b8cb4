/* int8 weights times int8 activations on AMX tiles (TDPBSSD): W8A8 with a scale per activation row.
 *
 * Why: on a CPU with AMX, VNNI's register-blocked kernel (_int8_rows_vnni.h) is bound by its
 * vpdpbusd instructions (~500-900 GOP/s on two Xeon cores, 2026-12-07), and widening the
 * integers to bf16 for the bf16 tiles writes and reads twice the weights' bytes each call. One
 * TDPBSSD multiplies a 16x64 int8 tile by a 64x16 one into 16x16 int32 sums: 16,384 products.
 *
 * The price is the activations' grain: a tile sums 64 inputs at once, and a sum over K must stay
 * in int32 to keep that rate, so each activation row is quantized with one scale (its largest
 * magnitude / 127, rounded to nearest even), where the dots and VNNI take one per 32 inputs.
 * vLLM's CPU W8A8 does the same. Sums are exact integers (|sum| <= K x 127 x 127 < 2^31 for
 * K < 133,000); the result is float(sum) x row scale x weight scale (+ bias).
 *
 * Layout: the activations become A tiles (16 rows x 64 inputs, contiguous, rows padded to 16 and
 * inputs to a multiple of 64 with zeros); the weights of each 32 outputs are a strip of B tiles
 * (amx_pack_strip: row i of a tile holds inputs 4i..4i+3 of each of 16 outputs, a 16 x 16 transpose
 * of 4-byte words, ~3x faster than gathering them), then every row passes that strip, 32 rows at a
 * time into four C tiles. K must be a multiple of 16.
 *
 * The strips are packed once, at load (amx_pack_weights, Int8Linear.prepare), where the caller has
 * the copy: a batched decode step then streams them in order, prefetched, instead of transposing
 * 16 rows of the (N, K) weights per call (whose strided reads the prefetchers followed badly: a
 * 32-sequence decode step, 125M shape: 23.5 -> 19 ms). Without a copy each unit packs its
 * strip per call into a per-thread buffer.
 *
 * Include after ../_cpu_pool.h, x86-64 GCC only.
 */
#ifndef SELFHOST_INT8_TILES_AMX_H
#define SELFHOST_INT8_TILES_AMX_H

#include "../_amx_tiles.h"
#include "../_transpose_avx512.h"

#ifdef SELFHOST_AMX_TILES
#define AMX_STRIP 32 /* outputs per unit of work: two B tiles */
#define AMX_INT8_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16,amx-int8")))

/* AMX-INT8 granted here; set once, when the module loads. */
static int amx_int8_ready;

static int amx_int8_request(void) {
    return amx_request() && __builtin_cpu_supports("amx-int8");
}

typedef struct {
    const float *x;
    int8_t *xq;     /* A tiles: (Mp / 16) x (K64 / 64) tiles of 16 x 64 */
    float *xscale;  /* (Mp,) */
    Py_ssize_t M, K, K64;
} AmxQuantJob;

/* Rows [16t, 16t + 16) quantized, each with its own scale, into row tile t (zeros past M). */
AMX_INT8_TARGET static void amx_quantize_unit(const void *context, long t) {
    const AmxQuantJob *j = (const AmxQuantJob *)context;
    const Py_ssize_t kblocks = j->K64 / 64;
    for (Py_ssize_t m = (Py_ssize_t)t * 16; m < (Py_ssize_t)(t + 1) * 16; m++) {
        int8_t *row = j->xq + (Py_ssize_t)t * kblocks * AMX_TILE_ROWS * 64 + (m % 16) * 64; /* + kb * 1024 */
        if (m >= j->M) {
            for (Py_ssize_t kb = 0; kb < kblocks; kb++) memset(row + kb * 1024, 0, 64);
            j->xscale[m] = 0.0f;
            continue;
        }
        const float *x = j->x + m * j->K;
        __m512 most = _mm512_setzero_ps();
        for (Py_ssize_t k = 0; k < j->K; k += 16) most = _mm512_max_ps(most, _mm512_abs_ps(_mm512_loadu_ps(x + k))); /* K % 16 == 0 */
        const float amax = _mm512_reduce_max_ps(most);
        const __m512 inverse = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        for (Py_ssize_t kb = 0; kb < kblocks; kb++)
            for (int c = 0; c < 4; c++) {
                const Py_ssize_t k = kb * 64 + 16 * c; /* past K (a last half tile): zeros */
                const __m512 v = k < j->K ? _mm512_loadu_ps(x + k) : _mm512_setzero_ps();
                const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v, inverse));
                _mm_storeu_si128((__m128i *)(row + kb * 1024 + 16 * c), _mm512_cvtsepi32_epi8(q));
            }
        j->xscale[m] = amax / 127.0f;
    }
}

/* Outputs [n0, n0 + 32) of q (N, K) as B tiles: tile (g, kb) (at strip + (g * kblocks + kb) * 1024) row i
 * holds inputs 64kb + 4i .. + 3 of outputs n0 + 16g .. + 15; zeros past N and past K. */
AMX_INT8_TARGET static void amx_pack_strip(const int8_t *q, Py_ssize_t N, Py_ssize_t K, Py_ssize_t n0, int8_t *strip) {
    const Py_ssize_t kblocks = (K + 63) / 64;
    __m512i r[16];
    for (int g = 0; g < 2; g++)
        for (Py_ssize_t kb = 0; kb < kblocks; kb++) {
            const Py_ssize_t left = K - kb * 64;
            const __mmask64 inputs = left >= 64 ? ~(__mmask64)0 : ((__mmask64)1 << left) - 1;
            for (int i = 0; i < 16; i++) {
                const Py_ssize_t n = n0 + 16 * g + i;
                r[i] = n < N ? _mm512_maskz_loadu_epi8(inputs, q + n * K + kb * 64) : _mm512_setzero_si512();
            }
            transpose_16x16(r);
            int8_t *tile = strip + (g * kblocks + kb) * 1024;
            for (int c = 0; c < 16; c++) _mm512_store_si512(tile + 64 * c, r[c]);
        }
}

/* Bytes of the strips of an (N, K) weight: N rounded up to AMX_STRIP outputs, K to 64 inputs. */
static inline Py_ssize_t amx_packed_bytes(Py_ssize_t N, Py_ssize_t K) {
    return (N + AMX_STRIP - 1) / AMX_STRIP * AMX_STRIP * ((K + 63) / 64 * 64);
}

/* Every strip of q (N, K) into `packed` (amx_packed_bytes), strip s at s x AMX_STRIP x K64 bytes. */
AMX_INT8_TARGET static void amx_pack_weights(const int8_t *q, Py_ssize_t N, Py_ssize_t K, int8_t *packed) {
    const Py_ssize_t strip_bytes = AMX_STRIP * ((K + 63) / 64 * 64);
    for (Py_ssize_t n0 = 0; n0 < N; n0 += AMX_STRIP) amx_pack_strip(q, N, K, n0, packed + n0 / AMX_STRIP * strip_bytes);
}

typedef struct {
    const int8_t *xq;
    const float *xscale, *wscale, *bias;
    const int8_t *w;
    const int8_t *packed; /* w's strips (amx_pack_weights), or NULL: each unit packs its own */
    float *y;
    Py_ssize_t M, Mp, N, K, K64;
    int failed;
} AmxInt8Job;

/* C tile t (16 rows from m, 16 outputs from n) in staging to y: sums x row scale x weight scale + bias. */
AMX_INT8_TARGET static inline void amx_int8_store(const AmxInt8Job *j, const int32_t *staging, Py_ssize_t m,
                                                  Py_ssize_t n) {
    const Py_ssize_t cols = j->N - n < 16 ? j->N - n : 16;
    if (cols <= 0) return;
    const __mmask16 mask = (__mmask16)(cols >= 16 ? 0xffff : (1u << cols) - 1);
    const __m512 wscale = _mm512_maskz_loadu_ps(mask, j->wscale + n);
    const __m512 bias = j->bias ? _mm512_maskz_loadu_ps(mask, j->bias + n) : _mm512_setzero_ps();
    for (Py_ssize_t r = 0; r < 16 && m + r < j->M; r++) {
        const __m512 sums = _mm512_cvtepi32_ps(_mm512_load_si512(staging + 16 * r));
        const __m512 scaled = _mm512_mul_ps(_mm512_mul_ps(sums, _mm512_set1_ps(j->xscale[m + r])), wscale);
        _mm512_mask_storeu_ps(j->y + (m + r) * j->N + n, mask, _mm512_add_ps(scaled, bias));
    }
}

/* This thread's strip buffer, at least `bytes` long (kept between calls: allocating and freeing one per
 * unit had glibc's free take ~16% of a 32-row int8 decode step); NULL without memory. */
static int8_t *amx_strip_scratch(size_t bytes) {
    static _Thread_local int8_t *buffer;
    static _Thread_local size_t size;
    if (size < bytes) {
        free(buffer);
        size = 0;
        buffer = aligned_alloc(64, (bytes + 63) / 64 * 64);
        if (!buffer) return NULL;
        size = bytes;
    }
    return buffer;
}

/* C tiles 0-3 = the int32 sums over K of rows a0 (16 rows) and a0's next tile row (unless `single`) against
 * the 16 outputs of b0 and of b1: tile 0 (a0, b0), 1 (a0, b1), 2 (a1, b0), 3 (a1, b1). `prefetch`: the first
 * pass over tiles packed at load, read from memory (ask two tiles ahead). */
AMX_INT8_TARGET static inline __attribute__((always_inline)) void amx_int8_sums(const int8_t *a0, const int8_t *b0,
                                                                                const int8_t *b1, Py_ssize_t kblocks,
                                                                                int single, int prefetch) {
    const int8_t *a1 = a0 + kblocks * 1024;
    _tile_zero(0);
    _tile_zero(1);
    if (!single) {
        _tile_zero(2);
        _tile_zero(3);
    }
    for (Py_ssize_t kb = 0; kb < kblocks; kb++) {
        if (prefetch) {
            AMX_PREFETCH_TILE(b0 + (kb + 2) * 1024, _MM_HINT_T0);
            AMX_PREFETCH_TILE(b1 + (kb + 2) * 1024, _MM_HINT_T0);
        }
        _tile_loadd(4, a0 + kb * 1024, 64);
        _tile_loadd(6, b0 + kb * 1024, 64);
        _tile_loadd(7, b1 + kb * 1024, 64);
        _tile_dpbssd(0, 4, 6);
        _tile_dpbssd(1, 4, 7);
        if (!single) {
            _tile_loadd(5, a1 + kb * 1024, 64);
            _tile_dpbssd(2, 5, 6);
            _tile_dpbssd(3, 5, 7);
        }
    }
}

/* Unit s: outputs [32s, 32s + 32): their strip (packed at load, else here), then every row against it. */
AMX_INT8_TARGET static void amx_int8_unit(const void *context, long s) {
    AmxInt8Job *j = (AmxInt8Job *)context;
    const Py_ssize_t n0 = (Py_ssize_t)s * AMX_STRIP, kblocks = j->K64 / 64;
    const int8_t *strip = j->packed ? j->packed + (Py_ssize_t)s * 2 * kblocks * 1024 : NULL;
    if (!strip) {
        int8_t *scratch = amx_strip_scratch((size_t)(2 * kblocks * 1024));
        if (!scratch) {
            __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
            return;
        }
        amx_pack_strip(j->w, j->N, j->K, n0, scratch);
        strip = scratch;
    }
    const int8_t *b0 = strip, *b1 = strip + kblocks * 1024;
    int32_t staging[4][256] __attribute__((aligned(64)));
    amx_configure();
    for (Py_ssize_t m = 0; m < j->Mp; m += 32) {
        const int single = m + 32 > j->Mp;
        amx_int8_sums(j->xq + (m / 16) * kblocks * 1024, b0, b1, kblocks, single, j->packed && m == 0);
        _tile_stored(0, staging[0], 64);
        _tile_stored(1, staging[1], 64);
        amx_int8_store(j, staging[0], m, n0);
        amx_int8_store(j, staging[1], m, n0 + 16);
        if (!single) {
            _tile_stored(2, staging[2], 64);
            _tile_stored(3, staging[3], 64);
            amx_int8_store(j, staging[2], m + 16, n0);
            amx_int8_store(j, staging[3], m + 16, n0 + 16);
        }
    }
}

/* y (M, N) = quantized rows of x (M, K) @ q^T x scales (+ bias) on AMX-INT8, K % 16 == 0; `packed`: q's
 * strips (amx_pack_weights) or NULL. Without the GIL; -1 without memory. */
static int amx_int8_product(const float *x, const int8_t *q, const int8_t *packed, const float *wscale,
                            const float *bias, float *y, Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, int num_threads) {
    const Py_ssize_t Mp = (M + 15) / 16 * 16, K64 = (K + 63) / 64 * 64;
    int8_t *xq = aligned_alloc(64, (size_t)(Mp * K64) + 64);
    float *xscale = malloc(sizeof(float) * (size_t)Mp);
    if (!xq || !xscale) {
        free(xq), free(xscale);
        return -1;
    }
    const AmxQuantJob quantizing = {x, xq, xscale, M, K, K64};
    pool_run(amx_quantize_unit, &quantizing, (long)(Mp / 16), num_threads);
    AmxInt8Job job = {xq, xscale, wscale, bias, q, packed, y, M, Mp, N, K, K64, 0};
    pool_run(amx_int8_unit, &job, (long)((N + AMX_STRIP - 1) / AMX_STRIP), num_threads);
    free(xq), free(xscale);
    return job.failed ? -1 : 0;
}

/* ---- a SwiGLU MLP's gate|up product with its activation --------------------------------------
 * h = silu(gate) * up straight from the gate|up product's tiles: unit s pairs the gate's 16-output
 * group s with the up's group I/16 + s (packed tiles lie in 16-output groups, in order), so its C
 * tiles hold matching gate and up sums; each is scaled as amx_int8_store scales it and
 * ../layers/_swiglu_avx512.h's silu_times combines them, the bits the product, the SwiGLU pass
 * and the down product's quantizing give in three calls, without writing the (M, 2I) product out
 * and reading it back. */
typedef struct {
    const int8_t *xq;
    const float *xscale;
    const int8_t *packed; /* gate|up's tiles (amx_pack_weights), 2I outputs */
    const float *wscale;  /* gate|up's per-output scales */
    float *h;             /* (M, I) */
    Py_ssize_t M, Mp, I, K64;
} AmxSwigluJob;

/* Rows [m, m + 16) x intermediate columns [n, n + 16) of h from their gate and up sums. */
AMX_INT8_TARGET static inline void amx_swiglu_store(const AmxSwigluJob *j, const int32_t *gate_sums,
                                                    const int32_t *up_sums, Py_ssize_t m, Py_ssize_t n) {
    const __m512 gate_scale = _mm512_loadu_ps(j->wscale + n), up_scale = _mm512_loadu_ps(j->wscale + j->I + n);
    const __m512 no_bias = _mm512_setzero_ps(); /* added as amx_int8_store adds a missing bias */
    for (Py_ssize_t r = 0; r < 16 && m + r < j->M; r++) {
        const __m512 row_scale = _mm512_set1_ps(j->xscale[m + r]);
        const __m512 gate = _mm512_add_ps(
            _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(gate_sums + 16 * r)), row_scale), gate_scale),
            no_bias);
        const __m512 up = _mm512_add_ps(
            _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(up_sums + 16 * r)), row_scale), up_scale),
            no_bias);
        _mm512_storeu_ps(j->h + (m + r) * j->I + n, silu_times(gate, up));
    }
}

AMX_INT8_TARGET static void amx_swiglu_unit(const void *context, long s) {
    const AmxSwigluJob *j = (const AmxSwigluJob *)context;
    const Py_ssize_t kblocks = j->K64 / 64, n = (Py_ssize_t)s * 16;
    const int8_t *b0 = j->packed + (Py_ssize_t)s * kblocks * 1024, *b1 = j->packed + (j->I / 16 + s) * kblocks * 1024;
    int32_t staging[4][256] __attribute__((aligned(64)));
    amx_configure();
    for (Py_ssize_t m = 0; m < j->Mp; m += 32) {
        const int single = m + 32 > j->Mp;
        amx_int8_sums(j->xq + (m / 16) * kblocks * 1024, b0, b1, kblocks, single, m == 0);
        _tile_stored(0, staging[0], 64);
        _tile_stored(1, staging[1], 64);
        amx_swiglu_store(j, staging[0], staging[1], m, n);
        if (!single) {
            _tile_stored(2, staging[2], 64);
            _tile_stored(3, staging[3], 64);
            amx_swiglu_store(j, staging[2], staging[3], m + 16, n);
        }
    }
}

/* y (M, hidden) = down(silu(gate(x)) * up(x)) with gate|up's tiles packed (2I outputs, I % 32 == 0,
 * no bias) and down's (or NULL), hidden % 32 == 0. Without the GIL; -1 without memory. */
static int amx_swiglu_product(const float *x, const int8_t *gate_up_packed, const float *gate_up_scale,
                              const int8_t *down, const int8_t *down_packed, const float *down_scale,
                              const float *down_bias, float *y, Py_ssize_t M, Py_ssize_t I, Py_ssize_t hidden,
                              int num_threads) {
    const Py_ssize_t Mp = (M + 15) / 16 * 16, K64 = (hidden + 63) / 64 * 64;
    int8_t *xq = aligned_alloc(64, (size_t)(Mp * K64) + 64);
    float *xscale = malloc(sizeof(float) * (size_t)Mp), *h = malloc(sizeof(float) * (size_t)(M * I));
    if (!xq || !xscale || !h) {
        free(xq), free(xscale), free(h);
        return -1;
    }
    const AmxQuantJob quantizing = {x, xq, xscale, M, hidden, K64};
    pool_run(amx_quantize_unit, &quantizing, (long)(Mp / 16), num_threads);
    const AmxSwigluJob job = {xq, xscale, gate_up_packed, gate_up_scale, h, M, Mp, I, K64};
    pool_run(amx_swiglu_unit, &job, (long)(I / 16), num_threads);
    free(xq), free(xscale);
    const int rc = amx_int8_product(h, down, down_packed, down_scale, down_bias, y, M, hidden, I, num_threads);
    free(h);
    return rc;
}

#endif /* SELFHOST_AMX_TILES */
#endif /* SELFHOST_INT8_TILES_AMX_H */
