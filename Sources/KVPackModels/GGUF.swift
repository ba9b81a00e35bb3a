import KVPack

/// A GGUF file (llama.cpp's model format, versions 2 and 3), mapped read-only: its metadata
/// key/value pairs and tensor directory, every count, length and offset checked against the file
/// before use. A model file is untrusted input like a .kvpack file.
///
/// Layout (little-endian): magic "GGUF", u32 version, u64 tensor count, u64 key/value count;
/// the key/value pairs (string key, u32 type, value); the tensor infos (string name, u32 n_dims,
/// u64 dims[n_dims] innermost first, u32 type, u64 offset from the data section); padding to
/// `general.alignment` (default 32); the data section.
public struct GGUFFile: @unchecked Sendable {
    // @unchecked: tensor pointers address `file`, an immutable mapping this value keeps alive.
    public enum Value: Sendable, Equatable {
        case int(Int64)
        case uint(UInt64)
        case float(Double)
        case bool(Bool)
        case string(String)
        case array([Value])

        public var asInt: Int? {
            switch self {
            case .int(let v): return Int(exactly: v)
            case .uint(let v): return Int(exactly: v)
            default: return nil
            }
        }
        public var asDouble: Double? {
            switch self {
            case .float(let v): return v
            case .int(let v): return Double(v)
            case .uint(let v): return Double(v)
            default: return nil
            }
        }
        public var asString: String? { if case .string(let s) = self { return s } else { return nil } }
        public var asArray: [Value]? { if case .array(let a) = self { return a } else { return nil } }
    }

    /// Tensor element encodings this project computes with (ggml type ids).
    public enum TensorType: UInt32, Sendable {
        case f32 = 0, f16 = 1, q4_0 = 2, q4_1 = 3, q8_0 = 8

        /// (elements per block, bytes per block)
        var block: (elements: Int, bytes: Int) {
            switch self {
            case .f32: return (1, 4)
            case .f16: return (1, 2)
            case .q4_0: return (32, 18)
            case .q4_1: return (32, 20)
            case .q8_0: return (32, 34)
            }
        }
    }

    public struct Tensor: Sendable {
        public var name: String
        /// Innermost (contiguous) dimension first, as GGUF stores them.
        public var dims: [Int]
        /// nil: a ggml type this project does not compute with (named in `typeID`).
        public var type: TensorType?
        public var typeID: UInt32
        /// Absolute file offset of the first byte, and the byte count.
        public var offset: Int
        public var byteCount: Int
        public var elementCount: Int { dims.reduce(1, *) }
    }

    public let path: String
    public let file: MappedFile
    public let version: UInt32
    public let metadata: [String: Value]
    /// In file order.
    public let tensors: [Tensor]
    public let alignment: Int

    /// Bounds for what a header may claim before anything is allocated for it.
    static let maxDims = 4
    static let maxArrayDepth = 2
    static let maxStringBytes = 1 << 20

    public init(path: String) throws {
        let file = try ModelError.map(path)
        try self.init(file: file, path: path)
    }

    public init(file: MappedFile, path: String) throws {
        self.path = path
        self.file = file
        var cursor = Cursor(bytes: file.bytes, path: path)
        let magic = try cursor.u32("magic")
        guard magic == 0x4655_4747 else { throw ModelError(path, "offset 0: not a GGUF file (magic 0x\(String(magic, radix: 16)), expected \"GGUF\")") }
        version = try cursor.u32("version")
        guard version == 2 || version == 3 else {
            throw ModelError(path, "offset 4: GGUF version \(version) is not supported (2 and 3 are)")
        }
        let tensorCount = try cursor.count("tensor_count", minimumBytesEach: 24)
        let kvCount = try cursor.count("metadata_kv_count", minimumBytesEach: 12)
        var metadata: [String: Value] = [:]
        for _ in 0 ..< kvCount {
            let at = cursor.offset
            let key = try cursor.string("metadata key")
            let type = try cursor.u32("type of \(key)")
            let value = try cursor.value(type: type, depth: 0, field: key)
            guard metadata.updateValue(value, forKey: key) == nil else { throw ModelError(path, "offset \(at): metadata key \(key) appears twice") }
        }
        self.metadata = metadata
        var alignment = 32
        if let a = metadata["general.alignment"] {
            guard let v = a.asInt, v > 0, v <= 1 << 16, v & (v - 1) == 0 else {
                throw ModelError(path, "general.alignment \(a) is not a power of two up to 65536")
            }
            alignment = v
        }
        self.alignment = alignment
        var infos: [(name: String, dims: [Int], typeID: UInt32, relative: UInt64, at: Int)] = []
        infos.reserveCapacity(tensorCount)
        for _ in 0 ..< tensorCount {
            let at = cursor.offset
            let name = try cursor.string("tensor name")
            let n = try cursor.u32("n_dims of \(name)")
            guard (1 ... UInt32(Self.maxDims)).contains(n) else { throw ModelError(path, "offset \(at): tensor \(name) has \(n) dimensions (1...\(Self.maxDims) allowed)") }
            var dims: [Int] = []
            for i in 0 ..< Int(n) {
                let d = try cursor.u64("dim \(i) of \(name)")
                guard d >= 1, d <= UInt64(file.bytes.count) * 2 else { throw ModelError(path, "offset \(at): tensor \(name) dimension \(i) is \(d)") }
                dims.append(Int(d))
            }
            let typeID = try cursor.u32("type of \(name)")
            let relative = try cursor.u64("offset of \(name)")
            infos.append((name, dims, typeID, relative, at))
        }
        let dataStart = (cursor.offset + alignment - 1) / alignment * alignment
        var tensors: [Tensor] = []
        var names = Set<String>()
        for info in infos {
            guard names.insert(info.name).inserted else { throw ModelError(path, "offset \(info.at): tensor \(info.name) appears twice") }
            var count = 1
            for d in info.dims {
                let (p, overflow) = count.multipliedReportingOverflow(by: d)
                guard !overflow, p <= file.bytes.count * 2 else { throw ModelError(path, "offset \(info.at): tensor \(info.name) dimensions \(info.dims) are larger than the file") }
                count = p
            }
            let type = TensorType(rawValue: info.typeID)
            var byteCount = 0
            if let type {
                let (elements, bytes) = type.block
                guard info.dims[0] % elements == 0 else {
                    throw ModelError(path, "offset \(info.at): tensor \(info.name) rows of \(info.dims[0]) are not whole \(type) blocks of \(elements)")
                }
                byteCount = count / elements * bytes
            }
            guard info.relative % UInt64(alignment) == 0, info.relative <= UInt64(file.bytes.count),
                  dataStart + Int(info.relative) + byteCount <= file.bytes.count else {
                throw ModelError(path, "offset \(info.at): tensor \(info.name) data at \(info.relative) + \(byteCount) bytes lies outside the file (data section starts at \(dataStart), file is \(file.bytes.count) bytes) or is not \(alignment)-aligned")
            }
            tensors.append(Tensor(name: info.name, dims: info.dims, type: type, typeID: info.typeID,
                                  offset: dataStart + Int(info.relative), byteCount: byteCount))
        }
        self.tensors = tensors
    }

    public func tensor(_ name: String) -> Tensor? { tensors.first { $0.name == name } }

    /// A bounds-checked reader over the header region.
    struct Cursor {
        let bytes: UnsafeRawBufferPointer
        let path: String
        var offset = 0

        func need(_ n: Int, _ field: String) throws {
            guard n >= 0, n <= bytes.count - offset else {
                throw ModelError(path, "offset \(offset): \(field) needs \(n) bytes, the file has \(bytes.count - offset) left")
            }
        }
        mutating func load<T: FixedWidthInteger>(_ type: T.Type, _ field: String) throws -> T {
            try need(MemoryLayout<T>.size, field)
            let v = T(littleEndian: bytes.loadUnaligned(fromByteOffset: offset, as: T.self))
            offset += MemoryLayout<T>.size
            return v
        }
        mutating func u32(_ field: String) throws -> UInt32 { try load(UInt32.self, field) }
        mutating func u64(_ field: String) throws -> UInt64 { try load(UInt64.self, field) }

        /// A count of items that each take at least `minimumBytesEach` bytes: it cannot exceed
        /// what the rest of the file could hold, so nothing is sized from a lie.
        mutating func count(_ field: String, minimumBytesEach: Int) throws -> Int {
            let at = offset
            let n = try u64(field)
            guard n <= UInt64((bytes.count - offset) / max(minimumBytesEach, 1)) else {
                throw ModelError(path, "offset \(at): \(field) = \(n) cannot fit in the \(bytes.count - offset) bytes that follow")
            }
            return Int(n)
        }

        mutating func string(_ field: String) throws -> String {
            let at = offset
            let n = try u64("length of \(field)")
            guard n <= UInt64(GGUFFile.maxStringBytes) else { throw ModelError(path, "offset \(at): \(field) claims \(n) bytes (limit \(GGUFFile.maxStringBytes))") }
            try need(Int(n), field)
            let s = String(decoding: UnsafeRawBufferPointer(rebasing: bytes[offset ..< offset + Int(n)]), as: UTF8.self)
            offset += Int(n)
            return s
        }

        mutating func value(type: UInt32, depth: Int, field: String) throws -> Value {
            switch type {
            case 0: return .uint(UInt64(try load(UInt8.self, field)))
            case 1: return .int(Int64(try load(Int8.self, field)))
            case 2: return .uint(UInt64(try load(UInt16.self, field)))
            case 3: return .int(Int64(try load(Int16.self, field)))
            case 4: return .uint(UInt64(try load(UInt32.self, field)))
            case 5: return .int(Int64(try load(Int32.self, field)))
            case 6: return .float(Double(Float(bitPattern: try u32(field))))
            case 7:
                let b = try load(UInt8.self, field)
                guard b <= 1 else { throw ModelError(path, "offset \(offset - 1): \(field) is a bool of value \(b)") }
                return .bool(b == 1)
            case 8: return .string(try string(field))
            case 9:
                let at = offset
                guard depth < GGUFFile.maxArrayDepth else { throw ModelError(path, "offset \(at): \(field) nests arrays deeper than \(GGUFFile.maxArrayDepth)") }
                let itemType = try u32("item type of \(field)")
                let minimum: Int
                switch itemType {
                case 0, 1, 7: minimum = 1
                case 2, 3: minimum = 2
                case 4, 5, 6: minimum = 4
                case 10, 11, 12, 8: minimum = 8
                case 9: minimum = 12
                default: throw ModelError(path, "offset \(at + 4): \(field) has item type \(itemType), which GGUF does not define")
                }
                let n = try count("item count of \(field)", minimumBytesEach: minimum)
                var items: [Value] = []
                items.reserveCapacity(n)
                for _ in 0 ..< n { items.append(try value(type: itemType, depth: depth + 1, field: field)) }
                return .array(items)
            case 10: return .uint(try u64(field))
            case 11: return .int(Int64(bitPattern: try u64(field)))
            case 12: return .float(Double(bitPattern: try u64(field)))
            default: throw ModelError(path, "offset \(offset - 4): \(field) has value type \(type), which GGUF does not define")
            }
        }
    }
}
