/* The one worker pool every selfhost CPU kernel runs its chunks on.
 *
 * The caller and its workers take chunks of one job from an atomic counter until
 * none are left. Why not fixed shares per thread (as OpenBLAS does, or as
 * pthread_create per call would): when another process holds a core, the caller
 * then waits for a descheduled thread and a decode step takes 10-40x longer. Here
 * a worker that is not running takes no chunks, the caller does them all at
 * one-thread speed, and it only ever waits for chunks a worker has already
 * started (a few microseconds each). Workers spin briefly between jobs, then
 * yield, then sleep; they start on first use and live for the process.
 *
 * One pool per process: this file is built as its own extension
 * (selfhost._cpu_pool) and the kernel extensions reach `pool_run` through a
 * capsule (see _cpu_pool.h), so a process has one set of workers, not one per
 * kernel module. The number of threads is the caller's argument on every call:
 * the pool holds no thread-count setting of its own.
 *
 * Publishing a job. `ticket` holds (generation << 32 | next chunk); a take is a
 * compare-and-swap that succeeds only for the generation the taker woke up for
 * and a chunk below the job's size. A new job first closes the finished
 * generation's ticket (next chunk = POOL_CLOSED, above any job size), then writes
 * the job's fields (release), then opens the next generation at chunk 0. A late
 * worker that read any field of the new job has therefore already been ordered
 * after the close, and its take for the old generation fails: it can never run a
 * chunk of the new job with the old job's context (or the reverse), nor count a
 * chunk towards the new job's `done`.
 *
 * Built with -DSELFHOST_POOL_NO_PYTHON it is plain C (tests/c/pool_stress_main.c
 * builds it that way under ThreadSanitizer).
 */
#ifndef SELFHOST_POOL_NO_PYTHON
/* Before any system header, as Python asks: it sets feature macros (_POSIX_C_SOURCE, ...)
 * that those headers read, and Debian's aarch64 pyconfig.h warns when they came first. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#endif
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>

#define SELFHOST_POOL_IMPLEMENTATION_ONLY /* the pool itself, not a client of it */
#include "_cpu_pool.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield" ::: "memory")
#else
#define cpu_relax() atomic_signal_fence(memory_order_seq_cst)
#endif

#define POOL_MAX_WORKERS 63
#define POOL_MAX_CHUNKS 0x7fffffffL
#define POOL_CLOSED 0xffffffffu /* the chunk field of a closed ticket: no take can succeed */
#define POOL_SPIN_PAUSES 2000   /* ~20-50 us of pause before a waiting thread starts yielding */
#define POOL_SPIN_YIELDS 200    /* then this many sched_yield()s before a worker sleeps */

static struct {
    pthread_t threads[POOL_MAX_WORKERS];
    int num_workers;
    pthread_mutex_t lock, one_caller;
    pthread_cond_t wake;
    /* Each on a cache line of its own: every take writes `ticket`, every finish `done`, and the
     * waiting caller reads `done`; sharing one line made the two cores hand it back and forth. */
    _Alignas(64) _Atomic uint64_t ticket;
    _Alignas(64) _Atomic long done;
    _Alignas(64) _Atomic int sleepers;
    _Atomic int participants; /* workers with index below this may take chunks */
    _Atomic(pool_chunk_fn) fn;
    _Atomic(const void *) context;
    _Atomic long num_chunks;
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .one_caller = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static uint32_t generation_of(uint64_t ticket) { return (uint32_t)(ticket >> 32); }

static int take_chunk(uint32_t generation, long num_chunks, long *chunk) {
    uint64_t seen = atomic_load(&pool.ticket);
    for (;;) {
        if (generation_of(seen) != generation || (long)(seen & 0xffffffffu) >= num_chunks) return 0;
        if (atomic_compare_exchange_weak(&pool.ticket, &seen, seen + 1)) {
            *chunk = (long)(seen & 0xffffffffu);
            return 1;
        }
    }
}

static void work_on(uint32_t generation) {
    pool_chunk_fn fn = atomic_load_explicit(&pool.fn, memory_order_acquire);
    const void *context = atomic_load_explicit(&pool.context, memory_order_acquire);
    long num_chunks = atomic_load_explicit(&pool.num_chunks, memory_order_acquire), chunk;
    /* Fields of a later job are only visible after its close: the take then fails. */
    long finished = 0;
    while (take_chunk(generation, num_chunks, &chunk)) {
        fn(context, chunk);
        finished++;
    }
    /* once, after this thread's last chunk (the caller waits for all of them: no earlier count helps it) */
    if (finished) atomic_fetch_add(&pool.done, finished);
}

static void *worker_main(void *arg) {
    int index = (int)(intptr_t)arg;
    uint32_t seen = generation_of(atomic_load(&pool.ticket));
    for (;;) {
        uint32_t generation;
        long spins = 0;
        while ((generation = generation_of(atomic_load(&pool.ticket))) == seen) {
            if (spins < POOL_SPIN_PAUSES) {
                cpu_relax();
            } else if (spins < POOL_SPIN_PAUSES + POOL_SPIN_YIELDS) {
                sched_yield();
            } else {
                pthread_mutex_lock(&pool.lock);
                atomic_fetch_add(&pool.sleepers, 1);
                while (generation_of(atomic_load(&pool.ticket)) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
                atomic_fetch_sub(&pool.sleepers, 1);
                pthread_mutex_unlock(&pool.lock);
            }
            spins++;
        }
        seen = generation;
        if (index < atomic_load(&pool.participants)) work_on(generation);
    }
    return NULL;
}

static void start_workers(int wanted) {
    if (wanted > POOL_MAX_WORKERS) wanted = POOL_MAX_WORKERS;
    while (pool.num_workers < wanted) {
        if (pthread_create(&pool.threads[pool.num_workers], NULL, worker_main, (void *)(intptr_t)pool.num_workers))
            break; /* fewer helpers: the caller still does every remaining chunk */
        pthread_detach(pool.threads[pool.num_workers]);
        pool.num_workers++;
    }
}

/* Runs fn(context, c) for every c in [0, num_chunks) on up to num_threads threads
 * (the caller included) and returns when all are done. Python callers release the
 * GIL first. One job runs at a time; concurrent callers queue on `one_caller`. */
void selfhost_pool_run(pool_chunk_fn fn, const void *context, long num_chunks, int num_threads) {
    pthread_mutex_lock(&pool.one_caller);
    if (num_threads > 1) start_workers(num_threads - 1);
    int helpers = num_threads - 1 < pool.num_workers ? num_threads - 1 : pool.num_workers;
    if (helpers <= 0 || num_chunks < 2 || num_chunks > POOL_MAX_CHUNKS) {
        for (long c = 0; c < num_chunks; c++) fn(context, c);
        pthread_mutex_unlock(&pool.one_caller);
        return;
    }
    uint32_t previous = generation_of(atomic_load(&pool.ticket));
    atomic_store(&pool.ticket, (uint64_t)previous << 32 | POOL_CLOSED); /* close before rewriting the job */
    atomic_store_explicit(&pool.fn, fn, memory_order_release);
    atomic_store_explicit(&pool.context, context, memory_order_release);
    atomic_store_explicit(&pool.num_chunks, num_chunks, memory_order_release);
    atomic_store(&pool.done, 0);
    atomic_store(&pool.participants, helpers);
    uint32_t generation = previous + 1;
    atomic_store(&pool.ticket, (uint64_t)generation << 32); /* opens chunk 0 of the new job */
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
    work_on(generation);
    for (long spins = 0; atomic_load(&pool.done) < num_chunks; spins++) {
        if (spins < POOL_SPIN_PAUSES)
            cpu_relax();
        else
            sched_yield();
    }
    pthread_mutex_unlock(&pool.one_caller);
}

/* ---- stress check: many jobs of varied sizes, every chunk's result checked ---- */

typedef struct {
    long magic;           /* this job's tag: a chunk run with another job's context sees another value */
    long num_chunks;
    unsigned *hits;       /* hits[c]: times chunk c ran; must end at exactly 1 */
    _Atomic long *wrong;  /* chunks that ran with a context, or an index, not of this job */
    unsigned spin;        /* busy work per chunk, so chunk durations and thread timings vary */
} StressJob;

static void stress_chunk(const void *context, long chunk) {
    const StressJob *job = context;
    if (chunk < 0 || chunk >= job->num_chunks || job->magic != (long)(intptr_t)job->hits) {
        atomic_fetch_add(job->wrong, 1);
        return;
    }
    job->hits[chunk]++;
    for (volatile unsigned i = 0; i < job->spin * (unsigned)(chunk % 7 + 1); i++) {
    }
}

static uint64_t next_random(uint64_t *state) {
    *state ^= *state << 13, *state ^= *state >> 7, *state ^= *state << 17;
    return *state;
}

/* Runs num_jobs jobs of 0..max_chunks-1 chunks on 1..max_threads threads each; returns
 * the number of wrong chunk runs (a chunk run twice, never, or with another job's
 * context). Safe to call from several threads at once: that is what it checks. */
long selfhost_pool_stress(long num_jobs, long max_chunks, int max_threads, uint64_t seed) {
    uint64_t state = seed * 2654435761u + 1;
    unsigned *hits = malloc(sizeof(unsigned) * (size_t)(max_chunks > 0 ? max_chunks : 1));
    if (!hits) return -1;
    _Atomic long wrong = 0;
    long errors = 0;
    for (long j = 0; j < num_jobs; j++) {
        /* On the stack, as the kernels keep their jobs: a stale reader would see a later frame. */
        StressJob job = {.magic = (long)(intptr_t)hits, .hits = hits, .wrong = &wrong};
        job.num_chunks = max_chunks > 0 ? (long)(next_random(&state) % (uint64_t)max_chunks) : 0;
        job.spin = (unsigned)(next_random(&state) % 64);
        for (long c = 0; c < job.num_chunks; c++) hits[c] = 0;
        int threads = 1 + (int)(next_random(&state) % (uint64_t)(max_threads > 0 ? max_threads : 1));
        selfhost_pool_run(stress_chunk, &job, job.num_chunks, threads);
        for (long c = 0; c < job.num_chunks; c++) errors += hits[c] != 1;
        job.magic = 0; /* what a late reader of this frame would find */
    }
    free(hits);
    return errors + atomic_load(&wrong);
}

#ifndef SELFHOST_POOL_NO_PYTHON

static const SelfhostPoolApi api = {SELFHOST_POOL_API_VERSION, selfhost_pool_run};

static PyObject *stress(PyObject *self, PyObject *args) {
    (void)self;
    long num_jobs, max_chunks;
    int max_threads;
    unsigned long long seed;
    if (!PyArg_ParseTuple(args, "lliK", &num_jobs, &max_chunks, &max_threads, &seed)) return NULL;
    long errors;
    Py_BEGIN_ALLOW_THREADS
    errors = selfhost_pool_stress(num_jobs, max_chunks, max_threads, seed);
    Py_END_ALLOW_THREADS
    if (errors < 0) return PyErr_NoMemory();
    return PyLong_FromLong(errors);
}

static PyObject *num_workers(PyObject *self, PyObject *args) {
    (void)self, (void)args;
    pthread_mutex_lock(&pool.one_caller);
    int n = pool.num_workers;
    pthread_mutex_unlock(&pool.one_caller);
    return PyLong_FromLong(n);
}

static PyMethodDef methods[] = {
    {"stress", stress, METH_VARARGS,
     "stress(num_jobs, max_chunks, max_threads, seed) -> wrong chunk runs (0 when the pool is correct)."},
    {"num_workers", num_workers, METH_NOARGS, "Worker threads the pool has started so far (the process has one pool)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_pool", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__cpu_pool(void) {
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    PyObject *capsule = PyCapsule_New((void *)&api, SELFHOST_POOL_CAPSULE, NULL);
    if (!capsule || PyModule_AddObject(m, "_api", capsule) < 0) {
        Py_XDECREF(capsule);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
#endif
