import Foundation
import Testing
@testable import KVPack

/// The per-thread scratch floats that attention's per-block work (tiles, nsn's norms) uses
/// instead of temporary allocations, which heap-allocate above 1 KiB on Linux.
struct ScratchFloatsTests {
    @Test("nested frames are disjoint, aligned, kept intact, and reuse the same memory call after call")
    func nestedFrames() {
        var first: UnsafeMutablePointer<Float>?
        for round in 0 ..< 3 {
            ScratchFloats.with(4096) { outer in
                #expect(Int(bitPattern: outer) % 64 == 0)
                if round == 0 { first = outer } else { #expect(outer == first, "round \(round): the buffer moved") }
                for i in 0 ..< 4096 { outer[i] = Float(i) }
                ScratchFloats.with(37) { inner in
                    #expect(Int(bitPattern: inner) % 64 == 0)
                    #expect(inner >= outer + 4096 || inner + 37 <= outer, "the inner frame overlaps the outer one")
                    for i in 0 ..< 37 { inner[i] = -1 }
                    ScratchFloats.with(3) { innermost in
                        #expect(innermost >= inner + 37)
                        innermost.update(repeating: -2, count: 3)
                    }
                    #expect((0 ..< 37).allSatisfy { inner[$0] == -1 })
                }
                #expect((0 ..< 4096).allSatisfy { outer[$0] == Float($0) }, "an inner frame wrote into the outer one")
            }
        }
    }

    @Test("a nested frame too large for what is left works, and the buffer grows for the next call")
    func nestedOverflow() {
        let small = 16, large = 1 << 20
        ScratchFloats.with(small) { outer in
            outer.update(repeating: 7, count: small)
            ScratchFloats.with(large) { inner in
                inner[0] = 1
                inner[large - 1] = 2
                #expect(inner[0] + inner[large - 1] == 3)
            }
            #expect((0 ..< small).allSatisfy { outer[$0] == 7 })
        }
        // The outermost frame after that has room for both without another allocation.
        ScratchFloats.with(small) { outer in
            ScratchFloats.with(large) { inner in
                #expect(inner >= outer + small, "the grown buffer should hold the nested frame")
                inner[large - 1] = 5
            }
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
