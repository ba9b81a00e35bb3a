#if canImport(Glibc)
import Glibc
#endif
import Synchronization

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
    func clear(_ i: Int) { words[i >> 6].bitwiseAnd(~(1 << UInt64(i & 63)), ordering: .releasing) }

    // Whole words, for a caller that saves and restores the flags (a remote file's page map).
    var wordCount: Int { max((count + 63) / 64, 1) }
    func word(_ w: Int) -> UInt64 { words[w].load(ordering: .acquiring) }
    func setWord(_ w: Int, _ bits: UInt64) { words[w].bitwiseOr(bits, ordering: .releasing) }
}
