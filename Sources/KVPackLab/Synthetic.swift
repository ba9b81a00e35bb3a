#if canImport(Glibc)
import Glibc
#endif
import KVPack

/// Geometries of real models, for synthetic caches and benchmarks.
public struct ModelPreset: Sendable {
    public var name: String
    public var geometry: ModelGeometry
    public var rope: RoPEConfig
    public var maxPositions: UInt32

    public static let all: [ModelPreset] = [
        ModelPreset(name: "llama-3-8b", geometry: .init(layerCount: 32, queryHeadCount: 32, kvHeadCount: 8, headDim: 128),
                    rope: .init(theta: 500_000, layout: .rotateHalf), maxPositions: 8192),
        ModelPreset(name: "llama-2-7b", geometry: .init(layerCount: 32, queryHeadCount: 32, kvHeadCount: 32, headDim: 128),
                    rope: .init(theta: 10_000, layout: .rotateHalf), maxPositions: 4096),
        ModelPreset(name: "mistral-7b", geometry: .init(layerCount: 32, queryHeadCount: 32, kvHeadCount: 8, headDim: 128),
                    rope: .init(theta: 1_000_000, layout: .rotateHalf), maxPositions: 32768),
        ModelPreset(name: "qwen2.5-0.5b", geometry: .init(layerCount: 24, queryHeadCount: 14, kvHeadCount: 2, headDim: 64),
                    rope: .init(theta: 1_000_000, layout: .rotateHalf), maxPositions: 32768),
        ModelPreset(name: "smollm2-135m", geometry: .init(layerCount: 30, queryHeadCount: 9, kvHeadCount: 3, headDim: 64),
                    rope: .init(theta: 100_000, layout: .interleaved), maxPositions: 8192),
        ModelPreset(name: "stories260k", geometry: .init(layerCount: 5, queryHeadCount: 8, kvHeadCount: 4, headDim: 8),
                    rope: .init(theta: 10_000, layout: .interleaved), maxPositions: 512),
    ]

    public static func named(_ name: String) -> ModelPreset? { all.first { $0.name == name } }
}

/// Deterministic synthetic K/V with the statistics that matter for quantization: keys have a
/// per-channel bias and a few outlier channels of large magnitude, and are rotated by RoPE at
/// their position; values are unbiased and have no outliers. Scale: keys ~1-1.5 per channel
/// (outliers ~12-18), values 0.6. Every (layer, head, token) is
/// generated independently from the seed, so any token can be regenerated (tests compare
/// files against it) and appends can stop and resume anywhere.
public struct SyntheticKV: Sendable {
    public let geometry: ModelGeometry
    public let rope: RoPEConfig
    public let seed: UInt64
    /// Per (layer, head, channel): the key bias and scale (outlier channels get a large scale).
    private let keyBias: [Float]
    private let keyScale: [Float]
    /// theta^(-2i/d) for each rotary pair.
    private let inverseFrequency: [Double]

    /// `outlierChannels` channels per (layer, head) get `outlierScale` times the magnitude.
    public init(geometry: ModelGeometry, rope: RoPEConfig, seed: UInt64, outlierChannels: Int = 4, outlierScale: Float = 12) {
        self.geometry = geometry
        self.rope = rope
        self.seed = seed
        let d = geometry.headDim
        var bias: [Float] = [], scale: [Float] = []
        for layer in 0 ..< geometry.layerCount {
            for head in 0 ..< geometry.kvHeadCount {
                var channel = SplitMix64(seed: Self.mix(seed, UInt64(layer), UInt64(head), 0xC4A77E1))
                var outliers = Set<Int>()
                for _ in 0 ..< min(outlierChannels, d) { outliers.insert(Int(channel.next() % UInt64(d))) }
                for c in 0 ..< d {
                    bias.append(Float(channel.nextGaussian()) * 0.8)
                    scale.append((1 + Float(channel.nextUniform()) * 0.5) * (outliers.contains(c) ? outlierScale : 1))
                }
            }
        }
        keyBias = bias
        keyScale = scale
        inverseFrequency = (0 ..< d / 2).map { pow(rope.theta, -Double(2 * $0) / Double(d)) }
    }

    /// Fills keys and values ([layers][kvHeads][headDim] each) for the token at `index` with
    /// rotary position `position`.
    public func token(_ index: Int, position: Int, keys: UnsafeMutablePointer<Float>, values: UnsafeMutablePointer<Float>) {
        let d = geometry.headDim
        let pairs = rope.layout == .none ? 0 : d / 2
        withUnsafeTemporaryAllocation(of: Float.self, capacity: 2 * max(pairs, 1)) { table in
            for i in 0 ..< pairs {
                let angle = Double(position) * inverseFrequency[i]
                table[2 * i] = Float(cos(angle))
                table[2 * i + 1] = Float(sin(angle))
            }
            for layer in 0 ..< geometry.layerCount {
                for head in 0 ..< geometry.kvHeadCount {
                    let o = (layer * geometry.kvHeadCount + head) * d
                    var rng = SplitMix64(seed: Self.mix(seed, UInt64(layer), UInt64(head), UInt64(index) &+ 1))
                    for c in 0 ..< d {
                        let (a, b) = rng.nextGaussianPair()
                        keys[o + c] = (keyBias[o + c] + Float(a)) * keyScale[o + c]
                        values[o + c] = Float(b) * 0.6
                    }
                    for i in 0 ..< pairs {
                        let (x, y) = rope.layout == .interleaved ? (o + 2 * i, o + 2 * i + 1) : (o + i, o + i + d / 2)
                        let c = table[2 * i], s = table[2 * i + 1]
                        let kx = keys[x], ky = keys[y]
                        keys[x] = kx * c - ky * s
                        keys[y] = kx * s + ky * c
                    }
                }
            }
        }
    }

    /// Elements (ids, key and value floats) of tokens `tokens` of `reader` whose bits differ from
    /// this generator's: 0 for a lossless f32 file the generator wrote at positions = indices.
    public func mismatches(in reader: KVPackReader, tokens: Range<Int>) throws -> Int {
        let g = geometry
        let per = g.layerCount * g.kvHeadCount * g.headDim
        var wantK = [Float](repeating: 0, count: per * tokens.count), wantV = wantK
        wantK.withUnsafeMutableBufferPointer { k in
            wantV.withUnsafeMutableBufferPointer { v in
                for (i, t) in tokens.enumerated() { token(t, position: t, keys: k.baseAddress! + i * per, values: v.baseAddress! + i * per) }
            }
        }
        var mismatches = zip(try reader.tokens(tokens).ids, tokens.map(tokenID)).filter { $0 != $1 }.count
        for layer in 0 ..< g.layerCount {
            for head in 0 ..< g.kvHeadCount {
                let k = try reader.decode(layer: layer, kvHead: head, kind: .key, tokens: tokens)
                let v = try reader.decode(layer: layer, kvHead: head, kind: .value, tokens: tokens)
                for i in 0 ..< tokens.count {
                    let src = i * per + (layer * g.kvHeadCount + head) * g.headDim
                    for c in 0 ..< g.headDim {
                        if k[i * g.headDim + c].bitPattern != wantK[src + c].bitPattern { mismatches += 1 }
                        if v[i * g.headDim + c].bitPattern != wantV[src + c].bitPattern { mismatches += 1 }
                    }
                }
            }
        }
        return mismatches
    }

    /// A token id stream for synthetic files (deterministic, in 0..<32000).
    public func tokenID(_ index: Int) -> UInt32 {
        UInt32(Self.mix(seed, 0x70CE, UInt64(index), 7) % 32000)
    }

    private static func mix(_ a: UInt64, _ b: UInt64, _ c: UInt64, _ d: UInt64) -> UInt64 {
        var s = SplitMix64(seed: a ^ 0x9E37_79B9_7F4A_7C15)
        var h = s.next() ^ b
        s = SplitMix64(seed: h)
        h = s.next() ^ c
        s = SplitMix64(seed: h)
        h = s.next() ^ d
        s = SplitMix64(seed: h)
        return s.next()
    }
}
