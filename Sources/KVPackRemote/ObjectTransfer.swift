import Crypto
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
            parts = try multipartUpload(location, client: client) { id, etags in
                try uploadParts(bytes, 0 ..< size, partSize: partSize, to: location, uploadID: id, client: client, file: file, etags: &etags) {
                    progress?($0, size)
                }
            }
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

    /// Runs `body(uploadID, etags)` inside a multipart upload of `location`, then completes it
    /// with the parts `body` appended to `etags`: the object appears whole, atomically. On any
    /// failure the upload is aborted (the previous object, if any, stays). Returns the part count.
    static func multipartUpload(_ location: S3Location, client: S3Client, _ body: (String, inout [String]) throws -> Void) throws -> Int {
        let id = try client.createMultipartUpload(location)
        var etags: [String] = []
        do {
            try body(id, &etags)
            try client.completeMultipartUpload(location, uploadID: id, etags: etags)
        } catch {
            client.abortMultipartUpload(location, uploadID: id)
            throw error
        }
        return etags.count
    }

    /// Uploads `bytes[range]` as parts of `partSize` bytes (the last one shorter), numbered after
    /// those already in `etags`, each checked by its ETag (`checkPart`); `sent(end)` after each.
    static func uploadParts(_ bytes: UnsafeRawBufferPointer, _ range: Range<Int>, partSize: Int, to location: S3Location, uploadID: String,
                            client: S3Client, file: String, etags: inout [String], sent: ((Int) -> Void)? = nil) throws {
        var offset = range.lowerBound
        while offset < range.upperBound {
            let end = min(range.upperBound, offset + partSize)
            let part = UnsafeRawBufferPointer(rebasing: bytes[offset ..< end])
            let etag = try client.uploadPart(location, uploadID: uploadID, number: etags.count + 1, data: Data(part))
            try checkPart(etag, part, at: offset, location: location, file: file)
            etags.append(etag)
            offset = end
            sent?(offset)
        }
    }

    /// Checks an uploaded part by the ETag S3 returns for it, the MD5 of the bytes it stored:
    /// the new bytes of a publish are verified without reading them back (which would download
    /// every turn again). Where part ETags are not MD5s (AWS with KMS encryption) this check is
    /// skipped and the object's final size is all that is compared.
    static func checkPart(_ etag: String, _ part: UnsafeRawBufferPointer, at offset: Int, location: S3Location, file: String) throws {
        let hex = etag.trimmingCharacters(in: CharacterSet(charactersIn: "\""))
        guard hex.count == 32, hex.allSatisfy(\.isHexDigit) else { return }
        let md5 = Insecure.MD5.hash(data: part).map { String(format: "%02x", $0) }.joined()
        guard md5 == hex.lowercased() else {
            throw RemoteError("\(location): the server stored a part of \(file) (bytes \(offset)..<\(offset + part.count)) whose MD5 is \(hex), not \(md5): damaged on the way")
        }
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
            let out = try PositionalFile(creating: replacement.temporaryPath)
            let done = PullProgress(total: size, report: progress)
            try ConcurrentRequests.run(count: chunks, width: concurrency) { i in
                let range = i * chunk ..< min(size, (i + 1) * chunk)
                let data = try client.get(location, range: range)
                try data.withUnsafeBytes { try out.write($0, at: range.lowerBound) }
                done.add(range.count)
            }
            try out.sync()
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
