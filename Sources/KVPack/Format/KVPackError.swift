/// Every failure the library reports. A reader error names the absolute file offset and the
/// field that is wrong, so a user (or a second implementation) can find the bad byte.
public struct KVPackError: Error, CustomStringConvertible, Sendable, Equatable {
    public enum Code: String, Sendable, Codable {
        /// The file ends before a structure that must be there.
        case truncated
        /// The first 8 bytes are not the KVPack signature.
        case badMagic
        /// Major version this reader does not implement.
        case unsupportedVersion
        /// A stored XXH3-64 checksum does not match the bytes.
        case checksumMismatch
        /// A field holds a value that breaks an invariant of Spec/.
        case invalidField
        /// A frame with a critical tag this reader does not know.
        case unknownCriticalFrame
        /// A scheme kind this reader does not implement.
        case unknownScheme
        /// Payload bytes that do not decode (bad zstd frame, wrong size).
        case corruptPayload
        /// No commit in the file could be loaded.
        case noValidCommit
        /// An operating-system call failed.
        case io
        /// The caller passed something unusable (not a file problem).
        case invalidArgument
        /// Another writer holds the file.
        case locked
        /// A scheme spec asks a planner that needs statistics of a calibration cache.
        case needsCalibration
    }

    public var code: Code
    /// The file the error is about, when the code that found it knew (a reader opening a path).
    public var path: String?
    /// Absolute byte offset in the file of the structure (or field) that is wrong.
    public var offset: UInt64?
    /// Field name as Spec/ spells it, e.g. `BLCK.segment` or `manifest.headDim`.
    public var field: String?
    public var message: String

    public init(_ code: Code, offset: UInt64? = nil, field: String? = nil, _ message: String) {
        self.code = code
        self.offset = offset
        self.field = field
        self.message = message
    }

    public var description: String {
        var s = path.map { "\($0): " } ?? ""
        s += "\(code.rawValue)"
        if let field { s += " \(field)" }
        if let offset { s += " at offset \(offset) (0x\(String(offset, radix: 16)))" }
        return s + ": " + message
    }

    /// This error, naming `path` as its file unless it already names one.
    public func about(_ path: String?) -> KVPackError {
        var e = self
        if e.path == nil { e.path = path }
        return e
    }

    /// Puts the field under `parent` (`int.bits` becomes `manifest.schemes[2].int.bits`; no field
    /// becomes `parent`), for errors a part reports about itself.
    mutating func nest(under parent: String) {
        field = field.map { "\(parent).\($0)" } ?? parent
    }

    // Shorthands used throughout the parsers.
    static func truncated(_ offset: UInt64, _ field: String, need: UInt64, have: UInt64) -> KVPackError {
        KVPackError(.truncated, offset: offset, field: field,
                    "needs \(need) bytes, only \(have) available")
    }

    static func invalid(_ offset: UInt64?, _ field: String, _ message: String) -> KVPackError {
        KVPackError(.invalidField, offset: offset, field: field, message)
    }

    public static func argument(_ message: String) -> KVPackError {
        KVPackError(.invalidArgument, message)
    }
}
