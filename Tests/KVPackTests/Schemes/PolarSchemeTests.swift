import Foundation
import Testing
@testable import KVPack

struct PolarSchemeTests {
    static let geometry = ModelGeometry(layerCount: 2, queryHeadCount: 6, kvHeadCount: 2, headDim: 24)

    static func scheme(_ d: SchemeDescriptor, segmentTokens: Int = 32, layout: RoPELayout = .interleaved) throws -> PolarScheme {
        try PolarScheme(descriptor: d, context: SchemeContext(geometry: geometry, segmentTokens: segmentTokens,
                                                                rope: RoPEConfig(theta: 10000, layout: layout), role: .key))
    }

    /// The Spec's decoding, written out from its text with nothing shared with the scheme: bit
    /// streams, f16 ranges, the angle table rounded from double.
    static func specDecode(_ block: [UInt8], radiusBits rb: Int, angleBits ab: Int, segment s: Int, group: Int,
                           headDim d: Int, half: Bool) -> [Float] {
        let p = d / 2, runs = s / group
        func padded(_ bits: Int) -> Int { (bits + 63) / 64 * 8 }
        let angleBytes = padded(s * p * ab), radiusBytes = padded(s * p * rb)
        func bitsAt(_ section: Int, _ index: Int, _ width: Int) -> Int {
            var v = 0
            for k in 0 ..< width {
                let bit = index * width + k
                v |= Int(block[section + bit / 8] >> UInt8(bit % 8) & 1) << k
            }
            return v
        }
        func half16(_ at: Int) -> Float { Float(Float16(bitPattern: UInt16(block[at]) | UInt16(block[at + 1]) << 8)) }
        var out = [Float](repeating: 0, count: s * d)
        for t in 0 ..< s {
            for j in 0 ..< p {
                let run = t / group
                let scale = half16(angleBytes + radiusBytes + 2 * (run * p + j))
                let offset = half16(angleBytes + radiusBytes + 2 * runs * p + 2 * (run * p + j))
                let r = scale * Float(bitsAt(angleBytes, t * p + j, rb)) + offset
                let theta = 2 * Double.pi * Double(bitsAt(0, t * p + j, ab)) / Double(1 << ab)
                let (x, y) = half ? (j, j + d / 2) : (2 * j, 2 * j + 1)
                out[t * d + x] = r * Float(cos(theta))
                out[t * d + y] = r * Float(sin(theta))
            }
        }
        return out
    }

    @Test("decoded keys are r(cos, sin) of the stored radius and angle codes; radius and angle errors are within half a step",
          arguments: [(2, 3), (3, 4), (4, 4), (1, 1), (8, 8), (5, 7)])
    func decode(rb: Int, ab: Int) throws {
        let c = 32, d = 24
        for (group, layout, pairing) in [(0, RoPELayout.interleaved, PolarScheme.Pairing.fromManifest), (8, .rotateHalf, .fromManifest),
                                         (16, .interleaved, .rotateHalf), (4, .rotateHalf, .adjacent)] {
            let s = try Self.scheme(PolarScheme.descriptor(radiusBits: rb, angleBits: ab, pairing: pairing, radiusGroup: group),
                                    segmentTokens: c, layout: layout)
            let half = pairing == .rotateHalf || (pairing == .fromManifest && layout == .rotateHalf)
            let x = IntSchemeTests.rows(tokens: c, dim: d, seed: UInt64(rb * 10 + ab))
            var block = [UInt8](repeating: 0xAA, count: s.encodedBlockSize(tokens: c))
            x.withUnsafeBufferPointer { src in block.withUnsafeMutableBytes { s.encode(rows: src.baseAddress!, tokens: c, into: $0) } }
            var out = [Float](repeating: 0, count: c * d)
            try block.withUnsafeBytes { b in
                try s.validate(block: b, tokens: c)
                out.withUnsafeMutableBufferPointer { s.decode(block: b, tokens: 0 ..< c, into: $0.baseAddress!) }
            }
            let spec = Self.specDecode(block, radiusBits: rb, angleBits: ab, segment: c, group: group == 0 ? c : group, headDim: d, half: half)
            #expect(out == spec, "r\(rb)a\(ab) group \(group) \(layout) \(pairing): decode differs from the Spec's formula")
            let angleStep = 2 * Float.pi / Float(1 << ab)
            for t in 0 ..< c {
                for j in 0 ..< d / 2 {
                    let (ix, iy) = half ? (j, j + d / 2) : (2 * j, 2 * j + 1)
                    let ex = IntScheme.representable(x[t * d + ix]), ey = IntScheme.representable(x[t * d + iy])
                    let r = min((ex * ex + ey * ey).squareRoot(), 65504), rhat = (out[t * d + ix] * out[t * d + ix] + out[t * d + iy] * out[t * d + iy]).squareRoot()
                    let run = t / (group == 0 ? c : group)
                    let step = block.withUnsafeBytes { s.radiusScale($0.baseAddress!, run: run, pair: j) }
                    #expect(abs(r - rhat) <= step / 2 + 1e-5 * max(r, 1), "t \(t) pair \(j): radius \(r) -> \(rhat), step \(step)")
                    if r > 1e-3, rhat > 1e-3 {
                        var diff = atan2(out[t * d + iy], out[t * d + ix]) - atan2(ey, ex)
                        diff = abs(remainder(diff, 2 * Float.pi))
                        #expect(diff <= angleStep / 2 + 1e-4, "t \(t) pair \(j): angle error \(diff), step \(angleStep)")
                    }
                }
            }
        }
    }

    @Test("the C decoder gives the Swift vector decoder's bits (widths 1-4 and 8, both pairings, radius groups, partial ranges)",
          arguments: [(4, 4), (2, 3), (3, 2), (1, 1), (8, 8), (4, 8), (8, 1)])
    func decodeInC(rb: Int, ab: Int) throws {
        let c = 64, d = 128
        let g = ModelGeometry(layerCount: 1, queryHeadCount: 4, kvHeadCount: 1, headDim: d)
        for (group, pairing) in [(0, PolarScheme.Pairing.rotateHalf), (16, .adjacent), (8, .rotateHalf)] {
            let s = try PolarScheme(descriptor: PolarScheme.descriptor(radiusBits: rb, angleBits: ab, pairing: pairing, radiusGroup: group),
                                    context: SchemeContext(geometry: g, segmentTokens: c, rope: RoPEConfig(theta: 10000, layout: .rotateHalf),
                                                           role: .key))
            let x = IntSchemeTests.rows(tokens: c, dim: d, seed: UInt64(rb * 10 + ab + group))
            var block = [UInt8](repeating: 0, count: s.encodedBlockSize(tokens: c))
            x.withUnsafeBufferPointer { src in block.withUnsafeMutableBytes { s.encode(rows: src.baseAddress!, tokens: c, into: $0) } }
            for range in [0 ..< c, 5 ..< 6, 17 ..< 63] {
                for layout in [s.naturalLayout, .scoring] {
                    var fast = [Float](repeating: .nan, count: range.count * d), slow = fast
                    block.withUnsafeBytes { b in
                        fast.withUnsafeMutableBufferPointer { s.decodeVector(b.baseAddress!, tokens: range, layout: layout, into: $0.baseAddress!) }
                        slow.withUnsafeMutableBufferPointer { s.decodeVectorInSwift(b.baseAddress!, tokens: range, layout: layout, into: $0.baseAddress!) }
                    }
                    let same = fast.map { $0.bitPattern } == slow.map { $0.bitPattern }
                    #expect(same, "r\(rb)a\(ab) group \(group) \(pairing) \(layout) tokens \(range)")
                }
                // The scoring layout holds the natural rows' values, each pair's x and y in its place.
                var natural = [Float](repeating: .nan, count: range.count * d), scoring = natural
                block.withUnsafeBytes { b in
                    natural.withUnsafeMutableBufferPointer { s.decode(block: b, tokens: range, into: $0.baseAddress!) }
                    scoring.withUnsafeMutableBufferPointer { s.decodeVectorInSwift(b.baseAddress!, tokens: range, layout: .scoring, into: $0.baseAddress!) }
                }
                let placed = (0 ..< range.count).allSatisfy { row in
                    (0 ..< d / 2).allSatisfy { j in
                        let at = row * d + j / 8 * 16 + j % 8
                        return scoring[at] == natural[row * d + s.dims[2 * j]] && scoring[at + 8] == natural[row * d + s.dims[2 * j + 1]]
                    }
                }
                #expect(placed, "r\(rb)a\(ab) group \(group) \(pairing) tokens \(range): scoring layout")
            }
        }
    }

    @Test("key scores without a tile and through tiles give the Swift tile path's bits (widths, pairings, radius runs crossing four-token steps, 1-6 heads)",
          arguments: [(4, 4), (2, 3), (3, 2), (1, 1), (8, 8), (4, 8), (8, 1)])
    func scoresWithoutTile(rb: Int, ab: Int) throws {
        let c = 64
        for (d, group, pairing) in [(128, 0, PolarScheme.Pairing.rotateHalf), (128, 16, .adjacent), (64, 2, .rotateHalf), (256, 1, .adjacent),
                                    (128, 8, .adjacent)] {
            let g = ModelGeometry(layerCount: 1, queryHeadCount: 6, kvHeadCount: 1, headDim: d)
            let s = try PolarScheme(descriptor: PolarScheme.descriptor(radiusBits: rb, angleBits: ab, pairing: pairing, radiusGroup: group),
                                    context: SchemeContext(geometry: g, segmentTokens: c, rope: RoPEConfig(theta: 10000, layout: .rotateHalf),
                                                           role: .key))
            let x = IntSchemeTests.rows(tokens: c, dim: d, seed: UInt64(rb * 10 + ab + group + d))
            var block = [UInt8](repeating: 0, count: s.encodedBlockSize(tokens: c))
            x.withUnsafeBufferPointer { src in block.withUnsafeMutableBytes { s.encode(rows: src.baseAddress!, tokens: c, into: $0) } }
            var rng = SplitMix64(seed: UInt64(7 + d))
            let queries = (0 ..< 6 * d).map { _ in Float(rng.nextGaussian()) }
            for heads in [1, 3, 4, 6] {
                var state = [Float](repeating: 0, count: s.queryStateSize(groupSize: heads))
                queries.withUnsafeBufferPointer { s.prepare(queries: $0.baseAddress!, groupSize: heads, scale: 0.125, into: &state) }
                for range in [0 ..< c, 5 ..< 6, 3 ..< 34, 17 ..< 63] {
                    let n = range.count
                    var fast = [Float](repeating: .nan, count: heads * n), tiled = fast, slow = fast, natural = fast
                    block.withUnsafeBytes { b in
                        s.scores(block: b, tokens: range, state: state, groupSize: heads, into: &fast, stride: n)
                        s.scores(block: b, tokens: range, state: state, groupSize: heads, into: &tiled, stride: n, withoutTile: false)
                        // The Swift path: rows decoded in the scoring layout, the Swift tile kernels.
                        var tile = [Float](repeating: 0, count: n * d)
                        s.decodeVectorInSwift(b.baseAddress!, tokens: range, layout: .scoring, into: &tile)
                        TileKernels.scoresInSwift(tile: tile, count: n, dim: d, queries: state, groupSize: heads, into: &slow, stride: n)
                        // And the plain dot products of the natural rows with the natural queries.
                        var rows = [Float](repeating: 0, count: n * d)
                        s.decode(block: b, tokens: range, into: &rows)
                        for q in 0 ..< heads {
                            for t in 0 ..< n {
                                natural[q * n + t] = (0 ..< d).reduce(Float(0)) { $0 + queries[q * d + $1] * 0.125 * rows[t * d + $1] }
                            }
                        }
                    }
                    let label = "r\(rb)a\(ab) d \(d) group \(group) \(pairing) \(heads) heads tokens \(range)"
                    let differing = zip(fast, slow).filter { $0.bitPattern != $1.bitPattern }.count
                    #expect(differing == 0, "\(label): \(differing) of \(fast.count) scores differ (C: \(PolarKernels.scoresInC))")
                    let differingTiled = zip(tiled, slow).filter { $0.bitPattern != $1.bitPattern }.count
                    #expect(differingTiled == 0, "\(label): \(differingTiled) of \(fast.count) tile-path scores differ")
                    let worst = zip(fast, natural).map { abs($0 - $1) / max(1, abs($1)) }.max() ?? .nan
                    #expect(worst < 1e-4, "\(label): \(worst) from the plain dot products")
                }
            }
        }
    }

    @Test("bits per element: (radius + angle bits) / 2, plus 32 bits per radius range of a pair")
    func sizes() throws {
        let s = try Self.scheme(PolarScheme.descriptor(radiusBits: 3, angleBits: 4), segmentTokens: 64)
        #expect(s.encodedBlockSize(tokens: 64) == 64 * 12 * 4 / 8 + 64 * 12 * 3 / 8 + 4 * 12)
        let g = try Self.scheme(PolarScheme.descriptor(radiusBits: 2, angleBits: 3, radiusGroup: 16), segmentTokens: 64)
        #expect(g.encodedBlockSize(tokens: 64) == 288 + 192 + 4 * 4 * 12)
    }

    static let specs = ["polar:r4a4", "polar:r2a3+v:raw:f16", "polar:r3a4:g8:half+v:int:k4v2", "k:polar:r1a1:adjacent+v:polar:r8a8:g16"]

    @Test("table-lookup attention equals attention over the decoded keys to 1e-5, across blocks and GQA groups", arguments: specs)
    func attentionOverCodes(spec: String) throws {
        let (reader, _) = try writeSchemeTestFile(Self.geometry, spec: spec, seed: 41)
        #expect(reader.header.major == 2 && reader.header.minor == 0)
        try expectAttentionMatchesDecoded(reader, label: spec, seed: 5)
    }

    @Test("specs and descriptors: bits, groups, pairings; bad values are errors")
    func grammar() throws {
        let g = ModelGeometry(layerCount: 2, queryHeadCount: 4, kvHeadCount: 2, headDim: 64)
        let s = try SchemeSpec.parse("polar:r3a4:g16:half+v:raw:f16", geometry: g)
        #expect(s.key.descriptor == PolarScheme.descriptor(radiusBits: 3, angleBits: 4, pairing: .rotateHalf, radiusGroup: 16))
        for bad in ["polar", "polar:r9a4", "polar:r4a0", "polar:r4", "polar:r4a4:g0", "polar:r4a4:zz"] {
            #expect(throws: KVPackError.self, "\(bad)") { try SchemeSpec.parse(bad, geometry: g) }
        }
        var odd = g
        odd.headDim = 7
        #expect(throws: KVPackError.self) { try SchemeSpec.parse("polar:r4a4", geometry: odd) }
        // Untrusted descriptors.
        for params: [UInt8] in [[0, 4, 255, 0, 0, 0, 0, 0], [4, 9, 255, 0, 0, 0, 0, 0], [4, 4, 2, 0, 0, 0, 0, 0],
                                [4, 4, 0, 1, 0, 0, 0, 0], [4, 4, 0, 0, 7, 0, 0, 0], [4, 4, 0, 0]] {
            let d = SchemeDescriptor(kind: .polar, residualType: .float16, parameters: params, blobIDs: [])
            #expect(throws: KVPackError.self, "\(params)") { try Self.scheme(d) }
        }
        // A block whose radius scale is NaN or negative is reported, not decoded into nonsense.
        let sc = try Self.scheme(PolarScheme.descriptor(radiusBits: 2, angleBits: 2))
        var block = [UInt8](repeating: 0, count: sc.encodedBlockSize(tokens: 32))
        block[sc.scalesOffset + 1] = 0xFE   // f16 0xFE00: NaN
        #expect(throws: KVPackError.self) { try block.withUnsafeBytes { try sc.validate(block: $0, tokens: 32) } }
    }
}

extension PolarSchemeTests {
    @Test("fit:mse radius ranges: never more squared radius error per pair and run than min/max, and clearly less at 2 bits; angles unchanged")
    func minimumErrorRadii() throws {
        let c = 32, d = 24
        var rng = SplitMix64(seed: 61)
        let rows = (0 ..< c * d).map { _ in Float(rng.nextGaussian()) }
        let descriptor = PolarScheme.descriptor(radiusBits: 2, angleBits: 4, radiusGroup: 8)
        var decoded: [RangeFit: [Float]] = [:]
        for fit in RangeFit.allCases {
            let s = try PolarScheme(descriptor: descriptor, context: SchemeContext(geometry: Self.geometry, segmentTokens: c,
                                                                                  rope: RoPEConfig(theta: 10000, layout: .interleaved),
                                                                                  role: .key, rangeFit: fit))
            decoded[fit] = try IntSchemeTests.roundTrip(s, rows, tokens: c)
        }
        func radius(_ x: [Float], _ t: Int, _ j: Int) -> Double { Double(hypot(x[t * d + 2 * j], x[t * d + 2 * j + 1])) }
        var total: [RangeFit: Double] = [.minMax: 0, .minimumError: 0]
        for run in 0 ..< c / 8 {
            for j in 0 ..< d / 2 {
                var e: [RangeFit: Double] = [:]
                for fit in RangeFit.allCases {
                    e[fit] = (run * 8 ..< run * 8 + 8).reduce(0.0) { acc, t in
                        let r = radius(decoded[fit]!, t, j) - radius(rows, t, j)
                        return acc + r * r
                    }
                    total[fit]! += e[fit]!
                }
                #expect(e[.minimumError]! <= e[.minMax]! * (1 + 1e-3) + 1e-6, "run \(run) pair \(j)")
                // The angle codes do not depend on the range: each decoded pair keeps its direction.
                for t in run * 8 ..< run * 8 + 8 {
                    let a = atan2(decoded[.minMax]![t * d + 2 * j + 1], decoded[.minMax]![t * d + 2 * j])
                    let b = atan2(decoded[.minimumError]![t * d + 2 * j + 1], decoded[.minimumError]![t * d + 2 * j])
                    if radius(decoded[.minMax]!, t, j) > 1e-3 && radius(decoded[.minimumError]!, t, j) > 1e-3 { #expect(abs(a - b) < 1e-4) }
                }
            }
        }
        #expect(total[.minimumError]! < 0.9 * total[.minMax]!, "\(total)")
    }
}
