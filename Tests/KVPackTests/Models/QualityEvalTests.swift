import Foundation
import Testing
@testable import KVPack
@testable import KVPackModels

struct QualityEvalTests {
    func report(schemes: [String], keyNoise: Float = 0) throws -> QualityEval.Report {
        var o = QualityEval.Options(directory: temporaryDirectory())
        o.schemes = schemes
        o.storyCount = 2
        o.totalTokens = 320
        o.keyNoise = keyNoise
        return try QualityEval.run(model: bundledModel, options: o)
    }

    @Test("eval measures lossless as lossless and f16/bf16 as small, ordered errors")
    func losslessAndRaw() throws {
        let r = try report(schemes: ["raw:f32", "raw:f16", "raw:bf16"])
        #expect(r.tokens == 320)
        let f32 = r.schemes[0], f16 = r.schemes[1], bf16 = r.schemes[2]
        // raw:f32 is the baseline's encoding: every difference is exactly zero.
        #expect(f32.keyRelativeError == 0 && f32.valueRelativeError == 0)
        #expect(f32.perplexityDelta == 0)
        #expect(f32.greedyAgreement == 1)
        #expect(f32.keyBitsPerElement >= 32 && f32.keyBitsPerElement < 36)
        // f16: rounding error ~2^-12 per element, perplexity essentially unchanged; the model's
        // greedy choice only moves where its top two logits are within ~0.01 of each other.
        #expect(f16.keyRelativeError > 1e-5 && f16.keyRelativeError < 1e-3)
        #expect(abs(f16.perplexityDelta) < 0.001 * r.baseline.perplexity)
        #expect(f16.greedyAgreement >= 0.98)
        #expect(f16.keyBitsPerElement >= 16 && f16.keyBitsPerElement < 18)
        #expect(abs(f16.compressionVsF16 - 16 / f16.totalBitsPerElement) < 1e-9)
        // bf16 keeps 8 mantissa bits to f16's 11: about 8x the error.
        #expect(bf16.keyRelativeError > 4 * f16.keyRelativeError)
        #expect(bf16.attentionRelativeError > f16.attentionRelativeError)
    }

    @Test("the measured planner runs the model per layer and role, and plans within its budget")
    func measuredPlanner() throws {
        let g = bundledModel.config.geometry
        let tokens = Array(try QualityEval.stories(model: bundledModel, options: {
            var o = QualityEval.Options(directory: temporaryDirectory()); o.storyCount = 1; o.totalTokens = 80; return o
        }())[0])
        let probe = try #require(try ParsedSchemeSpec("int:auto:3.0:measured:kc8", geometry: g).sensitivityProbe)
        let s = try LayerSensitivityProbe.measure(model: bundledModel, tokens: tokens, probe: probe, segmentTokens: 8, directory: temporaryDirectory())
        #expect(s.key.count == g.layerCount && s.value.count == g.layerCount && s.tokens == 80)
        #expect((s.key + s.value).allSatisfy { $0.isFinite })
        // 2-bit codes in one layer cost the model something somewhere (values of head_dim 8 do).
        #expect((s.key + s.value).max()! > 1e-3)
        // The same through a conversation's spec parsing (the prompt is the calibration text).
        let spec = try Conversation.parseSpec("int:auto:3.0:measured:kc8", model: bundledModel, prompt: tokens)
        let bits = spec.layers.map { Int($0.key.descriptor.parameters[0]) + Int($0.value.descriptor.parameters[0]) }
        #expect(bits.reduce(0, +) <= 6 * g.layerCount && spec.rationale[0].contains("measured"))
    }

    @Test("int: K4V2 costs the model less than K2V4 at the same budget, and the planner's plan is reported")
    func moreForKeys() throws {
        let r = try report(schemes: ["int:k4v2", "int:k2v4", "int:auto:3.0"])
        let k4v2 = r.schemes[0], k2v4 = r.schemes[1], auto = r.schemes[2]
        #expect(k4v2.perplexityDelta < k2v4.perplexityDelta)
        #expect(k4v2.keyRelativeError < k2v4.keyRelativeError && k4v2.valueRelativeError > k2v4.valueRelativeError)
        #expect(auto.plan?.count == 7)  // header, 5 layers, average
        #expect(abs(auto.keyBitsPerElement + auto.valueBitsPerElement - k4v2.keyBitsPerElement - k4v2.valueBitsPerElement) < 0.5)
    }

    @Test("a deliberately damaged cache raises every error the eval reports")
    func damagedCache() throws {
        let clean = try report(schemes: ["raw:f16"]).schemes[0]
        let damaged = try report(schemes: ["raw:f16"], keyNoise: 0.2).schemes[0]
        #expect(damaged.keyRelativeError > 0.1 && damaged.keyRelativeError < 0.35, "\(damaged.keyRelativeError)")
        #expect(damaged.valueRelativeError < 1e-3)  // only keys were damaged
        #expect(damaged.attentionRelativeError > 10 * clean.attentionRelativeError)
        #expect(abs(damaged.perplexityDelta) > 10 * abs(clean.perplexityDelta))
        #expect(damaged.greedyAgreement < clean.greedyAgreement)
    }
}

extension QualityEvalTests {
    @Test("a dense cache records the queries that read each KV head: per layer and head, each channel's RMS over the group and the tokens")
    func querySums() throws {
        let g = bundledModel.config.geometry
        let cache = DenseKVCache(geometry: g)
        cache.querySums = QueryChannelSums(geometry: g)
        try bundledModel.forward(tokens: [1, 45, 496, 170, 263], cache: cache)
        let rms = try #require(cache.querySums?.rms)
        #expect(rms.count == g.layerCount * g.kvHeadCount)
        #expect(rms.allSatisfy { $0.count == g.headDim && $0.allSatisfy { $0.isFinite && $0 > 0 } })
        // The same queries summed by hand (a group of queries counted per token).
        var sums = QueryChannelSums(geometry: g)
        let q: [Float] = (0 ..< 2 * g.headDim).map { Float($0 % 7) - 3 }
        q.withUnsafeBufferPointer { sums.add(layer: 0, kvHead: 0, queries: $0.baseAddress!, count: 2) }
        let c0 = sums.rms[0][0], c1 = sums.rms[0][1]
        #expect(abs(c0 - ((9.0 + Double(((g.headDim % 7) - 3) * ((g.headDim % 7) - 3))) / 2).squareRoot()) < 1e-12)
        #expect(c1 > 0 && sums.rms[1].allSatisfy { $0 == 0 })
        #expect(QueryChannelSums(geometry: g).rms.isEmpty)
    }
}
