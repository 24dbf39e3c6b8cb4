/* Hammers selfhost's worker pool (src/selfhost/_cpu_pool.c) from several threads at
 * once with jobs of varied sizes and checks every chunk ran exactly once with its own
 * job's context. Built by tests/test_cpu_pool.py, once normally and once under
 * ThreadSanitizer; exits 0 when every check passed.
 *
 * usage: pool_stress CALLERS JOBS_PER_CALLER MAX_CHUNKS MAX_THREADS
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

long selfhost_pool_stress(long num_jobs, long max_chunks, int max_threads, uint64_t seed);

typedef struct {
    long jobs, max_chunks, errors;
    int max_threads;
    uint64_t seed;
} Caller;

static void *caller_main(void *arg) {
    Caller *c = arg;
    c->errors = selfhost_pool_stress(c->jobs, c->max_chunks, c->max_threads, c->seed);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s CALLERS JOBS_PER_CALLER MAX_CHUNKS MAX_THREADS\n", argv[0]);
        return 2;
    }
    int callers = atoi(argv[1]);
    if (callers < 1 || callers > 64) return 2;
    pthread_t threads[64];
    Caller state[64];
    for (int i = 0; i < callers; i++) {
        state[i] = (Caller){atol(argv[2]), atol(argv[3]), 0, atoi(argv[4]), (uint64_t)i + 1};
        pthread_create(&threads[i], NULL, caller_main, &state[i]);
    }
    long errors = 0;
    for (int i = 0; i < callers; i++) {
        pthread_join(threads[i], NULL);
        errors += state[i].errors;
    }
    printf("wrong chunk runs: %ld\n", errors);
    return errors == 0 ? 0 : 1;
}
