/// A sealed block (`BLCK`, Spec 8): one stream's rows of one full segment, in the stream's
/// scheme. The payload is the scheme's business (Spec 7.2); this file owns the header.
///
/// | header offset | field       | type | rule                                              |
/// |---------------|-------------|------|---------------------------------------------------|
/// | 32            | stream      | u32  | the stream the index or segment table names       |
/// | 36            | segment     | u32  | likewise                                          |
/// | 40            | tokenCount  | u32  | segmentTokens                                     |
/// | 44            | schemeIndex | u16  | the scheme the manifest assigns to the stream     |
/// | 46            | reserved    | 10   |                                                   |
struct BlockFrame: Equatable {
    var stream: UInt32
    var segment: UInt32
    var tokenCount: UInt32
    var schemeIndex: UInt16

    init(stream: Int, segment: Int, tokenCount: Int, schemeIndex: Int) {
        self.stream = UInt32(stream)
        self.segment = UInt32(segment)
        self.tokenCount = UInt32(tokenCount)
        self.schemeIndex = UInt16(schemeIndex)
    }

    /// The frame's type fields (header offsets 32..<56).
    var typeFields: FrameHeader.TypeFields {
        var f = FrameHeader.FieldPacker()
        f.set(32, stream)
        f.set(36, segment)
        f.set(40, tokenCount)
        f.set(44, schemeIndex)
        return f.words
    }

    /// What the reader expects of the block that the index (or a segment table) lists for
    /// (`stream`, `segment`): the manifest's scheme index, the scheme's block size for
    /// `tokenCount` rows, and whether its scheme compresses blocks.
    struct Expectation {
        var stream: Int
        var segment: Int
        var tokenCount: Int
        var schemeIndex: Int
        var rawLength: Int
        var compressed: Bool
    }

    /// Checks a verified header against what the index and manifest say the block must be.
    static func check(_ h: FrameHeader, _ want: Expectation) throws {
        let offset = h.offset
        guard h.tag == .block else { throw KVPackError.invalid(offset, "BLCK.tag", "expected a BLCK frame, found \(h.tag)") }
        guard h.field32(32) == UInt32(want.stream), h.field32(36) == UInt32(want.segment) else {
            throw KVPackError.invalid(offset + 32, "BLCK.stream",
                                      "frame holds stream \(h.field32(32)) segment \(h.field32(36)); the index lists it as stream \(want.stream) segment \(want.segment)")
        }
        guard Int(h.field32(40)) == want.tokenCount else {
            throw KVPackError.invalid(offset + 40, "BLCK.tokenCount", "is \(h.field32(40)), sealed blocks hold segmentTokens = \(want.tokenCount)")
        }
        guard Int(h.field16(44)) == want.schemeIndex else {
            throw KVPackError.invalid(offset + 44, "BLCK.schemeIndex", "is \(h.field16(44)), the manifest assigns scheme \(want.schemeIndex) to this stream")
        }
        guard h.rawLength == UInt64(want.rawLength) else {
            throw KVPackError.invalid(offset + 16, "BLCK.rawLength", "is \(h.rawLength), \(want.tokenCount) tokens of this scheme take \(want.rawLength) bytes")
        }
        guard h.isCompressed == want.compressed else {
            throw KVPackError.invalid(offset + 4, "BLCK.flags",
                                      h.isCompressed ? "block is compressed but its scheme stores uncompressed blocks" : "block is uncompressed but its scheme compresses blocks")
        }
    }
}
