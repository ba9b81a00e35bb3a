import Foundation
import KVPack

/// An S3 object read by range: what a `MappedFile` fetches a remote .kvpack's pages from.
/// Its size and ETag are taken once, when it is opened (HEAD); ranges are read within that size.
/// A publisher replaces the object only by a longer one that starts with the same bytes
/// (`ObjectTransfer.publish`), so a reader opened before keeps reading the commit it opened;
/// anything else is caught by the checksums of the frames read.
public struct S3Object: RemoteObject {
    public let client: S3Client
    public let location: S3Location
    public let size: Int
    public let version: String
    /// Requests in flight at once (each on its own connection).
    public var concurrency = 16

    public var name: String { location.description }

    public init(location: S3Location, client: S3Client) throws {
        let head = try client.head(location)
        self.client = client
        self.location = location
        size = head.size
        version = head.etag ?? "size-\(head.size)"
    }

    public func fetch(_ ranges: [Range<Int>], deliver: @escaping @Sendable (Int, UnsafeRawBufferPointer) throws -> Void) throws {
        try ConcurrentRequests.run(count: ranges.count, width: concurrency) { [client, location] i in
            let data = try client.get(location, range: ranges[i])
            try data.withUnsafeBytes { try deliver(i, $0) }
        }
    }
}

/// `count` blocking jobs on up to `width` threads. After the first failure no new job starts
/// (a dead server fails one job per thread, not every job after its retries), and that failure
/// (the lowest-numbered one) is rethrown once every thread has stopped.
enum ConcurrentRequests {
    static func run(count: Int, width: Int, _ body: @escaping @Sendable (Int) throws -> Void) throws {
        guard count > 0 else { return }
        if count == 1 { return try body(0) }
        let state = JobState()
        let threads = min(width, count)
        let done = DispatchSemaphore(value: 0)
        for _ in 0 ..< threads {
            let t = Thread {
                while let i = state.next(limit: count) {
                    do { try body(i) } catch { state.fail(i, error) }
                }
                done.signal()
            }
            t.stackSize = 1 << 20
            t.start()
        }
        for _ in 0 ..< threads { done.wait() }
        if let error = state.failure { throw error }
    }

    private final class JobState: @unchecked Sendable {
        // @unchecked: every field is under `lock`.
        private let lock = NSLock()
        private var nextJob = 0
        private var failed: (index: Int, error: Error)?

        func next(limit: Int) -> Int? {
            lock.lock()
            defer { lock.unlock() }
            guard failed == nil, nextJob < limit else { return nil }
            nextJob += 1
            return nextJob - 1
        }

        func fail(_ i: Int, _ error: Error) {
            lock.lock()
            defer { lock.unlock() }
            if failed == nil || i < failed!.index { failed = (i, error) }
        }

        var failure: Error? {
            lock.lock()
            defer { lock.unlock() }
            return failed?.error
        }
    }
}

/// Opening `s3://bucket/key` as a .kvpack: the configuration the standard AWS way, the local
/// cache from the environment, and a reader whose pages are fetched as it reads them.
public enum RemoteFiles {
    /// Whether `path` names an object (`s3://...`) rather than a local file.
    public static func isRemote(_ path: String) -> Bool { S3Location(url: path) != nil }

    /// The local cache: `KVPACK_CACHE_DIR` (default `$XDG_CACHE_HOME/kvpack/objects`, else
    /// `~/.cache/kvpack/objects`; `none` for a private temporary file per open), at most
    /// `KVPACK_CACHE_LIMIT` bytes (default 16 GiB; suffixes K, M, G).
    public static func cache(environment: [String: String] = ProcessInfo.processInfo.environment) throws -> RemoteCache {
        let directory: String?
        if let d = environment["KVPACK_CACHE_DIR"], !d.isEmpty {
            directory = d == "none" ? nil : d
        } else if let x = environment["XDG_CACHE_HOME"], !x.isEmpty {
            directory = x + "/kvpack/objects"
        } else {
            directory = (environment["HOME"] ?? NSHomeDirectory()) + "/.cache/kvpack/objects"
        }
        var cache = RemoteCache(directory: directory)
        if let text = environment["KVPACK_CACHE_LIMIT"], !text.isEmpty {
            guard let limit = parseBytes(text) else {
                throw RemoteError("KVPACK_CACHE_LIMIT is \(text); give bytes, optionally with K, M or G (e.g. 20G)")
            }
            cache.limitBytes = limit
        }
        return cache
    }

    static func parseBytes(_ text: String) -> Int? {
        let units: [Character: Int] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40]
        var t = text.uppercased()
        if t.hasSuffix("B") { t.removeLast() }
        if let u = t.last.flatMap({ units[$0] }) {
            t.removeLast()
            return Int(t).flatMap { $0 >= 0 ? $0 * u : nil }
        }
        return Int(t).flatMap { $0 >= 0 ? $0 : nil }
    }

    /// The object's bytes, fetched as they are read.
    public static func open(_ location: S3Location, client: S3Client, cache: RemoteCache) throws -> MappedFile {
        try MappedFile(remote: S3Object(location: location, client: client), cache: cache)
    }

    /// A reader over an S3 object.
    public static func reader(_ location: S3Location, client: S3Client, cache: RemoteCache,
                              arithmetic: AttentionArithmetic = .fast) throws -> KVPackReader {
        try reader(S3Object(location: location, client: client), cache: cache, arithmetic: arithmetic)
    }

    /// A reader over a remote object. Pages a previous process left in the cache are checked
    /// like any others; if opening fails a check with such pages, or opens only by falling back
    /// to an older commit (any recovery note), the cache entry is dropped and the object read
    /// afresh once: a damaged cache costs a refetch, never a wrong answer or a refusal the
    /// object does not deserve.
    public static func reader(_ object: any RemoteObject, cache: RemoteCache, arithmetic: AttentionArithmetic = .fast) throws -> KVPackReader {
        let file = try MappedFile(remote: object, cache: cache)
        let warm = (file.remoteStatistics?.cachedPagesAtOpen ?? 0) > 0
        var fresh = cache
        fresh.discardExisting = true
        do {
            let r = try KVPackReader(file: file, path: object.name, arithmetic: arithmetic)
            // Any note: a damaged commit tag does not even look like a commit, and leaves only
            // "uncommitted bytes" behind.
            guard warm, !r.recoveryNotes.isEmpty else { return r }
        } catch let e as KVPackError where warm && e.code != .io {
            // Read again below.
        }
        return try KVPackReader(file: MappedFile(remote: object, cache: fresh), path: object.name, arithmetic: arithmetic)
    }

    /// A reader over a local path or an `s3://` URL (credentials and endpoint from the
    /// environment and ~/.aws).
    public static func reader(path: String, arithmetic: AttentionArithmetic = .fast) throws -> KVPackReader {
        guard let location = S3Location(url: path) else { return try KVPackReader(path: path, arithmetic: arithmetic) }
        return try reader(location, client: S3Client(configuration: S3Configuration.load()), cache: cache(), arithmetic: arithmetic)
    }

    /// The bytes of a local path or an `s3://` URL.
    public static func mappedFile(path: String) throws -> MappedFile {
        guard let location = S3Location(url: path) else { return try MappedFile(path: path) }
        return try open(location, client: S3Client(configuration: S3Configuration.load()), cache: cache())
    }
}
