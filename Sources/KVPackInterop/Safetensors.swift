import Foundation
import KVPack

/// The safetensors format (https://github.com/huggingface/safetensors): an 8-byte little-endian
/// header length N, N bytes of JSON mapping tensor names to {dtype, shape, data_offsets} (and an
/// optional "__metadata__" of strings), then the tensor data, offsets relative to its start.
/// Parsed by hand; the file is untrusted input: every offset and size is checked before use.
public struct SafetensorsFile {
    public enum DType: String, Sendable {
        case f64 = "F64", f32 = "F32", f16 = "F16", bf16 = "BF16"
        case i64 = "I64", i32 = "I32", i16 = "I16", i8 = "I8", u8 = "U8", bool = "BOOL"
        /// mlx's packed quantized codes.
        case u32 = "U32"

        public var byteWidth: Int {
            switch self {
            case .f64, .i64: 8
            case .f32, .i32, .u32: 4
            case .f16, .bf16, .i16: 2
            case .i8, .u8, .bool: 1
            }
        }
    }

    public struct Tensor: Sendable {
        public var name: String
        public var dtype: DType
        public var shape: [Int]
        /// Absolute byte range in the file.
        public var range: Range<Int>
        public var count: Int { shape.reduce(1, *) }
    }

    public let path: String
    public let file: MappedFile
    public let tensors: [String: Tensor]
    public let metadata: [String: String]

    public init(path: String) throws {
        try self.init(file: MappedFile(path: path), path: path)
    }

    /// Parses the bytes of `file`; errors name `path`.
    public init(file: MappedFile, path: String) throws {
        self.path = path
        self.file = file
        let bytes = file.bytes
        guard bytes.count >= 8 else { throw SafetensorsError("\(path): \(bytes.count) bytes is too short for safetensors") }
        let n = bytes.loadUnaligned(fromByteOffset: 0, as: UInt64.self).littleEndian
        guard n >= 2, n <= UInt64(bytes.count - 8), n <= 100_000_000 else {
            throw SafetensorsError("\(path): header length \(n) does not fit the file of \(bytes.count) bytes")
        }
        let dataStart = 8 + Int(n)
        let json: Any
        do {
            json = try JSONSerialization.jsonObject(with: Data(bytes[8 ..< dataStart]))
        } catch {
            throw SafetensorsError("\(path): the header is not JSON (\(error.localizedDescription))")
        }
        guard let header = json as? [String: Any] else { throw SafetensorsError("\(path): the header is not a JSON object") }
        var tensors: [String: Tensor] = [:]
        var metadata: [String: String] = [:]
        for (name, value) in header {
            if name == "__metadata__" {
                guard let m = value as? [String: Any] else { throw SafetensorsError("\(path): __metadata__ is not an object") }
                for (k, v) in m {
                    guard let s = v as? String else { throw SafetensorsError("\(path): __metadata__[\(k)] is not a string") }
                    metadata[k] = s
                }
                continue
            }
            guard let info = value as? [String: Any], let dtypeName = info["dtype"] as? String,
                  let shapeValues = info["shape"] as? [Any], let offsetValues = info["data_offsets"] as? [Any], offsetValues.count == 2 else {
                throw SafetensorsError("\(path): tensor \(name) lacks dtype, shape or data_offsets")
            }
            guard let dtype = DType(rawValue: dtypeName) else { throw SafetensorsError("\(path): tensor \(name) has unknown dtype \(dtypeName)") }
            let shape = try shapeValues.map { v -> Int in
                guard let i = (v as? NSNumber)?.intValue, i >= 0 else { throw SafetensorsError("\(path): tensor \(name) has a bad shape") }
                return i
            }
            guard let begin = (offsetValues[0] as? NSNumber)?.intValue, let end = (offsetValues[1] as? NSNumber)?.intValue,
                  begin >= 0, begin <= end, end <= bytes.count - dataStart else {
                throw SafetensorsError("\(path): tensor \(name) has data_offsets outside the data")
            }
            var count = 1
            for d in shape {
                let (p, overflow) = count.multipliedReportingOverflow(by: d)
                guard !overflow, p <= end - begin else { throw SafetensorsError("\(path): tensor \(name)'s shape \(shape) exceeds its data") }
                count = p
            }
            guard count * dtype.byteWidth == end - begin else {
                throw SafetensorsError("\(path): tensor \(name): shape \(shape) of \(dtypeName) needs \(count * dtype.byteWidth) bytes, data_offsets give \(end - begin)")
            }
            tensors[name] = Tensor(name: name, dtype: dtype, shape: shape, range: dataStart + begin ..< dataStart + end)
        }
        self.tensors = tensors
        self.metadata = metadata
    }

    /// Elements [from, from + count) of a tensor (C order) as floats.
    public func floats(_ tensor: Tensor, from: Int = 0, count: Int? = nil) -> [Float] {
        let n = count ?? tensor.count - from
        precondition(from >= 0 && n >= 0 && from + n <= tensor.count)
        let base = UnsafeRawBufferPointer(rebasing: file.bytes[tensor.range])
        let w = tensor.dtype.byteWidth
        return (from ..< from + n).map { i in
            switch tensor.dtype {
            case .f32: base.loadUnaligned(fromByteOffset: 4 * i, as: Float.self)
            case .f16: Float(Float16(bitPattern: base.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)))
            case .bf16: Float(bitPattern: UInt32(base.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)) << 16)
            case .f64: Float(base.loadUnaligned(fromByteOffset: 8 * i, as: Double.self))
            case .i64: Float(base.loadUnaligned(fromByteOffset: 8 * i, as: Int64.self))
            case .i32: Float(base.loadUnaligned(fromByteOffset: 4 * i, as: Int32.self))
            case .u32: Float(base.loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self))
            case .i16: Float(base.loadUnaligned(fromByteOffset: 2 * i, as: Int16.self))
            case .i8: Float(base.loadUnaligned(fromByteOffset: i * w, as: Int8.self))
            case .u8, .bool: Float(base[i])
            }
        }
    }

    /// Integer elements (token ids, positions) of a tensor: integer types exactly, float types
    /// truncated toward zero (NaN as 0, out of range clamped: the file is untrusted).
    public func integers(_ tensor: Tensor) -> [Int] {
        let base = UnsafeRawBufferPointer(rebasing: file.bytes[tensor.range])
        switch tensor.dtype {
        case .i64: return (0 ..< tensor.count).map { Int(base.loadUnaligned(fromByteOffset: 8 * $0, as: Int64.self)) }
        case .i32: return (0 ..< tensor.count).map { Int(base.loadUnaligned(fromByteOffset: 4 * $0, as: Int32.self)) }
        case .u32: return (0 ..< tensor.count).map { Int(base.loadUnaligned(fromByteOffset: 4 * $0, as: UInt32.self)) }
        case .i16: return (0 ..< tensor.count).map { Int(base.loadUnaligned(fromByteOffset: 2 * $0, as: Int16.self)) }
        case .i8: return (0 ..< tensor.count).map { Int(base.loadUnaligned(fromByteOffset: $0, as: Int8.self)) }
        case .u8, .bool: return (0 ..< tensor.count).map { Int(base[$0]) }
        case .f64, .f32, .f16, .bf16:
            return floats(tensor).map { x in
                guard x.isFinite else { return x.isNaN ? 0 : (x > 0 ? Int.max : Int.min) }
                return x >= 0x1p62 ? 1 << 62 : x <= -0x1p62 ? -(1 << 62) : Int(x)
            }
        }
    }
}

/// Writes a safetensors file tensor by tensor: the header (with every offset) first, then each
/// tensor's bytes as `bytes(i)` produces them, so a large export never holds more than one tensor.
public enum SafetensorsWriter {
    public struct Entry {
        public var name: String
        public var dtype: SafetensorsFile.DType
        public var shape: [Int]
        public init(name: String, dtype: SafetensorsFile.DType, shape: [Int]) {
            self.name = name
            self.dtype = dtype
            self.shape = shape
        }
        var byteCount: Int { shape.reduce(1, *) * dtype.byteWidth }
    }

    public static func write(path: String, entries: [Entry], metadata: [String: String], bytes: (Int) throws -> [UInt8]) throws {
        var header: [String: Any] = [:]
        if !metadata.isEmpty { header["__metadata__"] = metadata }
        var offset = 0
        for e in entries {
            header[e.name] = ["dtype": e.dtype.rawValue, "shape": e.shape, "data_offsets": [offset, offset + e.byteCount]] as [String: Any]
            offset += e.byteCount
        }
        var json = try JSONSerialization.data(withJSONObject: header, options: [.sortedKeys])
        // The data starts 8-aligned, as the reference library writes it.
        json.append(contentsOf: repeatElement(UInt8(ascii: " "), count: (8 - json.count % 8) % 8))
        // Written beside the destination and renamed over it when complete (as every file KVPack writes).
        try AtomicReplacement.write(to: path, overwrite: true, label: "writing") { temp in
            guard FileManager.default.createFile(atPath: temp, contents: nil), let handle = FileHandle(forWritingAtPath: temp) else {
                throw SafetensorsError("\(path): cannot create \(temp)")
            }
            defer { try? handle.close() }
            var length = UInt64(json.count).littleEndian
            handle.write(Data(bytes: &length, count: 8))
            handle.write(json)
            for (i, e) in entries.enumerated() {
                let b = try bytes(i)
                guard b.count == e.byteCount else { throw SafetensorsError("\(path): tensor \(e.name) produced \(b.count) bytes, expected \(e.byteCount)") }
                handle.write(Data(b))
            }
            try handle.synchronize()
        }
    }
}

public struct SafetensorsError: Error, CustomStringConvertible {
    public var description: String
    init(_ d: String) { description = d }
}
