#if canImport(Glibc)
import Glibc
#endif
import KVPack

/// A dense row-major matrix [rows x cols] of f32 weights, in mapped memory.
struct Matrix {
    let rows: Int
    let cols: Int
    let data: UnsafePointer<Float>

    /// Y[t] = W x X[t] for `count` input rows (stride cols) into output rows (stride rows). Each
    /// weight row is read once per batch, not once per token.
    func apply(_ x: UnsafePointer<Float>, count: Int, into y: UnsafeMutablePointer<Float>) {
        for r in 0 ..< rows {
            let w = data + r * cols
            for t in 0 ..< count {
                y[t * rows + r] = RowKernels.dot(w, x + t * cols, cols)
            }
        }
    }
}

/// The Llama forward pass (RMSNorm, RoPE, grouped-query attention, SwiGLU), as llama2.c
/// computes it, over any `KVCache`. Immutable after loading and safe to share between threads:
/// the forward pass keeps its activations in locals.
public final class LlamaModel: @unchecked Sendable {
    // @unchecked: the stored pointers address the read-only mapping `checkpoint` keeps alive.
    public let config: LlamaConfig
    public let checkpoint: Llama2CCheckpoint
    let embedding: UnsafePointer<Float>
    let rmsAttention: UnsafePointer<Float>
    let rmsFFN: UnsafePointer<Float>
    let rmsFinal: UnsafePointer<Float>
    let wq: [Matrix], wk: [Matrix], wv: [Matrix], wo: [Matrix], w1: [Matrix], w2: [Matrix], w3: [Matrix]
    let classifier: Matrix

    public init(checkpoint: Llama2CCheckpoint) {
        self.checkpoint = checkpoint
        let c = checkpoint.config
        config = c
        let t = checkpoint.tensors
        func stack(_ name: String, rows: Int, cols: Int) -> [Matrix] {
            (0 ..< c.layerCount).map { Matrix(rows: rows, cols: cols, data: t[name]! + $0 * rows * cols) }
        }
        embedding = t["embedding"]!
        rmsAttention = t["rms_att"]!
        rmsFFN = t["rms_ffn"]!
        rmsFinal = t["rms_final"]!
        wq = stack("wq", rows: c.dim, cols: c.dim)
        wk = stack("wk", rows: c.kvDim, cols: c.dim)
        wv = stack("wv", rows: c.kvDim, cols: c.dim)
        wo = stack("wo", rows: c.dim, cols: c.dim)
        w1 = stack("w1", rows: c.hiddenDim, cols: c.dim)
        w2 = stack("w2", rows: c.dim, cols: c.hiddenDim)
        w3 = stack("w3", rows: c.hiddenDim, cols: c.dim)
        classifier = Matrix(rows: c.vocabSize, cols: c.dim, data: t["classifier"]!)
    }

    public convenience init(path: String) throws {
        self.init(checkpoint: try Llama2CCheckpoint(path: path))
    }

    public var fingerprint: [UInt8] { checkpoint.fingerprint }

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
            throw ModelError(checkpoint.path, "token id \(t) is outside the vocabulary 0..<\(config.vocabSize)")
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
        guard cache.tokenCount > 0 else { throw ModelError(checkpoint.path, "the cache is empty") }
        return try run(tokens: [tokenID], positions: [Int(cache.nextPosition) - 1], cache: cache, store: false, logits: .last)
    }

    private func run(tokens: [Int], positions: [Int], cache: KVCache, store: Bool, logits which: Logits) throws -> [Float] {
        let c = config
        let n = tokens.count
        let dim = c.dim, kvDim = c.kvDim, hs = c.headDim, group = c.headCount / c.kvHeadCount
        let base = store ? cache.tokenCount : cache.tokenCount - 1
        var x = [Float](repeating: 0, count: n * dim)
        var xb = x, q = x, att = x, proj = x
        var k = [Float](repeating: 0, count: n * kvDim), v = k
        var h1 = [Float](repeating: 0, count: n * c.hiddenDim), h3 = h1
        for (i, t) in tokens.enumerated() { x.withUnsafeMutableBufferPointer { $0.baseAddress!.advanced(by: i * dim).update(from: embedding + t * dim, count: dim) } }

        for layer in 0 ..< c.layerCount {
            rmsnorm(x, weight: rmsAttention + layer * dim, rows: n, into: &xb)
            xb.withUnsafeBufferPointer { inp in
                q.withUnsafeMutableBufferPointer { wq[layer].apply(inp.baseAddress!, count: n, into: $0.baseAddress!) }
                k.withUnsafeMutableBufferPointer { wk[layer].apply(inp.baseAddress!, count: n, into: $0.baseAddress!) }
                v.withUnsafeMutableBufferPointer { wv[layer].apply(inp.baseAddress!, count: n, into: $0.baseAddress!) }
            }
            for i in 0 ..< n {
                rope(&q, row: i, width: dim, position: positions[i])
                rope(&k, row: i, width: kvDim, position: positions[i])
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
            att.withUnsafeBufferPointer { a in proj.withUnsafeMutableBufferPointer { wo[layer].apply(a.baseAddress!, count: n, into: $0.baseAddress!) } }
            for i in 0 ..< n * dim { x[i] += proj[i] }

            rmsnorm(x, weight: rmsFFN + layer * dim, rows: n, into: &xb)
            xb.withUnsafeBufferPointer { inp in
                h1.withUnsafeMutableBufferPointer { w1[layer].apply(inp.baseAddress!, count: n, into: $0.baseAddress!) }
                h3.withUnsafeMutableBufferPointer { w3[layer].apply(inp.baseAddress!, count: n, into: $0.baseAddress!) }
            }
            for i in 0 ..< h1.count {
                let a = h1[i]
                h1[i] = a / (1 + expf(-a)) * h3[i]
            }
            h1.withUnsafeBufferPointer { hp in proj.withUnsafeMutableBufferPointer { w2[layer].apply(hp.baseAddress!, count: n, into: $0.baseAddress!) } }
            for i in 0 ..< n * dim { x[i] += proj[i] }
        }

        let first = which == .last ? n - 1 : 0
        let rows = n - first
        var final = [Float](repeating: 0, count: rows * dim)
        rmsnorm(Array(x[first * dim ..< n * dim]), weight: rmsFinal, rows: rows, into: &final)
        var out = [Float](repeating: 0, count: rows * c.vocabSize)
        final.withUnsafeBufferPointer { f in out.withUnsafeMutableBufferPointer { classifier.apply(f.baseAddress!, count: rows, into: $0.baseAddress!) } }
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

    /// Rotates adjacent pairs (2i, 2i+1) of every head by position * theta^(-2i/headDim), with
    /// llama2.c's float arithmetic.
    private func rope(_ v: inout [Float], row: Int, width: Int, position: Int) {
        let hs = config.headDim
        for i in stride(from: 0, to: width, by: 2) {
            let freq = 1 / powf(config.ropeTheta, Float(i % hs) / Float(hs))
            let angle = Float(position) * freq
            let c = cosf(angle), s = sinf(angle)
            let a = v[row * width + i], b = v[row * width + i + 1]
            v[row * width + i] = a * c - b * s
            v[row * width + i + 1] = a * s + b * c
        }
    }
}

/// Picks the next token: greedy (temperature 0; the first maximum, as llama2.c) or sampled
/// from softmax(logits / temperature) with a seeded generator.
public struct Sampler {
    public var temperature: Float
    var rng: SplitMix64

    public init(temperature: Float = 0, seed: UInt64 = 1) {
        self.temperature = temperature
        rng = SplitMix64(seed: seed)
    }

    public static func argmax(_ logits: ArraySlice<Float>) -> Int {
        var best = logits.startIndex
        for i in logits.indices where logits[i] > logits[best] { best = i }
        return best - logits.startIndex
    }

    public mutating func sample(_ logits: [Float]) -> Int {
        guard temperature > 0 else { return Self.argmax(logits[...]) }
        let m = logits.max() ?? 0
        let weights = logits.map { expf(($0 - m) / temperature) }
        var r = Float(rng.nextUniform()) * weights.reduce(0, +)
        for (i, w) in weights.enumerated() {
            r -= w
            if r <= 0 { return i }
        }
        return weights.count - 1
    }
}
