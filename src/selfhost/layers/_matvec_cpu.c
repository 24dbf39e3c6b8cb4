/* fp32 products of a few activation rows with a weight matrix: y = x @ W^T, on CPU.
 *
 * Built at install time as an optional extension (setup.py); layers/linear.py
 * uses it for steps of up to 31 rows (decode) and numpy's BLAS otherwise.
 *
 * Why not the BLAS: a decode step streams every weight once, so speed is
 * memory bandwidth. Two things were measured on this class of machine:
 *  - software prefetching a few KiB ahead of the rows being read streams
 *    faster than the hardware prefetcher alone (as in quant/_int8_cpu.c);
 *  - OpenBLAS splits a product between its threads in fixed shares, so when
 *    another process holds a core the caller waits for a descheduled worker
 *    and a step takes 10-40x longer.
 * Here the caller and a persistent worker pool take chunks of weight rows from
 * one atomic counter until none are left. A worker that is not running simply
 * takes no chunks: the caller does the whole product itself, at one-thread
 * speed, and never waits for a chunk nobody started.
 *
 * Layouts: x (M, K), W (N, K), y (M, N), all contiguous fp32.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__STDC_NO_ATOMICS__)
#define SELFHOST_MATVEC 1
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#endif

#ifdef SELFHOST_MATVEC

#define AVX2 __attribute__((target("avx2,fma")))
#define TILE 4              /* weight rows whose dot products are formed together */
#define CHUNK_ROWS 32       /* weight rows per unit of work taken from the counter */
#define PREFETCH_BYTES 8192 /* how far ahead of each weight row to ask for cache lines */
#define MAX_WORKERS 63
#define SPIN_PAUSES 20000   /* ~10-50 us of pause before a waiting worker starts yielding */
#define SPIN_YIELDS 200     /* then this many sched_yield()s before it sleeps */

typedef struct {
    const float *x, *w;
    float *y;
    Py_ssize_t M, N, K;
} Product;

AVX2 static float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* y[m, n0:n0+rows] for every m: the tile's weight rows stay in L1 while each activation row meets them. */
AVX2 static void tile_dots(const Product *p, Py_ssize_t n0, int rows) {
    const Py_ssize_t K = p->K, vec_k = K & ~(Py_ssize_t)7;
    const float *w = p->w + n0 * K;
    for (Py_ssize_t m = 0; m < p->M; m++) {
        const float *x = p->x + m * K;
        float *y = p->y + m * p->N + n0;
        if (rows == TILE) {
            const float *w0 = w, *w1 = w + K, *w2 = w + 2 * K, *w3 = w + 3 * K;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (Py_ssize_t k = 0; k < vec_k; k += 8) {
                if (m == 0 && (k & 15) == 0) { /* one prefetch per 64-byte line, first pass only */
                    _mm_prefetch((const char *)(w0 + k) + PREFETCH_BYTES, _MM_HINT_T0);
                    _mm_prefetch((const char *)(w1 + k) + PREFETCH_BYTES, _MM_HINT_T0);
                    _mm_prefetch((const char *)(w2 + k) + PREFETCH_BYTES, _MM_HINT_T0);
                    _mm_prefetch((const char *)(w3 + k) + PREFETCH_BYTES, _MM_HINT_T0);
                }
                __m256 xv = _mm256_loadu_ps(x + k);
                a0 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w0 + k), a0);
                a1 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w1 + k), a1);
                a2 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w2 + k), a2);
                a3 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w3 + k), a3);
            }
            float d0 = hsum(a0), d1 = hsum(a1), d2 = hsum(a2), d3 = hsum(a3);
            for (Py_ssize_t k = vec_k; k < K; k++) {
                d0 += x[k] * w0[k], d1 += x[k] * w1[k], d2 += x[k] * w2[k], d3 += x[k] * w3[k];
            }
            y[0] = d0, y[1] = d1, y[2] = d2, y[3] = d3;
        } else {
            for (int r = 0; r < rows; r++) {
                const float *wr = w + r * K;
                __m256 acc = _mm256_setzero_ps();
                for (Py_ssize_t k = 0; k < vec_k; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_loadu_ps(wr + k), acc);
                float d = hsum(acc);
                for (Py_ssize_t k = vec_k; k < K; k++) d += x[k] * wr[k];
                y[r] = d;
            }
        }
    }
}

static void run_chunk(const Product *p, Py_ssize_t chunk) {
    Py_ssize_t end = (chunk + 1) * CHUNK_ROWS < p->N ? (chunk + 1) * CHUNK_ROWS : p->N;
    for (Py_ssize_t n = chunk * CHUNK_ROWS; n < end; n += TILE) tile_dots(p, n, end - n < TILE ? (int)(end - n) : TILE);
}

/* ---- the pool ----
 * `ticket` holds (generation << 32 | next chunk). Taking a chunk is a compare-and-swap
 * that only succeeds for the current generation, so a worker that wakes up late can never
 * take part of a newer product. The caller returns once every chunk has been done. */
static struct {
    pthread_t threads[MAX_WORKERS];
    int num_workers;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    _Atomic uint64_t ticket;
    _Atomic long done;
    _Atomic int sleepers;
    _Atomic int participants; /* workers with index below this may take chunks */
    Product product;
    long num_chunks;
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static int take_chunk(uint32_t generation, long num_chunks, long *chunk) {
    uint64_t seen = atomic_load(&pool.ticket);
    for (;;) {
        if ((uint32_t)(seen >> 32) != generation || (long)(seen & 0xffffffffu) >= num_chunks) return 0;
        if (atomic_compare_exchange_weak(&pool.ticket, &seen, seen + 1)) {
            *chunk = (long)(seen & 0xffffffffu);
            return 1;
        }
    }
}

static void work(uint32_t generation) {
    Product p = pool.product;
    long num_chunks = pool.num_chunks, chunk;
    while (take_chunk(generation, num_chunks, &chunk)) {
        run_chunk(&p, chunk);
        atomic_fetch_add(&pool.done, 1);
    }
}

static void *worker_main(void *arg) {
    int index = (int)(intptr_t)arg;
    uint32_t seen = (uint32_t)(atomic_load(&pool.ticket) >> 32);
    for (;;) {
        uint32_t generation;
        long spins = 0;
        while ((generation = (uint32_t)(atomic_load(&pool.ticket) >> 32)) == seen) {
            if (spins < SPIN_PAUSES) {
                _mm_pause();
            } else if (spins < SPIN_PAUSES + SPIN_YIELDS) {
                sched_yield();
            } else {
                pthread_mutex_lock(&pool.lock);
                atomic_fetch_add(&pool.sleepers, 1);
                while ((uint32_t)(atomic_load(&pool.ticket) >> 32) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
                atomic_fetch_sub(&pool.sleepers, 1);
                pthread_mutex_unlock(&pool.lock);
            }
            spins++;
        }
        seen = generation;
        if (index < atomic_load(&pool.participants)) work(generation);
    }
    return NULL;
}

static void start_workers(int wanted) {
    if (wanted > MAX_WORKERS) wanted = MAX_WORKERS;
    while (pool.num_workers < wanted) {
        if (pthread_create(&pool.threads[pool.num_workers], NULL, worker_main, (void *)(intptr_t)pool.num_workers) != 0)
            break; /* fewer helpers: the caller still does every remaining chunk */
        pthread_detach(pool.threads[pool.num_workers]);
        pool.num_workers++;
    }
}

static void multiply(const Product *p, int num_threads) {
    long num_chunks = (long)((p->N + CHUNK_ROWS - 1) / CHUNK_ROWS);
    if (num_threads > 1) start_workers(num_threads - 1);
    int helpers = num_threads - 1 < pool.num_workers ? num_threads - 1 : pool.num_workers;
    if (helpers <= 0 || num_chunks < 2) {
        for (long c = 0; c < num_chunks; c++) run_chunk(p, c);
        return;
    }
    pool.product = *p;
    pool.num_chunks = num_chunks;
    atomic_store(&pool.done, 0);
    atomic_store(&pool.participants, helpers);
    uint32_t generation = (uint32_t)(atomic_load(&pool.ticket) >> 32) + 1;
    atomic_store(&pool.ticket, (uint64_t)generation << 32); /* publishes the product: chunk 0 of a new generation */
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
    work(generation);
    /* Only chunks a worker has already taken can be outstanding; each is a few microseconds of work. */
    for (long spins = 0; atomic_load(&pool.done) < num_chunks; spins++) {
        if (spins < SPIN_PAUSES)
            _mm_pause();
        else
            sched_yield();
    }
}

static int cpu_has_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

#endif /* SELFHOST_MATVEC */

static PyObject *available(PyObject *self, PyObject *args) {
    (void)self, (void)args;
#ifdef SELFHOST_MATVEC
    return PyBool_FromLong(cpu_has_avx2());
#else
    Py_RETURN_FALSE;
#endif
}

static PyObject *matvec(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x, w, y;
    Py_ssize_t M, N, K;
    int num_threads;
    if (!PyArg_ParseTuple(args, "KKKnnni", &x, &w, &y, &M, &N, &K, &num_threads)) return NULL;
#ifdef SELFHOST_MATVEC
    if (M < 0 || N < 0 || K < 0 || N >= ((Py_ssize_t)1 << 31) * CHUNK_ROWS) {
        PyErr_SetString(PyExc_ValueError, "matvec: sizes out of range");
        return NULL;
    }
    Product p = {(const float *)x, (const float *)w, (float *)y, M, N, K};
    /* One product at a time: the pool has one slot. The GIL serialises callers; it is released
     * only around the work, under this lock. */
    static pthread_mutex_t one_caller = PTHREAD_MUTEX_INITIALIZER;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&one_caller);
    multiply(&p, num_threads < 1 ? 1 : num_threads);
    pthread_mutex_unlock(&one_caller);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
#else
    (void)x, (void)w, (void)y, (void)M, (void)N, (void)K, (void)num_threads;
    PyErr_SetString(PyExc_RuntimeError, "matvec: built without x86-64 AVX2 support");
    return NULL;
#endif
}

static PyMethodDef methods[] = {
    {"available", available, METH_NOARGS, "True when this CPU has AVX2 and FMA and the kernel was built for it."},
    {"matvec", matvec, METH_VARARGS, "y = x @ W^T for fp32 contiguous tensors passed as data pointers."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_matvec_cpu", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__matvec_cpu(void) { return PyModule_Create(&module); }
