import Foundation
import Testing
@testable import KVPack
@testable import KVPackInterop

struct ImportExportTests {
    func python(_ script: String, _ args: [String]) throws -> String {
        try runPython(["-c", script] + args)
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

    /// A safetensors file from a header (JSON) and data bytes.
    static func safetensors(_ header: String, data: [UInt8]) -> [UInt8] {
        var json = Array(header.utf8)
        while json.count % 8 != 0 { json.append(0x20) }
        return withUnsafeBytes(of: UInt64(json.count).littleEndian) { Array($0) } + json + data
    }

    @Test("a shape with a 0 besides the token count is refused before anything is allocated by it; float token ids that are NaN or huge do not trap (found writing the tensors fuzz target)")
    func zeroDimensionsAndOddIDs() throws {
        let dir = temporaryDirectory()
        // Zero KV heads: the data is empty whatever the token count claims (2^40 here).
        let zeroHeads = Self.safetensors(#"{"past_key_values.0.key":{"dtype":"F32","shape":[1,0,1099511627776,8],"data_offsets":[0,0]},"past_key_values.0.value":{"dtype":"F32","shape":[1,0,1099511627776,8],"data_offsets":[0,0]}}"#, data: [])
        writeBytes(zeroHeads, to: dir + "/zero.safetensors")
        #expect(throws: SafetensorsError.self) { try SafetensorsCache(path: dir + "/zero.safetensors") }
        let zeroNpy = NpyArray(dtype: .float32, shape: [0, 1 << 40, 8], data: [])
        #expect(throws: NpyError.self) { try NpyDirectoryCache(directory: dir, layers: [(zeroNpy, zeroNpy)], meta: nil) }

        // input_ids stored as F32 with NaN, infinity and 3e9: read, not trapped on.
        let floats: [Float] = [.nan, .infinity, 3e9]
        let rows = [Float](repeating: 0.5, count: 3 * 4)
        let odd = Self.safetensors(#"{"past_key_values.0.key":{"dtype":"F32","shape":[1,1,3,4],"data_offsets":[0,48]},"past_key_values.0.value":{"dtype":"F32","shape":[1,1,3,4],"data_offsets":[48,96]},"input_ids":{"dtype":"F32","shape":[1,3],"data_offsets":[96,108]}}"#,
                                   data: rows.withUnsafeBytes { Array($0) } + rows.withUnsafeBytes { Array($0) } + floats.withUnsafeBytes { Array($0) })
        writeBytes(odd, to: dir + "/odd.safetensors")
        let cache = try SafetensorsCache(path: dir + "/odd.safetensors")
        #expect(cache.tokenIDs == [0, UInt32(truncatingIfNeeded: Int.max), 3_000_000_000])
        let n = try CacheInterop.importCache(cache, to: dir + "/odd.kvpack", queryHeads: nil, rope: RoPEConfig(theta: 10000, layout: .interleaved),
                                             spec: "raw:f32", segmentTokens: 2, options: testOptions(), producer: "test")
        let decoded = try KVPackReader(path: dir + "/odd.kvpack").decode(layer: 0, kvHead: 0, kind: .value)
        #expect(n == 3 && decoded == rows)
    }
}

