import Foundation
import KVPack

/// NumPy's .npy format (versions 1.0, 2.0, 3.0; https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html):
/// magic `\x93NUMPY`, version bytes, a little-endian header length (u16 in 1.0, u32 after), a
/// Python dict literal with 'descr', 'fortran_order' and 'shape', padded so the data is
/// 64-byte aligned, then the data. Files are untrusted input: the header is parsed strictly and
/// the data size checked against the file before anything is read.
public struct NpyArray: Sendable {
    public enum DType: String, Sendable {
        case float16 = "<f2"
        case float32 = "<f4"
        case float64 = "<f8"
        case int32 = "<i4"
        case uint32 = "<u4"
        case int64 = "<i8"
        case uint8 = "|u1"

        public var byteWidth: Int {
            switch self {
            case .float16: 2
            case .float32, .int32, .uint32: 4
            case .float64, .int64: 8
            case .uint8: 1
            }
        }
    }

    public var dtype: DType
    public var shape: [Int]
    /// Element data, C order, little-endian.
    public var data: [UInt8]

    public var count: Int { shape.reduce(1, *) }

    public init(dtype: DType, shape: [Int], data: [UInt8]) {
        self.dtype = dtype
        self.shape = shape
        self.data = data
    }

    public init(floats: [Float], shape: [Int]) {
        self.init(dtype: .float32, shape: shape, data: floats.withUnsafeBytes { Array($0) })
    }

    public init(path: String) throws {
        guard let contents = FileManager.default.contents(atPath: path) else { throw NpyError("\(path): cannot be read") }
        try self.init(bytes: [UInt8](contents), name: path)
    }

    public init(bytes: [UInt8], name: String = "npy") throws {
        let magic: [UInt8] = [0x93, 0x4E, 0x55, 0x4D, 0x50, 0x59]
        guard bytes.count >= 10, Array(bytes[0 ..< 6]) == magic else { throw NpyError("\(name): not a .npy file (bad magic)") }
        let major = bytes[6]
        let headerLength: Int
        let headerStart: Int
        switch major {
        case 1:
            headerLength = Int(bytes[8]) | Int(bytes[9]) << 8
            headerStart = 10
        case 2, 3:
            guard bytes.count >= 12 else { throw NpyError("\(name): truncated header") }
            headerLength = Int(bytes[8]) | Int(bytes[9]) << 8 | Int(bytes[10]) << 16 | Int(bytes[11]) << 24
            headerStart = 12
        default:
            throw NpyError("\(name): .npy version \(major).\(bytes[7]) is not supported (1.0, 2.0, 3.0 are)")
        }
        guard headerLength <= bytes.count - headerStart else { throw NpyError("\(name): header of \(headerLength) bytes runs past the file") }
        guard let header = String(bytes: bytes[headerStart ..< headerStart + headerLength], encoding: major == 3 ? .utf8 : .isoLatin1) else {
            throw NpyError("\(name): header is not text")
        }
        let dict = try Self.parseHeader(header, name: name)
        guard let descr = dict["descr"], let dtype = DType(rawValue: descr) else {
            throw NpyError("\(name): dtype \(dict["descr"] ?? "?") is not supported (\([DType.float16, .float32, .float64, .int32, .uint32, .int64, .uint8].map(\.rawValue).joined(separator: ", ")))")
        }
        guard dict["fortran_order"] == "False" else { throw NpyError("\(name): Fortran-order arrays are not supported") }
        guard let shapeText = dict["shape"] else { throw NpyError("\(name): header has no shape") }
        let shape = try shapeText.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }.map { part -> Int in
            guard let n = Int(part), n >= 0 else { throw NpyError("\(name): bad shape \(shapeText)") }
            return n
        }
        let start = headerStart + headerLength
        var count = 1
        for n in shape {
            let (p, overflow) = count.multipliedReportingOverflow(by: n)
            guard !overflow, p <= bytes.count else { throw NpyError("\(name): shape \(shape) is larger than the file") }
            count = p
        }
        guard count * dtype.byteWidth == bytes.count - start else {
            throw NpyError("\(name): shape \(shape) of \(descr) needs \(count * dtype.byteWidth) data bytes, the file has \(bytes.count - start)")
        }
        self.init(dtype: dtype, shape: shape, data: Array(bytes[start...]))
    }

    /// The dict literal: {'descr': '<f2', 'fortran_order': False, 'shape': (3, 613, 64), }
    static func parseHeader(_ text: String, name: String) throws -> [String: String] {
        var s = Substring(text.trimmingCharacters(in: .whitespacesAndNewlines))
        guard s.hasPrefix("{"), s.hasSuffix("}") else { throw NpyError("\(name): header is not a dict literal") }
        s = s.dropFirst().dropLast()
        var out: [String: String] = [:]
        while true {
            s = s.drop { $0 == " " || $0 == "," }
            if s.isEmpty { break }
            guard s.first == "'" || s.first == "\"" else { throw NpyError("\(name): header key not quoted near \(s.prefix(20))") }
            let quote = s.first!
            s = s.dropFirst()
            guard let endKey = s.firstIndex(of: quote) else { throw NpyError("\(name): unterminated key") }
            let key = String(s[..<endKey])
            s = s[s.index(after: endKey)...].drop { $0 == " " }
            guard s.first == ":" else { throw NpyError("\(name): missing ':' after '\(key)'") }
            s = s.dropFirst().drop { $0 == " " }
            let value: String
            if s.first == "'" || s.first == "\"" {
                let q = s.first!
                s = s.dropFirst()
                guard let e = s.firstIndex(of: q) else { throw NpyError("\(name): unterminated value of '\(key)'") }
                value = String(s[..<e])
                s = s[s.index(after: e)...]
            } else if s.first == "(" {
                guard let e = s.firstIndex(of: ")") else { throw NpyError("\(name): unterminated tuple of '\(key)'") }
                value = String(s[s.index(after: s.startIndex) ..< e])
                s = s[s.index(after: e)...]
            } else {
                let e = s.firstIndex(of: ",") ?? s.endIndex
                value = s[..<e].trimmingCharacters(in: .whitespaces)
                s = s[e...]
            }
            out[key] = value
        }
        return out
    }

    /// The elements as Float (f16, f32, f64 and integer types convert).
    public func floats() -> [Float] {
        data.withUnsafeBytes { raw -> [Float] in
            (0 ..< count).map { i in
                switch dtype {
                case .float16: Float(Float16(bitPattern: raw.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)))
                case .float32: raw.loadUnaligned(fromByteOffset: 4 * i, as: Float.self)
                case .float64: Float(raw.loadUnaligned(fromByteOffset: 8 * i, as: Double.self))
                case .int32: Float(raw.loadUnaligned(fromByteOffset: 4 * i, as: Int32.self))
                case .uint32: Float(raw.loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self))
                case .int64: Float(raw.loadUnaligned(fromByteOffset: 8 * i, as: Int64.self))
                case .uint8: Float(raw[i])
                }
            }
        }
    }

    /// Version 1.0 bytes (2.0 when the header needs more than 65535 bytes), data 64-byte aligned.
    public func encoded() -> [UInt8] { Self.header(dtype: dtype, shape: shape) + data }

    /// The magic, version and header of an array; its data follows.
    public static func header(dtype: DType, shape: [Int]) -> [UInt8] {
        let shapeText = shape.count == 1 ? "(\(shape[0]),)" : "(" + shape.map(String.init).joined(separator: ", ") + ")"
        var header = "{'descr': '\(dtype.rawValue)', 'fortran_order': False, 'shape': \(shapeText), }"
        let big = header.utf8.count + 12 > 65535
        let prefix = big ? 12 : 10
        let total = (prefix + header.utf8.count + 1 + 63) / 64 * 64
        header += String(repeating: " ", count: total - prefix - header.utf8.count - 1) + "\n"
        var out: [UInt8] = [0x93, 0x4E, 0x55, 0x4D, 0x50, 0x59, big ? 2 : 1, 0]
        let n = header.utf8.count
        out += big ? [UInt8(n & 0xFF), UInt8(n >> 8 & 0xFF), UInt8(n >> 16 & 0xFF), UInt8(n >> 24)] : [UInt8(n & 0xFF), UInt8(n >> 8)]
        return out + Array(header.utf8)
    }
}

public struct NpyError: Error, CustomStringConvertible {
    public var description: String
    init(_ d: String) { description = d }
}
