import ArgumentParser
import Foundation
import KVPack
import KVPackInterop
import KVPackModels

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

enum ImportFormat: String, ExpressibleByArgument, CaseIterable {
    case safetensors, npy, mlx
    case llamaCpp = "llama.cpp"

    /// A directory is npy; a file starting with 'ggsn' or 'ggsq' a llama.cpp state; a
    /// safetensors file whose metadata names cache classes an mlx-lm prompt cache; else safetensors.
    static func guess(_ path: String) -> ImportFormat {
        var isDirectory: ObjCBool = false
        if FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory), isDirectory.boolValue { return .npy }
        if let handle = FileHandle(forReadingAtPath: path), let head = try? handle.read(upToCount: 4), head.count == 4 {
            let magic = head.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(as: UInt32.self)) }
            if magic == LlamaCppState.sessionMagic || magic == LlamaCppState.sequenceMagic { return .llamaCpp }
        }
        if let f = try? SafetensorsFile(path: path), [f.metadata["1.0"], f.metadata["2.0"]].contains(where: { $0?.hasSuffix("Cache") ?? false }) {
            return .mlx
        }
        return .safetensors
    }
}

enum ExportFormat: String, ExpressibleByArgument, CaseIterable {
    case safetensors, npy, mlx
    case llamaCppSession = "llama.cpp-session"
    case llamaCppSeq = "llama.cpp-seq"
}

extension GGMLType: ExpressibleByArgument {
    public init?(argument: String) { self.init(name: argument) }
}

extension LlamaCppCache.Rotation: ExpressibleByArgument {}

struct ImportCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "import",
        abstract: "Make a .kvpack file from a KV cache: a llama.cpp session or sequence file, safetensors, or a directory of .npy files.",
        discussion: """
        llama.cpp: a session file (llama_state_save_file, llama-cli --prompt-cache; 'ggsn' version 9 or 10) or a sequence file (llama_state_seq_save_file, a llama-server slot; 'ggsq' version 2 or 3). --model names the GGUF it was computed with (smollm2: the downloaded SmolLM2): it gives the head split, RoPE settings and context, and its fingerprint is recorded so that `kvpack chat --resume` continues the conversation. Every cache type llama.cpp writes for plain attention is read: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 and iq4_nl, values by rows or transposed. Quantized caches are stored Hadamard-rotated by llama.cpp since #21038 (the file does not say so); --rotation off reads caches written with LLAMA_ATTN_ROT_DISABLE=1 or by an older llama.cpp. Where the file came from is recorded as llama.cpp.* metadata (`kvpack info`), and `kvpack export --format llama.cpp-session` writes it back in the same types.

        safetensors: per-layer key and value tensors in the Hugging Face past_key_values layout [batch, kv_heads, seq, head_dim] (or [kv_heads, seq, head_dim]), F32, F16 or BF16, named by --pattern (default past_key_values.{layer}.key / .value). Optional input_ids and position_ids tensors give token ids and positions.

        mlx: an mlx-lm prompt cache (save_prompt_cache; the current layout and mlx-lm 0.21's are read), KVCache or QuantizedKVCache layers, batch --batch-index. Without --scheme, a KVCache is stored raw in its own type (bit-exact) and a QuantizedKVCache's codes, scales and biases are copied into int blocks as they are (per-token groups of the same size and bits; mlx's negative scales need format 2.2), with one segment holding the whole cache so that every token is in a sealed block; `kvpack export --format mlx` writes them back unchanged. Keys are taken as rotate-half (mlx-lm's nn.RoPE(traditional=False)); prompt caches hold no token ids (they import as 0).

        npy: a directory of k_layerNN.npy and v_layerNN.npy [kv_heads, tokens, head_dim] with an optional meta.json (token_ids, positions, heads, rope_theta), as ../shared/kv-samples/ and `kvpack export --format npy` lay it out.

        Tensor caches do not record the model's query heads or RoPE settings: give --query-heads, --rope-theta and --rope-layout (defaults: meta.json's values, else one query head per KV head, theta 10000, rotate-half for safetensors and interleaved for npy). The file records the layout: `kvpack chat --resume` needs interleaved keys, and `kvpack convert --rope-layout` (or export --rope-layout) moves keys between the two. Tokens are written a segment at a time.
        """)

    @Argument(help: "A llama.cpp state file, a .safetensors file or a directory of .npy files.") var source: String
    @Argument(help: "The .kvpack file to write.") var output: String
    @Option(help: "Source format (default: from the file: llama.cpp by its magic, npy for a directory, else safetensors).") var format: ImportFormat?
    @Option(help: "llama.cpp: the GGUF model the state was computed with (a path, or smollm2).") var model: String?
    @Option(help: "llama.cpp: auto (quantized rows are rotated, as llama.cpp writes them since #21038) or off.") var rotation: LlamaCppCache.Rotation = .auto
    @OptionGroup var naming: NamingOptions
    @Option(help: "Batch entry to import (safetensors).") var batchIndex = 0
    @Option(help: "Query heads of the model (a multiple of the KV heads).") var queryHeads: Int?
    @Option(help: "RoPE theta.") var ropeTheta: Double?
    @Option(help: "RoPE pair layout: interleaved, rotate-half or none.") var ropeLayout: String?
    @Option(help: "Scheme spec for the output (default raw:f16; mlx: the cache's own codes, see above).") var scheme: String?
    @OptionGroup(title: "Writing the file") var writing: WritingOptions
    @Flag(help: "Print the import report as JSON.") var json = false

    func run() throws {
        let kind = format ?? ImportFormat.guess(source)
        if kind == .llamaCpp { return try importLlamaCpp() }
        if kind == .mlx { return try importMlx() }
        let cache: ExternalCache
        var meta: NpyDirectoryCache.Meta?
        switch kind {
        case .safetensors: cache = try SafetensorsCache(path: source, naming: naming.naming, batchIndex: batchIndex)
        case .npy:
            let dir = try NpyDirectoryCache(directory: source)
            meta = dir.meta
            cache = dir
        case .llamaCpp, .mlx: return
        }
        let layoutName = ropeLayout ?? meta?.rope_layout ?? (kind == .npy ? "interleaved" : "rotate-half")
        guard let layout = RoPELayout(name: layoutName) else {
            throw ValidationError("--rope-layout must be interleaved, rotate-half or none, got \(layoutName)")
        }
        let rope = RoPEConfig(theta: layout == .none ? 0 : (ropeTheta ?? meta?.rope_theta ?? 10000), layout: layout, keysArePostRoPE: layout != .none)
        let n = try CacheInterop.importCache(cache, to: output, queryHeads: queryHeads ?? meta?.heads, rope: rope, spec: scheme ?? "raw:f16",
                                             segmentTokens: writing.segmentTokens, options: writing.writerOptions(),
                                             producer: "\(KVPackVersion.producer) import")
        let h = cache.geometryHint
        print("\(output): \(n) tokens, \(h.layers) layers x \(h.kvHeads) KV heads x head_dim \(h.headDim), from \(source) (\(kind.rawValue))")
    }

    func importMlx() throws {
        let cache = try MlxPromptCache(path: source, batchIndex: batchIndex)
        // mlx-lm's Llama-family models rotate with nn.RoPE(traditional=False): rotate-half pairs.
        let layoutName = ropeLayout ?? "rotate-half"
        guard let layout = RoPELayout(name: layoutName) else {
            throw ValidationError("--rope-layout must be interleaved, rotate-half or none, got \(layoutName)")
        }
        let rope = RoPEConfig(theta: layout == .none ? 0 : (ropeTheta ?? 10000), layout: layout, keysArePostRoPE: layout != .none)
        let report = try MlxInterop.importCache(cache, to: output, queryHeads: queryHeads, rope: rope, spec: scheme,
                                                segmentTokens: writing.segmentTokens, options: writing.writerOptions(),
                                                producer: "\(KVPackVersion.producer) import")
        if json { return try printJSON(report) }
        let q = cache.quantization.map { ", \($0.bits)-bit codes in groups of \($0.groupSize)" } ?? ""
        print("\(output): \(report.tokens) tokens from mlx-lm \(report.cacheClass) (\(report.layout) layout, \(cache.dtype.rawValue)\(q)), \(cache.layers.count) layers x \(cache.kvHeads) KV heads x head_dim \(cache.headDim); \(report.scheme)\(report.copiedCodes ? ", codes copied as they are" : ""), segments of \(report.segmentTokens)")
    }

    func importLlamaCpp() throws {
        guard let model else { throw ValidationError("a llama.cpp state needs --model: the GGUF it was computed with (its head split and RoPE are not in the file)") }
        // The state first: a damaged file is reported as such whatever the model.
        let state = try LlamaCppState(file: MappedFile(path: source))
        let gguf = try LlamaCppModel(path: try ModelLocator.resolve(model))
        let cache = try LlamaCppCache(state: state, model: gguf, rotation: rotation)
        let progress = Progress(label: "import \(output)", total: cache.tokenCount)
        let scheme = self.scheme ?? "raw:f16"
        let report = try LlamaCppImport.write(cache, to: output, spec: scheme, segmentTokens: writing.segmentTokens,
                                              source: URL(fileURLWithPath: source).standardizedFileURL.path, options: writing.writerOptions(),
                                              producer: "\(KVPackVersion.producer) import") { done, _ in progress.update(done) }
        progress.finish()
        if json { return try printJSON(report) }
        let rotated = [cache.keyRotation.map { "K in chunks of \($0)" }, cache.valueRotation.map { "V in chunks of \($0)" }].compactMap { $0 }
        print("\(output): \(report.tokens) tokens from llama.cpp \(report.kind) file v\(report.version) (\(report.keyType) keys, \(report.valueType) values, V \(report.valuesTransposed ? "transposed" : "by rows")\(rotated.isEmpty ? "" : "; rotation undone: " + rotated.joined(separator: ", "))), \(gguf.geometry), \(scheme)")
    }
}

struct ExportCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export",
        abstract: "Write a .kvpack file's cache as a llama.cpp session or sequence file, safetensors, or a directory of .npy files.",
        discussion: """
        llama.cpp-session / llama.cpp-seq: a file llama.cpp loads with llama_state_load_file (llama-cli --prompt-cache) or llama_state_seq_load_file (a llama-server slot). llama.cpp refuses a state whose cache types or value layout differ from its context's, so give those of the context that will load it: --type (or --type-k/--type-v: -ctk/-ctv), --v-trans 1 without flash attention (f16/f32/bf16 values only). Defaults: what an imported file recorded (so importing and exporting reproduces the llama.cpp file), else f16, values by rows, the newest version (session 10, sequence 3; --version 9 writes the layout of llama.cpp before PR #18862, with an empty output section). Quantized rows are Hadamard-rotated as llama.cpp does since #21038 unless --rotation off (a context run with LLAMA_ATTN_ROT_DISABLE=1). The session file records the model architecture (--model's GGUF, or the one the file records); keys held in the other RoPE pair layout (a Hugging Face cache) are moved to the one llama.cpp uses for that architecture.

        safetensors: per layer a key and a value tensor [1, kv_heads, tokens, head_dim] named by --pattern, plus input_ids and position_ids [1, tokens] (I64); geometry and RoPE go in the file's metadata. npy: k_layerNN.npy and v_layerNN.npy [kv_heads, tokens, head_dim] and meta.json. Blocks are decoded one stream at a time.

        mlx: an mlx-lm prompt cache that load_prompt_cache reads: a KVCache per layer (--dtype), or a QuantizedKVCache (--mlx-bits, --mlx-group-size); by default what an mlx import recorded, so importing and exporting gives back the same tensors and user metadata. Int blocks with the same bits and grouping are copied; everything else is quantized here. Keys go out rotate-half unless --rope-layout says otherwise.
        """)

    @Argument(help: "The .kvpack file, or s3://bucket/key.") var input: String
    @Argument(help: "The file to write (a directory for npy).") var destination: String
    @Option(help: "Format (default: npy when DESTINATION has no extension and is not a .safetensors file, else safetensors).") var format: ExportFormat?
    @Option(help: "Element type: f32, f16 or bf16 (bf16: safetensors and mlx; default f32, mlx: what an import recorded, else f16).") var dtype: String?
    @Option(help: "mlx: write a QuantizedKVCache with codes of this many bits (2, 4 or 8; default: what an import recorded, else a KVCache).") var mlxBits: Int?
    @Option(help: "mlx: the QuantizedKVCache group size (default 64, or what an import recorded).") var mlxGroupSize: Int?
    @Option(help: "mlx: file layout, current (mlx-lm 0.32) or meta-states (mlx-lm 0.21); default: what an import recorded, else current.") var mlxLayout: String?
    @OptionGroup var naming: NamingOptions
    @Option(help: "llama.cpp: the cache type of keys and values (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1; llama.cpp's -ctk/-ctv).") var type: GGMLType?
    @Option(help: "llama.cpp: key cache type, when it differs from --type.") var typeK: GGMLType?
    @Option(help: "llama.cpp: value cache type, when it differs from --type.") var typeV: GGMLType?
    @Option(help: "llama.cpp: 1 for values transposed (a context without flash attention), 0 for rows.") var vTrans: Int?
    @Option(help: "llama.cpp: file version (session 10 or 9, sequence 3 or 2).") var version: UInt32?
    @Option(help: "llama.cpp: auto (rotate quantized rows, as llama.cpp does) or off.") var rotation: LlamaCppCache.Rotation?
    @Option(help: "llama.cpp: the GGUF whose architecture a session file records (default: the model the file records).") var model: String?
    @Flag(help: "Replace DESTINATION if it exists (llama.cpp formats).") var overwrite = false
    @Option(help: "safetensors/npy: move keys to this RoPE pair layout (interleaved or rotate-half; default the file's). llama.cpp formats always get the model architecture's.") var ropeLayout: String?

    func run() throws {
        let reader = try openReader(input)
        defer { reportFetches(reader.file) }
        // Every block will be read: an object is fetched in large requests up front.
        try reader.file.ensure(0 ..< reader.fileSize)
        let layout = try ropeLayout.map(pairLayout)
        let kind = format ?? (destination.hasSuffix(".safetensors") ? .safetensors : (URL(fileURLWithPath: destination).pathExtension.isEmpty ? .npy : .safetensors))
        switch kind {
        case .llamaCppSession, .llamaCppSeq:
            return try exportLlamaCpp(reader, kind: kind == .llamaCppSession ? .session : .sequence)
        case .mlx:
            var o = MlxInterop.ExportOptions(recordedIn: reader.manifest)
            if let dtype {
                guard let type = ElementType(name: dtype), type.isFloatingPoint else { throw ValidationError("--dtype must be f32, f16 or bf16") }
                o.dtype = type
            }
            if let mlxBits { o.quantization = (mlxGroupSize ?? o.quantization?.groupSize ?? 64, mlxBits) }
            else if let mlxGroupSize, let q = o.quantization { o.quantization = (mlxGroupSize, q.bits) }
            if let mlxLayout {
                guard let l = MlxPromptCache.Layout(rawValue: mlxLayout) else { throw ValidationError("--mlx-layout is current or meta-states") }
                o.layout = l
            }
            // mlx-lm's models take rotate-half keys unless asked otherwise.
            o.ropeLayout = layout ?? (reader.manifest.rope.layout == .none ? nil : .rotateHalf)
            let report = try MlxInterop.export(reader, to: destination, options: o)
            let q = o.quantization.map { " (\($0.bits)-bit codes in groups of \($0.groupSize); \(report.copiedBlocks) blocks copied, \(report.quantizedRuns) runs quantized)" } ?? " (\(o.dtype))"
            print("\(destination): \(report.tokens) tokens as an mlx-lm \(report.cacheClass)\(q), \(report.layout) layout")
        case .safetensors, .npy:
            guard let type = ElementType(name: dtype ?? "f32"), type.isFloatingPoint else { throw ValidationError("--dtype must be f32, f16 or bf16") }
            if kind == .safetensors {
                try CacheInterop.exportSafetensors(reader, to: destination, type: type, naming: naming.naming, ropeLayout: layout)
            } else {
                try CacheInterop.exportNpy(reader, to: destination, type: type, ropeLayout: layout)
            }
            print("\(destination): \(reader.tokenCount) tokens, \(reader.geometry) as \(kind.rawValue) \(type)")
        }
    }

    func exportLlamaCpp(_ reader: KVPackReader, kind: LlamaCppState.Kind) throws {
        let manifest = reader.manifest
        if let vTrans, vTrans != 0, vTrans != 1 { throw ValidationError("--v-trans is 0 (values by rows) or 1 (transposed), not \(vTrans)") }
        var o = LlamaCppExport.Options(kind: kind, recordedIn: manifest, keyType: typeK ?? type, valueType: typeV ?? type,
                                       valuesTransposed: vTrans.map { $0 == 1 }, version: version, rotation: rotation)
        o.overwrite = overwrite
        // The architecture a session records: --model's, else the one the import recorded (which
        // the options took), else that of the GGUF the file names. Only the header is read.
        func architecture(_ path: String) throws -> String {
            guard let arch = try GGUFFile(path: path).metadata["general.architecture"]?.asString else {
                throw ValidationError("\(path) has no general.architecture")
            }
            return arch
        }
        if let model {
            o.architecture = try architecture(try ModelLocator.resolve(model))
        } else if manifest.metadata("llama.cpp.architecture") == nil {
            if let path = manifest.metadata("model.path"), let arch = try? architecture(path) {
                o.architecture = arch
            } else if kind == .session {
                throw ValidationError("a session file records the model architecture: give --model (the file records no GGUF)")
            }
        }
        let report = try LlamaCppExport.export(reader, to: destination, options: o)
        let rotated = [report.keyRotation.map { "K in chunks of \($0)" }, report.valueRotation.map { "V in chunks of \($0)" }].compactMap { $0 }
        print("\(destination): llama.cpp \(report.kind) file v\(report.version), \(report.tokens) tokens, \(report.keyType) keys, \(report.valueType) values (V \(report.valuesTransposed ? "transposed" : "by rows"))\(rotated.isEmpty ? "" : ", rotated: " + rotated.joined(separator: ", ")), \(formatBytes(report.bytes))")
    }
}
