#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// Scratch memory for decode and attention calls: score rows, prepared queries, the online-
/// softmax state, and the buffer compressed blocks are expanded into. Buffers only grow, so
/// steady-state calls allocate nothing. One workspace per thread; it is not shareable.
public final class AttentionWorkspace {
    private(set) var scores = GrowableFloats()
    private(set) var keyState = GrowableFloats()
    private(set) var tailState = GrowableFloats()
    private(set) var blockAcc = GrowableFloats()
    private(set) var tailAcc = GrowableFloats()
    private(set) var runMax = GrowableFloats()
    private(set) var runSum = GrowableFloats()
    private(set) var decompressed = GrowableBytes()
    private(set) var decodeRows = GrowableFloats()
    private var zstd: Zstd.Decompressor?

    public init() {}

    var decompressor: Zstd.Decompressor {
        if let zstd { return zstd }
        let d = Zstd.Decompressor()
        zstd = d
        return d
    }

    func reserve(scores n: Int, keyState k: Int, tailState t: Int, acc a: Int, group g: Int) {
        scores.reserve(n)
        keyState.reserve(k)
        tailState.reserve(t)
        blockAcc.reserve(a)
        tailAcc.reserve(a)
        runMax.reserve(g)
        runSum.reserve(g)
    }

    func decompressionBuffer(_ bytes: Int) -> UnsafeMutableRawBufferPointer {
        decompressed.reserve(bytes)
        return UnsafeMutableRawBufferPointer(start: decompressed.pointer, count: bytes)
    }

    func decodeBuffer(_ floats: Int) -> UnsafeMutablePointer<Float> {
        decodeRows.reserve(floats)
        return decodeRows.pointer
    }
}

/// A grow-only float buffer, 64-byte aligned.
struct GrowableFloats: ~Copyable {
    private(set) var pointer: UnsafeMutablePointer<Float>
    private(set) var capacity: Int

    init() {
        capacity = 16
        pointer = UnsafeMutableRawPointer.allocate(byteCount: 64, alignment: 64).bindMemory(to: Float.self, capacity: 16)
    }

    mutating func reserve(_ count: Int) {
        guard count > capacity else { return }
        UnsafeMutableRawPointer(pointer).deallocate()
        capacity = max(count, capacity * 2)
        pointer = UnsafeMutableRawPointer.allocate(byteCount: 4 * capacity, alignment: 64)
            .bindMemory(to: Float.self, capacity: capacity)
    }

    deinit { UnsafeMutableRawPointer(pointer).deallocate() }
}

/// A grow-only byte buffer, 64-byte aligned.
struct GrowableBytes: ~Copyable {
    private(set) var pointer: UnsafeMutableRawPointer
    private(set) var capacity: Int

    init() {
        capacity = 64
        pointer = UnsafeMutableRawPointer.allocate(byteCount: 64, alignment: 64)
    }

    mutating func reserve(_ count: Int) {
        guard count > capacity else { return }
        pointer.deallocate()
        capacity = max(count, capacity * 2)
        pointer = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 64)
    }

    deinit { pointer.deallocate() }
}

/// Per-block "payload verified" flags shared by every thread using one reader, one bit each.
///
/// The storage comes from `calloc`: a large zeroed allocation is mapped zero pages, so creating
/// flags for a million blocks costs nothing at open and only the pages of flags actually set
/// become resident (opening a version 2 file stays independent of its size).
final class VerificationFlags: @unchecked Sendable {
    // @unchecked: the storage is only touched through atomics.
    private let words: UnsafeMutablePointer<Atomic<UInt64>>
    let count: Int
    /// Bytes of storage (for `heapBytes`).
    var byteCount: Int { 8 * max((count + 63) / 64, 1) }

    init(count: Int) {
        self.count = count
        let n = max((count + 63) / 64, 1)
        // Atomic<UInt64> is a frozen wrapper of one word: zero bytes are Atomic(0).
        guard let raw = calloc(n, 8) else { fatalError("out of memory for \(count) verification flags") }
        words = raw.bindMemory(to: Atomic<UInt64>.self, capacity: n)
    }

    deinit { free(words) }

    func isSet(_ i: Int) -> Bool { words[i >> 6].load(ordering: .acquiring) & (1 << UInt64(i & 63)) != 0 }
    func set(_ i: Int) { words[i >> 6].bitwiseOr(1 << UInt64(i & 63), ordering: .releasing) }
}
