/* How a kernel extension reaches the process's one worker pool (_cpu_pool.c).
 *
 * The pool lives in the selfhost._cpu_pool extension; each kernel module calls
 * pool_import() from its PyInit, which fetches the pool's entry point through a
 * capsule. After that, pool_run(fn, context, num_chunks, num_threads) runs
 * fn(context, c) for c in [0, num_chunks) on up to num_threads threads, the
 * caller included, and returns when every chunk is done. Call it without the GIL.
 * The thread count is always the caller's: kernels take it as an argument.
 */
#ifndef SELFHOST_CPU_POOL_H
#define SELFHOST_CPU_POOL_H

typedef void (*pool_chunk_fn)(const void *context, long chunk);

#define SELFHOST_POOL_CAPSULE "selfhost._cpu_pool._api"
#define SELFHOST_POOL_API_VERSION 1

typedef struct {
    int version;
    void (*run)(pool_chunk_fn fn, const void *context, long num_chunks, int num_threads);
} SelfhostPoolApi;

#ifndef SELFHOST_POOL_IMPLEMENTATION_ONLY
/* `unused` and `inline`: a kernel may include this header on every CPU and use the pool
 * only on some (the x86-only kernels built for aarch64); that must not warn. */
__attribute__((unused)) static const SelfhostPoolApi *selfhost_pool_api;

#define pool_run(fn, context, num_chunks, num_threads) selfhost_pool_api->run((fn), (context), (num_chunks), (num_threads))

/* Fetches the pool's entry point; returns -1 with a Python exception set on failure. */
static inline int pool_import(void) {
    /* PyCapsule_Import walks attributes, which exist only once the submodule is imported. */
    PyObject *module = PyImport_ImportModule("selfhost._cpu_pool");
    if (!module) return -1;
    Py_DECREF(module);
    selfhost_pool_api = (const SelfhostPoolApi *)PyCapsule_Import(SELFHOST_POOL_CAPSULE, 0);
    if (!selfhost_pool_api) return -1;
    if (selfhost_pool_api->version != SELFHOST_POOL_API_VERSION) {
        PyErr_SetString(PyExc_ImportError, "selfhost._cpu_pool has another API version: reinstall selfhost");
        return -1;
    }
    return 0;
}
#endif

#endif /* SELFHOST_CPU_POOL_H */
