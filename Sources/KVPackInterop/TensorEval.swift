import Foundation
import KVPack

/// A directory of real attention tensors (`../shared/kv-samples/smollm2-chat/`): meta.json, and per
/// layer q_layerNN.npy [heads, tokens, d], k_layerNN.npy and v_layerNN.npy [kv heads, tokens, d],
/// queries and keys after RoPE.
public struct SampleTensors {
    public struct Meta: Codable {
        public var model: String
        public var layers: Int
        public var heads: Int
        public var kv_heads: Int
        public var head_dim: Int
        public var rope_theta: Double
        public var tokens: Int
        public var token_ids: [Int]
        public var prompt_tokens: Int
    }

    public let directory: String
    public let meta: Meta
    public var geometry: ModelGeometry {
        ModelGeometry(layerCount: meta.layers, queryHeadCount: meta.heads, kvHeadCount: meta.kv_heads, headDim: meta.head_dim)
    }
    /// [layer] -> [head][token][d] floats.
    public let queries: [[Float]]
    public let keys: [[Float]]
    public let values: [[Float]]

    public init(directory: String) throws {
        self.directory = directory
        guard let json = FileManager.default.contents(atPath: directory + "/meta.json") else {
            throw NpyError("\(directory)/meta.json cannot be read")
        }
        let meta = try JSONDecoder().decode(Meta.self, from: json)
        self.meta = meta
        func load(_ kind: String, _ layer: Int, heads: Int) throws -> [Float] {
            let name = String(format: "%@/%@_layer%02d.npy", directory, kind, layer)
            let a = try NpyArray(path: name)
            guard a.shape == [heads, meta.tokens, meta.head_dim] else {
                throw NpyError("\(name): shape \(a.shape), meta.json says [\(heads), \(meta.tokens), \(meta.head_dim)]")
            }
            return a.floats()
        }
        queries = try (0 ..< meta.layers).map { try load("q", $0, heads: meta.heads) }
        keys = try (0 ..< meta.layers).map { try load("k", $0, heads: meta.kv_heads) }
        values = try (0 ..< meta.layers).map { try load("v", $0, heads: meta.kv_heads) }
    }

    /// One stream's rows, tokens x d.
    public func rows(layer: Int, kvHead: Int, kind: KVKind) -> ArraySlice<Float> {
        let n = meta.tokens * meta.head_dim
        return (kind == .key ? keys : values)[layer][kvHead * n ..< (kvHead + 1) * n]
    }

    /// Statistics of the first `tokens` tokens, the queries' channel RMS included.
    public func statistics(tokens: Int) -> CacheStatistics {
        let g = geometry, n = min(tokens, meta.tokens), d = g.headDim
        var statistics = CacheStatistics(geometry: g, tokens: n) { l, h, k in Array(rows(layer: l, kvHead: h, kind: k).prefix(n * d)) }
        var sums = QueryChannelSums(geometry: g)
        for l in 0 ..< g.layerCount {
            queries[l].withUnsafeBufferPointer { q in
                for h in 0 ..< g.queryHeadCount {
                    sums.add(layer: l, kvHead: h / g.groupSize, queries: q.baseAddress! + h * meta.tokens * d, count: n)
                }
            }
        }
        statistics.queryRMS = sums.rms
        return statistics
    }
}

/// Reconstruction and attention-output error of schemes on real tensors: the cache is written
/// through each scheme's writer and read back with the reader; attention is the reader's, over
/// the encoded file, for the model's own queries at the reply positions (causal), against dense
/// attention over the original tensors.
public enum TensorEval {
    public struct Result: Sendable, Codable {
        public var spec: String
        public var keyBitsPerElement: Double
        public var valueBitsPerElement: Double
        public var totalBitsPerElement: Double
        public var keyRelativeError: Double
        public var valueRelativeError: Double
        public var attentionRelativeError: Double
        /// The same with attention computed exactly (f32 over the decoded codes): the scheme's
        /// own error, without the fast arithmetic's.
        public var exactAttentionRelativeError: Double
        /// The fast attention output against the exact one over the same file: what integer
        /// arithmetic adds (0 for schemes without a fast path, and with `--exact`).
        public var fastVsExactRelativeError: Double
        public var plan: [String]?
    }

    public struct Report: Sendable, Codable {
        public var source: String
        public var tokens: Int
        public var positions: String
        public var results: [Result]
    }

    /// `positionStride` > 1 measures attention at every n-th reply position only, and
    /// `layerLimit` the first layers only (quick checks; the CLI measures everything).
    public static func run(samples: SampleTensors, schemes: [String], segmentTokens: Int = 64, directory: String,
                           positionStride: Int = 1, layerLimit: Int? = nil, arithmetic: AttentionArithmetic = .fast,
                           progress: (String) -> Void = { _ in }) throws -> Report {
        let g = samples.geometry, d = g.headDim, n = samples.meta.tokens
        let positions = Array(stride(from: samples.meta.prompt_tokens, to: n, by: max(positionStride, 1)))
        let measuredLayers = min(layerLimit ?? g.layerCount, g.layerCount)
        // The dense reference, once: [layer][kvHead][position] -> group x d.
        var reference: [[Float]] = []
        for layer in 0 ..< measuredLayers {
            var perLayer: [Float] = []
            for head in 0 ..< g.kvHeadCount {
                let k = Array(samples.rows(layer: layer, kvHead: head, kind: .key))
                let v = Array(samples.rows(layer: layer, kvHead: head, kind: .value))
                for p in positions {
                    perLayer += DenseAttention.reference(queries: query(samples, layer: layer, kvHead: head, position: p),
                                                         keys: Array(k[0 ..< (p + 1) * d]), values: Array(v[0 ..< (p + 1) * d]),
                                                         groupSize: g.groupSize, headDim: d)
                }
            }
            reference.append(perLayer)
        }
        progress("dense reference: \(measuredLayers) layers x \(g.kvHeadCount) KV heads x \(positions.count) positions")
        // Planners (svdq bases, int:auto norms) calibrate on the prompt, as a prefill would.
        let calibration = samples.statistics(tokens: samples.meta.prompt_tokens)
        var results: [Result] = []
        for text in schemes {
            let spec = try SchemeSpec.parse(text, geometry: g, calibration: calibration)
            let path = directory + "/tensors-" + String(text.map { $0.isLetter || $0.isNumber ? $0 : "_" }) + ".kvpack"
            var file = NewFile(geometry: g, rope: RoPEConfig(theta: samples.meta.rope_theta, layout: .interleaved), schemes: spec,
                               producer: "kvpack eval-tensors")
            file.defaultSegmentTokens = segmentTokens   // the spec's residual window wins
            var options = WriterOptions()
            options.durability = .flush
            options.overwrite = true
            let writer = try KVPackWriter.create(path: path, file: file, options: options)
            // [layer][head][token][d]: the .npy layout stacked by layer.
            let keys = samples.keys.flatMap { $0 }, values = samples.values.flatMap { $0 }
            try writer.append(tokenIDs: samples.meta.token_ids.map { UInt32($0) }, keys: keys, values: values,
                              layout: .layerHeadToken(g, tokens: n))
            try writer.close()

            let reader = try KVPackReader(path: path, arithmetic: arithmetic)
            let exactReader = arithmetic == .exact ? reader : try KVPackReader(path: path, arithmetic: .exact)
            var kErr = RelativeError(), vErr = RelativeError(), aErr = RelativeError(), exactErr = RelativeError(), fastErr = RelativeError()
            let workspace = AttentionWorkspace()
            var out = [Float](repeating: 0, count: g.groupSize * d), exactOut = out
            for layer in 0 ..< measuredLayers {
                for head in 0 ..< g.kvHeadCount {
                    kErr.add(try reader.decode(layer: layer, kvHead: head, kind: .key), samples.rows(layer: layer, kvHead: head, kind: .key))
                    vErr.add(try reader.decode(layer: layer, kvHead: head, kind: .value), samples.rows(layer: layer, kvHead: head, kind: .value))
                    for (i, p) in positions.enumerated() {
                        let q = query(samples, layer: layer, kvHead: head, position: p)
                        try q.withUnsafeBufferPointer { qp in
                            try out.withUnsafeMutableBufferPointer { o in
                                try reader.attend(layer: layer, kvHead: head, queries: qp.baseAddress!, tokens: 0 ..< p + 1,
                                                  output: o.baseAddress!, workspace: workspace)
                            }
                            if exactReader !== reader {
                                try exactOut.withUnsafeMutableBufferPointer { o in
                                    try exactReader.attend(layer: layer, kvHead: head, queries: qp.baseAddress!, tokens: 0 ..< p + 1,
                                                           output: o.baseAddress!, workspace: workspace)
                                }
                            } else {
                                exactOut = out
                            }
                        }
                        let at = (head * positions.count + i) * g.groupSize * d
                        aErr.add(out, reference[layer][at ..< at + g.groupSize * d])
                        exactErr.add(exactOut, reference[layer][at ..< at + g.groupSize * d])
                        fastErr.add(out, exactOut)
                    }
                }
            }
            let summary = try FileSummary(reader: reader)
            let elements = Double(n * d * g.kvHeadCount * g.layerCount)
            results.append(Result(spec: text,
                                  keyBitsPerElement: Double(summary.layers.reduce(0) { $0 + $1.keyBytes } * 8) / elements,
                                  valueBitsPerElement: Double(summary.layers.reduce(0) { $0 + $1.valueBytes } * 8) / elements,
                                  totalBitsPerElement: Double(summary.fileSize * 8) / (2 * elements),
                                  keyRelativeError: kErr.relative, valueRelativeError: vErr.relative,
                                  attentionRelativeError: aErr.relative, exactAttentionRelativeError: exactErr.relative,
                                  fastVsExactRelativeError: fastErr.relative,
                                  plan: spec.rationale.isEmpty ? nil : spec.rationale))
            progress("\(text) done")
        }
        let described = "\(positions.first ?? 0)..<\(n) (the reply)" + (positionStride > 1 ? ", every \(positionStride)th" : "")
        return Report(source: samples.directory, tokens: n, positions: described, results: results)
    }

    /// The queries of `kvHead`'s group at `position`: group x d.
    static func query(_ s: SampleTensors, layer: Int, kvHead: Int, position: Int) -> [Float] {
        let g = s.geometry, d = g.headDim, n = s.meta.tokens
        var q: [Float] = []
        for h in kvHead * g.groupSize ..< (kvHead + 1) * g.groupSize {
            let at = (h * n + position) * d
            q += s.queries[layer][at ..< at + d]
        }
        return q
    }
}
