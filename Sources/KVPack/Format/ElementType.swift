/// Element types of blobs and residual (tail) rows (Spec/: "Element types"). Zero is not a
/// type, so a zero-filled field is caught.
public enum ElementType: UInt8, Sendable, CaseIterable, Codable, CustomStringConvertible {
    case float32 = 1
    case float16 = 2
    case bfloat16 = 3
    case uint8 = 4
    case int8 = 5
    case uint16 = 6
    case int16 = 7
    case uint32 = 8
    case int32 = 9

    public var byteWidth: Int {
        switch self {
        case .float32, .uint32, .int32: 4
        case .float16, .bfloat16, .uint16, .int16: 2
        case .uint8, .int8: 1
        }
    }

    /// Types a stream's tail rows may use (they are attended with the raw kernels).
    public var isFloatingPoint: Bool { self == .float32 || self == .float16 || self == .bfloat16 }

    public var description: String {
        switch self {
        case .float32: "f32"
        case .float16: "f16"
        case .bfloat16: "bf16"
        case .uint8: "u8"
        case .int8: "i8"
        case .uint16: "u16"
        case .int16: "i16"
        case .uint32: "u32"
        case .int32: "i32"
        }
    }

    public init?(name: String) {
        guard let t = Self.allCases.first(where: { $0.description == name }) else { return nil }
        self = t
    }
}
