/// NSNQuant (2025): normalize, shift, normalize, then a randomized Hadamard rotation makes every
/// token's residual look like N(0, 1) samples, which one universal codebook (fitted once to
/// Gaussian samples, no calibration) quantizes 8 dimensions at a time.
///
/// Per token t of a block: n1 = |x|; x~ = x / n1; the block's mean mu of the x~ is subtracted;
/// n2 = |x~ - mu|; u = (x~ - mu) / n2; y = sqrt(d) * H D u (D: random signs from a seed, H: the
/// orthonormal Walsh-Hadamard transform, block-diagonal over power-of-two pieces when head_dim is
/// not a power of two); each 8-dim piece of y is stored as a codebook entry. Decoding inverts it:
/// x^ = n1 * (n2 * D H y^ / sqrt(d) + mu).
///
/// Parameters (24 bytes, Spec/ "Scheme 5: nsn"): bits u8 (1: one byte per 8 dims, an entry of a
/// 256 x 8 codebook; 2: a sign byte and a byte indexing a 256 x 8 codebook of magnitudes),
/// reserved 7 bytes, signSeed u64, codebookHash u64 (XXH3-64 of the codebook blob's bytes; a
/// mismatch is an error). One blob: the codebook, f32 [256, 8].
///
/// Block payload: n1 f16 [C], n2 f16 [C], mu f16 [d], then codes: C tokens x d/8 pieces x
/// (1 byte | 2 bytes: signs, magnitude index), token-major.
public struct NSNScheme: KVScheme {
    public static let kind = SchemeKind.nsn
    public static let specSyntax = "<1|2>[:seed<S>]"
    public static let summary = "NSNQuant: normalize-shift-normalize, random-sign Hadamard, then a universal Gaussian codebook per 8 dims (1 bit: 256 entries; 2 bits: 8 signs + 256 magnitudes); per token two f16 norms, per block the f16 mean; attention in the rotated domain"

    public static let pieceDim = 8
    public static let entries = 256
    /// The codebook recipe: k-means on Gaussian samples from this seed (`kvpack codebook`).
    public static let defaultCodebookSeed: UInt64 = 20_251_123
    public static let defaultSignSeed: UInt64 = 0x5EED_0F_516E5

    public let descriptor: SchemeDescriptor
    public let compressesBlocks = false
    public let bits: Int
    let headDim: Int
    let segmentTokens: Int
    let pieces: Int
    let codeBytes: Int
    /// 256 x 8 floats: entries (1 bit) or magnitudes (2 bits).
    let codebook: [Float]
    /// +1 / -1 per dimension.
    let signs: [Float]
    let search: NearestSearch
    /// Attention reads the codes in place with the C kernels (codewords decoded in registers);
    /// with `.exact` arithmetic, or without AVX2, codewords go through an f32 tile (the products
    /// are the same, the roundings of the token's norms differ: tests bound the difference).
    let codewordsInC: Bool
    /// For each sign byte, the 8 lanes' sign-bit masks (bit j of the byte -> bit 31 of lane j):
    /// one 8 KiB table, so a 2-bit codeword's signs cost a load and an XOR.
    static let signMasks: [SIMD8<UInt32>] = (0 ..< 256).map { b in
        (SIMD8<UInt32>(repeating: UInt32(b)) &>> SIMD8<UInt32>(0, 1, 2, 3, 4, 5, 6, 7) & 1) &<< 31
    }
    /// Power-of-two pieces of the block-diagonal Hadamard transform, as (start, size).
    let hadamardBlocks: [(Int, Int)]

    // MARK: Codebook

    /// k-means (Lloyd, 25 rounds) of `samples` N(0,1)^8 vectors drawn from SplitMix64(seed),
    /// started from the first 256 samples; for 2 bits the samples' absolute values (the
    /// magnitudes of a sign + magnitude code). Deterministic: the same bytes on every machine
    /// with IEEE floats (Spec/ gives the recipe).
    public static func fitCodebook(bits: Int, seed: UInt64, samples n: Int = 32768, rounds: Int = 25) -> [Float] {
        var rng = SplitMix64(seed: seed)
        let dim = pieceDim, k = entries
        var x = [Float](repeating: 0, count: n * dim)
        for i in 0 ..< n * dim {
            let g = Float(rng.nextGaussian())
            x[i] = bits == 2 ? abs(g) : g
        }
        var centres = Array(x[0 ..< k * dim])
        var assignment = [Int](repeating: 0, count: n)
        for _ in 0 ..< rounds {
            centres.withUnsafeBufferPointer { c in
                x.withUnsafeBufferPointer { xs in
                    for i in 0 ..< n { assignment[i] = nearest(xs.baseAddress! + i * dim, c.baseAddress!) }
                }
            }
            var sums = [Double](repeating: 0, count: k * dim), counts = [Int](repeating: 0, count: k)
            for i in 0 ..< n {
                counts[assignment[i]] += 1
                for j in 0 ..< dim { sums[assignment[i] * dim + j] += Double(x[i * dim + j]) }
            }
            for e in 0 ..< k where counts[e] > 0 {
                for j in 0 ..< dim { centres[e * dim + j] = Float(sums[e * dim + j] / Double(counts[e])) }
            }
        }
        return centres
    }

    nonisolated(unsafe) private static var cache: [UInt64: [Float]] = [:]
    private static let cacheLock = Lock()

    /// The default codebook for `bits`, fitted once per process.
    public static func defaultCodebook(bits: Int) -> [Float] {
        cacheLock.withLock {
            let key = UInt64(bits) << 56 ^ defaultCodebookSeed
            if let c = cache[key] { return c }
            let c = fitCodebook(bits: bits, seed: defaultCodebookSeed)
            cache[key] = c
            return c
        }
    }

    /// Index of the entry nearest to the 8 floats at `v` (squared distance; first on ties).
    @inline(__always)
    public static func nearest(_ v: UnsafePointer<Float>, _ codebook: UnsafePointer<Float>) -> Int {
        let x = UnsafeRawPointer(v).loadUnaligned(as: SIMD8<Float>.self)
        let c = UnsafeRawPointer(codebook)
        var best = 0
        var bestDistance = Float.infinity
        for e in 0 ..< entries {
            let diff = c.loadUnaligned(fromByteOffset: 32 * e, as: SIMD8<Float>.self) - x
            let dist = (diff * diff).sum()
            if dist < bestDistance { bestDistance = dist; best = e }
        }
        return best
    }

    /// Nearest-entry search laid out for SIMD: the codebook transposed (8 rows of 256) and each
    /// entry's half squared norm, so that nearest = argmax over e of x . c_e - |c_e|^2 / 2,
    /// eight entries per vector operation (about 10x the speed of 256 separate distances).
    public struct NearestSearch: Sendable {
        let transposed: [Float]
        let halfNorms: [Float]

        public init(codebook: [Float]) {
            var t = [Float](repeating: 0, count: 8 * 256), h = [Float](repeating: 0, count: 256)
            for e in 0 ..< 256 {
                for j in 0 ..< 8 {
                    t[j * 256 + e] = codebook[e * 8 + j]
                    h[e] += codebook[e * 8 + j] * codebook[e * 8 + j] / 2
                }
            }
            transposed = t
            halfNorms = h
        }

        public func nearest(_ x: UnsafePointer<Float>) -> Int {
            transposed.withUnsafeBytes { tb in
                halfNorms.withUnsafeBytes { hb in
                    let t = tb.baseAddress!, h = hb.baseAddress!
                    var best = SIMD8<Float>(repeating: -.infinity), bestBlock = SIMD8<Int32>(repeating: 0)
                    let x0 = SIMD8<Float>(repeating: x[0]), x1 = SIMD8<Float>(repeating: x[1]), x2 = SIMD8<Float>(repeating: x[2])
                    let x3 = SIMD8<Float>(repeating: x[3]), x4 = SIMD8<Float>(repeating: x[4]), x5 = SIMD8<Float>(repeating: x[5])
                    let x6 = SIMD8<Float>(repeating: x[6]), x7 = SIMD8<Float>(repeating: x[7])
                    @inline(__always) func row(_ j: Int, _ block: Int) -> SIMD8<Float> {
                        t.loadUnaligned(fromByteOffset: 1024 * j + 32 * block, as: SIMD8<Float>.self)
                    }
                    for block in 0 ..< 32 {
                        var score = -h.loadUnaligned(fromByteOffset: 32 * block, as: SIMD8<Float>.self)
                        score.addProduct(x0, row(0, block)); score.addProduct(x1, row(1, block))
                        score.addProduct(x2, row(2, block)); score.addProduct(x3, row(3, block))
                        score.addProduct(x4, row(4, block)); score.addProduct(x5, row(5, block))
                        score.addProduct(x6, row(6, block)); score.addProduct(x7, row(7, block))
                        let better = score .> best
                        best.replace(with: score, where: better)
                        bestBlock.replace(with: SIMD8<Int32>(repeating: Int32(block)), where: better)
                    }
                    var index = 0, value = -Float.infinity
                    for lane in 0 ..< 8 {
                        let e = Int(bestBlock[lane]) * 8 + lane
                        if best[lane] > value || (best[lane] == value && e < index) { value = best[lane]; index = e }
                    }
                    return index
                }
            }
        }
    }

    public static func codebookBlob(_ codebook: [Float]) -> Blob {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(codebook.count * 4)
        for v in codebook { withUnsafeBytes(of: v.bitPattern.littleEndian) { bytes += $0 } }
        return Blob(id: 0, kind: .codebook, elementType: .float32, shape: [entries, pieceDim], bytes: bytes)
    }

    // MARK: Spec

    public static func descriptor(bits: Int, signSeed: UInt64 = defaultSignSeed, codebook: Blob, residual: ElementType = .float16) -> SchemeDescriptor {
        var p: [UInt8] = [UInt8(bits), 0, 0, 0, 0, 0, 0, 0]
        withUnsafeBytes(of: signSeed.littleEndian) { p += $0 }
        withUnsafeBytes(of: Checksum.xxh3(codebook.bytes).littleEndian) { p += $0 }
        return SchemeDescriptor(kind: kind, residualType: residual, parameters: p)
    }

    public static func setup(arguments: [String], role: KVKind, geometry: ModelGeometry) throws -> SchemeSetup {
        guard let first = arguments.first, let bits = Int(first), bits == 1 || bits == 2 else {
            throw KVPackError.argument("nsn needs a width of 1 or 2 bits first, as in nsn:2, got \"nsn:\(arguments.joined(separator: ":"))\"")
        }
        var seed = defaultSignSeed
        for arg in arguments.dropFirst() {
            if arg.hasPrefix("seed"), let s = UInt64(arg.dropFirst(4)) { seed = s }
            else { throw KVPackError.argument("nsn: unknown argument \"\(arg)\" (expected seedS)") }
        }
        guard geometry.headDim % pieceDim == 0 else {
            throw KVPackError.argument("nsn quantizes 8 dimensions at a time and needs head_dim to be a multiple of 8, got \(geometry.headDim)")
        }
        let blob = codebookBlob(defaultCodebook(bits: bits))
        return SchemeSetup(descriptor: descriptor(bits: bits, signSeed: seed, codebook: blob), blobs: [blob])
    }

    // MARK: Codec

    public init(descriptor: SchemeDescriptor, context: SchemeContext) throws {
        let p = descriptor.parameters
        guard p.count == 24 else { throw KVPackError.invalid(nil, "parameters", "nsn takes 24 parameter bytes, found \(p.count)") }
        let bits = Int(p[0])
        guard bits == 1 || bits == 2 else { throw KVPackError.invalid(nil, "nsn.bits", "is \(bits), must be 1 or 2") }
        guard p[1 ..< 8].allSatisfy({ $0 == 0 }) else { throw KVPackError.invalid(nil, "nsn.reserved", "must be 0") }
        let d = context.headDim
        guard d % Self.pieceDim == 0 else { throw KVPackError.invalid(nil, "nsn", "needs head_dim to be a multiple of 8, the file has \(d)") }
        func u64(_ at: Int) -> UInt64 { (0 ..< 8).reduce(0) { $0 | UInt64(p[at + $1]) << (8 * UInt64($1)) } }
        let seed = u64(8), hash = u64(16)
        guard context.blobs.count == 1, let blob = context.blobs.first else {
            throw KVPackError.invalid(nil, "blobIDs", "nsn uses exactly one blob (the codebook), found \(context.blobs.count)")
        }
        guard blob.kind == .codebook, blob.elementType == .float32, blob.shape == [Self.entries, Self.pieceDim] else {
            throw KVPackError.invalid(nil, "nsn.codebook", "blob \(blob.id) is \(blob.kind) \(blob.elementType) \(blob.shape); expected a f32 codebook [256, 8]")
        }
        let actual = Checksum.xxh3(blob.bytes)
        guard actual == hash else {
            throw KVPackError.invalid(nil, "nsn.codebookHash", "the descriptor names codebook XXH3-64 \(String(hash, radix: 16)), blob \(blob.id) hashes to \(String(actual, radix: 16))")
        }
        var book = [Float](repeating: 0, count: Self.entries * Self.pieceDim)
        for i in book.indices {
            book[i] = Float(bitPattern: (0 ..< 4).reduce(UInt32(0)) { $0 | UInt32(blob.bytes[4 * i + $1]) << (8 * UInt32($1)) })
        }
        guard book.allSatisfy(\.isFinite) else { throw KVPackError.invalid(nil, "nsn.codebook", "blob \(blob.id) holds a non-finite entry") }
        self.descriptor = descriptor
        self.bits = bits
        headDim = d
        segmentTokens = context.segmentTokens
        pieces = d / Self.pieceDim
        codewordsInC = context.arithmetic == .fast && CodewordKernels.available(dim: d)
        codeBytes = pieces * bits
        codebook = book
        search = NearestSearch(codebook: book)
        var rng = SplitMix64(seed: seed)
        signs = (0 ..< d).map { _ in rng.next() >> 63 == 1 ? -1 : 1 }
        var blocks: [(Int, Int)] = []
        var start = 0, rest = d
        while rest > 0 {
            var size = 1
            while size * 2 <= rest { size *= 2 }
            blocks.append((start, size))
            start += size
            rest -= size
        }
        hadamardBlocks = blocks
    }

    public var specString: String {
        // The sign seed is parameter bytes 8..<16, read here rather than kept: one more stored
        // property measured nsn:1 attention 11% slower at 32K (the struct's layout), for a string.
        let seed = (0 ..< 8).reduce(UInt64(0)) { $0 | UInt64(descriptor.parameters[8 + $1]) << (8 * UInt64($1)) }
        return "nsn:\(bits)" + (seed == Self.defaultSignSeed ? "" : ":seed\(seed)")
    }

    public func encodedBlockSize(tokens: Int) -> Int { 4 * segmentTokens + 2 * headDim + segmentTokens * codeBytes }

    var meanOffset: Int { 4 * segmentTokens }
    var codesOffset: Int { 4 * segmentTokens + 2 * headDim }

    @inline(__always)
    func f16(_ p: UnsafeRawPointer, _ at: Int) -> Float { Float(Float16(bitPattern: p.loadUnaligned(fromByteOffset: at, as: UInt16.self))) }

    /// v <- H v (orthonormal, block-diagonal), in place: in C where it runs (the same bits;
    /// attention rotates every block's mean), else `hadamardInSwift`.
    func hadamard(_ v: UnsafeMutablePointer<Float>) {
        for (start, size) in hadamardBlocks where !CodewordKernels.hadamard(v + start, size: size, norm: 1 / Float(size).squareRoot()) {
            Self.hadamardInSwift(v + start, size: size)
        }
    }

    /// One power-of-two block of `hadamard`, in Swift.
    static func hadamardInSwift(_ x: UnsafeMutablePointer<Float>, size: Int) {
        var h = 1
        while h < size {
            var i = 0
            while i < size {
                for j in i ..< i + h {
                    let a = x[j], b = x[j + h]
                    x[j] = a + b
                    x[j + h] = a - b
                }
                i += 2 * h
            }
            h *= 2
        }
        let norm = 1 / Float(size).squareRoot()
        for j in 0 ..< size { x[j] *= norm }
    }

    /// The rotated, unit-variance form of a unit vector: sqrt(d) * H D u.
    func rotate(_ v: UnsafeMutablePointer<Float>) {
        for i in 0 ..< headDim { v[i] *= signs[i] }
        hadamard(v)
    }

    /// The inverse: D H v.
    func unrotate(_ v: UnsafeMutablePointer<Float>) {
        hadamard(v)
        for i in 0 ..< headDim { v[i] *= signs[i] }
    }

    /// The 8 floats of codeword `piece` of token t's codes.
    @inline(__always)
    func codeword(_ codes: UnsafeRawPointer, piece s: Int, book: UnsafeRawPointer, signs: UnsafeRawPointer) -> SIMD8<Float> {
        if bits == 1 {
            return book.loadUnaligned(fromByteOffset: 32 * Int(codes.load(fromByteOffset: s, as: UInt8.self)), as: SIMD8<Float>.self)
        }
        let signBits = codes.load(fromByteOffset: 2 * s, as: UInt8.self), m = codes.load(fromByteOffset: 2 * s + 1, as: UInt8.self)
        let magnitude = book.loadUnaligned(fromByteOffset: 32 * Int(m), as: SIMD8<UInt32>.self)
        // Sign bit j of the byte XORed into bit 31 of lane j: integer vector ops only (SIMD masks
        // and `replacing` compile to per-lane code here and cost 5x).
        let flip = signs.loadUnaligned(fromByteOffset: 32 * Int(signBits), as: SIMD8<UInt32>.self)
        return unsafeBitCast(magnitude ^ flip, to: SIMD8<Float>.self)
    }

    public func encode(rows: UnsafePointer<Float>, tokens: Int, into block: UnsafeMutableRawBufferPointer) {
        let out = block.baseAddress!, c = segmentTokens, d = headDim
        out.initializeMemory(as: UInt8.self, repeating: 0, count: block.count)
        withUnsafeTemporaryAllocation(of: Float.self, capacity: c * d + 2 * d + c) { tmp in
            let unit = tmp.baseAddress!, mean = unit + c * d, y = mean + d, n1 = y + d
            // Normalize.
            for t in 0 ..< c {
                var ss: Float = 0
                for i in 0 ..< d { let v = IntScheme.representable(rows[t * d + i]); unit[t * d + i] = v; ss += v * v }
                let n = min(ss.squareRoot(), 65504)
                n1[t] = n
                let inv: Float = n > 0 ? 1 / n : 0
                for i in 0 ..< d { unit[t * d + i] *= inv }
                out.storeBytes(of: Float16(n).bitPattern, toByteOffset: 2 * t, as: UInt16.self)
            }
            // Shift: the block mean, rounded to f16 as the decoder will see it.
            for i in 0 ..< d {
                var s: Float = 0
                for t in 0 ..< c { s += unit[t * d + i] }
                let m = Float16(s / Float(c))
                out.storeBytes(of: m.bitPattern, toByteOffset: meanOffset + 2 * i, as: UInt16.self)
                mean[i] = Float(m)
            }
            do {
                for t in 0 ..< c {
                    // Normalize again, rotate, scale to unit variance.
                    var ss: Float = 0
                    for i in 0 ..< d { y[i] = unit[t * d + i] - mean[i]; ss += y[i] * y[i] }
                    let n2 = ss.squareRoot()
                    out.storeBytes(of: Float16(n2).bitPattern, toByteOffset: 2 * (c + t), as: UInt16.self)
                    let scale: Float = n2 > 0 ? Float(d).squareRoot() / n2 : 0
                    for i in 0 ..< d { y[i] *= scale }
                    rotate(y)
                    let codes = out + codesOffset + t * codeBytes
                    for s in 0 ..< pieces {
                        let piece = y + s * Self.pieceDim
                        if bits == 1 {
                            codes.storeBytes(of: UInt8(search.nearest(piece)), toByteOffset: s, as: UInt8.self)
                        } else {
                            var signBits: UInt8 = 0
                            var magnitude = SIMD8<Float>()
                            for j in 0 ..< 8 {
                                if piece[j] < 0 { signBits |= 1 << UInt8(j) }
                                magnitude[j] = abs(piece[j])
                            }
                            let m = withUnsafePointer(to: &magnitude) { $0.withMemoryRebound(to: Float.self, capacity: 8) { search.nearest($0) } }
                            codes.storeBytes(of: signBits, toByteOffset: 2 * s, as: UInt8.self)
                            codes.storeBytes(of: UInt8(m), toByteOffset: 2 * s + 1, as: UInt8.self)
                        }
                    }
                }
            }
        }
    }

    public func validate(block: UnsafeRawBufferPointer, tokens: Int) throws {
        let p = block.baseAddress!
        for t in 0 ..< 2 * segmentTokens {
            let n = f16(p, 2 * t)
            guard n.isFinite, n >= 0 else {
                throw KVPackError(.corruptPayload, field: "BLCK.nsn.norms", "\(t < segmentTokens ? "n1" : "n2") of token \(t % segmentTokens) is \(n); norms must be finite and >= 0")
            }
        }
        for i in 0 ..< headDim where !f16(p, meanOffset + 2 * i).isFinite {
            throw KVPackError(.corruptPayload, field: "BLCK.nsn.mean", "mean[\(i)] is not finite")
        }
    }

    /// y^ of token t (rotated domain, unit variance) into `y`.
    @inline(__always)
    func codewords(_ p: UnsafeRawPointer, token t: Int, book: UnsafeRawPointer, signs: UnsafeRawPointer, into y: UnsafeMutablePointer<Float>) {
        let codes = p + codesOffset + t * codeBytes
        for s in 0 ..< pieces {
            UnsafeMutableRawPointer(y).storeBytes(of: codeword(codes, piece: s, book: book, signs: signs), toByteOffset: 32 * s, as: SIMD8<Float>.self)
        }
    }

    public func decode(block: UnsafeRawBufferPointer, tokens: Range<Int>, into out: UnsafeMutablePointer<Float>) {
        let p = block.baseAddress!, d = headDim, c = segmentTokens
        let invRoot = 1 / Float(d).squareRoot()
        codebook.withUnsafeBytes { book in
        Self.signMasks.withUnsafeBytes { signs in
            for (row, t) in tokens.enumerated() {
                let o = out + row * d
                codewords(p, token: t, book: book.baseAddress!, signs: signs.baseAddress!, into: o)
                unrotate(o)
                let n1 = f16(p, 2 * t), n2 = f16(p, 2 * (c + t))
                for i in 0 ..< d { o[i] = n1 * (n2 * (o[i] * invRoot) + f16(p, meanOffset + 2 * i)) }
            }
        }
        }
    }

    // MARK: Attention over codes

    /// The rotated queries (scaled, divided by sqrt(d)) of the whole group, then the unrotated
    /// scaled queries (for the mean term); then, for 1-bit codes read in C, one float saying
    /// whether the lookup table was built, and the table (`CodewordKernels.buildTable`). Codes
    /// are read in place by the C kernels (`codewordsInC`), or decoded a tile at a time in the
    /// rotated domain, codewords times their token's norms, for the shared tile kernels. The
    /// 1-bit per-query tables of earlier versions cost a scalar lookup per piece, query and token
    /// and measured slower than the tiles; the C table holds four heads per entry (one 16-byte
    /// load per piece and token) and is built only over spans where it pays (`tableTokens`).
    public func queryStateSize(groupSize g: Int) -> Int {
        2 * g * headDim + (usesTable ? 1 + CodewordKernels.tableFloats(groupSize: g, dim: headDim) : 0)
    }

    /// Whether 1-bit scores may come from the lookup table.
    var usesTable: Bool { codewordsInC && bits == 1 }

    /// Tokens from which the table pays for itself: building it costs 256 x head_dim
    /// multiply-adds per head, about what scoring a thousand tokens saves.
    static let tableTokens = 1024

    public func prepare(queries: UnsafePointer<Float>, groupSize g: Int, scale: Float, tokenCount: Int, into state: UnsafeMutablePointer<Float>) {
        prepare(queries: queries, groupSize: g, scale: scale, into: state)
        guard usesTable, tokenCount >= Self.tableTokens else { return }
        let flag = state + 2 * g * headDim
        codebook.withUnsafeBytes { book in
            CodewordKernels.buildTable(book: book.baseAddress!, queries: state, groupSize: g, dim: headDim, into: flag + 1)
        }
        flag.pointee = 1
    }

    public func prepare(queries: UnsafePointer<Float>, groupSize g: Int, scale: Float, into state: UnsafeMutablePointer<Float>) {
        let d = headDim, invRoot = 1 / Float(d).squareRoot()
        for q in 0 ..< g {
            let rotated = state + q * d, plain = state + (g + q) * d
            for i in 0 ..< d { plain[i] = queries[q * d + i] * scale; rotated[i] = plain[i] }
            // q . D H y = (H D q) . y: rotate the query once.
            rotate(rotated)
            for i in 0 ..< d { rotated[i] *= invRoot }
        }
        // No table for these queries (a table left by an earlier call must not be read).
        if usesTable { state[2 * g * d] = 0 }
    }

    /// Rows [t0, t0 + n) in the rotated domain, codeword times `factor(n1, n2)` of the token.
    @inline(__always)
    func rotatedRows(_ p: UnsafeRawPointer, book: UnsafeRawPointer, signs: UnsafeRawPointer, from t0: Int, count n: Int,
                     into tile: UnsafeMutablePointer<Float>, factor: (Float, Float) -> Float) {
        let c = segmentTokens, out = UnsafeMutableRawPointer(tile)
        for r in 0 ..< n {
            let t = t0 + r
            let f = SIMD8<Float>(repeating: factor(f16(p, 2 * t), f16(p, 2 * (c + t))))
            let codes = p + codesOffset + t * codeBytes
            let o = out + 4 * headDim * r
            for s in 0 ..< pieces { o.storeBytes(of: codeword(codes, piece: s, book: book, signs: signs) * f, toByteOffset: 32 * s, as: SIMD8<Float>.self) }
        }
    }

    /// `count` f16 values at byte `at` as floats (norms and means are stored consecutively).
    @inline(__always)
    func widen(_ p: UnsafeRawPointer, at: Int, count: Int, into out: UnsafeMutablePointer<Float>) {
        RowKernels.widenFloat16(p + at, out, count)
    }

    public func scores(block: UnsafeRawBufferPointer, tokens: Range<Int>, state: UnsafePointer<Float>, groupSize g: Int,
                       into scores: UnsafeMutablePointer<Float>, stride: Int) {
        let p = block.baseAddress!, d = headDim, lo = tokens.lowerBound, n = tokens.count
        codebook.withUnsafeBytes { book in
        Self.signMasks.withUnsafeBytes { signs in
            // Scratch floats, not a temporary allocation: above 1 KiB that is a malloc per block.
            ScratchFloats.with(g + d + 2 * n) { tmp in
                let meanTerms = tmp, mean = meanTerms + g, n1 = mean + d
                widen(p, at: meanOffset, count: d, into: mean)
                widen(p, at: 2 * lo, count: n, into: n1)
                // q . mu once per block and query.
                for q in 0 ..< g { meanTerms[q] = RowKernels.dot(state + (g + q) * d, mean, d) }
                if codewordsInC {
                    // score = (n1 n2) (q' . y) + n1 (q . mu), the dots read from the codes in place.
                    let n2 = n1 + n
                    widen(p, at: 2 * (segmentTokens + lo), count: n, into: n2)
                    let flag = state + 2 * g * d
                    if usesTable && flag.pointee == 1 {
                        CodewordKernels.tableDots(codes: p + codesOffset + lo * codeBytes, dim: d, count: n, table: flag + 1, groupSize: g,
                                                  into: scores, stride: stride)
                    } else {
                        CodewordKernels.dots(codes: p + codesOffset + lo * codeBytes, bits: bits, dim: d, count: n, book: book.baseAddress!,
                                             signs: signs.baseAddress!, queries: state, groupSize: g, into: scores, stride: stride)
                    }
                    CodewordKernels.normScores(scores, stride: stride, groupSize: g, n1: n1, n2: n2, meanTerms: meanTerms, count: n)
                    return
                }
                // score = n1 (n2 (q' . y) + q . mu) = q' . (n1 n2 y) + n1 (q . mu)
                TileKernels.byTiles(dim: d, tokens: tokens, decode: { range, tile in
                    rotatedRows(p, book: book.baseAddress!, signs: signs.baseAddress!, from: range.lowerBound, count: range.count, into: tile) { $0 * $1 }
                }) { t, n, tile in
                    TileKernels.scores(tile: tile, count: n, dim: d, queries: state, groupSize: g, into: scores + (t - lo), stride: stride)
                }
                for q in 0 ..< g { RowKernels.axpy(meanTerms[q], n1, scores + q * stride, n) }
            }
        }
        }
    }

    /// The accumulator is in the rotated domain (unit-variance codewords / sqrt(d), and the
    /// block mean rotated the same way) until `finishAccumulation` rotates it back.
    public func accumulate(block: UnsafeRawBufferPointer, tokens: Range<Int>, weights: UnsafePointer<Float>, stride: Int,
                           groupSize g: Int, into acc: UnsafeMutablePointer<Float>) {
        let p = block.baseAddress!, d = headDim, lo = tokens.lowerBound, n = tokens.count
        let invRoot = 1 / Float(d).squareRoot()
        codebook.withUnsafeBytes { book in
        Self.signMasks.withUnsafeBytes { signs in
            ScratchFloats.with(d + 2 * n + g * n) { tmp in
                let mean = tmp, n1 = mean + d
                widen(p, at: meanOffset, count: d, into: mean)
                widen(p, at: 2 * lo, count: n, into: n1)
                rotate(mean)
                if codewordsInC {
                    // v = n1 (n2 y / sqrt(d) + mu): each weight times its token's factor, then the
                    // codewords read from the codes in place.
                    let n2 = n1 + n, scaled = n2 + n
                    widen(p, at: 2 * (segmentTokens + lo), count: n, into: n2)
                    CodewordKernels.tokenWeights(weights, stride: stride, groupSize: g, n1: n1, n2: n2, invRoot: invRoot, count: n, into: scaled)
                    CodewordKernels.accumulate(codes: p + codesOffset + lo * codeBytes, bits: bits, dim: d, count: n, book: book.baseAddress!,
                                               signs: signs.baseAddress!, weights: scaled, stride: n, groupSize: g, into: acc)
                    for q in 0 ..< g { RowKernels.axpy(RowKernels.dot(weights + q * stride, n1, n), mean, acc + q * d, d) }
                    return
                }
                // v = n1 (n2 y / sqrt(d) + mu): the y part through the tile kernels, the mu part
                // as one weight per query.
                TileKernels.byTiles(dim: d, tokens: tokens, decode: { range, tile in
                    rotatedRows(p, book: book.baseAddress!, signs: signs.baseAddress!, from: range.lowerBound, count: range.count, into: tile) { $0 * ($1 * invRoot) }
                }) { t, n, tile in
                    TileKernels.accumulate(tile: tile, count: n, dim: d, weights: weights + (t - lo), stride: stride, groupSize: g, into: acc)
                }
                for q in 0 ..< g { RowKernels.axpy(RowKernels.dot(weights + q * stride, n1, n), mean, acc + q * d, d) }
            }
        }
        }
    }

    public func finishAccumulation(_ acc: UnsafeMutablePointer<Float>, groupSize g: Int) {
        for q in 0 ..< g { unrotate(acc + q * headDim) }
    }
}
