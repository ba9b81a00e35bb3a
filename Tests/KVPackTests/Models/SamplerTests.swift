import Foundation
import Testing
@testable import KVPack
@testable import KVPackModels

struct SamplerTests {
    /// 100 logits, token 7 the most likely, 3 next, then a long flat tail.
    static let logits: [Float] = (0 ..< 100).map { $0 == 7 ? 5 : $0 == 3 ? 4.5 : Float($0 % 5) * 0.1 }

    func draws(_ settings: SamplerSettings, _ logits: [Float] = logits, recent: [UInt32] = [], count: Int = 2000) -> [Int: Int] {
        var sampler = Sampler(settings: settings)
        var tally: [Int: Int] = [:]
        for _ in 0 ..< count { tally[sampler.sample(logits, recent: recent[...]), default: 0] += 1 }
        return tally
    }

    @Test("greedy is the first maximum; top-k 1 and a tiny top-p are greedy at any temperature")
    func greedyLimits() {
        #expect(draws(.greedy, count: 10) == [7: 10])
        #expect(draws(SamplerSettings(temperature: 2, topK: 1, topP: 1, minP: 0)) == [7: 2000])
        #expect(draws(SamplerSettings(temperature: 2, topK: 0, topP: 0.01, minP: 0)) == [7: 2000])
        var tie = [Float](repeating: 0, count: 10)
        tie[4] = 1
        tie[6] = 1
        var greedy = Sampler(settings: .greedy)
        #expect(greedy.sample(tie) == 4)
    }

    @Test("top-k, top-p and min-p keep exactly the tokens they promise, and the draw follows the kept probabilities")
    func filters() {
        // top-k 2: only 7 and 3, in the ratio e^5 : e^4.5 at temperature 1.
        let k2 = draws(SamplerSettings(temperature: 1, topK: 2, topP: 1, minP: 0), count: 4000)
        #expect(Set(k2.keys) == [7, 3])
        let share = Double(k2[7]!) / 4000, expected = 1 / (1 + exp(-0.5))
        #expect(abs(share - expected) < 0.03, "token 7 drawn \(share), expected \(expected)")
        // min-p 0.5: p_i >= 0.5 p_max keeps 7 and 3 (e^-0.5 = 0.61), nothing from the tail (e^-4.6).
        #expect(Set(draws(SamplerSettings(temperature: 1, topK: 0, topP: 1, minP: 0.5)).keys) == [7, 3])
        // top-p 0.5: 7 alone has p = 0.32 of this distribution; 7 and 3 together pass 0.5.
        #expect(Set(draws(SamplerSettings(temperature: 1, topK: 0, topP: 0.5, minP: 0)).keys) == [7, 3])
        // Nothing filtered: the tail is drawn too.
        #expect(draws(SamplerSettings(temperature: 1, topK: 0, topP: 1, minP: 0)).count > 50)
        // A lower temperature sharpens what is kept.
        let cold = draws(SamplerSettings(temperature: 0.1, topK: 2, topP: 1, minP: 0))
        #expect(cold[7, default: 0] > 1980)
    }

    @Test("the repetition, presence and frequency penalties push seen tokens down; exempt tokens are left alone")
    func penalties() {
        var logits = [Float](repeating: 0, count: 10)
        logits[2] = 3
        logits[5] = 2.9
        let recent: [UInt32] = [2, 2, 1]
        // Greedy with a repetition penalty: 3 / 1.1 = 2.73 < 2.9.
        #expect(draws(SamplerSettings(temperature: 0, topK: 0, topP: 1, minP: 0, repeatPenalty: 1.1), logits, recent: recent, count: 1) == [5: 1])
        #expect(draws(.greedy, logits, recent: recent, count: 1) == [2: 1])
        #expect(draws(SamplerSettings(temperature: 0, topK: 0, topP: 1, minP: 0, presencePenalty: 0.2), logits, recent: recent, count: 1) == [5: 1])
        // Frequency: 2 seen twice, 3 - 2 * 0.04 = 2.92 still above 2.9; 0.06 per occurrence is not.
        #expect(draws(SamplerSettings(temperature: 0, topK: 0, topP: 1, minP: 0, frequencyPenalty: 0.04), logits, recent: recent, count: 1) == [2: 1])
        #expect(draws(SamplerSettings(temperature: 0, topK: 0, topP: 1, minP: 0, frequencyPenalty: 0.06), logits, recent: recent, count: 1) == [5: 1])
        // Only the last penaltyLastN tokens count.
        #expect(draws(SamplerSettings(temperature: 0, topK: 0, topP: 1, minP: 0, repeatPenalty: 1.1, penaltyLastN: 1), logits, recent: recent, count: 1) == [2: 1])
        // A negative logit is multiplied, i.e. pushed further down.
        var negative = [Float](repeating: -1, count: 4)
        negative[0] = -0.5
        negative[1] = -0.52
        #expect(draws(SamplerSettings(temperature: 0, topK: 0, topP: 1, minP: 0, repeatPenalty: 1.1), negative, recent: [0], count: 1) == [1: 1])
        var exempt = Sampler(settings: SamplerSettings(temperature: 0, topK: 0, topP: 1, minP: 0, repeatPenalty: 1.1))
        exempt.exempt = [2]
        #expect(exempt.sample(logits, recent: recent[...]) == 2)
    }

    @Test("DRY pushes down the token that would continue an earlier run, more for longer runs; breakers end runs")
    func dry() {
        var logits = [Float](repeating: 0, count: 10)
        logits[7] = 1
        logits[9] = 0.5
        let settings = SamplerSettings(temperature: 0, topK: 0, topP: 1, minP: 0, dryMultiplier: 0.8, dryBase: 1.75, dryAllowedLength: 2)
        func pick(_ context: [UInt32], breakers: Set<Int> = [], exempt: Set<Int> = []) -> Int {
            var s = Sampler(settings: settings)
            s.sequenceBreakers = breakers
            s.exempt = exempt
            return s.sample(logits, recent: context[...])
        }
        // "5 6 7 ... 5 6": continuing with 7 repeats a run of 2 -> 1 - 0.8 = 0.2 < 0.5.
        #expect(pick([5, 6, 7, 8, 5, 6]) == 9)
        // A run of 1 is allowed (dryAllowedLength 2).
        #expect(pick([3, 6, 7, 8, 5, 6]) == 7)
        // A breaker inside the run stops it; a breaker or exempt token is never penalised.
        #expect(pick([5, 6, 7, 8, 5, 6], breakers: [5]) == 7)
        #expect(pick([5, 6, 7, 8, 5, 6], breakers: [7]) == 7)
        #expect(pick([5, 6, 7, 8, 5, 6], exempt: [7]) == 7)
        // Longer runs cost more: 3 tokens -> 0.8 * 1.75 = 1.4, even a larger lead loses.
        logits[7] = 1.9
        logits[9] = 1.0
        #expect(pick([4, 5, 6, 7, 8, 5, 6]) == 7)
        #expect(pick([4, 5, 6, 7, 8, 4, 5, 6]) == 9)
        // Only the last dryPenaltyLastN tokens are searched.
        var near = Sampler(settings: { var s = settings; s.dryPenaltyLastN = 4; return s }())
        #expect(near.sample(logits, recent: [4, 5, 6, 7, 8, 4, 5, 6][...]) == 7)
    }

    @Test("a reseeded sampler repeats its draws; another position or seed draws differently")
    func reseed() {
        let settings = SamplerSettings(temperature: 1, topK: 0, topP: 1, minP: 0, seed: 9)
        func run(_ s: SamplerSettings, position: Int) -> [Int] {
            var sampler = Sampler(settings: s)
            sampler.reseed(position: position)
            return (0 ..< 64).map { _ in sampler.sample(Self.logits) }
        }
        #expect(run(settings, position: 40) == run(settings, position: 40))
        #expect(run(settings, position: 40) != run(settings, position: 41))
        var other = settings
        other.seed = 10
        #expect(run(settings, position: 40) != run(other, position: 40))
    }

    @Test("temperature alone draws as the sampler always has (seeded results stay reproducible)")
    func legacyTemperature() {
        // The draw before top-k/top-p/min-p existed: softmax over the vocabulary in index order.
        var old = SplitMix64(seed: 3)
        var legacy: [Int] = []
        for _ in 0 ..< 200 {
            let m = Self.logits.max()!
            let w = Self.logits.map { expf(($0 - m) / 0.8) }
            var r = Float(old.nextUniform()) * w.reduce(0, +)
            var pick = w.count - 1
            for (i, x) in w.enumerated() { r -= x; if r <= 0 { pick = i; break } }
            legacy.append(pick)
        }
        var sampler = Sampler(temperature: 0.8, seed: 3)
        #expect((0 ..< 200).map { _ in sampler.sample(Self.logits) } == legacy)
    }

    @Test("settings are checked, summarised, and greedy stays greedy")
    func settings() throws {
        #expect(throws: KVPackError.self) { try SamplerSettings(topP: 0).validate() }
        #expect(throws: KVPackError.self) { try SamplerSettings(minP: 1).validate() }
        #expect(throws: KVPackError.self) { try SamplerSettings(temperature: -1).validate() }
        #expect(throws: KVPackError.self) { try SamplerSettings(repeatPenalty: 0).validate() }
        try SamplerSettings.llamaCpp.validate()
        #expect(SamplerSettings.greedy.summary == "greedy")
        #expect(SamplerSettings.llamaCpp.summary == "temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, seed 1")
        #expect(SamplerSettings(temperature: 0.2, topP: 0.9, repeatPenalty: 1.1).summary
            == "temperature 0.2, top-k 40, top-p 0.9, min-p 0.05, repeat-penalty 1.1, penalty-last-n 64, seed 1")
        #expect(SamplerSettings(temperature: 0.2, dryMultiplier: 0.8).summary
            == "temperature 0.2, top-k 40, top-p 0.95, min-p 0.05, dry 0.8 (base 1.75, allowed 2), seed 1")
    }

    @Test("the chat template families other than ChatML are named")
    func templateFamilies() {
        #expect(ChatTemplate.family(of: "{{ '<|start_header_id|>' + message['role'] }}") == "Llama 3 style")
        #expect(ChatTemplate.family(of: "{{ '[INST] ' + content }}") == "Llama 2 / Mistral [INST] style")
        #expect(ChatTemplate.family(of: "{{ x }}") == "an unrecognised template")
    }
}

struct RoPEShiftTests {
    /// RoPE at `position` of a head of width d, in double precision (pairs per `layout`).
    static func rotate(_ x: [Float], position: Int, theta: Double, layout: RoPELayout) -> [Double] {
        let d = x.count, half = d / 2
        var out = x.map(Double.init)
        for i in 0 ..< half {
            let (a, b) = layout == .interleaved ? (2 * i, 2 * i + 1) : (i, i + half)
            let angle = Double(position) / Foundation.pow(theta, Double(2 * i) / Double(d))
            let (xa, xb) = (Double(x[a]), Double(x[b]))
            out[a] = xa * Foundation.cos(angle) - xb * Foundation.sin(angle)
            out[b] = xa * Foundation.sin(angle) + xb * Foundation.cos(angle)
        }
        return out
    }

    @Test("moving a post-RoPE key by delta equals encoding it at the new position", arguments: [RoPELayout.interleaved, .rotateHalf])
    func shiftEqualsRotation(layout: RoPELayout) throws {
        var rng = SplitMix64(seed: 4)
        let d = 64
        let raw = (0 ..< d).map { _ in Float(rng.nextGaussian()) }
        var shift = try RoPEShift(rope: RoPEConfig(theta: 100_000, layout: layout), headDim: d)
        for (from, to) in [(7000, 12), (8191, 4095), (5, 900), (300, 300)] {
            var key = Self.rotate(raw, position: from, theta: 100_000, layout: layout).map(Float.init)
            shift.set(delta: to - from)
            key.withUnsafeMutableBufferPointer { shift.apply($0.baseAddress!) }
            let want = Self.rotate(raw, position: to, theta: 100_000, layout: layout)
            let err = zip(key, want).map { abs(Double($0) - $1) }.max()!
            #expect(err < 1e-5, "\(from) -> \(to): max error \(err)")
        }
        #expect(throws: KVPackError.self) { try RoPEShift(rope: .none, headDim: d) }
    }

    @Test("a repositioned conversion renumbers the kept tokens from 0 and attention over it equals attention over the rotated source")
    func repositionedConversion() throws {
        let dir = temporaryDirectory()
        let g = ModelGeometry(layerCount: 2, queryHeadCount: 4, kvHeadCount: 2, headDim: 16)
        let data = RandomKV(geometry: g, tokens: 120, seed: 3, maxExponent: 4)
        let (m, _) = try makeManifest(g, segmentTokens: 32, spec: "raw:f32")
        let w = try KVPackWriter.create(path: dir + "/src.kvpack", manifest: m, options: testOptions())
        try w.append(tokenIDs: (0 ..< 120).map { UInt32($0) }, positions: (0 ..< 120).map { UInt32(500 + $0) },
                     keys: data.batch(data.keys, from: 0, to: 120), values: data.batch(data.values, from: 0, to: 120),
                     layout: .layerTokenHead(g, tokens: 120))
        try w.close()
        let kept = Array(0 ..< 4) + Array(70 ..< 120)
        var p = TokenSelection.Parameters()
        p.policy = .recent
        p.budget = kept.count
        p.sinkTokens = 4
        p.recentWindow = 50
        p.anchor = .zeros
        let selection = TokenSelection(parameters: p, sourceTokenCount: 120, signatureBits: 0, kept: kept,
                                       reasons: kept.map { $0 < 4 ? .sink : .recent }, importance: kept.map { _ in 0 }, signatures: [], anchor: [])
        var o = Converter.Options()
        o.durability = .flush
        o.repositioned = true
        o.metadata = [.init("note", "shifted")]
        let report = try Converter.convert(input: dir + "/src.kvpack", output: dir + "/out.kvpack", spec: SchemeSpec.parse("raw:f32", geometry: g),
                                           layers: [], selection: selection, options: o)
        let out = try KVPackReader(path: dir + "/out.kvpack")
        #expect(try out.tokens(0 ..< out.tokenCount).positions == (0 ..< UInt32(kept.count)).map { $0 })
        #expect(try out.tokenIDs == kept.map { UInt32($0) })
        #expect(out.manifest.metadata("note") == "shifted")
        // Errors are measured against the source keys moved to the new positions: a rotation in
        // float, nothing else.
        #expect(report.keyRelativeError < 1e-6 && report.valueRelativeError == 0 && report.attentionRelativeError < 1e-5)
        // Token 70 (at 570) is now at 4: its key is the source key turned by -566.
        let src = try KVPackReader(path: dir + "/src.kvpack")
        var key = Array(try src.decode(layer: 1, kvHead: 1, kind: .key)[70 * 16 ..< 71 * 16])
        var shift = try RoPEShift(rope: m.rope, headDim: 16)
        shift.set(delta: 4 - 570)
        key.withUnsafeMutableBufferPointer { shift.apply($0.baseAddress!) }
        #expect(Array(try out.decode(layer: 1, kvHead: 1, kind: .key)[4 * 16 ..< 5 * 16]) == key)
    }
}
