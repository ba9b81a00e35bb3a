/// Per-layer magnitudes of a cache, for planners that split a bit budget between layers and
/// between keys and values (KV-AdaQuant's observation: keys have larger norms and spectral norms,
/// and their errors cost more). Length-independent: norms are per token.
public struct CacheStatistics: Sendable, Codable, Equatable {
    public struct Layer: Sendable, Codable, Equatable {
        /// sqrt(mean over heads and tokens of ||row||^2): the RMS row norm (a Frobenius norm per token).
        public var keyNorm: Double
        public var valueNorm: Double
        /// sqrt(mean over heads of lambda_max(X^T X / tokens)): the spectral norm per sqrt(token).
        public var keySpectralNorm: Double
        public var valueSpectralNorm: Double

        public init(keyNorm: Double, valueNorm: Double, keySpectralNorm: Double, valueSpectralNorm: Double) {
            self.keyNorm = keyNorm
            self.valueNorm = valueNorm
            self.keySpectralNorm = keySpectralNorm
            self.valueSpectralNorm = valueSpectralNorm
        }
    }

    public var tokens: Int
    public var layers: [Layer]
    /// X^T X (headDim x headDim, row-major) of every stream, in stream order (layer, KV head,
    /// K then V); empty when built from norms alone. SVDq's bases come from these.
    public var grams: [[Double]]
    /// What coding one layer's keys or values alone costs the model, measured by running it
    /// (`int:auto:B:measured`); nil unless a tool that has the model measured it.
    public var sensitivity: LayerSensitivity?
    /// Per (layer, KV head), in that order: each channel's RMS over the queries that read the
    /// head (its query group) and the calibration tokens; empty unless a tool that ran the
    /// model recorded them. Per-channel widths (`int:k2.5v2:kc64`) weight key channels by them.
    public var queryRMS: [[Double]] = []

    /// The model's loss when one layer's keys (or values) alone are coded with a probe scheme
    /// and everything else is lossless: per layer, the increase of the mean negative
    /// log-likelihood (nats per token) over a calibration text, against the lossless cache.
    public struct LayerSensitivity: Sendable, Codable, Equatable {
        /// The probe's code width (its scheme spec is in `probe`).
        public var probeBits: Int
        public var probe: String
        public var tokens: Int
        public var key: [Double]
        public var value: [Double]

        public init(probeBits: Int, probe: String, tokens: Int, key: [Double], value: [Double]) {
            self.probeBits = probeBits
            self.probe = probe
            self.tokens = tokens
            self.key = key
            self.value = value
        }
    }

    /// Saved plans (`kvpack plan --json`) keep the norms and sensitivities; Gram matrices are megabytes.
    enum CodingKeys: String, CodingKey { case tokens, layers, sensitivity, queryRMS }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        tokens = try c.decode(Int.self, forKey: .tokens)
        layers = try c.decode([Layer].self, forKey: .layers)
        sensitivity = try c.decodeIfPresent(LayerSensitivity.self, forKey: .sensitivity)
        queryRMS = try c.decodeIfPresent([[Double]].self, forKey: .queryRMS) ?? []
        grams = []
    }

    public init(tokens: Int, layers: [Layer], grams: [[Double]] = []) {
        self.tokens = tokens
        self.layers = layers
        self.grams = grams
    }

    public func gram(layer: Int, kvHead: Int, kind: KVKind, geometry: ModelGeometry) -> [Double] {
        grams[(layer * geometry.kvHeadCount + kvHead) * 2 + Int(kind.rawValue)]
    }

    /// Statistics of rows supplied per (layer, KV head, K or V), each tokens x headDim floats.
    public init(geometry: ModelGeometry, tokens: Int, rows: (Int, Int, KVKind) throws -> [Float]) rethrows {
        self.tokens = tokens
        var layers: [Layer] = []
        var grams: [[Double]] = []
        for layer in 0 ..< geometry.layerCount {
            var norm: [Double] = [0, 0], spectral: [Double] = [0, 0]
            for head in 0 ..< geometry.kvHeadCount {
                for kind in KVKind.allCases {
                    let x = try rows(layer, head, kind)
                    let k = Int(kind.rawValue)
                    norm[k] += x.reduce(0.0) { $0 + Double($1) * Double($1) } / Double(max(tokens, 1))
                    let gram = Self.gram(rows: x, dim: geometry.headDim)
                    grams.append(gram)
                    spectral[k] += Self.largestEigenvalue(gram: gram, dim: geometry.headDim) / Double(max(tokens, 1))
                }
            }
            let h = Double(geometry.kvHeadCount)
            layers.append(Layer(keyNorm: (norm[0] / h).squareRoot(), valueNorm: (norm[1] / h).squareRoot(),
                                keySpectralNorm: (spectral[0] / h).squareRoot(), valueSpectralNorm: (spectral[1] / h).squareRoot()))
        }
        self.layers = layers
        self.grams = grams
    }

    /// X^T X for X: rows x dim.
    static func gram(rows x: [Float], dim d: Int) -> [Double] {
        var gram = [Double](repeating: 0, count: d * d)
        for t in 0 ..< x.count / d {
            for i in 0 ..< d {
                let xi = Double(x[t * d + i])
                if xi == 0 { continue }
                for j in 0 ..< d { gram[i * d + j] += xi * Double(x[t * d + j]) }
            }
        }
        return gram
    }

    /// lambda_max of a Gram matrix by power iteration.
    static func largestEigenvalue(gram: [Double], dim d: Int) -> Double {
        guard gram.contains(where: { $0 != 0 }) else { return 0 }
        var v = [Double](repeating: 1 / Double(d).squareRoot(), count: d)
        var lambda = 0.0
        for _ in 0 ..< 100 {
            var w = [Double](repeating: 0, count: d)
            for i in 0 ..< d { for j in 0 ..< d { w[i] += gram[i * d + j] * v[j] } }
            let norm = w.reduce(0) { $0 + $1 * $1 }.squareRoot()
            guard norm > 0 else { return 0 }
            let next = norm
            v = w.map { $0 / norm }
            if abs(next - lambda) <= 1e-12 * next { lambda = next; break }
            lambda = next
        }
        return lambda
    }
}

/// Sums of squared query channels per (layer, KV head), collected while a model runs (or from
/// saved queries), for `CacheStatistics.queryRMS`.
public struct QueryChannelSums: Sendable {
    public let geometry: ModelGeometry
    private var sums: [Double]
    private var counts: [Int]

    public init(geometry: ModelGeometry) {
        self.geometry = geometry
        sums = Array(repeating: 0, count: geometry.layerCount * geometry.kvHeadCount * geometry.headDim)
        counts = Array(repeating: 0, count: geometry.layerCount * geometry.kvHeadCount)
    }

    /// Adds `count` query rows (headDim floats each) that attend with `kvHead` of `layer`.
    public mutating func add(layer: Int, kvHead: Int, queries: UnsafePointer<Float>, count: Int) {
        let d = geometry.headDim, at = layer * geometry.kvHeadCount + kvHead
        for r in 0 ..< count {
            for c in 0 ..< d {
                let x = Double(queries[r * d + c])
                sums[at * d + c] += x * x
            }
        }
        counts[at] += count
    }

    /// Per (layer, KV head), each channel's RMS; empty when nothing was added.
    public var rms: [[Double]] {
        guard counts.contains(where: { $0 > 0 }) else { return [] }
        let d = geometry.headDim
        return counts.indices.map { i in (0 ..< d).map { c in (sums[i * d + c] / Double(max(counts[i], 1))).squareRoot() } }
    }
}

