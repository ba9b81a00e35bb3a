import CKVPackABI
import KVPack
import Synchronization

/// What a kvpack_reader points at: the reader and spare attention workspaces (one per thread of a
/// call), reused across calls so a decode step allocates nothing after the first.
final class ReaderHandle: Sendable {
    let reader: KVPackReader
    private let spare = Mutex<[AttentionWorkspace]>([])

    init(reader: KVPackReader) { self.reader = reader }

    /// Runs `body` with `n` workspaces of its own (concurrent calls on one handle get different ones).
    func withWorkspaces<T>(_ n: Int, _ body: ([AttentionWorkspace]) throws -> T) rethrows -> T {
        let taken: [AttentionWorkspace] = spare.withLock { pool in
            let k = min(n, pool.count)
            let mine = Array(pool.suffix(k))
            pool.removeLast(k)
            return mine
        }
        let all = taken + (taken.count ..< n).map { _ in AttentionWorkspace() }
        defer { spare.withLock { pool in pool.append(contentsOf: all.prefix(max(0, 64 - pool.count))) } }
        return try body(all)
    }

    static func from(_ pointer: OpaquePointer?) throws -> ReaderHandle {
        guard let pointer else { throw ABIError("reader is NULL") }
        return Unmanaged<ReaderHandle>.fromOpaque(UnsafeRawPointer(pointer)).takeUnretainedValue()
    }
}

/// What a kvpack_writer points at.
final class WriterHandle {
    let writer: KVPackWriter
    init(writer: KVPackWriter) { self.writer = writer }

    static func from(_ pointer: OpaquePointer?) throws -> WriterHandle {
        guard let pointer else { throw ABIError("writer is NULL") }
        return Unmanaged<WriterHandle>.fromOpaque(UnsafeRawPointer(pointer)).takeUnretainedValue()
    }
}

// AttentionWorkspace is a class of scratch buffers used by one thread at a time; the pool hands
// each one to a single call.
extension AttentionWorkspace: @unchecked Sendable {}
