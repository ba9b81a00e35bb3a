import Foundation
import KVPack

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

    /// Downloads an object into `path` in ranged GETs of `chunk` bytes, written beside it and
    /// renamed into place only once the file opens (its header, manifest and commit checksums
    /// verified) and, with `deep`, validates block by block: a damaged or partial object leaves
    /// nothing behind.
    public static func pull(_ location: S3Location, to path: String, client: S3Client, chunk: Int = 8 << 20, overwrite: Bool = false,
                            deep: Bool = false, acceptRecovered: Bool = false, progress: ((Int, Int) -> Void)? = nil) throws -> PullReport {
        let start = Date()
        let (size, _) = try client.head(location)
        var requests = 1
        let replacement = try AtomicReplacement(destination: path, overwrite: overwrite, label: "pull")
        do {
            guard FileManager.default.createFile(atPath: replacement.temporaryPath, contents: nil),
                  let handle = FileHandle(forWritingAtPath: replacement.temporaryPath) else {
                throw KVPackError(.io, "cannot create \(replacement.temporaryPath)")
            }
            defer { try? handle.close() }
            var offset = 0
            while offset < size {
                let end = min(size, offset + chunk)
                try handle.write(contentsOf: try client.get(location, range: offset ..< end))
                requests += 1
                offset = end
                progress?(offset, size)
            }
            try handle.synchronize()
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
