#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The writer's file: buffered appends at a logical end, patches, reads back, sync, truncate
/// and an exclusive advisory lock. Nothing here knows the format.
final class FileAppender {
    let path: String
    private(set) var fd: Int32
    /// Logical end of file: flushed bytes plus buffered ones.
    private(set) var end: UInt64
    private var buffer: UnsafeMutableRawPointer
    private let capacity: Int
    private var buffered = 0

    init(path: String, fd: Int32, end: UInt64, bufferSize: Int = 1 << 20) {
        self.path = path
        self.fd = fd
        self.end = end
        self.capacity = bufferSize
        self.buffer = UnsafeMutableRawPointer.allocate(byteCount: bufferSize, alignment: 64)
    }

    deinit {
        buffer.deallocate()
        if fd >= 0 { Glibc.close(fd) }
    }

    /// Flushes and closes the file, releasing the writer lock.
    func close() throws {
        guard fd >= 0 else { return }
        try flush()
        Glibc.close(fd)
        fd = -1
    }

    /// Opens (creating when asked) and takes the writer lock; a second writer is refused.
    static func open(path: String, create: Bool) throws -> FileAppender {
        let flags = O_RDWR | O_CLOEXEC | (create ? O_CREAT | O_EXCL : 0)
        let fd = Glibc.open(path, flags, 0o644)
        guard fd >= 0 else { throw KVPackError.ioError("open", path: path) }
        // A lock that a writer of this process has just released can stay held for a moment: a
        // child forked meanwhile shares the descriptor (and, with flock, the lock) until its exec
        // closes it. So a busy lock is retried for up to 200 ms before it counts as another writer's.
        var attempts = 0
        while flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let code = errno
            if code == EINTR { continue }
            if code == EWOULDBLOCK, attempts < 40 {
                attempts += 1
                usleep(5_000)
                continue
            }
            Glibc.close(fd)
            if code == EWOULDBLOCK {
                throw KVPackError(.locked, "\(path) is being written by another process (its writer lock is held)")
            }
            throw KVPackError.ioError("flock", path: path, errno: code)
        }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            let code = errno
            Glibc.close(fd)
            throw KVPackError.ioError("fstat", path: path, errno: code)
        }
        return FileAppender(path: path, fd: fd, end: UInt64(st.st_size))
    }

    /// The open file's device and inode.
    func identity() throws -> FileIdentity {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw KVPackError.ioError("fstat", path: path) }
        return FileIdentity(st)
    }

    func append(_ bytes: UnsafeRawBufferPointer) throws {
        var src = bytes
        while !src.isEmpty {
            if buffered == capacity { try flush() }
            let n = min(src.count, capacity - buffered)
            (buffer + buffered).copyMemory(from: src.baseAddress!, byteCount: n)
            buffered += n
            end += UInt64(n)
            src = UnsafeRawBufferPointer(rebasing: src[n...])
        }
    }

    func append(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try append($0) }
    }

    func appendZeros(_ count: Int) throws {
        var left = count
        while left > 0 {
            if buffered == capacity { try flush() }
            let n = min(left, capacity - buffered)
            (buffer + buffered).initializeMemory(as: UInt8.self, repeating: 0, count: n)
            buffered += n
            end += UInt64(n)
            left -= n
        }
    }

    /// Pads the logical end to the frame alignment with zeros.
    func padToAlignment() throws {
        let aligned = roundUp(end, to: UInt64(FileHeader.frameAlignment))
        try appendZeros(Int(aligned - end))
    }

    func flush() throws {
        guard buffered > 0 else { return }
        try writeFully(UnsafeRawBufferPointer(start: buffer, count: buffered), at: end - UInt64(buffered))
        buffered = 0
    }

    /// Overwrites bytes already appended (the header of a frame whose payload was streamed).
    func patch(at offset: UInt64, _ bytes: [UInt8]) throws {
        try flush()
        try bytes.withUnsafeBytes { try writeFully($0, at: offset) }
    }

    private func writeFully(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws {
        if let code = KVPack.writeFully(fd, bytes, at: Int(offset)) { throw KVPackError.ioError("write", path: path, errno: code) }
    }

    /// Reads bytes already in the file (flushes first so buffered bytes are visible).
    func read(at offset: UInt64, into out: UnsafeMutableRawBufferPointer) throws {
        try flush()
        var done = 0
        while done < out.count {
            let n = pread(fd, out.baseAddress! + done, out.count - done, off_t(offset + UInt64(done)))
            if n < 0 {
                if errno == EINTR { continue }
                throw KVPackError.ioError("read", path: path)
            }
            if n == 0 { throw KVPackError(.io, "read \(path): unexpected end of file at \(offset + UInt64(done))") }
            done += n
        }
    }

    func sync() throws {
        try flush()
        guard fsync(fd) == 0 else { throw KVPackError.ioError("fsync", path: path) }
    }

    func truncate(to length: UInt64) throws {
        try flush()
        guard ftruncate(fd, off_t(length)) == 0 else { throw KVPackError.ioError("ftruncate", path: path) }
        end = length
    }
}
