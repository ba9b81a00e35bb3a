import KVPack

/// Everything the forward pass reads, whatever file it came from: the configuration, the
/// weight matrices in their stored encodings, the norm vectors (f32), and the tokenizer when
/// the file carries one. Pointers address `file`, which this value keeps mapped.
public struct LlamaWeights: @unchecked Sendable {
    public let config: LlamaConfig
    public let path: String
    /// "llama2.c legacy", "llama2.c v1" or "gguf v3 (Q4_1)"-style.
    public let format: String
    public let file: MappedFile
    public let tokenizer: BPETokenizer?
    /// The model's chat template (GGUF `tokenizer.chat_template`, Jinja), if it has one.
    public let chatTemplate: String?
    /// `general.name` of a GGUF.
    public let modelName: String?
    /// The numeric `general.sampling.*` keys of a GGUF (llama.cpp's names without the prefix:
    /// temp, top_k, top_p, min_p, penalty_repeat, penalty_last_n, ...): the author's recommended sampler.
    public let samplingDefaults: [String: Double]
    let embedding: WeightMatrix
    let rmsAttention: [UnsafePointer<Float>]
    let rmsFFN: [UnsafePointer<Float>]
    let rmsFinal: UnsafePointer<Float>
    let wq: [WeightMatrix], wk: [WeightMatrix], wv: [WeightMatrix], wo: [WeightMatrix]
    let w1: [WeightMatrix], w2: [WeightMatrix], w3: [WeightMatrix]
    let classifier: WeightMatrix

    /// A llama2.c checkpoint or, if the file starts with "GGUF", a GGUF Llama model.
    public init(path: String) throws {
        let file = try ModelError.map(path)
        if file.bytes.count >= 4, file.bytes.loadUnaligned(as: UInt32.self) == 0x4655_4747 {
            try self.init(gguf: GGUFFile(file: file, path: path))
        } else {
            try self.init(checkpoint: Llama2CCheckpoint(file: file, path: path))
        }
    }

    public init(checkpoint: Llama2CCheckpoint) {
        let c = checkpoint.config
        let t = checkpoint.tensors
        func stack(_ name: String, rows: Int, cols: Int) -> [WeightMatrix] {
            (0 ..< c.layerCount).map { WeightMatrix(rows: rows, cols: cols, encoding: .f32, data: UnsafeRawPointer(t[name]! + $0 * rows * cols)) }
        }
        config = c
        path = checkpoint.path
        format = checkpoint.format
        file = checkpoint.file
        tokenizer = nil
        chatTemplate = nil
        modelName = nil
        samplingDefaults = [:]
        embedding = WeightMatrix(rows: c.vocabSize, cols: c.dim, encoding: .f32, data: UnsafeRawPointer(t["embedding"]!))
        rmsAttention = (0 ..< c.layerCount).map { t["rms_att"]! + $0 * c.dim }
        rmsFFN = (0 ..< c.layerCount).map { t["rms_ffn"]! + $0 * c.dim }
        rmsFinal = t["rms_final"]!
        wq = stack("wq", rows: c.dim, cols: c.dim)
        wk = stack("wk", rows: c.kvDim, cols: c.dim)
        wv = stack("wv", rows: c.kvDim, cols: c.dim)
        wo = stack("wo", rows: c.dim, cols: c.dim)
        w1 = stack("w1", rows: c.hiddenDim, cols: c.dim)
        w2 = stack("w2", rows: c.dim, cols: c.hiddenDim)
        w3 = stack("w3", rows: c.hiddenDim, cols: c.dim)
        classifier = WeightMatrix(rows: c.vocabSize, cols: c.dim, encoding: .f32, data: UnsafeRawPointer(t["classifier"]!))
    }

    /// A Llama-architecture GGUF (`general.architecture = llama`), tensors named as llama.cpp
    /// names them (`token_embd`, `blk.N.attn_q`, ...; `output` optional: tied to the
    /// embedding when absent). llama.cpp's converter permutes Q and K rows so that RoPE rotates
    /// adjacent pairs (2i, 2i+1), which is what this forward pass does, so they load unchanged.
    public init(gguf: GGUFFile) throws {
        let path = gguf.path
        func meta(_ key: String) -> GGUFFile.Value? { gguf.metadata[key] }
        let arch = meta("general.architecture")?.asString ?? "(none)"
        guard arch == "llama" else { throw ModelError(path, "general.architecture is \(arch); only llama models load") }
        func int(_ key: String, _ range: ClosedRange<Int>) throws -> Int {
            guard let v = meta(key)?.asInt else { throw ModelError(path, "metadata \(key) is missing or not an integer") }
            guard range.contains(v) else { throw ModelError(path, "metadata \(key) = \(v) is outside \(range.lowerBound)...\(range.upperBound)") }
            return v
        }
        let dim = try int("llama.embedding_length", 1 ... 65536)
        let layers = try int("llama.block_count", 1 ... 1024)
        let heads = try int("llama.attention.head_count", 1 ... 1024)
        let kvHeads = meta("llama.attention.head_count_kv") == nil ? heads : try int("llama.attention.head_count_kv", 1 ... 1024)
        let hidden = try int("llama.feed_forward_length", 1 ... 262_144)
        let context = try int("llama.context_length", 1 ... 1 << 20)
        guard dim % heads == 0, heads % kvHeads == 0, (dim / heads) % 2 == 0 else {
            throw ModelError(path, "embedding_length \(dim), head_count \(heads), head_count_kv \(kvHeads) do not form a grouped-query geometry")
        }
        if let rotated = meta("llama.rope.dimension_count") {
            guard rotated.asInt == dim / heads else { throw ModelError(path, "llama.rope.dimension_count \(rotated) differs from head_dim \(dim / heads); partial RoPE is not supported") }
        }
        guard let embd = gguf.tensor("token_embd.weight") else { throw ModelError(path, "has no token_embd.weight tensor") }
        guard embd.dims.count == 2, embd.dims[0] == dim else { throw ModelError(path, "token_embd.weight has shape \(embd.dims), expected [\(dim), vocab]") }
        let vocab = embd.dims[1]
        var config = LlamaConfig(dim: dim, hiddenDim: hidden, layerCount: layers, headCount: heads, kvHeadCount: kvHeads,
                                 vocabSize: vocab, maxSequence: context)
        config.ropeTheta = Float(meta("llama.rope.freq_base")?.asDouble ?? 10000)
        config.normEpsilon = Float(meta("llama.attention.layer_norm_rms_epsilon")?.asDouble ?? 1e-5)
        guard config.ropeTheta > 0, config.normEpsilon >= 0, config.normEpsilon < 1 else {
            throw ModelError(path, "rope.freq_base \(config.ropeTheta) or layer_norm_rms_epsilon \(config.normEpsilon) is out of range")
        }
        if let scaling = meta("llama.rope.scaling.type")?.asString, scaling != "none" {
            throw ModelError(path, "RoPE scaling \(scaling) is not supported")
        }

        func matrix(_ name: String, rows: Int, cols: Int) throws -> WeightMatrix {
            guard let t = gguf.tensor(name) else { throw ModelError(path, "has no tensor \(name)") }
            guard t.dims == [cols, rows] else { throw ModelError(path, "tensor \(name) has shape \(t.dims), expected [\(cols), \(rows)]") }
            let encoding: WeightMatrix.Encoding
            switch t.type {
            case .f32: encoding = .f32
            case .f16: encoding = .f16
            case .q8_0: encoding = .q8_0
            case .q4_0: encoding = .q4_0
            case .q4_1: encoding = .q4_1
            case nil: throw ModelError(path, "tensor \(name) has ggml type \(t.typeID); F32, F16, Q8_0, Q4_0 and Q4_1 are supported")
            }
            guard t.offset % 4 == 0 else { throw ModelError(path, "tensor \(name) at offset \(t.offset) is not 4-byte aligned") }
            return WeightMatrix(rows: rows, cols: cols, encoding: encoding, data: gguf.file.bytes.baseAddress! + t.offset)
        }
        func vector(_ name: String) throws -> UnsafePointer<Float> {
            guard let t = gguf.tensor(name) else { throw ModelError(path, "has no tensor \(name)") }
            guard t.dims == [dim], t.type == .f32, t.offset % 4 == 0 else {
                throw ModelError(path, "tensor \(name) is \(t.dims) of ggml type \(t.typeID); a norm weight must be F32 [\(dim)]")
            }
            return (gguf.file.bytes.baseAddress! + t.offset).assumingMemoryBound(to: Float.self)
        }
        let kvDim = config.kvDim
        self.config = config
        self.path = path
        file = gguf.file
        let types = Set(gguf.tensors.compactMap { $0.dims.count == 2 ? $0.type.map { "\($0)".uppercased() } : nil }).sorted()
        format = "gguf v\(gguf.version) (\(types.joined(separator: ", ")))"
        embedding = try matrix("token_embd.weight", rows: vocab, cols: dim)
        classifier = gguf.tensor("output.weight") == nil ? embedding : try matrix("output.weight", rows: vocab, cols: dim)
        rmsFinal = try vector("output_norm.weight")
        rmsAttention = try (0 ..< layers).map { try vector("blk.\($0).attn_norm.weight") }
        rmsFFN = try (0 ..< layers).map { try vector("blk.\($0).ffn_norm.weight") }
        wq = try (0 ..< layers).map { try matrix("blk.\($0).attn_q.weight", rows: dim, cols: dim) }
        wk = try (0 ..< layers).map { try matrix("blk.\($0).attn_k.weight", rows: kvDim, cols: dim) }
        wv = try (0 ..< layers).map { try matrix("blk.\($0).attn_v.weight", rows: kvDim, cols: dim) }
        wo = try (0 ..< layers).map { try matrix("blk.\($0).attn_output.weight", rows: dim, cols: dim) }
        w1 = try (0 ..< layers).map { try matrix("blk.\($0).ffn_gate.weight", rows: hidden, cols: dim) }
        w2 = try (0 ..< layers).map { try matrix("blk.\($0).ffn_down.weight", rows: dim, cols: hidden) }
        w3 = try (0 ..< layers).map { try matrix("blk.\($0).ffn_up.weight", rows: hidden, cols: dim) }
        chatTemplate = meta("tokenizer.chat_template")?.asString
        modelName = meta("general.name")?.asString
        var sampling: [String: Double] = [:]
        for (key, value) in gguf.metadata where key.hasPrefix("general.sampling.") {
            if let v = value.asDouble, v.isFinite { sampling[String(key.dropFirst("general.sampling.".count))] = v }
        }
        samplingDefaults = sampling
        tokenizer = meta("tokenizer.ggml.model") == nil ? nil : try BPETokenizer(gguf: gguf)
        if let tokenizer, tokenizer.vocabulary.count != vocab {
            throw ModelError(path, "the tokenizer has \(tokenizer.vocabulary.count) tokens, the embedding \(vocab) rows")
        }
    }
}
