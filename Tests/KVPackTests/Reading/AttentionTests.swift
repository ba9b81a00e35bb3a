import Foundation
import Testing
@testable import KVPack

struct AttentionTests {
    @Test("reader attention equals a dense reference over decoded K/V to 1e-5", arguments: RoundTripTests.specs)
    func matchesDense(spec: String) throws {
        let g = ModelGeometry(layerCount: 2, queryHeadCount: 8, kvHeadCount: 2, headDim: 20)
        // Keys up to ~8 in magnitude and queries of norm ~9 give logits up to ~30: a peaked
        // softmax, at the scale real models produce. (Logits in the hundreds make f32 score
        // rounding alone exceed 1e-5 relative, for any kernel.)
        let data = RandomKV(geometry: g, tokens: 157, seed: 77, maxExponent: 8)
        let dir = temporaryDirectory()
        try writeFile(dir + "/a.kvpack", data: data, segmentTokens: 24, spec: spec, batches: [5, 50, 1], commitsAfter: [5, 56, 150])
        let reader = try KVPackReader(path: dir + "/a.kvpack")
        var rng = SplitMix64(seed: 1)
        let ranges = [0 ..< 157, 0 ..< 1, 23 ..< 25, 13 ..< 140, 144 ..< 157, 150 ..< 152, 24 ..< 48]
        for layer in 0 ..< 2 {
            for head in 0 ..< 2 {
                for range in ranges {
                    // Larger query norms make the softmax peaked, which stresses the running max.
                    let queries = (0 ..< g.groupSize * g.headDim).map { _ in Float(rng.nextGaussian()) * 2 }
                    let got = try reader.attend(layer: layer, kvHead: head, queries: queries, tokens: range)
                    let k = try reader.decode(layer: layer, kvHead: head, kind: .key, tokens: range)
                    let v = try reader.decode(layer: layer, kvHead: head, kind: .value, tokens: range)
                    let want = DenseAttention.reference(queries: queries, keys: k, values: v, groupSize: g.groupSize, headDim: g.headDim)
                    let err = DenseAttention.maxRelativeError(got, want)
                    #expect(err < 1e-5, "layer \(layer) head \(head) tokens \(range): \(err)")
                }
            }
        }
    }

    @Test("f32 attention equals the reference over the original input")
    func matchesInput() throws {
        let g = ModelGeometry(layerCount: 1, queryHeadCount: 4, kvHeadCount: 1, headDim: 64)
        let data = RandomKV(geometry: g, tokens: 100, seed: 8)
        let dir = temporaryDirectory()
        try writeFile(dir + "/a.kvpack", data: data, segmentTokens: 32, spec: "raw:f32", batches: [100])
        let reader = try KVPackReader(path: dir + "/a.kvpack")
        var rng = SplitMix64(seed: 2)
        let q = (0 ..< 4 * 64).map { _ in Float(rng.nextGaussian()) }
        func reference(scale: Float?) -> [Float] {
            DenseAttention.reference(queries: q, keys: data.stream(layer: 0, head: 0, kind: .key, tokens: 0 ..< 100),
                                     values: data.stream(layer: 0, head: 0, kind: .value, tokens: 0 ..< 100), groupSize: 4, headDim: 64,
                                     scale: scale)
        }
        #expect(DenseAttention.maxRelativeError(try reader.attend(layer: 0, kvHead: 0, queries: q), reference(scale: nil)) < 1e-5)
        // A custom scale too.
        #expect(DenseAttention.maxRelativeError(try reader.attend(layer: 0, kvHead: 0, queries: q, scale: 0.5), reference(scale: 0.5)) < 1e-5)
    }

    @Test("bad arguments are errors, not traps")
    func arguments() throws {
        let g = ModelGeometry(layerCount: 1, queryHeadCount: 2, kvHeadCount: 1, headDim: 4)
        let data = RandomKV(geometry: g, tokens: 10, seed: 1)
        let dir = temporaryDirectory()
        try writeFile(dir + "/a.kvpack", data: data, segmentTokens: 4, spec: "raw:f32", batches: [10])
        let r = try KVPackReader(path: dir + "/a.kvpack")
        let q = [Float](repeating: 1, count: 8)
        #expect(throws: KVPackError.self) { try r.attend(layer: 1, kvHead: 0, queries: q) }
        #expect(throws: KVPackError.self) { try r.attend(layer: 0, kvHead: 1, queries: q) }
        #expect(throws: KVPackError.self) { try r.attend(layer: 0, kvHead: 0, queries: q, tokens: 5 ..< 11) }
        #expect(throws: KVPackError.self) { try r.attend(layer: 0, kvHead: 0, queries: q, tokens: 3 ..< 3) }
        #expect(throws: KVPackError.self) { try r.attend(layer: 0, kvHead: 0, queries: [1, 2]) }
        #expect(throws: KVPackError.self) { try r.decode(layer: 0, kvHead: 0, kind: .key, tokens: -1 ..< 2) }
    }
}
