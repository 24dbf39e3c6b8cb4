/* fp32 products of activation rows with a weight matrix, y = x @ W^T, with AVX-512.
 *
 * Built at install time as an optional extension (setup.py); on CPUs with AVX-512
 * layers/linear.py uses it for every fp32 inference product (elsewhere:
 * _matvec_cpu.c for decode steps and numpy's OpenBLAS for the rest).
 *
 * Why our own: batched products are compute-bound and they are most of the time
 * of a batched CPU run. numpy's OpenBLAS runs its AVX2 kernels wherever it is told
 * to (OPENBLAS_CORETYPE=Haswell is a common pin), half of what an AVX-512 core
 * does; and its fixed split between threads stalls a whole step when another
 * process holds a core. Here the work is cut into column blocks that the caller
 * and the worker pool (../_cpu_pool.h) take from one counter, as in the matvec.
 *
 * Two algorithms, picked by the number of rows M:
 *  - few rows (decode steps, small batches, up to FEW_ROWS_MAX): dot products on
 *    weights read in place, a tile of weight rows kept in L1 against blocks of
 *    activation rows. No copy of any weight, so it streams a 1-row decode step at
 *    memory speed (~38 GB/s on two Zen 5 cores, ahead of the AVX2 matvec's ~33).
 *  - many rows (prompt chunks): the usual packed GEMM. A work unit is BLOCK_N
 *    weight rows; for each KC-wide slice of K they are packed into panels of
 *    PANEL columns, k-major (BLOCK_N x KC floats = 64 KiB, stays in L2), and a
 *    micro-kernel holds ROWS x PANEL outputs in 24 zmm registers, broadcasting
 *    one activation per row against two weight vectors per k.
 * Activations are read in place in both.
 *
 * Layouts: x (M, K), W (N, K), y (M, N), all contiguous fp32.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Up to this many rows the dot products win (gemm's default; callers may pass their own):
 * measured on a 2-core Zen 5 over a 125M model's layer weights, they match the packed
 * kernel at 256 rows (160 vs 167 ms) and lose at 384 (246 vs 228). Outside the x86 block:
 * gemm() parses it on every platform. */
#define FEW_ROWS_MAX 288

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__STDC_NO_ATOMICS__)
#define SELFHOST_GEMM 1
#include <immintrin.h>

#include "../_cpu_pool.h"
#include "../_kernel_capsules.h"
#include "_row_argmax_avx512.h"
#endif

#ifdef SELFHOST_GEMM

#define AVX512 __attribute__((target("avx512f")))
#define PANEL 32   /* output columns per micro-kernel: two zmm vectors */
#define ROWS 12    /* activation rows per micro-kernel: 12 x 2 accumulators */
#define BLOCK_N 64 /* output columns per unit of work */
#define KC 256     /* slice of K packed at a time */

typedef struct {
    const float *x, *w; /* w: fp32 (N, K); for gemm_bf16w, bf16 (N, K) held in the same pointer */
    float *y;
    Py_ssize_t M, N, K;
} Product;

/* w rows [n0, n0 + cols) x k in [k0, k0 + kc) -> panels of PANEL columns, k-major, zero-padded. */
static void pack_block(const Product *p, Py_ssize_t n0, int cols, Py_ssize_t k0, int kc, float *packed) {
    for (int panel = 0; panel * PANEL < cols; panel++) {
        float *dst = packed + (Py_ssize_t)panel * PANEL * kc;
        int width = cols - panel * PANEL < PANEL ? cols - panel * PANEL : PANEL;
        for (int c = 0; c < width; c++) {
            const float *src = p->w + (n0 + panel * PANEL + c) * p->K + k0;
            for (int k = 0; k < kc; k++) dst[k * PANEL + c] = src[k];
        }
        for (int c = width; c < PANEL; c++)
            for (int k = 0; k < kc; k++) dst[k * PANEL + c] = 0.0f;
    }
}

/* y[m0:m0+rows, n0:n0+width] (+)= x[m0:m0+rows, k0:k0+kc] @ panel. `rows` is a
 * compile-time constant at every call site, so the accumulators live in registers. */
AVX512 static inline __attribute__((always_inline)) void micro_kernel(const int rows, const Product *p, Py_ssize_t m0,
                                                                      Py_ssize_t n0, int width, Py_ssize_t k0, int kc,
                                                                      const float *panel, int accumulate) {
    __m512 acc[ROWS][2];
    for (int r = 0; r < rows; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    const float *x = p->x + m0 * p->K + k0;
    const Py_ssize_t K = p->K;
    for (int k = 0; k < kc; k++) {
        __m512 w0 = _mm512_load_ps(panel + k * PANEL), w1 = _mm512_load_ps(panel + k * PANEL + 16);
        for (int r = 0; r < rows; r++) {
            __m512 xv = _mm512_set1_ps(x[r * K + k]);
            acc[r][0] = _mm512_fmadd_ps(xv, w0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(xv, w1, acc[r][1]);
        }
    }
    __mmask16 mask0 = width >= 16 ? 0xffff : (__mmask16)((1u << width) - 1);
    __mmask16 mask1 = width >= 32 ? 0xffff : width <= 16 ? 0 : (__mmask16)((1u << (width - 16)) - 1);
    for (int r = 0; r < rows; r++) {
        float *y = p->y + (m0 + r) * p->N + n0;
        if (accumulate) {
            acc[r][0] = _mm512_add_ps(acc[r][0], _mm512_maskz_loadu_ps(mask0, y));
            acc[r][1] = _mm512_add_ps(acc[r][1], _mm512_maskz_loadu_ps(mask1, y + 16));
        }
        _mm512_mask_storeu_ps(y, mask0, acc[r][0]);
        _mm512_mask_storeu_ps(y + 16, mask1, acc[r][1]);
    }
}

#define KERNEL_CASE(n) \
    case n: micro_kernel(n, p, m0, n0, width, k0, kc, panel, accumulate); break;

AVX512 static void rows_kernel(int rows, const Product *p, Py_ssize_t m0, Py_ssize_t n0, int width, Py_ssize_t k0,
                               int kc, const float *panel, int accumulate) {
    switch (rows) {
        KERNEL_CASE(1) KERNEL_CASE(2) KERNEL_CASE(3) KERNEL_CASE(4) KERNEL_CASE(5) KERNEL_CASE(6)
        KERNEL_CASE(7) KERNEL_CASE(8) KERNEL_CASE(9) KERNEL_CASE(10) KERNEL_CASE(11) KERNEL_CASE(12)
    }
}

static _Thread_local float packed[BLOCK_N * KC] __attribute__((aligned(64)));

AVX512 static void run_unit(const void *product, long unit) {
    const Product *p = (const Product *)product;
    Py_ssize_t n0 = (Py_ssize_t)unit * BLOCK_N;
    int cols = p->N - n0 < BLOCK_N ? (int)(p->N - n0) : BLOCK_N;
    for (Py_ssize_t k0 = 0; k0 < p->K; k0 += KC) {
        int kc = p->K - k0 < KC ? (int)(p->K - k0) : KC;
        pack_block(p, n0, cols, k0, kc, packed);
        for (Py_ssize_t m0 = 0; m0 < p->M; m0 += ROWS) {
            int rows = p->M - m0 < ROWS ? (int)(p->M - m0) : ROWS;
            for (int panel = 0; panel * PANEL < cols; panel++) {
                int width = cols - panel * PANEL < PANEL ? cols - panel * PANEL : PANEL;
                rows_kernel(rows, p, m0, n0 + panel * PANEL, width, k0, kc, packed + (Py_ssize_t)panel * PANEL * kc,
                            k0 > 0);
            }
        }
    }
}

/* ---- few rows: dot products, weights read in place -------------------------------
 * With few activation rows, packing the weights costs more than the product (a
 * pass over every weight per call: 53 ms against 11 for a 1-row step of a 125M
 * model). Instead a tile of W_TILE weight rows stays in L1
 * while blocks of up to DOT_ROWS activation rows meet it; each output is a dot
 * product accumulated along k in one zmm, reduced at the end. The first row block
 * prefetches the rows after the tile: at a few rows the product is memory-bound. */
#define W_TILE 4
#define DOT_ROWS 6
#define CHUNK_ROWS 32       /* weight rows per unit of work */
#define PREFETCH_BYTES 8192 /* how far ahead of a weight row to ask for its cache lines */

/* The sums of a, b, c and d as one 4-float vector. A transpose-reduce shares its shuffles between the
 * four dot products: 13 instructions where four _mm512_reduce_add_ps take 32. At small K (a 160-wide
 * model: 10 FMAs an output) the reductions had cost about as much as the products. Each sum is
 * formed in the same order whichever vectors sit beside it, so an output does not depend on M. */
AVX512 static inline __attribute__((always_inline)) __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
    /* each 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3], then [a, b, c, d] */
    __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    __m512 s = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
    /* the four lanes: (0 + 2) + (1 + 3) */
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

AVX512 static inline __attribute__((always_inline)) void dot_kernel(const int rows, const int cols, const Product *p,
                                                                    Py_ssize_t m0, Py_ssize_t n0, int prefetch) {
    const Py_ssize_t K = p->K;
    const float *w = p->w + n0 * K, *x = p->x + m0 * K;
    __m512 acc[DOT_ROWS][W_TILE];
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) acc[r][c] = _mm512_setzero_ps();
    Py_ssize_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 wv[W_TILE];
        for (int c = 0; c < cols; c++) {
            if (prefetch) _mm_prefetch((const char *)(w + c * K + k) + PREFETCH_BYTES, _MM_HINT_T0);
            wv[c] = _mm512_loadu_ps(w + c * K + k);
        }
        for (int r = 0; r < rows; r++) {
            __m512 xv = _mm512_loadu_ps(x + r * K + k);
            for (int c = 0; c < cols; c++) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
        }
    }
    if (k < K) {
        __mmask16 tail = (__mmask16)((1u << (K - k)) - 1);
        __m512 wv[W_TILE];
        for (int c = 0; c < cols; c++) wv[c] = _mm512_maskz_loadu_ps(tail, w + c * K + k);
        for (int r = 0; r < rows; r++) {
            __m512 xv = _mm512_maskz_loadu_ps(tail, x + r * K + k);
            for (int c = 0; c < cols; c++) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
        }
    }
    for (int r = 0; r < rows; r++) {
        float *y = p->y + (m0 + r) * p->N + n0;
        if (cols == W_TILE)
            _mm_storeu_ps(y, reduce4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
        else
            for (int c = 0; c < cols; c++) y[c] = _mm512_reduce_add_ps(acc[r][c]);
    }
}

#define DOT_CASE(r, c) \
    case r * 8 + c: dot_kernel(r, c, p, m0, n0, prefetch); break;
#define DOT_CASES(r) DOT_CASE(r, 1) DOT_CASE(r, 2) DOT_CASE(r, 3) DOT_CASE(r, 4)

AVX512 static void dot_tile(int rows, int cols, const Product *p, Py_ssize_t m0, Py_ssize_t n0, int prefetch) {
    switch (rows * 8 + cols) {
        DOT_CASES(1) DOT_CASES(2) DOT_CASES(3) DOT_CASES(4) DOT_CASES(5) DOT_CASES(6)
    }
}

static void run_dot_chunk(const void *product, long chunk) {
    const Product *p = (const Product *)product;
    Py_ssize_t end = ((Py_ssize_t)chunk + 1) * CHUNK_ROWS < p->N ? ((Py_ssize_t)chunk + 1) * CHUNK_ROWS : p->N;
    for (Py_ssize_t n = (Py_ssize_t)chunk * CHUNK_ROWS; n < end; n += W_TILE) {
        int cols = end - n < W_TILE ? (int)(end - n) : W_TILE;
        for (Py_ssize_t m0 = 0; m0 < p->M; m0 += DOT_ROWS)
            dot_tile(p->M - m0 < DOT_ROWS ? (int)(p->M - m0) : DOT_ROWS, cols, p, m0, n, m0 == 0);
    }
}

/* ---- few rows, bf16 weights: the same dot products on half the bytes -------------
 * A 64-byte load holds 32 bf16 weights as 16 pairs; a bf16 value is the top half of
 * an fp32, so the pair (w[2i], w[2i+1]) of lane i widens exactly as lane << 16 and
 * lane & 0xffff0000, with no shuffles. The activation rows are split once per call
 * into matching even/odd halves per 32 values (x_pairs), so each step is one weight
 * load, two bit operations and two FMAs per row. K % 32 leftovers are widened one
 * by one (zero-extend, shift) from the rows as given. */
#define AVX512BW __attribute__((target("avx512f,avx512bw,avx512vl")))

typedef struct {
    Product product; /* w points at bf16 values */
    const float *x_pairs; /* each row's first K/32*32 values as [16 even, 16 odd] per 32 */
} ProductBf16w;

AVX512BW static inline __attribute__((always_inline)) void dot_kernel_bf16w(const int rows, const int cols,
                                                                            const ProductBf16w *q, Py_ssize_t m0,
                                                                            Py_ssize_t n0, int prefetch) {
    const Product *p = &q->product;
    const Py_ssize_t K = p->K, K32 = K & ~(Py_ssize_t)31;
    const uint16_t *w = (const uint16_t *)p->w + n0 * K;
    const float *x = p->x + m0 * K, *xp = q->x_pairs + m0 * K32;
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    __m512 acc[DOT_ROWS][W_TILE];
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) acc[r][c] = _mm512_setzero_ps();
    for (Py_ssize_t k = 0; k < K32; k += 32) {
        __m512 even[W_TILE], odd[W_TILE];
        for (int c = 0; c < cols; c++) {
            if (prefetch) _mm_prefetch((const char *)(w + c * K + k) + PREFETCH_BYTES, _MM_HINT_T0);
            __m512i pairs = _mm512_loadu_si512((const void *)(w + c * K + k));
            even[c] = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
            odd[c] = _mm512_castsi512_ps(_mm512_and_si512(pairs, high));
        }
        for (int r = 0; r < rows; r++) {
            __m512 xe = _mm512_loadu_ps(xp + r * K32 + k), xo = _mm512_loadu_ps(xp + r * K32 + k + 16);
            for (int c = 0; c < cols; c++) {
                acc[r][c] = _mm512_fmadd_ps(xe, even[c], acc[r][c]);
                acc[r][c] = _mm512_fmadd_ps(xo, odd[c], acc[r][c]);
            }
        }
    }
    for (Py_ssize_t k = K32; k < K; k += 16) {
        __mmask16 mask = K - k >= 16 ? 0xffff : (__mmask16)((1u << (K - k)) - 1);
        __m512 wv[W_TILE];
        for (int c = 0; c < cols; c++) {
            __m256i halves = _mm256_maskz_loadu_epi16(mask, w + c * K + k);
            wv[c] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
        }
        for (int r = 0; r < rows; r++) {
            __m512 xv = _mm512_maskz_loadu_ps(mask, x + r * K + k);
            for (int c = 0; c < cols; c++) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
        }
    }
    for (int r = 0; r < rows; r++) {
        float *y = p->y + (m0 + r) * p->N + n0;
        for (int c = 0; c < cols; c++) y[c] = _mm512_reduce_add_ps(acc[r][c]);
    }
}

#define DOT_BF16W_CASE(r, c) \
    case r * 8 + c: dot_kernel_bf16w(r, c, q, m0, n0, prefetch); break;
#define DOT_BF16W_CASES(r) DOT_BF16W_CASE(r, 1) DOT_BF16W_CASE(r, 2) DOT_BF16W_CASE(r, 3) DOT_BF16W_CASE(r, 4)

AVX512BW static void run_dot_chunk_bf16w(const void *product, long chunk) {
    const ProductBf16w *q = (const ProductBf16w *)product;
    const Product *p = &q->product;
    Py_ssize_t end = ((Py_ssize_t)chunk + 1) * CHUNK_ROWS < p->N ? ((Py_ssize_t)chunk + 1) * CHUNK_ROWS : p->N;
    for (Py_ssize_t n0 = (Py_ssize_t)chunk * CHUNK_ROWS; n0 < end; n0 += W_TILE) {
        int cols = end - n0 < W_TILE ? (int)(end - n0) : W_TILE;
        for (Py_ssize_t m0 = 0; m0 < p->M; m0 += DOT_ROWS) {
            int rows = p->M - m0 < DOT_ROWS ? (int)(p->M - m0) : DOT_ROWS, prefetch = m0 == 0;
            switch (rows * 8 + cols) {
                DOT_BF16W_CASES(1) DOT_BF16W_CASES(2) DOT_BF16W_CASES(3) DOT_BF16W_CASES(4) DOT_BF16W_CASES(5)
                DOT_BF16W_CASES(6)
            }
        }
    }
}

/* x (M, K) -> per row, each block of 32 values as its 16 even-indexed then its 16 odd-indexed ones. */
static void split_pairs(const float *x, Py_ssize_t M, Py_ssize_t K, float *x_pairs) {
    const Py_ssize_t K32 = K & ~(Py_ssize_t)31;
    for (Py_ssize_t m = 0; m < M; m++)
        for (Py_ssize_t k = 0; k < K32; k += 32)
            for (int i = 0; i < 16; i++) {
                x_pairs[m * K32 + k + i] = x[m * K + k + 2 * i];
                x_pairs[m * K32 + k + 16 + i] = x[m * K + k + 2 * i + 1];
            }
}

static int cpu_has_avx512(void) {
    __builtin_cpu_init();
    /* BW and VL: the masked 16-bit loads of bf16 weights (every AVX-512 server CPU since Skylake-SP has them). */
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
}

/* Without the GIL: the Python wrappers' work, also the decode-step runner's (../_kernel_capsules.h). */
static void gemm_rows(const float *x, const float *w, float *y, Py_ssize_t M, Py_ssize_t N, Py_ssize_t K,
                      int num_threads, int few_rows_max) {
    Product p = {x, w, y, M, N, K};
    if (K == 0) {
        memset(y, 0, (size_t)(M * N) * sizeof(float));
        return;
    }
    int few_rows = M <= few_rows_max;
    long num_units = (long)(few_rows ? (N + CHUNK_ROWS - 1) / CHUNK_ROWS : (N + BLOCK_N - 1) / BLOCK_N);
    pool_run(few_rows ? run_dot_chunk : run_unit, &p, M > 0 ? num_units : 0, num_threads < 1 ? 1 : num_threads);
}

static void gemm_default(const float *x, const float *w, float *y, Py_ssize_t M, Py_ssize_t N, Py_ssize_t K,
                         int num_threads) {
    gemm_rows(x, w, y, M, N, K, num_threads, FEW_ROWS_MAX);
}

/* -1 when the activations' pair copy could not be had. */
static int gemm_bf16w_rows(const float *x, const uint16_t *w, float *y, Py_ssize_t M, Py_ssize_t N, Py_ssize_t K,
                           int num_threads) {
    const Py_ssize_t K32 = K & ~(Py_ssize_t)31;
    float *x_pairs = K32 ? malloc((size_t)(M * K32) * sizeof(float)) : NULL;
    if (K32 && M && !x_pairs) return -1;
    ProductBf16w q = {{x, (const float *)w, y, M, N, K}, x_pairs};
    long num_units = (long)((N + CHUNK_ROWS - 1) / CHUNK_ROWS);
    if (x_pairs) split_pairs(x, M, K, x_pairs);
    pool_run(run_dot_chunk_bf16w, &q, M > 0 ? num_units : 0, num_threads < 1 ? 1 : num_threads);
    free(x_pairs);
    return 0;
}

static GemmKernels kernels = {SELFHOST_KERNELS_VERSION, gemm_default, gemm_bf16w_rows};

#endif /* SELFHOST_GEMM */

static PyObject *available(PyObject *self, PyObject *args) {
    (void)self, (void)args;
#ifdef SELFHOST_GEMM
    return PyBool_FromLong(cpu_has_avx512());
#else
    Py_RETURN_FALSE;
#endif
}

static PyObject *gemm(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x, w, y;
    Py_ssize_t M, N, K;
    int num_threads, few_rows_max = FEW_ROWS_MAX;
    if (!PyArg_ParseTuple(args, "KKKnnni|i", &x, &w, &y, &M, &N, &K, &num_threads, &few_rows_max)) return NULL;
#ifdef SELFHOST_GEMM
    if (M < 0 || N < 0 || K < 0 || N >= ((Py_ssize_t)1 << 31) * BLOCK_N) {
        PyErr_SetString(PyExc_ValueError, "gemm: sizes out of range");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    gemm_rows((const float *)x, (const float *)w, (float *)y, M, N, K, num_threads, few_rows_max);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
#else
    (void)x, (void)w, (void)y, (void)M, (void)N, (void)K, (void)num_threads;
    PyErr_SetString(PyExc_RuntimeError, "gemm: built without x86-64 support");
    return NULL;
#endif
}

/* gemm(), then each row's argmax (row_argmax) as a list: a greedy decode step's tokens. */
static PyObject *gemm_argmax(PyObject *self, PyObject *args) {
    PyObject *none = gemm(self, args);
    if (!none) return NULL;
    Py_DECREF(none);
#ifdef SELFHOST_GEMM
    unsigned long long x, w, y;
    Py_ssize_t M, N, K;
    int num_threads, few_rows_max = FEW_ROWS_MAX;
    if (!PyArg_ParseTuple(args, "KKKnnni|i", &x, &w, &y, &M, &N, &K, &num_threads, &few_rows_max)) return NULL;
    return rows_argmax((const float *)y, M, N);
#else
    return NULL; /* gemm() raised */
#endif
}

static PyObject *gemm_bf16w(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x, w, y;
    Py_ssize_t M, N, K;
    int num_threads;
    if (!PyArg_ParseTuple(args, "KKKnnni", &x, &w, &y, &M, &N, &K, &num_threads)) return NULL;
#ifdef SELFHOST_GEMM
    if (M < 0 || N < 0 || K < 0 || N >= ((Py_ssize_t)1 << 31) * CHUNK_ROWS) {
        PyErr_SetString(PyExc_ValueError, "gemm_bf16w: sizes out of range");
        return NULL;
    }
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = gemm_bf16w_rows((const float *)x, (const uint16_t *)w, (float *)y, M, N, K, num_threads);
    Py_END_ALLOW_THREADS
    if (status < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
#else
    (void)x, (void)w, (void)y, (void)M, (void)N, (void)K, (void)num_threads;
    PyErr_SetString(PyExc_RuntimeError, "gemm_bf16w: built without x86-64 support");
    return NULL;
#endif
}

static PyMethodDef methods[] = {
    {"available", available, METH_NOARGS, "True when this CPU has AVX-512F/BW/VL and the kernel was built for it."},
    {"gemm", gemm, METH_VARARGS, "y = x @ W^T for fp32 contiguous tensors passed as data pointers."},
    {"gemm_argmax", gemm_argmax, METH_VARARGS,
     "gemm(), then each row's first largest value's index (the first NaN's where a row has one), as a list."},
    {"gemm_bf16w", gemm_bf16w, METH_VARARGS,
     "y = x @ W^T for fp32 x and y and bf16 W (contiguous, data pointers): dot products, for few rows of x."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_gemm_cpu", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__gemm_cpu(void) {
#ifdef SELFHOST_GEMM
    if (pool_import() < 0) return NULL; /* the process's one worker pool (../_cpu_pool.h) */
#endif
    PyObject *m = PyModule_Create(&module);
#ifdef SELFHOST_GEMM
    if (m && cpu_has_avx512() && kernels_export(m, "selfhost.layers._gemm_cpu._kernels", &kernels) < 0) Py_CLEAR(m);
#endif
    return m;
}
