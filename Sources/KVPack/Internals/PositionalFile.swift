#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Writes all of `bytes` at `offset` of `fd`, going on after short writes and interrupts.
/// Returns nil, or the errno of the write that failed (callers name the file in their error).
func writeFully(_ fd: Int32, _ bytes: UnsafeRawBufferPointer, at offset: Int) -> Int32? {
    var done = 0
    while done < bytes.count {
        let n = pwrite(fd, bytes.baseAddress! + done, bytes.count - done, off_t(offset + done))
        if n > 0 {
            done += n
        } else if n < 0, errno == EINTR {
            continue
        } else {
            return n < 0 ? errno : EIO
        }
    }
    return nil
}

/// A new file written at offsets, from several threads at once: a download assembled as its
/// ranges arrive (`kvpack pull`). Closed when released.
public final class PositionalFile: @unchecked Sendable {
    // @unchecked: the descriptor is immutable; pwrite at disjoint offsets needs no lock.
    public let path: String
    private let fd: Int32

    /// Creates `path` (replacing a file there), empty.
    public init(creating path: String) throws {
        fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw KVPackError.ioError("open", path: path) }
        self.path = path
    }

    deinit { close(fd) }

    public func write(_ bytes: UnsafeRawBufferPointer, at offset: Int) throws {
        if let code = writeFully(fd, bytes, at: offset) { throw KVPackError.ioError("write", path: path, errno: code) }
    }

    public func sync() throws {
        guard fsync(fd) == 0 else { throw KVPackError.ioError("fsync", path: path) }
    }
}
