#if canImport(Glibc)
import Glibc
#endif

/// A mutex for state shared between threads (caches filled once per process).
final class Lock: @unchecked Sendable {
    // @unchecked: the mutex is only touched through pthread calls, which synchronise.
    private var mutex = pthread_mutex_t()
    init() { pthread_mutex_init(&mutex, nil) }
    deinit { pthread_mutex_destroy(&mutex) }

    func withLock<T>(_ body: () throws -> T) rethrows -> T {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        return try body()
    }
}
