/// One sealed block as listed by a version 1 index frame; in version 2 the entry names a
/// segment table (`SEGT`) and `stream` is reserved (0).
public struct BlockEntry: Hashable, Sendable {
    public var frameOffset: UInt64
    public var segment: UInt32
    public var stream: UInt32
}

/// One metadata blob as listed by an index frame.
public struct BlobEntry: Hashable, Sendable {
    public var frameOffset: UInt64
    public var blobID: UInt32
}

/// A reference to a frame of another kind (room for later minor versions: a reader follows
/// ancillary ones it knows and ignores the rest; a critical tag it does not know is an error).
public struct ExtensionEntry: Hashable, Sendable {
    public var frameOffset: UInt64
    public var tag: FrameTag
}

/// An `INDX` frame (Spec/: "Index frames"): the blocks (version 1) or segment tables (version 2),
/// blobs and tokens (version 1 only) added since the previous index frame (or since the start of
/// the file, for a FULL one).
struct IndexFrame {
    static let fullFlag: UInt32 = 1
    static let preludeSize = 16
    static let entrySize = 16

    var header: FrameHeader
    var prevIndexOffset: UInt64 { header.field64(32) }
    var tailOffset: UInt64 { header.field64(40) }
    /// Version 1: the first token whose id this frame lists. Version 2: the segment of its first entry.
    var firstToken: UInt32 { header.field32(48) }

    /// The name of header field 48 in error messages, and what it counts.
    static func firstField(major: UInt16) -> (field: String, unit: String) {
        major == 1 ? ("INDX.firstToken", "token") : ("INDX.firstSegment", "segment")
    }
    var flags: UInt32 { header.field32(52) }
    var isFull: Bool { flags & Self.fullFlag != 0 }

    var payload: UnsafeRawBufferPointer
    var blockCount: Int
    var blobCount: Int
    var tokenCount: Int
    var extensionCount: Int

    var blocksStart: Int { Self.preludeSize }
    var blobsStart: Int { blocksStart + blockCount * Self.entrySize }
    var tokenIDsStart: Int { blobsStart + blobCount * Self.entrySize }
    var positionsStart: Int { tokenIDsStart + tokenCount * 4 }
    var extensionsStart: Int { positionsStart + tokenCount * 4 }

    static func payloadSize(blocks: Int, blobs: Int, tokens: Int, extensions: Int) -> UInt64 {
        UInt64(preludeSize) + UInt64(entrySize) * (UInt64(blocks) + UInt64(blobs) + UInt64(extensions)) + 8 * UInt64(tokens)
    }

    /// The frame's type fields: a FULL frame has no predecessor and starts at 0.
    static func typeFields(prevIndexOffset: UInt64, tailOffset: UInt64, first: Int, isFull: Bool) -> FrameHeader.TypeFields {
        var f = FrameHeader.FieldPacker()
        f.set(32, prevIndexOffset)
        f.set(40, tailOffset)
        f.set(48, UInt32(first))
        f.set(52, isFull ? fullFlag : 0)
        return f.words
    }

    /// Reads, verifies (header and payload checksums) and sizes an index frame.
    static func load(_ file: UnsafeRawBufferPointer, at offset: UInt64, limit: UInt64, salt: UInt64, major: UInt16) throws -> IndexFrame {
        let header = try FrameHeader.decode(file, at: offset, limit: limit, salt: salt, field: "INDX")
        guard header.tag == .index else {
            throw KVPackError.invalid(offset, "INDX.tag", "expected an INDX frame, found \(header.tag)")
        }
        guard !header.isCompressed else {
            throw KVPackError.invalid(offset + 4, "INDX.flags", "index frames are never compressed in version 1")
        }
        try header.verifyPayload(in: file, field: "INDX")
        let payload = header.storedPayload(in: file)
        var c = ByteCursor(payload, base: header.payloadOffset, structure: "INDX")
        let blocks = Int(try c.read(UInt32.self, "blockCount"))
        let blobs = Int(try c.read(UInt32.self, "blobCount"))
        let tokens = Int(try c.read(UInt32.self, "tokenCount"))
        let exts = Int(try c.read(UInt32.self, "extensionCount"))
        guard major == 1 || tokens == 0 else {
            throw KVPackError.invalid(header.payloadOffset + 8, "INDX.reserved",
                                      "is \(tokens); version 2 index frames list no tokens (segment tables and tail runs hold them), must be 0")
        }
        let expected = payloadSize(blocks: blocks, blobs: blobs, tokens: tokens, extensions: exts)
        guard expected == header.storedLength else {
            throw KVPackError.invalid(header.payloadOffset, "INDX.blockCount",
                                      "counts (\(blocks) blocks, \(blobs) blobs, \(tokens) tokens, \(exts) extensions) need \(expected) payload bytes, the frame has \(header.storedLength)")
        }
        let frame = IndexFrame(header: header, payload: payload, blockCount: blocks, blobCount: blobs,
                               tokenCount: tokens, extensionCount: exts)
        if frame.flags & ~fullFlag != 0 {
            throw KVPackError.invalid(offset + 52, "INDX.flags", "unknown bits \(hex64(UInt64(frame.flags & ~fullFlag)))")
        }
        if frame.isFull, frame.firstToken != 0 {
            let first = firstField(major: major)
            throw KVPackError.invalid(offset + 48, first.field, "a FULL index starts at \(first.unit) 0, this one says \(frame.firstToken)")
        }
        if frame.isFull, frame.prevIndexOffset != 0 {
            throw KVPackError.invalid(offset + 32, "INDX.prevIndexOffset", "a FULL index has no predecessor, this one names \(frame.prevIndexOffset)")
        }
        return frame
    }

    func block(_ i: Int) -> BlockEntry {
        let at = blocksStart + i * Self.entrySize
        return BlockEntry(frameOffset: payload.loadLE(at, as: UInt64.self),
                          segment: payload.loadLE(at + 8, as: UInt32.self),
                          stream: payload.loadLE(at + 12, as: UInt32.self))
    }

    func blob(_ i: Int) -> BlobEntry {
        let at = blobsStart + i * Self.entrySize
        return BlobEntry(frameOffset: payload.loadLE(at, as: UInt64.self), blobID: payload.loadLE(at + 8, as: UInt32.self))
    }

    func tokenID(_ i: Int) -> UInt32 { payload.loadLE(tokenIDsStart + 4 * i, as: UInt32.self) }
    func position(_ i: Int) -> UInt32 { payload.loadLE(positionsStart + 4 * i, as: UInt32.self) }

    func extensionEntry(_ i: Int) -> ExtensionEntry {
        let at = extensionsStart + i * Self.entrySize
        return ExtensionEntry(frameOffset: payload.loadLE(at, as: UInt64.self),
                              tag: FrameTag(rawValue: payload.loadLE(at + 8, as: UInt32.self)))
    }

    /// File offset of the `i`-th entry of a section, for error messages.
    func entryOffset(sectionStart: Int, _ i: Int, width: Int = entrySize) -> UInt64 {
        header.payloadOffset + UInt64(sectionStart + i * width)
    }

    /// Byte ranges (within the payload) of the five sections, in file order; the writer's
    /// full-index rewrite copies them section by section.
    var sections: [Range<Int>] {
        [blocksStart ..< blobsStart, blobsStart ..< tokenIDsStart, tokenIDsStart ..< positionsStart,
         positionsStart ..< extensionsStart, extensionsStart ..< payload.count]
    }
}

/// An index frame of the commit's chain, as the writer needs it to rewrite a FULL index.
struct IndexChainLink: Sendable {
    var offset: UInt64
    var isFull: Bool
    /// Absolute file byte ranges of the five sections (blocks, blobs, token ids, positions, extensions).
    var sections: [Range<UInt64>]
    var blockCount: Int
    var blobCount: Int
    var tokenCount: Int
    var extensionCount: Int
    var payloadSize: UInt64

    init(offset: UInt64, isFull: Bool, sections: [Range<UInt64>], blockCount: Int, blobCount: Int, tokenCount: Int,
         extensionCount: Int, payloadSize: UInt64) {
        self.offset = offset
        self.isFull = isFull
        self.sections = sections
        self.blockCount = blockCount
        self.blobCount = blobCount
        self.tokenCount = tokenCount
        self.extensionCount = extensionCount
        self.payloadSize = payloadSize
    }

    init(frame f: IndexFrame) {
        self.init(offset: f.header.offset, isFull: f.isFull,
                  sections: f.sections.map { f.header.payloadOffset + UInt64($0.lowerBound) ..< f.header.payloadOffset + UInt64($0.upperBound) },
                  blockCount: f.blockCount, blobCount: f.blobCount, tokenCount: f.tokenCount,
                  extensionCount: f.extensionCount, payloadSize: f.header.storedLength)
    }
}

/// The entries a writer has accumulated for its next index frame.
struct PendingIndex {
    var blocks: [BlockEntry] = []
    var blobs: [BlobEntry] = []
    var tokenIDs: [UInt32] = []
    var positions: [UInt32] = []
    var extensions: [ExtensionEntry] = []

    var isEmpty: Bool { blocks.isEmpty && blobs.isEmpty && tokenIDs.isEmpty && extensions.isEmpty }
    var entryCount: Int { blocks.count + blobs.count + tokenIDs.count + extensions.count }

    var payloadSize: UInt64 {
        IndexFrame.payloadSize(blocks: blocks.count, blobs: blobs.count, tokens: tokenIDs.count, extensions: extensions.count)
    }

    /// The five sections as bytes, in the order of `IndexFrame.sections`.
    func sectionBytes() -> [[UInt8]] {
        var b = ByteWriter(capacity: blocks.count * 16)
        for e in blocks {
            b.write(e.frameOffset)
            b.write(e.segment)
            b.write(e.stream)
        }
        var l = ByteWriter(capacity: blobs.count * 16)
        for e in blobs {
            l.write(e.frameOffset)
            l.write(e.blobID)
            l.write(UInt32(0))
        }
        var t = ByteWriter(capacity: tokenIDs.count * 4)
        for id in tokenIDs { t.write(id) }
        var p = ByteWriter(capacity: positions.count * 4)
        for pos in positions { p.write(pos) }
        var x = ByteWriter(capacity: extensions.count * 16)
        for e in extensions {
            x.write(e.frameOffset)
            x.write(e.tag.rawValue)
            x.write(UInt32(0))
        }
        return [b.bytes, l.bytes, t.bytes, p.bytes, x.bytes]
    }

    mutating func removeAll() {
        blocks.removeAll(keepingCapacity: true)
        blobs.removeAll(keepingCapacity: true)
        tokenIDs.removeAll(keepingCapacity: true)
        positions.removeAll(keepingCapacity: true)
        extensions.removeAll(keepingCapacity: true)
    }
}

/// Prelude bytes of an index payload.
func indexPrelude(blocks: Int, blobs: Int, tokens: Int, extensions: Int) -> [UInt8] {
    var w = ByteWriter(capacity: IndexFrame.preludeSize)
    w.write(UInt32(blocks))
    w.write(UInt32(blobs))
    w.write(UInt32(tokens))
    w.write(UInt32(extensions))
    return w.bytes
}
