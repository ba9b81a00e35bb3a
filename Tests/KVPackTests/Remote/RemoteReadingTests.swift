import Foundation
import Synchronization
import Testing
@testable import KVPack
@testable import KVPackRemote

/// An object held in memory, fetched through `RemoteObject` as an S3 object would be: counts
/// requests, and damages or refuses them on demand.
final class MemoryObject: RemoteObject, @unchecked Sendable {
    // @unchecked: the knobs are set between reads; counters are atomic.
    let name: String
    let version: String
    private(set) var bytes: [UInt8]
    var size: Int { bytes.count }
    /// Offsets whose byte is flipped in the next response that carries them (then served right).
    var damageOnce: Set<Int> = []
    /// Fetch calls fail (as a dead server would) while set.
    var failing = false
    let requests = Atomic<Int>(0)
    let calls = Atomic<Int>(0)

    init(_ bytes: [UInt8], name: String = "mem://object", version: String = "v1") {
        self.bytes = bytes
        self.name = name
        self.version = version
    }

    func fetch(_ ranges: [Range<Int>], deliver: @escaping @Sendable (Int, UnsafeRawBufferPointer) throws -> Void) throws {
        calls.add(1, ordering: .relaxed)
        if failing { throw RemoteError("connection refused") }
        for (i, r) in ranges.enumerated() {
            requests.add(1, ordering: .relaxed)
            var chunk = Array(bytes[r])
            for at in damageOnce where r.contains(at) {
                chunk[at - r.lowerBound] ^= 0x10
                damageOnce.remove(at)
            }
            try chunk.withUnsafeBytes { try deliver(i, $0) }
        }
    }
}

struct RemoteReadingTests {
    static let geometry = ModelGeometry(layerCount: 2, queryHeadCount: 4, kvHeadCount: 2, headDim: 32)

    /// A file in `spec` with sealed segments, an index chain, a tail and metadata.
    static func file(_ spec: String, tokens: Int = 300, major: UInt16 = FileHeader.currentMajor, seed: UInt64 = 5) throws -> String {
        let path = temporaryDirectory() + "/remote.kvpack"
        let data = RandomKV(geometry: geometry, tokens: tokens, seed: seed, maxExponent: 6)
        try writeFile(path, data: data, segmentTokens: 32, spec: spec, batches: [9, 50, 1], commitsAfter: [9, 59, 200],
                      options: testOptions(major: major))
        return path
    }

    static func remote(_ object: MemoryObject, cache: String? = nil, gap: Int = 256 << 10) throws -> KVPackReader {
        try KVPackReader(file: MappedFile(remote: object, cache: RemoteCache(directory: cache, coalesceGap: gap)), path: object.name)
    }

    /// Everything a reader answers, as comparable values.
    static func answers(_ r: KVPackReader) throws -> [String] {
        let g = r.geometry
        var out = ["\(r.tokenCount) \(r.commitSerial) \(try r.tokenIDs) \(try r.positions) \(try r.userMetadata().map { "\($0.key)=\($0.value)" })"]
        var summary = try FileSummary(reader: r)
        summary.path = ""
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        out.append(String(decoding: try encoder.encode(summary), as: UTF8.self))
        for layer in 0 ..< g.layerCount {
            for head in 0 ..< g.kvHeadCount {
                for kind in [KVKind.key, .value] { out.append("\(try r.decode(layer: layer, kvHead: head, kind: kind))") }
                var rng = SplitMix64(seed: UInt64(layer * 10 + head))
                let q = (0 ..< g.groupSize * g.headDim).map { _ in Float(rng.nextGaussian()) }
                out.append("\(try r.attend(layer: layer, kvHead: head, queries: q))")
                out.append("\(try r.attend(layer: layer, kvHead: head, queries: q, tokens: 40 ..< 250))")
            }
        }
        return out
    }

    /// Where two answer lists differ (index and a short excerpt), nil when equal: keeps failure
    /// messages readable.
    static func difference(_ a: [String], _ b: [String]) -> String? {
        guard a != b else { return nil }
        guard a.count == b.count else { return "\(a.count) answers vs \(b.count)" }
        let i = a.indices.first { a[$0] != b[$0] }!
        return "answer \(i): \(a[i].prefix(300)) vs \(b[i].prefix(300))"
    }

    static func expectSame(_ a: [String], _ b: [String], _ label: String = "", sourceLocation: SourceLocation = #_sourceLocation) {
        if let d = difference(a, b) { Issue.record("\(label) \(d)", sourceLocation: sourceLocation) }
    }

    @Test("a remote object answers exactly as the local file: tokens, summary, decode, attention, deep validation (raw, zstd, int, nsn; format 1 and 2)")
    func sameAnswers() throws {
        for (spec, major) in [("raw:f16", UInt16(2)), ("raw:f16:zstd", 2), ("int:k2v2:kc32", 2), ("nsn:2", 2), ("raw:bf16", 1), ("int:k4v4", 1)] {
            let path = try Self.file(spec, major: major)
            let local = try KVPackReader(path: path)
            let object = MemoryObject(fileBytes(path))
            let remote = try Self.remote(object)
            try Self.expectSame(Self.answers(remote), Self.answers(local), "\(spec) v\(major)")
            let report = Validator.validate(file: try MappedFile(remote: object, cache: RemoteCache(directory: nil)), path: "x", deep: true)
            #expect(report.problems.isEmpty && report.isValid && report.blocksChecked > 0, "\(spec): \(report.problems)")
        }
    }

    @Test("opening costs a few requests at 300 and at 3,000 tokens, and reads only a small part of the object")
    func openDoesNotGrow() throws {
        var costs: [Int] = []
        for tokens in [300, 3000] {
            let object = MemoryObject(fileBytes(try Self.file("raw:f32", tokens: tokens)))
            // No coalescing: the test file's blocks are too small to show anything with it.
            let reader = try Self.remote(object, gap: 0)
            #expect(reader.tokenCount == tokens)
            let s = reader.file.remoteStatistics!
            costs.append(s.requests)
            #expect(s.bytes <= min(object.size, 160 << 10), "\(tokens) tokens: \(s.bytes) bytes fetched to open")
            // One layer's attention fetches that layer's blocks, not the file.
            let before = s.bytes
            _ = try reader.attend(layer: 1, kvHead: 0, queries: [Float](repeating: 0.1, count: 2 * 32))
            let fetched = reader.file.remoteStatistics!.bytes - before
            if tokens == 3000 { #expect(fetched < object.size / 2, "\(fetched) of \(object.size)") }
        }
        // Two requests at most (the first and last 64 KiB; one when they are close), plus at most
        // one for an index frame outside them.
        #expect(costs.allSatisfy { $0 <= 3 }, "\(costs)")
    }

    @Test("a cache directory: the next open starts warm (no request for pages fetched before); a damaged cache is fetched again, never believed")
    func cacheDirectory() throws {
        let path = try Self.file("int:k2v2:kc32")
        let local = try KVPackReader(path: path)
        let dir = temporaryDirectory() + "/cache"
        let object = MemoryObject(fileBytes(path), name: "s3://bucket/chat.kvpack", version: "\"etag-1\"")
        let first = try Self.remote(object, cache: dir)
        let want = try Self.answers(local)
        try Self.expectSame(Self.answers(first), want)
        let fetched = object.requests.load(ordering: .relaxed)
        let warm = try Self.remote(object, cache: dir)
        #expect(warm.file.remoteStatistics!.cachedPagesAtOpen > 0)
        try Self.expectSame(Self.answers(warm), want)
        #expect(object.requests.load(ordering: .relaxed) == fetched, "a warm cache needs no requests")
        // Another reader starting the entry afresh replaces its files; this one keeps its own
        // (its pages are not truncated under it) and answers the same.
        var discard = RemoteCache(directory: dir)
        discard.discardExisting = true
        let afresh = try KVPackReader(file: MappedFile(remote: object, cache: discard), path: "afresh")
        #expect(afresh.file.remoteStatistics!.cachedPagesAtOpen == 0)
        try Self.expectSame(Self.answers(warm), want)
        try Self.expectSame(Self.answers(afresh), want)
        let fetchedAfresh = object.requests.load(ordering: .relaxed)

        // Damage the cached copy of a block and of the newest index: the block is fetched again
        // on first use; the open-time damage makes RemoteFiles drop the entry and start afresh.
        let entries = try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasSuffix(".bytes") }
        #expect(entries.count == 1)
        let data = dir + "/" + entries[0]
        var cached = fileBytes(data)
        let block = Int(try local.blockOffset(segment: 2, stream: 1)) + FrameHeader.size + 5
        cached[block] ^= 0xFF
        writeBytes(cached, to: data)
        let healed = try Self.remote(object, cache: dir)
        try Self.expectSame(Self.answers(healed), want)
        #expect(object.requests.load(ordering: .relaxed) == fetchedAfresh + 1, "one request for the damaged block")
        cached = fileBytes(data)
        cached[Int(local.commitOffset) + 3] ^= 0xFF
        writeBytes(cached, to: data)
        // The newest commit frame damaged in the cache: alone, a reader would fall back to an
        // older commit; RemoteFiles drops the entry and reads the object afresh.
        let fallback = try Self.remote(object, cache: dir)
        #expect(fallback.commitSerial < local.commitSerial && !fallback.recoveryNotes.isEmpty)
        let reopened = try RemoteFiles.reader(object, cache: RemoteCache(directory: dir))
        #expect(reopened.recoveryNotes.isEmpty && reopened.commitSerial == local.commitSerial)
        try Self.expectSame(Self.answers(reopened), want)
        let other = MemoryObject(fileBytes(path), name: "s3://bucket/other.kvpack", version: "v1")
        _ = try Self.remote(other, cache: dir)
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasSuffix(".bytes") }.count == 2)
        // A new version of an object replaces its entry.
        let replaced = MemoryObject(fileBytes(path), name: "s3://bucket/chat.kvpack", version: "\"etag-2\"")
        _ = try Self.remote(replaced, cache: dir)
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasSuffix(".bytes") }.count == 2)
    }

    @Test("damage in flight is fetched again; damage in the object itself is an error that says so; a dead source is an error naming the object, and reading resumes when it is back")
    func faults() throws {
        let path = try Self.file("raw:f16")
        let local = try KVPackReader(path: path)
        let want = try Self.answers(local)
        let object = MemoryObject(fileBytes(path), name: "s3://bucket/f.kvpack")
        let stream = Self.geometry.stream(layer: 1, kvHead: 0, kind: .key)
        let block = Int(try local.blockOffset(segment: 3, stream: stream)) + FrameHeader.size + 7
        let table = Int(local.state.segmentTables[4]) + FrameHeader.size + 3
        object.damageOnce = [block, table]
        let reader = try Self.remote(object, gap: 0)
        try Self.expectSame(Self.answers(reader), want)
        #expect(object.damageOnce.isEmpty)

        var bad = fileBytes(path)
        bad[block] ^= 0x01
        let damaged = try Self.remote(MemoryObject(bad, name: "s3://bucket/bad.kvpack"), gap: 0)
        #expect { try damaged.decode(layer: 1, kvHead: 0, kind: .key) } throws: {
            let e = $0 as? KVPackError
            return e?.code == .checksumMismatch && e!.description.contains("fetched twice from s3://bucket/bad.kvpack")
        }

        let flaky = MemoryObject(fileBytes(path), name: "s3://bucket/flaky.kvpack")
        let r = try Self.remote(flaky, gap: 0)
        flaky.failing = true
        #expect { try r.decode(layer: 0, kvHead: 1, kind: .value) } throws: {
            let e = $0 as? KVPackError
            return e?.code == .io && e!.description.contains("s3://bucket/flaky.kvpack") && e!.description.contains("connection refused")
        }
        flaky.failing = false
        #expect(try r.decode(layer: 0, kvHead: 1, kind: .value) == local.decode(layer: 0, kvHead: 1, kind: .value))
        // Opening against a dead source fails at once, naming it.
        flaky.failing = true
        #expect { try Self.remote(flaky) } throws: { "\($0)".contains("s3://bucket/flaky.kvpack") }
    }

    @Test("KVPACK_CACHE_DIR and KVPACK_CACHE_LIMIT; sizes with suffixes")
    func cacheSettings() throws {
        #expect(try RemoteFiles.cache(environment: ["HOME": "/h"]).directory == "/h/.cache/kvpack/objects")
        #expect(try RemoteFiles.cache(environment: ["HOME": "/h", "XDG_CACHE_HOME": "/x"]).directory == "/x/kvpack/objects")
        #expect(try RemoteFiles.cache(environment: ["KVPACK_CACHE_DIR": "none"]).directory == nil)
        #expect(try RemoteFiles.cache(environment: ["KVPACK_CACHE_DIR": "/c", "KVPACK_CACHE_LIMIT": "2G"]).limitBytes == 2 << 30)
        #expect(RemoteFiles.parseBytes("512k") == 512 << 10 && RemoteFiles.parseBytes("100") == 100 && RemoteFiles.parseBytes("1.5G") == nil)
        #expect { try RemoteFiles.cache(environment: ["KVPACK_CACHE_LIMIT": "lots"]) } throws: { "\($0)".contains("KVPACK_CACHE_LIMIT") }
    }
}
