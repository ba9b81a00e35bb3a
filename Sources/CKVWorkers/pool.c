// The worker pool of include/CKVWorkers.h.
//
// One job at a time: a caller that wins `run_lock` publishes (body, context, count), bumps
// `generation`, and takes indices from `next` like every worker; then it waits until every
// worker has counted itself out of this generation in `finished`. Workers spin on `generation`
// for about SPIN_ROUNDS pause instructions (some 100-200 microseconds: longer than the gaps
// between the products of one decode step, shorter than a chat's wait for its user), then
// sleep on a condition variable. The sleep handshake is Dekker's: a worker announces itself in
// `sleepers` before its last look at `generation`, a caller publishes `generation` before it
// looks at `sleepers`; both sequentially consistent, so one of them sees the other, and a
// worker that sleeps does so holding the mutex until cond_wait, which the caller's broadcast
// (under the same mutex) cannot miss.
#include "CKVWorkers.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define PAUSE() _mm_pause()
#else
#define PAUSE() ((void)0)
#endif

enum { MAX_WORKERS = 63, SPIN_ROUNDS = 20000 };

static pthread_mutex_t run_lock = PTHREAD_MUTEX_INITIALIZER;  // held by the caller whose job runs
static pthread_mutex_t sleep_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;

static _Atomic unsigned generation;
static _Atomic int next_index, finished, sleepers, started;
// The job: written by the caller before it bumps `generation` (release), read by workers after
// they see the bump (acquire).
static void (*job_body)(void *, int);
static void *job_context;
static int job_count, job_workers;  // workers with an id below job_workers take part
static unsigned start_generation;   // `generation` when the workers were last grown

static void take_indices(void) {
    for (;;) {
        int i = atomic_fetch_add_explicit(&next_index, 1, memory_order_relaxed);
        if (i >= job_count) return;
        job_body(job_context, i);
    }
}

static void *worker_main(void *argument) {
    const int id = (int)(intptr_t)argument;
    // Not a fresh load of `generation`: the caller that started this worker bumps it right after
    // (its job is this worker's first), possibly before the thread runs.
    unsigned seen = start_generation;
    for (;;) {
        unsigned now = seen;
        for (int spin = 0; spin < SPIN_ROUNDS && (now = atomic_load_explicit(&generation, memory_order_acquire)) == seen; spin++) PAUSE();
        if (now == seen) {
            pthread_mutex_lock(&sleep_lock);
            atomic_fetch_add(&sleepers, 1);
            while ((now = atomic_load(&generation)) == seen) pthread_cond_wait(&wake, &sleep_lock);
            atomic_fetch_sub(&sleepers, 1);
            pthread_mutex_unlock(&sleep_lock);
        }
        seen = now;
        if (id < job_workers) take_indices();
        atomic_fetch_add_explicit(&finished, 1, memory_order_release);
    }
    return 0;
}

/// Starts workers until there are `want` (caller holds run_lock, so no job is running).
static int grow(int want) {
    int have = atomic_load(&started);
    start_generation = atomic_load(&generation);  // pthread_create orders this before the worker's read
    while (have < want) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&thread, &attr, worker_main, (void *)(intptr_t)have);
        pthread_attr_destroy(&attr);
        if (failed) break;
        atomic_store(&started, ++have);
    }
    return have;
}

void kvk_workers_run(int threads, int count, void (*body)(void *, int), void *context) {
    if (count <= 0) return;
    if (threads > MAX_WORKERS + 1) threads = MAX_WORKERS + 1;
    if (threads <= 1 || count == 1 || pthread_mutex_trylock(&run_lock) != 0) {
        for (int i = 0; i < count; i++) body(context, i);
        return;
    }
    // Every started worker counts itself out of every job (the wait below counts them all); the
    // first threads - 1 take indices.
    const int workers = grow(threads - 1);
    job_body = body, job_context = context, job_count = count, job_workers = threads - 1;
    atomic_store_explicit(&next_index, 0, memory_order_relaxed);
    atomic_store_explicit(&finished, 0, memory_order_relaxed);
    atomic_fetch_add(&generation, 1);  // seq_cst: publishes the job, and orders before `sleepers`
    if (atomic_load(&sleepers) > 0) {
        pthread_mutex_lock(&sleep_lock);
        pthread_cond_broadcast(&wake);
        pthread_mutex_unlock(&sleep_lock);
    }
    take_indices();
    while (atomic_load_explicit(&finished, memory_order_acquire) < workers) PAUSE();
    pthread_mutex_unlock(&run_lock);
}

int kvk_workers_started(void) { return atomic_load(&started); }
