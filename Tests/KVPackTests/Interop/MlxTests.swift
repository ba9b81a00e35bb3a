import Foundation
import Testing
@testable import KVPack
@testable import KVPackInterop

/// mlx-lm prompt caches, against files the real mlx-lm wrote (Tests/Fixtures/mlx, made by
/// scripts/mlx-fixtures.py from the kv-samples K/V: mlx-lm 0.32.2's layout and 0.21.5's).
struct MlxTests {
    static let fixtures = packageRoot + "/Tests/Fixtures/mlx"
    static let files = ["kv-f16", "kv-bf16", "q4-g64", "q8-g32", "q2-g64", "kv-f16-v021", "q4-g64-v021"]

    func roundTrip(_ name: String, dir: String) throws -> (MlxPromptCache, MlxPromptCache, KVPackReader) {
        let source = try MlxPromptCache(path: "\(Self.fixtures)/\(name).safetensors")
        var options = WriterOptions()
        options.durability = .flush
        let rope = RoPEConfig(theta: 100_000, layout: .rotateHalf)
        _ = try MlxInterop.importCache(source, to: dir + "/\(name).kvpack", queryHeads: 9, rope: rope, spec: nil, segmentTokens: nil,
                                       options: options, producer: "test")
        let reader = try KVPackReader(path: dir + "/\(name).kvpack")
        _ = try MlxInterop.export(reader, to: dir + "/\(name)-out.safetensors", options: MlxInterop.ExportOptions(recordedIn: reader.manifest))
        return (source, try MlxPromptCache(path: dir + "/\(name)-out.safetensors"), reader)
    }

    /// The bytes of a [B, H, T', n] tensor's first `tokens` rows of every head.
    func rows(_ cache: MlxPromptCache, _ t: SafetensorsFile.Tensor, tokens: Int) -> [UInt8] {
        let width = t.shape[3] * t.dtype.byteWidth, bytes = cache.file.file.bytes
        var out: [UInt8] = []
        for h in 0 ..< t.shape[1] {
            let at = t.range.lowerBound + h * t.shape[2] * width
            out += bytes[at ..< at + tokens * width]
        }
        return out
    }

    @Test("import then export gives back every tensor bit for bit (within the offset), the offset, grouping, classes and user metadata", arguments: files)
    func bitExactRoundTrip(_ name: String) throws {
        let (a, b, reader) = try roundTrip(name, dir: temporaryDirectory(name))
        #expect(a.layout == b.layout && a.tokens == 77 && b.tokens == 77 && a.layers.count == 2 && b.layers.count == 2)
        #expect(a.userMetadata == b.userMetadata && a.userMetadata["model"] == "SmolLM2-135M-Instruct")
        #expect(a.dtype == b.dtype && a.quantization?.bits == b.quantization?.bits && a.quantization?.groupSize == b.quantization?.groupSize)
        for layer in 0 ..< 2 {
            switch (a.layers[layer], b.layers[layer]) {
            case let (.dense(ka, va), .dense(kb, vb)):
                #expect(rows(a, ka, tokens: 77) == rows(b, kb, tokens: 77) && rows(a, va, tokens: 77) == rows(b, vb, tokens: 77))
            case let (.quantized(ka, va), .quantized(kb, vb)):
                for (x, y) in [(ka, kb), (va, vb)] {
                    #expect(rows(a, x.codes, tokens: 77) == rows(b, y.codes, tokens: 77))
                    #expect(rows(a, x.scales, tokens: 77) == rows(b, y.scales, tokens: 77))
                    #expect(rows(a, x.biases, tokens: 77) == rows(b, y.biases, tokens: 77))
                }
            default:
                Issue.record("layer \(layer): the classes differ")
            }
        }
        // Quantized caches: codes copied, so the file holds mlx's negative scales (format 2.2).
        if a.quantization != nil {
            #expect(reader.header.minor == 2)
            #expect(reader.scheme(layer: 0, kind: .key).specString.hasSuffix(":signed"))
            #expect(Validator.validate(file: reader.file, path: name, deep: true).isValid)
        }
    }

    @Test("decoding the copied codes gives what mlx's dequantize gives (f16), keys and values", arguments: ["q4-g64", "q8-g32", "q2-g64"])
    func decodesAsMlx(_ name: String) throws {
        let (_, _, reader) = try roundTrip(name, dir: temporaryDirectory(name))
        for (layer, kind, tag) in [(0, KVKind.key, "0k"), (1, .value, "1v")] {
            let expected = try NpyArray(path: "\(Self.fixtures)/expected-\(name)-\(tag).npy").floats()
            var decoded: [Float] = []
            for head in 0 ..< 3 { decoded += try reader.decode(layer: layer, kvHead: head, kind: kind) }
            #expect(decoded.count == expected.count)
            // mlx computes scale * code + bias in f16 (rounding both steps, so an element near 0
            // can be off by an f16 step of the bias); here in f32. Equal to f16 rounding of the
            // tensor's magnitude.
            let scale = expected.map(abs).max() ?? 1
            let worst = zip(decoded, expected).map { abs($0 - $1) }.max() ?? 0
            #expect(worst <= 2e-3 * scale, "\(name) layer \(layer) \(kind): worst difference \(worst), largest element \(scale)")
        }
    }

    @Test("dense caches import raw in their own type, bit-exact; attention over the file equals attention over the tensors")
    func denseImport() throws {
        let (a, _, reader) = try roundTrip("kv-bf16", dir: temporaryDirectory())
        #expect(reader.scheme(layer: 0, kind: .key).specString == "raw:bf16")
        for head in 0 ..< 3 {
            #expect(try reader.decode(layer: 1, kvHead: head, kind: .value) == a.rows(layer: 1, kvHead: head, kind: .value, tokens: 0 ..< 77))
        }
        try expectAttentionMatchesDecoded(reader, label: "mlx kv-bf16", seed: 3, ranges: [0 ..< 77, 13 ..< 70, 76 ..< 77])
    }

    @Test("any file exports as a QuantizedKVCache (quantized here) and as a KVCache; a --scheme import re-encodes")
    func exportOtherFiles() throws {
        let dir = temporaryDirectory()
        let (src, _) = try ConverterTests.source(dir)
        let reader = try KVPackReader(path: src)
        var o = MlxInterop.ExportOptions()
        o.quantization = (16, 4)
        o.ropeLayout = .rotateHalf
        let report = try MlxInterop.export(reader, to: dir + "/q.safetensors", options: o)
        #expect(report.copiedBlocks == 0 && report.quantizedRuns == 3 * 2 * 2)
        let q = try MlxPromptCache(path: dir + "/q.safetensors")
        #expect(q.tokens == 150 && q.allocated == 256 && q.quantization?.bits == 4)
        // 4-bit codes in groups of 16: close to the source (keys permuted to rotate-half).
        let pairing = try RoPEPairing(from: .interleaved, to: .rotateHalf, headDim: 16)
        var keys = try reader.decode(layer: 2, kvHead: 1, kind: .key)
        keys.withUnsafeMutableBufferPointer { p in for t in 0 ..< 150 { pairing.apply(p.baseAddress! + t * 16) } }
        let got = try q.rows(layer: 2, kvHead: 1, kind: .key, tokens: 0 ..< 150)
        let error = sqrt(zip(got, keys).map { Double(($0 - $1) * ($0 - $1)) }.reduce(0, +) / keys.map { Double($0 * $0) }.reduce(0, +))
        #expect(error > 0 && error < 0.1, "\(error)")
        o.quantization = nil
        o.dtype = .float32
        o.ropeLayout = nil
        _ = try MlxInterop.export(reader, to: dir + "/kv.safetensors", options: o)
        let kv = try MlxPromptCache(path: dir + "/kv.safetensors")
        #expect(try kv.rows(layer: 1, kvHead: 0, kind: .value, tokens: 0 ..< 150) == reader.decode(layer: 1, kvHead: 0, kind: .value))
        // Re-encoding an mlx cache in another scheme: decoded rows, then the scheme's encoder.
        var w = WriterOptions()
        w.durability = .flush
        let r = try MlxInterop.importCache(q, to: dir + "/nsn.kvpack", queryHeads: nil, rope: RoPEConfig(theta: 10000, layout: .rotateHalf),
                                           spec: "nsn:2", segmentTokens: 32, options: w, producer: "test")
        #expect(!r.copiedCodes && r.tokens == 150)
    }

    @Test("signed scales: a spec option, format 2.2 only, refused in version 1; a negative scale without the flag is corrupt")
    func signedScalesVersion() throws {
        let g = ModelGeometry(layerCount: 1, queryHeadCount: 2, kvHeadCount: 1, headDim: 16)
        let spec = try SchemeSpec.parse("int:k4v4:g16:signed", geometry: g)
        let dir = temporaryDirectory()
        var o = testOptions()
        o.majorVersion = 1
        var file = NewFile(geometry: g, rope: .none, schemes: spec, producer: "test")
        file.segmentTokens = 4
        #expect { try KVPackWriter.create(path: dir + "/v1.kvpack", file: file, options: o) } throws: { "\($0)".contains("2.2") }
        let w = try KVPackWriter.create(path: dir + "/v2.kvpack", file: file, options: testOptions())
        // One segment with a negative scale, copied in: valid with the flag.
        let codes = [UInt8](repeating: 0x21, count: 4 * 8)
        var scale = Float16(-0.5).bitPattern.littleEndian, bias = Float16(1).bitPattern.littleEndian
        let s = withUnsafeBytes(of: &scale) { Array($0) }, b = withUnsafeBytes(of: &bias) { Array($0) }
        try w.appendEncodedSegment(tokenIDs: [1, 2, 3, 4]) { _ in codes + Array((0 ..< 4).map { _ in s }.joined()) + Array((0 ..< 4).map { _ in b }.joined()) }
        #expect(throws: KVPackError.self) { try w.appendEncodedSegment(tokenIDs: [1]) { _ in [] } }
        try w.close()
        let r = try KVPackReader(path: dir + "/v2.kvpack")
        #expect(r.header.minor == 2 && r.scheme(layer: 0, kind: .key).specString == "int:k4v4:g16:signed")
        // codes 0x21: 1 then 2, as scale * code + bias.
        #expect(Array(try r.decode(layer: 0, kvHead: 0, kind: .value).prefix(2)) == [0.5, 0])
        // Without the flag the same block is a corrupt payload.
        let plain = try IntScheme(descriptor: IntScheme.descriptor(bits: 4, groupSize: 16),
                                  context: SchemeContext(geometry: g, segmentTokens: 4, rope: .none, role: .key))
        let block = codes + Array((0 ..< 4).map { _ in s }.joined()) + Array((0 ..< 4).map { _ in b }.joined())
        #expect { try block.withUnsafeBytes { try plain.validate(block: $0, tokens: 4) } } throws: { ($0 as? KVPackError)?.code == .corruptPayload }
    }

    @Test("malformed prompt caches are refused with the file and the reason")
    func badFiles() throws {
        let dir = temporaryDirectory()
        func write(_ metadata: [String: String], _ entries: [(String, SafetensorsFile.DType, [Int])]) throws -> String {
            let path = dir + "/bad-\(metadata.count)-\(entries.count).safetensors"
            try SafetensorsWriter.write(path: path, entries: entries.map { .init(name: $0.0, dtype: $0.1, shape: $0.2) },
                                        metadata: metadata) { i in [UInt8](repeating: 0, count: entries[i].2.reduce(1, *) * entries[i].1.byteWidth) }
            return path
        }
        func refused(_ path: String, _ words: String) {
            #expect { try MlxPromptCache(path: path) } throws: { "\($0)".contains(words) && "\($0)".contains(path) }
        }
        refused(try write(["a": "b"], [("x", .f16, [1])]), "no cache class names")
        refused(try write(["1.0": "RotatingKVCache", "2.0": ""], [("0.0", .f16, [1, 1, 4, 8])]), "RotatingKVCache")
        refused(try write(["1.0": "KVCache", "2.0": ""], [("0.0", .f16, [1, 1, 4, 8]), ("0.1", .f16, [1, 1, 4, 8])]), "0.2 is missing")
        refused(try write(["1.0": "KVCache", "2.0": ""], [("0.0", .f16, [1, 1, 4, 8]), ("0.1", .f16, [1, 1, 5, 8]), ("0.2", .i32, [])]),
                "one shape expected")
        refused(try write(["1.0": "QuantizedKVCache", "2.0": ""], [("0.0.0", .u32, [1, 1, 4, 3]), ("0.0.1", .f16, [1, 1, 4, 1]),
                                                                  ("0.0.2", .f16, [1, 1, 4, 1]), ("0.1.0", .u32, [1, 1, 4, 3]),
                                                                  ("0.1.1", .f16, [1, 1, 4, 1]), ("0.1.2", .f16, [1, 1, 4, 1]),
                                                                  ("0.2", .i32, []), ("0.3", .i32, []), ("0.4", .i32, [])]), "bits")
    }
}
