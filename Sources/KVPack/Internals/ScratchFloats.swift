#if canImport(Glibc)
import Glibc
#endif

/// Temporary floats for one kernel call, taken from a grow-only buffer of the calling thread.
///
/// Why not `withUnsafeTemporaryAllocation`: on Linux it puts at most 1,024 bytes on the stack and
/// heap-allocates anything larger (measured with valgrind: 1,000 calls of 260 floats made 1,000
/// mallocs and frees), and attention's per-block work needs more than that once per block: a
/// decoded tile of 16 KiB, nsn's token norms and weights. Here a thread allocates its buffer once,
/// keeps it until the thread exits, and grows it only between calls.
///
/// Frames nest: each `with` takes the next `count` floats (64-byte aligned) and gives them back
/// when its body returns. A nested frame that does not fit beside the live ones is the only
/// case that allocates (it cannot move them); the buffer grows to fit it before the next
/// outermost frame. Memory handed out is uninitialized.
enum ScratchFloats {
    @inline(__always)
    static func with<R>(_ count: Int, _ body: (UnsafeMutablePointer<Float>) -> R) -> R {
        let arena = ScratchArena.current
        let bytes = (max(count, 1) * MemoryLayout<Float>.stride + 63) & ~63
        let top = arena.pointee.top
        // An outermost frame first grows the buffer to what this one or an earlier nesting needs.
        if top == 0 { arena.pointee.grow(to: max(bytes, arena.pointee.wanted)) }
        if top + bytes > arena.pointee.capacity {
            arena.pointee.wanted = max(arena.pointee.wanted, top + bytes)
            let memory = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 64)
            defer { memory.deallocate() }
            return body(memory.bindMemory(to: Float.self, capacity: count))
        }
        arena.pointee.top = top + bytes
        defer { arena.pointee.top = top }
        return body((arena.pointee.base + top).bindMemory(to: Float.self, capacity: count))
    }
}

/// One thread's scratch buffer (a plain struct behind a pointer: no reference counting on the
/// per-call path), freed by the thread-specific key's destructor when the thread exits.
struct ScratchArena {
    private(set) var base: UnsafeMutableRawPointer
    private(set) var capacity: Int
    /// Bytes held by live frames.
    var top = 0
    /// The most bytes a nesting asked for that did not fit (grown to before the next outer frame).
    var wanted = 0

    private static let key: pthread_key_t = {
        var key = pthread_key_t()
        pthread_key_create(&key) { state in
            guard let state else { return }
            let arena = state.assumingMemoryBound(to: ScratchArena.self)
            arena.pointee.base.deallocate()
            arena.deinitialize(count: 1)
            arena.deallocate()
        }
        return key
    }()

    @inline(__always)
    static var current: UnsafeMutablePointer<ScratchArena> {
        if let state = pthread_getspecific(key) { return state.assumingMemoryBound(to: ScratchArena.self) }
        let arena = UnsafeMutablePointer<ScratchArena>.allocate(capacity: 1)
        arena.initialize(to: ScratchArena(base: .allocate(byteCount: 64, alignment: 64), capacity: 64))
        pthread_setspecific(key, arena)
        return arena
    }

    mutating func grow(to bytes: Int) {
        guard bytes > capacity else { return }
        base.deallocate()
        capacity = max(bytes, 2 * capacity)
        base = .allocate(byteCount: capacity, alignment: 64)
    }
}
