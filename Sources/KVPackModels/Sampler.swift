#if canImport(Glibc)
import Glibc
#endif
import KVPack

/// How the next token is chosen: llama.cpp's sampler chain, in its default order. Penalties
/// first (over the last `penaltyLastN` tokens of the conversation), then top-k, top-p and min-p
/// on the untempered distribution, then temperature, then one draw from a seeded generator.
/// A temperature of 0 is greedy: the first maximum of the (penalised) logits, as llama2.c.
public struct SamplerSettings: Sendable, Equatable, Codable {
    /// Divides the logits before the draw; 0 is greedy.
    public var temperature: Float
    /// Keep only the k most likely tokens; 0 keeps all.
    public var topK: Int
    /// Keep the most likely tokens whose probabilities sum to at least p; 1 keeps all.
    public var topP: Float
    /// Drop tokens less likely than minP times the most likely one; 0 keeps all.
    public var minP: Float
    /// Tokens seen in the last `penaltyLastN`: a positive logit is divided by it, a negative one
    /// multiplied (llama.cpp's and CTRL's repetition penalty); 1 is off.
    public var repeatPenalty: Float
    /// Subtracted once from the logit of every token seen in the last `penaltyLastN`; 0 is off.
    public var presencePenalty: Float
    /// Subtracted per occurrence in the last `penaltyLastN`; 0 is off.
    public var frequencyPenalty: Float
    /// How many of the most recent tokens the penalties look at.
    public var penaltyLastN: Int
    /// DRY ("don't repeat yourself", as llama.cpp and koboldcpp implement it): a token that would
    /// extend a run of tokens already seen earlier in the conversation, when that run is at
    /// least `dryAllowedLength` long, loses `dryMultiplier * dryBase^(run - dryAllowedLength)`
    /// from its logit. Verbatim repetition of an earlier reply then gets less likely with every
    /// token it copies; 0 is off. Runs do not cross the chat's sequence breakers (newline,
    /// `:`, `"`, `*`, the ChatML markers).
    public var dryMultiplier: Float
    public var dryBase: Float
    public var dryAllowedLength: Int
    /// How far back DRY looks; 0: the whole conversation.
    public var dryPenaltyLastN: Int
    /// With the position a reply starts at, seeds the draw (see `Sampler.reseed(position:)`).
    public var seed: UInt64

    public init(temperature: Float = 0.8, topK: Int = 40, topP: Float = 0.95, minP: Float = 0.05, repeatPenalty: Float = 1,
                presencePenalty: Float = 0, frequencyPenalty: Float = 0, penaltyLastN: Int = 64, seed: UInt64 = 1,
                dryMultiplier: Float = 0, dryBase: Float = 1.75, dryAllowedLength: Int = 2, dryPenaltyLastN: Int = 0) {
        self.temperature = temperature
        self.topK = topK
        self.topP = topP
        self.minP = minP
        self.repeatPenalty = repeatPenalty
        self.presencePenalty = presencePenalty
        self.frequencyPenalty = frequencyPenalty
        self.penaltyLastN = penaltyLastN
        self.seed = seed
        self.dryMultiplier = dryMultiplier
        self.dryBase = dryBase
        self.dryAllowedLength = dryAllowedLength
        self.dryPenaltyLastN = dryPenaltyLastN
    }

    /// llama.cpp's defaults (common/common.h): temperature 0.8, top-k 40, top-p 0.95, min-p 0.05,
    /// no penalties.
    public static let llamaCpp = SamplerSettings()

    /// Greedy decoding, nothing else.
    public static let greedy = SamplerSettings(temperature: 0, topK: 0, topP: 1, minP: 0)

    public var isGreedy: Bool { temperature <= 0 }
    var penalises: Bool { penaltyLastN > 0 && (repeatPenalty != 1 || presencePenalty != 0 || frequencyPenalty != 0) }
    var dry: Bool { dryMultiplier > 0 }
    /// Only a temperature: the draw runs over the whole vocabulary in index order, as it did
    /// before the other samplers existed, so older seeded results stay reproducible.
    var temperatureOnly: Bool { (topK <= 0) && topP >= 1 && minP <= 0 && !penalises && !dry }

    /// Checks the ranges llama.cpp accepts; the message names the option.
    public func validate() throws {
        func check(_ ok: Bool, _ what: String) throws { if !ok { throw KVPackError.argument(what) } }
        try check(temperature.isFinite && temperature >= 0, "temperature \(temperature) must be finite and >= 0")
        try check(topK >= 0, "top-k \(topK) must be >= 0 (0 keeps every token)")
        try check(topP > 0 && topP <= 1, "top-p \(topP) must be in (0, 1] (1 keeps every token)")
        try check(minP >= 0 && minP < 1, "min-p \(minP) must be in [0, 1) (0 keeps every token)")
        try check(repeatPenalty.isFinite && repeatPenalty > 0, "repeat-penalty \(repeatPenalty) must be > 0 (1 is off)")
        try check(presencePenalty.isFinite && frequencyPenalty.isFinite, "presence and frequency penalties must be finite")
        try check(penaltyLastN >= 0 && penaltyLastN <= 1 << 20, "penalty-last-n \(penaltyLastN) must be in 0...\(1 << 20)")
        try check(dryMultiplier.isFinite && dryMultiplier >= 0, "dry-multiplier \(dryMultiplier) must be >= 0 (0 is off)")
        try check(dryBase.isFinite && dryBase >= 1, "dry-base \(dryBase) must be >= 1")
        try check(dryAllowedLength >= 1 && dryAllowedLength <= 1 << 10, "dry-allowed-length \(dryAllowedLength) must be in 1...1024")
        try check(dryPenaltyLastN >= 0 && dryPenaltyLastN <= 1 << 24, "dry-penalty-last-n \(dryPenaltyLastN) must be >= 0 (0: the whole conversation)")
    }

    /// One line: what a turn used, as the file's metadata records it.
    public var summary: String {
        if isGreedy && !penalises && !dry { return "greedy" }
        var parts = [isGreedy ? "greedy" : "temperature \(Self.text(temperature))"]
        if !isGreedy {
            parts += ["top-k \(topK)", "top-p \(Self.text(topP))", "min-p \(Self.text(minP))"]
        }
        if repeatPenalty != 1 { parts.append("repeat-penalty \(Self.text(repeatPenalty))") }
        if presencePenalty != 0 { parts.append("presence-penalty \(Self.text(presencePenalty))") }
        if frequencyPenalty != 0 { parts.append("frequency-penalty \(Self.text(frequencyPenalty))") }
        if penalises { parts.append("penalty-last-n \(penaltyLastN)") }
        if dry {
            parts.append("dry \(Self.text(dryMultiplier)) (base \(Self.text(dryBase)), allowed \(dryAllowedLength)"
                + (dryPenaltyLastN > 0 ? ", last \(dryPenaltyLastN))" : ")"))
        }
        if !isGreedy { parts.append("seed \(seed)") }
        return parts.joined(separator: ", ")
    }

    static func text(_ v: Float) -> String {
        let s = "\(v)"
        return s.hasSuffix(".0") ? String(s.dropLast(2)) : s
    }

    /// The model's own recommendation: the `general.sampling.*` keys of its GGUF (llama.cpp's
    /// names), else a preset for a model known here (`source` says which), else llama.cpp's
    /// defaults. Keys the GGUF leaves out come from the preset or llama.cpp.
    public static func defaults(for weights: LlamaWeights) -> (settings: SamplerSettings, source: String) {
        var s = SamplerSettings.llamaCpp
        var source = "llama.cpp's defaults"
        let name = (weights.modelName ?? "") + " " + weights.path
        if name.lowercased().contains("smollm2") {
            // SmolLM2's model card: temperature 0.2, top_p 0.9. The repetition penalty and DRY
            // are this project's measured choice (README, "Sampling"): at that temperature a 135M
            // model loops within a reply without the one and repeats earlier replies word for
            // word in a long chat without the other.
            s.temperature = 0.2
            s.topP = 0.9
            s.repeatPenalty = 1.1
            s.dryMultiplier = 0.8
            source = "SmolLM2's model card (temperature 0.2, top-p 0.9) with repeat-penalty 1.1 and DRY 0.8 (measured, README)"
        }
        let g = weights.samplingDefaults
        if !g.isEmpty {
            if let v = g["temp"] { s.temperature = Float(v) }
            if let v = g["top_k"] { s.topK = Int(v) }
            if let v = g["top_p"] { s.topP = Float(v) }
            if let v = g["min_p"] { s.minP = Float(v) }
            if let v = g["penalty_repeat"] { s.repeatPenalty = Float(v) }
            if let v = g["penalty_last_n"] { s.penaltyLastN = Int(v) }
            source = "the model's GGUF (general.sampling: \(g.keys.sorted().joined(separator: ", ")))"
        }
        if (try? s.validate()) == nil { return (.llamaCpp, "llama.cpp's defaults (the model's own are out of range)") }
        return (s, source)
    }

}

/// Draws tokens with `SamplerSettings`. Scratch arrays are kept between calls, so a reply
/// allocates nothing per token once they have grown.
public struct Sampler {
    public var settings: SamplerSettings
    public var temperature: Float { settings.temperature }
    /// Tokens the penalties never touch (a chat's end-of-message token: penalising it because
    /// earlier messages ended with it would keep replies from ending).
    public var exempt: Set<Int> = []
    /// Tokens a DRY run does not cross (and never penalised by DRY): `SamplerSettings.dryMultiplier`.
    public var sequenceBreakers: Set<Int> = []
    var rng: SplitMix64
    private var candidates: [(logit: Float, id: Int)] = []
    private var penalised: [Float] = []

    public init(settings: SamplerSettings) {
        self.settings = settings
        rng = SplitMix64(seed: settings.seed)
    }

    /// Plain temperature sampling over the whole vocabulary (0: greedy).
    public init(temperature: Float = 0, seed: UInt64 = 1) {
        self.init(settings: SamplerSettings(temperature: temperature, topK: 0, topP: 1, minP: 0, seed: seed))
    }

    /// Restarts the generator from the seed and `position` (where a reply starts), so a reply
    /// depends only on the conversation so far and the settings: the same in one process and
    /// in a resumed one.
    public mutating func reseed(position: Int) {
        rng = SplitMix64(seed: settings.seed ^ (UInt64(truncatingIfNeeded: position) &* 0xD1B5_4A32_D192_ED03))
    }

    /// The two most likely tokens and how far apart their logits are (how near a tie the greedy
    /// choice was).
    public static func topTwo(_ logits: [Float]) -> (best: Int, second: Int, margin: Float) {
        var best = 0, second = -1
        for i in logits.indices.dropFirst() {
            if logits[i] > logits[best] {
                second = best
                best = i
            } else if second < 0 || logits[i] > logits[second] {
                second = i
            }
        }
        return second < 0 ? (best, best, 0) : (best, second, logits[best] - logits[second])
    }

    public static func argmax(_ logits: ArraySlice<Float>) -> Int {
        var best = logits.startIndex
        for i in logits.indices where logits[i] > logits[best] { best = i }
        return best - logits.startIndex
    }

    /// The next token after `logits`; `context` is the conversation so far (the penalties look
    /// at its last `penaltyLastN` tokens, DRY at its last `dryPenaltyLastN` or all of it).
    public mutating func sample(_ logits: [Float], recent context: ArraySlice<UInt32> = []) -> Int {
        let s = settings
        guard s.penalises || s.dry, !context.isEmpty else { return draw(logits) }
        penalised.removeAll(keepingCapacity: true)
        penalised.append(contentsOf: logits)
        if s.penalises {
            var counts: [Int: Int] = [:]
            for id in context.suffix(s.penaltyLastN) where !exempt.contains(Int(id)) && Int(id) < logits.count {
                counts[Int(id), default: 0] += 1
            }
            for (id, count) in counts {
                var l = penalised[id]
                l = l > 0 ? l / s.repeatPenalty : l * s.repeatPenalty
                l -= Float(count) * s.frequencyPenalty + s.presencePenalty
                penalised[id] = l
            }
        }
        if s.dry { applyDRY(s.dryPenaltyLastN > 0 ? context.suffix(s.dryPenaltyLastN) : context) }
        let scratch = penalised
        return draw(scratch)
    }

    /// DRY on `penalised`: for every earlier occurrence of the last token, the run of tokens
    /// that matches the context's end backwards from there (not crossing a breaker) says that
    /// the token which followed it would extend a repeat of that length.
    private mutating func applyDRY(_ context: ArraySlice<UInt32>) {
        let s = settings
        let n = context.count
        guard n >= 2 else { return }
        let base = context.startIndex
        let last = context[base + n - 1]
        guard !sequenceBreakers.contains(Int(last)) else { return }
        var longest: [Int: Int] = [:]
        for i in stride(from: n - 2, through: 0, by: -1) where context[base + i] == last {
            var run = 1
            while run <= i {
                let a = context[base + i - run], b = context[base + n - 1 - run]
                guard a == b, !sequenceBreakers.contains(Int(b)) else { break }
                run += 1
            }
            let next = Int(context[base + i + 1])
            guard run >= s.dryAllowedLength, next < penalised.count, !exempt.contains(next), !sequenceBreakers.contains(next) else { continue }
            longest[next] = max(longest[next] ?? 0, run)
        }
        for (token, run) in longest {
            // Capped: beyond 40 extra tokens the penalty has long since ruled the token out.
            penalised[token] -= s.dryMultiplier * powf(s.dryBase, Float(min(run - s.dryAllowedLength, 40)))
        }
    }

    private mutating func draw(_ logits: [Float]) -> Int {
        let s = settings
        if s.isGreedy { return Self.argmax(logits[...]) }
        if s.temperatureOnly { return drawAll(logits) }
        selectCandidates(logits)
        // top-p and min-p on the untempered distribution (llama.cpp's order: they come before
        // the temperature).
        let top = candidates[0].logit
        var total = 0.0
        for c in candidates { total += Double(expf(c.logit - top)) }
        var keep = candidates.count
        if s.topP < 1 {
            var cumulative = 0.0
            for (i, c) in candidates.enumerated() {
                cumulative += Double(expf(c.logit - top)) / total
                if cumulative >= Double(s.topP) { keep = i + 1; break }
            }
        }
        if s.minP > 0 {
            // p_i >= minP * p_max  <=>  logit_i >= top + log(minP)
            let floor = top + logf(s.minP)
            var i = 1
            while i < keep, candidates[i].logit >= floor { i += 1 }
            keep = i
        }
        var weights = 0.0
        for c in candidates[0 ..< keep] { weights += Double(expf((c.logit - top) / s.temperature)) }
        var r = rng.nextUniform() * weights
        for c in candidates[0 ..< keep] {
            r -= Double(expf((c.logit - top) / s.temperature))
            if r <= 0 { return c.id }
        }
        return candidates[keep - 1].id
    }

    /// `candidates`: the top-k tokens (all when k is 0), most likely first, ties to the lower id.
    private mutating func selectCandidates(_ logits: [Float]) {
        candidates.removeAll(keepingCapacity: true)
        let k = settings.topK > 0 ? min(settings.topK, logits.count) : logits.count
        if k == logits.count {
            for (i, l) in logits.enumerated() { candidates.append((l, i)) }
            candidates.sort { $0.logit != $1.logit ? $0.logit > $1.logit : $0.id < $1.id }
            return
        }
        for (i, l) in logits.enumerated() {
            if candidates.count == k, l <= candidates[k - 1].logit { continue }
            // Insert after every candidate at least as likely (ties keep the lower id first).
            var lo = 0, hi = candidates.count
            while lo < hi {
                let mid = (lo + hi) / 2
                if candidates[mid].logit >= l { lo = mid + 1 } else { hi = mid }
            }
            if candidates.count == k { candidates.removeLast() }
            candidates.insert((l, i), at: lo)
        }
    }

    /// Softmax(logits / temperature) over the whole vocabulary, drawn in index order.
    private mutating func drawAll(_ logits: [Float]) -> Int {
        let m = logits.max() ?? 0
        let t = settings.temperature
        var total: Float = 0
        for l in logits { total += expf((l - m) / t) }
        var r = Float(rng.nextUniform()) * total
        for (i, l) in logits.enumerated() {
            r -= expf((l - m) / t)
            if r <= 0 { return i }
        }
        return logits.count - 1
    }
}
