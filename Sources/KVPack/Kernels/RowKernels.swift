import CKVKernels
/// Dense-row kernels over f32, f16 and bf16 rows, read in place. The raw scheme uses them for
/// sealed blocks and every stream uses them for its tail rows.
///
/// Rows of f16/bf16 are converted once per token into a stack row and then scored against all
/// queries of the GQA group, so conversion cost is paid once per token, not once per query.
public enum RowKernels {
    // MARK: Vector primitives (f32)

    @inlinable
    public static func dot(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ n: Int) -> Float {
        if rowsInC { return kvk_dot(a, b, n) }
        return dotInSwift(a, b, n)
    }

    /// `dot` in Swift: what machines without AVX2 + FMA + F16C run, and what tests hold the C one to.
    @usableFromInline static func dotInSwift(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ n: Int) -> Float {
        var acc0 = SIMD8<Float>(), acc1 = SIMD8<Float>()
        let ra = UnsafeRawPointer(a), rb = UnsafeRawPointer(b)
        var i = 0
        while i + 16 <= n {
            acc0.addProduct(ra.loadUnaligned(fromByteOffset: 4 * i, as: SIMD8<Float>.self),
                            rb.loadUnaligned(fromByteOffset: 4 * i, as: SIMD8<Float>.self))
            acc1.addProduct(ra.loadUnaligned(fromByteOffset: 4 * i + 32, as: SIMD8<Float>.self),
                            rb.loadUnaligned(fromByteOffset: 4 * i + 32, as: SIMD8<Float>.self))
            i += 16
        }
        if i + 8 <= n {
            acc0.addProduct(ra.loadUnaligned(fromByteOffset: 4 * i, as: SIMD8<Float>.self),
                            rb.loadUnaligned(fromByteOffset: 4 * i, as: SIMD8<Float>.self))
            i += 8
        }
        var s = (acc0 + acc1).sum()
        while i < n {
            s += a[i] * b[i]
            i += 1
        }
        return s
    }

    /// y += alpha * x
    @inlinable
    public static func axpy(_ alpha: Float, _ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, _ n: Int) {
        if rowsInC { return kvk_axpy(alpha, x, y, n) }
        axpyInSwift(alpha, x, y, n)
    }

    @usableFromInline static func axpyInSwift(_ alpha: Float, _ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, _ n: Int) {
        let rx = UnsafeRawPointer(x), ry = UnsafeMutableRawPointer(y)
        let a = SIMD8<Float>(repeating: alpha)
        var i = 0
        while i + 8 <= n {
            var v = ry.loadUnaligned(fromByteOffset: 4 * i, as: SIMD8<Float>.self)
            v.addProduct(a, rx.loadUnaligned(fromByteOffset: 4 * i, as: SIMD8<Float>.self))
            ry.storeBytes(of: v, toByteOffset: 4 * i, as: SIMD8<Float>.self)
            i += 8
        }
        while i < n {
            y[i] += alpha * x[i]
            i += 1
        }
    }

    static func scale(_ y: UnsafeMutablePointer<Float>, by factor: Float, _ n: Int) {
        for i in 0 ..< n { y[i] *= factor }
    }

    static func scaled(_ x: UnsafePointer<Float>, by factor: Float, into y: UnsafeMutablePointer<Float>, count: Int) {
        for i in 0 ..< count { y[i] = x[i] * factor }
    }

    // MARK: Element conversion

    public static func widenFloat16(_ src: UnsafeRawPointer, _ dst: UnsafeMutablePointer<Float>, _ n: Int) {
        if rowsInC { return kvk_widen_f16(src, dst, n) }
        widenFloat16InSwift(src, dst, n)
    }

    static func widenFloat16InSwift(_ src: UnsafeRawPointer, _ dst: UnsafeMutablePointer<Float>, _ n: Int) {
        let rd = UnsafeMutableRawPointer(dst)
        var i = 0
        while i + 8 <= n {
            let h = src.loadUnaligned(fromByteOffset: 2 * i, as: SIMD8<Float16>.self)
            rd.storeBytes(of: SIMD8<Float>(h), toByteOffset: 4 * i, as: SIMD8<Float>.self)
            i += 8
        }
        while i < n {
            dst[i] = Float(src.loadUnaligned(fromByteOffset: 2 * i, as: Float16.self))
            i += 1
        }
    }

    @inline(__always)
    static func widenBFloat16(_ src: UnsafeRawPointer, _ dst: UnsafeMutablePointer<Float>, _ n: Int) {
        let rd = UnsafeMutableRawPointer(dst)
        var i = 0
        while i + 8 <= n {
            let h = src.loadUnaligned(fromByteOffset: 2 * i, as: SIMD8<UInt16>.self)
            let w = SIMD8<UInt32>(truncatingIfNeeded: h) &<< 16
            rd.storeBytes(of: unsafeBitCast(w, to: SIMD8<Float>.self), toByteOffset: 4 * i, as: SIMD8<Float>.self)
            i += 8
        }
        while i < n {
            dst[i] = Float(bitPattern: UInt32(src.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)) << 16)
            i += 1
        }
    }

    /// Round-to-nearest-even f32 -> bf16; NaN stays NaN (quiet, sign kept).
    @inline(__always)
    static func bfloat16Bits(_ x: Float) -> UInt16 {
        let bits = x.bitPattern
        if x.isNaN { return UInt16(truncatingIfNeeded: bits >> 16) | 0x0040 }
        let rounding = UInt32(0x7FFF) + ((bits >> 16) & 1)
        return UInt16(truncatingIfNeeded: (bits &+ rounding) >> 16)
    }

    /// Writes `n` floats as `type` (f32, f16 or bf16), little-endian.
    public static func narrow(_ src: UnsafePointer<Float>, to type: ElementType, _ dst: UnsafeMutableRawPointer, _ n: Int) {
        switch type {
        case .float32:
            dst.copyMemory(from: src, byteCount: 4 * n)
        case .float16:
            var i = 0
            while i + 8 <= n {
                let v = UnsafeRawPointer(src).loadUnaligned(fromByteOffset: 4 * i, as: SIMD8<Float>.self)
                dst.storeBytes(of: SIMD8<Float16>(v), toByteOffset: 2 * i, as: SIMD8<Float16>.self)
                i += 8
            }
            while i < n {
                dst.storeBytes(of: Float16(src[i]), toByteOffset: 2 * i, as: Float16.self)
                i += 1
            }
        case .bfloat16:
            for i in 0 ..< n { dst.storeBytes(of: bfloat16Bits(src[i]), toByteOffset: 2 * i, as: UInt16.self) }
        default:
            preconditionFailure("rows are f32, f16 or bf16")
        }
    }

    /// Reads `n` elements of `type` as floats (from any alignment).
    @inline(__always)
    public static func widen(_ src: UnsafeRawPointer, from type: ElementType, _ dst: UnsafeMutablePointer<Float>, _ n: Int) {
        switch type {
        // A byte copy: the source need not be 4-byte aligned (rows inside another program's file).
        case .float32: UnsafeMutableRawPointer(dst).copyMemory(from: src, byteCount: 4 * n)
        case .float16: widenFloat16(src, dst, n)
        case .bfloat16: widenBFloat16(src, dst, n)
        default: preconditionFailure("rows are f32, f16 or bf16")
        }
    }

    // MARK: Attention over rows

    /// Visits rows [tokens] of a row-major `type` array as f32 rows: f32 rows in place,
    /// others widened into one reused stack row.
    @inline(__always)
    static func forEachRow(_ rows: UnsafeRawPointer, type: ElementType, dim: Int, tokens: Range<Int>,
                           _ body: (Int, UnsafePointer<Float>) -> Void) {
        let rowBytes = dim * type.byteWidth
        if type == .float32 {
            for t in tokens { body(t, (rows + t * rowBytes).assumingMemoryBound(to: Float.self)) }
            return
        }
        withUnsafeTemporaryAllocation(of: Float.self, capacity: dim) { scratch in
            let row = scratch.baseAddress!
            if type == .float16 {
                for t in tokens {
                    widenFloat16(rows + t * rowBytes, row, dim)
                    body(t, row)
                }
            } else {
                for t in tokens {
                    widenBFloat16(rows + t * rowBytes, row, dim)
                    body(t, row)
                }
            }
        }
    }

    /// Calls `body(firstToken, count, tile)` for runs of rows [tokens] as f32 tiles: f32 rows in
    /// place, others widened into one stack tile of `TileKernels.tileRows(dim:)` rows.
    @inline(__always)
    static func forEachTile(_ rows: UnsafeRawPointer, type: ElementType, dim: Int, tokens: Range<Int>,
                            _ body: (Int, Int, UnsafePointer<Float>) -> Void) {
        let rowBytes = dim * type.byteWidth, per = TileKernels.tileRows(dim: dim)
        if type == .float32 {
            var t = tokens.lowerBound
            while t < tokens.upperBound {
                let n = min(per, tokens.upperBound - t)
                body(t, n, (rows + t * rowBytes).assumingMemoryBound(to: Float.self))
                t += n
            }
            return
        }
        TileKernels.byTiles(dim: dim, tokens: tokens, decode: { widen(rows + $0.lowerBound * rowBytes, from: type, $1, $0.count * dim) }, body)
    }

    /// Whether the C row kernels (rows.c) run here for rows of `dim` elements: AVX2 + FMA + F16C,
    /// and whole 8-element chunks. They give the tile kernels' bits, with the rows widened (or,
    /// for nsn, decoded) in registers instead of through a tile.
    @inline(__always)
    static func inC(dim: Int) -> Bool { rowsInC && dim % 8 == 0 }

    @usableFromInline static let rowsInC = kvk_rows_available() != 0
    /// The C variant the row kernels run (`kvk_rows_isa`: 1 AVX2, 2 AVX-512 VL registers).
    static let rowsISA = kvk_rows_isa()

    /// The C kernels' row type for rows of `type` where they run here, else nil.
    @inline(__always)
    static func inC(_ type: ElementType, dim: Int) -> Int32? {
        guard inC(dim: dim) else { return nil }
        switch type {
        case .float32: return 0
        case .float16: return 1
        case .bfloat16: return 2
        default: return nil
        }
    }

    /// `isa`: the C variant (0 the machine's; tests ask for each, see `kvk_rows_isa`).
    static func scores(rows: UnsafeRawPointer, type: ElementType, dim: Int, tokens: Range<Int>,
                       queries: UnsafePointer<Float>, groupSize: Int,
                       into out: UnsafeMutablePointer<Float>, stride: Int, isa: Int32 = 0) {
        let base = tokens.lowerBound
        if let t = inC(type, dim: dim) {
            _ = kvk_rows_scores(rows + base * dim * type.byteWidth, t, Int32(dim), tokens.count, queries, Int32(groupSize), out, stride, isa)
            return
        }
        scoresInSwift(rows: rows, type: type, dim: dim, tokens: tokens, queries: queries, groupSize: groupSize, into: out, stride: stride)
    }

    /// The Swift path of `scores` (machines without AVX2, and what tests hold the C one to).
    static func scoresInSwift(rows: UnsafeRawPointer, type: ElementType, dim: Int, tokens: Range<Int>,
                              queries: UnsafePointer<Float>, groupSize: Int,
                              into out: UnsafeMutablePointer<Float>, stride: Int) {
        let base = tokens.lowerBound
        guard dim % 8 == 0 else {
            forEachRow(rows, type: type, dim: dim, tokens: tokens) { t, k in
                for g in 0 ..< groupSize {
                    out[g * stride + (t - base)] = dot(queries + g * dim, k, dim)
                }
            }
            return
        }
        forEachTile(rows, type: type, dim: dim, tokens: tokens) { t, n, tile in
            TileKernels.scoresInSwift(tile: tile, count: n, dim: dim, queries: queries, groupSize: groupSize, into: out + (t - base), stride: stride)
        }
    }

    static func accumulate(rows: UnsafeRawPointer, type: ElementType, dim: Int, tokens: Range<Int>,
                           weights: UnsafePointer<Float>, stride: Int, groupSize: Int,
                           into acc: UnsafeMutablePointer<Float>, isa: Int32 = 0) {
        if let t = inC(type, dim: dim) {
            _ = kvk_rows_accumulate(rows + tokens.lowerBound * dim * type.byteWidth, t, Int32(dim), tokens.count, weights, stride,
                                    Int32(groupSize), acc, isa)
            return
        }
        accumulateInSwift(rows: rows, type: type, dim: dim, tokens: tokens, weights: weights, stride: stride, groupSize: groupSize, into: acc)
    }

    /// The Swift path of `accumulate`.
    static func accumulateInSwift(rows: UnsafeRawPointer, type: ElementType, dim: Int, tokens: Range<Int>,
                                  weights: UnsafePointer<Float>, stride: Int, groupSize: Int,
                                  into acc: UnsafeMutablePointer<Float>) {
        let base = tokens.lowerBound
        guard dim % 8 == 0 else {
            forEachRow(rows, type: type, dim: dim, tokens: tokens) { t, v in
                for g in 0 ..< groupSize {
                    axpy(weights[g * stride + (t - base)], v, acc + g * dim, dim)
                }
            }
            return
        }
        forEachTile(rows, type: type, dim: dim, tokens: tokens) { t, n, tile in
            TileKernels.accumulateInSwift(tile: tile, count: n, dim: dim, weights: weights + (t - base), stride: stride,
                                   groupSize: groupSize, into: acc)
        }
    }
}

extension ElementType {
    /// Little-endian bytes of `values` in this type (f32, f16 or bf16; rounding to nearest even).
    public func encode(_ values: [Float]) -> [UInt8] {
        precondition(isFloatingPoint, "only floating-point types encode floats")
        var out = [UInt8](repeating: 0, count: values.count * byteWidth)
        values.withUnsafeBufferPointer { src in
            out.withUnsafeMutableBytes { RowKernels.narrow(src.baseAddress!, to: self, $0.baseAddress!, values.count) }
        }
        return out
    }
}
