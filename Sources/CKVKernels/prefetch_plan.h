// The calling thread's prefetch plan (kvk_prefetch_plan in include/CKVKernels.h): bytes the
// next kernels should ask the caches for while they compute, so the next blocks arrive spread
// over this one's arithmetic instead of in one burst that stalls the core on its miss buffers
// (measured: raw f16 attention at 32K tokens 2.3 ms with the burst, 1.4 ms spread). The key
// kernels that score a block's tokens (rows, polar, svdq) spread what is left of the plan
// evenly over them (kvk_plan_share); the others advance by the bytes they read of their own
// input. Advancing the key kernels by their own bytes left what their codes
// did not cover (most of the plan for 2-4 bit keys) to the value kernels or to a burst at the
// end: at 32K tokens polar 1.44 -> 1.26 ms, svdq 1.63 -> 1.40, raw f16 1.18-1.20 -> 1.03-1.06
// spread (kvpack bench, one scheme at a time, alternating the two binaries).
// Prefetches go to L2 (T1): to L1 they were slower (1.55 ms).
#ifndef KVK_PREFETCH_PLAN_H
#define KVK_PREFETCH_PLAN_H

#include <stddef.h>

typedef struct {
    const char *next;
    const char *end;
} kvk_plan_state;

extern _Thread_local kvk_plan_state kvk_plan;

static inline __attribute__((always_inline)) void kvk_plan_advance(size_t bytes) {
    const char *p = kvk_plan.next, *end = kvk_plan.end;
    if (p >= end) return;
    const char *stop = (size_t)(end - p) > bytes ? p + bytes : end;
    for (; p < stop; p += 64) __builtin_prefetch(p, 0, 2);
    kvk_plan.next = p;
}

/// What is left of the plan divided over `steps` steps (rounded up; 0 without steps): a key
/// kernel advancing by it once per step prefetches the whole plan evenly over its pass.
static inline __attribute__((always_inline)) size_t kvk_plan_share(size_t steps) {
    const size_t left = kvk_plan.next < kvk_plan.end ? (size_t)(kvk_plan.end - kvk_plan.next) : 0;
    return steps ? (left + steps - 1) / steps : 0;
}

#endif
