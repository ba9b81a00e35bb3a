#if _endian(big)
#error("KVPack stores little-endian data and its kernels read payloads in place; big-endian hosts are not supported.")
#endif

/// Little-endian loads from raw memory. Callers bound-check first (see `ByteCursor`).
extension UnsafeRawBufferPointer {
    @inline(__always)
    func loadLE<T: FixedWidthInteger>(_ offset: Int, as type: T.Type) -> T {
        T(littleEndian: loadUnaligned(fromByteOffset: offset, as: T.self))
    }
}

/// A bounds-checked reader over untrusted bytes. Every read names the field it is reading and
/// reports the absolute file offset when the bytes run out.
struct ByteCursor {
    let bytes: UnsafeRawBufferPointer
    /// File offset of `bytes[0]`, for error messages.
    let base: UInt64
    /// Structure name used as a prefix of field names, e.g. "manifest".
    let structure: String
    private(set) var position: Int = 0

    init(_ bytes: UnsafeRawBufferPointer, base: UInt64, structure: String) {
        self.bytes = bytes
        self.base = base
        self.structure = structure
    }

    var remaining: Int { bytes.count - position }
    var absolutePosition: UInt64 { base + UInt64(position) }

    func fieldName(_ field: String) -> String { "\(structure).\(field)" }

    mutating func need(_ count: Int, _ field: String) throws {
        guard count >= 0, count <= remaining else {
            throw KVPackError.truncated(absolutePosition, fieldName(field),
                                        need: UInt64(max(count, 0)), have: UInt64(remaining))
        }
    }

    mutating func read<T: FixedWidthInteger>(_ type: T.Type, _ field: String) throws -> T {
        try need(MemoryLayout<T>.size, field)
        let v = bytes.loadLE(position, as: T.self)
        position += MemoryLayout<T>.size
        return v
    }

    mutating func readFloat64(_ field: String) throws -> Double {
        Double(bitPattern: try read(UInt64.self, field))
    }

    mutating func readBytes(_ count: Int, _ field: String) throws -> UnsafeRawBufferPointer {
        try need(count, field)
        let slice = UnsafeRawBufferPointer(rebasing: bytes[position ..< position + count])
        position += count
        return slice
    }

    mutating func readUTF8(_ count: Int, _ field: String) throws -> String {
        let at = absolutePosition
        let raw = try readBytes(count, field)
        guard let s = String(validating: raw, as: UTF8.self) else {
            throw KVPackError.invalid(at, fieldName(field), "is not valid UTF-8")
        }
        return s
    }

    func invalid(_ field: String, at position: UInt64? = nil, _ message: String) -> KVPackError {
        KVPackError.invalid(position ?? absolutePosition, fieldName(field), message)
    }
}

/// Little-endian serialisation into a growable byte array (writer side; trusted input).
struct ByteWriter {
    var bytes: [UInt8] = []

    init(capacity: Int = 0) { bytes.reserveCapacity(capacity) }

    mutating func write<T: FixedWidthInteger>(_ value: T) {
        withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) }
    }

    mutating func write(_ value: Double) { write(value.bitPattern) }

    mutating func write(bytes other: some Sequence<UInt8>) { bytes.append(contentsOf: other) }

    mutating func write(zeros count: Int) { bytes.append(contentsOf: repeatElement(0, count: count)) }

    var count: Int { bytes.count }
}

@inline(__always)
func roundUp(_ value: Int, to alignment: Int) -> Int {
    (value + alignment - 1) & ~(alignment - 1)
}

@inline(__always)
func roundUp(_ value: UInt64, to alignment: UInt64) -> UInt64 {
    (value &+ alignment &- 1) & ~(alignment &- 1)
}
