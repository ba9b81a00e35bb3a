#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// An object somewhere else (an S3 object) whose bytes a reader fetches by range. KVPack itself
/// knows no transport: KVPackRemote implements this for S3, tests implement it over a local file.
public protocol RemoteObject: Sendable {
    /// How errors and the cache name it (`s3://bucket/key`).
    var name: String { get }
    /// Its size in bytes, fixed when it was opened: a reader reads nothing past it.
    var size: Int { get }
    /// This version of the object (its ETag): a cache entry of another version is not reused.
    var version: String { get }
    /// Fetches `ranges` (disjoint, non-empty, within `size`), as many at once as the transport
    /// allows, and hands the bytes of each to `deliver(i, bytes)` (exactly `ranges[i].count` of
    /// them), possibly from several threads at once, and returns only once no thread will call
    /// it again. Throws if any range cannot be fetched whole; bytes already delivered stay valid.
    func fetch(_ ranges: [Range<Int>], deliver: @escaping @Sendable (Int, UnsafeRawBufferPointer) throws -> Void) throws
}

/// Where a remote object's fetched bytes are kept, and how much the cache may hold.
public struct RemoteCache: Sendable {
    /// A directory shared by every process (the next open of the same object version starts
    /// warm), or nil for a private, unlinked temporary file that goes away with the reader.
    public var directory: String?
    /// Bytes the directory may hold; older entries (other objects, least recently opened first)
    /// are deleted when opening a new one would pass it. The entry being opened is never evicted
    /// while open, so one object larger than the limit still works.
    public var limitBytes: Int
    /// Missing ranges closer than this are fetched in one request (a request costs about what
    /// this many bytes take to transfer).
    public var coalesceGap: Int
    /// The longest single request; longer runs are split into requests fetched at once.
    public var maxRequest: Int
    /// Start this object's entry empty, ignoring pages an earlier process fetched (after they
    /// failed a check).
    public var discardExisting = false

    public init(directory: String?, limitBytes: Int = 16 << 30, coalesceGap: Int = 256 << 10, maxRequest: Int = 8 << 20) {
        self.directory = directory
        self.limitBytes = limitBytes
        self.coalesceGap = coalesceGap
        self.maxRequest = maxRequest
    }
}

/// What a remote file cost so far: requests sent, bytes fetched, seconds waiting on them.
public struct RemoteStatistics: Sendable, Equatable {
    public var requests = 0
    public var bytes = 0
    public var seconds = 0.0
    /// Pages found in a cache directory when it opened (fetched by an earlier process).
    public var cachedPagesAtOpen = 0

    public init() {}
}

/// The local image of a remote object: a sparse file the size of the object, mapped read-only,
/// and a map of which 4 KiB pages of it have been fetched. Readers use the mapping exactly as
/// they use a local file's; before touching a range they call `ensure`, which fetches the
/// missing pages (coalesced, several requests at once) and writes them into the file. Pages
/// never change once fetched (committed bytes of a .kvpack never change), so the mapping is
/// read without locks; only fetching is serialised. Nothing here trusts the fetched bytes: the
/// reader verifies every frame's checksum before its first use, and `refetch` replaces pages
/// that failed it.
final class RemoteBytes: @unchecked Sendable {
    // @unchecked: `pages` is atomic, `statistics` and fetching are under `lock`, the rest immutable.
    static let pageSize = 4096
    let object: any RemoteObject
    let cache: RemoteCache
    let bytes: UnsafeRawBufferPointer
    private let descriptor: Int32
    /// The page map, saved beside a cache directory's data file (nil for a private file).
    private let pageMapDescriptor: Int32
    private let pages: VerificationFlags
    private let lock = Lock()
    private var stats = RemoteStatistics()

    init(object: any RemoteObject, cache: RemoteCache) throws {
        self.object = object
        self.cache = cache
        let size = object.size
        let pageCount = (size + Self.pageSize - 1) / Self.pageSize
        pages = VerificationFlags(count: pageCount)
        var fd: Int32 = -1, mapFD: Int32 = -1
        var ok = false
        defer {
            if !ok {
                if fd >= 0 { close(fd) }
                if mapFD >= 0 { close(mapFD) }
            }
        }
        if let directory = cache.directory {
            try Self.makeDirectory(directory)
            let entry = Self.entryName(object)
            let dataPath = "\(directory)/\(entry).bytes", mapPath = "\(directory)/\(entry).pages"
            Self.evict(directory: directory, keeping: entry, adding: size, limit: cache.limitBytes, sameObject: Self.objectPrefix(object))
            var st = stat()
            fd = cache.discardExisting ? -1 : open(dataPath, O_RDWR | O_CLOEXEC)
            mapFD = fd < 0 ? -1 : open(mapPath, O_RDWR | O_CLOEXEC)
            if fd >= 0, mapFD >= 0, fstat(fd, &st) == 0, Int(st.st_size) == size {
                stats.cachedPagesAtOpen = Self.loadPageMap(mapFD, into: pages)
            } else {
                // A new entry, or one to start afresh: new files renamed over the old ones, never
                // the old ones truncated, since another process may have them mapped (touching a
                // page past a shrunk end is SIGBUS) and keeps its own copy this way.
                if fd >= 0 { close(fd) }
                if mapFD >= 0 { close(mapFD) }
                (fd, mapFD) = (-1, -1)
                fd = try Self.createFresh(dataPath, size: size)
                mapFD = try Self.createFresh(mapPath, size: 0)
            }
            // The entry was used now: eviction goes by modification time.
            futimens(mapFD, nil)
        } else {
            let (descriptor, path) = try Self.temporaryFile("\(TemporaryDirectory.path)/kvpack-remote", size: size)
            fd = descriptor
            unlink(path)
        }
        if size == 0 {
            bytes = UnsafeRawBufferPointer(start: nil, count: 0)
        } else {
            guard let p = mmap(nil, size, PROT_READ, MAP_SHARED, fd, 0), p != MAP_FAILED else {
                throw KVPackError.ioError("mmap", path: object.name)
            }
            bytes = UnsafeRawBufferPointer(start: p, count: size)
        }
        descriptor = fd
        pageMapDescriptor = mapFD
        ok = true
    }

    deinit {
        if let base = bytes.baseAddress { munmap(UnsafeMutableRawPointer(mutating: base), bytes.count) }
        close(descriptor)
        if pageMapDescriptor >= 0 { close(pageMapDescriptor) }
    }

    var statistics: RemoteStatistics { lock.withLock { stats } }

    /// Whether every page of `range` has been fetched (lock-free).
    func isResident(_ range: Range<Int>) -> Bool {
        let lo = max(range.lowerBound, 0), hi = min(range.upperBound, bytes.count)
        guard lo < hi else { return true }
        for page in lo / Self.pageSize ... (hi - 1) / Self.pageSize where !pages.isSet(page) { return false }
        return true
    }

    /// Makes the bytes of every range readable in the mapping, fetching what is missing: runs of
    /// missing pages closer than `coalesceGap` go in one request, runs longer than `maxRequest`
    /// are split, and all requests are sent at once. Parts of ranges outside the object are
    /// ignored (the reader's own bounds checks report them).
    func ensure(_ ranges: [Range<Int>]) throws {
        if ranges.allSatisfy(isResident) { return }
        try lock.withLock {
            let requests = plan(ranges)
            guard !requests.isEmpty else { return }
            try fetch(requests)
        }
    }

    /// Forgets and fetches again the pages of `range` (after the bytes failed a checksum: a
    /// damaged cache entry, or a response damaged on the way).
    func refetch(_ range: Range<Int>) throws {
        let lo = max(range.lowerBound, 0), hi = min(range.upperBound, bytes.count)
        guard lo < hi else { return }
        try lock.withLock {
            for page in lo / Self.pageSize ... (hi - 1) / Self.pageSize { pages.clear(page) }
            try fetch(plan([lo ..< hi]))
        }
    }

    /// The requests that fetch the missing pages of `ranges` (byte ranges, page-aligned except
    /// at the object's end), coalesced and split.
    private func plan(_ ranges: [Range<Int>]) -> [Range<Int>] {
        var missing: [Range<Int>] = []   // page runs
        for r in ranges {
            let lo = max(r.lowerBound, 0), hi = min(r.upperBound, bytes.count)
            guard lo < hi else { continue }
            var page = lo / Self.pageSize
            let last = (hi - 1) / Self.pageSize
            while page <= last {
                guard !pages.isSet(page) else { page += 1; continue }
                let start = page
                while page <= last, !pages.isSet(page) { page += 1 }
                missing.append(start ..< page)
            }
        }
        missing.sort { $0.lowerBound < $1.lowerBound }
        let gap = max(cache.coalesceGap / Self.pageSize, 0), longest = max(cache.maxRequest / Self.pageSize, 1)
        var merged: [Range<Int>] = []
        for run in missing {
            if let last = merged.last, run.lowerBound <= last.upperBound + gap {
                merged[merged.count - 1] = last.lowerBound ..< max(last.upperBound, run.upperBound)
            } else {
                merged.append(run)
            }
        }
        var requests: [Range<Int>] = []
        for run in merged {
            var start = run.lowerBound
            while start < run.upperBound {
                let end = min(run.upperBound, start + longest)
                requests.append(start * Self.pageSize ..< min(end * Self.pageSize, bytes.count))
                start = end
            }
        }
        return requests
    }

    /// Sends `requests` and writes what arrives into the file, then marks (and saves) its pages.
    private func fetch(_ requests: [Range<Int>]) throws {
        let start = MonotonicTime.now
        let fd = descriptor, pages = self.pages, size = bytes.count
        let written = FetchedRanges(count: requests.count)
        defer {
            stats.requests += requests.count
            stats.bytes += written.bytes(requests)
            stats.seconds += MonotonicTime.seconds(since: start)
            savePageMap(requests, written: written)
        }
        do {
            try object.fetch(requests) { i, data in
                let r = requests[i]
                guard data.count == r.count else {
                    throw KVPackError(.io, "\(data.count) bytes arrived for bytes \(r.lowerBound)..<\(r.upperBound), \(r.count) expected")
                }
                if let code = writeFully(fd, data, at: r.lowerBound) {
                    throw KVPackError(.io, "writing fetched bytes into the cache: \(String(cString: strerror(code)))")
                }
                // Every page the range covers is whole: ranges are page-aligned or end the object.
                for page in r.lowerBound / Self.pageSize ..< (min(r.upperBound, size) + Self.pageSize - 1) / Self.pageSize { pages.set(page) }
                written.mark(i)
            }
        } catch {
            let first = requests.first!.lowerBound, last = requests.last!.upperBound
            var e = (error as? KVPackError) ?? KVPackError(.io, "\(error)")
            e.path = object.name
            e.message = "fetching \(requests.count) range\(requests.count == 1 ? "" : "s") within bytes \(first)..<\(last): " + e.message
            throw e
        }
    }

    /// Writes the words of the page map that cover `requests` to the cache directory's map file.
    /// Only after the bytes themselves were written: a crash leaves pages unmarked (fetched
    /// again), never marked and missing (and a page that is wrong anyway fails its checksum).
    private func savePageMap(_ requests: [Range<Int>], written: FetchedRanges) {
        guard pageMapDescriptor >= 0 else { return }
        var words = Set<Int>()
        for (i, r) in requests.enumerated() where written.isMarked(i) {
            for w in r.lowerBound / Self.pageSize / 64 ... (r.upperBound - 1) / Self.pageSize / 64 { words.insert(w) }
        }
        for w in words.sorted() {
            var word = pages.word(w).littleEndian
            _ = pwrite(pageMapDescriptor, &word, 8, off_t(8 * w))
        }
    }

    /// Reads a saved page map; returns how many pages it marks.
    private static func loadPageMap(_ fd: Int32, into pages: VerificationFlags) -> Int {
        var st = stat()
        guard fstat(fd, &st) == 0, Int(st.st_size) <= 8 * pages.wordCount else { return 0 }
        var words = [UInt64](repeating: 0, count: Int(st.st_size) / 8)
        let n = words.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }
        guard n == words.count * 8 else { return 0 }
        var marked = 0
        for (w, word) in words.enumerated() {
            // Bits past the last page would claim bytes the object does not have.
            let valid = min(64, pages.count - 64 * w)
            let bits = UInt64(littleEndian: word) & (valid >= 64 ? ~0 : (UInt64(1) << UInt64(valid)) - 1)
            pages.setWord(w, bits)
            marked += bits.nonzeroBitCount
        }
        return marked
    }

    // MARK: The cache directory

    /// Entries of one object share a prefix (its name's hash); the version and size follow.
    static func objectPrefix(_ object: any RemoteObject) -> String {
        hex(Checksum.xxh3(Array(object.name.utf8)))
    }

    static func entryName(_ object: any RemoteObject) -> String {
        objectPrefix(object) + "-" + hex(Checksum.xxh3(Array(object.version.utf8))) + "-\(object.size)"
    }

    private static func hex(_ v: UInt64) -> String {
        let s = String(v, radix: 16)
        return String(repeating: "0", count: 16 - s.count) + s
    }

    /// A new file of `size` zero bytes (sparse) at `path`, made under a temporary name and
    /// renamed into place; returns its descriptor, open for reading and writing.
    private static func createFresh(_ path: String, size: Int) throws -> Int32 {
        let (fd, temporary) = try temporaryFile(path, size: size)
        guard fchmod(fd, 0o644) == 0, rename(temporary, path) == 0 else {
            let e = KVPackError.ioError("creating", path: path)
            close(fd)
            unlink(temporary)
            throw e
        }
        return fd
    }

    /// A new file named `prefix` plus a unique suffix, `size` zero bytes long (sparse), open
    /// for reading and writing.
    private static func temporaryFile(_ prefix: String, size: Int) throws -> (fd: Int32, path: String) {
        var template = Array("\(prefix).XXXXXX".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        let path = template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
        guard fd >= 0 else { throw KVPackError.ioError("mkstemp", path: path) }
        guard ftruncate(fd, off_t(size)) == 0 else {
            let e = KVPackError.ioError("ftruncate", path: path)
            close(fd)
            unlink(path)
            throw e
        }
        return (fd, path)
    }

    private static func makeDirectory(_ path: String) throws {
        var prefix = path.hasPrefix("/") ? "" : "."
        for part in path.split(separator: "/") {
            prefix += "/" + part
            if mkdir(prefix, 0o755) != 0, errno != EEXIST { throw KVPackError.ioError("mkdir", path: prefix) }
        }
    }

    /// Deletes other versions of the same object, then the least recently used entries while
    /// the directory would hold more than `limit` with `adding` more bytes.
    private static func evict(directory: String, keeping entry: String, adding: Int, limit: Int, sameObject: String) {
        guard let dir = opendir(directory) else { return }
        var entries: [(name: String, used: Int, bytes: Int)] = []
        while let e = readdir(dir) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
            guard name.hasSuffix(".bytes") else { continue }
            let stem = String(name.dropLast(6))
            guard stem != entry else { continue }
            var st = stat(), mt = stat()
            guard stat("\(directory)/\(name)", &st) == 0 else { continue }
            let used = stat("\(directory)/\(stem).pages", &mt) == 0 ? Int(mt.st_mtim.tv_sec) : 0
            // Allocated blocks, not the sparse length.
            let allocated = Int(st.st_blocks) * 512
            if stem.hasPrefix(sameObject + "-") {
                remove(directory, stem)
            } else {
                entries.append((stem, used, allocated))
            }
        }
        closedir(dir)
        var total = entries.reduce(adding) { $0 + $1.bytes }
        for e in entries.sorted(by: { $0.used < $1.used }) where total > limit {
            remove(directory, e.name)
            total -= e.bytes
        }
    }

    private static func remove(_ directory: String, _ stem: String) {
        unlink("\(directory)/\(stem).bytes")
        unlink("\(directory)/\(stem).pages")
    }
}

/// Which requests of one fetch were written (set from the delivering threads).
private final class FetchedRanges: @unchecked Sendable {
    // @unchecked: the flags are atomic.
    private let flags: VerificationFlags
    init(count: Int) { flags = VerificationFlags(count: count) }
    func mark(_ i: Int) { flags.set(i) }
    func isMarked(_ i: Int) -> Bool { flags.isSet(i) }
    func bytes(_ requests: [Range<Int>]) -> Int { requests.indices.reduce(0) { isMarked($1) ? $0 + requests[$1].count : $0 } }
}

/// Elapsed seconds for the statistics, without Foundation.
enum MonotonicTime {
    static var now: timespec {
        var t = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t)
        return t
    }

    static func seconds(since t: timespec) -> Double {
        let n = now
        return Double(n.tv_sec - t.tv_sec) + Double(n.tv_nsec - t.tv_nsec) / 1e9
    }
}
