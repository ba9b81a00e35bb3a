import CKVPackABI
import KVPack

// How errors cross the C boundary: every entry point runs its body through `withStatus`, which
// turns whatever is thrown into a kvpack_status and fills the caller's kvpack_error. Nothing
// below may trap on caller or file input: arguments are checked here (ABIError) before any
// library call that assumes them.

/// A problem with the arguments of a C call, found before the library is asked.
struct ABIError: Error {
    var status: kvpack_status
    var message: String
    init(_ message: String) {
        self.init(KVPACK_E_INVALID_ARGUMENT, message)
    }
    init(_ status: kvpack_status, _ message: String) {
        self.status = status
        self.message = message
    }
}

extension KVPackError.Code {
    var status: kvpack_status {
        switch self {
        case .truncated: KVPACK_E_TRUNCATED
        case .badMagic: KVPACK_E_BAD_MAGIC
        case .unsupportedVersion: KVPACK_E_UNSUPPORTED_VERSION
        case .checksumMismatch: KVPACK_E_CHECKSUM_MISMATCH
        case .invalidField: KVPACK_E_INVALID_FIELD
        case .unknownCriticalFrame: KVPACK_E_UNKNOWN_CRITICAL_FRAME
        case .unknownScheme: KVPACK_E_UNKNOWN_SCHEME
        case .corruptPayload: KVPACK_E_CORRUPT_PAYLOAD
        case .noValidCommit: KVPACK_E_NO_VALID_COMMIT
        case .io: KVPACK_E_IO
        case .invalidArgument: KVPACK_E_INVALID_ARGUMENT
        case .locked: KVPACK_E_LOCKED
        case .needsCalibration: KVPACK_E_NEEDS_CALIBRATION
        }
    }
}

/// Runs `body`; returns KVPACK_OK or the status of what it threw, and fills `err` either way.
func withStatus(_ err: UnsafeMutablePointer<kvpack_error>?, _ body: () throws -> Void) -> Int32 {
    do {
        try body()
        report(err, status: KVPACK_OK, offset: nil, field: nil, message: "")
        return Int32(KVPACK_OK.rawValue)
    } catch let e as KVPackError {
        return report(err, status: e.code.status, offset: e.offset, field: e.field, message: e.description)
    } catch let e as ABIError {
        return report(err, status: e.status, offset: nil, field: nil, message: e.message)
    } catch {
        return report(err, status: KVPACK_E_INTERNAL, offset: nil, field: nil, message: "\(error)")
    }
}

@discardableResult
private func report(_ err: UnsafeMutablePointer<kvpack_error>?, status: kvpack_status, offset: UInt64?, field: String?,
                    message: String) -> Int32 {
    let code = Int32(status.rawValue)
    guard let err else { return code }
    err.pointee.code = code
    err.pointee.has_offset = offset == nil ? 0 : 1
    err.pointee.offset = offset ?? 0
    withUnsafeMutableBytes(of: &err.pointee.field) { copyCString(field ?? "", into: $0) }
    withUnsafeMutableBytes(of: &err.pointee.message) { copyCString(message, into: $0) }
    return code
}

/// Copies `text` NUL-terminated into `buffer`, cut at a UTF-8 character boundary if it is longer.
func copyCString(_ text: String, into buffer: UnsafeMutableRawBufferPointer) {
    guard buffer.count > 0 else { return }
    let utf8 = Array(text.utf8)
    var n = min(utf8.count, buffer.count - 1)
    // Step back over continuation bytes (10xxxxxx) so a character is never split.
    if n < utf8.count { while n > 0 && utf8[n] & 0xC0 == 0x80 { n -= 1 } }
    buffer.copyBytes(from: utf8[0 ..< n])
    buffer[n] = 0
}

/// Writes `text` for a (buffer, capacity, length) triple: *length = its byte count; the text and a
/// NUL when capacity allows, else KVPACK_E_BUFFER_TOO_SMALL. With `optional` (a report the caller
/// may decline), a NULL buffer asks for the length alone.
func deliver(_ text: String, buffer: UnsafeMutablePointer<CChar>?, capacity: Int, length: UnsafeMutablePointer<Int>?,
             optional: Bool = false) throws {
    let utf8 = Array(text.utf8)
    length?.pointee = utf8.count
    if optional, buffer == nil { return }
    guard let buffer, capacity > utf8.count else {
        throw ABIError(KVPACK_E_BUFFER_TOO_SMALL, "the text needs \(utf8.count + 1) bytes, the buffer holds \(capacity)")
    }
    let raw = UnsafeMutableRawBufferPointer(start: buffer, count: capacity)
    raw.copyBytes(from: utf8)
    raw[utf8.count] = 0
}

/// A C string argument that must be there.
func string(_ pointer: UnsafePointer<CChar>?, _ name: String) throws -> String {
    guard let pointer else { throw ABIError("\(name) is NULL") }
    return String(cString: pointer)
}

/// A count the caller passed, as an Int (the library's indices), refusing what cannot be one.
func count(_ value: UInt64, _ name: String) throws -> Int {
    guard let n = Int(exactly: value) else { throw ABIError("\(name) \(value) is too large") }
    return n
}

/// A KV kind argument.
func kind(_ value: UInt32) throws -> KVKind {
    switch Int(value) {
    case KVPACK_KEYS: .key
    case KVPACK_VALUES: .value
    default: throw ABIError("kind \(value) is neither KVPACK_KEYS (0) nor KVPACK_VALUES (1)")
    }
}
