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
    static func roundTrip(_ s: any KVScheme, _ x: [Float], tokens c: Int) throws -> [Float] {
        var block = [UInt8](repeating: 0, count: s.encodedBlockSize(tokens: c))
        x.withUnsafeBufferPointer { src in block.withUnsafeMutableBytes { s.encode(rows: src.baseAddress!, tokens: c, into: $0) } }
        var out = [Float](repeating: 0, count: x.count)
        try block.withUnsafeBytes { b in
            try s.validate(block: b, tokens: c)
            out.withUnsafeMutableBufferPointer { s.decode(block: b, tokens: 0 ..< c, into: $0.baseAddress!) }
        }
        return out
    }

    /// Per-token groups of 8 and of every channel, per-channel runs of 8 and of the whole segment
    /// (32 tokens, 24 channels).
    static func everyGrouping(bits: Int) -> [SchemeDescriptor] {
        [IntScheme.descriptor(bits: bits, groupSize: 8), IntScheme.descriptor(bits: bits, groupSize: 24),
         IntScheme.descriptor(bits: bits, perChannelTokens: 8), IntScheme.descriptor(bits: bits, perChannelTokens: 32)]
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
        for descriptor in Self.everyGrouping(bits: bits) {
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

    @Test("the C decoder gives the Swift one's bits for every width and grouping, partial ranges, and declines a short block",
          arguments: [1, 2, 3, 4, 8])
    func decodeInC(bits: Int) throws {
        let c = 32, d = 24
        for descriptor in Self.everyGrouping(bits: bits) {
            let s = try Self.scheme(descriptor, segmentTokens: c, headDim: d)
            let x = Self.rows(tokens: c, dim: d, seed: UInt64(bits) + 40)
            var block = [UInt8](repeating: 0, count: s.encodedBlockSize(tokens: c))
            x.withUnsafeBufferPointer { src in block.withUnsafeMutableBytes { s.encode(rows: src.baseAddress!, tokens: c, into: $0) } }
            for range in [0 ..< c, 3 ..< 4, 5 ..< 29, 31 ..< 32] {
                var fast = [Float](repeating: .nan, count: range.count * d), slow = fast
                block.withUnsafeBytes { b in
                    fast.withUnsafeMutableBufferPointer { s.decodeTile(b.baseAddress!, from: range.lowerBound, count: range.count, into: $0.baseAddress!) }
                    slow.withUnsafeMutableBufferPointer { s.decodeTileInSwift(b.baseAddress!, from: range.lowerBound, count: range.count, into: $0.baseAddress!) }
                }
                #expect(fast.map(\.bitPattern) == slow.map(\.bitPattern), "\(descriptor) tokens \(range)")
            }
            // The C decoder runs where the integer kernels do, and never past the block's bytes.
            var out = [Float](repeating: 7, count: c * d)
            let ranWhole = block.withUnsafeBytes { b in
                IntegerCodeKernels.decode(b.baseAddress!, blockBytes: b.count, bits: bits, dim: d, channelGrouping: s.grouping == .channel,
                                          groupSize: s.groupSize, scalesOffset: s.scalesOffset, offsetsOffset: s.offsetsOffset,
                                          tokens: 0 ..< c, into: &out, rowStride: d)
            }
            #expect(ranWhole == (IntegerCodeKernels.isaName != "none (Swift fallback)"))
            out = [Float](repeating: 7, count: c * d)
            let ranShort = block.withUnsafeBytes { b in
                IntegerCodeKernels.decode(b.baseAddress!, blockBytes: b.count - 1, bits: bits, dim: d, channelGrouping: s.grouping == .channel,
                                          groupSize: s.groupSize, scalesOffset: s.scalesOffset, offsetsOffset: s.offsetsOffset,
                                          tokens: 0 ..< c, into: &out, rowStride: d)
            }
            #expect(!ranShort && out.allSatisfy { $0 == 7 })
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

/// Per-channel widths (`int:k2.5v2:kc64`, parameter flag bit 1, format 2.4).
struct IntChannelWidthTests {
    static let geometry = ModelGeometry(layerCount: 2, queryHeadCount: 4, kvHeadCount: 2, headDim: 32)

    /// Head 0: channels 0-7 at 4 bits, 8-23 at 2, 24-31 at 1 (72 bits a row); head 1 the same
    /// widths in another order, so the heads' classes differ but their totals agree.
    static let widths: [UInt8] = {
        let head0: [UInt8] = Array(repeating: 4, count: 8) + Array(repeating: 2, count: 16) + Array(repeating: 1, count: 8)
        let head1: [UInt8] = (0 ..< 32).map { head0[($0 * 5 + 3) % 32] }
        return head0 + head1
    }()

    static func scheme(_ descriptor: SchemeDescriptor, segmentTokens: Int = 32) throws -> IntScheme {
        try IntScheme(descriptor: descriptor, context: SchemeContext(geometry: geometry, segmentTokens: segmentTokens, rope: .none, role: .key,
                                                                     rangeFit: .minMax))
    }

    @Test("a block is one ordinary per-channel payload per width, narrowest first, over that width's channels in ascending order (Spec 7.2, scheme 2)")
    func layoutMatchesUniformClasses() throws {
        let c = 32, d = 32
        let mixed = try Self.scheme(IntScheme.descriptor(channelWidths: Self.widths, perChannelTokens: 8), segmentTokens: c)
        #expect(mixed.encodedBlockSize(tokens: c) == c * (8 * 4 + 16 * 2 + 8 * 1) / 8 + 4 * (c / 8) * d)
        let x = IntSchemeTests.rows(tokens: c, dim: d, seed: 77)
        for head in 0 ..< 2 {
            let s = try #require(mixed.forKVHead(head) as? IntScheme)
            var block = [UInt8](repeating: 0xAA, count: s.encodedBlockSize(tokens: c))
            x.withUnsafeBufferPointer { src in block.withUnsafeMutableBytes { s.encode(rows: src.baseAddress!, tokens: c, into: $0) } }
            let decoded = try IntSchemeTests.roundTrip(s, x, tokens: c)
            var offset = 0
            for w in [1, 2, 3, 4, 8] {
                let channels = (0 ..< d).filter { Int(Self.widths[head * d + $0]) == w }
                guard !channels.isEmpty else { continue }
                // The same channels coded alone by a uniform-width scheme give the same bytes and values.
                var g = Self.geometry
                g.headDim = channels.count
                let uniform = try IntScheme(descriptor: IntScheme.descriptor(bits: w, perChannelTokens: 8),
                                            context: SchemeContext(geometry: g, segmentTokens: c, rope: .none, role: .key, rangeFit: .minMax))
                let columns = (0 ..< c).flatMap { t in channels.map { x[t * d + $0] } }
                var expected = [UInt8](repeating: 0, count: uniform.encodedBlockSize(tokens: c))
                columns.withUnsafeBufferPointer { src in expected.withUnsafeMutableBytes { uniform.encode(rows: src.baseAddress!, tokens: c, into: $0) } }
                #expect(Array(block[offset ..< offset + expected.count]) == expected, "head \(head) width \(w)")
                let back = try IntSchemeTests.roundTrip(uniform, columns, tokens: c)
                for t in 0 ..< c {
                    for (i, ch) in channels.enumerated() { #expect(decoded[t * d + ch] == back[t * channels.count + i]) }
                }
                offset += expected.count
            }
            #expect(offset == block.count)
        }
        // Attention over a head's block in class order equals attention over its decoded rows.
        let s = try #require(mixed.forKVHead(1) as? IntScheme)
        var block = [UInt8](repeating: 0, count: s.encodedBlockSize(tokens: c))
        x.withUnsafeBufferPointer { src in block.withUnsafeMutableBytes { s.encode(rows: src.baseAddress!, tokens: c, into: $0) } }
        let rows = try IntSchemeTests.roundTrip(s, x, tokens: c)
        var rng = SplitMix64(seed: 5)
        let q = (0 ..< 2 * d).map { _ in Float(rng.nextGaussian()) }
        var state = [Float](repeating: 0, count: s.queryStateSize(groupSize: 2))
        var scores = [Float](repeating: 0, count: 2 * 20)
        block.withUnsafeBytes { b in
            q.withUnsafeBufferPointer { qp in state.withUnsafeMutableBufferPointer { s.prepare(queries: qp.baseAddress!, groupSize: 2, scale: 0.5, into: $0.baseAddress!) } }
            state.withUnsafeBufferPointer { st in
                scores.withUnsafeMutableBufferPointer { s.scores(block: b, tokens: 5 ..< 25, state: st.baseAddress!, groupSize: 2, into: $0.baseAddress!, stride: 20) }
            }
        }
        for g in 0 ..< 2 {
            for t in 5 ..< 25 {
                let want = 0.5 * (0 ..< d).reduce(Float(0)) { $0 + q[g * d + $1] * rows[t * d + $1] }
                #expect(abs(scores[g * 20 + t - 5] - want) <= 1e-4 * max(1, abs(want)), "query \(g) token \(t)")
            }
        }
    }

    @Test("a width table that breaks a rule is refused, naming the field")
    func invalidTables() throws {
        var valid = IntScheme.descriptor(channelWidths: Self.widths, perChannelTokens: 8)
        _ = try Self.scheme(valid)
        func refused(_ change: (inout SchemeDescriptor) -> Void, _ field: String) {
            var d = valid
            change(&d)
            do {
                _ = try Self.scheme(d)
                Issue.record("accepted: \(field)")
            } catch let e as KVPackError {
                #expect(e.field?.contains(field) == true, "\(e)")
            } catch { Issue.record("\(error)") }
        }
        refused({ $0.parameters[0] = 2 }, "int.bits")
        refused({ $0.parameters[1] = 0; $0.parameters[2] = 32 }, "int.grouping")
        refused({ $0.parameters[8] = 5 }, "int.channelWidths")                        // not a width
        refused({ $0.parameters[8] = 2; $0.parameters[16] = 3; $0.parameters[17] = 3 }, "int.channelWidths")  // same total, 7 channels of 4 bits
        refused({ $0.parameters[8 + 32] = 2 }, "int.channelWidths")                   // head 1 sums differ (and a count breaks)
        refused({ $0.parameters.removeLast() }, "parameters")
        refused({ $0.parameters[4] |= 4 }, "int.flags")
        // Both heads' first runs swapped between widths 4 and 1: still valid (same totals, whole runs).
        valid.parameters.replaceSubrange(8 ..< 16, with: Array(repeating: 1, count: 8))
        valid.parameters.replaceSubrange(32 ..< 40, with: Array(repeating: 4, count: 8))
        _ = try Self.scheme(valid)
    }

    @Test("widths: runs of 8 channels by importance, the budget spent exactly, the most important runs widest")
    func allocation() throws {
        let importance = (0 ..< 32).map { c -> Double in c % 4 == 0 ? 100 : (c % 4 == 1 ? 10 : 1) }
        let w = IntScheme.channelWidths(importance: importance, average: 2.5)
        #expect(w.reduce(0) { $0 + Int($1) } == 80)
        for width in Set(w) { #expect(w.filter { $0 == width }.count % 8 == 0) }
        #expect((0 ..< 32).filter { $0 % 4 == 0 }.allSatisfy { w[$0] == w.max()! }, "\(w)")
        #expect(w.allSatisfy { (2 ... 4).contains($0) })
        let low = IntScheme.channelWidths(importance: importance, average: 1.25)
        #expect(low.reduce(0) { $0 + Int($1) } == 40 && low.allSatisfy { (1 ... 4).contains($0) })
    }

    @Test("specs: a fractional width plans per-channel widths from calibration, keys weighted by the queries when given; errors say why")
    func specs() throws {
        let g = Self.geometry
        let parsed = try ParsedSchemeSpec("int:k2.5v2:kc8+window:8", geometry: g)
        #expect(parsed.needsCalibration && parsed.needsQueryStatistics)
        #expect(try !ParsedSchemeSpec("int:k2v2.5:kc8:vc8", geometry: g).needsQueryStatistics)
        #expect(throws: KVPackError.self) { try parsed.planned(calibration: nil) }
        for bad in ["int:k2.5v2", "int:k2.3v2:kc8", "int:k4.5v2:kc8", "int:k0.5v2:kc8", "int:k2v2.5:kc8"] {
            #expect(throws: KVPackError.self, "\(bad)") { try ParsedSchemeSpec(bad, geometry: g) }
        }
        var narrow = g
        narrow.headDim = 8
        #expect(throws: KVPackError.self) { try ParsedSchemeSpec("int:k2.5v2:kc8", geometry: narrow) }

        // Key channel 31 is small, channel 0 large; queries that read channel 31 hard move it up.
        let data = RandomKV(geometry: g, tokens: 64, seed: 3, maxExponent: 6)
        var stats = data.statistics
        let plain = try parsed.planned(calibration: stats)
        #expect(plain.key.descriptor.parameters.count == 8 + 2 * 32 && plain.value.descriptor == IntScheme.descriptor(bits: 2, groupSize: 32))
        #expect(plain.rationale[0].contains("RMS over 64"))
        stats.queryRMS = Array(repeating: (0 ..< 32).map { $0 < 8 ? 1000.0 : 1e-3 }, count: g.layerCount * g.kvHeadCount)
        let weighted = try parsed.planned(calibration: stats)
        #expect(weighted.rationale[0].contains("query RMS"))
        let widths = Array(weighted.key.descriptor.parameters[8 ..< 40])
        #expect((0 ..< 8).allSatisfy { widths[$0] == widths.max()! } && widths.max()! > widths.min()!, "\(widths)")
        #expect(plain.key.descriptor != weighted.key.descriptor)
    }

    @Test("a file with per-channel key widths: every head reads back, attention over codes equals attention over the decoded cache, format 2.4, refused by version 1")
    func file() throws {
        let spec = "int:k2.5v2:kc8+window:4"
        let (reader, data) = try writeSchemeTestFile(Self.geometry, spec: spec, seed: 12)
        #expect(reader.header.minor == 4)
        #expect(reader.scheme(layer: 0, kind: .key).specString == "int:k2.5v2.5:kc8:vc8")
        try expectAttentionMatchesDecoded(reader, label: spec, seed: 9)
        // Codes, so not exact; but within a 2-bit code's half step of the (range-wide) data.
        let k = try reader.decode(layer: 1, kvHead: 1, kind: .key, tokens: 0 ..< 128)
        let exact = data.stream(layer: 1, head: 1, kind: .key, tokens: 0 ..< 128)
        let range = exact.map(abs).max()!
        #expect(zip(k, exact).allSatisfy { abs($0 - $1) <= range / 3 + 1e-3 })
        #expect(zip(k, exact).contains { $0 != $1 })
        let path = temporaryDirectory() + "/v1.kvpack"
        #expect(throws: KVPackError.self) {
            try writeFile(path, data: data, segmentTokens: 32, spec: spec, batches: [40], options: testOptions(major: 1))
        }
    }
}

extension IntChannelWidthTests {
    @Test("an invalid width is reported at its own byte of the file")
    func errorOffset() throws {
        let path = packageRoot + "/corpus/error-invalidField__v2.4-int-channel-width-5.kvpack"
        let bytes = fileBytes(path)
        do {
            _ = try KVPackReader(path: path)
            Issue.record("opened")
        } catch let e as KVPackError {
            #expect(e.code == .invalidField && e.field == "manifest.schemes[0].int.channelWidths")
            let at = try #require(e.offset.map(Int.init))
            #expect(bytes[at] == 5, "offset \(at)")
            // The same file before the damage reads, and its byte there is a width.
            let valid = fileBytes(packageRoot + "/corpus/valid__v2.4-int-k2.5v2-channel-widths.kvpack")
            #expect([1, 2, 3, 4].contains(valid[at]))
        }
    }
}
