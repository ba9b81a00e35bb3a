/// A metadata blob (`BLOB`, Spec 7.3): a small typed array (codebook, projection, signs, means,
/// signatures) that scheme descriptors reference by id. Copied out of the file when a reader
/// opens it.
///
/// | header offset | field       | type   |
/// |---------------|-------------|--------|
/// | 32            | blobID      | u32    |
/// | 36            | kind        | u16    |
/// | 38            | elementType | u8     |
/// | 39            | rank        | u8     |
/// | 40            | shape       | u32[4] |
///
/// Payload: the elements, row-major, little-endian, never compressed.
public struct Blob: Sendable, Equatable {
    public enum Kind: UInt16, Sendable, Codable {
        case codebook = 1
        case projection = 2
        case signs = 3
        case means = 4
        case signatures = 5
        case other = 0xFFFF
    }

    public var id: UInt32
    public var kind: Kind
    public var elementType: ElementType
    /// Up to four dimensions, each >= 1.
    public var shape: [Int]
    public var bytes: [UInt8]

    public init(id: UInt32, kind: Kind, elementType: ElementType, shape: [Int], bytes: [UInt8]) {
        self.id = id
        self.kind = kind
        self.elementType = elementType
        self.shape = shape
        self.bytes = bytes
    }

    public var elementCount: Int { shape.reduce(1, *) }

    // MARK: Encode

    /// Checks a blob a caller supplies before it is written: the rules a reader applies.
    func validateForWriting() throws {
        guard (1 ... 4).contains(shape.count), shape.allSatisfy({ $0 >= 1 && $0 <= Int(UInt32.max) }),
              elementCount * elementType.byteWidth == bytes.count else {
            throw KVPackError.argument("blob \(id): shape \(shape) of \(elementType) does not match its \(bytes.count) bytes")
        }
    }

    /// The frame's type fields (header offsets 32..<56).
    var typeFields: FrameHeader.TypeFields {
        var f = FrameHeader.FieldPacker()
        f.set(32, id)
        f.set(36, kind.rawValue)
        f.set(38, elementType.rawValue)
        f.set(39, UInt8(shape.count))
        for (i, dim) in shape.enumerated() { f.set(40 + 4 * i, UInt32(dim)) }
        return f.words
    }

    // MARK: Decode

    /// Reads and checks the `BLOB` frame at `offset`, which must end before `limit` (the frame
    /// that references it): header and payload checksums, kind, type, rank, shape against the
    /// payload size.
    static func decode(_ file: UnsafeRawBufferPointer, at offset: UInt64, limit: UInt64, salt: UInt64) throws -> Blob {
        let h = try FrameHeader.decode(file, at: offset, limit: limit, salt: salt, field: "BLOB")
        guard h.tag == .blob else { throw KVPackError.invalid(offset, "BLOB.tag", "expected a BLOB frame, found \(h.tag)") }
        guard !h.isCompressed else { throw KVPackError.invalid(offset + 4, "BLOB.flags", "blobs are never compressed in version 1") }
        try h.verifyPayload(in: file, field: "BLOB")
        let kindRaw = h.field16(36)
        guard let kind = Kind(rawValue: kindRaw) else {
            throw KVPackError.invalid(offset + 36, "BLOB.kind", "is \(kindRaw), not a defined blob kind")
        }
        let typeRaw = h.field8(38)
        guard let type = ElementType(rawValue: typeRaw) else {
            throw KVPackError.invalid(offset + 38, "BLOB.elementType", "is \(typeRaw), not a defined element type")
        }
        let rank = Int(h.field8(39))
        guard (1 ... 4).contains(rank) else { throw KVPackError.invalid(offset + 39, "BLOB.rank", "is \(rank), must be 1...4") }
        var shape: [Int] = []
        var elements: UInt64 = 1
        for i in 0 ..< 4 {
            let dim = UInt64(h.field32(40 + 4 * i))
            if i < rank {
                guard dim >= 1 else { throw KVPackError.invalid(offset + UInt64(40 + 4 * i), "BLOB.shape[\(i)]", "is 0") }
                elements = elements.multipliedReportingOverflow(by: dim).partialValue
                guard elements <= h.storedLength else {
                    throw KVPackError.invalid(offset + UInt64(40 + 4 * i), "BLOB.shape", "describes more elements than the payload holds")
                }
                shape.append(Int(dim))
            } else if dim != 0 {
                throw KVPackError.invalid(offset + UInt64(40 + 4 * i), "BLOB.shape[\(i)]", "is \(dim) beyond rank \(rank); must be 0")
            }
        }
        guard elements * UInt64(type.byteWidth) == h.storedLength else {
            throw KVPackError.invalid(offset + 8, "BLOB.storedLength",
                                      "is \(h.storedLength), shape \(shape) of \(type) needs \(elements * UInt64(type.byteWidth))")
        }
        return Blob(id: h.field32(32), kind: kind, elementType: type, shape: shape, bytes: Array(h.storedPayload(in: file)))
    }
}
