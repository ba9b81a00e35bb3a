import KVPack
#if canImport(KVPackModels)
import KVPackModels
#endif

/// What a llama.cpp state file leaves to the model, read from its GGUF: the architecture, the
/// layer count, how a cache row splits into KV heads, the RoPE settings, the context length, and
/// whether llama.cpp Hadamard-rotates quantized cache rows of this model (#21038).
public struct LlamaCppModel: Sendable {
    public let path: String
    public let architecture: String
    public let layerCount: Int
    public let headCount: Int
    public let kvHeadCount: Int
    public let keyHeadDim: Int
    public let valueHeadDim: Int
    public let contextLength: Int
    public let rope: RoPEConfig
    /// XXH3-128 of the GGUF file, as KVPack's runner records it (so a resume checks it).
    public let fingerprint: [UInt8]
    /// "gguf v3 (Q4_1, Q8_0)"-style, as KVPack's runner records it, for Llama GGUFs.
    public let format: String

    public var geometry: ModelGeometry {
        ModelGeometry(layerCount: layerCount, queryHeadCount: headCount, kvHeadCount: kvHeadCount, headDim: keyHeadDim)
    }

    /// Architectures whose llama.cpp RoPE rotates adjacent pairs (LLAMA_ROPE_TYPE_NORM; llama.cpp's
    /// converter permutes their Q/K so) and those that rotate (i, i + d/2) (NEOX). M-RoPE models add
    /// a per-cell extension to state files, which this reader does not parse.
    static let adjacentPairs: Set<String> = ["llama", "llama4", "deci", "baichuan", "internlm2", "minicpm", "xverse", "command-r",
                                             "cohere2", "olmo", "olmo2", "granite", "granitemoe", "mistral3", "smollm3", "chameleon"]
    static let rotateHalf: Set<String> = ["qwen", "qwen2", "qwen2moe", "qwen3", "qwen3moe", "phi2", "phi3", "gemma", "gemma2", "gemma3",
                                          "stablelm", "falcon", "starcoder2", "gptneox", "nemotron", "exaone", "openelm", "codeshell",
                                          "orion", "olmoe", "bitnet"]
    static let mrope: Set<String> = ["qwen2vl", "qwen25vl", "qwen3vl", "qwen3vlmoe", "glm4v"]

    /// How llama.cpp pairs the rotary dimensions of `architecture`'s keys (none when unknown).
    static func ropeLayout(architecture: String) -> RoPELayout {
        adjacentPairs.contains(architecture) ? .interleaved : rotateHalf.contains(architecture) ? .rotateHalf : .none
    }

    /// A model described directly (tests, and tools that know the geometry without the GGUF).
    /// A zero fingerprint (a file imported against it ties itself to no GGUF) and no model.path.
    public init(architecture: String, geometry: ModelGeometry, rope: RoPEConfig, contextLength: Int = 0, path: String = "") {
        self.path = path
        self.architecture = architecture
        layerCount = geometry.layerCount
        headCount = geometry.queryHeadCount
        kvHeadCount = geometry.kvHeadCount
        keyHeadDim = geometry.headDim
        valueHeadDim = geometry.headDim
        self.contextLength = contextLength
        self.rope = rope
        fingerprint = Array(repeating: 0, count: 16)
        format = ""
    }

    public init(path: String) throws {
        let gguf = try GGUFFile(path: path)
        try self.init(gguf: gguf)
    }

    public init(gguf: GGUFFile) throws {
        path = gguf.path
        func fail(_ message: String) -> KVPackError {
            var e = KVPackError(.invalidArgument, message)
            e.path = gguf.path
            return e
        }
        guard let arch = gguf.metadata["general.architecture"]?.asString else { throw fail("has no general.architecture") }
        architecture = arch
        if Self.mrope.contains(arch) {
            throw fail("\(arch) uses M-RoPE: its state files carry a per-cell position extension that this importer does not read")
        }
        // Memories other than one plain KV cache write other layouts into the state file.
        let keys = gguf.metadata.keys
        if let key = keys.first(where: { $0.hasPrefix("\(arch).ssm.") || $0.hasPrefix("\(arch).wkv.") || $0.hasPrefix("\(arch).rwkv.") }) {
            throw fail("\(arch) has a recurrent state (\(key)): llama.cpp saves recurrent or hybrid memory, which this importer does not read")
        }
        if keys.contains("\(arch).attention.kv_lora_rank") {
            throw fail("\(arch) uses multi-head latent attention (\(arch).attention.kv_lora_rank): its cache holds compressed latents, not per-head keys and values")
        }
        if keys.contains("\(arch).attention.sliding_window") {
            throw fail("\(arch) uses sliding-window attention (\(arch).attention.sliding_window): llama.cpp keeps and saves two caches for it, which this importer does not read")
        }
        func int(_ key: String, default value: Int? = nil) throws -> Int {
            if let v = gguf.metadata["\(arch).\(key)"]?.asInt { return v }
            if let value { return value }
            throw fail("metadata \(arch).\(key) is missing or not an integer")
        }
        layerCount = try int("block_count")
        headCount = try int("attention.head_count")
        kvHeadCount = try int("attention.head_count_kv", default: headCount)
        let embedding = try int("embedding_length")
        guard (1 ... 4096).contains(layerCount), (1 ... 65536).contains(headCount), (1 ... 4096).contains(kvHeadCount),
              headCount % kvHeadCount == 0, embedding % headCount == 0 else {
            throw fail("block_count \(layerCount), head_count \(headCount), head_count_kv \(kvHeadCount), embedding_length \(embedding) do not form a grouped-query geometry")
        }
        keyHeadDim = try int("attention.key_length", default: embedding / headCount)
        valueHeadDim = try int("attention.value_length", default: keyHeadDim)
        guard (1 ... 4096).contains(keyHeadDim), (1 ... 4096).contains(valueHeadDim) else {
            throw fail("head dims \(keyHeadDim) (keys) and \(valueHeadDim) (values) are outside 1...4096")
        }
        contextLength = try int("context_length", default: 0)
        let theta = gguf.metadata["\(arch).rope.freq_base"]?.asDouble ?? 10000
        let layout = Self.ropeLayout(architecture: arch)
        rope = RoPEConfig(theta: layout == .none ? 0 : theta, layout: layout, keysArePostRoPE: true)
        fingerprint = Checksum.xxh3_128(gguf.file.bytes)
        format = arch == "llama" ? ((try? LlamaWeights(gguf: gguf))?.format ?? "gguf v\(gguf.version)") : "gguf v\(gguf.version) (\(arch))"
    }

    // MARK: Rotation (llama.cpp #21038)

    /// The Hadamard chunk llama.cpp rotates quantized keys of this model by, nil when it does not
    /// (`llama_kv_cache::build_input_k_rot`: the largest power of two from 64 that divides the
    /// head size; only when the head size is a multiple of 64 and the cache type is quantized).
    public func keyRotation(for type: GGMLType) -> Int? { Self.keyRotation(headDim: keyHeadDim, type: type) }

    /// Values are rotated in chunks of 64 (`build_input_v_rot`), under the same conditions.
    public func valueRotation(for type: GGMLType) -> Int? { Self.valueRotation(headDim: valueHeadDim, type: type) }

    public static func keyRotation(headDim: Int, type: GGMLType) -> Int? {
        guard type.isQuantized, headDim % 64 == 0 else { return nil }
        var n = 64
        while headDim % (2 * n) == 0 { n *= 2 }
        return n
    }

    public static func valueRotation(headDim: Int, type: GGMLType) -> Int? {
        type.isQuantized && headDim % 64 == 0 ? 64 : nil
    }
}

/// The orthonormal Walsh-Hadamard transform llama.cpp applies to quantized cache rows, chunk by
/// chunk: Sylvester's matrix (`ggml_gen_hadamard`) scaled by 1/sqrt(n). It is its own inverse, so
/// the same call rotates and unrotates. Computed in double and rounded once.
public enum Hadamard {
    public static func apply(_ row: UnsafeMutablePointer<Float>, count: Int, chunk n: Int) {
        precondition(n > 0 && n & (n - 1) == 0 && count % n == 0)
        let scale = 1 / Double(n).squareRoot()
        withUnsafeTemporaryAllocation(of: Double.self, capacity: n) { x in
            for start in stride(from: 0, to: count, by: n) {
                for i in 0 ..< n { x[i] = Double(row[start + i]) }
                var h = 1
                while h < n {
                    for i in stride(from: 0, to: n, by: 2 * h) {
                        for j in i ..< i + h {
                            let a = x[j], b = x[j + h]
                            x[j] = a + b
                            x[j + h] = a - b
                        }
                    }
                    h *= 2
                }
                for i in 0 ..< n { row[start + i] = Float(x[i] * scale) }
            }
        }
    }
}
