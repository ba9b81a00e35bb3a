#if canImport(Glibc)
import Glibc
#endif
import KVPack

/// Where a token selection's attention weights come from: the model re-reads the last `window`
/// tokens of a cache, attending over the cache's earlier tokens as the file holds them, and every
/// head's softmax weights over every token are summed over those query positions (SnapKV's
/// observation window; KVCrush's signatures and importance are computed from it).
public enum AttentionObserver {
    /// Observes the first `tokens` tokens of `reader` from the queries of the last `window` of
    /// them. The reader's model must be `model` (the caller checks the fingerprint). Memory: one
    /// layer's decoded prefix at a time, plus `layers x queryHeads x tokens` weights.
    public static func observe(model: LlamaModel, reader: KVPackReader, tokens n: Int, window: Int) throws -> AttentionObservation {
        let g = reader.geometry
        guard g == model.config.geometry else {
            throw ModelError(model.path, "has geometry \(model.config.geometry); the cache has \(g)")
        }
        guard n >= 1, n <= reader.tokenCount else {
            throw KVPackError.argument("cannot observe \(n) tokens of a cache of \(reader.tokenCount)")
        }
        let w = min(max(window, 1), n)
        let cache = try ObservingCache(reader: reader, prefix: n - w, total: n)
        try model.forward(tokens: reader.tokens(n - w ..< n).ids.map { Int($0) }, cache: cache)
        return AttentionObservation(heads: g.layerCount * g.queryHeadCount, tokens: n, queries: w, weights: cache.weights)
    }
}

/// A read-only cache for `AttentionObserver`: the first `prefix` tokens come from the file, the
/// re-read tokens from the forward pass; attention is computed exactly (explicit softmax) so the
/// weights can be recorded.
final class ObservingCache: KVCache {
    let reader: KVPackReader
    let prefix: Int
    let total: Int
    let geometry: ModelGeometry
    /// `layers x queryHeads x total`, summed weights.
    private(set) var weights: [Float]
    private var staged = 0
    private(set) var batchPositions: [UInt32] = []
    /// Rows of the re-read tokens: [layer][token][kvHead][headDim].
    private var freshKeys: [Float], freshValues: [Float]
    /// The decoded prefix of one layer: [kvHead][token][headDim].
    private var prefixLayer = -1
    private var prefixKeys: [Float], prefixValues: [Float]
    private var scores: [Float]
    private let workspace = AttentionWorkspace()
    /// The file's positions of tokens [0, total).
    private let filePositions: [UInt32]

    init(reader: KVPackReader, prefix: Int, total: Int) throws {
        self.reader = reader
        filePositions = try reader.tokens(0 ..< total).positions
        self.prefix = prefix
        self.total = total
        geometry = reader.geometry
        let g = geometry
        weights = [Float](repeating: 0, count: g.layerCount * g.queryHeadCount * total)
        freshKeys = [Float](repeating: 0, count: g.layerCount * (total - prefix) * g.kvHeadCount * g.headDim)
        freshValues = freshKeys
        prefixKeys = [Float](repeating: 0, count: g.kvHeadCount * prefix * g.headDim)
        prefixValues = prefixKeys
        scores = [Float](repeating: 0, count: total)
    }

    var tokenCount: Int { prefix }
    var nextPosition: UInt32 { filePositions[prefix + staged - 1] &+ 1 }

    func beginBatch(tokenIDs: [UInt32], positions: [UInt32]?) throws {
        guard tokenIDs.count == total - prefix else { throw KVPackError.argument("the observer re-reads exactly \(total - prefix) tokens") }
        staged = tokenIDs.count
        batchPositions = positions ?? Array(filePositions[prefix ..< total])
    }

    func endBatch() throws {}

    func store(layer: Int, index: Int, keys: UnsafePointer<Float>, values: UnsafePointer<Float>) {
        let width = geometry.kvHeadCount * geometry.headDim
        let at = (layer * (total - prefix) + index) * width
        freshKeys.withUnsafeMutableBufferPointer { $0.baseAddress!.advanced(by: at).update(from: keys, count: width) }
        freshValues.withUnsafeMutableBufferPointer { $0.baseAddress!.advanced(by: at).update(from: values, count: width) }
    }

    private func loadPrefix(layer: Int) throws {
        guard prefixLayer != layer, prefix > 0 else { return }
        let d = geometry.headDim
        for h in 0 ..< geometry.kvHeadCount {
            try prefixKeys.withUnsafeMutableBufferPointer {
                try reader.decode(layer: layer, kvHead: h, kind: .key, tokens: 0 ..< prefix, into: $0.baseAddress! + h * prefix * d, workspace: workspace)
            }
            try prefixValues.withUnsafeMutableBufferPointer {
                try reader.decode(layer: layer, kvHead: h, kind: .value, tokens: 0 ..< prefix, into: $0.baseAddress! + h * prefix * d, workspace: workspace)
            }
        }
        prefixLayer = layer
    }

    func attend(layer: Int, kvHead: Int, queries: UnsafePointer<Float>, count: Int, scale: Float?,
                output: UnsafeMutablePointer<Float>) throws {
        try loadPrefix(layer: layer)
        let g = geometry, d = g.headDim, width = g.kvHeadCount * d
        let s = scale ?? 1 / Float(d).squareRoot()
        let fresh = (layer * (total - prefix)) * width + kvHead * d
        prefixKeys.withUnsafeBufferPointer { pk in
            prefixValues.withUnsafeBufferPointer { pv in
                freshKeys.withUnsafeBufferPointer { fk in
                    freshValues.withUnsafeBufferPointer { fv in
                        scores.withUnsafeMutableBufferPointer { sc in
                            weights.withUnsafeMutableBufferPointer { wt in
                                func key(_ t: Int) -> UnsafePointer<Float> {
                                    t < prefix ? pk.baseAddress! + (kvHead * prefix + t) * d : fk.baseAddress! + fresh + (t - prefix) * width
                                }
                                func value(_ t: Int) -> UnsafePointer<Float> {
                                    t < prefix ? pv.baseAddress! + (kvHead * prefix + t) * d : fv.baseAddress! + fresh + (t - prefix) * width
                                }
                                for q in 0 ..< g.groupSize {
                                    let query = queries + q * d
                                    var m = -Float.infinity
                                    for t in 0 ..< count {
                                        let k = key(t)
                                        var dot: Float = 0
                                        for i in 0 ..< d { dot += query[i] * k[i] }
                                        sc[t] = dot * s
                                        m = max(m, sc[t])
                                    }
                                    var sum: Float = 0
                                    for t in 0 ..< count {
                                        sc[t] = expf(sc[t] - m)
                                        sum += sc[t]
                                    }
                                    let out = output + q * d
                                    out.initialize(repeating: 0, count: d)
                                    let row = ((layer * g.queryHeadCount) + kvHead * g.groupSize + q) * total
                                    for t in 0 ..< count {
                                        let p = sc[t] / sum
                                        wt[row + t] += p
                                        let v = value(t)
                                        for i in 0 ..< d { out[i] += p * v[i] }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
