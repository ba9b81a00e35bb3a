import ArgumentParser
import Foundation
import KVPack
import KVPackInterop

struct EvalTensorsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "eval-tensors",
        abstract: "Reconstruction and attention error of schemes on real Q/K/V tensors (a directory of .npy files).",
        discussion: """
        DIR holds meta.json and q/k/v_layerNN.npy, as ../shared/kv-samples/smollm2-chat/ (SmolLM2-135M-Instruct, head_dim 64, a 613-token chat). Each scheme's file is written with the real writer and read back; K and V errors are relative Frobenius errors against the tensors; the attention error is the reader's attention over the encoded file, for the model's own queries at every reply position (causal), against dense attention over the original tensors.

        "exact attn" is that error with attention computed in f32 over the decoded codes (the scheme's own error); "fast vs exact" is the difference between the two attention outputs over the same file, relative to the exact one: what the integer arithmetic of the fast path adds (0 where a scheme has none, and with --exact).
        """)

    @Argument(help: "Directory with meta.json and the .npy tensors.") var directory: String
    @Option(name: .customLong("scheme"), help: "Scheme spec; repeat for several.") var schemes: [String] = []
    @Option(help: "Tokens per sealed block (unless a scheme sets its residual window).") var segmentTokens = 64
    @Option(help: "Keep the written files here (default: a temporary directory, removed).") var keep: String?
    @Flag(help: "Attention in f32 over the decoded codes only (no integer dot products).") var exact = false
    @Flag(help: "Print JSON.") var json = false

    static let defaultSchemes = ["raw:f16", "int:k8v8", "int:k4v4", "int:k4v2", "int:k2v4", "int:k2v2", "int:auto:3.0"]

    func run() throws {
        let samples = try SampleTensors(directory: directory)
        let report: TensorEval.Report = try withWorkDirectory(keep: keep, prefix: "kvpack-tensors") { work in
            try TensorEval.run(samples: samples, schemes: schemes.isEmpty ? Self.defaultSchemes : schemes,
                               segmentTokens: segmentTokens, directory: work, arithmetic: exact ? .exact : .fast) { if !json { printError("eval-tensors: \($0)") } }
        }
        if json { return try printJSON(report) }
        print("kvpack eval-tensors: \(samples.meta.model), \(report.tokens) tokens, \(samples.geometry)")
        print("attention at positions \(report.positions)")
        print("")
        let header = ["scheme", "K bits", "V bits", "total bits", "K err", "V err", "attn err", "exact attn", "fast vs exact"]
        var rows = [header]
        for r in report.results {
            rows.append([r.spec, String(format: "%.3f", r.keyBitsPerElement), String(format: "%.3f", r.valueBitsPerElement),
                         String(format: "%.3f", r.totalBitsPerElement), String(format: "%.2e", r.keyRelativeError),
                         String(format: "%.2e", r.valueRelativeError), String(format: "%.2e", r.attentionRelativeError),
                         String(format: "%.2e", r.exactAttentionRelativeError), String(format: "%.2e", r.fastVsExactRelativeError)])
        }
        print(formatTable(rows))
        for r in report.results { for line in r.plan ?? [] { print("\(r.spec) plan: \(line)") } }
    }
}
