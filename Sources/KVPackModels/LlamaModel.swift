#if canImport(Glibc)
import Glibc
#endif
import KVPack

/// The Llama forward pass (RMSNorm, RoPE on adjacent pairs, grouped-query attention, SwiGLU),
/// as llama2.c computes it, over any `KVCache`, for weights from a llama2.c checkpoint or a GGUF
/// file. Immutable after loading and safe to share between threads: the forward pass keeps its
/// activations in locals.
public final class LlamaModel: @unchecked Sendable {
    // @unchecked: the weights address the read-only mapping `weights.file` keeps alive.
    public let config: LlamaConfig
    public let weights: LlamaWeights
    /// XXH3-128 of the whole model file: identifies the exact weights a cache was computed with.
    public let fingerprint: [UInt8]

    public var path: String { weights.path }
    public var format: String { weights.format }
    public var tokenizer: BPETokenizer? { weights.tokenizer }

    public init(weights: LlamaWeights) {
        self.weights = weights
        config = weights.config
        fingerprint = Checksum.xxh3_128(weights.file.bytes)
    }

    /// Loads a llama2.c checkpoint or (by its magic) a GGUF file.
    public convenience init(path: String) throws {
        self.init(weights: try LlamaWeights(path: path))
    }

    public enum Logits {
        /// Logits after the last token of the batch.
        case last
        /// Logits after every token of the batch (teacher forcing), row-major.
        case all
    }

    /// Runs `tokens` through the model as one batch, appending their keys and values to
    /// `cache`. Returns the logits `which` asks for.
    @discardableResult
    public func forward(tokens: [Int], cache: KVCache, logits which: Logits = .last) throws -> [Float] {
        guard !tokens.isEmpty else { return [] }
        for t in tokens where !(0 ..< config.vocabSize).contains(t) {
            throw ModelError(path, "token id \(t) is outside the vocabulary 0..<\(config.vocabSize)")
        }
        try cache.beginBatch(tokenIDs: tokens.map { UInt32($0) }, positions: nil)
        let positions = cache.batchPositions.map { Int($0) }
        let out = try run(tokens: tokens, positions: positions, cache: cache, store: true, logits: which)
        try cache.endBatch()
        return out
    }

    /// The logits after the last stored token, recomputed from the cache without storing
    /// anything: a resumed conversation's starting point. The token's own keys and values are
    /// read back from the cache, so the result is what the original step produced.
    public func recomputeLast(tokenID: Int, cache: KVCache) throws -> [Float] {
        guard cache.tokenCount > 0 else { throw ModelError(path, "the cache is empty") }
        return try run(tokens: [tokenID], positions: [Int(cache.nextPosition) - 1], cache: cache, store: false, logits: .last)
    }

    private func run(tokens: [Int], positions: [Int], cache: KVCache, store: Bool, logits which: Logits) throws -> [Float] {
        let c = config
        let n = tokens.count
        let dim = c.dim, kvDim = c.kvDim, hs = c.headDim, group = c.headCount / c.kvHeadCount
        let base = store ? cache.tokenCount : cache.tokenCount - 1
        let w = weights
        var x = [Float](repeating: 0, count: n * dim)
        var xb = x, q = x, att = x, proj = x
        var k = [Float](repeating: 0, count: n * kvDim), v = k
        var h1 = [Float](repeating: 0, count: n * c.hiddenDim), h3 = h1
        for (i, t) in tokens.enumerated() { x.withUnsafeMutableBufferPointer { w.embedding.row(t, into: $0.baseAddress!.advanced(by: i * dim)) } }
        let rotations = ropeTable(positions: positions)

        for layer in 0 ..< c.layerCount {
            rmsnorm(x, weight: w.rmsAttention[layer], rows: n, into: &xb)
            xb.withUnsafeBufferPointer { inp in
                q.withUnsafeMutableBufferPointer { w.wq[layer].apply(inp.baseAddress!, count: n, into: $0.baseAddress!) }
                k.withUnsafeMutableBufferPointer { w.wk[layer].apply(inp.baseAddress!, count: n, into: $0.baseAddress!) }
                v.withUnsafeMutableBufferPointer { w.wv[layer].apply(inp.baseAddress!, count: n, into: $0.baseAddress!) }
            }
            for i in 0 ..< n {
                rope(&q, row: i, width: dim, table: rotations)
                rope(&k, row: i, width: kvDim, table: rotations)
            }
            if store {
                k.withUnsafeBufferPointer { kp in
                    v.withUnsafeBufferPointer { vp in
                        for i in 0 ..< n { cache.store(layer: layer, index: i, keys: kp.baseAddress! + i * kvDim, values: vp.baseAddress! + i * kvDim) }
                    }
                }
            }
            try q.withUnsafeBufferPointer { qp in
                try att.withUnsafeMutableBufferPointer { ap in
                    for i in 0 ..< n {
                        for kvh in 0 ..< c.kvHeadCount {
                            let at = i * dim + kvh * group * hs
                            try cache.attend(layer: layer, kvHead: kvh, queries: qp.baseAddress! + at, count: base + i + 1,
                                             scale: nil, output: ap.baseAddress! + at)
                        }
                    }
                }
            }
            att.withUnsafeBufferPointer { a in proj.withUnsafeMutableBufferPointer { w.wo[layer].apply(a.baseAddress!, count: n, into: $0.baseAddress!) } }
            for i in 0 ..< n * dim { x[i] += proj[i] }

            rmsnorm(x, weight: w.rmsFFN[layer], rows: n, into: &xb)
            xb.withUnsafeBufferPointer { inp in
                h1.withUnsafeMutableBufferPointer { w.w1[layer].apply(inp.baseAddress!, count: n, into: $0.baseAddress!) }
                h3.withUnsafeMutableBufferPointer { w.w3[layer].apply(inp.baseAddress!, count: n, into: $0.baseAddress!) }
            }
            for i in 0 ..< h1.count {
                let a = h1[i]
                h1[i] = a / (1 + expf(-a)) * h3[i]
            }
            h1.withUnsafeBufferPointer { hp in proj.withUnsafeMutableBufferPointer { w.w2[layer].apply(hp.baseAddress!, count: n, into: $0.baseAddress!) } }
            for i in 0 ..< n * dim { x[i] += proj[i] }
        }

        let first = which == .last ? n - 1 : 0
        let rows = n - first
        var final = [Float](repeating: 0, count: rows * dim)
        rmsnorm(Array(x[first * dim ..< n * dim]), weight: w.rmsFinal, rows: rows, into: &final)
        var out = [Float](repeating: 0, count: rows * c.vocabSize)
        final.withUnsafeBufferPointer { f in out.withUnsafeMutableBufferPointer { w.classifier.apply(f.baseAddress!, count: rows, into: $0.baseAddress!) } }
        return out
    }

    /// llama2.c's RMSNorm: w * x / sqrt(mean(x^2) + eps), row by row.
    private func rmsnorm(_ x: [Float], weight: UnsafePointer<Float>, rows: Int, into out: inout [Float]) {
        let dim = config.dim
        for r in 0 ..< rows {
            var ss: Float = 0
            for j in 0 ..< dim { ss += x[r * dim + j] * x[r * dim + j] }
            ss = 1 / (ss / Float(dim) + config.normEpsilon).squareRoot()
            for j in 0 ..< dim { out[r * dim + j] = weight[j] * (ss * x[r * dim + j]) }
        }
    }

    /// Each position's RoPE rotations, (cos, sin) per channel pair of a head, angle position *
    /// theta^(-2i/headDim) with llama2.c's float arithmetic: the same for every layer and head,
    /// so computed once per forward pass (per layer, the powf/cosf/sinf calls were 2% of a
    /// prefill).
    private func ropeTable(positions: [Int]) -> [Float] {
        let hs = config.headDim, pairs = hs / 2
        var table = [Float](repeating: 0, count: positions.count * hs)
        for (row, position) in positions.enumerated() {
            for j in 0 ..< pairs {
                let freq = 1 / powf(config.ropeTheta, Float(2 * j) / Float(hs))
                let angle = Float(position) * freq
                table[(row * pairs + j) * 2] = cosf(angle)
                table[(row * pairs + j) * 2 + 1] = sinf(angle)
            }
        }
        return table
    }

    /// Rotates adjacent pairs (2i, 2i+1) of every head in row `row` by its position's angles.
    private func rope(_ v: inout [Float], row: Int, width: Int, table: [Float]) {
        let hs = config.headDim, pairs = hs / 2
        for i in stride(from: 0, to: width, by: 2) {
            let at = (row * pairs + (i % hs) / 2) * 2
            let c = table[at], s = table[at + 1]
            let a = v[row * width + i], b = v[row * width + i + 1]
            v[row * width + i] = a * c - b * s
            v[row * width + i + 1] = a * s + b * c
        }
    }
}
