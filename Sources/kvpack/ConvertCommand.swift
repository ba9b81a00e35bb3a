import ArgumentParser
import Foundation
import KVPack

struct ConvertCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "convert",
        abstract: "Rewrite a .kvpack file in other schemes, streaming, and report what the conversion changed.",
        discussion: """
        Decodes one output segment of every stream at a time and re-encodes it, so memory stays bounded by a few segments whatever the file size. The output is written under a temporary name and renamed when complete: an interrupted conversion never leaves a partial OUT. Token ids, positions, the model fingerprint and user metadata are kept; the source's schemes, path, producer and this tool are recorded as convert.N.* metadata.

        With --layers, only those layers take the new scheme; the others keep their own. --rope-layout moves the keys between RoPE pair layouts: interleaved (2j, 2j+1), as llama.cpp and `kvpack chat` store them, and rotate-half (j, j + d/2), as Hugging Face transformers does; each head's key dimensions are permuted, values are untouched, attention is unchanged. Given alone, every layer keeps its scheme. Planners calibrate on IN's first 1,024 tokens (int:auto:BUDGET its norms, svdq its bases); --plan FILE takes a plan saved by `kvpack plan --json`.

        The report: bits per element before and after (keys, values, whole file), the relative error the conversion added to keys and values (decoded OUT against decoded IN, every element), and to attention outputs for random queries over all tokens. Converting between lossless schemes that can represent the source (f16 to f32 and back, bf16 to f32) is bit-exact.
        """)

    @Argument(help: "Source .kvpack file, or s3://bucket/key.") var input: String
    @Argument(help: "Output .kvpack file.") var output: String
    @Option(help: "Scheme spec for the output (see `kvpack --help`).") var scheme: String?
    @Option(help: "A plan saved by `kvpack plan --json` (instead of --scheme).") var plan: String?
    @Option(help: "Layers to convert, e.g. 0-3,7 (default all).") var layers: String?
    @Option(help: "RoPE pair layout of the output's keys: interleaved or rotate-half (default: the input's).") var ropeLayout: String?
    @Option(help: "Random queries for the attention error.") var samples = 64
    @Flag(help: "Print the report as JSON.") var json = false
    @OptionGroup(title: "Writing the file") var writing: WritingOptions

    struct SavedPlan: Decodable {
        var spec: String
        var statistics: CacheStatistics
    }

    func validate() throws {
        guard scheme == nil || plan == nil else { throw ValidationError("give at most one of --scheme and --plan") }
        guard scheme != nil || plan != nil || ropeLayout != nil else {
            throw ValidationError("give --scheme, --plan or --rope-layout (see --help)")
        }
        if let ropeLayout { _ = try pairLayout(ropeLayout) }
    }

    func run() throws {
        let source = try openReader(input)
        defer { reportFetches(source.file) }
        try source.file.ensure(0 ..< source.fileSize)
        let g = source.geometry
        let spec: SchemeSpec
        if let plan {
            guard let data = FileManager.default.contents(atPath: plan) else { throw CLIError("\(plan) cannot be read") }
            let saved = try JSONDecoder().decode(SavedPlan.self, from: data)
            spec = try SchemeSpec.parse(saved.spec, geometry: g, calibration: saved.statistics)
        } else if let scheme {
            spec = try SchemeSpec.parse(scheme, geometry: g) { try CacheStatistics(reader: source, tokens: 1024) }
        } else {
            // --rope-layout alone: every layer keeps its scheme; the spec only fixes the layer count.
            spec = try SchemeSpec.parse("raw:f32", geometry: g)
        }
        var options = Converter.Options(writing: writing)
        options.attentionSamples = samples
        options.ropeLayout = try ropeLayout.map(pairLayout)
        let progress = Progress(label: "convert \(output)", total: source.tokenCount)
        options.progress = { done, _ in progress.update(done) }
        let report = try Converter.convert(input: input, source: source, output: output, spec: spec,
                                           layers: scheme == nil && plan == nil ? [] : try parseLayers(layers, count: g.layerCount),
                                           options: options)
        progress.finish()
        if json { return try printJSON(report) }
        print("\(output): \(report.tokens) tokens converted from \(input)")
        print("schemes before: \(report.inputSchemes.joined(separator: ", "))")
        print("schemes after:  \(report.outputSchemes.joined(separator: ", "))")
        print(formatTable([
            ["", "K bits", "V bits", "total bits"],
            ["before", String(format: "%.3f", report.before.key), String(format: "%.3f", report.before.value), String(format: "%.3f", report.before.total)],
            ["after", String(format: "%.3f", report.after.key), String(format: "%.3f", report.after.value), String(format: "%.3f", report.after.total)],
        ]))
        print(String(format: "error added: keys %.3e, values %.3e, attention %.3e (%d random queries)",
                     report.keyRelativeError, report.valueRelativeError, report.attentionRelativeError, report.attentionSamples))
        for line in report.plan ?? [] { print("plan: \(line)") }
    }
}

/// "0-3,7" -> {0, 1, 2, 3, 7}, each within 0..<count.
func parseLayers(_ text: String?, count: Int) throws -> Set<Int>? {
    guard let text else { return nil }
    var out = Set<Int>()
    for part in text.split(separator: ",") {
        let bounds = part.split(separator: "-").map { Int($0.trimmingCharacters(in: .whitespaces)) }
        guard (1 ... 2).contains(bounds.count), let lo = bounds.first!, let hi = bounds.last!, lo <= hi, lo >= 0, hi < count else {
            throw ValidationError("--layers: \"\(part)\" is not a layer or range within 0...\(count - 1)")
        }
        out.formUnion(lo ... hi)
    }
    return out
}
