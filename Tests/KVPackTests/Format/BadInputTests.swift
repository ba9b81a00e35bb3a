import Foundation
import Testing
@testable import KVPack

/// Crafted and damaged files: each gives a specific error naming offset and field; none traps.
struct BadInputTests {
    /// A small valid file: 2 layers, 1 KV head, head_dim 4, segments of 4, 11 tokens committed in
    /// three steps (so it has sealed blocks, a tail of 3 rows in two runs, and an index chain).
    static func smallFile(spec: String = "raw:f16", salt: UInt64 = 0x5EED, major: UInt16 = FileHeader.currentMajor) throws -> (bytes: [UInt8], data: RandomKV) {
        let g = ModelGeometry(layerCount: 2, queryHeadCount: 2, kvHeadCount: 1, headDim: 4)
        let data = RandomKV(geometry: g, tokens: 11, seed: 4, maxExponent: 6)
        let dir = temporaryDirectory()
        try writeFile(dir + "/s.kvpack", data: data, segmentTokens: 4, spec: spec, batches: [5, 4, 2], commitsAfter: [5, 9],
                      options: testOptions(salt: salt, major: major))
        return (fileBytes(dir + "/s.kvpack"), data)
    }

    /// Frame offsets of a file, from a linear walk.
    static func frames(_ bytes: [UInt8]) throws -> [FrameHeader] {
        let file = MappedFile(copying: bytes)
        let salt = try FileHeader.decode(file.bytes).salt
        var out: [FrameHeader] = []
        var at: UInt64 = 64
        while at + 64 <= UInt64(bytes.count) {
            let h = try FrameHeader.decode(file.bytes, at: at, limit: UInt64(bytes.count), salt: salt)
            out.append(h)
            at = h.nextFrameOffset
        }
        return out
    }

    /// Rewrites a frame's header fields and payload (same length) and re-seals its checksums,
    /// so the damage is in the meaning, not caught by a checksum.
    static func reseal(_ bytes: inout [UInt8], frame: FrameHeader, salt: UInt64,
                       header edit: (inout FrameHeader) -> Void = { _ in }, payload: (inout [UInt8]) -> Void = { _ in }) {
        let start = Int(frame.payloadOffset)
        var p = Array(bytes[start ..< start + Int(frame.storedLength)])
        payload(&p)
        var h = frame
        edit(&h)
        h.payloadChecksum = Checksum.xxh3(p)
        bytes.replaceSubrange(start ..< start + p.count, with: p)
        bytes.replaceSubrange(Int(h.offset) ..< Int(h.offset) + 64, with: h.encoded(salt: salt))
    }

    static func put<T: FixedWidthInteger>(_ value: T, at offset: Int, in bytes: inout [UInt8]) {
        withUnsafeBytes(of: value.littleEndian) { bytes.replaceSubrange(offset ..< offset + MemoryLayout<T>.size, with: $0) }
    }

    /// Appends a frame (aligned) and returns its offset.
    @discardableResult
    static func appendFrame(_ bytes: inout [UInt8], tag: FrameTag, fields: FrameHeader.FieldPacker = .init(), payload: [UInt8] = [], salt: UInt64) -> UInt64 {
        bytes += [UInt8](repeating: 0, count: roundUp(bytes.count, to: 64) - bytes.count)
        let offset = UInt64(bytes.count)
        let h = FrameHeader(offset: offset, tag: tag, storedLength: UInt64(payload.count), rawLength: UInt64(payload.count),
                            payloadChecksum: Checksum.xxh3(payload), fields: fields.words)
        bytes += h.encoded(salt: salt) + payload
        bytes += [UInt8](repeating: 0, count: roundUp(bytes.count, to: 64) - bytes.count)
        return offset
    }

    static let salt: UInt64 = 0x5EED

    @Test("the small file is valid (the baseline the damage tests start from)")
    func baseline() throws {
        let (bytes, _) = try Self.smallFile()
        let r = try KVPackReader(file: MappedFile(copying: bytes))
        #expect(r.tokenCount == 11)
        #expect(Validator.validate(file: r.file, path: "small", deep: true).problems.isEmpty)
    }

    @Test("short files, bad magic, unknown major version, header checksum")
    func header() throws {
        let (bytes, _) = try Self.smallFile()
        #expect(openError([])?.code == .truncated)
        #expect(openError(Array(bytes.prefix(7)))?.code == .truncated)
        #expect(openError(Array(bytes.prefix(40)))?.code == .truncated)
        var magic = bytes
        magic[1] = UInt8(ascii: "X")
        #expect(openError(magic)?.code == .badMagic)
        var png = bytes
        png.replaceSubrange(0 ..< 8, with: [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A])
        #expect(openError(png)?.code == .badMagic)

        var v3 = bytes
        Self.put(UInt16(3), at: 8, in: &v3)
        let e = openError(v3)
        #expect(e?.code == .unsupportedVersion)
        #expect(e?.offset == 8)
        #expect(e?.field == "header.major")
        // A newer minor version is read (minor versions only add what old readers may skip).
        var minor = bytes
        Self.put(UInt16(7), at: 10, in: &minor)
        Self.put(Checksum.xxh3(Array(minor[0 ..< 56])), at: 56, in: &minor)
        #expect(openError(minor) == nil)

        var sum = bytes
        sum[30] ^= 0x01  // inside the salt
        let c = openError(sum)
        #expect(c?.code == .checksumMismatch)
        #expect(c?.offset == 56)
        #expect(c?.field == "header.checksum")

        var flags = bytes
        Self.put(UInt32(4), at: 20, in: &flags)
        Self.put(Checksum.xxh3(Array(flags[0 ..< 56])), at: 56, in: &flags)
        #expect(openError(flags)?.field == "header.fileFlags")
    }

    @Test("every truncation either opens at a commit point or fails with a KVPackError")
    func truncation() throws {
        let (bytes, data) = try Self.smallFile()
        let commitPoints: Set<Int> = [0, 5, 9, 11]
        var opened = 0
        for length in 0 ..< bytes.count {
            let cut = Array(bytes.prefix(length))
            do {
                let r = try KVPackReader(file: MappedFile(copying: cut))
                opened += 1
                #expect(commitPoints.contains(r.tokenCount), "length \(length): \(r.tokenCount) tokens")
                // What it holds is exactly the first tokens of the original.
                let k = try r.decode(layer: 1, kvHead: 0, kind: .key)
                #expect(k.map(\.bitPattern) == data.stream(layer: 1, head: 0, kind: .key, tokens: 0 ..< r.tokenCount).map { Float(Float16($0)).bitPattern })
                let report = Validator.validate(file: r.file, path: "cut", deep: true)
                #expect(report.isValid, "length \(length): \(report.problems)")
            } catch let e as KVPackError {
                #expect([.truncated, .noValidCommit, .checksumMismatch, .invalidField].contains(e.code), "length \(length): \(e)")
            }
        }
        #expect(opened > bytes.count / 2)
    }

    @Test("a flipped payload bit is a checksum error naming the block; validate lists it")
    func payloadBitFlip() throws {
        var (bytes, _) = try Self.smallFile()
        let block = try Self.frames(bytes).first { $0.tag == .block }!
        bytes[Int(block.payloadOffset) + 3] ^= 0x10
        let r = try KVPackReader(file: MappedFile(copying: bytes))  // payloads are not read at open
        let stream = Int(block.field32(32))
        let id = r.geometry.streamID(stream)
        #expect { try r.decode(layer: id.layer, kvHead: id.kvHead, kind: id.kind) } throws: { error in
            let e = error as? KVPackError
            return e?.code == .checksumMismatch && e?.offset == block.offset + 24 && e?.field == "BLCK.payloadChecksum"
        }
        let report = Validator.validate(file: r.file, path: "flip")
        #expect(!report.isValid)
        #expect(report.problems.contains { $0.code == "checksumMismatch" && $0.offset == block.offset + 24 })
    }

    /// The error a damaged file produces: the open error, or, when the reader fell back to an
    /// older commit, the reason it skipped the newest one. Validate must report it too.
    static func damage(_ bytes: [UInt8]) -> KVPackError? {
        let file = MappedFile(copying: bytes)
        let report = Validator.validate(file: file, path: "damaged")
        if let e = openError(bytes) {
            #expect(report.problems.contains { $0.code == e.code.rawValue && $0.field == e.field })
            return e
        }
        let r = try! KVPackReader(file: file)
        for note in r.recoveryNotes {
            if case let .skippedCommit(_, reason) = note {
                #expect(!report.isValid)
                #expect(report.problems.contains { $0.field == reason.field && $0.offset == reason.offset })
                return reason
            }
        }
        return nil
    }

    @Test("attention over a damaged block throws the checksum error (regression: it was lost, then crashed)")
    func attendOverDamagedBlock() throws {
        var (bytes, _) = try Self.smallFile()
        let block = try Self.frames(bytes).first { $0.tag == .block }!
        bytes[Int(block.payloadOffset) + 3] ^= 0x10
        let r = try KVPackReader(file: MappedFile(copying: bytes))
        let id = r.geometry.streamID(Int(block.field32(32)))
        let q = [Float](repeating: 1, count: r.geometry.groupSize * r.geometry.headDim)
        #expect { try r.attend(layer: id.layer, kvHead: id.kvHead, queries: q) } throws: { error in
            let e = error as? KVPackError
            return e?.code == .checksumMismatch && e?.offset == block.offset + 24
        }
        // With rows appended from memory too (a live session's path).
        let rows = [Float](repeating: 0.5, count: 3 * r.geometry.headDim)
        var out = q
        #expect(throws: KVPackError.self) {
            try rows.withUnsafeBufferPointer { k in
                try q.withUnsafeBufferPointer { qp in
                    try out.withUnsafeMutableBufferPointer { o in
                        try r.attend(layer: id.layer, kvHead: id.kvHead, queries: qp.baseAddress!,
                                     appending: AppendedRows(keys: k.baseAddress!, values: k.baseAddress!, count: 3),
                                     output: o.baseAddress!, workspace: AttentionWorkspace())
                    }
                }
            }
        }
    }

    @Test("oversized counts and offsets are invalid fields, allocated from nothing", arguments: [UInt16(1), 2])
    func lyingFields(major: UInt16) throws {
        let (original, _) = try Self.smallFile(major: major)
        let frames = try Self.frames(original)
        let index = frames.last { $0.tag == .index }!
        let commit = frames.last { $0.tag == .commit }!
        let manifest = frames[0]

        var counts = original
        Self.reseal(&counts, frame: index, salt: Self.salt, payload: { Self.put(UInt32.max, at: 0, in: &$0) })
        var e = Self.damage(counts)
        #expect(e?.code == .invalidField && e?.field == "INDX.blockCount")

        var tokens = original
        Self.reseal(&tokens, frame: commit, salt: Self.salt, header: { h in h.fields.1 = UInt64(UInt32.max) })
        e = Self.damage(tokens)
        #expect(e?.code == .invalidField && e?.field == (major == 1 ? "INDX.firstToken" : "INDX.firstSegment"), "\(String(describing: e))")

        var offset = original
        Self.reseal(&offset, frame: commit, salt: Self.salt, header: { h in h.fields.0 = UInt64.max - 63 })
        e = Self.damage(offset)
        #expect(e?.code == .invalidField && e?.field == "CMIT.indexOffset")

        // A block entry of the newest commit's chain pointing past the end of the file.
        var entry = original
        let chain = try KVPackReader(file: MappedFile(copying: original)).state.chain
        let link = try #require(chain.first { $0.blockCount > 0 })
        let listing = try #require(frames.first { $0.offset == link.offset })
        Self.reseal(&entry, frame: listing, salt: Self.salt, payload: { Self.put(UInt64.max - 63, at: 16, in: &$0) })
        e = Self.damage(entry)
        #expect(e?.code == .invalidField && e?.field == (major == 1 ? "INDX.block.frameOffset" : "INDX.segment.frameOffset"), "\(String(describing: e))")
        #expect(e?.offset == listing.payloadOffset + 16)

        var dim = original
        Self.reseal(&dim, frame: manifest, salt: Self.salt, payload: { Self.put(UInt32.max, at: 12, in: &$0) })
        e = Self.damage(dim)
        #expect(e?.code == .invalidField && e?.field == "manifest.headDim")

        var stored = original
        Self.reseal(&stored, frame: index, salt: Self.salt, header: { h in h.storedLength = UInt64.max })
        e = Self.damage(stored)
        // The commit frame's index no longer loads; no other commit references a sound chain
        // containing it, so the reader falls back to an older commit or fails, never traps.
        if let e { #expect([.invalidField, .checksumMismatch, .truncated].contains(e.code)) }

        var layers = original
        Self.reseal(&layers, frame: manifest, salt: Self.salt, payload: { Self.put(UInt32(4096), at: 0, in: &$0) })
        e = Self.damage(layers)
        #expect(e != nil)
    }

    @Test("references into other frames' payloads, to the wrong kind of frame, twice to one frame, or backwards in a cycle are errors",
          arguments: [UInt16(1), 2])
    func crossedReferences(major: UInt16) throws {
        let (original, _) = try Self.smallFile(major: major)
        let frames = try Self.frames(original)
        let blocks = frames.filter { $0.tag == .block }
        let chain = try KVPackReader(file: MappedFile(copying: original)).state.chain
        let link = try #require(chain.first { $0.blockCount > 1 })
        let listing = try #require(frames.first { $0.offset == link.offset })
        let newestIndex = try #require(frames.first { $0.offset == chain[0].offset })
        func problems(_ bytes: [UInt8]) -> [String] {
            let report = Validator.validate(file: MappedFile(copying: bytes), path: "x", deep: true)
            return report.problems.filter { $0.severity == .error }.map(\.description)
        }
        func attendAll(_ bytes: [UInt8]) -> Bool {
            guard let r = try? KVPackReader(file: MappedFile(copying: bytes)) else { return false }
            for l in 0 ..< r.geometry.layerCount {
                if (try? r.attend(layer: l, kvHead: 0, queries: [Float](repeating: 1, count: 8))) == nil { return false }
            }
            return true
        }
        // Block entry 1 names the frame entry 0 names (two entries, one frame).
        var twice = original
        Self.reseal(&twice, frame: listing, salt: Self.salt, payload: { p in
            let first = p[16 ..< 24]
            p.replaceSubrange(32 ..< 40, with: first)
        })
        #expect(!problems(twice).isEmpty)
        #expect(!attendAll(twice), "a block read through the wrong entry must not decode as if it were right")
        // A block entry pointing into another block's payload (64-aligned, so on the frame grid).
        let big = try #require(blocks.first { $0.storedLength >= 64 } ?? blocks.first)
        var inside = original
        Self.reseal(&inside, frame: listing, salt: Self.salt, payload: { Self.put(big.payloadOffset, at: 16, in: &$0) })
        // Version 2 index entries name segment tables.
        #expect(problems(inside).contains { $0.contains(major == 1 ? "BLCK" : "SEGT") }, "\(problems(inside))")
        // The tail pointer naming an index frame instead of a DLTA frame.
        var wrongKind = original
        Self.reseal(&wrongKind, frame: newestIndex, salt: Self.salt, header: { h in h.fields.1 = listing.offset < newestIndex.offset ? listing.offset : 64 })
        let e = Self.damage(wrongKind)
        #expect(e != nil)
        // The newest index made incremental and pointing at itself (a cycle): that commit is
        // refused, not followed forever; the reader falls back to an older commit.
        var cycle = original
        Self.reseal(&cycle, frame: newestIndex, salt: Self.salt, header: { h in
            h.fields.0 = newestIndex.offset
            h.fields.2 &= 0x0000_0000_FFFF_FFFF  // flags (offset 52) = 0: not FULL
        })
        let reader = try? KVPackReader(file: MappedFile(copying: cycle))
        #expect(reader == nil || reader!.commitOffset < newestIndex.offset, "the cyclic chain's commit must not load")
        #expect(reader?.recoveryNotes.contains { if case .skippedCommit = $0 { true } else { false } } ?? true)
    }

    @Test("unknown critical frames are errors; unknown ancillary frames are skipped", arguments: [UInt16(1), 2])
    func unknownFrames(major: UInt16) throws {
        let (original, _) = try Self.smallFile(major: major)
        let frames = try Self.frames(original)
        let index = frames.last { $0.tag == .index }!
        let commit = frames.last { $0.tag == .commit }!

        /// A new incremental index listing one extension entry, and a commit for it.
        func withExtension(_ tag: FrameTag, frameTag: FrameTag) -> [UInt8] {
            var b = original
            let ext = Self.appendFrame(&b, tag: frameTag, payload: Array("future".utf8), salt: Self.salt)
            var payload = indexPrelude(blocks: 0, blobs: 0, tokens: 0, extensions: 1)
            var w = ByteWriter()
            w.write(ext)
            w.write(tag.rawValue)
            w.write(UInt32(0))
            payload += w.bytes
            var f = FrameHeader.FieldPacker()
            f.set(32, index.offset)
            f.set(40, index.field64(40))
            // The new frame lists nothing: it starts at token 11 (version 1) or segment 2 (version 2).
            f.set(48, UInt32(major == 1 ? 11 : 2))
            let newIndex = Self.appendFrame(&b, tag: .index, fields: f, payload: payload, salt: Self.salt)
            var c = FrameHeader.FieldPacker()
            c.set(32, newIndex)
            c.set(40, UInt32(11))
            c.set(48, commit.field64(48) + 1)
            Self.appendFrame(&b, tag: .commit, fields: c, salt: Self.salt)
            return b
        }

        let critical = withExtension(FrameTag("ZZZZ"), frameTag: FrameTag("ZZZZ"))
        let r = try KVPackReader(file: MappedFile(copying: critical))
        // The newest commit names a critical frame this reader does not know: it is skipped and
        // the previous commit is used, and validate reports the error.
        #expect(r.recoveryNotes.contains { if case let .skippedCommit(_, reason) = $0 { reason.code == .unknownCriticalFrame } else { false } })
        let report = Validator.validate(file: r.file, path: "critical")
        #expect(!report.isValid)
        #expect(report.problems.contains { $0.code == "unknownCriticalFrame" })

        let ancillary = withExtension(FrameTag("zzzz"), frameTag: FrameTag("zzzz"))
        let a = try KVPackReader(file: MappedFile(copying: ancillary))
        #expect(a.recoveryNotes.isEmpty)
        #expect(a.tokenCount == 11)
        #expect(Validator.validate(file: a.file, path: "ancillary", deep: true).problems.isEmpty)
    }

    @Test("flipping any bit of a small file is reported or harmless, never silently wrong")
    func everyBitFlip() throws {
        let (original, _) = try Self.smallFile()
        let truth = try Self.content(MappedFile(copying: original))!
        var reported = 0, harmless = 0
        var bytes = original
        for i in 0 ..< original.count * 8 {
            bytes[i / 8] ^= UInt8(1 << (i % 8))
            defer { bytes[i / 8] ^= UInt8(1 << (i % 8)) }
            let file = MappedFile(copying: bytes)
            let report = Validator.validate(file: file, path: "flip", deep: true)
            if !report.problems.isEmpty {
                reported += 1
                continue
            }
            // Unreported: the flip must be in bytes no checksum covers (frame padding) and the
            // content must be exactly the original.
            let content = try Self.content(file)
            #expect(content == truth, "bit \(i) changed the content without a report")
            harmless += 1
        }
        #expect(reported > harmless)
    }

    /// Token ids, positions and every decoded value, or nil when the file does not open.
    static func content(_ file: MappedFile) throws -> [[UInt32]]? {
        guard let r = try? KVPackReader(file: file) else { return nil }
        var out = [try r.tokenIDs, try r.positions]
        for l in 0 ..< r.geometry.layerCount {
            for kind in KVKind.allCases {
                guard let v = try? r.decode(layer: l, kvHead: 0, kind: kind) else { return nil }
                out.append(v.map(\.bitPattern))
            }
        }
        return out
    }
}
