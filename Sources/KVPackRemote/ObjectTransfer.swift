import Foundation
import KVPack

/// Bytes a pull has written so far, reported from the request threads one at a time.
private final class PullProgress: @unchecked Sendable {
    // @unchecked: `done` is only touched under `lock`.
    private let lock = NSLock()
    private var done = 0
    let total: Int
    let report: ((Int, Int) -> Void)?
    init(total: Int, report: ((Int, Int) -> Void)?) {
        self.total = total
        self.report = report
    }
    func add(_ n: Int) {
        lock.lock()
        defer { lock.unlock() }
        done += n
        report?(done, total)
    }
}

/// `kvpack push` and `kvpack pull`: whole .kvpack files to and from object storage.
public enum ObjectTransfer {
    public struct PushReport: Sendable, Codable {
        public var location: String
        public var bytes: Int
        public var parts: Int
        public var seconds: Double
        /// Whether the object's bytes were read back and compared with the file's.
        public var verified: Bool
        public var verifySeconds: Double
    }

    public struct PullReport: Sendable, Codable {
        public var location: String
        public var bytes: Int
        public var requests: Int
        public var seconds: Double
        public var tokens: Int
    }

    /// Uploads a .kvpack file (opened first: only a file that loads is published). Up to
    /// `partSize` bytes go in one PUT; more in a multipart upload of `partSize` parts, which the
    /// server assembles atomically when it completes (readers never see a partial object), and
    /// which is aborted on failure. With `verify`, the object is read back in ranges and compared
    /// byte for byte with the file. (AWS wants parts of at least 5 MiB, the last excepted.)
    public static func push(file: String, to location: S3Location, client: S3Client, partSize: Int = 8 << 20, verify: Bool = true,
                            acceptRecovered: Bool = false, progress: ((Int, Int) -> Void)? = nil) throws -> PushReport {
        guard partSize >= 1024 else { throw RemoteError("part size \(partSize) is below 1 KiB") }
        let reader = try KVPackReader(path: file)
        try requireClean(reader, what: file, acceptRecovered: acceptRecovered)
        // `bytes` points into the reader's mapping: the reader must outlive every use of it.
        defer { withExtendedLifetime(reader) {} }
        let bytes = reader.file.bytes, size = bytes.count
        let start = Date()
        var parts = 1
        if size <= partSize {
            try client.put(location, data: Data(bytes))
            progress?(size, size)
        } else {
            let id = try client.createMultipartUpload(location)
            var etags: [String] = []
            do {
                var offset = 0
                while offset < size {
                    let end = min(size, offset + partSize)
                    etags.append(try client.uploadPart(location, uploadID: id, number: etags.count + 1,
                                                       data: Data(UnsafeRawBufferPointer(rebasing: bytes[offset ..< end]))))
                    offset = end
                    progress?(offset, size)
                }
                try client.completeMultipartUpload(location, uploadID: id, etags: etags)
            } catch {
                client.abortMultipartUpload(location, uploadID: id)
                throw error
            }
            parts = etags.count
        }
        let uploaded = Date()
        if verify {
            let (remoteSize, _) = try client.head(location)
            guard remoteSize == size else {
                throw RemoteError("\(location) holds \(remoteSize) bytes after the upload; \(file) has \(size)")
            }
            var offset = 0
            while offset < size {
                let end = min(size, offset + partSize)
                let got = try client.get(location, range: offset ..< end)
                let same = got.withUnsafeBytes { g in memcmp(g.baseAddress!, bytes.baseAddress! + offset, end - offset) == 0 }
                guard same else { throw RemoteError("\(location) differs from \(file) in bytes \(offset)..<\(end) after the upload") }
                offset = end
            }
        }
        return PushReport(location: location.description, bytes: size, parts: parts, seconds: uploaded.timeIntervalSince(start),
                          verified: verify, verifySeconds: Date().timeIntervalSince(uploaded))
    }

    /// A file that opened only by recovery (bytes after its last commit, damaged commits
    /// skipped: a writer stopped mid-commit, or a torn copy) is not published or accepted as it
    /// is unless asked: its newest commit may not be what its owner meant to share.
    static func requireClean(_ reader: KVPackReader, what: String, acceptRecovered: Bool) throws {
        guard !acceptRecovered, !reader.recoveryNotes.isEmpty else { return }
        throw RemoteError("\(what) opens only by recovery: \(reader.recoveryNotes.map(\.description).joined(separator: "; ")) (--accept-recovered takes its last good commit, \(reader.tokenCount) tokens)")
    }

    /// Downloads an object into `path` in ranged GETs of `chunk` bytes, `concurrency` at a time,
    /// written beside it and renamed into place only once the file opens (its header, manifest
    /// and commit checksums verified) and, with `deep`, validates block by block: a damaged or
    /// partial object leaves nothing behind.
    public static func pull(_ location: S3Location, to path: String, client: S3Client, chunk: Int = 8 << 20, concurrency: Int = 8,
                            overwrite: Bool = false, deep: Bool = false, acceptRecovered: Bool = false,
                            progress: ((Int, Int) -> Void)? = nil) throws -> PullReport {
        let start = Date()
        let (size, _) = try client.head(location)
        let chunks = (size + chunk - 1) / chunk
        let requests = 1 + chunks
        let replacement = try AtomicReplacement(destination: path, overwrite: overwrite, label: "pull")
        do {
            let fd = open(replacement.temporaryPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            guard fd >= 0 else { throw KVPackError(.io, "cannot create \(replacement.temporaryPath): \(String(cString: strerror(errno)))") }
            defer { close(fd) }
            let done = PullProgress(total: size, report: progress)
            let temporary = replacement.temporaryPath
            try ConcurrentRequests.run(count: chunks, width: concurrency) { i in
                let range = i * chunk ..< min(size, (i + 1) * chunk)
                let data = try client.get(location, range: range)
                try data.withUnsafeBytes { bytes in
                    var written = 0
                    while written < bytes.count {
                        let n = pwrite(fd, bytes.baseAddress! + written, bytes.count - written, off_t(range.lowerBound + written))
                        if n > 0 { written += n } else if n < 0, errno == EINTR { continue } else {
                            throw KVPackError(.io, "writing \(temporary): \(String(cString: strerror(errno)))")
                        }
                    }
                }
                done.add(range.count)
            }
            guard fsync(fd) == 0 else { throw KVPackError(.io, "fsync \(replacement.temporaryPath): \(String(cString: strerror(errno)))") }
            let reader: KVPackReader
            do {
                reader = try KVPackReader(path: replacement.temporaryPath)
            } catch {
                throw RemoteError("\(location) is not a valid .kvpack file: \(error)")
            }
            try requireClean(reader, what: location.description, acceptRecovered: acceptRecovered)
            if deep {
                let report = Validator.validate(file: reader.file, path: location.description, deep: true)
                guard report.isValid else {
                    throw RemoteError("\(location) fails validation: \(report.problems.filter { $0.severity == .error }.map(\.description).joined(separator: "; "))")
                }
            }
            let tokens = reader.tokenCount
            try replacement.commit()
            return PullReport(location: location.description, bytes: size, requests: requests, seconds: Date().timeIntervalSince(start),
                              tokens: tokens)
        } catch {
            replacement.discard()
            throw error
        }
    }
}
