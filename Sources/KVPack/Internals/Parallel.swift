import Dispatch

/// Work split across threads: `workers` calls of `body(worker)` run concurrently and this
/// returns when all are done. Each worker must touch only its own data. If any throws, the
/// error of the lowest-numbered failing worker is rethrown (so which error a caller sees does
/// not depend on timing).
enum Parallel {
    static func run(workers: Int, _ body: (Int) throws -> Void) throws {
        guard workers > 1 else {
            if workers == 1 { try body(0) }
            return
        }
        let failures = WorkerFailures(count: workers)
        withoutActuallyEscaping(body, do: { body in
            let work = UnsafeSendableBody(body)
            DispatchQueue.concurrentPerform(iterations: workers) { worker in
                do { try work.body(worker) } catch { failures.record(error, worker: worker) }
            }
        })
        if let error = failures.first { throw error }
    }
}

/// A closure handed to worker threads whose captures each worker uses disjointly.
private struct UnsafeSendableBody: @unchecked Sendable {
    let body: (Int) throws -> Void
    init(_ b: @escaping (Int) throws -> Void) { body = b }
}

/// One error slot per worker; the first worker's error (in worker order) is reported.
private final class WorkerFailures: @unchecked Sendable {
    // @unchecked: each worker writes only its own slot; read after concurrentPerform returns.
    private let errors: UnsafeMutablePointer<Error?>
    private let count: Int
    init(count: Int) {
        self.count = count
        errors = .allocate(capacity: count)
        errors.initialize(repeating: nil, count: count)
    }
    deinit {
        errors.deinitialize(count: count)
        errors.deallocate()
    }
    func record(_ error: Error, worker: Int) { errors[worker] = error }
    var first: Error? { (0 ..< count).lazy.compactMap { self.errors[$0] }.first }
}
