/// A frame's four-letter type. As in PNG, bit 5 of the first byte says whether a reader that
/// does not know the tag may skip the frame: upper case is critical, lower case ancillary.
public struct FrameTag: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    /// The four tag bytes read as a little-endian UInt32 (byte 0 is the first letter).
    public let rawValue: UInt32

    public init(rawValue: UInt32) { self.rawValue = rawValue }

    public init(_ text: StaticString) {
        precondition(text.utf8CodeUnitCount == 4)
        let p = text.utf8Start
        rawValue = UInt32(p[0]) | UInt32(p[1]) << 8 | UInt32(p[2]) << 16 | UInt32(p[3]) << 24
    }

    public var isCritical: Bool { rawValue & 0x20 == 0 }

    public var bytes: [UInt8] { (0 ..< 4).map { UInt8(truncatingIfNeeded: rawValue >> (8 * $0)) } }

    public var description: String {
        let b = bytes
        if b.allSatisfy({ $0 >= 0x20 && $0 < 0x7F }) { return String(decoding: b, as: UTF8.self) }
        return "0x" + String(rawValue, radix: 16)
    }

    public static let manifest = FrameTag("MANI")
    public static let blob = FrameTag("BLOB")
    public static let block = FrameTag("BLCK")
    public static let delta = FrameTag("DLTA")
    public static let index = FrameTag("INDX")
    public static let commit = FrameTag("CMIT")
    /// A sealed segment's table of block offsets and tokens (version 2).
    public static let segmentTable = FrameTag("SEGT")
    /// The lossless rows of a file's first `sinkTokens` tokens (format 2.3), laid out as a tail run.
    public static let sink = FrameTag("SINK")

    public static let known: [FrameTag] = [.manifest, .blob, .block, .delta, .index, .commit, .segmentTable, .sink, TokenSelection.tag]
}

/// The 64-byte header in front of every frame (Spec/: "Frames").
public struct FrameHeader: Sendable, Equatable {
    public static let size = 64
    public static let compressedFlag: UInt32 = 1

    /// Absolute offset of the frame (of this header) in the file.
    public var offset: UInt64
    public var tag: FrameTag
    public var flags: UInt32
    /// Payload bytes as stored in the file (compressed size when compressed).
    public var storedLength: UInt64
    /// Payload bytes after decompression; equals `storedLength` for uncompressed payloads.
    public var rawLength: UInt64
    public var payloadChecksum: UInt64
    /// Bytes 32..<56, whose meaning depends on the tag, as three little-endian words.
    public var fields: TypeFields
    /// Header bytes 32..<56 as three little-endian words. Each frame kind's file (BlockFrame,
    /// SegmentTable, TailRun, Blob, IndexFrame, CommitFrame, TokenSelection) names its fields and
    /// is the only place their offsets are read or written.
    public typealias TypeFields = (UInt64, UInt64, UInt64)

    public init(offset: UInt64, tag: FrameTag, flags: UInt32 = 0, storedLength: UInt64, rawLength: UInt64,
                payloadChecksum: UInt64, fields: TypeFields = (0, 0, 0)) {
        self.offset = offset
        self.tag = tag
        self.flags = flags
        self.storedLength = storedLength
        self.rawLength = rawLength
        self.payloadChecksum = payloadChecksum
        self.fields = fields
    }

    public static func == (a: FrameHeader, b: FrameHeader) -> Bool {
        a.offset == b.offset && a.tag == b.tag && a.flags == b.flags && a.storedLength == b.storedLength
            && a.rawLength == b.rawLength && a.payloadChecksum == b.payloadChecksum
            && a.fields.0 == b.fields.0 && a.fields.1 == b.fields.1 && a.fields.2 == b.fields.2
    }

    public var isCompressed: Bool { flags & Self.compressedFlag != 0 }
    public var payloadOffset: UInt64 { offset + UInt64(Self.size) }
    /// Where the next frame starts: after the payload, padded to the frame alignment.
    public var nextFrameOffset: UInt64 {
        payloadOffset + roundUp(storedLength, to: UInt64(FileHeader.frameAlignment))
    }

    // Type fields by their byte offset within the header (32..<56): for the frame kinds' files only.
    func field64(_ at: Int) -> UInt64 {
        switch at {
        case 32: fields.0
        case 40: fields.1
        default: fields.2
        }
    }

    func field32(_ at: Int) -> UInt32 { UInt32(truncatingIfNeeded: field64(at & ~7) >> (8 * UInt64(at & 7))) }
    func field16(_ at: Int) -> UInt16 { UInt16(truncatingIfNeeded: field64(at & ~7) >> (8 * UInt64(at & 7))) }
    func field8(_ at: Int) -> UInt8 { UInt8(truncatingIfNeeded: field64(at & ~7) >> (8 * UInt64(at & 7))) }

    /// Packs little-endian sub-fields into the three type-specific words.
    struct FieldPacker {
        private(set) var words: TypeFields = (0, 0, 0)
        mutating func set(_ at: Int, _ value: some FixedWidthInteger) {
            let width = value.bitWidth
            let shift = UInt64(8 * (at & 7))
            let v = UInt64(truncatingIfNeeded: value) & (width == 64 ? ~0 : (UInt64(1) << UInt64(width)) - 1)
            switch at & ~7 {
            case 32: words.0 |= v << shift
            case 40: words.1 |= v << shift
            default: words.2 |= v << shift
            }
        }
    }

    func encoded(salt: UInt64) -> [UInt8] {
        var w = ByteWriter(capacity: Self.size)
        w.write(tag.rawValue)
        w.write(flags)
        w.write(storedLength)
        w.write(rawLength)
        w.write(payloadChecksum)
        w.write(fields.0)
        w.write(fields.1)
        w.write(fields.2)
        let sum = w.bytes.withUnsafeBytes { Checksum.xxh3($0, seed: Self.checksumSeed(salt: salt, offset: offset)) }
        w.write(sum)
        return w.bytes
    }

    static func checksumSeed(salt: UInt64, offset: UInt64) -> UInt64 { salt ^ offset }

    /// Parses and verifies the header at `offset`. `limit` is the end of the bytes the frame
    /// may occupy (the file size, or the offset of the frame that references this one).
    /// `verifyingChecksum: false` is for a frame this reader verified before (committed bytes
    /// never change): its fields are still checked against the bounds, its hash is not redone.
    static func decode(_ file: UnsafeRawBufferPointer, at offset: UInt64, limit: UInt64, salt: UInt64,
                       field: String = "frame", verifyingChecksum: Bool = true) throws -> FrameHeader {
        let align = UInt64(FileHeader.frameAlignment)
        guard offset % align == 0, offset >= UInt64(FileHeader.size) else {
            throw KVPackError.invalid(offset, "\(field).offset",
                                      "frame offsets are multiples of 64 at or after 64, got \(offset)")
        }
        let end = min(limit, UInt64(file.count))
        guard offset < end, end - offset >= UInt64(size) else {
            throw KVPackError.truncated(offset, "\(field).header", need: UInt64(size),
                                        have: offset < end ? end - offset : 0)
        }
        return try decode(header: UnsafeRawBufferPointer(rebasing: file[Int(offset) ..< Int(offset) + size]), at: offset, end: end,
                          salt: salt, field: field, verifyingChecksum: verifyingChecksum)
    }

    /// Parses and verifies the `size` header bytes `h` of the frame at `offset` (a copy, or a
    /// slice of the file), whose payload must end by `end`.
    static func decode(header h: UnsafeRawBufferPointer, at offset: UInt64, end: UInt64, salt: UInt64,
                       field: String, verifyingChecksum: Bool = true) throws -> FrameHeader {
        guard h.count == size, offset <= end, end - offset >= UInt64(size) else {
            throw KVPackError.truncated(offset, "\(field).header", need: UInt64(size), have: UInt64(min(h.count, size)))
        }
        let stored = h.loadLE(56, as: UInt64.self)
        let actual = verifyingChecksum ? Checksum.xxh3(UnsafeRawBufferPointer(rebasing: h[0 ..< 56]),
                                                       seed: checksumSeed(salt: salt, offset: offset)) : stored
        guard Checksum.matches(stored, actual) else {
            throw KVPackError(.checksumMismatch, offset: offset + 56, field: "\(field).headerChecksum",
                              "stored \(hex64(stored)), computed \(hex64(actual)) (frame at \(offset))")
        }
        let header = FrameHeader(
            offset: offset,
            tag: FrameTag(rawValue: h.loadLE(0, as: UInt32.self)),
            flags: h.loadLE(4, as: UInt32.self),
            storedLength: h.loadLE(8, as: UInt64.self),
            rawLength: h.loadLE(16, as: UInt64.self),
            payloadChecksum: h.loadLE(24, as: UInt64.self),
            fields: (h.loadLE(32, as: UInt64.self), h.loadLE(40, as: UInt64.self), h.loadLE(48, as: UInt64.self)))
        guard header.flags & ~compressedFlag == 0 else {
            throw KVPackError.invalid(offset + 4, "\(field).flags",
                                      "unknown flag bits \(hex64(UInt64(header.flags & ~compressedFlag)))")
        }
        let room = end - header.payloadOffset
        guard header.storedLength <= room else {
            throw KVPackError.invalid(offset + 8, "\(field).storedLength",
                                      "payload of \(header.storedLength) bytes runs past \(end) (room for \(room))")
        }
        if !header.isCompressed, header.rawLength != header.storedLength {
            throw KVPackError.invalid(offset + 16, "\(field).rawLength",
                                      "is \(header.rawLength) but the payload is not compressed and stores \(header.storedLength)")
        }
        return header
    }

    /// The stored payload bytes (after `decode` checked they lie within the file).
    func storedPayload(in file: UnsafeRawBufferPointer) -> UnsafeRawBufferPointer {
        let start = Int(payloadOffset)
        return UnsafeRawBufferPointer(rebasing: file[start ..< start + Int(storedLength)])
    }

    func verifyPayload(in file: UnsafeRawBufferPointer, field: String = "frame") throws {
        let actual = Checksum.xxh3(storedPayload(in: file))
        guard Checksum.matches(payloadChecksum, actual) else {
            throw KVPackError(.checksumMismatch, offset: offset + 24, field: "\(field).payloadChecksum",
                              "stored \(hex64(payloadChecksum)), computed \(hex64(actual)) over \(storedLength) payload bytes at \(payloadOffset)")
        }
    }
}
