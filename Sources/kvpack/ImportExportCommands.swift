import ArgumentParser
import Foundation
import KVPack
import KVPackInterop

/// Tensor naming flags shared by import and export.
struct NamingOptions: ParsableArguments {
    @Option(help: "Tensor name pattern; {layer} is the layer index, {kv} the key or value name.")
    var pattern = "past_key_values.{layer}.{kv}"
    @Option(help: "What {kv} becomes for keys.") var keyName = "key"
    @Option(help: "What {kv} becomes for values.") var valueName = "value"

    var naming: TensorNaming {
        var n = TensorNaming()
        n.pattern = pattern
        n.keyName = keyName
        n.valueName = valueName
        return n
    }
}

enum ExternalFormat: String, ExpressibleByArgument, CaseIterable {
    case safetensors, npy

    /// A directory is npy; anything else safetensors.
    static func guess(_ path: String) -> ExternalFormat {
        var isDirectory: ObjCBool = false
        return FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) && isDirectory.boolValue ? .npy : .safetensors
    }
}

struct ImportCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "import",
        abstract: "Make a .kvpack file from a KV cache in safetensors or in a directory of .npy files.",
        discussion: """
        safetensors: per-layer key and value tensors in the Hugging Face past_key_values layout [batch, kv_heads, seq, head_dim] (or [kv_heads, seq, head_dim]), F32, F16 or BF16, named by --pattern (default past_key_values.{layer}.key / .value). Optional input_ids and position_ids tensors give token ids and positions.

        npy: a directory of k_layerNN.npy and v_layerNN.npy [kv_heads, tokens, head_dim] with an optional meta.json (token_ids, positions, heads, rope_theta), as ../shared/kv-samples/ and `kvpack export --format npy` lay it out.

        Caches do not record the model's query heads or RoPE settings: give --query-heads, --rope-theta and --rope-layout (defaults: meta.json's values, else one query head per KV head, theta 10000, rotate-half for safetensors and interleaved for npy). Tokens are written a segment at a time.
        """)

    @Argument(help: "A .safetensors file or a directory of .npy files.") var source: String
    @Argument(help: "The .kvpack file to write.") var output: String
    @Option(help: "Source format (default: npy for a directory, else safetensors).") var format: ExternalFormat?
    @OptionGroup var naming: NamingOptions
    @Option(help: "Batch entry to import (safetensors).") var batchIndex = 0
    @Option(help: "Query heads of the model (a multiple of the KV heads).") var queryHeads: Int?
    @Option(help: "RoPE theta.") var ropeTheta: Double?
    @Option(help: "RoPE pair layout: interleaved, rotate-half or none.") var ropeLayout: String?
    @Option(help: "Scheme spec for the output.") var scheme = "raw:f16"
    @OptionGroup(title: "Writing the file") var writing: WritingOptions

    func run() throws {
        let kind = format ?? ExternalFormat.guess(source)
        let cache: ExternalCache
        var meta: NpyDirectoryCache.Meta?
        switch kind {
        case .safetensors: cache = try SafetensorsCache(path: source, naming: naming.naming, batchIndex: batchIndex)
        case .npy:
            let dir = try NpyDirectoryCache(directory: source)
            meta = dir.meta
            cache = dir
        }
        let layoutName = ropeLayout ?? meta?.rope_layout ?? (kind == .npy ? "interleaved" : "rotate-half")
        let layout: RoPELayout
        switch layoutName {
        case "interleaved": layout = .interleaved
        case "rotate-half": layout = .rotateHalf
        case "none": layout = .none
        default: throw ValidationError("--rope-layout must be interleaved, rotate-half or none, got \(layoutName)")
        }
        let rope = RoPEConfig(theta: layout == .none ? 0 : (ropeTheta ?? meta?.rope_theta ?? 10000), layout: layout, keysArePostRoPE: layout != .none)
        let n = try CacheInterop.importCache(cache, to: output, queryHeads: queryHeads ?? meta?.heads, rope: rope, spec: scheme,
                                             segmentTokens: writing.segmentTokens, options: writing.writerOptions(),
                                             producer: "\(KVPackVersion.producer) import")
        let h = cache.geometryHint
        print("\(output): \(n) tokens, \(h.layers) layers x \(h.kvHeads) KV heads x head_dim \(h.headDim), from \(source) (\(kind.rawValue))")
    }
}

struct ExportCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export",
        abstract: "Write a .kvpack file's cache as safetensors or as a directory of .npy files.",
        discussion: """
        safetensors: per layer a key and a value tensor [1, kv_heads, tokens, head_dim] named by --pattern, plus input_ids and position_ids [1, tokens] (I64); geometry and RoPE go in the file's metadata. npy: k_layerNN.npy and v_layerNN.npy [kv_heads, tokens, head_dim] and meta.json. Blocks are decoded one stream at a time.
        """)

    @Argument(help: "The .kvpack file.") var input: String
    @Argument(help: "A .safetensors path, or a directory for npy.") var destination: String
    @Option(help: "Format (default: npy when DESTINATION has no extension and is not a .safetensors file).") var format: ExternalFormat?
    @Option(help: "Element type: f32, f16 or bf16 (bf16: safetensors only).") var dtype = "f32"
    @OptionGroup var naming: NamingOptions

    func run() throws {
        let reader = try openReader(input)
        guard let type = ElementType(name: dtype), type.isFloatingPoint else { throw ValidationError("--dtype must be f32, f16 or bf16") }
        let kind = format ?? (destination.hasSuffix(".safetensors") ? .safetensors : (URL(fileURLWithPath: destination).pathExtension.isEmpty ? .npy : .safetensors))
        switch kind {
        case .safetensors: try CacheInterop.exportSafetensors(reader, to: destination, type: type, naming: naming.naming)
        case .npy: try CacheInterop.exportNpy(reader, to: destination, type: type)
        }
        print("\(destination): \(reader.tokenCount) tokens, \(reader.geometry) as \(kind.rawValue) \(type)")
    }
}
