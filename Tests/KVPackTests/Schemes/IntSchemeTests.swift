import Foundation
import Testing
@testable import KVPack

struct IntSchemeTests {
    static let geometry = ModelGeometry(layerCount: 2, queryHeadCount: 6, kvHeadCount: 2, headDim: 24)

    static func scheme(_ d: SchemeDescriptor, segmentTokens: Int = 32, headDim: Int = 24, fit: RangeFit = .minimumError) throws -> IntScheme {
        var g = geometry
        g.headDim = headDim
        return try IntScheme(descriptor: d, context: SchemeContext(geometry: g, segmentTokens: segmentTokens, rope: .none, role: .key, rangeFit: fit))
    }

    /// `x` encoded into a block (checked valid) and decoded back.
    static func roundTrip(_ s: IntScheme, _ x: [Float], tokens c: Int) throws -> [Float] {
        var block = [UInt8](repeating: 0, count: s.encodedBlockSize(tokens: c))
        x.withUnsafeBufferPointer { src in block.withUnsafeMutableBytes { s.encode(rows: src.baseAddress!, tokens: c, into: $0) } }
        var out = [Float](repeating: 0, count: x.count)
        try block.withUnsafeBytes { b in
            try s.validate(block: b, tokens: c)
            out.withUnsafeMutableBufferPointer { s.decode(block: b, tokens: 0 ..< c, into: $0.baseAddress!) }
        }
        return out
    }

    /// Rows with awkward content: wide ranges, constant groups, a huge value, a NaN.
    static func rows(tokens: Int, dim: Int, seed: UInt64) -> [Float] {
        var rng = SplitMix64(seed: seed)
        var x = (0 ..< tokens * dim).map { _ in Float(rng.nextGaussian()) * Float(1 << (rng.next() % 6)) }
        for c in 0 ..< dim { x[3 * dim + c] = 1.25 }  // a constant token (per-token groups)
        for t in 0 ..< tokens { x[t * dim + 5] = -7.5 }  // a constant channel (per-channel groups)
        x[7 * dim + 2] = 1e6      // saturates at f16's 65504
        x[9 * dim + 11] = .nan    // encodes as 0
        return x
    }

    @Test("min/max ranges: decode error is at most half a quantization step, for every width and grouping",
          arguments: [1, 2, 3, 4, 8])
    func halfStepBound(bits: Int) throws {
        let c = 32, d = 24
        for descriptor in [IntScheme.descriptor(bits: bits, groupSize: 8), IntScheme.descriptor(bits: bits, groupSize: 24),
                           IntScheme.descriptor(bits: bits, perChannelTokens: 8), IntScheme.descriptor(bits: bits, perChannelTokens: 32)] {
            let s = try Self.scheme(descriptor, segmentTokens: c, headDim: d, fit: .minMax)
            let x = Self.rows(tokens: c, dim: d, seed: UInt64(bits))
            var block = [UInt8](repeating: 0xAA, count: s.encodedBlockSize(tokens: c))
            x.withUnsafeBufferPointer { src in block.withUnsafeMutableBytes { s.encode(rows: src.baseAddress!, tokens: c, into: $0) } }
            var out = [Float](repeating: 0, count: c * d)
            try block.withUnsafeBytes { b in
                try s.validate(block: b, tokens: c)
                out.withUnsafeMutableBufferPointer { s.decode(block: b, tokens: 0 ..< c, into: $0.baseAddress!) }
                for t in 0 ..< c {
                    for ch in 0 ..< d {
                        let g = s.group(token: t, channel: ch)
                        let step = s.scale(b.baseAddress!, g)
                        let want = IntScheme.representable(x[t * d + ch])
                        let err = abs(out[t * d + ch] - want)
                        // Half a step, plus the float rounding of scale * code + offset.
                        #expect(err <= step / 2 + 4 * want.ulp, "bits \(bits) \(descriptor.parameters) t \(t) c \(ch): \(want) -> \(out[t * d + ch]), step \(step)")
                    }
                }
                // A partial range decodes the same rows.
                var part = [Float](repeating: 0, count: 5 * d)
                part.withUnsafeMutableBufferPointer { s.decode(block: b, tokens: 10 ..< 15, into: $0.baseAddress!) }
                #expect(part == Array(out[10 * d ..< 15 * d]))
            }
        }
    }

    @Test("minimum-error ranges: never more squared error than min/max per group, and clearly less on Gaussian rows at 2 and 3 bits",
          arguments: [1, 2, 3, 4, 8])
    func minimumErrorRanges(bits: Int) throws {
        let c = 64, d = 64
        var rng = SplitMix64(seed: UInt64(40 + bits))
        let gaussian = (0 ..< c * d).map { _ in Float(rng.nextGaussian()) }
        for x in [gaussian, Self.rows(tokens: c, dim: d, seed: UInt64(bits))] {
            for descriptor in [IntScheme.descriptor(bits: bits, groupSize: 64), IntScheme.descriptor(bits: bits, groupSize: 16),
                               IntScheme.descriptor(bits: bits, perChannelTokens: 64), IntScheme.descriptor(bits: bits, perChannelTokens: 8)] {
                var perGroup: [RangeFit: [Double]] = [:]
                for fit in RangeFit.allCases {
                    let s = try Self.scheme(descriptor, segmentTokens: c, headDim: d, fit: fit)
                    let out = try Self.roundTrip(s, x, tokens: c)
                    var errors = [Double](repeating: 0, count: s.groupCount)
                    for t in 0 ..< c {
                        for ch in 0 ..< d {
                            let e = Double(out[t * d + ch]) - Double(IntScheme.representable(x[t * d + ch]))
                            errors[s.group(token: t, channel: ch)] += e * e
                        }
                    }
                    perGroup[fit] = errors
                }
                let best = perGroup[.minimumError]!, minMax = perGroup[.minMax]!
                for g in best.indices {
                    // The search starts from the min/max range, so it never ends worse (a
                    // relative slack for the float sums).
                    #expect(best[g] <= minMax[g] * (1 + 1e-5) + 1e-12, "bits \(bits) \(descriptor.parameters) group \(g): \(best[g]) > \(minMax[g])")
                }
                if x == gaussian, bits == 2 || bits == 3, descriptor.parameters[1] == 0, descriptor.parameters[2] == 64 {
                    let ratio = minMax.reduce(0, +) / best.reduce(0, +)
                    #expect(ratio > (bits == 2 ? 1.5 : 1.15), "bits \(bits): min/max MSE / minimum-error MSE = \(ratio)")
                }
            }
        }
    }

    @Test("bits per element: codes plus 32 bits per group")
    func sizes() throws {
        let s = try Self.scheme(IntScheme.descriptor(bits: 2, groupSize: 8), segmentTokens: 32, headDim: 24)
        #expect(s.encodedBlockSize(tokens: 32) == 32 * 24 * 2 / 8 + 4 * 32 * 3)
        let c = try Self.scheme(IntScheme.descriptor(bits: 3, perChannelTokens: 16), segmentTokens: 32, headDim: 24)
        #expect(c.encodedBlockSize(tokens: 32) == 32 * 24 * 3 / 8 + 4 * 2 * 24)
    }

    static let specs = ["int:k4v2", "int:k3v1:g8", "int:k8v8:g24", "int:k2v4:kc8", "int:k1v3:vc16:kt12", "int:k4v4:kc32:vc32"]

    @Test("attention over codes equals attention over the decoded cache to 1e-5", arguments: specs)
    func attentionOverCodes(spec: String) throws {
        let (reader, data) = try writeSchemeTestFile(Self.geometry, spec: spec, seed: 31)
        try expectAttentionMatchesDecoded(reader, label: spec, seed: 4)
        // The tail (last 22 tokens) is f16; sealed tokens are codes: their error is larger.
        let k = try reader.decode(layer: 1, kvHead: 1, kind: .key)
        let exact = data.stream(layer: 1, head: 1, kind: .key, tokens: 0 ..< 150)
        let tailErr = zip(k[128 * 24 ..< 150 * 24], exact[128 * 24 ..< 150 * 24]).map { abs($0 - $1) }.max()!
        #expect(tailErr <= exact[128 * 24 ..< 150 * 24].map { abs($0) }.max()! * 1e-3)
    }

    @Test("specs: widths per role, groupings, residual window, errors")
    func specGrammar() throws {
        let g = ModelGeometry(layerCount: 3, queryHeadCount: 4, kvHeadCount: 2, headDim: 64)
        let s = try SchemeSpec.parse("int:k4v2:kc128:r128", geometry: g)
        #expect(s.key.descriptor == IntScheme.descriptor(bits: 4, perChannelTokens: 128))
        #expect(s.value.descriptor == IntScheme.descriptor(bits: 2, groupSize: 64))
        #expect(s.segmentTokens == 128)
        #expect(try s.segmentTokens(requested: nil, fallback: 64) == 128)
        #expect(throws: KVPackError.self) { try s.segmentTokens(requested: 64, fallback: 64) }
        #expect(try SchemeSpec.parse("int:k2v2:g32", geometry: g).key.descriptor == IntScheme.descriptor(bits: 2, groupSize: 32))
        #expect(throws: KVPackError.self) { try SchemeSpec.parse("int:k5v2", geometry: g) }
        #expect(throws: KVPackError.self) { try SchemeSpec.parse("int:k4v2:g48", geometry: g) }
        #expect(throws: KVPackError.self) { try SchemeSpec.parse("int:k4v2:zz", geometry: g) }
        #expect(throws: KVPackError.self) { try SchemeSpec.parse("int:auto:3.0", geometry: g) }  // no calibration
        var small = g
        small.headDim = 12
        #expect(throws: KVPackError.self) { try SchemeSpec.parse("int:k4v2", geometry: small) }
        // Keys f32 raw, values int: mixing works.
        let mixed = try SchemeSpec.parse("raw:f16+v:int:k8v2", geometry: g)
        #expect(mixed.value.descriptor == IntScheme.descriptor(bits: 2, groupSize: 64))
    }

    @Test("the planner gives keys more bits when their norms are larger, within the budget")
    func planner() throws {
        let g = ModelGeometry(layerCount: 4, queryHeadCount: 4, kvHeadCount: 2, headDim: 16)
        // Layer norms: keys 10x values in layers 0-2, equal in layer 3.
        let stats = CacheStatistics(tokens: 100, layers: [
            .init(keyNorm: 20, valueNorm: 2, keySpectralNorm: 60, valueSpectralNorm: 3),
            .init(keyNorm: 20, valueNorm: 2, keySpectralNorm: 60, valueSpectralNorm: 3),
            .init(keyNorm: 20, valueNorm: 2, keySpectralNorm: 60, valueSpectralNorm: 3),
            .init(keyNorm: 2, valueNorm: 2, keySpectralNorm: 3, valueSpectralNorm: 3),
        ])
        let spec = try SchemeSpec.parse("int:auto:3.0", geometry: g, calibration: stats)
        let bits = spec.layers.map { (IntScheme.bitsOf($0.key), IntScheme.bitsOf($0.value)) }
        let total = bits.reduce(0) { $0 + $1.0 + $1.1 }
        #expect(total <= 3 * 8)
        #expect(total >= 3 * 8 - 3)  // no room left for another upgrade
        for l in 0 ..< 3 { #expect(bits[l].0 > bits[l].1, "layer \(l): K\(bits[l].0) V\(bits[l].1)") }
        #expect(bits[3].0 == bits[3].1)
        #expect(spec.rationale.count == 6)
        // The authors' docstring example: more bits to more sensitive tensors, within the budget.
        let three = IntScheme.allocateBits(sensitivities: [1.5, 2.0, 1.0], total: 12, widths: [1, 2, 3, 4, 8])
        #expect(three.reduce(0, +) <= 12 && three[1] >= three[0] && three[0] >= three[2])
    }
}

extension IntSchemeTests {
    @Test("the measured planner gives the layers whose coding costs the model most the bits, needs measured sensitivity, and probes at 2 bits")
    func measuredPlanner() throws {
        let g = ModelGeometry(layerCount: 4, queryHeadCount: 4, kvHeadCount: 2, headDim: 16)
        let parsed = try ParsedSchemeSpec("int:auto:3.0:measured:kc16+sinks:1", geometry: g)
        #expect(parsed.needsCalibration)
        let probe = try #require(parsed.sensitivityProbe)
        #expect(probe.key.descriptor == IntScheme.descriptor(bits: 2, perChannelTokens: 16))
        #expect(probe.value.descriptor == IntScheme.descriptor(bits: 2, groupSize: 16))
        #expect(parsed.fileOptions.sinkTokens == 1)
        // Norms alone are not enough: the planner says what it needs.
        let norms = CacheStatistics(tokens: 100, layers: Array(repeating: .init(keyNorm: 1, valueNorm: 1, keySpectralNorm: 1, valueSpectralNorm: 1), count: 4))
        #expect(throws: KVPackError.self) { try parsed.planned(calibration: norms) }
        // Layer 1's values and layer 2's keys cost the model the most; layer 3 almost nothing.
        var stats = norms
        stats.sensitivity = .init(probeBits: 2, probe: "test", tokens: 100, key: [0.01, 0.01, 0.5, 1e-5], value: [0.02, 0.8, 0.01, -0.001])
        let spec = try parsed.planned(calibration: stats)
        let bits = spec.layers.map { (IntScheme.bitsOf($0.key), IntScheme.bitsOf($0.value)) }
        #expect(bits.reduce(0) { $0 + $1.0 + $1.1 } <= 3 * 8)
        #expect(bits.allSatisfy { $0.0 >= 2 && $0.1 >= 2 })
        #expect(bits[1].1 == bits.map { max($0.0, $0.1) }.max(), "\(bits)")
        #expect(bits[2].0 > bits[3].0 && bits[1].1 > bits[3].1, "\(bits)")
        #expect(spec.rationale.count == 6 && spec.rationale[0].contains("measured"))
        #expect(throws: KVPackError.self) { try ParsedSchemeSpec("int:auto:1.5:measured", geometry: g) }
    }
}

extension IntScheme {
    static func bitsOf(_ setup: SchemeSetup) -> Int { Int(setup.descriptor.parameters[0]) }
}
