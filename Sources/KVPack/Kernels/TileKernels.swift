import CKVKernels

/// The two small matrix products of decode-step attention, over an f32 tile of rows in L1:
/// scores (queries x tile^T) and value accumulation (weights x tile). Every scheme's fast path
/// decodes a run of its rows into such a tile (codes unpacked once, whatever the GQA group size)
/// and hands it here, so the arithmetic is written once, with register blocking:
///
/// - scores: two queries x four tokens per pass (8 independent SIMD8 accumulators, enough to
///   cover the multiply-add latency), each query chunk loaded once per four tokens;
/// - accumulate: two queries x 32 channels per pass, the accumulators held in registers across
///   every token of the tile, each weight broadcast once.
///
/// Tiles are row-major, `dim` floats per row, `dim` a multiple of 8 (`scores(decodedBy:...)` and
/// `accumulate(decodedBy:...)` fall back to one row at a time otherwise). The kernels themselves
/// allocate nothing and take no closures; the tile walkers take the scheme's decoder as one.
public enum TileKernels {
    /// Rows per tile for head dimension `d`: about 16 KiB of f32, at most 64 rows.
    @inline(__always)
    public static func tileRows(dim d: Int) -> Int { min(64, max(4, 4096 / max(d, 1))) }

    /// Runs of rows [tokens] decoded by `decode` into one tile (the thread's scratch floats: a
    /// stack allocation of 16 KiB would be a malloc per block), then handed to `body` (first
    /// token, count, tile). For schemes whose fast path is "decode a tile, then the shared kernels".
    @inline(__always)
    public static func byTiles(dim d: Int, tokens: Range<Int>, decode: (Range<Int>, UnsafeMutablePointer<Float>) -> Void,
                               _ body: (Int, Int, UnsafePointer<Float>) -> Void) {
        let per = tileRows(dim: d)
        ScratchFloats.with(per * d) { tile in
            var t = tokens.lowerBound
            while t < tokens.upperBound {
                let n = min(per, tokens.upperBound - t)
                decode(t ..< t + n, tile)
                body(t, n, tile)
                t += n
            }
        }
    }

    /// Rows [tokens] decoded one at a time (head dimensions that are not a multiple of 8).
    @inline(__always)
    public static func byRows(dim d: Int, tokens: Range<Int>, decode: (Range<Int>, UnsafeMutablePointer<Float>) -> Void,
                              _ body: (Int, UnsafePointer<Float>) -> Void) {
        withUnsafeTemporaryAllocation(of: Float.self, capacity: d) { buffer in
            for t in tokens {
                decode(t ..< t + 1, buffer.baseAddress!)
                body(t, buffer.baseAddress!)
            }
        }
    }

    /// Scores of rows [tokens] that `decode` writes (block-relative token range, destination):
    /// a tile at a time, or one row at a time when `dim` is not a multiple of 8.
    /// out[q * stride + (t - tokens.lowerBound)] = queries[q] . row t.
    @inline(__always)
    public static func scores(decodedBy decode: (Range<Int>, UnsafeMutablePointer<Float>) -> Void, dim d: Int, tokens: Range<Int>,
                              queries: UnsafePointer<Float>, groupSize g: Int, into out: UnsafeMutablePointer<Float>, stride: Int) {
        let lo = tokens.lowerBound
        guard d % 8 == 0 else {
            return byRows(dim: d, tokens: tokens, decode: decode) { t, row in
                for q in 0 ..< g { out[q * stride + (t - lo)] = RowKernels.dot(queries + q * d, row, d) }
            }
        }
        byTiles(dim: d, tokens: tokens, decode: decode) { t, n, tile in
            scores(tile: tile, count: n, dim: d, queries: queries, groupSize: g, into: out + (t - lo), stride: stride)
        }
    }

    /// Accumulation of rows [tokens] that `decode` writes, as `scores(decodedBy:...)` walks them.
    @inline(__always)
    public static func accumulate(decodedBy decode: (Range<Int>, UnsafeMutablePointer<Float>) -> Void, dim d: Int, tokens: Range<Int>,
                                  weights: UnsafePointer<Float>, stride: Int, groupSize g: Int, into acc: UnsafeMutablePointer<Float>) {
        let lo = tokens.lowerBound
        guard d % 8 == 0 else {
            return byRows(dim: d, tokens: tokens, decode: decode) { t, row in
                for q in 0 ..< g { RowKernels.axpy(weights[q * stride + (t - lo)], row, acc + q * d, d) }
            }
        }
        byTiles(dim: d, tokens: tokens, decode: decode) { t, n, tile in
            accumulate(tile: tile, count: n, dim: d, weights: weights + (t - lo), stride: stride, groupSize: g, into: acc)
        }
    }

    // MARK: Scores

    /// out[q * stride + t] = queries[q] . tile[t] for t < count, q < groupSize. In C where the
    /// CPU has AVX2 + FMA (rows.c, the same bits), else `scoresInSwift`.
    @inline(__always)
    public static func scores(tile: UnsafePointer<Float>, count n: Int, dim d: Int, queries: UnsafePointer<Float>,
                              groupSize g: Int, into out: UnsafeMutablePointer<Float>, stride: Int) {
        if RowKernels.inC(dim: d) {
            _ = kvk_rows_scores(tile, 0, Int32(d), n, queries, Int32(g), out, stride, 0)
            return
        }
        scoresInSwift(tile: tile, count: n, dim: d, queries: queries, groupSize: g, into: out, stride: stride)
    }

    /// The Swift path of `scores` (what runs without AVX2, and what tests hold the C one to).
    public static func scoresInSwift(tile: UnsafePointer<Float>, count n: Int, dim d: Int, queries: UnsafePointer<Float>,
                                     groupSize g: Int, into out: UnsafeMutablePointer<Float>, stride: Int) {
        var q = 0
        while q + 2 <= g {
            scores2(tile: tile, count: n, dim: d, qa: queries + q * d, qb: queries + (q + 1) * d,
                    outA: out + q * stride, outB: out + (q + 1) * stride)
            q += 2
        }
        if q < g { scores1(tile: tile, count: n, dim: d, query: queries + q * d, out: out + q * stride) }
    }

    /// [a.sum(), b.sum(), c.sum(), e.sum()] with a transpose instead of four reductions.
    @inline(__always)
    static func sums(_ a: SIMD8<Float>, _ b: SIMD8<Float>, _ c: SIMD8<Float>, _ e: SIMD8<Float>) -> SIMD4<Float> {
        let a4 = a.lowHalf + a.highHalf, b4 = b.lowHalf + b.highHalf
        let c4 = c.lowHalf + c.highHalf, e4 = e.lowHalf + e.highHalf
        let ab = SIMD4(a4[0], a4[2], b4[0], b4[2]) + SIMD4(a4[1], a4[3], b4[1], b4[3])
        let ce = SIMD4(c4[0], c4[2], e4[0], e4[2]) + SIMD4(c4[1], c4[3], e4[1], e4[3])
        return SIMD4(ab[0], ab[2], ce[0], ce[2]) + SIMD4(ab[1], ab[3], ce[1], ce[3])
    }

    /// One lane of `sums`, with the same operations in the same order, so a token's score does
    /// not depend on whether it was scored in a group of four.
    @inline(__always)
    static func sum(_ a: SIMD8<Float>) -> Float {
        let a4 = a.lowHalf + a.highHalf
        return (a4[0] + a4[1]) + (a4[2] + a4[3])
    }

    @inline(__always)
    static func store(_ v: SIMD4<Float>, _ out: UnsafeMutablePointer<Float>) {
        UnsafeMutableRawPointer(out).storeBytes(of: v, as: SIMD4<Float>.self)
    }

    static func scores2(tile: UnsafePointer<Float>, count n: Int, dim d: Int, qa: UnsafePointer<Float>, qb: UnsafePointer<Float>,
                        outA: UnsafeMutablePointer<Float>, outB: UnsafeMutablePointer<Float>) {
        let rt = UnsafeRawPointer(tile), ra = UnsafeRawPointer(qa), rb = UnsafeRawPointer(qb)
        let rowBytes = 4 * d, end = 4 * d
        var t = 0
        while t + 4 <= n {
            let r0 = rt + t * rowBytes, r1 = r0 + rowBytes, r2 = r1 + rowBytes, r3 = r2 + rowBytes
            var a0 = SIMD8<Float>(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0
            var c = 0
            while c < end {
                let x = ra.loadUnaligned(fromByteOffset: c, as: SIMD8<Float>.self)
                let y = rb.loadUnaligned(fromByteOffset: c, as: SIMD8<Float>.self)
                let k0 = r0.loadUnaligned(fromByteOffset: c, as: SIMD8<Float>.self)
                let k1 = r1.loadUnaligned(fromByteOffset: c, as: SIMD8<Float>.self)
                let k2 = r2.loadUnaligned(fromByteOffset: c, as: SIMD8<Float>.self)
                let k3 = r3.loadUnaligned(fromByteOffset: c, as: SIMD8<Float>.self)
                a0.addProduct(x, k0); a1.addProduct(x, k1); a2.addProduct(x, k2); a3.addProduct(x, k3)
                b0.addProduct(y, k0); b1.addProduct(y, k1); b2.addProduct(y, k2); b3.addProduct(y, k3)
                c += 32
            }
            store(sums(a0, a1, a2, a3), outA + t)
            store(sums(b0, b1, b2, b3), outB + t)
            t += 4
        }
        while t < n {
            let r = rt + t * rowBytes
            var a = SIMD8<Float>(), b = a
            var c = 0
            while c < end {
                let k = r.loadUnaligned(fromByteOffset: c, as: SIMD8<Float>.self)
                a.addProduct(ra.loadUnaligned(fromByteOffset: c, as: SIMD8<Float>.self), k)
                b.addProduct(rb.loadUnaligned(fromByteOffset: c, as: SIMD8<Float>.self), k)
                c += 32
            }
            outA[t] = sum(a)
            outB[t] = sum(b)
            t += 1
        }
    }

    static func scores1(tile: UnsafePointer<Float>, count n: Int, dim d: Int, query: UnsafePointer<Float>,
                        out: UnsafeMutablePointer<Float>) {
        let rt = UnsafeRawPointer(tile), ra = UnsafeRawPointer(query)
        let rowBytes = 4 * d, end = 4 * d
        var t = 0
        while t + 4 <= n {
            let r0 = rt + t * rowBytes, r1 = r0 + rowBytes, r2 = r1 + rowBytes, r3 = r2 + rowBytes
            var a0 = SIMD8<Float>(), a1 = a0, a2 = a0, a3 = a0
            var c = 0
            while c < end {
                let x = ra.loadUnaligned(fromByteOffset: c, as: SIMD8<Float>.self)
                a0.addProduct(x, r0.loadUnaligned(fromByteOffset: c, as: SIMD8<Float>.self))
                a1.addProduct(x, r1.loadUnaligned(fromByteOffset: c, as: SIMD8<Float>.self))
                a2.addProduct(x, r2.loadUnaligned(fromByteOffset: c, as: SIMD8<Float>.self))
                a3.addProduct(x, r3.loadUnaligned(fromByteOffset: c, as: SIMD8<Float>.self))
                c += 32
            }
            store(sums(a0, a1, a2, a3), out + t)
            t += 4
        }
        while t < n {
            let r = rt + t * rowBytes
            var a = SIMD8<Float>()
            var c = 0
            while c < end {
                a.addProduct(ra.loadUnaligned(fromByteOffset: c, as: SIMD8<Float>.self), r.loadUnaligned(fromByteOffset: c, as: SIMD8<Float>.self))
                c += 32
            }
            out[t] = sum(a)
            t += 1
        }
    }

    // MARK: Accumulation

    /// acc[q * dim + c] += weights[q * stride + t] * tile[t * dim + c] for t = 0, 1, ... in order.
    ///
    /// Each accumulator is loaded into a register, receives one fused multiply-add per token in
    /// token order and is stored back: bit for bit what a multiply-add into memory per token
    /// gives, however the caller splits tokens into tiles and calls. That keeps attention
    /// independent of where blocks, tail pieces and appended rows begin, so a resumed
    /// conversation reproduces an uninterrupted one exactly.
    @inline(__always)
    public static func accumulate(tile: UnsafePointer<Float>, count n: Int, dim d: Int, weights: UnsafePointer<Float>,
                                  stride: Int, groupSize g: Int, into acc: UnsafeMutablePointer<Float>) {
        if RowKernels.inC(dim: d) {
            _ = kvk_rows_accumulate(tile, 0, Int32(d), n, weights, stride, Int32(g), acc, 0)
            return
        }
        accumulateInSwift(tile: tile, count: n, dim: d, weights: weights, stride: stride, groupSize: g, into: acc)
    }

    /// The Swift path of `accumulate`.
    public static func accumulateInSwift(tile: UnsafePointer<Float>, count n: Int, dim d: Int, weights: UnsafePointer<Float>,
                                         stride: Int, groupSize g: Int, into acc: UnsafeMutablePointer<Float>) {
        var q = 0
        while q < g {
            let wa = weights + q * stride, accA = acc + q * d
            var c = 0
            if q + 2 <= g && d % 32 == 0 {
                while c < d {
                    accumulate2x32(tile: tile, count: n, dim: d, channel: c, wa: wa, wb: wa + stride, accA: accA, accB: accA + d)
                    c += 32
                }
                q += 2
                continue
            }
            while c + 64 <= d {
                accumulate1x64(tile: tile, count: n, dim: d, channel: c, w: wa, acc: accA)
                c += 64
            }
            while c < d {
                accumulate1x8(tile: tile, count: n, dim: d, channel: c, w: wa, acc: accA)
                c += 8
            }
            q += 1
        }
    }

    @inline(__always)
    static func load(_ acc: UnsafeMutablePointer<Float>, _ c: Int) -> SIMD8<Float> {
        UnsafeRawPointer(acc + c).loadUnaligned(as: SIMD8<Float>.self)
    }

    @inline(__always)
    static func store(_ v: SIMD8<Float>, _ acc: UnsafeMutablePointer<Float>, _ c: Int) {
        UnsafeMutableRawPointer(acc + c).storeBytes(of: v, as: SIMD8<Float>.self)
    }

    static func accumulate2x32(tile: UnsafePointer<Float>, count n: Int, dim d: Int, channel c: Int,
                               wa: UnsafePointer<Float>, wb: UnsafePointer<Float>,
                               accA: UnsafeMutablePointer<Float>, accB: UnsafeMutablePointer<Float>) {
        var a0 = load(accA, c), a1 = load(accA, c + 8), a2 = load(accA, c + 16), a3 = load(accA, c + 24)
        var b0 = load(accB, c), b1 = load(accB, c + 8), b2 = load(accB, c + 16), b3 = load(accB, c + 24)
        var r = UnsafeRawPointer(tile + c)
        let rowBytes = 4 * d
        for t in 0 ..< n {
            let v0 = r.loadUnaligned(as: SIMD8<Float>.self)
            let v1 = r.loadUnaligned(fromByteOffset: 32, as: SIMD8<Float>.self)
            let v2 = r.loadUnaligned(fromByteOffset: 64, as: SIMD8<Float>.self)
            let v3 = r.loadUnaligned(fromByteOffset: 96, as: SIMD8<Float>.self)
            let x = SIMD8<Float>(repeating: wa[t]), y = SIMD8<Float>(repeating: wb[t])
            a0.addProduct(x, v0); a1.addProduct(x, v1); a2.addProduct(x, v2); a3.addProduct(x, v3)
            b0.addProduct(y, v0); b1.addProduct(y, v1); b2.addProduct(y, v2); b3.addProduct(y, v3)
            r += rowBytes
        }
        store(a0, accA, c); store(a1, accA, c + 8); store(a2, accA, c + 16); store(a3, accA, c + 24)
        store(b0, accB, c); store(b1, accB, c + 8); store(b2, accB, c + 16); store(b3, accB, c + 24)
    }

    static func accumulate1x64(tile: UnsafePointer<Float>, count n: Int, dim d: Int, channel c: Int,
                               w: UnsafePointer<Float>, acc: UnsafeMutablePointer<Float>) {
        var a0 = load(acc, c), a1 = load(acc, c + 8), a2 = load(acc, c + 16), a3 = load(acc, c + 24)
        var a4 = load(acc, c + 32), a5 = load(acc, c + 40), a6 = load(acc, c + 48), a7 = load(acc, c + 56)
        var r = UnsafeRawPointer(tile + c)
        let rowBytes = 4 * d
        for t in 0 ..< n {
            let x = SIMD8<Float>(repeating: w[t])
            a0.addProduct(x, r.loadUnaligned(as: SIMD8<Float>.self))
            a1.addProduct(x, r.loadUnaligned(fromByteOffset: 32, as: SIMD8<Float>.self))
            a2.addProduct(x, r.loadUnaligned(fromByteOffset: 64, as: SIMD8<Float>.self))
            a3.addProduct(x, r.loadUnaligned(fromByteOffset: 96, as: SIMD8<Float>.self))
            a4.addProduct(x, r.loadUnaligned(fromByteOffset: 128, as: SIMD8<Float>.self))
            a5.addProduct(x, r.loadUnaligned(fromByteOffset: 160, as: SIMD8<Float>.self))
            a6.addProduct(x, r.loadUnaligned(fromByteOffset: 192, as: SIMD8<Float>.self))
            a7.addProduct(x, r.loadUnaligned(fromByteOffset: 224, as: SIMD8<Float>.self))
            r += rowBytes
        }
        store(a0, acc, c); store(a1, acc, c + 8); store(a2, acc, c + 16); store(a3, acc, c + 24)
        store(a4, acc, c + 32); store(a5, acc, c + 40); store(a6, acc, c + 48); store(a7, acc, c + 56)
    }

    static func accumulate1x8(tile: UnsafePointer<Float>, count n: Int, dim d: Int, channel c: Int,
                              w: UnsafePointer<Float>, acc: UnsafeMutablePointer<Float>) {
        var a = load(acc, c)
        var r = UnsafeRawPointer(tile + c)
        let rowBytes = 4 * d
        for t in 0 ..< n {
            a.addProduct(SIMD8(repeating: w[t]), r.loadUnaligned(as: SIMD8<Float>.self))
            r += rowBytes
        }
        store(a, acc, c)
    }

    // MARK: Softmax

    /// e^x for each lane, to about 2 ulp over the range softmax uses (x <= 0): Cephes' expf,
    /// range-reduced by the round-to-nearest magic-number trick so it stays in vector registers
    /// (Swift's float-to-int SIMD conversions and clamps compile to calls). Inputs below -80 give
    /// 0: their weights (under 2e-35 of the largest) are far below f32's resolution of the sum,
    /// and near-subnormal weights made every later product a slow microcode assist (measured:
    /// the softmax step 3x slower on wide score ranges). Inputs are <= 0 (score minus running
    /// max); above 88 the result is meaningless, and a NaN score gives meaningless weights,
    /// never a trap.
    @inline(__always)
    public static func exp(_ x: SIMD8<Float>) -> SIMD8<Float> {
        let magic = SIMD8<Float>(repeating: 12_582_912)   // 1.5 * 2^23: adding it rounds to an integer
        // Lanes below -80, found in integer registers (SIMD comparisons of floats compile to
        // calls): negative with a magnitude above 80's. They are computed as exp(0) and zeroed.
        let ix = unsafeBitCast(x, to: SIMD8<Int32>.self)
        let below = (ix &>> 31) & ((SIMD8(repeating: 0x42A0_0000) &- (ix & SIMD8(repeating: 0x7FFF_FFFF))) &>> 31)
        let clamped = unsafeBitCast(ix & ~below, to: SIMD8<Float>.self)
        // Fused multiply-adds (addingProduct), as the C softmax computes them: the same bits.
        let shifted = magic.addingProduct(clamped, SIMD8(repeating: 1.442_695_04))
        let n = shifted - magic
        var r = clamped.addingProduct(-n, SIMD8(repeating: 0.693_359_375))
        r = r.addingProduct(-n, SIMD8(repeating: -2.121_944_4e-4))
        var p = SIMD8<Float>(repeating: 1.987_569_15e-4)
        p = SIMD8(repeating: 1.398_199_95e-3).addingProduct(p, r)
        p = SIMD8(repeating: 8.333_451_9e-3).addingProduct(p, r)
        p = SIMD8(repeating: 4.166_579_6e-2).addingProduct(p, r)
        p = SIMD8(repeating: 1.666_666_55e-1).addingProduct(p, r)
        p = SIMD8(repeating: 5.000_000_1e-1).addingProduct(p, r)
        let y = r.addingProduct(p, r * r) + SIMD8(repeating: 1)
        let bits = unsafeBitCast(shifted, to: SIMD8<Int32>.self) &- SIMD8(repeating: 0x4B40_0000)
        let scale = unsafeBitCast((bits &+ SIMD8(repeating: 127)) &<< 23, to: SIMD8<Float>.self)
        return unsafeBitCast(unsafeBitCast(y * scale, to: SIMD8<Int32>.self) & ~below, to: SIMD8<Float>.self)
    }
}
