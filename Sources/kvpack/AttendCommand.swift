import ArgumentParser
import Foundation
import KVPack

struct AttendCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "attend",
        abstract: "Debug: attention of random queries over one KV head, straight from the file.",
        discussion: """
        Draws one query per query head of the KV head's GQA group (standard normal, from --query-seed), runs the reader's attention over the token range, and prints the output vectors. --check also computes a naive dense softmax over the decoded keys and values and prints the largest relative difference.

        Attention over codes uses integer dot products where the scheme has them (int with per-channel key groups or per-token value groups, on a CPU with AVX2): a few times faster, within a small bound of attention over the decoded rows. --exact computes in f32 over the decoded codes instead, which --check then matches to float rounding.

        --threads N splits the tokens into N pieces of whole segments, attends each on its own thread and merges their softmax states: for one long context, N times the cores; the output then differs from one thread's at float rounding (about 1e-7 relative).
        """)

    @Argument(help: "The .kvpack file, or s3://bucket/key (only the layer's pages are fetched).") var file: String
    @Option(help: "Layer index.") var layer: Int = 0
    @Option(help: "KV head index.") var head: Int = 0
    @Option(help: "Seed for the random queries.") var querySeed: UInt64 = 1
    @Option(help: "Token range (A..<B, A..B or A:B); default all tokens.") var tokens: TokenRange?
    @Option(help: "Scale query vectors by this factor (sharper softmax for larger values).") var queryScale: Float = 1
    @Flag(help: "Compare with a naive dense reference over decoded K/V.") var check = false
    @Flag(help: "f32 arithmetic over the decoded codes instead of integer dot products.") var exact = false
    @Option(help: "Threads, each taking a piece of the tokens (their softmax states merged).") var threads: Int = 1
    @Flag(help: "Print JSON.") var json = false

    struct Output: Codable {
        var layer: Int
        var kvHead: Int
        var tokens: [Int]
        var queryHeads: [Int]
        var output: [[Float]]
        var maxRelativeError: Double?
    }

    func validate() throws {
        guard threads >= 1 else { throw ValidationError("--threads must be at least 1, got \(threads)") }
    }

    func run() throws {
        let reader = try openReader(file, arithmetic: exact ? .exact : .fast)
        defer { reportFetches(reader.file) }
        let g = reader.geometry
        let range = tokens?.range ?? 0 ..< reader.tokenCount
        var rng = SplitMix64(seed: querySeed)
        let queries = (0 ..< g.groupSize * g.headDim).map { _ in Float(rng.nextGaussian()) * queryScale }
        var maxErr: Double?
        var out = [Float](repeating: 0, count: queries.count)
        try reader.attend(layer: layer, kvHead: head, queries: queries, tokens: range, output: &out,
                          workspaces: (0 ..< threads).map { _ in AttentionWorkspace() })
        if check {
            let k = try reader.decode(layer: layer, kvHead: head, kind: .key, tokens: range)
            let v = try reader.decode(layer: layer, kvHead: head, kind: .value, tokens: range)
            let ref = DenseAttention.reference(queries: queries, keys: k, values: v, groupSize: g.groupSize, headDim: g.headDim)
            maxErr = DenseAttention.maxRelativeError(out, ref)
        }
        let heads = Array(head * g.groupSize ..< (head + 1) * g.groupSize)
        let rows = (0 ..< g.groupSize).map { Array(out[$0 * g.headDim ..< ($0 + 1) * g.headDim]) }
        if json {
            return try printJSON(Output(layer: layer, kvHead: head, tokens: [range.lowerBound, range.upperBound],
                                        queryHeads: heads, output: rows, maxRelativeError: maxErr))
        }
        print("layer \(layer), KV head \(head), tokens \(range.lowerBound)..<\(range.upperBound), query heads \(heads.map(String.init).joined(separator: ","))")
        for (i, row) in rows.enumerated() {
            print("q\(heads[i]): " + row.map { String(format: "%+.6f", $0) }.joined(separator: " "))
        }
        if let maxErr { print(String(format: "max relative difference vs dense reference: %.3e", maxErr)) }
    }
}
