/* A worker pool for the CPU kernels: the caller and its workers take chunks of one
 * product from an atomic counter until none are left.
 *
 * Why not split the work in fixed shares between threads (as OpenBLAS does, or as
 * pthread_create per call would): when another process holds a core, the caller
 * then waits for a descheduled thread and a decode step takes 10-40x longer. Here a
 * worker that is not running takes no chunks, the caller does them all at
 * one-thread speed, and it only ever waits for chunks a worker has already started
 * (a few microseconds each). Workers spin briefly between products, then yield,
 * then sleep; the pool is started on first use and lives for the process.
 *
 * `ticket` holds (generation << 32 | next chunk). Taking a chunk is a
 * compare-and-swap that only succeeds for the current generation, so a worker that
 * wakes up late never takes part of a newer product.
 *
 * Header-only: each extension that includes it gets its own pool. Requires
 * x86-64 with GCC or Clang (callers guard the include).
 */
#ifndef SELFHOST_CPU_POOL_H
#define SELFHOST_CPU_POOL_H

#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>

#define POOL_MAX_WORKERS 63
#define POOL_SPIN_PAUSES 2000 /* ~20-50 us of pause before a waiting thread starts yielding: each kernel
                                 * module has its own pool, so idle workers must give cores up quickly */
#define POOL_SPIN_YIELDS 200   /* then this many sched_yield()s before a worker sleeps */

typedef void (*pool_chunk_fn)(const void *context, long chunk);

static struct {
    pthread_t threads[POOL_MAX_WORKERS];
    int num_workers;
    pthread_mutex_t lock, one_caller;
    pthread_cond_t wake;
    _Atomic uint64_t ticket;
    _Atomic long done;
    _Atomic int sleepers;
    _Atomic int participants; /* workers with index below this may take chunks */
    pool_chunk_fn fn;
    const void *context;
    long num_chunks;
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .one_caller = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static int pool_take_chunk(uint32_t generation, long num_chunks, long *chunk) {
    uint64_t seen = atomic_load(&pool.ticket);
    for (;;) {
        if ((uint32_t)(seen >> 32) != generation || (long)(seen & 0xffffffffu) >= num_chunks) return 0;
        if (atomic_compare_exchange_weak(&pool.ticket, &seen, seen + 1)) {
            *chunk = (long)(seen & 0xffffffffu);
            return 1;
        }
    }
}

static void pool_work(uint32_t generation) {
    pool_chunk_fn fn = pool.fn;
    const void *context = pool.context;
    long num_chunks = pool.num_chunks, chunk;
    /* Fields read for a generation that has since moved on are never used: the take fails. */
    while (pool_take_chunk(generation, num_chunks, &chunk)) {
        fn(context, chunk);
        atomic_fetch_add(&pool.done, 1);
    }
}

static void *pool_worker_main(void *arg) {
    int index = (int)(intptr_t)arg;
    uint32_t seen = (uint32_t)(atomic_load(&pool.ticket) >> 32);
    for (;;) {
        uint32_t generation;
        long spins = 0;
        while ((generation = (uint32_t)(atomic_load(&pool.ticket) >> 32)) == seen) {
            if (spins < POOL_SPIN_PAUSES) {
                _mm_pause();
            } else if (spins < POOL_SPIN_PAUSES + POOL_SPIN_YIELDS) {
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
        if (index < atomic_load(&pool.participants)) pool_work(generation);
    }
    return NULL;
}

static void pool_start_workers(int wanted) {
    if (wanted > POOL_MAX_WORKERS) wanted = POOL_MAX_WORKERS;
    while (pool.num_workers < wanted) {
        if (pthread_create(&pool.threads[pool.num_workers], NULL, pool_worker_main, (void *)(intptr_t)pool.num_workers))
            break; /* fewer helpers: the caller still does every remaining chunk */
        pthread_detach(pool.threads[pool.num_workers]);
        pool.num_workers++;
    }
}

/* Runs fn(context, c) for every c in [0, num_chunks) on up to num_threads threads
 * (the caller included) and returns when all are done. Call without the GIL. */
static void pool_run(pool_chunk_fn fn, const void *context, long num_chunks, int num_threads) {
    pthread_mutex_lock(&pool.one_caller); /* the pool holds one product at a time */
    if (num_threads > 1) pool_start_workers(num_threads - 1);
    int helpers = num_threads - 1 < pool.num_workers ? num_threads - 1 : pool.num_workers;
    if (helpers <= 0 || num_chunks < 2) {
        for (long c = 0; c < num_chunks; c++) fn(context, c);
        pthread_mutex_unlock(&pool.one_caller);
        return;
    }
    pool.fn = fn;
    pool.context = context;
    pool.num_chunks = num_chunks;
    atomic_store(&pool.done, 0);
    atomic_store(&pool.participants, helpers);
    uint32_t generation = (uint32_t)(atomic_load(&pool.ticket) >> 32) + 1;
    atomic_store(&pool.ticket, (uint64_t)generation << 32); /* publishes: chunk 0 of a new generation */
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
    pool_work(generation);
    for (long spins = 0; atomic_load(&pool.done) < num_chunks; spins++) {
        if (spins < POOL_SPIN_PAUSES)
            _mm_pause();
        else
            sched_yield();
    }
    pthread_mutex_unlock(&pool.one_caller);
}

#endif /* SELFHOST_CPU_POOL_H */
