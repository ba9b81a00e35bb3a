import CKVWorkers
import Foundation
import Testing

/// The runner's worker pool (`kvk_workers_run`, Sources/CKVWorkers).
struct WorkerPoolTests {
    /// Per index, how many times it ran and on how many distinct threads the job ran.
    /// (NSLock, not Synchronization's Mutex: ThreadSanitizer sees pthread locks, not raw futexes.)
    final class Tally: @unchecked Sendable {
        // @unchecked: every field is read and written under `lock`.
        private let lock = NSLock()
        private var runs: [Int]
        private var threadIDs = Set<UInt>()
        init(_ count: Int) { runs = Array(repeating: 0, count: count) }
        func ran(_ index: Int) { lock.withLock { runs[index] += 1; threadIDs.insert(UInt(pthread_self())) } }
        var counts: [Int] { lock.withLock { runs } }
        var threads: Int { lock.withLock { threadIDs.count } }
    }

    static func run(threads: Int, count: Int, spin: Int = 0) -> Tally {
        let tally = Tally(count)
        let box = Unmanaged.passRetained(tally)
        defer { box.release() }
        var job = (tally: box.toOpaque(), spin: spin)
        withUnsafeMutablePointer(to: &job) { pointer in
            kvk_workers_run(Int32(threads), Int32(count), { context, index in
                let job = context!.assumingMemoryBound(to: (tally: UnsafeMutableRawPointer, spin: Int).self).pointee
                let tally = Unmanaged<Tally>.fromOpaque(job.tally).takeUnretainedValue()
                var x = 0
                for i in 0 ..< job.spin { x &+= i &* i }  // some work, so other threads get a share
                tally.ran(Int(index) + (x == -1 ? 1 : 0))
            }, pointer)
        }
        return tally
    }

    @Test("every index runs exactly once, for any thread count (one, fewer or more than the cores, more than the indices) and job size")
    func everyIndexOnce() {
        for threads in [1, 2, 3, 8] {
            for count in [0, 1, 2, 7, 64, 1000] {
                let tally = Self.run(threads: threads, count: count, spin: 200)
                #expect(tally.counts == Array(repeating: 1, count: count), "threads \(threads) count \(count)")
                #expect(tally.threads <= max(1, threads), "threads \(threads) count \(count)")
            }
        }
        #expect(kvk_workers_started() >= 1)
        // Idle workers go to sleep after a while; the next job wakes them.
        for _ in 0 ..< 3 {
            usleep(30_000)
            let tally = Self.run(threads: 2, count: 50, spin: 200)
            #expect(tally.counts.allSatisfy { $0 == 1 })
        }
    }

    @Test("many callers at once (the pool busy: the others run their own indices) and back-to-back jobs: nothing lost, nothing twice, no deadlock")
    func concurrentCallers() async {
        await withTaskGroup(of: Bool.self) { group in
            for caller in 0 ..< 8 {
                group.addTask {
                    var ok = true
                    for round in 0 ..< 200 {
                        let count = 1 + (caller * 37 + round * 11) % 90
                        let tally = Self.run(threads: 1 + (caller + round) % 4, count: count, spin: round % 3 == 0 ? 0 : 500)
                        ok = ok && tally.counts.allSatisfy { $0 == 1 }
                    }
                    return ok
                }
            }
            for await ok in group { #expect(ok) }
        }
    }
}
