import KVPack

/// The ggml tensor types a llama.cpp KV cache can hold (numbers from ggml.h), with their block
/// layouts (ggml-common.h), dequantization (ggml-quants.c) and the quantization llama.cpp's x86
/// CPU backend applies when it writes rows into its cache (`from_float` of the CPU type traits),
/// so that an exported state file holds the bytes llama.cpp itself would have written.
public enum GGMLType: Int32, Sendable, CaseIterable, CustomStringConvertible {
    case f32 = 0
    case f16 = 1
    case q4_0 = 2
    case q4_1 = 3
    case q5_0 = 6
    case q5_1 = 7
    case q8_0 = 8
    case iq4_nl = 20
    case bf16 = 30

    public var description: String {
        switch self {
        case .f32: "f32"
        case .f16: "f16"
        case .q4_0: "q4_0"
        case .q4_1: "q4_1"
        case .q5_0: "q5_0"
        case .q5_1: "q5_1"
        case .q8_0: "q8_0"
        case .iq4_nl: "iq4_nl"
        case .bf16: "bf16"
        }
    }

    public init?(name: String) {
        guard let t = Self.allCases.first(where: { $0.description == name.lowercased() }) else { return nil }
        self = t
    }

    /// Elements per block (1 for the float types).
    public var blockElements: Int { isQuantized ? 32 : 1 }

    /// Bytes per block (`ggml_type_size`).
    public var blockBytes: Int {
        switch self {
        case .f32: 4
        case .f16, .bf16: 2
        case .q4_0, .iq4_nl: 18
        case .q4_1: 20
        case .q5_0: 22
        case .q5_1: 24
        case .q8_0: 34
        }
    }

    public var isQuantized: Bool { elementType == nil }

    /// The KVPack element type of a float type (converted by the library's row kernels: f16 and
    /// bf16 round to nearest even, as ggml does), nil for the block-quantized types.
    public var elementType: ElementType? {
        switch self {
        case .f32: .float32
        case .f16: .float16
        case .bf16: .bfloat16
        default: nil
        }
    }

    /// Whether `quantize` can write it (IQ4_NL's quantizer searches scales per block; files of it
    /// are read, not written).
    public var canQuantize: Bool { self != .iq4_nl }

    /// `ggml_row_size`: the bytes of `elements` values, nil when they are not whole blocks.
    public func rowBytes(_ elements: Int) -> Int? {
        guard elements >= 0, elements % blockElements == 0 else { return nil }
        let (bytes, overflow) = (elements / blockElements).multipliedReportingOverflow(by: blockBytes)
        return overflow ? nil : bytes
    }

    static let iq4nlValues: [Float] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]

    // MARK: Dequantize

    /// Widens `count` values (whole blocks) at `src` into `dst`, as ggml's `to_float` does.
    public func dequantize(_ src: UnsafeRawPointer, count n: Int, into dst: UnsafeMutablePointer<Float>) {
        if let type = elementType { return RowKernels.widen(src, from: type, dst, n) }
        func f16(_ at: Int) -> Float { Float(Float16(bitPattern: src.loadUnaligned(fromByteOffset: at, as: UInt16.self))) }
        switch self {
        case .f32, .f16, .bf16:
            preconditionFailure("unreachable: float types are widened above")
        case .q8_0:
            for b in 0 ..< n / 32 {
                let at = b * 34, d = f16(at)
                for j in 0 ..< 32 { dst[32 * b + j] = Float(Int8(bitPattern: src.load(fromByteOffset: at + 2 + j, as: UInt8.self))) * d }
            }
        case .q4_0, .iq4_nl:
            for b in 0 ..< n / 32 {
                let at = b * 18, d = f16(at)
                for j in 0 ..< 16 {
                    let q = src.load(fromByteOffset: at + 2 + j, as: UInt8.self)
                    if self == .q4_0 {
                        dst[32 * b + j] = Float(Int(q & 0x0F) - 8) * d
                        dst[32 * b + j + 16] = Float(Int(q >> 4) - 8) * d
                    } else {
                        dst[32 * b + j] = d * Self.iq4nlValues[Int(q & 0x0F)]
                        dst[32 * b + j + 16] = d * Self.iq4nlValues[Int(q >> 4)]
                    }
                }
            }
        case .q4_1:
            for b in 0 ..< n / 32 {
                let at = b * 20, d = f16(at), m = f16(at + 2)
                for j in 0 ..< 16 {
                    let q = src.load(fromByteOffset: at + 4 + j, as: UInt8.self)
                    dst[32 * b + j] = Float(q & 0x0F) * d + m
                    dst[32 * b + j + 16] = Float(q >> 4) * d + m
                }
            }
        case .q5_0, .q5_1:
            let hasMin = self == .q5_1
            for b in 0 ..< n / 32 {
                let at = b * blockBytes, d = f16(at), m: Float = hasMin ? f16(at + 2) : 0
                let qhAt = at + (hasMin ? 4 : 2)
                let qh = src.loadUnaligned(fromByteOffset: qhAt, as: UInt32.self).littleEndian
                for j in 0 ..< 16 {
                    let q = src.load(fromByteOffset: qhAt + 4 + j, as: UInt8.self)
                    let h0 = UInt8(truncatingIfNeeded: (qh >> UInt32(j)) << 4) & 0x10
                    let h1 = UInt8(truncatingIfNeeded: qh >> UInt32(j + 12)) & 0x10
                    let x0 = Int((q & 0x0F) | h0), x1 = Int((q >> 4) | h1)
                    if hasMin {
                        dst[32 * b + j] = Float(x0) * d + m
                        dst[32 * b + j + 16] = Float(x1) * d + m
                    } else {
                        dst[32 * b + j] = Float(x0 - 16) * d
                        dst[32 * b + j + 16] = Float(x1 - 16) * d
                    }
                }
            }
        }
    }

    // MARK: Quantize

    /// Narrows `count` values (whole blocks) into `dst` as llama.cpp's x86 CPU backend does when
    /// it stores rows into its cache: Q8_0 through its AVX path (scale max/127, multiplier
    /// 127/max, round half to even), Q4_0/Q4_1/Q5_0/Q5_1 through ggml's reference quantizers.
    /// Precondition: `canQuantize`.
    public func quantize(_ src: UnsafePointer<Float>, count n: Int, into dst: UnsafeMutableRawPointer) {
        precondition(canQuantize, "\(self) is read, not written")
        if let type = elementType { return RowKernels.narrow(src, to: type, dst, n) }
        func storeF16(_ v: Float, _ at: Int) { dst.storeBytes(of: Float16(v).bitPattern.littleEndian, toByteOffset: at, as: UInt16.self) }
        switch self {
        case .f32, .f16, .bf16:
            preconditionFailure("unreachable: float types are narrowed above")
        case .q8_0:
            for b in 0 ..< n / 32 {
                let x = src + 32 * b, at = b * 34
                var amax: Float = 0
                for j in 0 ..< 32 { amax = max(amax, abs(x[j])) }
                storeF16(amax / 127, at)
                let id: Float = amax != 0 ? 127 / amax : 0
                for j in 0 ..< 32 {
                    let q = Int8(clamping: Int((x[j] * id).rounded(.toNearestOrEven)))
                    dst.storeBytes(of: UInt8(bitPattern: q), toByteOffset: at + 2 + j, as: UInt8.self)
                }
            }
        case .q4_0, .q5_0:
            let five = self == .q5_0
            for b in 0 ..< n / 32 {
                let x = src + 32 * b, at = b * blockBytes
                var amax: Float = 0, maxValue: Float = 0
                for j in 0 ..< 32 where amax < abs(x[j]) {
                    amax = abs(x[j])
                    maxValue = x[j]
                }
                let d = maxValue / (five ? -16 : -8)
                let id: Float = d != 0 ? 1 / d : 0
                storeF16(d, at)
                var qh: UInt32 = 0
                let qsAt = at + (five ? 6 : 2)
                for j in 0 ..< 16 {
                    let q0 = Self.truncatedCode(x[j] * id + (five ? 16.5 : 8.5), max: five ? 31 : 15)
                    let q1 = Self.truncatedCode(x[j + 16] * id + (five ? 16.5 : 8.5), max: five ? 31 : 15)
                    dst.storeBytes(of: (q0 & 0x0F) | (q1 & 0x0F) << 4, toByteOffset: qsAt + j, as: UInt8.self)
                    qh |= UInt32((q0 & 0x10) >> 4) << UInt32(j) | UInt32((q1 & 0x10) >> 4) << UInt32(j + 16)
                }
                if five { dst.storeBytes(of: qh.littleEndian, toByteOffset: at + 2, as: UInt32.self) }
            }
        case .q4_1, .q5_1:
            let five = self == .q5_1
            for b in 0 ..< n / 32 {
                let x = src + 32 * b, at = b * blockBytes
                var lo = Float.greatestFiniteMagnitude, hi = -Float.greatestFiniteMagnitude
                for j in 0 ..< 32 {
                    if x[j] < lo { lo = x[j] }
                    if x[j] > hi { hi = x[j] }
                }
                let d = (hi - lo) / (five ? 31 : 15)
                let id: Float = d != 0 ? 1 / d : 0
                storeF16(d, at)
                storeF16(lo, at + 2)
                var qh: UInt32 = 0
                let qsAt = at + (five ? 8 : 4)
                for j in 0 ..< 16 {
                    // Q4_1 clamps to 15 after an int8 cast; Q5_1's reference casts to uint8 unclamped.
                    let q0 = Self.truncatedCode((x[j] - lo) * id + 0.5, max: five ? 255 : 15)
                    let q1 = Self.truncatedCode((x[j + 16] - lo) * id + 0.5, max: five ? 255 : 15)
                    dst.storeBytes(of: (q0 & 0x0F) | (q1 & 0x0F) << 4, toByteOffset: qsAt + j, as: UInt8.self)
                    qh |= UInt32((q0 & 0x10) >> 4) << UInt32(j) | UInt32((q1 & 0x10) >> 4) << UInt32(j + 16)
                }
                if five { dst.storeBytes(of: qh.littleEndian, toByteOffset: at + 4, as: UInt32.self) }
            }
        case .iq4_nl:
            preconditionFailure("unreachable: canQuantize is false")
        }
    }

    /// C's `(int8_t)(v)` (truncation toward zero) then `MIN(max, ...)`, for codes that are never
    /// negative in ggml's quantizers (v >= 0.5); NaN gives 0.
    static func truncatedCode(_ v: Float, max: Int) -> UInt8 {
        guard v.isFinite else { return 0 }
        return UInt8(clamping: Swift.min(max, Swift.max(0, Int(v.rounded(.towardZero)))))
    }
}
