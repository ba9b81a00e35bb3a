import Foundation
import Testing
@testable import KVPack

struct RoundTripTests {
    static let geometry = ModelGeometry(layerCount: 3, queryHeadCount: 6, kvHeadCount: 2, headDim: 12)
    static let specs = ["raw:f32", "raw:f16", "raw:bf16", "raw:f32:zstd", "raw:f16:zstd=9", "raw:bf16:zstd",
                        "raw:f32:zstd:planes", "raw:f16:zstd=9:planes", "raw:bf16:planes"]

    @Test("decode returns the input exactly (f32) or exactly rounded (f16, bf16)", arguments: specs)
    func roundTrip(spec: String) throws {
        let dir = temporaryDirectory()
        let path = dir + "/rt.kvpack"
        let data = RandomKV(geometry: Self.geometry, tokens: 203, seed: 42)
        // 203 tokens, 32 per segment (does not divide), uneven batches, commits mid-segment.
        try writeFile(path, data: data, segmentTokens: 32, spec: spec, batches: [1, 7, 30, 64, 3], commitsAfter: [1, 8, 38, 102])
        let reader = try KVPackReader(path: path)
        #expect(reader.tokenCount == 203)
        #expect(reader.sealedTokenCount == 192)
        #expect(try reader.tokenIDs == (0 ..< 203).map { UInt32($0 * 7 % 501) })
        #expect(try reader.positions == (0 ..< 203).map { UInt32($0) })
        let type = (reader.schemes[0] as! RawScheme).elementType
        for layer in 0 ..< 3 {
            for head in 0 ..< 2 {
                for kind in KVKind.allCases {
                    let got = try reader.decode(layer: layer, kvHead: head, kind: kind)
                    let want = data.stream(layer: layer, head: head, kind: kind, tokens: 0 ..< 203).map { rounded($0, to: type) }
                    #expect(got.map(\.bitPattern) == want.map(\.bitPattern), "layer \(layer) head \(head) \(kind)")
                    // Partial ranges that start and end inside blocks and inside the tail.
                    let part = try reader.decode(layer: layer, kvHead: head, kind: kind, tokens: 29 ..< 197)
                    #expect(part.map(\.bitPattern) == Array(want[29 * 12 ..< 197 * 12]).map(\.bitPattern))
                }
            }
        }
        let report = Validator.validate(file: reader.file, path: path, deep: true)
        #expect(report.isValid, "\(report.problems)")
        #expect(report.problems.isEmpty)
    }

    @Test("byte planes: codec 2, one zstd frame per plane, format 2.3; split and join are inverses")
    func bytePlanes() throws {
        let spec = try SchemeSpec.parse("raw:f16:planes", geometry: Self.geometry)
        #expect(spec.key.descriptor.parameters == [2, RawScheme.bytePlanesCodec, 3, 0])
        let dir = temporaryDirectory()
        let data = RandomKV(geometry: Self.geometry, tokens: 70, seed: 5)
        try writeFile(dir + "/p.kvpack", data: data, segmentTokens: 32, spec: "raw:f16:planes", batches: [70])
        let reader = try KVPackReader(path: dir + "/p.kvpack")
        #expect(reader.header.minor == 3)
        #expect(throws: KVPackError.self) {
            try writeFile(dir + "/v1.kvpack", data: data, segmentTokens: 32, spec: "raw:f16:planes", batches: [70], options: testOptions(major: 1))
        }
        // The two frames of a block: the first expands to the low plane, the second to the high.
        let workspace = AttentionWorkspace()
        let h = try FrameHeader.decode(reader.file.bytes, at: try reader.blockOffset(segment: 0, stream: 0), limit: reader.state.commitOffset,
                                       salt: reader.header.salt, field: "BLCK")
        let stored = h.storedPayload(in: reader.file.bytes)
        let out = UnsafeMutableRawBufferPointer.allocate(byteCount: 32 * 12 * 2, alignment: 64)
        defer { out.deallocate() }
        try workspace.decompressor.decompress(stored, into: out, parts: 2, offset: 0, field: "test")
        #expect(throws: KVPackError.self) { try workspace.decompressor.decompress(stored, into: out, parts: 1, offset: 0, field: "test") }
        var rng = SplitMix64(seed: 9)
        for (tokens, dim, width) in [(32, 12, 2), (5, 8, 4), (1, 3, 2)] {
            let bytes = (0 ..< tokens * dim * width).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            var planes = [UInt8](repeating: 0, count: bytes.count), back = planes
            bytes.withUnsafeBytes { b in planes.withUnsafeMutableBytes { BytePlanes.split(b.baseAddress!, into: $0.baseAddress!, tokens: tokens, dim: dim, width: width) } }
            #expect(planes[0] == bytes[0] && planes[tokens * dim] == bytes[1])   // element 0's bytes start both planes
            planes.withUnsafeBytes { p in back.withUnsafeMutableBytes { BytePlanes.join(p.baseAddress!, into: $0.baseAddress!, tokens: tokens, dim: dim, width: width) } }
            #expect(back == bytes)
        }
    }

    @Test("both batch layouts store the same cache")
    func layouts() throws {
        let g = ModelGeometry(layerCount: 2, queryHeadCount: 4, kvHeadCount: 2, headDim: 8)
        let data = RandomKV(geometry: g, tokens: 10, seed: 3)
        // Re-lay the batch as [layer][head][token][dim].
        var keys: [Float] = [], values: [Float] = []
        for layer in 0 ..< 2 {
            for h in 0 ..< 2 {
                for t in 0 ..< 10 {
                    keys += data.row(data.keys, layer: layer, token: t, head: h)
                    values += data.row(data.values, layer: layer, token: t, head: h)
                }
            }
        }
        let dir = temporaryDirectory()
        let (m, _) = try makeManifest(g, segmentTokens: 4, spec: "raw:f32")
        let w = try KVPackWriter.create(path: dir + "/a.kvpack", manifest: m, options: testOptions())
        try w.append(tokenIDs: Array(0 ..< 10), keys: keys, values: values, layout: .layerHeadToken(g, tokens: 10))
        try w.close()
        let r = try KVPackReader(path: dir + "/a.kvpack")
        for layer in 0 ..< 2 {
            for h in 0 ..< 2 {
                #expect(try r.decode(layer: layer, kvHead: h, kind: .key) == data.stream(layer: layer, head: h, kind: .key, tokens: 0 ..< 10))
                #expect(try r.decode(layer: layer, kvHead: h, kind: .value) == data.stream(layer: layer, head: h, kind: .value, tokens: 0 ..< 10))
            }
        }
    }

    @Test("mixed schemes per role and the spec grammar")
    func mixedSchemes() throws {
        let g = Self.geometry
        let spec = try SchemeSpec.parse("raw:f32+v:raw:bf16:zstd=5", geometry: g)
        #expect(spec.key.descriptor == RawScheme.descriptor(elementType: .float32))
        #expect(spec.value.descriptor == RawScheme.descriptor(elementType: .bfloat16, zstdLevel: 5))
        #expect(throws: KVPackError.self) { try SchemeSpec.parse("raw", geometry: g) }
        #expect(throws: KVPackError.self) { try SchemeSpec.parse("raw:f8", geometry: g) }
        #expect(throws: KVPackError.self) { try SchemeSpec.parse("nope:1", geometry: g) }
        #expect(throws: KVPackError.self) { try SchemeSpec.parse("raw:f16:zstd=99", geometry: g) }

        let dir = temporaryDirectory()
        let data = RandomKV(geometry: g, tokens: 40, seed: 9)
        try writeFile(dir + "/m.kvpack", data: data, segmentTokens: 16, spec: "raw:f32+v:raw:bf16:zstd=5", batches: [40])
        let r = try KVPackReader(path: dir + "/m.kvpack")
        #expect(r.manifest.schemes.count == 2)
        #expect(try r.decode(layer: 1, kvHead: 1, kind: .key) == data.stream(layer: 1, head: 1, kind: .key, tokens: 0 ..< 40))
        #expect(try r.decode(layer: 1, kvHead: 1, kind: .value).map(\.bitPattern)
            == data.stream(layer: 1, head: 1, kind: .value, tokens: 0 ..< 40).map { referenceBFloat16($0).bitPattern })
    }

    @Test("bf16 rounding matches an independent nearest-even rounding, NaN stays NaN")
    func bfloat16Rounding() {
        var rng = SplitMix64(seed: 5)
        for _ in 0 ..< 100_000 {
            let x = Float(bitPattern: UInt32(truncatingIfNeeded: rng.next()))
            let got = Float(bitPattern: UInt32(RowKernels.bfloat16Bits(x)) << 16)
            if x.isNaN { #expect(got.isNaN) } else { #expect(got.bitPattern == referenceBFloat16(x).bitPattern, "\(x)") }
        }
        // Ties: 1 + 2^-8 is halfway between 1 and 1 + 2^-7, and rounds to even (1).
        #expect(RowKernels.bfloat16Bits(1 + 0x1p-8) == 0x3F80)
        #expect(RowKernels.bfloat16Bits(1 + 3 * 0x1p-8) == 0x3F82)
    }

    @Test("a manifest survives encode and decode, with metadata and fingerprint")
    func manifestRoundTrip() throws {
        let (base, _) = try makeManifest(Self.geometry, segmentTokens: 64, spec: "raw:f16+v:raw:f32")
        var m = base
        m.modelFingerprint = Array(0 ..< 16)
        m.maxPositions = 4096
        m.userMetadata = [.init("conversation", "résumé ✓"), .init("empty", "")]
        m.rope = RoPEConfig(theta: 500_000, layout: .rotateHalf, keysArePostRoPE: true)
        let bytes = m.encoded()
        let back = try bytes.withUnsafeBytes { try Manifest.decode($0, base: 0) }
        #expect(back == m)
    }

    @Test("the index chain is rewritten FULL and intermediate index frames bound writer memory")
    func indexChain() throws {
        let g = ModelGeometry(layerCount: 2, queryHeadCount: 2, kvHeadCount: 1, headDim: 4)
        let data = RandomKV(geometry: g, tokens: 300, seed: 11)
        var options = testOptions()
        options.maxIndexChain = 4
        options.maxPendingIndexEntries = 9
        let dir = temporaryDirectory()
        try writeFile(dir + "/c.kvpack", data: data, segmentTokens: 8, spec: "raw:f32", batches: [1, 2, 5, 13],
                      commitsAfter: Set(stride(from: 3, to: 300, by: 3)), options: options)
        let r = try KVPackReader(path: dir + "/c.kvpack")
        #expect(r.tokenCount == 300)
        #expect(r.state.chain.count <= 4)
        #expect(r.state.chain.last?.isFull == true)
        #expect(try r.tokenIDs == (0 ..< 300).map { UInt32($0 * 7 % 501) })
        for layer in 0 ..< 2 {
            #expect(try r.decode(layer: layer, kvHead: 0, kind: .value) == data.stream(layer: layer, head: 0, kind: .value, tokens: 0 ..< 300))
        }
        #expect(Validator.validate(file: r.file, path: "c", deep: true).isValid)
    }

    @Test("resume continues exactly where the last commit left off")
    func resume() throws {
        let g = Self.geometry
        let data = RandomKV(geometry: g, tokens: 150, seed: 21)
        let dir = temporaryDirectory()
        let path = dir + "/r.kvpack"
        let (m, _) = try makeManifest(g, segmentTokens: 32, spec: "raw:f16:zstd")
        var w = try KVPackWriter.create(path: path, manifest: m, options: testOptions())
        for (from, to) in [(0, 45), (45, 46), (46, 100), (100, 150)] {
            try data.append(to: w, from ..< to)
            try w.close()
            w = try KVPackWriter.resume(path: path, options: testOptions())
            #expect(w.tokenCount == to)
        }
        try w.close()
        let r = try KVPackReader(path: path)
        #expect(r.tokenCount == 150)
        #expect(try r.tokenIDs == (0 ..< 150).map { UInt32($0) })
        #expect(try r.decode(layer: 2, kvHead: 1, kind: .key).map(\.bitPattern)
            == data.stream(layer: 2, head: 1, kind: .key, tokens: 0 ..< 150).map { Float(Float16($0)).bitPattern })
    }

    @Test("a second writer on the same file is refused")
    func writerLock() throws {
        let dir = temporaryDirectory()
        let (m, _) = try makeManifest(Self.geometry, segmentTokens: 8, spec: "raw:f32")
        let w = try KVPackWriter.create(path: dir + "/l.kvpack", manifest: m, options: testOptions())
        #expect { try KVPackWriter.resume(path: dir + "/l.kvpack") } throws: { ($0 as? KVPackError)?.code == .locked }
        try w.close()
        #expect(throws: KVPackError.self) { try KVPackWriter.create(path: dir + "/l.kvpack", manifest: m, options: testOptions()) }
    }
}
