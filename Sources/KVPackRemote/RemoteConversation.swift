import Foundation
import KVPack

/// What an object held when this process last pulled or published it: its ETag, its size, and
/// the XXH3-64 of those bytes. A later publish appends to exactly that object or not at all.
public struct PublishedVersion: Sendable, Codable, Equatable {
    public var etag: String
    public var size: Int
    public var hash: UInt64

    public init(etag: String, size: Int, hash: UInt64) {
        self.etag = etag
        self.size = size
        self.hash = hash
    }
}

extension ObjectTransfer {
    public struct PublishReport: Sendable, Codable {
        public var location: String
        public var bytes: Int
        /// Bytes sent over the network (the rest was copied on the server).
        public var uploadedBytes: Int
        /// Bytes the server copied from the previous version (UploadPartCopy).
        public var copiedBytes: Int
        public var parts: Int
        public var seconds: Double
    }

    /// The smallest part S3 accepts (except the last): a previous version shorter than this
    /// cannot be the copied first part, and the file is uploaded whole.
    public static let minimumPartSize = 5 << 20
    /// The largest part a publish copies on the server (S3 allows 5 GiB).
    public static let maximumCopyPart = 2 << 30

    /// Publishes `file`, a longer version of the object `previous` describes, so that no reader
    /// ever sees a torn object and an open reader of the old version keeps reading valid bytes:
    /// a .kvpack grows only by appending, so the new object starts with the old one's bytes.
    /// When the file still starts with exactly those bytes (their hash), a multipart upload
    /// copies them on the server (UploadPartCopy, only if the object is still that version) and
    /// uploads only the new tail; otherwise (a context shift rewrote the file, or the old
    /// object is under 5 MiB) the whole file is uploaded. Either way the server assembles the
    /// object when the upload completes. If someone else published meanwhile (another ETag),
    /// nothing is overwritten: the error says where the local file is.
    public static func publish(file: String, to location: S3Location, client: S3Client, previous: PublishedVersion?,
                               partSize: Int = 8 << 20, copyPartSize: Int = maximumCopyPart) throws -> (PublishReport, PublishedVersion) {
        let start = Date()
        let reader = try KVPackReader(path: file)
        try requireClean(reader, what: file, acceptRecovered: false)
        // `bytes` points into the reader's mapping: the reader must outlive every use of it.
        defer { withExtendedLifetime(reader) {} }
        let bytes = reader.file.bytes, size = bytes.count
        if let previous {
            let current: String?
            do {
                current = try client.head(location).etag
            } catch let e as RemoteError where e.status == 404 {
                current = nil
            }
            guard current == nil || current == previous.etag else {
                throw RemoteError("\(location) changed since this process read it (ETag \(current!), was \(previous.etag)): another writer published it; nothing was overwritten, and this conversation is in \(file)")
            }
        }
        var uploaded = 0, copied = 0, parts = 1
        let appendable = previous.map { p in
            p.size >= minimumPartSize && p.size <= size && Checksum.xxh3(UnsafeRawBufferPointer(rebasing: bytes[0 ..< p.size])) == p.hash
        } ?? false
        if let previous, appendable {
            parts = try multipartUpload(location, client: client) { id, etags in
                // S3 copies at most 5 GiB per part: the previous version goes in equal parts of
                // at most `copyPartSize` (each over the 5 MiB minimum).
                let piece = max(copyPartSize, minimumPartSize)
                let copyParts = (previous.size + piece - 1) / piece
                for i in 0 ..< copyParts {
                    let range = previous.size * i / copyParts ..< previous.size * (i + 1) / copyParts
                    do {
                        etags.append(try client.uploadPartCopy(location, uploadID: id, number: etags.count + 1, source: location, range: range,
                                                               ifMatch: previous.etag))
                    } catch let e as RemoteError where e.status == 412 {
                        // Some servers (OpenStack Swift's s3api) compare another ETag than the one
                        // they report for a multipart object: if HEAD still reports the version we
                        // hold, the copy goes ahead guarded by that check alone.
                        guard try client.head(location).etag == previous.etag else {
                            throw RemoteError("\(location) changed while publishing: another writer published it; nothing was overwritten, and this conversation is in \(file)")
                        }
                        etags.append(try client.uploadPartCopy(location, uploadID: id, number: etags.count + 1, source: location, range: range))
                    }
                }
                try uploadParts(bytes, previous.size ..< size, partSize: partSize, to: location, uploadID: id, client: client, file: file,
                                etags: &etags)
            }
            copied = previous.size
            uploaded = size - previous.size
        } else {
            let report = try push(file: file, to: location, client: client, partSize: max(partSize, minimumPartSize), verify: false)
            uploaded = size
            parts = report.parts
        }
        // What arrived: each new part's bytes by its MD5 (above), the whole by its size.
        let head = try client.head(location)
        guard head.size == size else {
            throw RemoteError("\(location) holds \(head.size) bytes after publishing; \(file) has \(size)")
        }
        let version = PublishedVersion(etag: head.etag ?? "", size: size, hash: Checksum.xxh3(bytes))
        return (PublishReport(location: location.description, bytes: size, uploadedBytes: uploaded, copiedBytes: copied, parts: parts,
                              seconds: Date().timeIntervalSince(start)), version)
    }
}

/// A conversation kept in object storage and continued here: the object is pulled into a local
/// working file (reused without a download when the object has not changed since this machine
/// last had it), the chat appends to that file as usual, and each `publish` makes the object the
/// file's newest commit (see `ObjectTransfer.publish`).
public final class RemoteConversation {
    public let location: S3Location
    public let client: S3Client
    /// The local working file the chat reads and appends to.
    public let path: String
    public private(set) var version: PublishedVersion
    /// Whether the working file was already here (the object unchanged), so nothing was downloaded.
    public let reused: Bool
    public let pullSeconds: Double
    /// Where a previous working file with unpublished commits was moved (nil if there was none).
    public private(set) var unpublished: String?
    private let versionPath: String

    /// The working file for `location` lives in `directory` (the object cache directory's
    /// `chats/`, or a temporary directory), with a sidecar recording the version it matches.
    public init(_ location: S3Location, client: S3Client, directory: String) throws {
        self.location = location
        self.client = client
        let start = Date()
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let name = String(Checksum.xxh3(Array(location.description.utf8)), radix: 16)
        path = directory + "/\(name).kvpack"
        versionPath = directory + "/\(name).version.json"
        let head = try client.head(location)
        let etag = head.etag ?? ""
        if let data = FileManager.default.contents(atPath: versionPath),
           let recorded = try? JSONDecoder().decode(PublishedVersion.self, from: data),
           recorded.etag == etag, recorded.size == head.size,
           let local = try? Self.sizeAndHash(path), local.size == head.size, local.hash == recorded.hash {
            version = recorded
            reused = true
        } else {
            // A working file with commits that were never published (a publish refused because
            // another writer got there first, or a process that died before publishing) is kept
            // beside, not overwritten: the user decides what to do with those turns.
            if let data = FileManager.default.contents(atPath: versionPath),
               let recorded = try? JSONDecoder().decode(PublishedVersion.self, from: data),
               let local = try? Self.sizeAndHash(path), local.hash != recorded.hash {
                let aside = directory + "/\(name).unpublished-\(Int(Date().timeIntervalSince1970)).kvpack"
                try FileManager.default.moveItem(atPath: path, toPath: aside)
                unpublished = aside
            }
            _ = try ObjectTransfer.pull(location, to: path, client: client, overwrite: true)
            let local = try Self.sizeAndHash(path)
            version = PublishedVersion(etag: etag, size: local.size, hash: local.hash)
            reused = false
        }
        pullSeconds = Date().timeIntervalSince(start)
        try saveVersion()
    }

    /// The default place for working files: `chats/` in the object cache directory, else a
    /// temporary directory.
    public static func defaultDirectory(cache: RemoteCache) -> String {
        (cache.directory ?? NSTemporaryDirectory() + "kvpack-\(getuid())") + "/chats"
    }

    /// Publishes the working file's newest commit (nothing to do if the file has not grown).
    @discardableResult
    public func publish(partSize: Int = 8 << 20) throws -> ObjectTransfer.PublishReport? {
        let size = (try? FileManager.default.attributesOfItem(atPath: path)[.size] as? Int) ?? nil
        if size == version.size, let local = try? Self.sizeAndHash(path), local.hash == version.hash { return nil }
        let (report, newVersion) = try ObjectTransfer.publish(file: path, to: location, client: client, previous: version, partSize: partSize)
        version = newVersion
        try saveVersion()
        return report
    }

    /// A file's size and the XXH3-64 of its bytes (what `PublishedVersion` records).
    public static func sizeAndHash(_ path: String) throws -> (size: Int, hash: UInt64) {
        let file = try MappedFile(path: path)
        return withExtendedLifetime(file) { (file.bytes.count, Checksum.xxh3(file.bytes)) }
    }

    private func saveVersion() throws {
        try JSONEncoder().encode(version).write(to: URL(fileURLWithPath: versionPath), options: .atomic)
    }
}
