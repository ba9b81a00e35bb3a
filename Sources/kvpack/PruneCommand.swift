import ArgumentParser
import Foundation
import KVPack
import KVPackModels

struct PruneCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "prune",
        abstract: "Keep a budget of a cache's tokens, chosen by KVCrush (or a baseline policy), in a new .kvpack file.",
        discussion: """
        The model the cache was made with (recorded in IN, or --model) re-reads IN's last --window tokens over the earlier ones, as IN stores them, and every attention head's weights on every token are summed. From them each token gets an importance (cumulative attention over all heads) and a signature (one bit per layer and query head: attended above that head's mean). The selection keeps the first --sink tokens and the last --recent (at least the last token, whose position is where the conversation continues), then, by --policy:
          kvcrush     the top tokens by importance, plus --representatives tokens chosen from those importance would drop: sorted by Hamming distance of their signature to an --anchor and cut into equal buckets, one (the middle) from each;
          importance  the top tokens by importance (H2O);
          recent      the most recent tokens.
        One selection serves every layer (the format keeps one token axis for the whole cache).

        OUT holds the kept tokens, in order, at their original positions (so it resumes exactly where IN left off), encoded in --scheme (default: IN's schemes), plus a tsel frame recording the selection: source indices, importance, signatures, anchor and parameters (`kvpack info OUT` shows it). Streaming: one output segment of every stream is decoded at a time; OUT is written under a temporary name and renamed when complete.

        The budget is a fraction (0.25), a percentage (25%) or a token count (400). --scheme also takes the combined form crush:BUDGET+SCHEME, e.g. crush:0.25+int:k4v2. Pruning an already pruned file (or one resumed and grown since) selects again from all its tokens; `kvpack prune F F --overwrite --budget B` re-applies pruning in place (atomically: readers that have F open keep their version).
        """)

    @Argument(help: "Source .kvpack file (a cache made by kvpack chat, generate or eval).") var input: String
    @Argument(help: "Output .kvpack file.") var output: String
    @Option(help: "Tokens to keep: a fraction (0.25), a percentage (25%) or a count (400).") var budget: String?
    @Option(help: "Scheme spec for the kept tokens (default: IN's), or crush:BUDGET+SCHEME.") var scheme: String?
    @Option(help: "kvcrush, importance or recent.") var policy = "kvcrush"
    @Option(help: "KVCrush buckets, i.e. representatives kept from the tokens importance drops (default: a quarter of the budget).") var representatives: Int?
    @Option(help: "Anchor signature the buckets are measured from: random, zeros, ones, alternating or mean.") var anchor = "random"
    @Option(help: "Seed of the random anchor.") var seed: UInt64 = 1
    @Option(help: "Most recent tokens always kept (at least 1).") var recent = 16
    @Option(help: "First tokens always kept (BOS, the attention sink).") var sink = 1
    @Option(help: "Query positions observed: the last N tokens are re-read by the model.") var window = 32
    @Option(help: "llama2.c checkpoint or GGUF model (default: the one IN records; smollm2: the downloaded one).") var model: String?
    @Flag(help: "Print the selection and report as JSON.") var json = false
    @OptionGroup(title: "Writing the file") var writing: WritingOptions

    struct Output: Encodable {
        var input: String
        var output: String
        var policy: String
        var sourceTokens: Int
        var keptTokens: Int
        var reasons: [String: Int]
        var report: Converter.Report
    }

    func run() throws {
        let source = try openReader(input)
        let g = source.geometry
        var storageText = scheme
        var budgetText = budget
        if let s = scheme, s.hasPrefix("crush:") {
            let parts = s.dropFirst("crush:".count).split(separator: "+", maxSplits: 1)
            guard parts.count >= 1, budgetText == nil else {
                throw ValidationError("--scheme crush:BUDGET+SCHEME gives the budget; do not also pass --budget")
            }
            budgetText = String(parts[0])
            storageText = parts.count == 2 ? String(parts[1]) : nil
        }
        guard let budgetText else { throw ValidationError("give --budget (or --scheme crush:BUDGET+SCHEME)") }
        let n = source.tokenCount
        guard n >= 1 else { throw CLIError("\(input) holds no tokens") }
        let keep = try Self.parseBudget(budgetText, tokens: n)
        guard let policy = TokenSelection.Policy(name: self.policy) else { throw ValidationError("--policy: kvcrush, importance or recent") }
        guard let anchor = TokenSelection.Anchor(name: self.anchor) else {
            throw ValidationError("--anchor: random, zeros, ones, alternating or mean")
        }
        guard recent >= 1, sink >= 0, window >= 1 else { throw ValidationError("--recent and --window are at least 1, --sink at least 0") }

        let modelPath = try ModelLocator.resolve(model ?? recordedModelPath(source))
        printError("prune: loading \(modelPath)")
        let llama = try LlamaModel(path: modelPath)
        try Conversation.checkModel(llama, matches: source)

        // Without --scheme every layer keeps IN's own descriptors (and blobs): no layer converts.
        let spec = try SchemeSpec.parse(storageText ?? "raw:f32", geometry: g) { try CacheStatistics(reader: source, tokens: 1024) }

        printError("prune: observing attention of the last \(min(window, n)) of \(n) tokens")
        let observation = try AttentionObserver.observe(model: llama, reader: source, tokens: n, window: window)
        var p = TokenSelection.Parameters()
        p.policy = policy
        p.anchor = anchor
        p.anchorSeed = seed
        p.budget = keep
        p.representatives = policy == .kvcrush ? (representatives ?? KVCrush.defaultRepresentatives(budget: keep)) : 0
        p.recentWindow = recent
        p.sinkTokens = sink
        p.observationWindow = window
        let selection = KVCrush.select(observation, parameters: p)

        var options = Converter.Options(writing: writing)
        options.tool = KVPackVersion.producer + " prune"
        let progress = Progress(label: "prune \(output)", total: selection.keptCount)
        options.progress = { done, _ in progress.update(done) }
        let report = try Converter.convert(input: input, output: output, spec: spec, layers: storageText == nil ? [] : nil,
                                           selection: selection, options: options)
        progress.finish()
        var reasons: [String: Int] = [:]
        for r in selection.reasons { reasons[Self.name(r), default: 0] += 1 }
        if json {
            return try printJSON(Output(input: input, output: output, policy: policy.description, sourceTokens: n,
                                       keptTokens: selection.keptCount, reasons: reasons, report: report))
        }
        print("\(output): kept \(selection.keptCount) of \(n) tokens (\(String(format: "%.1f", 100 * Double(selection.keptCount) / Double(n)))%) by \(policy)")
        print("kept as: " + TokenSelection.Reason.allCases.compactMap { r in reasons[Self.name(r)].map { "\($0) \(Self.name(r))" } }.joined(separator: ", "))
        print("schemes: \(report.outputSchemes.joined(separator: ", "))")
        print(String(format: "bits per element (kept tokens): K %.3f, V %.3f, file %.3f; storage vs IN: %.1f%%",
                     report.after.key, report.after.value, report.after.total,
                     100 * report.after.total * Double(selection.keptCount) / max(report.before.total * Double(n), 1e-9)))
        print(String(format: "error added to the kept tokens: keys %.3e, values %.3e, attention %.3e (%d random queries)",
                     report.keyRelativeError, report.valueRelativeError, report.attentionRelativeError, report.attentionSamples))
    }

    static func name(_ r: TokenSelection.Reason) -> String {
        switch r {
        case .sink: "sink"
        case .recent: "recent"
        case .important: "important"
        case .representative: "representative"
        }
    }

    /// "0.25", "25%" or "400" -> a token count within 1...tokens.
    static func parseBudget(_ text: String, tokens: Int) throws -> Int {
        let count: Int
        if text.hasSuffix("%"), let pct = Double(text.dropLast()), pct > 0, pct <= 100 {
            count = Int((pct / 100 * Double(tokens)).rounded())
        } else if text.contains("."), let f = Double(text), f > 0, f <= 1 {
            count = Int((f * Double(tokens)).rounded())
        } else if let c = Int(text), c >= 1 {
            count = c
        } else {
            throw ValidationError("budget \"\(text)\": a fraction in (0, 1] like 0.25, a percentage like 25%, or a token count")
        }
        return min(max(count, 1), tokens)
    }
}
