/// PolarQuant (Wu et al. 2025): each 2-D sub-vector of a key, paired as RoPE rotates them,
/// becomes a radius and an angle. Outliers land in the radius, which gets an f16 range per
/// (run of tokens, pair); the angle is bounded and is quantized uniformly over the full circle
/// with no metadata. Decoding needs no trigonometry: cos and sin of every angle code come from a
/// table of 2^angleBits entries built once.
///
/// Parameters (8 bytes, Spec/ "Scheme 3: polar"): radiusBits u8 (1...8), angleBits u8 (1...8),
/// pairing u8 (0: adjacent (2j, 2j+1); 1: rotate-half (j, j + d/2); 255: as the manifest's RoPE
/// layout says, adjacent when it says none), reserved u8 = 0, radiusGroup u16 (tokens per radius
/// range; 0: the whole segment), reserved u16 = 0.
///
/// Block payload (P = head_dim / 2 pairs, S = segmentTokens, R = S / radiusGroup runs):
/// angle codes (S * P codes of angleBits, a little-endian bit stream, code (t, j) at bit
/// (t * P + j) * angleBits), zero-padded to a multiple of 8 bytes; radius codes likewise with
/// radiusBits; then R * P f16 radius scales and R * P f16 radius offsets, run-major. Pair j of
/// token t decodes to rhat * (cos_a, sin_a) with rhat = scale * code + offset and
/// cos_a, sin_a = cos, sin(2 pi a / 2^angleBits) rounded to f32.
public struct PolarScheme: KVScheme {
    public static let kind = SchemeKind.polar
    public static let specSyntax = "r<B>a<B>[:g<T>][:adjacent|:half]"
    public static let summary = "PolarQuant: each RoPE pair as a B-bit radius (f16 range per T tokens and pair; default: per segment) and a B-bit angle over the circle; table-lookup attention. Pairs follow the manifest's RoPE layout unless :adjacent or :half"

    public enum Pairing: UInt8, Sendable {
        case adjacent = 0
        case rotateHalf = 1
        case fromManifest = 255
    }

    public let descriptor: SchemeDescriptor
    public let compressesBlocks = false
    public let radiusBits: Int
    public let angleBits: Int
    public let pairing: Pairing
    let headDim: Int
    let pairs: Int
    let segmentTokens: Int
    let radiusGroup: Int
    /// The parameter as stored: 0 means one range per segment (whatever its size).
    let storedRadiusGroup: Int
    let angleBytes: Int
    let radiusBytes: Int
    let runs: Int
    /// cos and sin of each angle code's centre, interleaved: [cos_0, sin_0, cos_1, ...].
    let angleTable: [Float]
    /// Dimension of each pair's x and y: [x_0, y_0, x_1, y_1, ...].
    let dims: [Int]
    /// How `encode` fits each radius range (`fit:mse` for keys: least squared radius error).
    let rangeFit: RangeFit

    public static func descriptor(radiusBits: Int, angleBits: Int, pairing: Pairing = .fromManifest, radiusGroup: Int = 0,
                                  residual: ElementType = .float16) -> SchemeDescriptor {
        SchemeDescriptor(kind: kind, residualType: residual,
                         parameters: [UInt8(radiusBits), UInt8(angleBits), pairing.rawValue, 0,
                                      UInt8(radiusGroup & 0xFF), UInt8(radiusGroup >> 8), 0, 0])
    }

    public static func setup(arguments: [String], role: KVKind, geometry: ModelGeometry) throws -> SchemeSetup {
        guard let first = arguments.first, first.hasPrefix("r"), let a = first.firstIndex(of: "a"),
              let rb = Int(first[first.index(after: first.startIndex) ..< a]), let ab = Int(first[first.index(after: a)...]) else {
            throw KVPackError.argument("polar needs radius and angle bits first, as in polar:r4a4, got \"polar:\(arguments.joined(separator: ":"))\"")
        }
        guard (1 ... 8).contains(rb), (1 ... 8).contains(ab) else {
            throw KVPackError.argument("polar: radius and angle bits must be 1...8, got r\(rb)a\(ab)")
        }
        guard geometry.headDim % 2 == 0 else { throw KVPackError.argument("polar pairs dimensions and needs an even head_dim, got \(geometry.headDim)") }
        var pairing = Pairing.fromManifest
        var group = 0
        for arg in arguments.dropFirst() {
            if arg == "adjacent" { pairing = .adjacent }
            else if arg == "half" { pairing = .rotateHalf }
            else if arg.hasPrefix("g"), let n = Int(arg.dropFirst()), (1 ... 65535).contains(n) { group = n }
            else { throw KVPackError.argument("polar: unknown argument \"\(arg)\" (expected gT with T in 1...65535, adjacent or half)") }
        }
        return SchemeSetup(descriptor: descriptor(radiusBits: rb, angleBits: ab, pairing: pairing, radiusGroup: group))
    }

    public init(descriptor: SchemeDescriptor, context: SchemeContext) throws {
        let p = descriptor.parameters
        guard p.count == 8 else { throw KVPackError.invalid(nil, "parameters", "polar takes 8 parameter bytes, found \(p.count)") }
        let rb = Int(p[0]), ab = Int(p[1])
        guard (1 ... 8).contains(rb) else { throw KVPackError.invalid(nil, "polar.radiusBits", "is \(rb), must be 1...8") }
        guard (1 ... 8).contains(ab) else { throw KVPackError.invalid(nil, "polar.angleBits", "is \(ab), must be 1...8") }
        guard let pairing = Pairing(rawValue: p[2]) else {
            throw KVPackError.invalid(nil, "polar.pairing", "is \(p[2]), must be 0 (adjacent), 1 (rotate-half) or 255 (the manifest's RoPE layout)")
        }
        guard p[3] == 0, p[6] == 0, p[7] == 0 else { throw KVPackError.invalid(nil, "polar.reserved", "reserved parameter bytes must be 0") }
        let d = context.headDim, s = context.segmentTokens
        guard d % 2 == 0 else { throw KVPackError.invalid(nil, "polar", "needs an even head_dim, the file has \(d)") }
        let stored = Int(p[4]) | Int(p[5]) << 8
        let group = stored == 0 ? s : stored
        guard s % group == 0 else {
            throw KVPackError.invalid(nil, "polar.radiusGroup", "is \(group); radius groups of tokens must divide segmentTokens \(s)")
        }
        guard descriptor.blobIDs.isEmpty else { throw KVPackError.invalid(nil, "blobIDs", "polar uses no blobs, found \(descriptor.blobIDs.count)") }
        self.descriptor = descriptor
        radiusBits = rb
        angleBits = ab
        self.pairing = pairing
        headDim = d
        pairs = d / 2
        segmentTokens = s
        radiusGroup = group
        storedRadiusGroup = stored
        runs = s / group
        angleBytes = Self.paddedBytes(bits: s * pairs * ab)
        radiusBytes = Self.paddedBytes(bits: s * pairs * rb)
        let count = 1 << ab
        angleTable = (0 ..< count).flatMap { a -> [Float] in
            let theta = 2 * Double.pi * Double(a) / Double(count)
            return [Float(LibM.cos(theta)), Float(LibM.sin(theta))]
        }
        let half = pairing == .rotateHalf || (pairing == .fromManifest && context.rope.layout == .rotateHalf)
        dims = (0 ..< d / 2).flatMap { j in half ? [j, j + d / 2] : [2 * j, 2 * j + 1] }
        rangeFit = context.rangeFit
    }

    static func paddedBytes(bits: Int) -> Int { (bits + 63) / 64 * 8 }

    public var specString: String {
        let pairs = pairing == .adjacent ? ":adjacent" : pairing == .rotateHalf ? ":half" : ""
        return "polar:r\(radiusBits)a\(angleBits)" + (storedRadiusGroup == 0 ? "" : ":g\(storedRadiusGroup)") + pairs
    }

    public func encodedBlockSize(tokens: Int) -> Int { angleBytes + radiusBytes + 4 * runs * pairs }

    var scalesOffset: Int { angleBytes + radiusBytes }
    var offsetsOffset: Int { angleBytes + radiusBytes + 2 * runs * pairs }

    @inline(__always)
    func radiusScale(_ p: UnsafeRawPointer, run: Int, pair j: Int) -> Float {
        Float(Float16(bitPattern: p.loadUnaligned(fromByteOffset: scalesOffset + 2 * (run * pairs + j), as: UInt16.self)))
    }

    @inline(__always)
    func radiusOffset(_ p: UnsafeRawPointer, run: Int, pair j: Int) -> Float {
        Float(Float16(bitPattern: p.loadUnaligned(fromByteOffset: offsetsOffset + 2 * (run * pairs + j), as: UInt16.self)))
    }

    /// Code `index` of `bits` (at most 8) bits in the stream at `section`: only the one or two
    /// bytes the code occupies are read. (svdq's streams end its payload, so a code in the last
    /// byte has nothing after it; ASan found the two-byte read there.)
    @inline(__always)
    static func code(_ p: UnsafeRawPointer, section: Int, index: Int, bits: Int) -> Int {
        let bit = index * bits, at = section + bit >> 3, shift = bit & 7
        var word = Int(p.load(fromByteOffset: at, as: UInt8.self))
        if shift + bits > 8 { word |= Int(p.load(fromByteOffset: at + 1, as: UInt8.self)) << 8 }
        return (word >> shift) & ((1 << bits) - 1)
    }

    static func put(_ p: UnsafeMutableRawPointer, section: Int, index: Int, bits: Int, value: Int) {
        let bit = index * bits
        let at = section + bit >> 3
        let shifted = UInt16(value) << UInt16(bit & 7)
        p.storeBytes(of: p.load(fromByteOffset: at, as: UInt8.self) | UInt8(truncatingIfNeeded: shifted), toByteOffset: at, as: UInt8.self)
        if shifted > 0xFF {
            p.storeBytes(of: p.load(fromByteOffset: at + 1, as: UInt8.self) | UInt8(truncatingIfNeeded: shifted >> 8), toByteOffset: at + 1, as: UInt8.self)
        }
    }

    public func encode(rows: UnsafePointer<Float>, tokens: Int, into block: UnsafeMutableRawBufferPointer) {
        let out = block.baseAddress!
        out.initializeMemory(as: UInt8.self, repeating: 0, count: block.count)
        let d = headDim, angles = 1 << angleBits, levels = Float((1 << radiusBits) - 1)
        let step = 2 * Double.pi / Double(angles)
        withUnsafeTemporaryAllocation(of: Float.self, capacity: radiusGroup) { radii in
            for run in 0 ..< runs {
                for j in 0 ..< pairs {
                    let t0 = run * radiusGroup
                    for i in 0 ..< radiusGroup {
                        let t = t0 + i
                        let x = IntScheme.representable(rows[t * d + dims[2 * j]]), y = IntScheme.representable(rows[t * d + dims[2 * j + 1]])
                        let r = min((x * x + y * y).squareRoot(), 65504)
                        radii[i] = r
                        var theta = LibM.atan2(Double(y), Double(x))
                        if theta < 0 { theta += 2 * Double.pi }
                        let a = Int((theta / step).rounded()) % angles
                        Self.put(out, section: 0, index: t * pairs + j, bits: angleBits, value: a)
                    }
                    let (scale16, offset16) = IntScheme.RangeFitter(levels: levels, fit: rangeFit)
                        .range(of: IntScheme.Group(first: radii.baseAddress!, step: 1, count: radiusGroup))
                    let offset = Float(offset16), scale = Float(scale16)
                    out.storeBytes(of: scale16.bitPattern, toByteOffset: scalesOffset + 2 * (run * pairs + j), as: UInt16.self)
                    out.storeBytes(of: offset16.bitPattern, toByteOffset: offsetsOffset + 2 * (run * pairs + j), as: UInt16.self)
                    guard scale > 0 else { continue }
                    for i in 0 ..< radiusGroup {
                        let q = ((radii[i] - offset) / scale).rounded(.toNearestOrEven)
                        Self.put(out, section: angleBytes, index: (t0 + i) * pairs + j, bits: radiusBits, value: Int(min(max(q, 0), levels)))
                    }
                }
            }
        }
    }

    public func validate(block: UnsafeRawBufferPointer, tokens: Int) throws {
        let p = block.baseAddress!
        for run in 0 ..< runs {
            for j in 0 ..< pairs {
                let s = radiusScale(p, run: run, pair: j), o = radiusOffset(p, run: run, pair: j)
                guard s.isFinite, s >= 0, o.isFinite else {
                    throw KVPackError(.corruptPayload, field: "BLCK.polar.radius",
                                      "run \(run) pair \(j): scale \(s), offset \(o); scales must be finite and >= 0, offsets finite")
                }
            }
        }
    }

    public func decode(block: UnsafeRawBufferPointer, tokens: Range<Int>, into out: UnsafeMutablePointer<Float>) {
        let p = block.baseAddress!, d = headDim
        if vectorPath { return decodeVector(p, tokens: tokens, layout: naturalLayout, into: out) }
        angleTable.withUnsafeBufferPointer { table in
            dims.withUnsafeBufferPointer { dims in
                for (row, t) in tokens.enumerated() {
                    let run = t / radiusGroup, o = out + row * d
                    for j in 0 ..< pairs {
                        let index = t * pairs + j
                        let a = Self.code(p, section: 0, index: index, bits: angleBits)
                        let r = radiusScale(p, run: run, pair: j) * Float(Self.code(p, section: angleBytes, index: index, bits: radiusBits))
                            + radiusOffset(p, run: run, pair: j)
                        o[dims[2 * j]] = r * table[2 * a]
                        o[dims[2 * j + 1]] = r * table[2 * a + 1]
                    }
                }
            }
        }
    }

    /// Widths whose 8 codes `codes8` reads in one load.
    static func vectorBits(_ b: Int) -> Bool { b <= 4 || b == 8 }

    /// Whether rows decode eight pairs per step (`decodeVector`), and so keys score in the
    /// scoring layout.
    var vectorPath: Bool { pairs % 8 == 0 && Self.vectorBits(angleBits) && Self.vectorBits(radiusBits) }

    /// The layout of `decode`'s rows: the pairing's.
    var naturalLayout: PolarKernels.Layout { dims[1] == 1 ? .adjacent : .rotateHalf }

    /// Codes index ..< index + 8 (index a multiple of 8, so they start on a byte) of a stream.
    /// Reads at most 4 bytes past the last code of the radius stream: the f16 ranges follow it.
    @inline(__always)
    static func codes8(_ p: UnsafeRawPointer, section: Int, index: Int, bits: Int) -> SIMD8<UInt32> {
        let at = section &+ (index &* bits) &>> 3
        if bits == 8 { return SIMD8<UInt32>(truncatingIfNeeded: p.loadUnaligned(fromByteOffset: at, as: SIMD8<UInt8>.self)) }
        let shifts = SIMD8<UInt32>(0, 1, 2, 3, 4, 5, 6, 7) &* UInt32(bits)
        return (SIMD8<UInt32>(repeating: p.loadUnaligned(fromByteOffset: at, as: UInt32.self)) &>> shifts) & SIMD8(repeating: (1 << UInt32(bits)) - 1)
    }

    /// The same values as the scalar path, 8 pairs per step for codes and radii; cos and sin are
    /// one lookup per pair. Rows in `layout` (`vectorPath` only).
    func decodeVector(_ p: UnsafeRawPointer, tokens: Range<Int>, layout: PolarKernels.Layout, into out: UnsafeMutablePointer<Float>) {
        // In C where it runs: the same operations, cos and sin from registers (tested bit for bit).
        let inC = angleTable.withUnsafeBufferPointer { table in
            PolarKernels.decode(p, angleBits: angleBits, radiusBits: radiusBits, pairs: pairs, radiusGroup: radiusGroup,
                                radiusSection: angleBytes, scalesOffset: scalesOffset, offsetsOffset: offsetsOffset, table: table.baseAddress!,
                                layout: layout, tokens: tokens, into: out)
        }
        if !inC { decodeVectorInSwift(p, tokens: tokens, layout: layout, into: out) }
    }

    /// The Swift path of `decodeVector`.
    func decodeVectorInSwift(_ p: UnsafeRawPointer, tokens: Range<Int>, layout: PolarKernels.Layout, into out: UnsafeMutablePointer<Float>) {
        let d = headDim, groups = pairs / 8
        let exponent = SIMD8<UInt32>(repeating: 0x4B00_0000), bias = SIMD8<Float>(repeating: 8_388_608)
        angleTable.withUnsafeBufferPointer { table in
            withUnsafeTemporaryAllocation(of: SIMD8<Float>.self, capacity: 2 * groups) { lanes in
                withUnsafeTemporaryAllocation(of: SIMD8<UInt32>.self, capacity: groups) { codeLanes in
                    let radii = UnsafeMutableRawPointer(lanes.baseAddress!).assumingMemoryBound(to: Float.self)
                    let angles = UnsafeMutableRawPointer(codeLanes.baseAddress!).assumingMemoryBound(to: UInt32.self)
                    // Where pair j's x and y go (j = 8k + i): adjacent 2j, 2j + 1; rotate-half j,
                    // j + pairs; scoring 16k + i, 16k + 8 + i.
                    let (xStep, yStart, groupStep) = switch layout {
                    case .adjacent: (2, 1, 16)
                    case .rotateHalf: (1, pairs, 8)
                    case .scoring: (1, 8, 16)
                    }
                    for (row, t) in tokens.enumerated() {
                        let run = t / radiusGroup, o = out + row * d
                        for k in 0 ..< groups {
                            let index = t &* pairs &+ 8 &* k, range = run &* pairs &+ 8 &* k
                            codeLanes[k] = Self.codes8(p, section: 0, index: index, bits: angleBits)
                            let code = unsafeBitCast(Self.codes8(p, section: angleBytes, index: index, bits: radiusBits) | exponent,
                                                     to: SIMD8<Float>.self) - bias
                            let scale = SIMD8<Float>(p.loadUnaligned(fromByteOffset: scalesOffset &+ 2 &* range, as: SIMD8<Float16>.self))
                            let offset = SIMD8<Float>(p.loadUnaligned(fromByteOffset: offsetsOffset &+ 2 &* range, as: SIMD8<Float16>.self))
                            lanes[k] = scale * code + offset
                        }
                        for k in 0 ..< groups {
                            let x = o + k &* groupStep
                            for i in 0 ..< 8 {
                                let j = 8 &* k &+ i, a = Int(angles[j]), r = radii[j]
                                x[i &* xStep] = r * table[2 &* a]
                                x[i &* xStep &+ yStart] = r * table[2 &* a &+ 1]
                            }
                        }
                    }
                }
            }
        }
    }

    // MARK: Attention over codes

    /// The scaled queries, in the scoring layout where keys decode eight pairs per step. On
    /// AVX-512 VL machines the keys are scored without a tile (polar.c: each group of eight pairs
    /// decoded in registers for four query heads at once); elsewhere rows are decoded a tile at a
    /// time and scored by the shared tile kernels, with the same bits. The paper's per-query
    /// tables cost a lookup per pair, query and token, and measured about 3x slower than decoding
    /// once per token.
    public func queryStateSize(groupSize g: Int) -> Int { g * headDim }

    public func prepare(queries: UnsafePointer<Float>, groupSize g: Int, scale: Float, into state: UnsafeMutablePointer<Float>) {
        guard vectorPath else { return RowKernels.scaled(queries, by: scale, into: state, count: g * headDim) }
        let d = headDim
        for q in 0 ..< g {
            let x = queries + q * d, y = state + q * d
            for j in 0 ..< pairs {
                let at = j / 8 * 16 + j % 8
                y[at] = x[dims[2 * j]] * scale
                y[at + 8] = x[dims[2 * j + 1]] * scale
            }
        }
    }

    public func scores(block: UnsafeRawBufferPointer, tokens: Range<Int>, state: UnsafePointer<Float>, groupSize g: Int,
                       into scores: UnsafeMutablePointer<Float>, stride: Int) {
        self.scores(block: block, tokens: tokens, state: state, groupSize: g, into: scores, stride: stride, withoutTile: true)
    }

    /// `scores`, without a tile where the C kernel runs and `withoutTile`, else through decoded
    /// tiles (what machines without AVX-512 VL run; tests hold the two to the same bits).
    func scores(block: UnsafeRawBufferPointer, tokens: Range<Int>, state: UnsafePointer<Float>, groupSize g: Int,
                into scores: UnsafeMutablePointer<Float>, stride: Int, withoutTile: Bool) {
        guard vectorPath else {
            return TileKernels.scores(decodedBy: { decode(block: block, tokens: $0, into: $1) }, dim: headDim, tokens: tokens,
                                      queries: state, groupSize: g, into: scores, stride: stride)
        }
        let p = block.baseAddress!
        if withoutTile, PolarKernels.scoresInC {
            let done = angleTable.withUnsafeBufferPointer { table in
                PolarKernels.scores(p, angleBits: angleBits, radiusBits: radiusBits, pairs: pairs, radiusGroup: radiusGroup,
                                    radiusSection: angleBytes, scalesOffset: scalesOffset, offsetsOffset: offsetsOffset,
                                    table: table.baseAddress!, tokens: tokens, queries: state, groupSize: g, into: scores, stride: stride)
            }
            if done { return }
        }
        TileKernels.scores(decodedBy: { decodeVector(p, tokens: $0, layout: .scoring, into: $1) }, dim: headDim, tokens: tokens,
                           queries: state, groupSize: g, into: scores, stride: stride)
    }

    public func accumulate(block: UnsafeRawBufferPointer, tokens: Range<Int>, weights: UnsafePointer<Float>, stride: Int,
                           groupSize g: Int, into acc: UnsafeMutablePointer<Float>) {
        TileKernels.accumulate(decodedBy: { decode(block: block, tokens: $0, into: $1) }, dim: headDim, tokens: tokens,
                               weights: weights, stride: stride, groupSize: g, into: acc)
    }
}
