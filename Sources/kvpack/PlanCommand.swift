import ArgumentParser
import Foundation
import KVPack

struct PlanCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "plan",
        abstract: "KV-AdaQuant's per-layer bit plan for a cache: which layers' keys and values get how many bits, and why.",
        discussion: """
        Measures the key and value norms (or spectral norms) per layer of FILE's cache, then splits an average bit budget between layers and between keys and values: every matrix starts at 1 bit and the one whose modelled error (norm^2 * 2^(-2 bits)) falls most per added bit is upgraded, through widths 1, 2, 3, 4, 8, until the budget is spent (the authors' greedy allocator). The same plan is what --scheme int:auto:BUDGET uses when a command calibrates on a cache.
        """)

    @Argument(help: "A .kvpack file of the model (any scheme; it is decoded).") var file: String
    @Option(help: "Average bits per element of codes, 1...8.") var budget: Double = 3
    @Flag(help: "Use spectral norms instead of per-token Frobenius norms.") var spectral = false
    @Option(help: "Extra int options for every layer, colon-separated (e.g. kc64:vc64).") var options: String?
    @Option(help: "Calibrate on the first N tokens only.") var tokens: Int?
    @Flag(help: "Print JSON.") var json = false

    struct Output: Codable {
        var file: String
        var spec: String
        var statistics: CacheStatistics
        var keyBits: [Int]
        var valueBits: [Int]
        var rationale: [String]
    }

    func run() throws {
        let reader = try openReader(file)
        let text = "int:auto:\(budget)" + (spectral ? ":spectral" : "") + (options.map { ":" + $0 } ?? "")
        let stats = try CacheStatistics(reader: reader, tokens: tokens)
        let spec = try SchemeSpec.parse(text, geometry: reader.geometry, calibration: stats)
        let bits = spec.layers.map { (Int($0.key.descriptor.parameters[0]), Int($0.value.descriptor.parameters[0])) }
        if json {
            return try printJSON(Output(file: file, spec: text, statistics: stats, keyBits: bits.map(\.0), valueBits: bits.map(\.1),
                                        rationale: spec.rationale))
        }
        print("\(file): \(stats.tokens) tokens, \(reader.geometry)")
        print("spec: \(text)")
        print("")
        print("layer  |K|        |V|        sigma K    sigma V    K bits  V bits")
        for (i, l) in stats.layers.enumerated() {
            print(String(i).padded(7) + String(format: "%-11.3f%-11.3f%-11.3f%-11.3f", l.keyNorm, l.valueNorm, l.keySpectralNorm, l.valueSpectralNorm)
                + String(bits[i].0).padded(8) + String(bits[i].1))
        }
        print("")
        for line in spec.rationale { print(line) }
    }
}
