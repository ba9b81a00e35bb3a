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
        // Said here, about the destination, rather than later about a temporary name.
        let directory = Self.directory(of: destination)
        guard access(directory, W_OK | X_OK) == 0 else {
            throw KVPackError.ioError("create in directory \(directory)", path: destination)
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

extension AtomicReplacement {
    /// The directory a path's file is in.
    static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }
}

/// fsync of a directory, so a rename or a new file's directory entry is durable.
func syncDirectory(of path: String) {
    let fd = open(AtomicReplacement.directory(of: path), O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    guard fd >= 0 else { return }
    fsync(fd)
    close(fd)
}
