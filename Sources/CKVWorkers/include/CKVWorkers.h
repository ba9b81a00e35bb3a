// The model runner's worker threads: a pool that stays alive between products and waits for
// work by spinning a little before it sleeps, so a product split across cores costs a few
// hundred nanoseconds to start rather than a dispatch queue's tens of microseconds (a SmolLM2
// decode step runs about 210 products). The only state in the C targets besides the kernels'
// one-time dispatch lives here.
#ifndef CKVWORKERS_H
#define CKVWORKERS_H

#ifdef __cplusplus
extern "C" {
#endif

/// Runs body(context, i) for every i in 0..<count, spread over at most `threads` threads (the
/// caller's included; the pool grows to threads - 1 workers on first use, at most 63), and
/// returns when all have returned. Each i runs exactly once, on one thread; which thread runs
/// which i is not fixed, so bodies must write disjoint results. When the pool is busy with
/// another caller's work (or `threads` <= 1, or a worker cannot be started) the caller runs
/// every i itself, in order: callers never wait for each other and never deadlock.
void kvk_workers_run(int threads, int count, void (*body)(void *context, int index), void *context);

/// Workers started so far (for tests and `--help` texts).
int kvk_workers_started(void);

#ifdef __cplusplus
}
#endif

#endif
