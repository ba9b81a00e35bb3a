import Foundation
import Testing
@testable import KVPack
@testable import KVPackInterop

struct ConverterTests {
    static let geometry = ModelGeometry(layerCount: 3, queryHeadCount: 4, kvHeadCount: 2, headDim: 16)

    /// A raw f32 source: 150 tokens in segments of 32 (so a tail), with metadata and a fingerprint.
    static func source(_ dir: String) throws -> (String, RandomKV) {
        let data = RandomKV(geometry: geometry, tokens: 150, seed: 12, maxExponent: 6)
        let (base, _) = try makeManifest(geometry, segmentTokens: 32, spec: "raw:f32")
        var m = base
        m.modelFingerprint = Array(100 ..< 116)
        m.userMetadata = [.init("title", "a conversation")]
        let w = try KVPackWriter.create(path: dir + "/src.kvpack", manifest: m, options: testOptions())
        try w.append(tokenIDs: (0 ..< 150).map { UInt32($0 * 3) }, positions: (0 ..< 150).map { UInt32(1000 + $0) },
                     keys: data.batch(data.keys, from: 0, to: 150), values: data.batch(data.values, from: 0, to: 150),
                     layout: .layerTokenHead(geometry, tokens: 150))
        try w.close()
        return (dir + "/src.kvpack", data)
    }

    func convert(_ input: String, _ output: String, _ spec: String, layers: Set<Int>? = nil, segmentTokens: Int? = nil) throws -> Converter.Report {
        let reader = try KVPackReader(path: input)
        let parsed = try SchemeSpec.parse(spec, geometry: reader.geometry) { try CacheStatistics(reader: reader) }
        var o = Converter.Options()
        o.durability = .flush
        o.segmentTokens = segmentTokens
        return try Converter.convert(input: input, output: output, spec: parsed, layers: layers, options: o)
    }

    func streams(_ path: String) throws -> [[UInt32]] {
        let r = try KVPackReader(path: path)
        return try (0 ..< r.geometry.streamCount).map { s in
            let id = r.geometry.streamID(s)
            return try r.decode(layer: id.layer, kvHead: id.kvHead, kind: id.kind).map(\.bitPattern)
        }
    }

    @Test("lossless A -> B -> A is bit-exact and keeps ids, positions, fingerprint, metadata; provenance chains")
    func losslessChain() throws {
        let dir = temporaryDirectory()
        let (src, _) = try Self.source(dir)
        _ = try convert(src, dir + "/f16.kvpack", "raw:f16")
        let r1 = try convert(dir + "/f16.kvpack", dir + "/f32z.kvpack", "raw:f32:zstd=5", segmentTokens: 16)
        let r2 = try convert(dir + "/f32z.kvpack", dir + "/back.kvpack", "raw:f16")
        #expect(r1.keyRelativeError == 0 && r1.valueRelativeError == 0)
        // Segments of 16 instead of 32: the same values, attended in other chunks, so float sums
        // differ at rounding level only.
        #expect(r1.attentionRelativeError < 1e-6)
        #expect(r2.keyRelativeError == 0 && r2.attentionRelativeError == 0)
        #expect(try streams(dir + "/back.kvpack") == streams(dir + "/f16.kvpack"))
        let a = try KVPackReader(path: src), b = try KVPackReader(path: dir + "/back.kvpack")
        #expect(try b.tokenIDs == a.tokenIDs && b.positions == a.positions)
        #expect(b.manifest.modelFingerprint == a.manifest.modelFingerprint)
        #expect(b.manifest.rope == a.manifest.rope)
        let meta = Dictionary(uniqueKeysWithValues: b.manifest.userMetadata.map { ($0.key, $0.value) })
        #expect(meta["title"] == "a conversation")
        #expect(meta["convert.1.from"] == "K raw:f32, V raw:f32")
        #expect(meta["convert.2.from"] == "K raw:f16, V raw:f16")
        #expect(meta["convert.3.from"] == "K raw:f32:zstd=5, V raw:f32:zstd=5")
        #expect(meta["scheme.spec"] == "raw:f16")
        #expect(Validator.validate(file: b.file, path: "back", deep: true).problems.isEmpty)
    }

    @Test("converting to any scheme gives what writing that scheme directly gives", arguments: ["raw:f16", "raw:bf16:zstd", "int:k4v2", "int:k3v1:kc16", "int:k8v4:g8"])
    func anyScheme(spec: String) throws {
        let dir = temporaryDirectory()
        let (src, data) = try Self.source(dir)
        let report = try convert(src, dir + "/out.kvpack", spec)
        try writeFile(dir + "/direct.kvpack", data: data, segmentTokens: 32, spec: spec, batches: [150])
        #expect(try streams(dir + "/out.kvpack") == streams(dir + "/direct.kvpack"))
        #expect(report.keyRelativeError > 0 && report.attentionRelativeError > 0)
        #expect(report.after.total < report.before.total)
        // And back to f32, exactly the scheme's decoded values.
        let back = try convert(dir + "/out.kvpack", dir + "/f32.kvpack", "raw:f32")
        #expect(back.keyRelativeError == 0 && back.valueRelativeError == 0)
        #expect(try streams(dir + "/f32.kvpack") == streams(dir + "/out.kvpack"))
    }

    @Test("--layers converts only those layers; int:auto calibrates on the source")
    func someLayers() throws {
        let dir = temporaryDirectory()
        let (src, _) = try Self.source(dir)
        _ = try convert(src, dir + "/l1.kvpack", "int:k4v2", layers: [1])
        let r = try KVPackReader(path: dir + "/l1.kvpack")
        #expect(r.scheme(layer: 0, kind: .key) is RawScheme && r.scheme(layer: 2, kind: .value) is RawScheme)
        #expect(r.scheme(layer: 1, kind: .key) is IntScheme)
        let s = try streams(src), o = try streams(dir + "/l1.kvpack")
        for stream in 0 ..< 12 where r.geometry.streamID(stream).layer != 1 { #expect(o[stream] == s[stream]) }
        let auto = try convert(src, dir + "/auto.kvpack", "int:auto:3.0")
        #expect(auto.plan?.count == 5)
        #expect(try KVPackReader(path: dir + "/auto.kvpack").manifest.userMetadata.contains { $0.key == "scheme.plan.1" })
    }

    @Test("a killed conversion leaves no file under OUT")
    func killed() throws {
        let dir = temporaryDirectory()
        let (s0, _, _) = try runKVPack(["synth", dir + "/big.kvpack", "--model", "llama-3-8b", "--layers", "4", "--tokens", "3072"])
        #expect(s0 == 0)
        let child = Process()
        child.executableURL = URL(fileURLWithPath: kvpackBinary)
        child.arguments = ["convert", dir + "/big.kvpack", dir + "/out.kvpack", "--scheme", "int:k4v2", "--no-fsync"]
        child.standardOutput = FileHandle.nullDevice
        child.standardError = FileHandle.nullDevice
        try child.run()
        // Kill as soon as the temporary output has grown past its first segments.
        let start = Date()
        while Date().timeIntervalSince(start) < 20 {
            let files = (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []
            if let temp = files.first(where: { $0.hasPrefix("out.kvpack.converting-") }),
               let size = try? FileManager.default.attributesOfItem(atPath: dir + "/" + temp)[.size] as? Int, size > 1 << 20 { break }
            usleep(2000)
        }
        kill(child.processIdentifier, SIGKILL)
        child.waitUntilExit()
        #expect(child.terminationReason == .uncaughtSignal, "the conversion finished before it could be killed")
        #expect(!FileManager.default.fileExists(atPath: dir + "/out.kvpack"))
    }
}

struct ImportExportTests {
    func python(_ script: String, _ args: [String]) throws -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = ["python3", "-c", script] + args
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        let o = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        let e = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        try #require(p.terminationStatus == 0, "python failed (make test installs numpy and safetensors): \(e)")
        return o
    }

    @Test("an export loads in Python safetensors with the expected shapes and values")
    func exportToPython() throws {
        let dir = temporaryDirectory()
        let (src, _) = try ConverterTests.source(dir)
        let reader = try KVPackReader(path: src)
        try CacheInterop.exportSafetensors(reader, to: dir + "/cache.safetensors", type: .float32)
        // Python re-saves what it loaded as .npy; compare with the reader, bit for bit.
        let out = try python("""
        import sys, numpy as np
        from safetensors.numpy import load_file
        t = load_file(sys.argv[1] + '/cache.safetensors')
        for name in ['past_key_values.0.key', 'past_key_values.2.value', 'input_ids', 'position_ids']:
            np.save(sys.argv[1] + '/' + name + '.npy', t[name])
        print(len(t), t['past_key_values.1.key'].shape, t['past_key_values.1.key'].dtype, t['input_ids'].dtype)
        """, [dir])
        #expect(out.contains("8 (1, 2, 150, 16) float32 int64"), "\(out)")
        let k0 = try NpyArray(path: dir + "/past_key_values.0.key.npy").floats()
        #expect(k0 == (try reader.decode(layer: 0, kvHead: 0, kind: .key)) + (try reader.decode(layer: 0, kvHead: 1, kind: .key)))
        let v2 = try NpyArray(path: dir + "/past_key_values.2.value.npy").floats()
        #expect(Array(v2.suffix(150 * 16)) == (try reader.decode(layer: 2, kvHead: 1, kind: .value)))
        #expect(try NpyArray(path: dir + "/input_ids.npy").floats().map { UInt32($0) } == reader.tokenIDs)
        #expect(try NpyArray(path: dir + "/position_ids.npy").floats().map { UInt32($0) } == reader.positions)
    }

    @Test("a cache saved by Python safetensors imports and attends equal to its tensors")
    func importFromPython() throws {
        let dir = temporaryDirectory()
        _ = try python("""
        import sys, numpy as np
        from safetensors.numpy import save_file
        rng = np.random.default_rng(3)
        t = {}
        for l in range(2):
            for kv in ['key', 'value']:
                t[f'model.layers.{l}.{kv}_states'] = (rng.standard_normal((1, 2, 97, 16)) * (3 if kv == 'key' else 1)).astype(np.float16)
        t['input_ids'] = np.arange(97, dtype=np.int64).reshape(1, 97) * 5
        save_file(t, sys.argv[1] + '/hf.safetensors', metadata={'source': 'test'})
        for l in range(2):
            np.save(sys.argv[1] + f'/k{l}.npy', t[f'model.layers.{l}.key_states'][0].astype(np.float32))
            np.save(sys.argv[1] + f'/v{l}.npy', t[f'model.layers.{l}.value_states'][0].astype(np.float32))
        """, [dir])
        var naming = TensorNaming()
        naming.pattern = "model.layers.{layer}.{kv}_states"
        let cache = try SafetensorsCache(path: dir + "/hf.safetensors", naming: naming)
        #expect(cache.geometryHint.layers == 2 && cache.geometryHint.tokens == 97)
        #expect(cache.tokenIDs == (0 ..< 97).map { UInt32($0 * 5) })
        _ = try CacheInterop.importCache(cache, to: dir + "/imported.kvpack", queryHeads: 4, rope: RoPEConfig(theta: 10000, layout: .rotateHalf),
                                         spec: "raw:f32", segmentTokens: 32, options: testOptions(), producer: "test")
        let r = try KVPackReader(path: dir + "/imported.kvpack")
        #expect(r.geometry == ModelGeometry(layerCount: 2, queryHeadCount: 4, kvHeadCount: 2, headDim: 16))
        var rng = SplitMix64(seed: 9)
        for layer in 0 ..< 2 {
            let k = try NpyArray(path: dir + "/k\(layer).npy").floats(), v = try NpyArray(path: dir + "/v\(layer).npy").floats()
            for head in 0 ..< 2 {
                let q = (0 ..< 2 * 16).map { _ in Float(rng.nextGaussian()) }
                let rows = 97 * 16
                let want = DenseAttention.reference(queries: q, keys: Array(k[head * rows ..< (head + 1) * rows]),
                                                    values: Array(v[head * rows ..< (head + 1) * rows]), groupSize: 2, headDim: 16)
                #expect(DenseAttention.maxRelativeError(try r.attend(layer: layer, kvHead: head, queries: q), want) < 1e-5)
            }
        }
    }

    @Test("npy and bf16 safetensors round trips; the kv-samples import")
    func roundTrips() throws {
        let dir = temporaryDirectory()
        let (src, _) = try ConverterTests.source(dir)
        let reader = try KVPackReader(path: src)
        try CacheInterop.exportNpy(reader, to: dir + "/npy", type: .float32)
        _ = try CacheInterop.importCache(try NpyDirectoryCache(directory: dir + "/npy"), to: dir + "/fromnpy.kvpack", queryHeads: 4,
                                         rope: reader.manifest.rope, spec: "raw:f32", segmentTokens: nil, options: testOptions(), producer: "test")
        let back = try KVPackReader(path: dir + "/fromnpy.kvpack")
        #expect(try back.tokenIDs == reader.tokenIDs && back.positions == reader.positions)
        #expect(try back.decode(layer: 2, kvHead: 1, kind: .value) == reader.decode(layer: 2, kvHead: 1, kind: .value))

        try CacheInterop.exportSafetensors(reader, to: dir + "/b.safetensors", type: .bfloat16)
        _ = try CacheInterop.importCache(try SafetensorsCache(path: dir + "/b.safetensors"), to: dir + "/b.kvpack", queryHeads: 4,
                                         rope: reader.manifest.rope, spec: "raw:bf16", segmentTokens: nil, options: testOptions(), producer: "test")
        #expect(try KVPackReader(path: dir + "/b.kvpack").decode(layer: 1, kvHead: 0, kind: .key).map(\.bitPattern)
            == reader.decode(layer: 1, kvHead: 0, kind: .key).map { referenceBFloat16($0).bitPattern })

        let samples = try NpyDirectoryCache(directory: kvSamplesDirectory)
        #expect(samples.geometryHint == (30, 3, 613, 64))
        #expect(samples.meta?.heads == 9)
    }

    @Test("damaged safetensors files are errors")
    func damaged() throws {
        let dir = temporaryDirectory()
        let (src, _) = try ConverterTests.source(dir)
        try CacheInterop.exportSafetensors(try KVPackReader(path: src), to: dir + "/ok.safetensors", type: .float16)
        let good = fileBytes(dir + "/ok.safetensors")
        var cases: [[UInt8]] = [Array(good.prefix(5)), Array(good.dropLast(2))]
        var huge = good
        huge.replaceSubrange(0 ..< 8, with: withUnsafeBytes(of: UInt64.max.littleEndian) { Array($0) })
        cases.append(huge)
        let text = String(decoding: good, as: UTF8.self)
        cases.append(Array(text.replacingOccurrences(of: "\"F16\"", with: "\"F99\"").utf8))
        cases.append(Array(text.replacingOccurrences(of: "\"shape\":[1,2,150,16]", with: "\"shape\":[9,2,150,16]").utf8))
        for (i, bytes) in cases.enumerated() {
            writeBytes(bytes, to: dir + "/bad\(i).safetensors")
            #expect(throws: (any Error).self, "case \(i)") { try SafetensorsCache(path: dir + "/bad\(i).safetensors") }
        }
    }
}
