#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Read-only bytes of a file: an `mmap` of the whole file, an aligned heap copy (for fuzzing
/// and tests), or the local image of a remote object (`RemoteBytes`), whose pages are fetched
/// when a reader first `ensure`s them. Immutable once created (a remote image only gains pages).
public final class MappedFile: @unchecked Sendable {
    // @unchecked: the memory is never written after init and is unmapped only in deinit.
    public let bytes: UnsafeRawBufferPointer
    private let mapped: Bool
    /// The mapped file's descriptor, kept open for `copyBytes` (-1 for heap copies).
    private let descriptor: Int32
    /// Which file was mapped (nil for a heap copy): a writer resuming from a reader checks that
    /// it holds the lock of the same file.
    let identity: FileIdentity?
    /// A remote object's local image; nil for local files and heap copies.
    let remote: RemoteBytes?

    public init(path: String) throws {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw KVPackError.ioError("open", path: path) }
        // Kept open only with a mapping (for `copyBytes`); closed on every other way out.
        var keepOpen = false
        defer { if !keepOpen { close(fd) } }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw KVPackError.ioError("fstat", path: path) }
        let size = Int(st.st_size)
        identity = FileIdentity(st)
        remote = nil
        if size == 0 {
            bytes = Self.alignedCopy(UnsafeRawBufferPointer(start: nil, count: 0))
            mapped = false
            descriptor = -1
            return
        }
        guard let p = mmap(nil, size, PROT_READ, MAP_SHARED, fd, 0), p != MAP_FAILED else {
            throw KVPackError.ioError("mmap", path: path)
        }
        bytes = UnsafeRawBufferPointer(start: p, count: size)
        mapped = true
        descriptor = fd
        keepOpen = true
    }

    public init(copying source: UnsafeRawBufferPointer) {
        bytes = Self.alignedCopy(source)
        mapped = false
        descriptor = -1
        identity = nil
        remote = nil
    }

    public init(copying array: [UInt8]) {
        bytes = array.withUnsafeBytes { Self.alignedCopy($0) }
        mapped = false
        descriptor = -1
        identity = nil
        remote = nil
    }

    /// The bytes of a remote object, fetched as readers ensure them and kept as `cache` says.
    /// Opening fetches the first and last 64 KiB at once (header, manifest, the newest commit
    /// and usually its index), so opening a .kvpack costs two requests however large it is.
    public init(remote object: any RemoteObject, cache: RemoteCache) throws {
        let image = try RemoteBytes(object: object, cache: cache)
        remote = image
        bytes = image.bytes
        mapped = false
        descriptor = -1
        identity = nil
        let size = bytes.count, edge = 64 << 10
        try image.ensure([0 ..< min(size, edge), max(0, size - edge) ..< size])
    }

    /// Whether the bytes are a remote object's (and reading a range first needs `ensure`).
    public var isRemote: Bool { remote != nil }
    /// The remote object's name (`s3://bucket/key`), nil for a local file.
    public var remoteName: String? { remote?.object.name }
    /// Requests and bytes a remote file fetched so far; nil for a local file.
    public var remoteStatistics: RemoteStatistics? { remote?.statistics }

    /// Makes `range` readable: a no-op for a local file; for a remote one, fetches the pages not
    /// yet fetched. Throws when they cannot be fetched (the error names the object).
    @inline(__always)
    public func ensure(_ range: Range<Int>) throws {
        if let remote { try remote.ensure([range]) }
    }

    /// The same for many ranges at once (coalesced into as few requests as sensible, sent together).
    public func ensure(_ ranges: [Range<Int>]) throws {
        if let remote { try remote.ensure(ranges) }
    }

    /// For a remote file, drops and fetches again the pages of `range` (their bytes failed a
    /// checksum) and returns true; false for a local file, whose bytes are what they are.
    func refetch(_ range: Range<Int>) throws -> Bool {
        guard let remote else { return false }
        try remote.refetch(range)
        return true
    }

    /// Copies the bytes at `offset` into `buffer` without touching the mapping, and returns how
    /// many there were (fewer than asked where the file now ends). A writer resuming the file
    /// truncates its uncommitted bytes (Spec 13.3), and a mapped page wholly past the new end
    /// raises SIGBUS when touched; `pread` reports the shorter file instead. Opening reads the
    /// bytes it has not yet found committed (the scan for the newest commit) through this.
    public func copyBytes(at offset: Int, into buffer: UnsafeMutableRawBufferPointer) -> Int {
        guard offset >= 0, offset < bytes.count, let target = buffer.baseAddress, buffer.count > 0 else { return 0 }
        let wanted = min(buffer.count, bytes.count - offset)
        guard mapped else {
            target.copyMemory(from: bytes.baseAddress! + offset, byteCount: wanted)
            return wanted
        }
        var done = 0
        while done < wanted {
            let n = pread(descriptor, target + done, wanted - done, off_t(offset + done))
            if n > 0 {
                done += n
            } else if n < 0, errno == EINTR {
                continue
            } else {
                break
            }
        }
        return done
    }

    private static func alignedCopy(_ source: UnsafeRawBufferPointer) -> UnsafeRawBufferPointer {
        let p = UnsafeMutableRawPointer.allocate(byteCount: max(source.count, 1), alignment: 64)
        if let s = source.baseAddress, source.count > 0 { p.copyMemory(from: s, byteCount: source.count) }
        return UnsafeRawBufferPointer(start: p, count: source.count)
    }

    /// Lets the kernel drop the pages of `range` from this process (they stay in the page cache
    /// and fault back in if touched again): a streaming pass over a large file keeps its resident
    /// memory bounded. A no-op for heap copies.
    public func releasePages(_ range: Range<Int>) {
        // Only pages wholly inside the range: a neighbour's bytes must not be dropped.
        advise(range, MADV_DONTNEED, wholePagesOnly: true)
    }

    /// Asks the kernel to start reading the pages of `range` now (`MADV_WILLNEED`), without
    /// waiting: many small scattered reads queued together finish far sooner than the same reads
    /// faulted in one at a time. A no-op for heap copies.
    public func willNeed(_ range: Range<Int>) {
        willNeed([range])
    }

    /// The same for many ranges: for a remote file, one batch of requests fetches them now (a
    /// hint: a failure is left for the read that needs the bytes to report).
    public func willNeed(_ ranges: [Range<Int>]) {
        if let remote {
            try? remote.ensure(ranges)
            return
        }
        for r in ranges { advise(r, MADV_WILLNEED, wholePagesOnly: false) }
    }

    /// `madvise` over the pages of `range` within the mapping: only the pages wholly inside it,
    /// or every page it touches.
    private func advise(_ range: Range<Int>, _ advice: Int32, wholePagesOnly: Bool) {
        guard mapped, let base = bytes.baseAddress, !range.isEmpty else { return }
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let lower = max(range.lowerBound, 0), upper = min(range.upperBound, bytes.count)
        let start = wholePagesOnly ? (lower + page - 1) / page * page : lower / page * page
        let end = wholePagesOnly ? upper / page * page : upper
        guard end > start else { return }
        madvise(UnsafeMutableRawPointer(mutating: base) + start, end - start, advice)
    }

    deinit {
        // A remote image unmaps itself.
        guard remote == nil, let base = bytes.baseAddress else { return }
        if mapped {
            munmap(UnsafeMutableRawPointer(mutating: base), bytes.count)
            close(descriptor)
        } else {
            UnsafeMutableRawPointer(mutating: base).deallocate()
        }
    }
}

/// A file's device and inode: the same file whatever path or descriptor reaches it.
struct FileIdentity: Equatable {
    var device: UInt64
    var inode: UInt64

    init(_ st: stat) {
        device = UInt64(st.st_dev)
        inode = UInt64(st.st_ino)
    }
}

extension KVPackError {
    /// An operating-system call on `path` failed: the error names the file (its `path`), the call
    /// and the system's reason.
    static func ioError(_ operation: String, path: String, errno code: Int32 = errno) -> KVPackError {
        var e = KVPackError(.io, "\(operation): \(String(cString: strerror(code)))")
        e.path = path
        return e
    }
}
