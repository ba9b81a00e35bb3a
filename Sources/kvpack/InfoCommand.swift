import ArgumentParser
import Foundation
import KVPack
import KVPackModels

struct InfoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "info",
        abstract: "Describe a .kvpack file: geometry, schemes, tokens, sizes, bits per element.",
        discussion: "Reads the header, manifest, index and (for sizes) each block's 64-byte header; block payloads are not read or checked. Use `validate` to check them.")

    @Argument(help: "The .kvpack file, or s3://bucket/key (only the pages described are fetched).") var file: String
    @Flag(help: "Print the description as JSON.") var json = false
    @Flag(help: "Print the stored tokens as text (the transcript), decoded with the model's tokenizer.") var text = false
    @Option(help: "With --text: the GGUF model whose tokenizer decodes the ids (default: the model the file records).") var model: String?

    func run() throws {
        let reader = try openReader(file)
        defer { reportFetches(reader.file) }
        if text { return try printTranscript(reader) }
        let s = try FileSummary(reader: reader)
        if json { return try printJSON(s) }
        let g = s.geometry
        print("\(file): KVPack \(s.version), \(formatBytes(s.fileSize))")
        print("model      \(g), GQA group \(g.groupSize)")
        if s.modelFingerprint != String(repeating: "0", count: 32) { print("fingerprint \(s.modelFingerprint)") }
        let rope = s.rope.layout == .none ? "none" :
            "theta \(s.rope.theta), \(s.rope.layout) pairs, keys \(s.rope.keysArePostRoPE ? "stored after" : "stored before") RoPE"
        print("rope       \(rope)" + (s.maxPositions > 0 ? ", context \(s.maxPositions)" : ""))
        print("tokens     \(s.tokenCount): \(s.sealedTokens / s.segmentTokens) sealed segments of \(s.segmentTokens) + \(s.tailTokens) in the tail; positions \(s.positionsAreIndices ? "0..<\(s.tokenCount)" : "explicit (not the token indices)")")
        if s.windowTokens > 0 || s.sinkTokens > 0 {
            print("lossless   " + [s.windowTokens > 0 ? "the newest \(s.windowTokens) tokens at least (window: segments seal \(s.windowTokens) tokens late)" : nil,
                                   s.sinkTokens > 0 ? "the first \(s.sinkTokens) (sinks)" : nil].compactMap { $0 }.joined(separator: "; "))
        }
        if !s.firstTokenIDs.isEmpty {
            print("token ids  \(s.firstTokenIDs.map(String.init).joined(separator: " "))\(s.tokenCount > s.firstTokenIDs.count ? " ..." : "")")
        }
        for sc in s.schemes {
            let users = s.layers.flatMap { l in
                (l.keyScheme == sc.index ? ["K\(l.layer)"] : []) + (l.valueScheme == sc.index ? ["V\(l.layer)"] : [])
            }
            print("scheme #\(sc.index) \(sc.spec) (tail rows \(sc.residualType)) used by \(compactList(users))")
        }
        print("producer   \(s.producer)")
        print("commit     #\(s.commitSerial) at offset \(s.commitOffset)")
        if let selection = s.tokenSelection { print("selection  \(selection)") }
        for note in s.recoveryNotes { print("recovery   \(note)") }
        for e in s.userMetadata { print("metadata   \(e.key) = \(e.value)") }
        if s.metadataNoteCount > 0 { print("notes      \(s.metadataNoteCount) note frame(s) added metadata after creation (shown above)") }
        if let error = s.metadataNotesError { print("notes      unreadable: \(error)") }
        if s.blobCount > 0 { print("blobs      \(s.blobCount), \(formatBytes(s.blobBytes))") }
        print("")
        let names = s.schemes.map { "#\($0.index) \($0.spec)" }
        let width = max(10, (names.map(\.count).max() ?? 0) + 2)
        print("layer  " + "K scheme".padded(width) + "K bytes        K bits/elt  " + "V scheme".padded(width) + "V bytes        V bits/elt")
        for l in s.layers {
            print(String(l.layer).padded(7) + names[l.keyScheme].padded(width) + formatBytes(l.keyBytes).padded(15)
                + String(format: "%.3f", l.keyBitsPerElement).padded(12) + names[l.valueScheme].padded(width)
                + formatBytes(l.valueBytes).padded(15) + String(format: "%.3f", l.valueBitsPerElement))
        }
        print("")
        print(String(format: "bits per element: %.3f for K/V data (block headers and tail included), %.3f for the whole file",
                     s.cacheBitsPerElement, s.fileBitsPerElement))
    }

    func printTranscript(_ reader: KVPackReader) throws {
        let path = try ModelLocator.resolve(model ?? recordedModelPath(reader))
        let weights = try LlamaWeights(path: path)
        guard let tokenizer = weights.tokenizer else { throw CLIError("\(path) has no tokenizer to decode the token ids with; pass --model") }
        let ids = try reader.tokenIDs.map { Int($0) }
        if let bad = ids.first(where: { !(0 ..< tokenizer.vocabulary.count).contains($0) }) {
            throw CLIError("\(file): token id \(bad) is outside the vocabulary of \(path) (\(tokenizer.vocabulary.count) tokens)")
        }
        FileHandle.standardOutput.write(Data(tokenizer.decodeBytes(ids)))
        if !ids.isEmpty { print("") }
        printError("\(file): \(ids.count) tokens, decoded with \(path)")
    }

    /// "K0 V0 K1 V1 ..." shortened to "K0-4, V0-4" style runs.
    func compactList(_ items: [String]) -> String {
        var out: [String] = []
        for prefix in ["K", "V"] {
            let nums = items.filter { $0.hasPrefix(prefix) }.compactMap { Int($0.dropFirst()) }
            var i = 0
            while i < nums.count {
                var j = i
                while j + 1 < nums.count, nums[j + 1] == nums[j] + 1 { j += 1 }
                out.append(i == j ? "\(prefix)\(nums[i])" : "\(prefix)\(nums[i])-\(nums[j])")
                i = j + 1
            }
        }
        return out.isEmpty ? "no stream" : out.joined(separator: ", ")
    }
}
