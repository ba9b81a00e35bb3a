import ArgumentParser
import Foundation
import KVPack
import KVPackLab

struct SynthCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "synth",
        abstract: "Write a synthetic cache with a real model's geometry and realistic statistics.",
        discussion: """
        Keys get a per-channel bias and a few outlier channels of large magnitude, then RoPE by position; values are unbiased, without outliers. Every token is a pure function of --seed, so --resume appends exactly the tokens an uninterrupted run would have written. Models: \(ModelPreset.all.map(\.name).joined(separator: ", ")).
        """)

    @Argument(help: "Output .kvpack file.") var output: String
    @Option(help: "Model geometry preset.") var model = "llama-3-8b"
    @Option(help: "Tokens to write (with --resume: tokens to add).") var tokens = 1024
    @Option(help: "Keep only the first N layers of the preset (smaller files).") var layers: Int?
    @Option(help: "Random seed.") var seed: UInt64 = 1
    @Option(help: "Scheme spec (see `kvpack --help`).") var scheme = "raw:f16"
    @Option(help: "Commit every N tokens (0: once at the end).") var commitEvery = 0
    @Option(help: "Tokens per append call.") var batch = 64
    @Flag(help: "Append to an existing OUTPUT instead of creating it.") var resume = false
    @Option(name: .customLong("note"), help: ArgumentHelp("Metadata added after creation (a note frame, format 2.1/1.5): KEY=VALUE; the Nth --note goes with the Nth commit (the last ones with the final commit). Repeat for more.", valueName: "KEY=VALUE"))
    var notes: [String] = []
    @Flag(help: ArgumentHelp("Print `committed N` after each commit.", visibility: .hidden)) var printCommits = false
    @OptionGroup(title: "Writing the file") var writing: WritingOptions

    func run() throws {
        guard let preset = ModelPreset.named(model) else {
            throw ValidationError("unknown model \"\(model)\"; known: \(ModelPreset.all.map(\.name).joined(separator: ", "))")
        }
        var geometry = preset.geometry
        if let layers {
            guard (1 ... geometry.layerCount).contains(layers) else { throw ValidationError("--layers must be in 1...\(geometry.layerCount)") }
            geometry.layerCount = layers
        }
        guard tokens >= 0, batch >= 1, commitEvery >= 0 else { throw ValidationError("--tokens, --batch and --commit-every must not be negative") }
        // Synthetic files are for tests and benchmarks: no fsync unless asked.
        var options = writing.writerOptions(fsyncByDefault: false)
        let noteEntries = try notes.map { text -> Manifest.MetadataEntry in
            guard let eq = text.firstIndex(of: "="), eq != text.startIndex else { throw ValidationError("--note takes KEY=VALUE, got \"\(text)\"") }
            return .init(String(text[..<eq]), String(text[text.index(after: eq)...]))
        }
        if !noteEntries.isEmpty { options.features.insert(.notes) }
        var pendingNotes = noteEntries[...]
        let progress = Progress(label: "synth \(output)", total: tokens)

        let writer: KVPackWriter
        if resume {
            writer = try KVPackWriter.resume(path: output, options: options)
            geometry = writer.manifest.geometry
        } else {
            let spec = try parseSpec(geometry: geometry, rope: preset.rope)
            var file = NewFile(geometry: geometry, rope: preset.rope, schemes: spec, producer: "\(KVPackVersion.producer) synth")
            file.segmentTokens = writing.segmentTokens
            file.defaultSegmentTokens = 128
            file.maxPositions = preset.maxPositions
            file.metadata = [.init("synth.model", model), .init("synth.seed", String(seed))] + spec.metadata
            writer = try KVPackWriter.create(path: output, file: file, options: options)
        }
        let gen = SyntheticKV(geometry: geometry, rope: writer.manifest.rope, seed: seed)
        let start = writer.tokenCount
        let end = start + tokens
        let per = geometry.layerCount * geometry.kvHeadCount * geometry.headDim
        var keys = [Float](repeating: 0, count: per * batch)
        var values = keys
        var t = start
        var sinceCommit = 0
        while t < end {
            let n = min(batch, end - t, commitEvery > 0 ? commitEvery - sinceCommit : Int.max)
            // The generator fills [layers][kvHeads][dim] per token; stack tokens on the outside.
            keys.withUnsafeMutableBufferPointer { k in
                values.withUnsafeMutableBufferPointer { v in
                    for i in 0 ..< n {
                        gen.token(t + i, position: t + i, keys: k.baseAddress! + i * per, values: v.baseAddress! + i * per)
                    }
                }
            }
            let layout = KVBatchLayout(layerStride: geometry.kvHeadCount * geometry.headDim, tokenStride: per, headStride: geometry.headDim)
            try writer.append(tokenIDs: (t ..< t + n).map(gen.tokenID), keys: keys, values: values, layout: layout)
            t += n
            sinceCommit += n
            progress.update(t - start)
            if commitEvery > 0, sinceCommit == commitEvery {
                if let note = pendingNotes.popFirst() { try writer.attach(note: MetadataNote(entries: [note])) }
                try writer.commit()
                sinceCommit = 0
                if printCommits { report(writer.committedTokenCount) }
            }
        }
        if !pendingNotes.isEmpty { try writer.attach(note: MetadataNote(entries: Array(pendingNotes))) }
        try writer.close()
        if printCommits { report(writer.committedTokenCount) }
        progress.finish()

    }

    /// A planner (`int:auto`) calibrates on the first 256 tokens of the same synthetic stream.
    func parseSpec(geometry: ModelGeometry, rope: RoPEConfig) throws -> SchemeSpec {
        try SchemeSpec.parse(scheme, geometry: geometry) {
            let gen = SyntheticKV(geometry: geometry, rope: rope, seed: seed)
            let n = max(1, min(tokens, 256)), d = geometry.headDim, per = geometry.layerCount * geometry.kvHeadCount * d
            var k = [Float](repeating: 0, count: per * n), v = k
            k.withUnsafeMutableBufferPointer { kp in
                v.withUnsafeMutableBufferPointer { vp in
                    for t in 0 ..< n { gen.token(t, position: t, keys: kp.baseAddress! + t * per, values: vp.baseAddress! + t * per) }
                }
            }
            return CacheStatistics(geometry: geometry, tokens: n) { layer, head, kind in
                let src = kind == .key ? k : v
                let o = (layer * geometry.kvHeadCount + head) * d
                return (0 ..< n).flatMap { src[$0 * per + o ..< $0 * per + o + d] }
            }
        }
    }

    func report(_ n: Int) {
        // The crash test reads these lines as acknowledgements; they must not sit in a buffer.
        FileHandle.standardOutput.write(Data("committed \(n)\n".utf8))
    }
}
