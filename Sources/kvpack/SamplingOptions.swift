import ArgumentParser
import KVPackModels

/// The sampler options of `kvpack chat`. Each is optional: what is not given comes from the
/// model (its GGUF's general.sampling keys, or a preset for a known model), else from
/// llama.cpp's defaults. `--temperature 0` is greedy.
struct SamplingOptions: ParsableArguments {
    @Option(help: ArgumentHelp("Divides the logits before the draw: lower is more predictable, 0 is greedy (always the most likely token, deterministic; 135M models loop under greedy decoding).", valueName: "t"))
    var temperature: Float?
    @Option(name: .customLong("top-k"), help: ArgumentHelp("Draw only from the k most likely tokens; 0 keeps all.", valueName: "k"))
    var topK: Int?
    @Option(name: .customLong("top-p"), help: ArgumentHelp("Nucleus sampling: draw only from the most likely tokens whose probabilities add up to p; 1 keeps all.", valueName: "p"))
    var topP: Float?
    @Option(name: .customLong("min-p"), help: ArgumentHelp("Drop tokens less likely than p times the most likely one; 0 keeps all.", valueName: "p"))
    var minP: Float?
    @Option(help: ArgumentHelp("Repetition penalty on tokens of the last --penalty-last-n: a positive logit is divided by it, a negative one multiplied; 1 is off. ChatML markers and newlines are exempt, so replies still end.", valueName: "x"))
    var repeatPenalty: Float?
    @Option(help: ArgumentHelp("Subtracted once from the logit of every token seen in the last --penalty-last-n; 0 is off.", valueName: "x"))
    var presencePenalty: Float?
    @Option(help: ArgumentHelp("Subtracted from a token's logit per time it appears in the last --penalty-last-n; 0 is off.", valueName: "x"))
    var frequencyPenalty: Float?
    @Option(help: ArgumentHelp("How many recent tokens of the conversation the penalties look at.", valueName: "n"))
    var penaltyLastN: Int?
    @Option(help: ArgumentHelp("DRY (don't repeat yourself): a token that would continue a run of tokens already said earlier in the conversation (at least --dry-allowed-length long, not crossing a newline, :, \", * or a ChatML marker) loses multiplier * base^(run - allowed) from its logit, so copying an earlier reply gets less likely with every token copied; 0 is off.", valueName: "x"))
    var dryMultiplier: Float?
    @Option(help: ArgumentHelp("DRY: how fast the penalty grows with the length of the repeated run.", valueName: "x"))
    var dryBase: Float?
    @Option(help: ArgumentHelp("DRY: the longest run repeated without penalty.", valueName: "n"))
    var dryAllowedLength: Int?
    @Option(help: ArgumentHelp("DRY: how many recent tokens it searches for repeats; 0 is the whole conversation.", valueName: "n"))
    var dryPenaltyLastN: Int?
    @Option(help: ArgumentHelp("Seed of the draw. With the position a reply starts at, it fixes the reply: the same seed and settings give the same reply in one process or after --resume.", valueName: "n"))
    var seed: UInt64?

    /// The settings for `model`, and where the defaults came from.
    func settings(for model: LlamaModel) throws -> (settings: SamplerSettings, source: String) {
        var (s, source) = SamplerSettings.defaults(for: model.weights)
        if let temperature { s.temperature = temperature }
        if let topK { s.topK = topK }
        if let topP { s.topP = topP }
        if let minP { s.minP = minP }
        if let repeatPenalty { s.repeatPenalty = repeatPenalty }
        if let presencePenalty { s.presencePenalty = presencePenalty }
        if let frequencyPenalty { s.frequencyPenalty = frequencyPenalty }
        if let penaltyLastN { s.penaltyLastN = penaltyLastN }
        if let seed { s.seed = seed }
        if let dryMultiplier { s.dryMultiplier = dryMultiplier }
        if let dryBase { s.dryBase = dryBase }
        if let dryAllowedLength { s.dryAllowedLength = dryAllowedLength }
        if let dryPenaltyLastN { s.dryPenaltyLastN = dryPenaltyLastN }
        let given = [temperature != nil, topK != nil, topP != nil, minP != nil, repeatPenalty != nil, presencePenalty != nil,
                     frequencyPenalty != nil, penaltyLastN != nil, seed != nil, dryMultiplier != nil, dryBase != nil,
                     dryAllowedLength != nil, dryPenaltyLastN != nil].contains(true)
        if given { source = "the command line; the rest from \(source)" }
        // Greedy means greedy: penalties apply at temperature 0 only when asked for.
        if s.temperature == 0, repeatPenalty == nil { s.repeatPenalty = 1 }
        if s.temperature == 0, dryMultiplier == nil { s.dryMultiplier = 0 }
        do { try s.validate() } catch { throw ValidationError("sampling: \(error)") }
        return (s, source)
    }
}
