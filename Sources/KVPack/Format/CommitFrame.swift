/// A commit (`CMIT`, Spec 11): the frame that makes everything before it that it references
/// visible. No payload.
///
/// | header offset | field        | type | rule                                            |
/// |---------------|--------------|------|-------------------------------------------------|
/// | 32            | indexOffset  | u64  | the newest index frame, after the manifest      |
/// | 40            | tokenCount   | u32  | tokens in the committed state                   |
/// | 44            | reserved     | 4    |                                                 |
/// | 48            | commitSerial | u64  | 0 for the first commit, then +1 per commit      |
struct CommitFrame: Equatable {
    var indexOffset: UInt64
    var tokenCount: Int
    var serial: UInt64

    var typeFields: FrameHeader.TypeFields {
        var f = FrameHeader.FieldPacker()
        f.set(32, indexOffset)
        f.set(40, UInt32(tokenCount))
        f.set(48, serial)
        return f.words
    }

    /// The fields of a verified commit header; its index must lie between the manifest's end
    /// and the commit itself.
    static func decode(_ h: FrameHeader, manifestEnd: UInt64) throws -> CommitFrame {
        let at = h.offset
        guard h.storedLength == 0, !h.isCompressed else {
            throw KVPackError.invalid(at + 8, "CMIT.storedLength", "a commit has no payload, this one claims \(h.storedLength) bytes")
        }
        let frame = CommitFrame(indexOffset: h.field64(32), tokenCount: Int(h.field32(40)), serial: h.field64(48))
        guard frame.indexOffset >= manifestEnd, frame.indexOffset < at else {
            throw KVPackError.invalid(at + 32, "CMIT.indexOffset", "\(frame.indexOffset) is not between the manifest end \(manifestEnd) and the commit \(at)")
        }
        return frame
    }
}
