import Foundation
import Testing
@testable import KVPack

/// The per-thread scratch floats that attention's per-block work (tiles, nsn's norms) uses
/// instead of temporary allocations, which heap-allocate above 1 KiB on Linux.
struct ScratchFloatsTests {
    /// Whether [a, a + m) and [b, b + n) share no float.
    static func disjoint(_ a: UnsafeMutablePointer<Float>, _ m: Int, _ b: UnsafeMutablePointer<Float>, _ n: Int) -> Bool {
        a + m <= b || b + n <= a
    }

    /// What a nesting on a fresh thread saw: each round's three frame addresses, and what went wrong.
    final class Nesting: @unchecked Sendable {
        // @unchecked: written by one thread, read after it signals.
        var frames: [[UnsafeMutablePointer<Float>]] = []
        var problems: [String] = []
    }

    /// The same three nested frames `rounds` times on a fresh thread (so a fresh buffer), checking
    /// each round's frames are aligned, disjoint and left intact by the frames inside them.
    static func nest(rounds: Int, sizes: (Int, Int, Int)) -> Nesting {
        let result = Nesting(), done = DispatchSemaphore(value: 0)
        let thread = Thread {
            for _ in 0 ..< rounds {
                ScratchFloats.with(sizes.0) { outer in
                    for i in 0 ..< sizes.0 { outer[i] = Float(i) }
                    ScratchFloats.with(sizes.1) { inner in
                        if !disjoint(outer, sizes.0, inner, sizes.1) { result.problems.append("inner overlaps outer") }
                        inner.update(repeating: -1, count: sizes.1)
                        ScratchFloats.with(sizes.2) { innermost in
                            if !disjoint(outer, sizes.0, innermost, sizes.2) || !disjoint(inner, sizes.1, innermost, sizes.2) {
                                result.problems.append("innermost overlaps")
                            }
                            innermost.update(repeating: -2, count: sizes.2)
                            let frames = [outer, inner, innermost]
                            if frames.contains(where: { Int(bitPattern: $0) % 64 != 0 }) { result.problems.append("not 64-byte aligned") }
                            result.frames.append(frames)
                        }
                        if !(0 ..< sizes.1).allSatisfy({ inner[$0] == -1 }) { result.problems.append("innermost wrote into inner") }
                    }
                    if !(0 ..< sizes.0).allSatisfy({ outer[$0] == Float($0) }) { result.problems.append("a nested frame wrote into outer") }
                }
            }
            done.signal()
        }
        thread.start()
        done.wait()
        return result
    }

    @Test("nested frames are disjoint, aligned and kept; after the first rounds they stay in one buffer that no longer moves")
    func nestedFrames() {
        for sizes in [(4096, 37, 3), (16, 1 << 20, 5), (1, 1, 1)] {
            let nesting = Self.nest(rounds: 4, sizes: sizes), seen = nesting.frames
            #expect(nesting.problems.isEmpty, "\(sizes): \(nesting.problems)")
            #expect(seen.count == 4)
            guard seen.count == 4 else { continue }
            // A fresh buffer fits the outermost frame only; the nestings that did not fit make the
            // next outermost frames grow it, so by the third round all three lie in it, in order.
            let last = seen[3], before = seen[2]
            #expect(last == before, "\(sizes): the frames moved between the last two rounds")
            #expect(last[1] >= last[0] + sizes.0 && last[2] >= last[1] + sizes.1, "\(sizes): the frames are not stacked in one buffer")
        }
    }

    @Test("each thread has its own buffer")
    func perThread() {
        let threads = 4, count = 10_000
        let failures = Counter()
        DispatchQueue.concurrentPerform(iterations: threads) { k in
            for round in 0 ..< 50 {
                ScratchFloats.with(count) { p in
                    let mark = Float(k * 1000 + round)
                    p.update(repeating: mark, count: count)
                    usleep(10)
                    if !(0 ..< count).allSatisfy({ p[$0] == mark }) { failures.add() }
                }
            }
        }
        #expect(failures.value == 0, "a thread's scratch floats were overwritten by another thread")
    }

    /// NSLock: ThreadSanitizer sees pthread locks.
    final class Counter: @unchecked Sendable {
        private let lock = NSLock()
        private var n = 0
        func add() { lock.lock(); n += 1; lock.unlock() }
        var value: Int { lock.lock(); defer { lock.unlock() }; return n }
    }
}
