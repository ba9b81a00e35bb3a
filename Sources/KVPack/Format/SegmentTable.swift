/// A sealed segment's table (`SEGT`, Spec 8.1, version 2): where each stream's block is, and the
/// ids and positions of the segment's tokens. Written after the segment's blocks; index frames
/// list tables, not blocks, and a reader verifies a table the first time it needs the segment.
///
/// | header offset | field       | type | rule                                 |
/// |---------------|-------------|------|--------------------------------------|
/// | 32            | segment     | u32  | the segment the index entry names    |
/// | 36            | streamCount | u32  | layerCount * kvHeadCount * 2         |
/// | 40            | tokenCount  | u32  | segmentTokens (C)                    |
/// | 44            | reserved    | 12   |                                      |
///
/// Payload (`8 * streamCount + 8 * C` bytes, never compressed): u64 blockOffset[streamCount],
/// u32 tokenID[C], u32 position[C].
struct SegmentTable {
    /// The table's payload; its checksum is verified by the caller before use.
    let payload: UnsafeRawBufferPointer
    /// Where the table's frame starts (its blocks lie before it).
    let frameOffset: UInt64
    let streamCount: Int
    let tokenCount: Int

    var tokenIDsStart: Int { 8 * streamCount }
    var positionsStart: Int { 8 * streamCount + 4 * tokenCount }

    func tokenID(_ i: Int) -> UInt32 { payload.loadLE(tokenIDsStart + 4 * i, as: UInt32.self) }
    func position(_ i: Int) -> UInt32 { payload.loadLE(positionsStart + 4 * i, as: UInt32.self) }

    /// Where `stream`'s block starts, checked before anything is read there: on the frame grid,
    /// after the manifest, its header ending at or before this table.
    func blockOffset(stream: Int, manifestEnd: UInt64) throws -> UInt64 {
        let offset = payload.loadLE(8 * stream, as: UInt64.self)
        guard offset % UInt64(FileHeader.frameAlignment) == 0, offset >= manifestEnd, offset < frameOffset,
              frameOffset - offset >= UInt64(FrameHeader.size) else {
            throw KVPackError.invalid(frameOffset + UInt64(FrameHeader.size + 8 * stream), "SEGT.blockOffset[\(stream)]",
                                      "\(offset) is not a frame offset between the manifest end \(manifestEnd) and the table at \(frameOffset)")
        }
        return offset
    }

    static func payloadSize(streamCount: Int, tokenCount: Int) -> Int { 8 * streamCount + 8 * tokenCount }

    // MARK: Encode

    static func typeFields(segment: Int, streamCount: Int, tokenCount: Int) -> FrameHeader.TypeFields {
        var f = FrameHeader.FieldPacker()
        f.set(32, UInt32(segment))
        f.set(36, UInt32(streamCount))
        f.set(40, UInt32(tokenCount))
        return f.words
    }

    static func encodePayload(blockOffsets: [UInt64], tokenIDs: ArraySlice<UInt32>, positions: ArraySlice<UInt32>) -> [UInt8] {
        var w = ByteWriter(capacity: 8 * blockOffsets.count + 4 * tokenIDs.count + 4 * positions.count)
        for offset in blockOffsets { w.write(offset) }
        for id in tokenIDs { w.write(id) }
        for position in positions { w.write(position) }
        return w.bytes
    }

    // MARK: Decode

    /// Checks the header (already checksum-verified) of the table the index lists for
    /// `segment`, and its size, before any entry is read. The payload checksum is the caller's
    /// (verified once per reader).
    static func check(_ h: FrameHeader, segment: Int, streamCount streams: Int, tokenCount c: Int) throws {
        let offset = h.offset
        guard h.tag == .segmentTable else { throw KVPackError.invalid(offset, "SEGT.tag", "expected a SEGT frame, found \(h.tag)") }
        guard !h.isCompressed else { throw KVPackError.invalid(offset + 4, "SEGT.flags", "segment tables are never compressed") }
        guard h.field32(32) == UInt32(segment) else {
            throw KVPackError.invalid(offset + 32, "SEGT.segment", "is \(h.field32(32)); the index lists this frame as segment \(segment)")
        }
        guard Int(h.field32(36)) == streams else {
            throw KVPackError.invalid(offset + 36, "SEGT.streamCount", "is \(h.field32(36)), the manifest has \(streams) streams")
        }
        guard Int(h.field32(40)) == c else {
            throw KVPackError.invalid(offset + 40, "SEGT.tokenCount", "is \(h.field32(40)), a sealed segment holds segmentTokens = \(c)")
        }
        let expected = UInt64(payloadSize(streamCount: streams, tokenCount: c))
        guard h.storedLength == expected else {
            throw KVPackError.invalid(offset + 8, "SEGT.storedLength", "is \(h.storedLength); \(streams) block offsets and \(c) tokens take \(expected)")
        }
    }
}
