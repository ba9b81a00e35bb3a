/// A tail run (`DLTA`, Spec 9): committed rows of every stream that do not fill a segment yet,
/// unencoded, in each stream's residual type.
///
/// | header offset | field           | type | rule                                               |
/// |---------------|-----------------|------|----------------------------------------------------|
/// | 32            | tokenStart      | u32  | first token of the run                             |
/// | 36            | tokenCount      | u32  | >= 1                                               |
/// | 40            | prevDeltaOffset | u64  | the segment's previous run, 0 at its first         |
/// | 48            | streamCount     | u32  | layerCount * kvHeadCount * 2                       |
/// | 52            | reserved        | 4    |                                                    |
///
/// Payload (never compressed): in version 2 a token section (u32 ids, then u32 positions, padded
/// to 64 bytes), then one section per stream, token-major rows padded to 64 bytes.
struct TailRun: Sendable {
    var frameOffset: UInt64
    var tokenStart: Int
    var tokenCount: Int
    /// The run before it in the same segment's tail (0 at the segment's first).
    var prevDeltaOffset: UInt64
    /// Absolute file offset of each stream's rows.
    var streamOffsets: [Int]
    /// Version 2: absolute file offset of the run's token ids (its positions follow them).
    var tokenSection: Int?

    /// Where a run of `tokenCount` rows puts things, relative to its payload.
    struct Layout {
        /// Bytes of the token section (0 in version 1).
        var tokenBytes: Int
        /// Payload offset of each stream's section.
        var streamOffsets: [Int]
        /// Bytes of each stream's rows, before padding.
        var sectionBytes: [Int]
        var payloadSize: Int

        init(manifest: Manifest, major: UInt16, tokenCount count: Int) {
            let align = FileHeader.frameAlignment
            tokenBytes = major == 1 ? 0 : roundUp(8 * count, to: align)
            let streams = manifest.geometry.streamCount
            var offsets: [Int] = [], sizes: [Int] = []
            offsets.reserveCapacity(streams)
            sizes.reserveCapacity(streams)
            var at = tokenBytes
            for s in 0 ..< streams {
                let n = TailRun.sectionBytes(manifest: manifest, stream: s, tokens: count)
                offsets.append(at)
                sizes.append(n)
                at += roundUp(n, to: align)
            }
            streamOffsets = offsets
            sectionBytes = sizes
            payloadSize = at
        }
    }

    /// Bytes of one stream's rows in a run of `tokens`, before padding.
    static func sectionBytes(manifest: Manifest, stream: Int, tokens: Int) -> Int {
        tokens * manifest.geometry.headDim * manifest.schemes[manifest.scheme(forStream: stream)].residualType.byteWidth
    }

    // MARK: Encode

    static func typeFields(tokenStart: Int, tokenCount: Int, prevDeltaOffset: UInt64, streamCount: Int) -> FrameHeader.TypeFields {
        var f = FrameHeader.FieldPacker()
        f.set(32, UInt32(tokenStart))
        f.set(36, UInt32(tokenCount))
        f.set(40, prevDeltaOffset)
        f.set(48, UInt32(streamCount))
        return f.words
    }

    /// Writes the version 2 token section (ids, then positions) at the start of `payload`.
    static func writeTokenSection(into payload: UnsafeMutableRawPointer, ids: ArraySlice<UInt32>, positions: ArraySlice<UInt32>) {
        let count = ids.count
        for (i, id) in ids.enumerated() { (payload + 4 * i).storeBytes(of: id.littleEndian, as: UInt32.self) }
        for (i, p) in positions.enumerated() { (payload + 4 * (count + i)).storeBytes(of: p.littleEndian, as: UInt32.self) }
    }

    // MARK: Decode

    /// Reads and checks the run at `h` (header verified, ending before `limit`) that must end at
    /// token `end` and start at or after `sealed`: counts, stream count, and the payload size the
    /// manifest implies, then the payload checksum.
    /// A `SINK` frame (the file's sink rows, Spec 6.3) has the same layout: `tag` says which is expected.
    static func decode(_ h: FrameHeader, in file: UnsafeRawBufferPointer, manifest: Manifest, major: UInt16,
                       end: Int, sealed: Int, committed: Int, tag: FrameTag = .delta) throws -> TailRun {
        let offset = h.offset
        let streamCount = manifest.geometry.streamCount
        let name = tag.description
        guard h.tag == tag else { throw KVPackError.invalid(offset, "\(name).tag", "expected a \(name) frame, found \(h.tag)") }
        guard !h.isCompressed else { throw KVPackError.invalid(offset + 4, "\(name).flags", "tail rows are never compressed") }
        let start = Int(h.field32(32))
        let count = Int(h.field32(36))
        let streams = Int(h.field32(48))
        guard count >= 1, start + count == end, start >= sealed else {
            throw KVPackError.invalid(offset + 32, "\(name).tokenStart",
                                      "covers \(start)..<\(start + count); the tail needs a run ending at \(end) within \(sealed)..<\(committed)")
        }
        guard streams == streamCount else {
            throw KVPackError.invalid(offset + 48, "\(name).streamCount", "is \(streams), the manifest has \(streamCount) streams")
        }
        // Every section pads to at least 64 bytes: check the claim before allocating per stream.
        guard h.storedLength / UInt64(FileHeader.frameAlignment) >= UInt64(streamCount) else {
            throw KVPackError.invalid(offset + 8, "\(name).storedLength",
                                      "\(h.storedLength) bytes cannot hold sections for \(streamCount) streams")
        }
        let layout = Layout(manifest: manifest, major: major, tokenCount: count)
        guard UInt64(layout.payloadSize) == h.storedLength else {
            throw KVPackError.invalid(offset + 8, "\(name).storedLength",
                                      "is \(h.storedLength); \(count) rows of \(streamCount) streams need \(layout.payloadSize)")
        }
        try h.verifyPayload(in: file, field: name)
        let base = Int(h.payloadOffset)
        return TailRun(frameOffset: offset, tokenStart: start, tokenCount: count, prevDeltaOffset: h.field64(40),
                       streamOffsets: layout.streamOffsets.map { base + $0 }, tokenSection: major == 1 ? nil : base)
    }
}
