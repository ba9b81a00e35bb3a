import Foundation
import Testing
@testable import KVPack

struct SVDqSchemeTests {
    static let geometry = ModelGeometry(layerCount: 2, queryHeadCount: 6, kvHeadCount: 2, headDim: 24)

    @Test("Jacobi eigendecomposition: orthonormal vectors, A = V^T diag V, values in decreasing order")
    func eigen() throws {
        var rng = SplitMix64(seed: 3)
        for n in [1, 2, 7, 24, 64] {
            let x = (0 ..< 3 * n * n).map { _ in rng.nextGaussian() }
            var a = [Double](repeating: 0, count: n * n)
            for t in 0 ..< 3 * n { for i in 0 ..< n { for j in 0 ..< n { a[i * n + j] += x[t * n + i] * x[t * n + j] } } }
            let (values, v) = SymmetricEigen.decompose(a, dim: n)
            #expect(zip(values, values.dropFirst()).allSatisfy { $0 >= $1 })
            let scale = a.map(abs).max()!
            for i in 0 ..< n {
                for j in 0 ..< n {
                    var dot = 0.0, rebuilt = 0.0
                    for k in 0 ..< n { dot += v[i * n + k] * v[j * n + k]; rebuilt += v[k * n + i] * values[k] * v[k * n + j] }
                    #expect(abs(dot - (i == j ? 1 : 0)) < 1e-10, "n \(n): v\(i).v\(j) = \(dot)")
                    #expect(abs(rebuilt - a[i * n + j]) < 1e-10 * scale, "n \(n): A[\(i)][\(j)]")
                }
            }
        }
    }

    static func write(_ spec: String, data: RandomKV, dir: String) throws -> KVPackReader {
        let path = dir + "/" + String(spec.map { $0.isLetter || $0.isNumber ? $0 : "_" }) + ".kvpack"
        // The basis comes from the first 40 tokens, as a 40-token prefill would give it.
        let stats = CacheStatistics(geometry: data.geometry, tokens: 40) { l, h, k in
            Array(data.stream(layer: l, head: h, kind: k, tokens: 0 ..< 40))
        }
        let parsed = try SchemeSpec.parse(spec, geometry: data.geometry, calibration: stats)
        var file = NewFile(geometry: data.geometry, rope: RoPEConfig(theta: 10000, layout: .interleaved), schemes: parsed, producer: "test")
        file.segmentTokens = 32
        let w = try KVPackWriter.create(path: path, file: file, options: testOptions())
        for (t, n) in [(0, 7), (7, 80), (87, 63)] {
            try data.append(to: w, t ..< t + n)
            try w.commit()
        }
        try w.close()
        return try KVPackReader(path: path)
    }

    @Test("all channels at 16 bits: lossless up to f16 rounding (of the basis and the latents)")
    func lossless() throws {
        let data = RandomKV(geometry: Self.geometry, tokens: 150, seed: 8, maxExponent: 6)
        let reader = try Self.write("svdq:16", data: data, dir: temporaryDirectory())
        #expect(reader.header.major == 2 && reader.header.minor == 0)
        for layer in 0 ..< 2 {
            for head in 0 ..< 2 {
                for kind in KVKind.allCases {
                    let got = try reader.decode(layer: layer, kvHead: head, kind: kind, tokens: 0 ..< 128)
                    let want = data.stream(layer: layer, head: head, kind: kind, tokens: 0 ..< 128)
                    var e = RelativeError()
                    got.withUnsafeBufferPointer { g in want.withUnsafeBufferPointer { e.add(g.baseAddress!, $0.baseAddress!, g.count) } }
                    #expect(e.relative < 2e-3, "layer \(layer) head \(head) \(kind): \(e.relative)")
                }
            }
        }
    }

    static let specs = ["svdq:2", "svdq:1.25+v:raw:f16", "k:svdq:3:shared+v:int:k4v4", "svdq:8-4-4-2-2-1-1:r10+v:svdq:16-0-5"]

    @Test("projected-query attention equals attention over the reconstructed keys to 1e-5, across blocks and GQA groups", arguments: specs)
    func attention(spec: String) throws {
        let g = Self.geometry
        let data = RandomKV(geometry: g, tokens: 150, seed: 12, maxExponent: 6)
        let reader = try Self.write(spec, data: data, dir: temporaryDirectory())
        #expect(Validator.validate(file: reader.file, path: spec, deep: true).problems.isEmpty)
        try expectAttentionMatchesDecoded(reader, label: spec, seed: 6)
        // Fewer bits, more error: the decoded keys are a lossy projection, not a copy.
        let k = try reader.decode(layer: 1, kvHead: 1, kind: .key, tokens: 0 ..< 128)
        let exact = data.stream(layer: 1, head: 1, kind: .key, tokens: 0 ..< 128)
        var e = RelativeError()
        k.withUnsafeBufferPointer { a in exact.withUnsafeBufferPointer { e.add(a.baseAddress!, $0.baseAddress!, a.count) } }
        #expect(e.relative > 1e-3 && e.relative < 1)
    }

    @Test("the C key scores are the Swift ones bit for bit: every width, partial and unaligned ranges, groups 1-9")
    func scoresInC() throws {
        let g = ModelGeometry(layerCount: 1, queryHeadCount: 9, kvHeadCount: 1, headDim: 32)
        let data = RandomKV(geometry: g, tokens: 64, seed: 3)
        let stats = CacheStatistics(geometry: g, tokens: 64) { l, h, k in Array(data.stream(layer: l, head: h, kind: k, tokens: 0 ..< 64)) }
        let c = 64
        for spec in ["svdq:8-6-5-4-3-2-1-16-0-2-1", "svdq:2", "svdq:16-16-1"] {
            let parsed = try SchemeSpec.parse(spec, geometry: g, calibration: stats)
            let s = try SVDqScheme(descriptor: parsed.key.descriptor,
                                   context: SchemeContext(geometry: g, segmentTokens: c, rope: .none, role: .key, blobs: parsed.key.blobs))
            let rows = IntSchemeTests.rows(tokens: c, dim: 32, seed: 9)
            var block = [UInt8](repeating: 0, count: s.encodedBlockSize(tokens: c))
            rows.withUnsafeBufferPointer { src in block.withUnsafeMutableBytes { s.encode(rows: src.baseAddress!, tokens: c, into: $0) } }
            var rng = SplitMix64(seed: 4)
            let state = (0 ..< 9 * s.rank).map { _ in Float(rng.nextGaussian()) }
            for group in 1 ... 9 {
                for range in [0 ..< c, 8 ..< 40, 3 ..< 61, 5 ..< 6, 56 ..< 64] {
                    var fast = [Float](repeating: .nan, count: group * c), slow = fast
                    block.withUnsafeBytes { b in
                        state.withUnsafeBufferPointer { q in
                            fast.withUnsafeMutableBufferPointer {
                                s.scores(block: b, tokens: range, state: q.baseAddress!, groupSize: group, into: $0.baseAddress!, stride: c, inC: true)
                            }
                            slow.withUnsafeMutableBufferPointer {
                                s.scores(block: b, tokens: range, state: q.baseAddress!, groupSize: group, into: $0.baseAddress!, stride: c, inC: false)
                            }
                        }
                    }
                    #expect(fast.map(\.bitPattern) == slow.map(\.bitPattern), "\(spec) group \(group) tokens \(range)")
                }
            }
            // Where the C kernels run, this one does (else the comparison above proves nothing)...
            #expect((s.kernelPlan != nil) == RowKernels.inC(dim: 8), "\(spec)")
            guard let plan = s.kernelPlan else { continue }
            // ...and for a block not of the plan's size, or a range past its tokens, it declines and writes nothing.
            var out = [Float](repeating: 7, count: 2 * c)
            let ran = block.withUnsafeBytes { b in
                state.withUnsafeBufferPointer { q in
                    out.withUnsafeMutableBufferPointer {
                        SVDqKernels.scores(UnsafeRawBufferPointer(rebasing: b[0 ..< b.count - 1]), plan: plan, tokens: 0 ..< c,
                                           state: q.baseAddress!, groupSize: 1, into: $0.baseAddress!, stride: c)
                            || SVDqKernels.scores(b, plan: plan, tokens: 8 ..< c + 8, state: q.baseAddress!, groupSize: 1, into: $0.baseAddress!, stride: c)
                    }
                }
            }
            #expect(!ran && out.allSatisfy { $0 == 7 }, "\(spec)")
        }
    }

    @Test("specs and descriptors: averages, explicit widths, ranks; bad values are errors")
    func grammar() throws {
        let g = Self.geometry
        let data = RandomKV(geometry: g, tokens: 40, seed: 1)
        let stats = CacheStatistics(geometry: g, tokens: 40) { l, h, k in Array(data.stream(layer: l, head: h, kind: k, tokens: 0 ..< 40)) }
        #expect { try SchemeSpec.parse("svdq:2", geometry: g) } throws: { ($0 as? KVPackError)?.code == .needsCalibration }
        let s = try SchemeSpec.parse("svdq:8-4-2:shared", geometry: g, calibration: stats)
        #expect(s.key.descriptor == SVDqScheme.descriptor(channelBits: [8, 4, 2], sharedBasis: true))
        #expect(s.key.blobs.first?.shape == [1, 3, 24])
        let avg = try SchemeSpec.parse("svdq:2", geometry: g, calibration: stats)
        let bits = avg.key.descriptor.parameters[4...].map { Int($0) }
        #expect(bits.reduce(0, +) <= 2 * 24 && bits.count <= 24 && bits.last != 0)
        #expect(zip(bits, bits.dropFirst()).allSatisfy { $0 >= $1 }, "widths fall with the singular value: \(bits)")
        #expect(avg.key.blobs.first?.shape == [2, bits.count, 24])   // trailing 0-width channels trimmed
        for bad in ["svdq", "svdq:0", "svdq:17", "svdq:8-7-4", "svdq:2:r30", "svdq:2:zz", "svdq:1-1-1-1-1-1-1-1-1-1-1-1-1-1-1-1-1-1-1-1-1-1-1-1-1"] {
            #expect(throws: KVPackError.self, "\(bad)") { try SchemeSpec.parse(bad, geometry: g, calibration: stats) }
        }
        // Untrusted descriptors and blobs.
        let blob = s.key.blobs[0]
        func make(_ params: [UInt8], _ blobs: [Blob]) throws -> SVDqScheme {
            try SVDqScheme(descriptor: SchemeDescriptor(kind: .svdq, residualType: .float16, parameters: params, blobIDs: []),
                           context: SchemeContext(geometry: g, segmentTokens: 32, rope: .none, role: .key, blobs: blobs))
        }
        _ = try make([3, 0, 1, 0, 8, 4, 2], [blob])
        for (params, blobs) in [([3, 0, 1, 0, 8, 4], [blob]), ([3, 0, 1, 0, 8, 4, 7], [blob]), ([0, 0, 1, 0], [blob]),
                                ([3, 0, 0, 0, 8, 4, 2], [blob]), ([3, 0, 2, 0, 8, 4, 2], [blob]), ([3, 0, 1, 0, 8, 4, 2], []),
                                ([25, 0, 1, 0] + [UInt8](repeating: 1, count: 25), [blob])] as [([UInt8], [Blob])] {
            #expect(throws: KVPackError.self, "\(params)") { try make(params, blobs) }
        }
        var nan = blob
        nan.bytes[0] = 0x00; nan.bytes[1] = 0x7E
        #expect(throws: KVPackError.self) { try make([3, 0, 1, 0, 8, 4, 2], [nan]) }
    }
}
