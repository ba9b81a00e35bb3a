#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A file written under a temporary name beside its destination and renamed over it only when
/// complete, so the destination is always either the old file or the whole new one. Every
/// "write, then rename" of the project goes through here (new .kvpack files, conversions,
/// safetensors exports).
public struct AtomicReplacement: Sendable {
    public let destination: String
    /// `destination.LABEL-PID-RANDOM`, in the destination's directory (a rename never crosses
    /// file systems).
    public let temporaryPath: String

    /// Refuses an existing destination unless `overwrite`. `label` names the work in the
    /// temporary name, so a crashed run's leftover says what it was.
    public init(destination: String, overwrite: Bool, label: String = "tmp") throws {
        if !overwrite, access(destination, F_OK) == 0 {
            throw KVPackError.argument("\(destination) already exists (pass overwrite to replace it)")
        }
        self.destination = destination
        temporaryPath = "\(destination).\(label)-\(getpid())-\(UInt32.random(in: 0 ... .max))"
    }

    /// Renames the temporary file over the destination and makes the rename durable.
    public func commit() throws {
        guard rename(temporaryPath, destination) == 0 else {
            throw KVPackError.ioError("rename to \(destination)", path: temporaryPath)
        }
        syncDirectory(of: destination)
    }

    /// Removes the temporary file (after a failure; nothing happens to the destination).
    public func discard() {
        unlink(temporaryPath)
    }

    /// Writes the file with `body(temporaryPath)` and renames it into place; on any error the
    /// temporary file is removed and the destination is untouched.
    public static func write<T>(to destination: String, overwrite: Bool, label: String = "tmp",
                                _ body: (String) throws -> T) throws -> T {
        let replacement = try AtomicReplacement(destination: destination, overwrite: overwrite, label: label)
        do {
            let result = try body(replacement.temporaryPath)
            try replacement.commit()
            return result
        } catch {
            replacement.discard()
            throw error
        }
    }
}

/// fsync of a directory, so a rename or a new file's directory entry is durable.
func syncDirectory(of path: String) {
    let dir: String
    if let slash = path.lastIndex(of: "/") {
        dir = slash == path.startIndex ? "/" : String(path[..<slash])
    } else {
        dir = "."
    }
    let fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    guard fd >= 0 else { return }
    fsync(fd)
    close(fd)
}
