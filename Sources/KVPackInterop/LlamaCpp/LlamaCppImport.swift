import KVPack

/// A llama.cpp state file read against its model: the cells of one sequence in position order,
/// with every row decoded to floats (dequantized, and unrotated when llama.cpp rotated it).
public struct LlamaCppCache {
    public let state: LlamaCppState
    public let model: LlamaCppModel
    public let stream: LlamaCppState.Stream
    /// Cell indices in position order: token i of the import is cell `order[i]`.
    public let order: [Int]
    /// Hadamard chunks undone on import (nil: the rows are stored unrotated).
    public let keyRotation: Int?
    public let valueRotation: Int?

    public enum Rotation: String, Sendable, CaseIterable {
        /// What llama.cpp does since #21038: quantized rows are rotated when the head size is a
        /// multiple of 64 (the file does not say; this is the default).
        case auto
        /// The rows are not rotated (written with LLAMA_ATTN_ROT_DISABLE=1, or by a llama.cpp
        /// before #21038).
        case off
    }

    public var tokenCount: Int { order.count }
    public var geometry: ModelGeometry { model.geometry }
    public var keyType: GGMLType { stream.layers[0].keys.type }
    public var valueType: GGMLType { stream.layers[0].values.type }

    public init(state: LlamaCppState, model: LlamaCppModel, rotation: Rotation = .auto) throws {
        self.state = state
        self.model = model
        if let arch = state.architecture, arch != model.architecture {
            throw KVPackError(.invalidArgument, field: "ggsn.architecture",
                              "the state was saved by a \(arch) model; \(model.path) is \(model.architecture)")
        }
        let stream = try state.onlyStream()
        self.stream = stream
        guard stream.layers.count == model.layerCount else {
            throw KVPackError(.invalidArgument, field: "memory.layerCount",
                              "the state has \(stream.layers.count) layers; \(model.path) has \(model.layerCount)")
        }
        guard model.keyHeadDim == model.valueHeadDim else {
            throw KVPackError(.invalidArgument, "\(model.path) has keys of \(model.keyHeadDim) and values of \(model.valueHeadDim) per head; a .kvpack file has one head size")
        }
        let width = model.kvHeadCount * model.keyHeadDim
        for (l, layer) in stream.layers.enumerated() {
            guard layer.keys.elements == width, layer.values.elements == width else {
                throw KVPackError(.invalidArgument, field: "memory.layer[\(l)]",
                                  "rows hold \(layer.keys.elements) key and \(layer.values.elements) value elements; \(model.path) has \(model.kvHeadCount) KV heads x \(model.keyHeadDim) = \(width)")
            }
            guard layer.keys.type == stream.layers[0].keys.type, layer.values.type == stream.layers[0].values.type else {
                throw KVPackError(.invalidArgument, field: "memory.layer[\(l)]", "cache types differ between layers (\(layer.keys.type)/\(layer.values.type) after \(stream.layers[0].keys.type)/\(stream.layers[0].values.type))")
            }
        }
        // One sequence: every cell belongs to the same set of sequences.
        let sequences = Set(stream.cells.map { Set($0.sequences) })
        guard sequences.count == 1, let only = sequences.first, !only.isEmpty else {
            throw KVPackError(.invalidArgument, field: "memory.cells",
                              "the cells belong to \(sequences.count) different sets of sequences; import a single sequence (a llama.cpp sequence file, or a session of one conversation)")
        }
        let order = stream.cells.indices.sorted { stream.cells[$0].position < stream.cells[$1].position }
        for i in order.indices.dropFirst() where stream.cells[order[i]].position <= stream.cells[order[i - 1]].position {
            throw KVPackError(.invalidArgument, field: "memory.cells", "two cells hold position \(stream.cells[order[i]].position)")
        }
        if let first = order.first, stream.cells[first].position < 0 {
            throw KVPackError(.invalidArgument, field: "memory.cells", "a cell holds the negative position \(stream.cells[first].position)")
        }
        guard state.tokens.count == order.count else {
            throw KVPackError(.invalidArgument, field: "tokens",
                              "the file lists \(state.tokens.count) tokens for \(order.count) cached cells; they must match one to one")
        }
        self.order = order
        let kType = stream.layers[0].keys.type, vType = stream.layers[0].values.type
        keyRotation = rotation == .auto ? model.keyRotation(for: kType) : nil
        valueRotation = rotation == .auto ? model.valueRotation(for: vType) : nil
    }

    /// Position of token `i` (its cell's).
    public func position(_ i: Int) -> Int32 { stream.cells[order[i]].position }

    /// Decodes the keys of token `i`, layer `layer` (kvHeads x headDim floats) into `out`.
    public func keys(layer: Int, token i: Int, into out: UnsafeMutablePointer<Float>) {
        let rows = stream.layers[layer].keys
        let n = rows.elements
        rows.type.dequantize(state.bytes.baseAddress! + rows.offset + order[i] * rows.rowBytes, count: n, into: out)
        if let chunk = keyRotation { Hadamard.apply(out, count: n, chunk: chunk) }
    }

    /// Decodes the values of token `i`, layer `layer` into `out`.
    public func values(layer: Int, token i: Int, into out: UnsafeMutablePointer<Float>) {
        let cell = order[i]
        switch stream.layers[layer].values {
        case let .rows(rows):
            rows.type.dequantize(state.bytes.baseAddress! + rows.offset + cell * rows.rowBytes, count: rows.elements, into: out)
            if let chunk = valueRotation { Hadamard.apply(out, count: rows.elements, chunk: chunk) }
        case let .transposed(type, elements, offset):
            let cells = stream.cells.count, width = type.blockBytes
            for j in 0 ..< elements {
                type.dequantize(state.bytes.baseAddress! + offset + (j * cells + cell) * width, count: 1, into: out + j)
            }
        }
    }

    /// Rows of (layer, KV head, kind) for tokens `range`, each headDim floats (calibration).
    public func rows(layer: Int, kvHead: Int, kind: KVKind, tokens range: Range<Int>) -> [Float] {
        let d = model.keyHeadDim, width = model.kvHeadCount * d
        var row = [Float](repeating: 0, count: width)
        var out: [Float] = []
        out.reserveCapacity(range.count * d)
        for t in range {
            row.withUnsafeMutableBufferPointer { kind == .key ? keys(layer: layer, token: t, into: $0.baseAddress!) : values(layer: layer, token: t, into: $0.baseAddress!) }
            out += row[kvHead * d ..< (kvHead + 1) * d]
        }
        return out
    }

    /// What the imported file records of where it came from.
    public func provenance(source: String) -> [Manifest.MetadataEntry] {
        [
            .init("llama.cpp.source", source),
            .init("llama.cpp.kind", state.kind.rawValue),
            .init("llama.cpp.version", String(state.version)),
            .init("llama.cpp.architecture", model.architecture),
            .init("llama.cpp.type_k", keyType.description),
            .init("llama.cpp.type_v", valueType.description),
            .init("llama.cpp.v_trans", stream.valuesTransposed ? "1" : "0"),
            .init("llama.cpp.rotation_k", keyRotation.map(String.init) ?? "none"),
            .init("llama.cpp.rotation_v", valueRotation.map(String.init) ?? "none"),
        ]
    }
}

public enum LlamaCppImport {
    public struct Report: Sendable, Codable {
        public var tokens: Int
        public var kind: String
        public var version: UInt32
        public var keyType: String
        public var valueType: String
        public var valuesTransposed: Bool
        public var keyRotation: Int?
        public var valueRotation: Int?
        public var segmentTokens: Int
    }

    /// Writes `cache` into a new .kvpack file in `spec`, a segment of tokens at a time (memory:
    /// one segment of every layer). Planners calibrate on the first 1,024 tokens.
    public static func write(_ cache: LlamaCppCache, to path: String, spec text: String, segmentTokens: Int?, source: String,
                             options: WriterOptions, producer: String, progress: ((Int, Int) -> Void)? = nil) throws -> Report {
        let g = cache.geometry, d = g.headDim, n = cache.tokenCount
        let spec = try SchemeSpec.parse(text, geometry: g) {
            let calibration = min(n, 1024)
            return CacheStatistics(geometry: g, tokens: calibration) { cache.rows(layer: $0, kvHead: $1, kind: $2, tokens: 0 ..< calibration) }
        }
        let m = cache.model
        var file = NewFile(geometry: g, rope: m.rope, schemes: spec, producer: producer)
        file.segmentTokens = segmentTokens
        file.maxPositions = UInt32(clamping: m.contextLength)
        file.modelFingerprint = m.fingerprint
        let model: [Manifest.MetadataEntry] = m.path.isEmpty ? [] : [.init("model.path", m.path), .init("model.format", m.format)]
        file.metadata = model + spec.metadata + cache.provenance(source: source)
        let c = try file.resolvedSegmentTokens()
        let writer = try KVPackWriter.create(path: path, file: file, options: options)
        let width = g.kvHeadCount * d
        var keys = [Float](repeating: 0, count: g.layerCount * c * width), values = keys
        var start = 0
        while start < n {
            let count = min(c, n - start)
            keys.withUnsafeMutableBufferPointer { k in
                values.withUnsafeMutableBufferPointer { v in
                    for layer in 0 ..< g.layerCount {
                        for i in 0 ..< count {
                            let at = (layer * count + i) * width
                            cache.keys(layer: layer, token: start + i, into: k.baseAddress! + at)
                            cache.values(layer: layer, token: start + i, into: v.baseAddress! + at)
                        }
                    }
                }
            }
            let ids = (start ..< start + count).map { UInt32(bitPattern: cache.state.tokens[$0]) }
            let positions = (start ..< start + count).map { UInt32(bitPattern: cache.position($0)) }
            try keys.withUnsafeBufferPointer { k in
                try values.withUnsafeBufferPointer { v in
                    try writer.append(tokenIDs: ids, positions: positions,
                                      keys: UnsafeBufferPointer(rebasing: k[0 ..< g.layerCount * count * width]),
                                      values: UnsafeBufferPointer(rebasing: v[0 ..< g.layerCount * count * width]),
                                      layout: .layerTokenHead(g, tokens: count))
                }
            }
            start += count
            progress?(start, n)
        }
        try writer.close()
        return Report(tokens: n, kind: cache.state.kind.rawValue, version: cache.state.version, keyType: cache.keyType.description,
                      valueType: cache.valueType.description, valuesTransposed: cache.stream.valuesTransposed,
                      keyRotation: cache.keyRotation, valueRotation: cache.valueRotation, segmentTokens: c)
    }
}
