/// SVDq (2025): keys projected onto the right singular vectors of a calibration cache's keys
/// (latent channels ordered by singular value), each latent channel quantized with its own bit
/// width falling with its singular value (e.g. 8,4,4,2,2,1,1,0,...) and its own range per block.
/// Channels with 0 bits are not stored. Attention projects each query once into the latent
/// space and scores against the latent codes, skipping 0-bit channels.
///
/// Parameters (Spec/ "Scheme 4: svdq"): rank u16 (latent channels kept, 1...headDim), basis u8
/// (0: one basis per KV head; 1: one shared by the layer's KV heads), reserved u8 = 0, then rank
/// bytes: each latent channel's width in {0, 1, 2, 3, 4, 5, 6, 8, 16} (16: the latent value as
/// f16). One blob: the projection, f16, shape [bases, rank, headDim], row c of a basis being
/// latent direction c.
///
/// Block payload: rank f16 scales, rank f16 offsets (0 for channels of width 0 or 16), then per
/// latent channel of nonzero width, in order, its codes for the segment's tokens as a little-endian
/// bit stream (16: f16 values), zero-padded to a multiple of 8 bytes.
public struct SVDqScheme: KVScheme {
    public static let kind = SchemeKind.svdq
    public static let specSyntax = "<AVG>|<W-W-...>[:r<RANK>][:shared]"
    public static let summary = "SVDq: rows projected on the singular vectors of a calibration cache (the prefill); per-latent-channel widths falling with the singular value, from an average AVG bits (e.g. svdq:1.25) or given (svdq:8-4-4-2-2-1-1); f16 range per channel and block"

    public static let widths = [0, 1, 2, 3, 4, 5, 6, 8, 16]

    public let descriptor: SchemeDescriptor
    public let compressesBlocks = false
    public let rank: Int
    public let channelBits: [Int]
    public let sharedBasis: Bool
    let headDim: Int
    let segmentTokens: Int
    let kvHeads: Int
    /// Byte offset of each channel's code stream (-1: not stored).
    let streamOffsets: [Int]
    let blockBytes: Int
    /// All bases: [bases][rank][headDim], widened from the f16 blob.
    let allBases: [Float]
    /// The basis this instance uses (a KV head's, after `forKVHead`).
    let basisIndex: Int
    /// The C key scores' view of the block layout (SVDqKernels.plan); nil where they do not run.
    let kernelPlan: [Int64]?

    // MARK: Spec

    public static func descriptor(channelBits: [Int], sharedBasis: Bool, residual: ElementType = .float16) -> SchemeDescriptor {
        let rank = channelBits.count
        return SchemeDescriptor(kind: kind, residualType: residual,
                                parameters: [UInt8(rank & 0xFF), UInt8(rank >> 8), sharedBasis ? 1 : 0, 0] + channelBits.map { UInt8($0) })
    }

    struct Arguments {
        var average: Double?
        var explicit: [Int]?
        var rank: Int?
        var shared = false

        init(_ arguments: [String], headDim: Int) throws {
            guard let first = arguments.first else {
                throw KVPackError.argument("svdq needs an average width (svdq:1.25) or a list of widths (svdq:8-4-4-2-2-1-1)")
            }
            if first.contains("-") {
                let parts = first.split(separator: "-").map { Int($0) }
                guard !parts.isEmpty, parts.allSatisfy({ $0 != nil && SVDqScheme.widths.contains($0!) }) else {
                    throw KVPackError.argument("svdq: widths \"\(first)\" must be dash-separated values from \(SVDqScheme.widths)")
                }
                explicit = parts.map { $0! }
            } else {
                guard let a = Double(first), a > 0, a <= 16 else {
                    throw KVPackError.argument("svdq: the average width must be a number in (0, 16], got \"\(first)\"")
                }
                average = a
            }
            for arg in arguments.dropFirst() {
                if arg == "shared" { shared = true }
                else if arg.hasPrefix("r"), let n = Int(arg.dropFirst()), n >= 1 { rank = n }
                else { throw KVPackError.argument("svdq: unknown argument \"\(arg)\" (expected rN or shared)") }
            }
            let r = rank ?? explicit?.count ?? headDim
            guard r <= headDim else { throw KVPackError.argument("svdq: rank \(r) exceeds head_dim \(headDim)") }
            if let e = explicit, e.count > headDim { throw KVPackError.argument("svdq: \(e.count) widths for head_dim \(headDim)") }
            rank = r
        }
    }

    public static func setup(arguments: [String], role: KVKind, geometry: ModelGeometry) throws -> SchemeSetup {
        // `planner` answers every svdq spec (SchemeSpec asks it first); this is never reached.
        throw KVPackError.argument("svdq computes its basis from calibration statistics; it is planned, not set up directly")
    }

    /// The basis and widths of every layer from the calibration cache's Gram matrices (X^T X per
    /// KV head). Widths: greedy rate-distortion over latent channels with error
    /// sigma_c^2 * 2^(-2 b) (sigma_c^2 for a dropped channel), as KV-AdaQuant's allocator, unless
    /// given explicitly.
    public static func planner(arguments: [String], geometry: ModelGeometry) throws -> SchemePlanner? {
        let d = geometry.headDim
        let args = try Arguments(arguments, headDim: d)
        let needs = "svdq computes its bases from calibration statistics (the Gram matrices of a cache of the same model, such as its prefill), and none were given"
        return SchemePlanner(needs: needs) { calibration in
            guard calibration.grams.count == geometry.layerCount * geometry.kvHeadCount * 2 else {
                throw KVPackError.argument("svdq: the calibration statistics carry no Gram matrices for this geometry")
            }
            let rank = args.rank!
            // Plans are role-independent here; SchemeSpec asks for both roles and keeps what the
            // spec's prefixes say. Key and value bases differ, so plan both.
            var layers: [LayerSetup] = []
            var rationale = ["svdq: bases from the Gram matrices of \(calibration.tokens) calibration tokens (X^T X, Jacobi eigendecomposition in double); \(args.shared ? "one basis per layer" : "one basis per KV head"), rank \(rank)"]
            for layer in 0 ..< geometry.layerCount {
                var setups: [SchemeSetup] = []
                for kind in KVKind.allCases {
                    var bases: [[Double]] = []   // each the full eigenvector matrix, rows = directions
                    var energy = [Double](repeating: 0, count: d)
                    let grams = (0 ..< geometry.kvHeadCount).map { calibration.gram(layer: layer, kvHead: $0, kind: kind, geometry: geometry) }
                    let sources: [[Double]] = args.shared ? [grams.reduce(into: [Double](repeating: 0, count: d * d)) { acc, g in for i in 0 ..< d * d { acc[i] += g[i] } }] : grams
                    for g in sources {
                        let (values, vectors) = SymmetricEigen.decompose(g, dim: d)
                        for c in 0 ..< d { energy[c] += max(values[c], 0) }
                        bases.append(vectors)
                    }
                    let sigma = energy.prefix(rank).map { ($0 / Double(calibration.tokens * sources.count)).squareRoot() }
                    var bits: [Int]
                    if let e = args.explicit {
                        bits = Array((e + [Int](repeating: 0, count: max(0, rank - e.count))).prefix(rank))
                    } else {
                        bits = IntScheme.allocateBits(sensitivities: sigma, total: args.average! * Double(d), widths: widths)
                    }
                    // Trailing 0-width channels need no basis rows: the rank stops at the last stored one.
                    while bits.count > 1, bits.last == 0 { bits.removeLast() }
                    let kept = bits.count
                    bases = bases.map { Array($0[0 ..< kept * d]) }
                    var bytes: [UInt8] = []
                    bytes.reserveCapacity(bases.count * rank * d * 2)
                    for b in bases { for x in b { withUnsafeBytes(of: Float16(Float(x)).bitPattern.littleEndian) { bytes += $0 } } }
                    let blob = Blob(id: 0, kind: .projection, elementType: .float16, shape: [bases.count, kept, d], bytes: bytes)
                    setups.append(SchemeSetup(descriptor: descriptor(channelBits: bits, sharedBasis: args.shared), blobs: [blob]))
                    let mean = Double(bits.reduce(0, +)) / Double(d)
                    rationale.append("layer \(layer) \(kind == .key ? "K" : "V"): widths \(bits.map(String.init).joined(separator: "-")) (average \((mean * 1000).rounded() / 1000)); sigma \(sigma.prefix(4).map { "\(($0 * 100).rounded() / 100)" }.joined(separator: ", ")) ...")
                }
                layers.append(LayerSetup(key: setups[0], value: setups[1]))
            }
            return PlannedSchemes(layers: layers, rationale: rationale)
        }
    }

    // MARK: Codec

    public init(descriptor: SchemeDescriptor, context: SchemeContext) throws {
        let p = descriptor.parameters
        guard p.count >= 4 else { throw KVPackError.invalid(nil, "parameters", "svdq takes at least 4 parameter bytes, found \(p.count)") }
        let rank = Int(p[0]) | Int(p[1]) << 8
        let d = context.headDim
        guard rank >= 1, rank <= d else { throw KVPackError.invalid(nil, "svdq.rank", "is \(rank), must be 1...headDim (\(d))") }
        guard p[2] <= 1 else { throw KVPackError.invalid(nil, "svdq.basis", "is \(p[2]), must be 0 (per KV head) or 1 (shared)") }
        guard p[3] == 0 else { throw KVPackError.invalid(nil, "svdq.reserved", "must be 0") }
        guard p.count == 4 + rank else { throw KVPackError.invalid(nil, "parameters", "svdq with rank \(rank) takes \(4 + rank) parameter bytes, found \(p.count)") }
        let bits = p[4...].map { Int($0) }
        for (c, b) in bits.enumerated() where !Self.widths.contains(b) {
            throw KVPackError.invalid(nil, "svdq.widths[\(c)]", "is \(b), must be one of \(Self.widths)")
        }
        let shared = p[2] == 1
        let bases = shared ? 1 : context.geometry.kvHeadCount
        guard context.blobs.count == 1, let blob = context.blobs.first else {
            throw KVPackError.invalid(nil, "blobIDs", "svdq uses exactly one blob (the projection), found \(context.blobs.count)")
        }
        guard blob.kind == .projection, blob.elementType == .float16, blob.shape == [bases, rank, d] else {
            throw KVPackError.invalid(nil, "svdq.projection", "blob \(blob.id) is \(blob.kind) \(blob.elementType) \(blob.shape); expected a f16 projection [\(bases), \(rank), \(d)]")
        }
        var widened = [Float](repeating: 0, count: bases * rank * d)
        blob.bytes.withUnsafeBytes { b in widened.withUnsafeMutableBufferPointer { RowKernels.widenFloat16(b.baseAddress!, $0.baseAddress!, $0.count) } }
        guard widened.allSatisfy(\.isFinite) else { throw KVPackError.invalid(nil, "svdq.projection", "blob \(blob.id) holds a non-finite value") }
        self.descriptor = descriptor
        self.rank = rank
        channelBits = bits
        sharedBasis = shared
        headDim = d
        segmentTokens = context.segmentTokens
        kvHeads = context.geometry.kvHeadCount
        allBases = widened
        basisIndex = 0
        var offsets: [Int] = []
        var at = 4 * rank
        for b in bits {
            offsets.append(b == 0 ? -1 : at)
            at += b == 0 ? 0 : PolarScheme.paddedBytes(bits: context.segmentTokens * b)
        }
        streamOffsets = offsets
        blockBytes = at
        kernelPlan = SVDqKernels.plan(blockBytes: at, rank: rank, channelBits: bits, streamOffsets: offsets, tokens: context.segmentTokens & ~7)
    }

    private init(_ other: SVDqScheme, basis: Int) {
        descriptor = other.descriptor
        rank = other.rank
        channelBits = other.channelBits
        sharedBasis = other.sharedBasis
        headDim = other.headDim
        segmentTokens = other.segmentTokens
        kvHeads = other.kvHeads
        streamOffsets = other.streamOffsets
        blockBytes = other.blockBytes
        allBases = other.allBases
        basisIndex = basis
        kernelPlan = other.kernelPlan
    }

    public func forKVHead(_ head: Int) -> any KVScheme {
        sharedBasis ? self : SVDqScheme(self, basis: head)
    }

    public var specString: String {
        "svdq:" + channelBits.map(String.init).joined(separator: "-") + (sharedBasis ? ":shared" : "")
    }

    public func encodedBlockSize(tokens: Int) -> Int { blockBytes }

    @inline(__always)
    func scale(_ p: UnsafeRawPointer, _ c: Int) -> Float {
        Float(Float16(bitPattern: p.loadUnaligned(fromByteOffset: 2 * c, as: UInt16.self)))
    }

    @inline(__always)
    func offset(_ p: UnsafeRawPointer, _ c: Int) -> Float {
        Float(Float16(bitPattern: p.loadUnaligned(fromByteOffset: 2 * (rank + c), as: UInt16.self)))
    }

    /// Latent value of channel c at token t.
    @inline(__always)
    func latent(_ p: UnsafeRawPointer, channel c: Int, token t: Int) -> Float {
        let b = channelBits[c], at = streamOffsets[c]
        if b == 16 { return Float(Float16(bitPattern: p.loadUnaligned(fromByteOffset: at + 2 * t, as: UInt16.self))) }
        return scale(p, c) * Float(PolarScheme.code(p, section: at, index: t, bits: b)) + offset(p, c)
    }

    /// Pointer to latent direction c of this instance's basis.
    @inline(__always)
    func direction(_ base: UnsafePointer<Float>, _ c: Int) -> UnsafePointer<Float> { base + (basisIndex * rank + c) * headDim }

    public func encode(rows: UnsafePointer<Float>, tokens: Int, into block: UnsafeMutableRawBufferPointer) {
        let out = block.baseAddress!
        out.initializeMemory(as: UInt8.self, repeating: 0, count: block.count)
        let c = segmentTokens, d = headDim
        allBases.withUnsafeBufferPointer { bp in
            withUnsafeTemporaryAllocation(of: Float.self, capacity: c + c * d) { tmp in
                let z = tmp.baseAddress!, clean = tmp.baseAddress! + c
                for i in 0 ..< c * d { clean[i] = IntScheme.representable(rows[i]) }
                for ch in 0 ..< rank where channelBits[ch] > 0 {
                    let dir = direction(bp.baseAddress!, ch)
                    for t in 0 ..< c { z[t] = IntScheme.representable(RowKernels.dot(dir, clean + t * d, d)) }
                    let b = channelBits[ch], at = streamOffsets[ch]
                    if b == 16 {
                        for t in 0 ..< c { out.storeBytes(of: Float16(z[t]).bitPattern, toByteOffset: at + 2 * t, as: UInt16.self) }
                        continue
                    }
                    let (scale16, offset16) = Self.fitRange(z, count: c, bits: b)
                    let scale = Float(scale16), offset = Float(offset16), levels = Float((1 << b) - 1)
                    out.storeBytes(of: scale16.bitPattern, toByteOffset: 2 * ch, as: UInt16.self)
                    out.storeBytes(of: offset16.bitPattern, toByteOffset: 2 * (rank + ch), as: UInt16.self)
                    guard scale > 0 else { continue }
                    for t in 0 ..< c {
                        let q = ((z[t] - offset) / scale).rounded(.toNearestOrEven)
                        PolarScheme.put(out, section: at, index: t, bits: b, value: Int(min(max(q, 0), levels)))
                    }
                }
            }
        }
    }

    /// Scale and offset (f16) for `count` latent values at `bits`: the min/max range, then a few
    /// rounds of least-squares refitting (codes fixed, fit scale and offset; requantize), kept
    /// only while the squared error falls. At 1 and 2 bits the min/max levels sit in the tails
    /// and cost more than dropping the channel (1 bit: about 3x its energy); the refit moves
    /// them to the conditional means (about 0.36x).
    static func fitRange(_ z: UnsafePointer<Float>, count n: Int, bits: Int) -> (Float16, Float16) {
        var lo = Float.infinity, hi = -Float.infinity
        for t in 0 ..< n { lo = min(lo, z[t]); hi = max(hi, z[t]) }
        let levels = Float((1 << bits) - 1)
        var offset = IntScheme.f16(lo, roundingUp: false)
        var scale = IntScheme.f16((hi - Float(offset)) / levels, roundingUp: true)
        func error(_ s: Float16, _ o: Float16) -> Double {
            let sf = Float(s), of = Float(o)
            guard sf > 0 else { return (0 ..< n).reduce(0.0) { $0 + Double(z[$1] - of) * Double(z[$1] - of) } }
            var e = 0.0
            for t in 0 ..< n {
                let q = min(max(((z[t] - of) / sf).rounded(.toNearestOrEven), 0), levels)
                let r = Double(z[t]) - Double(sf * q + of)
                e += r * r
            }
            return e
        }
        var best = error(scale, offset)
        guard Float(scale) > 0 else { return (scale, offset) }
        for _ in 0 ..< 6 {
            var sq = 0.0, sqq = 0.0, sz = 0.0, sqz = 0.0
            for t in 0 ..< n {
                let q = Double(min(max(((z[t] - Float(offset)) / Float(scale)).rounded(.toNearestOrEven), 0), levels))
                sq += q; sqq += q * q; sz += Double(z[t]); sqz += q * Double(z[t])
            }
            let det = Double(n) * sqq - sq * sq
            guard det > 0 else { break }
            let s = (Double(n) * sqz - sq * sz) / det, o = (sz - s * sq) / Double(n)
            guard s > 0, s.isFinite, o.isFinite else { break }
            let s16 = Float16(Float(s)), o16 = Float16(Float(o))
            guard s16.isFinite, o16.isFinite, Float(s16) > 0 else { break }
            let e = error(s16, o16)
            guard e < best else { break }
            (scale, offset, best) = (s16, o16, e)
        }
        return (scale, offset)
    }

    public func validate(block: UnsafeRawBufferPointer, tokens: Int) throws {
        let p = block.baseAddress!
        for c in 0 ..< rank where channelBits[c] > 0 {
            if channelBits[c] == 16 {
                for t in 0 ..< segmentTokens where !latent(p, channel: c, token: t).isFinite {
                    throw KVPackError(.corruptPayload, field: "BLCK.svdq.latent", "channel \(c) token \(t) is not finite")
                }
                continue
            }
            let s = scale(p, c), o = offset(p, c)
            guard s.isFinite, s >= 0, o.isFinite else {
                throw KVPackError(.corruptPayload, field: "BLCK.svdq.ranges", "channel \(c): scale \(s), offset \(o); scales must be finite and >= 0, offsets finite")
            }
        }
    }

    public func decode(block: UnsafeRawBufferPointer, tokens: Range<Int>, into out: UnsafeMutablePointer<Float>) {
        let p = block.baseAddress!, d = headDim
        out.update(repeating: 0, count: tokens.count * d)
        allBases.withUnsafeBufferPointer { bp in
            for c in 0 ..< rank where channelBits[c] > 0 {
                let dir = direction(bp.baseAddress!, c)
                for (row, t) in tokens.enumerated() {
                    // Multiply, then add: no fused multiply-add, so every reader gets these bits.
                    let z = latent(p, channel: c, token: t), o = out + row * d
                    for i in 0 ..< d { o[i] = o[i] + z * dir[i] }
                }
            }
        }
    }

    // MARK: Attention over codes

    /// Per query: its projection on each latent direction (scaled).
    public func queryStateSize(groupSize g: Int) -> Int { g * rank }

    public func prepare(queries: UnsafePointer<Float>, groupSize g: Int, scale: Float, into state: UnsafeMutablePointer<Float>) {
        allBases.withUnsafeBufferPointer { bp in
            for q in 0 ..< g {
                for c in 0 ..< rank { state[q * rank + c] = scale * RowKernels.dot(direction(bp.baseAddress!, c), queries + q * headDim, headDim) }
            }
        }
    }

    /// Per width w in 0...8: the lane shifts (lane * w), then the mask (2^w - 1), for `latent8`.
    @inline(__always)
    static func withShiftTable<R>(_ body: (UnsafeMutableBufferPointer<SIMD8<UInt32>>) -> R) -> R {
        withUnsafeTemporaryAllocation(of: SIMD8<UInt32>.self, capacity: 18) { table in
            let lanes = SIMD8<UInt32>(0, 1, 2, 3, 4, 5, 6, 7)
            for w in 0 ..< 9 {
                table[2 * w] = lanes &* UInt32(w)
                table[2 * w + 1] = SIMD8(repeating: (1 << UInt32(w)) &- 1)
            }
            return body(table)
        }
    }

    /// Latent values of channel c at tokens t ..< t + 8 (t a multiple of 8, so the codes start
    /// on a byte), computed as `latent` computes each: widths up to 4 with one 4-byte load where
    /// it stays inside the payload, shifted by `shifts` (`withShiftTable`); 8 bits with one 8-byte
    /// load (its 8 codes); f16 channels with one 16-byte load; anything else (5 and 6 bits, the
    /// last channel's last codes below 8 bits) one code at a time.
    @inline(__always)
    func latent8(_ p: UnsafeRawPointer, channel c: Int, bits b: Int, at: Int, token t: Int, shifts: UnsafePointer<SIMD8<UInt32>>) -> SIMD8<Float> {
        if b <= 4 && at &+ (t &* b) &>> 3 &+ 4 <= blockBytes {
            let word = p.loadUnaligned(fromByteOffset: at &+ (t &* b) &>> 3, as: UInt32.self)
            let codes = (SIMD8<UInt32>(repeating: word) &>> shifts[2 &* b]) & shifts[2 &* b &+ 1]
            let f = unsafeBitCast(codes | SIMD8(repeating: 0x4B00_0000), to: SIMD8<Float>.self) - SIMD8(repeating: 8_388_608)
            return SIMD8(repeating: scale(p, c)) * f + SIMD8(repeating: offset(p, c))
        }
        if b == 8 {
            let codes = SIMD8<UInt32>(truncatingIfNeeded: p.loadUnaligned(fromByteOffset: at &+ t, as: SIMD8<UInt8>.self))
            let f = unsafeBitCast(codes | SIMD8(repeating: 0x4B00_0000), to: SIMD8<Float>.self) - SIMD8(repeating: 8_388_608)
            return SIMD8(repeating: scale(p, c)) * f + SIMD8(repeating: offset(p, c))
        }
        if b == 16 { return SIMD8<Float>(p.loadUnaligned(fromByteOffset: at &+ 2 &* t, as: SIMD8<Float16>.self)) }
        return latent8Slow(p, channel: c, token: t)
    }

    @inline(never)
    func latent8Slow(_ p: UnsafeRawPointer, channel c: Int, token t: Int) -> SIMD8<Float> {
        var z = SIMD8<Float>()
        for i in 0 ..< 8 { z[i] = latent(p, channel: c, token: t + i) }
        return z
    }

    /// Tokens [lo, hi) split into an unaligned head, whole aligned runs of 8, and a tail.
    @inline(__always)
    static func aligned(_ tokens: Range<Int>) -> Range<Int> {
        let start = min(tokens.upperBound, (tokens.lowerBound + 7) & ~7)
        return start ..< max(start, tokens.upperBound & ~7)
    }

    /// Calls `body` for the tokens of `tokens` outside `vector` (`aligned(tokens)`): the
    /// unaligned head and tail.
    @inline(__always)
    static func forEdges(_ tokens: Range<Int>, _ vector: Range<Int>, _ body: (Int) -> Void) {
        for t in tokens.lowerBound ..< vector.lowerBound { body(t) }
        for t in vector.upperBound ..< tokens.upperBound { body(t) }
    }

    public func scores(block: UnsafeRawBufferPointer, tokens: Range<Int>, state: UnsafePointer<Float>, groupSize g: Int,
                       into scores: UnsafeMutablePointer<Float>, stride: Int) {
        self.scores(block: block, tokens: tokens, state: state, groupSize: g, into: scores, stride: stride, inC: true)
    }

    /// `scores`, with the whole vectors of eight tokens in C (SVDqKernels, the same bits) where it
    /// runs and `inC`, else in Swift (what tests hold the C path to).
    func scores(block: UnsafeRawBufferPointer, tokens: Range<Int>, state: UnsafePointer<Float>, groupSize g: Int,
                into scores: UnsafeMutablePointer<Float>, stride: Int, inC: Bool) {
        let p = block.baseAddress!, lo = tokens.lowerBound, n = tokens.count
        let vector = Self.aligned(tokens)
        for q in 0 ..< g { (scores + q * stride).update(repeating: 0, count: n) }
        for c in 0 ..< rank where channelBits[c] > 0 {
            Self.forEdges(tokens, vector) { t in
                let z = latent(p, channel: c, token: t)
                for q in 0 ..< g { scores[q * stride + (t - lo)] += state[q * rank + c] * z }
            }
        }
        if vector.isEmpty { return }
        if inC, let kernelPlan,
           SVDqKernels.scores(block, plan: kernelPlan, tokens: vector, state: state, groupSize: g, into: scores + (vector.lowerBound - lo), stride: stride) {
            return
        }
        // Channel-major codes: 8 tokens x 4 queries of scores stay in registers while every
        // latent channel is decoded once (8 tokens per vector step) and multiplied in. Shift and
        // mask vectors per width are built once per call.
        Self.withShiftTable { table in
            channelBits.withUnsafeBufferPointer { bits in
                streamOffsets.withUnsafeBufferPointer { sections in
                    var q0 = 0
                    while q0 < g {
                        let live = min(4, g - q0)
                        var t = vector.lowerBound
                        while t < vector.upperBound {
                            var a0 = SIMD8<Float>(), a1 = a0, a2 = a0, a3 = a0
                            for c in 0 ..< rank {
                                let b = bits[c], at = sections[c]
                                if b == 0 { continue }
                                let x = latent8(p, channel: c, bits: b, at: at, token: t, shifts: table.baseAddress!)
                                let s = state + (q0 &* rank &+ c)
                                a0.addProduct(SIMD8(repeating: s[0]), x)
                                a1.addProduct(SIMD8(repeating: live > 1 ? s[rank] : 0), x)
                                a2.addProduct(SIMD8(repeating: live > 2 ? s[2 &* rank] : 0), x)
                                a3.addProduct(SIMD8(repeating: live > 3 ? s[3 &* rank] : 0), x)
                            }
                            for q in 0 ..< live {
                                UnsafeMutableRawPointer(scores + (q0 + q) * stride + (t - lo))
                                    .storeBytes(of: q == 0 ? a0 : q == 1 ? a1 : q == 2 ? a2 : a3, as: SIMD8<Float>.self)
                            }
                            t += 8
                        }
                        q0 += 4
                    }
                }
            }
        }
    }

    /// The accumulator holds, per query, the latent sums in its first `rank` floats until
    /// `finishAccumulation` maps them back through the basis.
    public func accumulate(block: UnsafeRawBufferPointer, tokens: Range<Int>, weights: UnsafePointer<Float>, stride: Int,
                           groupSize g: Int, into acc: UnsafeMutablePointer<Float>) {
        let p = block.baseAddress!, lo = tokens.lowerBound, d = headDim
        let vector = Self.aligned(tokens)
        Self.withShiftTable { table in
            for c in 0 ..< rank where channelBits[c] > 0 {
                let b = channelBits[c], at = streamOffsets[c]
                // Each latent value is decoded once and shared by the group's queries (four at
                // a time, their sums in registers).
                var q0 = 0
                while q0 < g {
                    let live = min(4, g - q0)
                    let w0 = weights + q0 * stride - lo, w1 = live > 1 ? w0 + stride : w0
                    let w2 = live > 2 ? w0 + 2 * stride : w0, w3 = live > 3 ? w0 + 3 * stride : w0
                    var a0 = SIMD8<Float>(), a1 = a0, a2 = a0, a3 = a0
                    var t = vector.lowerBound
                    while t < vector.upperBound {
                        let x = latent8(p, channel: c, bits: b, at: at, token: t, shifts: table.baseAddress!)
                        a0.addProduct(UnsafeRawPointer(w0 + t).loadUnaligned(as: SIMD8<Float>.self), x)
                        a1.addProduct(UnsafeRawPointer(w1 + t).loadUnaligned(as: SIMD8<Float>.self), x)
                        a2.addProduct(UnsafeRawPointer(w2 + t).loadUnaligned(as: SIMD8<Float>.self), x)
                        a3.addProduct(UnsafeRawPointer(w3 + t).loadUnaligned(as: SIMD8<Float>.self), x)
                        t += 8
                    }
                    for q in 0 ..< live { acc[(q0 + q) * d + c] += (q == 0 ? a0 : q == 1 ? a1 : q == 2 ? a2 : a3).sum() }
                    q0 += 4
                }
                Self.forEdges(tokens, vector) { t in
                    let z = latent(p, channel: c, token: t)
                    for q in 0 ..< g { acc[q * d + c] += weights[q * stride + (t - lo)] * z }
                }
            }
        }
    }

    public func finishAccumulation(_ acc: UnsafeMutablePointer<Float>, groupSize g: Int) {
        let d = headDim
        allBases.withUnsafeBufferPointer { bp in
            withUnsafeTemporaryAllocation(of: Float.self, capacity: d) { tmp in
                let out = tmp.baseAddress!
                for q in 0 ..< g {
                    out.update(repeating: 0, count: d)
                    for c in 0 ..< rank where channelBits[c] > 0 { RowKernels.axpy(acc[q * d + c], direction(bp.baseAddress!, c), out, d) }
                    (acc + q * d).update(from: out, count: d)
                }
            }
        }
    }
}

/// Eigen-decomposition of a small symmetric matrix by cyclic Jacobi rotations, in double:
/// accurate to rounding for the head_dim x head_dim Gram matrices SVDq needs (head_dim <= 256),
/// no LAPACK dependency.
public enum SymmetricEigen {
    /// Eigenvalues in decreasing order and the matching unit eigenvectors, row-major
    /// (row c is eigenvector c).
    public static func decompose(_ matrix: [Double], dim n: Int) -> (values: [Double], vectors: [Double]) {
        var a = matrix
        var v = [Double](repeating: 0, count: n * n)
        for i in 0 ..< n { v[i * n + i] = 1 }
        let scale = max((0 ..< n).reduce(0.0) { $0 + abs(a[$1 * n + $1]) }, 1e-300)
        for _ in 0 ..< 60 {
            var off = 0.0
            for i in 0 ..< n { for j in i + 1 ..< n { off += a[i * n + j] * a[i * n + j] } }
            if off.squareRoot() <= 1e-15 * scale { break }
            for p in 0 ..< n {
                for q in p + 1 ..< n {
                    let apq = a[p * n + q]
                    if abs(apq) <= 1e-300 { continue }
                    let theta = (a[q * n + q] - a[p * n + p]) / (2 * apq)
                    let t = (theta >= 0 ? 1.0 : -1.0) / (abs(theta) + (theta * theta + 1).squareRoot())
                    let c = 1 / (t * t + 1).squareRoot(), s = t * c
                    for k in 0 ..< n {
                        let akp = a[k * n + p], akq = a[k * n + q]
                        a[k * n + p] = c * akp - s * akq
                        a[k * n + q] = s * akp + c * akq
                    }
                    for k in 0 ..< n {
                        let apk = a[p * n + k], aqk = a[q * n + k]
                        a[p * n + k] = c * apk - s * aqk
                        a[q * n + k] = s * apk + c * aqk
                    }
                    for k in 0 ..< n {
                        let vkp = v[k * n + p], vkq = v[k * n + q]
                        v[k * n + p] = c * vkp - s * vkq
                        v[k * n + q] = s * vkp + c * vkq
                    }
                }
            }
        }
        // Columns of v are eigenvectors; order by eigenvalue, largest first.
        let order = (0 ..< n).sorted { a[$0 * n + $0] > a[$1 * n + $1] }
        var vectors = [Double](repeating: 0, count: n * n)
        for (row, col) in order.enumerated() { for k in 0 ..< n { vectors[row * n + k] = v[k * n + col] } }
        return (order.map { a[$0 * n + $0] }, vectors)
    }
}
