import ArgumentParser
import Foundation
import KVPack
import KVPackModels

struct EvalCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "eval",
        abstract: "Measure what each scheme does to a real model: size, reconstruction error, attention error, perplexity, agreement.",
        discussion: """
        The evaluation text: for a model with a tokenizer (a GGUF, e.g. --model smollm2), a fixed real text, --text (default data/eval/apache-2.0.txt, 2,215 SmolLM2 tokens), read as one sequence; for a llama2.c checkpoint (no tokenizer), text the model samples itself (--stories stories from BOS, --tokens in all, fixed --seed). The model reads it (teacher forcing, in batches that end where segments seal, so each token attends to what it would token by token) (teacher forcing) through a real file-backed cache, once with a lossless raw:f32 cache (the baseline) and once per --scheme. Past tokens are attended through the reader, from the file.

        Columns: bits per element of keys, of values, and of the whole files (every header, index, tail and blob); compression against f16; relative K and V reconstruction error (decoded file vs the rows the model produced in that run); relative attention-output error at every 4th position (vs dense attention over those exact rows); perplexity of the text and its difference from the baseline; and the share of positions whose greedy next token matches the baseline's.
        """)

    @Option(help: "llama2.c checkpoint or GGUF model (smollm2: the one `make models` downloads).") var model: String
    @Option(help: "Text file to evaluate on, for a model with a tokenizer (default: data/eval/apache-2.0.txt); or a .kvpack file, whose token ids are the text (a chat transcript, ChatML tokens included).") var text: String?
    @Option(name: .customLong("scheme"), help: "Scheme spec to evaluate; repeat for several (default: raw:f16 and raw:bf16).")
    var schemes: [String] = []
    @Option(help: "Tokens of evaluation text in all (at least 1024 recommended); with a text file, the first N of it (default: all).") var tokens: Int?
    @Option(help: "Stories the text is split into (each within the model's context).") var stories = 4
    @Option(help: "Seed for sampling the text.") var seed: UInt64 = 1
    @Option(help: "Temperature for sampling the text.") var temperature: Float = 1
    @Option(help: "Tokens per sealed block.") var segmentTokens = 64
    @Option(help: "Keep the evaluation files in this directory (default: a temporary one, removed).") var keep: String?
    @Option(help: ArgumentHelp("Evaluate token selection instead of schemes, at these budgets (fractions, e.g. 0.5,0.25,0.1): kvcrush against keeping the most important and the most recent tokens.", discussion: "At each --prune-at point P the lossless baseline's first P tokens are pruned (as `kvpack prune` does) and the model reads the next --continuation tokens over the pruned file; their perplexity and greedy agreement are compared with the baseline's at the same positions.")) var prune: String?
    @Option(help: "Prune points in tokens, comma-separated (default: every 512 while a continuation fits; half the text when shorter than 1,024).") var pruneAt: String?
    @Option(help: "Tokens read after each prune point.") var continuation = 256
    @Option(help: "Scheme of the pruned files (raw:f32 measures pruning alone; e.g. int:k4v2 measures both).") var pruneScheme = "raw:f32"
    @Option(help: "Pruning: query positions observed before each prune point.") var window = 32
    @Option(help: "Pruning: most recent tokens always kept.") var recent = 16
    @Option(help: "Pruning: first tokens always kept.") var sink = 1
    @Option(help: "Pruning: KVCrush anchor (random, zeros, ones, alternating, mean).") var anchor = "random"
    @Option(help: "Pruning: KVCrush representatives as a share of the budget.") var representativeShare = 0.25
    @Flag(help: "Pruning: renumber the kept tokens from 0 and rotate their keys to match (the context shift `kvpack chat` does), instead of keeping their original positions.") var reposition = false
    @Option(help: "Pruning: policies to compare, comma-separated (kvcrush, importance, recent).") var policies = "kvcrush,importance,recent"
    @Flag(help: "Attention over the quantized caches in f32 over the decoded codes, instead of integer dot products where a scheme has them (int with per-channel key or per-token value groups, on a CPU with AVX2); comparing the two runs measures what the fast path adds.") var exact = false
    @Flag(help: "Print JSON.") var json = false

    func run() throws {
        let llama = try LlamaModel(path: try ModelLocator.resolve(model))
        var fixedText: (ids: [Int], source: String)?
        if let tokenizer = llama.tokenizer {
            let path = text ?? "data/eval/apache-2.0.txt"
            var ids: [Int]
            if path.hasSuffix(".kvpack") {
                ids = try KVPackReader(path: path).tokenIDs.map { Int($0) }
            } else {
                guard let data = FileManager.default.contents(atPath: path) else {
                    throw CLIError("eval: cannot read the evaluation text \(path)\(text == nil ? " (the default, relative to the repository root; pass --text FILE)" : "")")
                }
                ids = tokenizer.encode(String(decoding: data, as: UTF8.self))
            }
            if let tokens { ids = Array(ids.prefix(tokens)) }
            fixedText = (ids, path)
        } else if text != nil {
            throw CLIError("eval: \(model) has no tokenizer, so it cannot read --text; it samples its own stories")
        }
        if let prune { return try runPrune(llama, budgets: prune, text: fixedText) }
        let report: QualityEval.Report = try withWorkDirectory(keep: keep, prefix: "kvpack-eval") { directory in
            var options = QualityEval.Options(directory: directory)
            if !schemes.isEmpty { options.schemes = schemes }
            options.totalTokens = tokens ?? 1280
            options.text = fixedText?.ids
            options.textSource = fixedText?.source
            options.storyCount = stories
            options.seed = seed
            options.temperature = temperature
            options.segmentTokens = segmentTokens
            options.arithmetic = exact ? .exact : .fast
            return try QualityEval.run(model: llama, options: options) { if !json { printError("eval: \($0)") } }
        }
        if json { return try printJSON(report) }
        print("kvpack eval: \(report.model)")
        if let source = report.text {
            print("text: \(source), \(report.tokens) tokens")
        } else {
            print("text: \(report.stories) stories, \(report.tokens) tokens, sampled at temperature \(report.temperature), seed \(report.seed)")
        }
        print(exact ? "attention: exact (f32 over the decoded codes)"
                    : "attention: fast (integer dot products where a scheme has them: \(IntegerCodeKernels.isaName); --exact for f32)")
        print("")
        print(Self.table(report))
    }

    static func table(_ report: QualityEval.Report) -> String {
        let header = ["scheme", "K bits", "V bits", "total bits", "bits@32K", "vs f16", "K err", "V err", "attn err", "ppl", "Δppl", "agree"]
        var rows = [header]
        for (i, r) in ([report.baseline] + report.schemes).enumerated() {
            rows.append([
                r.spec + (i == 0 ? " (baseline)" : ""),
                String(format: "%.3f", r.keyBitsPerElement), String(format: "%.3f", r.valueBitsPerElement),
                String(format: "%.3f", r.totalBitsPerElement), String(format: "%.3f", r.asymptoticBitsPerElement),
                String(format: "%.2fx", r.compressionVsF16),
                String(format: "%.2e", r.keyRelativeError), String(format: "%.2e", r.valueRelativeError),
                String(format: "%.2e", r.attentionRelativeError), String(format: "%.4f", r.perplexity),
                String(format: "%+.4f", r.perplexityDelta), String(format: "%.2f%%", 100 * r.greedyAgreement),
            ])
        }
        return formatTable(rows)
    }

    func runPrune(_ llama: LlamaModel, budgets text: String, text fixed: (ids: [Int], source: String)?) throws {
        let budgets = try text.split(separator: ",").map { part -> Double in
            guard let b = Double(part.trimmingCharacters(in: .whitespaces)), b > 0, b <= 1 else {
                throw ValidationError("--prune: \"\(part)\" is not a fraction in (0, 1]")
            }
            return b
        }
        let points = try pruneAt.map { list in
            try list.split(separator: ",").map { part -> Int in
                guard let p = Int(part.trimmingCharacters(in: .whitespaces)) else { throw ValidationError("--prune-at: \"\(part)\" is not a token count") }
                return p
            }
        }
        guard let anchorKind = TokenSelection.Anchor(name: anchor) else { throw ValidationError("--anchor: random, zeros, ones, alternating or mean") }
        guard (0 ... 1).contains(representativeShare) else { throw ValidationError("--representative-share is within 0...1") }
        let ids: [Int], source: String
        if let fixed {
            (ids, source) = fixed
        } else {
            // A model without a tokenizer reads one story it samples itself, as long as its context allows.
            var o = QualityEval.Options(directory: "")
            o.storyCount = 1
            o.totalTokens = min(tokens ?? llama.config.maxSequence, llama.config.maxSequence)
            o.seed = seed
            o.temperature = temperature
            ids = try QualityEval.stories(model: llama, options: o)[0]
            source = "a story sampled from BOS (seed \(seed), temperature \(temperature))"
        }
        let report: PruneEval.Report = try withWorkDirectory(keep: keep, prefix: "kvpack-eval-prune") { directory in
            var options = PruneEval.Options(directory: directory)
            options.tool = "\(KVPackVersion.producer) eval --prune"
            options.budgets = budgets
            options.points = points
            options.continuation = continuation
            options.storage = pruneScheme
            options.segmentTokens = segmentTokens
            options.selection.observationWindow = window
            options.selection.recentWindow = recent
            options.selection.sinkTokens = sink
            options.selection.anchor = anchorKind
            options.selection.anchorSeed = seed
            options.representativeShare = representativeShare
            options.repositioned = reposition
            options.policies = try policies.split(separator: ",").map { name in
                guard let p = TokenSelection.Policy(name: String(name)) else { throw ValidationError("--policies: kvcrush, importance or recent, got \(name)") }
                return p
            }
            return try PruneEval.run(model: llama, text: ids, textSource: source, options: options) { if !json { printError("eval: \($0)") } }
        }
        if json { return try printJSON(report) }
        print("kvpack eval --prune: \(report.model)")
        print("text: \(report.text), \(report.tokens) tokens; pruned at \(report.points.map(String.init).joined(separator: ", ")), then \(report.continuation) tokens read over the pruned cache (\(report.storage)\(report.repositioned ? "; kept tokens renumbered from 0, keys rotated: a context shift" : ", kept tokens at their original positions"))")
        print("selection: last \(report.observationWindow) queries observed; sink \(report.sinkTokens), recent \(report.recentWindow) always kept; kvcrush anchor \(report.anchor), \(Int(100 * representativeShare))% of the budget as representatives")
        print("")
        var rows = [["policy", "budget", "kept", "ppl", "dense ppl", "Δppl", "agree"]]
        for r in report.results {
            rows.append([r.policy, String(format: "%.0f%%", 100 * r.budget), String(format: "%.1f%%", 100 * r.keptFraction),
                         String(format: "%.4f", r.perplexity), String(format: "%.4f", r.baselinePerplexity),
                         String(format: "%+.4f", r.perplexityDelta), String(format: "%.2f%%", 100 * r.greedyAgreement)])
        }
        print(formatTable(rows))
    }
}
