import CKVKernels

/// Hints to the core's caches.
public enum CacheHints {
    /// Asks for `bytes` bytes at `p` to be brought into the caches; never faults.
    @inline(__always)
    public static func prefetch(_ p: UnsafeRawPointer, bytes: Int) {
        kvk_prefetch(p, bytes)
    }
}
