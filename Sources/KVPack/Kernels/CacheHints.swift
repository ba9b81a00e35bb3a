import CKVKernels

/// Hints to the core's caches.
public enum CacheHints {
    /// Asks for `bytes` bytes at `p` to be brought into the caches; never faults.
    @inline(__always)
    public static func prefetch(_ p: UnsafeRawPointer, bytes: Int) {
        kvk_prefetch(p, bytes)
    }

    /// Makes `bytes` bytes at `p` the calling thread's prefetch plan, after finishing the
    /// previous one: the C kernels prefetch as much of it as they read of their own input, so
    /// the misses spread over their arithmetic instead of stalling the core in one burst.
    @inline(__always)
    public static func planPrefetch(_ p: UnsafeRawPointer, bytes: Int) {
        kvk_prefetch_plan(p, bytes)
    }

    /// Prefetches what the kernels left of the plan (all of it after kernels in Swift), and
    /// clears it.
    @inline(__always)
    public static func finishPrefetch() {
        kvk_prefetch_finish()
    }
}
