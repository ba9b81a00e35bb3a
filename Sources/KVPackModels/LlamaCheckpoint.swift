import KVPack

/// The architecture numbers of a Llama-family model.
public struct LlamaConfig: Sendable, Equatable, Codable {
    public var dim: Int
    public var hiddenDim: Int
    public var layerCount: Int
    public var headCount: Int
    public var kvHeadCount: Int
    public var vocabSize: Int
    public var maxSequence: Int
    public var ropeTheta: Float = 10000
    public var normEpsilon: Float = 1e-5

    public var headDim: Int { dim / headCount }
    public var kvDim: Int { kvHeadCount * headDim }
    public var geometry: ModelGeometry {
        ModelGeometry(layerCount: layerCount, queryHeadCount: headCount, kvHeadCount: kvHeadCount, headDim: headDim)
    }
}

/// A model file that could not be loaded: which file, where, and why.
public struct ModelError: Error, CustomStringConvertible {
    public var description: String
    init(_ path: String, _ message: String) { description = "\(path): \(message)" }

    /// Maps a model file, reporting a failure as a model error naming the file.
    static func map(_ path: String) throws -> MappedFile {
        do { return try MappedFile(path: path) } catch { throw ModelError(path, "\(error)") }
    }
}

/// Dense f32 weights of a llama2.c checkpoint, mapped from the file.
///
/// Two layouts (llama2.c `export.py`): the legacy one (a 28-byte header of 7 int32: dim,
/// hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size (negative: separate classifier),
/// seq_len; then the tensors) and version 1 (a 256-byte header: magic "ak42", version 1, the
/// same 7 int32, a shared-classifier byte; norms first, then the matrices). Every size is
/// checked against the file before a pointer is formed.
public struct Llama2CCheckpoint: @unchecked Sendable {
    // @unchecked: `tensors` points into `file`, an immutable mapping this value keeps alive.
    public let path: String
    public let file: MappedFile
    public let config: LlamaConfig
    public let format: String
    let tensors: [String: UnsafePointer<Float>]

    public init(path: String) throws {
        let file = try ModelError.map(path)
        try self.init(file: file, path: path)
    }

    public init(file: MappedFile, path: String) throws {
        self.path = path
        self.file = file
        let bytes = file.bytes
        guard bytes.count >= 28 else { throw ModelError(path, "\(bytes.count) bytes is too short for a llama2.c checkpoint") }
        func int32(_ at: Int) -> Int { Int(Int32(littleEndian: bytes.loadUnaligned(fromByteOffset: at, as: Int32.self))) }
        let versioned = bytes.loadUnaligned(fromByteOffset: 0, as: UInt32.self) == 0x616B_3432
        let base = versioned ? 8 : 0
        if versioned {
            guard bytes.count >= 256 else { throw ModelError(path, "truncated version header") }
            guard int32(4) == 1 else {
                throw ModelError(path, "llama2.c export version \(int32(4)) is not supported (version 1, f32, and the legacy format are)")
            }
        }
        let dim = int32(base), hidden = int32(base + 4), layers = int32(base + 8), heads = int32(base + 12)
        let kvHeads = int32(base + 16), vocabField = int32(base + 20), seq = int32(base + 24)
        let shared = versioned ? bytes[base + 28] != 0 : vocabField > 0
        let vocab = abs(vocabField)
        let limits: [(String, Int, ClosedRange<Int>)] = [
            ("dim", dim, 1 ... 65536), ("hidden_dim", hidden, 1 ... 262_144), ("n_layers", layers, 1 ... 1024),
            ("n_heads", heads, 1 ... 1024), ("n_kv_heads", kvHeads, 1 ... 1024), ("vocab_size", vocab, 1 ... 1_048_576),
            ("seq_len", seq, 1 ... 1_048_576),
        ]
        for (name, value, range) in limits where !range.contains(value) {
            throw ModelError(path, "header field \(name) = \(value) is outside \(range.lowerBound)...\(range.upperBound)")
        }
        guard dim % heads == 0, heads % kvHeads == 0, (dim / heads) % 2 == 0 else {
            throw ModelError(path, "dim \(dim), n_heads \(heads), n_kv_heads \(kvHeads) do not form a valid grouped-query geometry")
        }
        let config = LlamaConfig(dim: dim, hiddenDim: hidden, layerCount: layers, headCount: heads, kvHeadCount: kvHeads,
                                 vocabSize: vocab, maxSequence: seq)
        let hs = config.headDim, kv = config.kvDim
        // (name, element count) in file order.
        var layout: [(String, Int)] = []
        func perLayer(_ name: String, _ count: Int) { layout.append((name, layers * count)) }
        if versioned {
            perLayer("rms_att", dim); perLayer("rms_ffn", dim); layout.append(("rms_final", dim))
            layout.append(("embedding", vocab * dim))
            perLayer("wq", dim * dim); perLayer("wk", kv * dim); perLayer("wv", kv * dim); perLayer("wo", dim * dim)
            perLayer("w1", hidden * dim); perLayer("w2", dim * hidden); perLayer("w3", hidden * dim)
        } else {
            layout.append(("embedding", vocab * dim)); perLayer("rms_att", dim)
            perLayer("wq", dim * dim); perLayer("wk", kv * dim); perLayer("wv", kv * dim); perLayer("wo", dim * dim)
            perLayer("rms_ffn", dim); perLayer("w1", hidden * dim); perLayer("w2", dim * hidden); perLayer("w3", hidden * dim)
            layout.append(("rms_final", dim)); layout.append(("freq_cis", seq * hs))
        }
        if !shared { layout.append(("classifier", vocab * dim)) }
        let headerBytes = versioned ? 256 : 28
        let expected = headerBytes + 4 * layout.reduce(0) { $0 + $1.1 }
        guard bytes.count == expected else {
            throw ModelError(path, "is \(bytes.count) bytes; a \(versioned ? "version 1" : "legacy") checkpoint with this header has \(expected)")
        }
        var tensors: [String: UnsafePointer<Float>] = [:]
        var offset = headerBytes
        for (name, count) in layout {
            tensors[name] = (bytes.baseAddress! + offset).assumingMemoryBound(to: Float.self)
            offset += 4 * count
        }
        if shared { tensors["classifier"] = tensors["embedding"] }
        self.config = config
        self.tensors = tensors
        self.format = versioned ? "llama2.c v1" : "llama2.c legacy"
    }
}
