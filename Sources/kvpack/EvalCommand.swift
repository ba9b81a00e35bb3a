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
    @Option(help: "Text file to evaluate on, for a model with a tokenizer (default: data/eval/apache-2.0.txt).") var text: String?
    @Option(name: .customLong("scheme"), help: "Scheme spec to evaluate; repeat for several (default: raw:f16 and raw:bf16).")
    var schemes: [String] = []
    @Option(help: "Tokens of evaluation text in all (at least 1024 recommended); with a text file, the first N of it (default: all).") var tokens: Int?
    @Option(help: "Stories the text is split into (each within the model's context).") var stories = 4
    @Option(help: "Seed for sampling the text.") var seed: UInt64 = 1
    @Option(help: "Temperature for sampling the text.") var temperature: Float = 1
    @Option(help: "Tokens per sealed block.") var segmentTokens = 64
    @Option(help: "Keep the evaluation files in this directory (default: a temporary one, removed).") var keep: String?
    @Flag(help: "Print JSON.") var json = false

    func run() throws {
        let llama = try LlamaModel(path: try ModelLocator.resolve(model))
        var fixedText: (ids: [Int], source: String)?
        if let tokenizer = llama.tokenizer {
            let path = text ?? "data/eval/apache-2.0.txt"
            guard let data = FileManager.default.contents(atPath: path) else {
                throw CLIError("eval: cannot read the evaluation text \(path)\(text == nil ? " (the default, relative to the repository root; pass --text FILE)" : "")")
            }
            var ids = tokenizer.encode(String(decoding: data, as: UTF8.self))
            if let tokens { ids = Array(ids.prefix(tokens)) }
            fixedText = (ids, path)
        } else if text != nil {
            throw CLIError("eval: \(model) has no tokenizer, so it cannot read --text; it samples its own stories")
        }
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
            do {
                return try QualityEval.run(model: llama, options: options) { if !json { printError("eval: \($0)") } }
            } catch let e as KVPackError {
                throw CLIError("eval: \(e)")
            }
        }
        if json { return try printJSON(report) }
        print("kvpack eval: \(report.model)")
        if let source = report.text {
            print("text: \(source), \(report.tokens) tokens")
        } else {
            print("text: \(report.stories) stories, \(report.tokens) tokens, sampled at temperature \(report.temperature), seed \(report.seed)")
        }
        print("")
        print(Self.table(report))
    }

    static func table(_ report: QualityEval.Report) -> String {
        let header = ["scheme", "K bits", "V bits", "total bits", "vs f16", "K err", "V err", "attn err", "ppl", "Δppl", "agree"]
        var rows = [header]
        for (i, r) in ([report.baseline] + report.schemes).enumerated() {
            rows.append([
                r.spec + (i == 0 ? " (baseline)" : ""),
                String(format: "%.3f", r.keyBitsPerElement), String(format: "%.3f", r.valueBitsPerElement),
                String(format: "%.3f", r.totalBitsPerElement), String(format: "%.2fx", r.compressionVsF16),
                String(format: "%.2e", r.keyRelativeError), String(format: "%.2e", r.valueRelativeError),
                String(format: "%.2e", r.attentionRelativeError), String(format: "%.4f", r.perplexity),
                String(format: "%+.4f", r.perplexityDelta), String(format: "%.2f%%", 100 * r.greedyAgreement),
            ])
        }
        return formatTable(rows)
    }
}
