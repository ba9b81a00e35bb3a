import Foundation
import Testing
@testable import KVPack

struct NSNSchemeTests {
    static let geometry = ModelGeometry(layerCount: 2, queryHeadCount: 6, kvHeadCount: 2, headDim: 24)

    static func scheme(bits: Int, headDim: Int, segmentTokens: Int = 32) throws -> NSNScheme {
        var g = geometry
        g.headDim = headDim
        let setup = try NSNScheme.setup(arguments: ["\(bits)"], role: .key, geometry: g)
        var blob = setup.blobs[0]
        blob.id = 1
        return try NSNScheme(descriptor: setup.descriptor, context: SchemeContext(geometry: g, segmentTokens: segmentTokens, rope: .none,
                                                                                   role: .key, blobs: [blob]))
    }

    @Test("the transform inverts to float error without quantization, for power-of-two and block-diagonal head dims",
          arguments: [8, 24, 40, 64, 96, 128])
    func transformInverts(d: Int) throws {
        let s = try Self.scheme(bits: 1, headDim: d)
        #expect(s.hadamardBlocks.map(\.1).reduce(0, +) == d)
        var rng = SplitMix64(seed: UInt64(d))
        let c = 32
        let x = (0 ..< c * d).map { _ in Float(rng.nextGaussian()) * 3 + 0.5 }
        // Normalize, shift, normalize, rotate; then the inverse with the exact (unquantized) y.
        var unit = x
        var n1 = [Float](repeating: 0, count: c)
        for t in 0 ..< c {
            n1[t] = (x[t * d ..< (t + 1) * d].reduce(0) { $0 + $1 * $1 }).squareRoot()
            for i in 0 ..< d { unit[t * d + i] /= n1[t] }
        }
        let mean = (0 ..< d).map { i in (0 ..< c).reduce(Float(0)) { $0 + unit[$1 * d + i] } / Float(c) }
        var worst: Float = 0
        for t in 0 ..< c {
            var y = (0 ..< d).map { unit[t * d + $0] - mean[$0] }
            let n2 = (y.reduce(0) { $0 + $1 * $1 }).squareRoot()
            y = y.map { $0 * Float(d).squareRoot() / n2 }
            y.withUnsafeMutableBufferPointer { s.rotate($0.baseAddress!) }
            // Rotation preserves the norm: unit variance per element.
            let variance = y.reduce(0) { $0 + $1 * $1 } / Float(d)
            #expect(abs(variance - 1) < 1e-4)
            y.withUnsafeMutableBufferPointer { s.unrotate($0.baseAddress!) }
            for i in 0 ..< d {
                let back = n1[t] * (n2 * y[i] / Float(d).squareRoot() + mean[i])
                worst = max(worst, abs(back - x[t * d + i]) / (abs(x[t * d + i]) + 1))
            }
        }
        #expect(worst < 1e-5, "head_dim \(d): \(worst)")
    }

    static let specs = ["nsn:1", "nsn:2", "nsn:2+v:raw:f16", "k:int:k4v4+v:nsn:1:seed7"]

    @Test("lookup-table attention equals attention over the decoded cache to 1e-5, across blocks and GQA groups", arguments: specs)
    func attention(spec: String) throws {
        let (reader, data) = try writeSchemeTestFile(Self.geometry, spec: spec, seed: 51)
        #expect(reader.header.major == 2 && reader.header.minor == 0)
        try expectAttentionMatchesDecoded(reader, label: spec, seed: 9)
        // Quantized, so not a copy, but far better than nothing.
        let kind: KVKind = spec.hasSuffix("raw:f16") ? .key : .value
        let v = try reader.decode(layer: 0, kvHead: 1, kind: kind, tokens: 0 ..< 128)
        let exact = data.stream(layer: 0, head: 1, kind: kind, tokens: 0 ..< 128)
        var e = RelativeError()
        v.withUnsafeBufferPointer { a in exact.withUnsafeBufferPointer { e.add(a.baseAddress!, $0.baseAddress!, a.count) } }
        #expect(e.relative > 1e-3 && e.relative < (spec.contains("nsn:1") ? 0.7 : 0.5), "\(kind) error \(e.relative)")
    }

    @Test("the C Hadamard transform gives the Swift loop's bits", arguments: [8, 16, 32, 64, 128, 256])
    func hadamardInC(size: Int) {
        var rng = SplitMix64(seed: UInt64(size))
        let x = (0 ..< size).map { _ in Float(rng.nextGaussian()) * 5 }
        var c = x, swift = x
        let ran = c.withUnsafeMutableBufferPointer { CodewordKernels.hadamard($0.baseAddress!, size: size, norm: 1 / Float(size).squareRoot()) }
        guard ran else { return }   // no AVX2 here: only the Swift loop runs
        swift.withUnsafeMutableBufferPointer { NSNScheme.hadamardInSwift($0.baseAddress!, size: size) }
        let same = c.map { $0.bitPattern } == swift.map { $0.bitPattern }
        #expect(same, "size \(size)")
    }

    @Test("codes read in place (and 1-bit scores from the lookup table) agree with the f32 tile path, short and long spans",
          arguments: ["nsn:1", "nsn:2"])
    func inPlaceMatchesTiles(spec: String) throws {
        // GQA group 3 (a partial pass of four heads), head_dim 64; 1,300 tokens so one span is past
        // the table's threshold (1,024) and one is not.
        let g = ModelGeometry(layerCount: 1, queryHeadCount: 6, kvHeadCount: 2, headDim: 64)
        let data = RandomKV(geometry: g, tokens: 1300, seed: 17, maxExponent: 4)
        let path = temporaryDirectory() + "/nsn-long.kvpack"
        try writeFile(path, data: data, segmentTokens: 64, spec: spec, batches: [300, 700, 300], commitsAfter: [1000])
        let fast = try KVPackReader(path: path), exact = try KVPackReader(path: path, arithmetic: .exact)
        var rng = SplitMix64(seed: 3)
        // One workspace for every fast call: a short span right after a long one must not read
        // the long one's table.
        let workspace = AttentionWorkspace()
        for range in [0 ..< 1300, 37 ..< 1200, 0 ..< 200, 1290 ..< 1300] {
            for head in 0 ..< 2 {
                let q = (0 ..< g.groupSize * g.headDim).map { _ in Float(rng.nextGaussian()) * 2 }
                var a = [Float](repeating: 0, count: q.count)
                try q.withUnsafeBufferPointer { qp in
                    try a.withUnsafeMutableBufferPointer {
                        try fast.attend(layer: 0, kvHead: head, queries: qp.baseAddress!, tokens: range, output: $0.baseAddress!, workspace: workspace)
                    }
                }
                let b = try exact.attend(layer: 0, kvHead: head, queries: q, tokens: range)
                let err = DenseAttention.maxRelativeError(a, b)
                #expect(err < 1e-5, "\(spec) \(range) head \(head): \(err)")
            }
        }
    }

    @Test("the codebook recipe is deterministic; a codebook whose hash mismatches, or of the wrong shape, is refused")
    func codebook() throws {
        let a = NSNScheme.fitCodebook(bits: 2, seed: 5, samples: 4096, rounds: 5)
        let b = NSNScheme.fitCodebook(bits: 2, seed: 5, samples: 4096, rounds: 5)
        #expect(a == b && a.count == 256 * 8 && a.allSatisfy { $0 >= 0 })
        #expect(NSNScheme.fitCodebook(bits: 1, seed: 5, samples: 4096, rounds: 5) != a)
        let g = Self.geometry
        let setup = try NSNScheme.setup(arguments: ["2"], role: .key, geometry: g)
        func make(_ blob: Blob) throws -> NSNScheme {
            try NSNScheme(descriptor: setup.descriptor, context: SchemeContext(geometry: g, segmentTokens: 32, rope: .none, role: .key, blobs: [blob]))
        }
        _ = try make(setup.blobs[0])
        var changed = setup.blobs[0]
        changed.bytes[100] ^= 1
        #expect { try make(changed) } throws: { ($0 as? KVPackError)?.field?.contains("codebookHash") == true }
        var shape = setup.blobs[0]
        shape.shape = [128, 16]
        #expect(throws: KVPackError.self) { try make(shape) }
        for bad in ["nsn", "nsn:3", "nsn:2:zz"] {
            #expect(throws: KVPackError.self, "\(bad)") { try SchemeSpec.parse(bad, geometry: g) }
        }
        var odd = g
        odd.headDim = 12
        #expect(throws: KVPackError.self) { try SchemeSpec.parse("nsn:1", geometry: odd) }
    }
}
