import ArgumentParser
import Foundation
import KVPack
import KVPackModels

struct EvalCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "eval",
        abstract: "Measure what each scheme does to a real model: size, reconstruction error, attention error, perplexity, agreement.",
        discussion: """
        The model first samples its own evaluation text (--stories stories from BOS, --tokens in all, fixed --seed). It then reads that text token by token (teacher forcing) through a real file-backed cache, once with a lossless raw:f32 cache (the baseline) and once per --scheme. Past tokens are attended through the reader, from the file.

        Columns: bits per element of keys, of values, and of the whole files (every header, index, tail and blob); compression against f16; relative K and V reconstruction error (decoded file vs the rows the model produced in that run); relative attention-output error at every 4th position (vs dense attention over those exact rows); perplexity of the text and its difference from the baseline; and the share of positions whose greedy next token matches the baseline's.
        """)

    @Option(help: "llama2.c checkpoint.") var model: String
    @Option(name: .customLong("scheme"), help: "Scheme spec to evaluate; repeat for several (default: raw:f16 and raw:bf16).")
    var schemes: [String] = []
    @Option(help: "Tokens of evaluation text in all (at least 1024 recommended).") var tokens = 1280
    @Option(help: "Stories the text is split into (each within the model's context).") var stories = 4
    @Option(help: "Seed for sampling the text.") var seed: UInt64 = 1
    @Option(help: "Temperature for sampling the text.") var temperature: Float = 1
    @Option(help: "Tokens per sealed block.") var segmentTokens = 64
    @Option(help: "Keep the evaluation files in this directory (default: a temporary one, removed).") var keep: String?
    @Flag(help: "Print JSON.") var json = false

    func run() throws {
        let llama = try LlamaModel(path: model)
        let report: QualityEval.Report = try withWorkDirectory(keep: keep, prefix: "kvpack-eval") { directory in
            var options = QualityEval.Options(directory: directory)
            if !schemes.isEmpty { options.schemes = schemes }
            options.totalTokens = tokens
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
        print("text: \(report.stories) stories, \(report.tokens) tokens, sampled at temperature \(report.temperature), seed \(report.seed)")
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
