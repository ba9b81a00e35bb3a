import CKVPackABI
import FoundationEssentials
import KVPack

// kvpack_convert and kvpack_validate: whole-file operations, as the CLI's convert and validate.

/// `value` as the CLI's --json prints it (sorted keys, indented).
func json<T: Encodable>(_ value: T) throws -> String {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
    return String(decoding: try encoder.encode(value), as: UTF8.self)
}

@_cdecl("kvpack_convert")
public func kvpack_convert(_ input: UnsafePointer<CChar>?, _ output: UnsafePointer<CChar>?, _ scheme: UnsafePointer<CChar>?,
                           _ ropeLayout: Int32, _ overwrite: UInt32, _ report: UnsafeMutablePointer<CChar>?, _ capacity: Int,
                           _ length: UnsafeMutablePointer<Int>?, _ err: UnsafeMutablePointer<kvpack_error>?) -> Int32 {
    withStatus(err) {
        let inPath = try string(input, "input"), outPath = try string(output, "output")
        var options = Converter.Options()
        switch Int(ropeLayout) {
        case -1: break
        case KVPACK_ROPE_INTERLEAVED: options.ropeLayout = .interleaved
        case KVPACK_ROPE_ROTATE_HALF: options.ropeLayout = .rotateHalf
        default: throw ABIError("rope_layout \(ropeLayout) is neither -1 (keep) nor KVPACK_ROPE_INTERLEAVED (1) or _ROTATE_HALF (2)")
        }
        let source = try KVPackReader(path: inPath)
        let text = scheme.map { String(cString: $0) }
        // No scheme: every layer keeps its own (the spec then only fixes the layer count).
        let spec = try SchemeSpec.parse(text ?? "raw:f32", geometry: source.geometry) { try CacheStatistics(reader: source, tokens: 1024) }
        options.overwrite = overwrite != 0
        options.tool = "libkvpack"
        let result = try Converter.convert(input: inPath, output: outPath, spec: spec, layers: text == nil ? [] : nil, options: options)
        // The conversion is done and durable; a report that does not fit is the caller's to ask again.
        if report != nil || length != nil { try deliver(try json(result), buffer: report, capacity: capacity, length: length, optional: true) }
    }
}

@_cdecl("kvpack_model_fingerprint")
public func kvpack_model_fingerprint(_ path: UnsafePointer<CChar>?, _ out: UnsafeMutablePointer<UInt8>?,
                                     _ err: UnsafeMutablePointer<kvpack_error>?) -> Int32 {
    withStatus(err) {
        let p = try string(path, "model_path")
        guard let out else { throw ABIError("fingerprint is NULL") }
        let file = try MappedFile(path: p)
        let print = Checksum.xxh3_128(file.bytes)
        file.releasePages(0 ..< file.bytes.count)
        out.update(from: print, count: 16)
    }
}

@_cdecl("kvpack_validate")
public func kvpack_validate(_ path: UnsafePointer<CChar>?, _ deep: UInt32, _ valid: UnsafeMutablePointer<UInt32>?,
                            _ report: UnsafeMutablePointer<CChar>?, _ capacity: Int, _ length: UnsafeMutablePointer<Int>?,
                            _ err: UnsafeMutablePointer<kvpack_error>?) -> Int32 {
    withStatus(err) {
        let p = try string(path, "path")
        let result = Validator.validate(file: try MappedFile(path: p), path: p, deep: deep != 0)
        valid?.pointee = result.isValid ? 1 : 0
        if report != nil || length != nil { try deliver(try json(result), buffer: report, capacity: capacity, length: length, optional: true) }
    }
}
