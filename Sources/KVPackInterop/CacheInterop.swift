import Foundation
import KVPack

/// A KV cache held in external tensors, readable a slice at a time.
public protocol ExternalCache {
    var geometryHint: (layers: Int, kvHeads: Int, tokens: Int, headDim: Int) { get }
    var tokenIDs: [UInt32] { get }
    var positions: [UInt32]? { get }
    /// Rows [tokens] of one (layer, KV head, K or V): tokens.count x headDim floats.
    func rows(layer: Int, kvHead: Int, kind: KVKind, tokens: Range<Int>) throws -> [Float]
}

/// How tensors of a cache are named: `{layer}` and `{kv}` are replaced by the layer index and
/// by the key or value name. The default matches Hugging Face's `past_key_values` saved per layer.
public struct TensorNaming: Sendable {
    public var pattern = "past_key_values.{layer}.{kv}"
    public var keyName = "key"
    public var valueName = "value"
    public init() {}
    public func name(layer: Int, kind: KVKind) -> String {
        pattern.replacingOccurrences(of: "{layer}", with: String(layer))
            .replacingOccurrences(of: "{kv}", with: kind == .key ? keyName : valueName)
    }
}

/// A safetensors file with per-layer key/value tensors [batch, kvHeads, tokens, headDim] (batch 1,
/// or `batchIndex`) or [kvHeads, tokens, headDim]; optional `input_ids` and `position_ids`.
public struct SafetensorsCache: ExternalCache {
    public let file: SafetensorsFile
    public let naming: TensorNaming
    public let batchIndex: Int
    let shape: (batch: Int, heads: Int, tokens: Int, dim: Int)
    public let layers: Int
    public let tokenIDs: [UInt32]
    public let positions: [UInt32]?

    public init(path: String, naming: TensorNaming = TensorNaming(), batchIndex: Int = 0) throws {
        try self.init(file: SafetensorsFile(path: path), naming: naming, batchIndex: batchIndex)
    }

    public init(file: SafetensorsFile, naming: TensorNaming = TensorNaming(), batchIndex: Int = 0) throws {
        let path = file.path
        self.file = file
        self.naming = naming
        self.batchIndex = batchIndex
        var layers = 0
        while file.tensors[naming.name(layer: layers, kind: .key)] != nil { layers += 1 }
        guard layers > 0 else {
            let names = file.tensors.keys.sorted().prefix(6).joined(separator: ", ")
            throw SafetensorsError("\(path): no tensor named \(naming.name(layer: 0, kind: .key)) (the pattern is \(naming.pattern); the file has \(names)...)")
        }
        guard let first = file.tensors[naming.name(layer: 0, kind: .key)] else { throw SafetensorsError("unreachable") }
        let s = first.shape
        switch s.count {
        case 4: shape = (s[0], s[1], s[2], s[3])
        case 3: shape = (1, s[0], s[1], s[2])
        default: throw SafetensorsError("\(path): \(first.name) has shape \(s); expected [batch, kv_heads, seq, head_dim] or [kv_heads, seq, head_dim]")
        }
        // Only the token count may be 0: a zero elsewhere would let the others claim any size
        // (the data is empty whatever they say), and the import allocates by them.
        guard shape.batch > 0, shape.heads > 0, shape.dim > 0 else {
            throw SafetensorsError("\(path): \(first.name) has shape \(s); batch, KV heads and head_dim must not be 0")
        }
        guard batchIndex >= 0, batchIndex < shape.batch else { throw SafetensorsError("\(path): batch index \(batchIndex) outside 0..<\(shape.batch)") }
        for l in 0 ..< layers {
            for kind in KVKind.allCases {
                let name = naming.name(layer: l, kind: kind)
                guard let t = file.tensors[name] else { throw SafetensorsError("\(path): \(name) is missing") }
                guard t.shape == s else { throw SafetensorsError("\(path): \(name) has shape \(t.shape), \(first.name) has \(s)") }
                guard [.f32, .f16, .bf16].contains(t.dtype) else { throw SafetensorsError("\(path): \(name) is \(t.dtype.rawValue); F32, F16 or BF16 expected") }
            }
        }
        self.layers = layers
        let (tokens, batches) = (shape.tokens, shape.batch)
        func ids(_ name: String) -> [UInt32]? {
            guard let t = file.tensors[name], t.count == tokens || t.count == tokens * batches else { return nil }
            let all = file.integers(t)
            let start = t.count == tokens ? 0 : batchIndex * tokens
            return all[start ..< start + tokens].map { UInt32(truncatingIfNeeded: $0) }
        }
        tokenIDs = ids("input_ids") ?? Array(repeating: 0, count: tokens)
        positions = ids("position_ids")
    }

    public var geometryHint: (layers: Int, kvHeads: Int, tokens: Int, headDim: Int) { (layers, shape.heads, shape.tokens, shape.dim) }

    public func rows(layer: Int, kvHead: Int, kind: KVKind, tokens: Range<Int>) throws -> [Float] {
        let t = file.tensors[naming.name(layer: layer, kind: kind)]!
        let from = ((batchIndex * shape.heads + kvHead) * shape.tokens + tokens.lowerBound) * shape.dim
        return file.floats(t, from: from, count: tokens.count * shape.dim)
    }
}

/// A directory of k_layerNN.npy / v_layerNN.npy ([kvHeads, tokens, headDim] or with a leading
/// batch of 1) and an optional meta.json (token_ids, positions, rope_theta, heads), as
/// `../shared/kv-samples/` and `kvpack export --format npy` lay it out.
public struct NpyDirectoryCache: ExternalCache {
    public struct Meta: Codable {
        public var layers: Int?
        public var heads: Int?
        public var kv_heads: Int?
        public var head_dim: Int?
        public var rope_theta: Double?
        public var rope_layout: String?
        public var tokens: Int?
        public var token_ids: [Int]?
        public var positions: [Int]?
    }

    public let directory: String
    public let meta: Meta?
    let keys: [[Float]], values: [[Float]]
    let heads: Int, tokens: Int, dim: Int
    public let tokenIDs: [UInt32]
    public let positions: [UInt32]?

    public init(directory: String) throws {
        let meta = FileManager.default.contents(atPath: directory + "/meta.json").flatMap { try? JSONDecoder().decode(Meta.self, from: $0) }
        try self.init(directory: directory, meta: meta) { layer in
            let kp = String(format: "%@/k_layer%02d.npy", directory, layer), vp = String(format: "%@/v_layer%02d.npy", directory, layer)
            guard FileManager.default.fileExists(atPath: kp) else { return nil }
            return (try NpyArray(path: kp), try NpyArray(path: vp))
        }
    }

    /// The arrays of each layer, read already (`directory` names them in errors).
    public init(directory: String, layers: [(key: NpyArray, value: NpyArray)], meta: Meta?) throws {
        try self.init(directory: directory, meta: meta) { $0 < layers.count ? layers[$0] : nil }
    }

    /// Layers from `layer(0)`, `layer(1)`, ... until it returns nil, each converted to floats
    /// before the next is read (a directory's raw arrays are never all held at once).
    init(directory: String, meta: Meta?, layer next: (Int) throws -> (key: NpyArray, value: NpyArray)?) throws {
        self.directory = directory
        self.meta = meta
        var k: [[Float]] = [], v: [[Float]] = []
        var shape: [Int]?
        while let (ka, va) = try next(k.count) {
            let kp = String(format: "%@/k_layer%02d.npy", directory, k.count)
            var s = ka.shape, vs = va.shape
            if s.count == 4, s[0] == 1 { s.removeFirst() }
            if vs.count == 4, vs[0] == 1 { vs.removeFirst() }
            guard s.count == 3, vs == s, shape == nil || shape == s else {
                throw NpyError("\(kp): shape \(ka.shape) (values \(va.shape)); expected [kv_heads, tokens, head_dim], the same for every layer")
            }
            // As for safetensors: only the token count may be 0.
            guard s[0] > 0, s[2] > 0 else { throw NpyError("\(kp): shape \(ka.shape); KV heads and head_dim must not be 0") }
            shape = s
            k.append(ka.floats())
            v.append(va.floats())
        }
        guard let shape else { throw NpyError("\(directory): no k_layer00.npy") }
        keys = k
        values = v
        (heads, tokens, dim) = (shape[0], shape[1], shape[2])
        tokenIDs = (meta?.token_ids?.count == shape[1] ? meta!.token_ids! : Array(repeating: 0, count: shape[1])).map { UInt32(truncatingIfNeeded: $0) }
        positions = meta?.positions.flatMap { $0.count == shape[1] ? $0.map { UInt32(truncatingIfNeeded: $0) } : nil }
    }

    public var geometryHint: (layers: Int, kvHeads: Int, tokens: Int, headDim: Int) { (keys.count, heads, tokens, dim) }

    public func rows(layer: Int, kvHead: Int, kind: KVKind, tokens range: Range<Int>) throws -> [Float] {
        let a = kind == .key ? keys[layer] : values[layer]
        let at = (kvHead * tokens + range.lowerBound) * dim
        return Array(a[at ..< at + range.count * dim])
    }
}

public enum CacheInterop {
    /// Writes an external cache into a new .kvpack file, a segment of tokens at a time.
    public static func importCache(_ source: ExternalCache, to path: String, queryHeads: Int?, rope: RoPEConfig, spec text: String,
                                   segmentTokens: Int?, options: WriterOptions, producer: String,
                                   metadata: [Manifest.MetadataEntry] = []) throws -> Int {
        let h = source.geometryHint
        guard h.layers > 0, h.kvHeads > 0, h.headDim > 0, h.tokens >= 0 else {
            throw KVPackError.argument("the cache has \(h.layers) layers, \(h.kvHeads) KV heads, head_dim \(h.headDim): none may be 0")
        }
        let q = queryHeads ?? h.kvHeads
        guard q >= h.kvHeads, q % h.kvHeads == 0 else {
            throw KVPackError.argument("\(q) query heads is not a multiple of the cache's \(h.kvHeads) KV heads")
        }
        let g = ModelGeometry(layerCount: h.layers, queryHeadCount: q, kvHeadCount: h.kvHeads, headDim: h.headDim)
        let spec = try SchemeSpec.parse(text, geometry: g) {
            let n = min(h.tokens, 1024)
            return try CacheStatistics(geometry: g, tokens: n) { try source.rows(layer: $0, kvHead: $1, kind: $2, tokens: 0 ..< n) }
        }
        var file = NewFile(geometry: g, rope: rope, schemes: spec, producer: producer)
        file.segmentTokens = segmentTokens
        file.defaultSegmentTokens = 128
        file.metadata = spec.metadata + metadata
        let c = try file.resolvedSegmentTokens()
        let writer = try KVPackWriter.create(path: path, file: file, options: options)
        let ids = source.tokenIDs, positions = source.positions
        var start = 0
        while start < h.tokens {
            let range = start ..< min(h.tokens, start + c)
            var keys: [Float] = [], values: [Float] = []
            keys.reserveCapacity(g.layerCount * g.kvHeadCount * range.count * g.headDim)
            values.reserveCapacity(keys.capacity)
            for layer in 0 ..< g.layerCount {
                for head in 0 ..< g.kvHeadCount {
                    keys += try source.rows(layer: layer, kvHead: head, kind: .key, tokens: range)
                    values += try source.rows(layer: layer, kvHead: head, kind: .value, tokens: range)
                }
            }
            try writer.append(tokenIDs: Array(ids[range]), positions: positions.map { Array($0[range]) }, keys: keys, values: values,
                              layout: .layerHeadToken(g, tokens: range.count))
            start = range.upperBound
        }
        try writer.close()
        return h.tokens
    }

    /// One safetensors file: per layer `{pattern}` key and value tensors [1, kvHeads, tokens,
    /// headDim] in `type`, plus input_ids and position_ids [1, tokens] (I64), decoded one stream at
    /// a time.
    /// With `ropeLayout`, keys are moved to that RoPE pair layout (and it is what the metadata says).
    public static func exportSafetensors(_ reader: KVPackReader, to path: String, type: ElementType, naming: TensorNaming = TensorNaming(),
                                         ropeLayout: RoPELayout? = nil) throws {
        let g = reader.geometry, n = reader.tokenCount
        let (layout, pairing) = try keyPairing(reader, to: ropeLayout)
        let dtype: SafetensorsFile.DType = type == .float32 ? .f32 : type == .float16 ? .f16 : .bf16
        var entries: [SafetensorsWriter.Entry] = []
        for l in 0 ..< g.layerCount {
            for kind in KVKind.allCases {
                entries.append(.init(name: naming.name(layer: l, kind: kind), dtype: dtype, shape: [1, g.kvHeadCount, n, g.headDim]))
            }
        }
        entries.append(.init(name: "input_ids", dtype: .i64, shape: [1, n]))
        entries.append(.init(name: "position_ids", dtype: .i64, shape: [1, n]))
        let m = reader.manifest
        let metadata = ["format": "kvpack-export", "query_heads": String(g.queryHeadCount), "rope_theta": String(m.rope.theta),
                        "rope_layout": layout.description, "keys_post_rope": String(m.rope.keysArePostRoPE)]
        let workspace = AttentionWorkspace()
        try SafetensorsWriter.write(path: path, entries: entries, metadata: metadata) { i in
            if i == entries.count - 2 { return try int64Bytes(reader.tokenIDs.map { Int64($0) }) }
            if i == entries.count - 1 { return try int64Bytes(reader.positions.map { Int64($0) }) }
            let layer = i / 2, kind: KVKind = i % 2 == 0 ? .key : .value
            var out: [UInt8] = []
            var rows = [Float](repeating: 0, count: n * g.headDim)
            for head in 0 ..< g.kvHeadCount {
                try rows.withUnsafeMutableBufferPointer {
                    try reader.decode(layer: layer, kvHead: head, kind: kind, tokens: 0 ..< n, into: $0.baseAddress!, workspace: workspace)
                    if kind == .key { pairing?.apply(rows: $0.baseAddress!, count: n) }
                }
                out += type.encode(rows)
            }
            reader.file.releasePages(0 ..< reader.fileSize)
            return out
        }
    }

    /// A directory in the kv-samples layout: k_layerNN.npy and v_layerNN.npy [kvHeads, tokens,
    /// headDim] (f32 or f16) and meta.json (geometry, RoPE, token ids, positions).
    public static func exportNpy(_ reader: KVPackReader, to directory: String, type: ElementType, ropeLayout: RoPELayout? = nil) throws {
        let g = reader.geometry, n = reader.tokenCount
        let (layout, pairing) = try keyPairing(reader, to: ropeLayout)
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        guard type == .float32 || type == .float16 else { throw KVPackError.argument(".npy has no bf16; export f32 or f16") }
        // Streamed: the header, then each KV head's rows as they are decoded.
        for layer in 0 ..< g.layerCount {
            for kind in KVKind.allCases {
                let path = String(format: "%@/%@_layer%02d.npy", directory, kind == .key ? "k" : "v", layer)
                guard FileManager.default.createFile(atPath: path, contents: nil), let handle = FileHandle(forWritingAtPath: path) else {
                    throw KVPackError(.io, "cannot create \(path)")
                }
                defer { try? handle.close() }
                handle.write(Data(NpyArray.header(dtype: type == .float32 ? .float32 : .float16, shape: [g.kvHeadCount, n, g.headDim])))
                for head in 0 ..< g.kvHeadCount {
                    var rows = try reader.decode(layer: layer, kvHead: head, kind: kind)
                    if kind == .key { pairing?.apply(&rows) }
                    handle.write(Data(type.encode(rows)))
                    reader.file.releasePages(0 ..< reader.fileSize)
                }
            }
        }
        let m = reader.manifest
        let meta = NpyDirectoryCache.Meta(layers: g.layerCount, heads: g.queryHeadCount, kv_heads: g.kvHeadCount, head_dim: g.headDim,
                                          rope_theta: m.rope.theta, rope_layout: layout.description, tokens: n,
                                          token_ids: try reader.tokenIDs.map { Int($0) }, positions: try reader.positions.map { Int($0) })
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        try encoder.encode(meta).write(to: URL(fileURLWithPath: directory + "/meta.json"))
    }

    /// The layout exported keys are in, and the permutation that takes the file's keys there.
    static func keyPairing(_ reader: KVPackReader, to requested: RoPELayout?) throws -> (RoPELayout, RoPEPairing?) {
        let own = reader.manifest.rope.layout
        guard let requested, requested != own else { return (own, nil) }
        return (requested, try RoPEPairing(from: own, to: requested, headDim: reader.geometry.headDim))
    }

    static func int64Bytes(_ values: [Int64]) -> [UInt8] {
        values.withUnsafeBytes { Array($0) }
    }
}
