import Foundation
import Testing
@testable import KVPack

/// The shared attention kernels against plain loops, and the properties exact resume relies on.
struct TileKernelTests {
    static func randomFloats(_ n: Int, _ rng: inout SplitMix64) -> [Float] { (0 ..< n).map { _ in Float(rng.nextGaussian()) } }

    @Test("tile scores and accumulation equal plain loops for every group size, width and row count",
          arguments: [(1, 8), (2, 8), (3, 64), (4, 128), (5, 40), (4, 96), (7, 256)])
    func matchesPlainLoops(group g: Int, dim d: Int) {
        var rng = SplitMix64(seed: UInt64(g * 1000 + d))
        for n in [1, 3, 4, 5, 17, 64] {
            let tile = Self.randomFloats(n * d, &rng), queries = Self.randomFloats(g * d, &rng)
            let stride = n + 3
            var scores = [Float](repeating: .nan, count: g * stride)
            TileKernels.scores(tile: tile, count: n, dim: d, queries: queries, groupSize: g, into: &scores, stride: stride)
            let weights = Self.randomFloats(g * stride, &rng)
            let start = Self.randomFloats(g * d, &rng)
            var acc = start
            TileKernels.accumulate(tile: tile, count: n, dim: d, weights: weights, stride: stride, groupSize: g, into: &acc)
            for q in 0 ..< g {
                for t in 0 ..< n {
                    var s: Double = 0
                    for c in 0 ..< d { s += Double(queries[q * d + c]) * Double(tile[t * d + c]) }
                    #expect(abs(Double(scores[q * stride + t]) - s) <= 1e-5 * max(1, abs(s)) * Double(d).squareRoot(), "g \(g) d \(d) n \(n) q \(q) t \(t)")
                }
                // Lanes past `count` are not written.
                for t in n ..< stride { #expect(scores[q * stride + t].isNaN) }
                for c in 0 ..< d {
                    var s = Double(start[q * d + c])
                    for t in 0 ..< n { s += Double(weights[q * stride + t]) * Double(tile[t * d + c]) }
                    #expect(abs(Double(acc[q * d + c]) - s) <= 1e-5 * max(1, abs(s)) * Double(n).squareRoot(), "g \(g) d \(d) n \(n)")
                }
            }
        }
    }

    /// The C variants that run here (1 AVX2; 2 also where AVX-512 VL is): each is held to the bits.
    static var rowVariants: [Int32] { RowKernels.rowsInC ? Array(1 ... max(1, RowKernels.rowsISA)) : [] }

    @Test("the C row kernels (each variant that runs here) give the Swift tile kernels' bits for f32, f16 and bf16 rows",
          arguments: [ElementType.float32, .float16, .bfloat16])
    func rowKernelsInCAgree(type: ElementType) {
        for isa in Self.rowVariants { rowKernelsInCAgree(type: type, isa: isa) }
    }

    func rowKernelsInCAgree(type: ElementType, isa: Int32) {
        var rng = SplitMix64(seed: UInt64(type.rawValue) * 77)
        // Widths with passes of 32, 16 and 8 channels; row counts with steps of 4 (AVX-512), 3 (AVX2), 2 and 1 rows.
        for (g, d) in [(1, 8), (2, 16), (3, 64), (4, 128), (5, 40), (3, 48), (8, 128), (9, 64), (4, 256)] {
            for (first, n) in [(0, 1), (0, 2), (0, 3), (3, 5), (1, 17), (0, 64), (7, 57)] {
                let count = first + n, stride = n + 3
                // Rows in the type's bytes, with zeros, signed zeros and large values among them.
                var values = Self.randomFloats(count * d, &rng).map { $0 * 30 }
                for i in Swift.stride(from: 0, to: values.count, by: 13) { values[i] = i % 2 == 0 ? 0 : -0.0 }
                let rows = type.encode(values)
                let queries = Self.randomFloats(g * d, &rng)
                let weights = Self.randomFloats(g * stride, &rng).map { abs($0) }
                let start = Self.randomFloats(g * d, &rng)
                var fast = [Float](repeating: .nan, count: g * stride), slow = fast
                var accFast = start, accSlow = start
                rows.withUnsafeBytes { r in
                    let p = r.baseAddress!
                    RowKernels.scores(rows: p, type: type, dim: d, tokens: first ..< count, queries: queries, groupSize: g, into: &fast, stride: stride,
                                      isa: isa)
                    RowKernels.scoresInSwift(rows: p, type: type, dim: d, tokens: first ..< count, queries: queries, groupSize: g,
                                             into: &slow, stride: stride)
                    RowKernels.accumulate(rows: p, type: type, dim: d, tokens: first ..< count, weights: weights, stride: stride,
                                          groupSize: g, into: &accFast, isa: isa)
                    RowKernels.accumulateInSwift(rows: p, type: type, dim: d, tokens: first ..< count, weights: weights, stride: stride,
                                                 groupSize: g, into: &accSlow)
                }
                // NaN lanes (not written) compare equal by bit pattern too.
                let same = fast.map { $0.bitPattern } == slow.map { $0.bitPattern }
                let sameAcc = accFast.map { $0.bitPattern } == accSlow.map { $0.bitPattern }
                let written = fast.contains { !$0.isNaN }
                #expect(same, "scores: \(type) isa \(isa) g \(g) d \(d) rows \(first)..<\(count)")
                #expect(sameAcc, "accumulators: \(type) isa \(isa) g \(g) d \(d) rows \(first)..<\(count)")
                #expect(written)
            }
        }
    }

    @Test("the nsn codeword kernels (each variant that runs here) give the bits of the Swift tile kernels over the decoded codewords",
          arguments: [1, 2])
    func codewordKernelsAgree(bits: Int) {
        var rng = SplitMix64(seed: UInt64(bits) * 31)
        let book = Self.randomFloats(256 * 8, &rng).map { bits == 2 ? abs($0) : $0 }
        let signs = NSNScheme.signMasks
        for isa in Self.rowVariants {
            for (g, d) in [(1, 8), (3, 48), (4, 64), (4, 128), (5, 40), (8, 256)] {
                for n in [1, 3, 6, 64, 65] {
                    let pieces = d / 8, stride = n + 2
                    let codes = (0 ..< n * pieces * bits).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
                    // The codewords as f32 rows: book[code], or book[magnitude] with the sign byte's bits as signs.
                    var rows = [Float](repeating: 0, count: n * d)
                    for t in 0 ..< n {
                        for s in 0 ..< pieces {
                            let at = (t * pieces + s) * bits
                            let entry = Int(codes[at + bits - 1])
                            for j in 0 ..< 8 {
                                let x = book[entry * 8 + j]
                                rows[t * d + s * 8 + j] = bits == 2 && (codes[at] >> j) & 1 == 1 ? -x : x
                            }
                        }
                    }
                    let queries = Self.randomFloats(g * d, &rng), weights = Self.randomFloats(g * stride, &rng)
                    let start = Self.randomFloats(g * d, &rng)
                    var fast = [Float](repeating: .nan, count: g * stride), slow = fast
                    var accFast = start, accSlow = start
                    codes.withUnsafeBytes { c in
                        book.withUnsafeBytes { b in
                            signs.withUnsafeBytes { m in
                                CodewordKernels.dots(codes: c.baseAddress!, bits: bits, dim: d, count: n, book: b.baseAddress!, signs: m.baseAddress!,
                                                     queries: queries, groupSize: g, into: &fast, stride: stride, isa: isa)
                                CodewordKernels.accumulate(codes: c.baseAddress!, bits: bits, dim: d, count: n, book: b.baseAddress!,
                                                           signs: m.baseAddress!, weights: weights, stride: stride, groupSize: g, into: &accFast, isa: isa)
                            }
                        }
                    }
                    rows.withUnsafeBytes { r in
                        RowKernels.scoresInSwift(rows: r.baseAddress!, type: .float32, dim: d, tokens: 0 ..< n, queries: queries, groupSize: g,
                                                 into: &slow, stride: stride)
                        RowKernels.accumulateInSwift(rows: r.baseAddress!, type: .float32, dim: d, tokens: 0 ..< n, weights: weights, stride: stride,
                                                     groupSize: g, into: &accSlow)
                    }
                    let same = fast.map { $0.bitPattern } == slow.map { $0.bitPattern }
                    let sameAcc = accFast.map { $0.bitPattern } == accSlow.map { $0.bitPattern }
                    #expect(same && fast.contains { !$0.isNaN }, "scores: nsn:\(bits) isa \(isa) g \(g) d \(d) n \(n)")
                    #expect(sameAcc, "accumulators: nsn:\(bits) isa \(isa) g \(g) d \(d) n \(n)")
                }
            }
        }
    }

    @Test("dot, axpy and f16 widening in C give the Swift loops' bits, every length 0-70")
    func vectorHelpersInC() {
        guard RowKernels.rowsInC else { return }
        var rng = SplitMix64(seed: 21)
        for n in 0 ... 70 {
            let a = Self.randomFloats(n, &rng).map { $0 * 7 }, b = Self.randomFloats(n, &rng)
            let d = a.withUnsafeBufferPointer { x in b.withUnsafeBufferPointer { RowKernels.dot(x.baseAddress!, $0.baseAddress!, n) } }
            let e = a.withUnsafeBufferPointer { x in b.withUnsafeBufferPointer { RowKernels.dotInSwift(x.baseAddress!, $0.baseAddress!, n) } }
            #expect(d.bitPattern == e.bitPattern, "dot, n \(n)")
            var y1 = b, y2 = b
            a.withUnsafeBufferPointer { x in
                RowKernels.axpy(0.37, x.baseAddress!, &y1, n)
                RowKernels.axpyInSwift(0.37, x.baseAddress!, &y2, n)
            }
            #expect(y1.map(\.bitPattern) == y2.map(\.bitPattern), "axpy, n \(n)")
            // Every f16 class: normals, subnormals, zeros, infinities, NaN.
            let halves = (0 ..< n).map { i in UInt16(truncatingIfNeeded: i * 997 + 1) ^ (i % 5 == 0 ? 0x7C00 : 0) }
            var w1 = [Float](repeating: 1, count: n), w2 = w1
            halves.withUnsafeBytes {
                RowKernels.widenFloat16($0.baseAddress!, &w1, n)
                RowKernels.widenFloat16InSwift($0.baseAddress!, &w2, n)
            }
            #expect(w1.map(\.bitPattern) == w2.map(\.bitPattern), "widen, n \(n)")
        }
    }

    @Test("nsn's per-token norm arithmetic in C gives the Swift loops' bits, 1-5 heads, 0-70 tokens")
    func nsnNormHelpersInC() {
        guard RowKernels.rowsInC else { return }
        var rng = SplitMix64(seed: 23)
        for g in 1 ... 5 {
            for n in [0, 1, 7, 8, 9, 31, 64, 70] {
                let stride = n + 3
                let n1 = Self.randomFloats(n, &rng).map { abs($0) * 3 }, n2 = Self.randomFloats(n, &rng).map { abs($0) + 0.5 }
                let weights = Self.randomFloats(g * stride, &rng).map { abs($0) }, means = Self.randomFloats(g, &rng)
                // The Swift loops the C helpers replaced in NSNScheme, element by element. `c` starts
                // as NaN and `x` as the dots, so a helper that did not run fails the comparison.
                var c = [Float](repeating: .nan, count: g * n), s = c
                CodewordKernels.tokenWeights(weights, stride: stride, groupSize: g, n1: n1, n2: n2, invRoot: 0.088, count: n, into: &c)
                for q in 0 ..< g {
                    for i in 0 ..< n { s[q * n + i] = weights[q * stride + i] * (n1[i] * (n2[i] * 0.088)) }
                }
                #expect(c.map(\.bitPattern) == s.map(\.bitPattern), "weights, \(g) heads, \(n) tokens")
                let dots = Self.randomFloats(g * stride, &rng)
                var x = dots, y = dots
                CodewordKernels.normScores(&x, stride: stride, groupSize: g, n1: n1, n2: n2, meanTerms: means, count: n)
                for q in 0 ..< g {
                    for i in 0 ..< n { y[q * stride + i] = (n1[i] * n2[i]) * y[q * stride + i] + means[q] * n1[i] }
                }
                #expect(x.map(\.bitPattern) == y.map(\.bitPattern), "scores, \(g) heads, \(n) tokens")
            }
        }
    }

    @Test("a token's score and the accumulated sum do not depend on how rows are split into tiles")
    func splitInvariance() {
        let g = 4, d = 128, n = 37
        var rng = SplitMix64(seed: 3)
        let tile = Self.randomFloats(n * d, &rng), queries = Self.randomFloats(g * d, &rng), weights = Self.randomFloats(g * n, &rng)
        var whole = [Float](repeating: 0, count: g * n), accWhole = [Float](repeating: 0, count: g * d)
        TileKernels.scores(tile: tile, count: n, dim: d, queries: queries, groupSize: g, into: &whole, stride: n)
        TileKernels.accumulate(tile: tile, count: n, dim: d, weights: weights, stride: n, groupSize: g, into: &accWhole)
        for cut in [1, 2, 5, 13, 36] {
            var split = [Float](repeating: 0, count: g * n), accSplit = [Float](repeating: 0, count: g * d)
            tile.withUnsafeBufferPointer { tp in
                weights.withUnsafeBufferPointer { wp in
                    split.withUnsafeMutableBufferPointer { sp in
                        for (from, to) in [(0, cut), (cut, n)] {
                            TileKernels.scores(tile: tp.baseAddress! + from * d, count: to - from, dim: d, queries: queries, groupSize: g,
                                               into: sp.baseAddress! + from, stride: n)
                            TileKernels.accumulate(tile: tp.baseAddress! + from * d, count: to - from, dim: d, weights: wp.baseAddress! + from,
                                                   stride: n, groupSize: g, into: &accSplit)
                        }
                    }
                }
            }
            #expect(split == whole, "cut at \(cut): scores must be bit-identical")
            #expect(accSplit == accWhole, "cut at \(cut): accumulation must be bit-identical")
        }
    }

    @Test("the vector exp is within 3 ulp of expf over softmax's range, and exactly 0 below -80")
    func exponential() {
        var worst: Float = 0
        var x: Float = -90
        while x <= 0 {
            let v = TileKernels.exp(SIMD8(repeating: x))
            let want = expf(x)
            if x >= -80 {
                let ulps = abs(v[0] - want) / want.ulp
                worst = max(worst, ulps)
            } else {
                #expect(v[0] == 0, "exp(\(x)) = \(v[0])")
            }
            x += 0.000_731
        }
        #expect(worst <= 3, "worst error \(worst) ulp")
        // Far below: 0, never garbage from exponent wrap-around; -inf (padding) is 0.
        let far = TileKernels.exp(SIMD8(-1e30, -1e6, -1000, -.infinity, -80, -1, 0, -0.5))
        for i in 0 ..< 4 { #expect(far[i] == 0) }
        #expect(far[4] > 1.8e-35 && far[4] < 1.81e-35)
        #expect(abs(far[6] - 1) == 0)
    }

    @Test("a layer attended on several threads equals it attended on one, bit for bit", arguments: ["int:k4v2:kc16", "nsn:2", "raw:f16"])
    func threadedLayer(spec: String) throws {
        let g = ModelGeometry(layerCount: 2, queryHeadCount: 12, kvHeadCount: 3, headDim: 16)
        let (reader, _) = try writeSchemeTestFile(g, spec: spec, seed: 12)
        var rng = SplitMix64(seed: 4)
        let q = Self.randomFloats(g.queryHeadCount * g.headDim, &rng)
        for layer in 0 ..< 2 {
            var one = [Float](repeating: 0, count: q.count), many = one
            try reader.attendLayer(layer, queries: q, output: &one, workspaces: [AttentionWorkspace()])
            try reader.attendLayer(layer, queries: q, output: &many, workspaces: [AttentionWorkspace(), AttentionWorkspace(), AttentionWorkspace()])
            #expect(one == many)
            for h in 0 ..< g.kvHeadCount {
                let per = g.groupSize * g.headDim
                let single = try reader.attend(layer: layer, kvHead: h, queries: Array(q[h * per ..< (h + 1) * per]))
                #expect(Array(one[h * per ..< (h + 1) * per]) == single)
            }
        }
        var out = [Float](repeating: 0, count: q.count)
        #expect(throws: KVPackError.self) { try reader.attendLayer(0, queries: q, output: &out, workspaces: []) }
        #expect(throws: KVPackError.self) { try reader.attendLayer(2, queries: q, output: &out, workspaces: [AttentionWorkspace(), AttentionWorkspace()]) }
    }

    /// Largest |a - b| over the largest |b|.
    static func relativeError(_ a: [Float], _ b: [Float]) -> Float {
        zip(a, b).map { abs($0 - $1) }.max()! / max(b.map { abs($0) }.max()!, 1e-30)
    }

    @Test("one head's tokens split across threads, and a layer's heads and tokens, equal one pass to float rounding",
          arguments: ["int:k4v2:kc16", "nsn:2", "raw:f16"])
    func tokenSplit(spec: String) throws {
        // 150 tokens: four sealed segments of 32 and a tail of 22, so pieces cover both.
        let g = ModelGeometry(layerCount: 1, queryHeadCount: 12, kvHeadCount: 3, headDim: 16)
        let (reader, _) = try writeSchemeTestFile(g, spec: spec, seed: 21)
        var rng = SplitMix64(seed: 9)
        let per = g.groupSize * g.headDim
        let q = Self.randomFloats(g.queryHeadCount * g.headDim, &rng).map { $0 * 3 }
        for range in [0 ..< 150, 5 ..< 100, 31 ..< 33, 40 ..< 41, 128 ..< 150] {
            for h in 0 ..< g.kvHeadCount {
                let head = Array(q[h * per ..< (h + 1) * per])
                let single = try reader.attend(layer: 0, kvHead: h, queries: head, tokens: range)
                // 7 workspaces over a 1-token range: six pieces are empty.
                for n in [1, 2, 3, 7] {
                    var split = [Float](repeating: .nan, count: per), again = split
                    let workspaces = (0 ..< n).map { _ in AttentionWorkspace() }
                    try reader.attend(layer: 0, kvHead: h, queries: head, tokens: range, output: &split, workspaces: workspaces)
                    try reader.attend(layer: 0, kvHead: h, queries: head, tokens: range, output: &again, workspaces: workspaces)
                    #expect(split.map(\.bitPattern) == again.map(\.bitPattern), "\(spec) \(range) head \(h) on \(n): not deterministic")
                    let error = Self.relativeError(split, single)
                    #expect(n == 1 ? error == 0 : error <= 1e-5, "\(spec) \(range) head \(h) on \(n) threads: relative error \(error)")
                }
            }
            // A layer: 3 heads on 2 threads take 2 pieces each; on 3 threads the heads alone (bit for bit).
            var one = [Float](repeating: 0, count: q.count), two = one, three = one
            try reader.attendLayer(0, queries: q, tokens: range, output: &one, workspaces: [AttentionWorkspace()])
            try reader.attendLayer(0, queries: q, tokens: range, output: &two, workspaces: [AttentionWorkspace(), AttentionWorkspace()],
                                   splittingTokens: true)
            try reader.attendLayer(0, queries: q, tokens: range, output: &three, workspaces: (0 ..< 3).map { _ in AttentionWorkspace() },
                                   splittingTokens: true)
            #expect(Self.relativeError(two, one) <= 1e-5, "\(spec) \(range): layer split on 2 threads")
            #expect(three == one, "\(spec) \(range): 3 heads on 3 threads should not split tokens")
        }
        #expect(KVPackReader.tokenPieces(heads: 3, threads: 2) == 2)
        #expect(KVPackReader.tokenPieces(heads: 8, threads: 2) == 1)
        #expect(KVPackReader.tokenPieces(heads: 1, threads: 4) == 4)
        #expect(KVPackReader.tokenPieces(heads: 3, threads: 4) == 4)
        var out = [Float](repeating: 0, count: per)
        let head = Array(q[0 ..< per])
        #expect(throws: KVPackError.self) { try reader.attend(layer: 0, kvHead: 0, queries: head, output: &out, workspaces: []) }
        #expect(throws: KVPackError.self) {
            try reader.attend(layer: 0, kvHead: 0, queries: head, tokens: 0 ..< 151, output: &out, workspaces: [AttentionWorkspace(), AttentionWorkspace()])
        }
        #expect(throws: KVPackError.self) {
            try reader.attend(layer: 0, kvHead: 3, queries: head, output: &out, workspaces: [AttentionWorkspace(), AttentionWorkspace()])
        }
    }
}
