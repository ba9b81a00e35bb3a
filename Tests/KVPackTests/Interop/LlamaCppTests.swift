import Foundation
import Testing
@testable import KVPack
@testable import KVPackInterop
@testable import KVPackModels
import KVPackLab

/// llama.cpp state files: the fixtures llama.cpp itself wrote (Tests/Fixtures/llama.cpp, see its
/// README) import, decode equal to an independent reader (Tests/Oracles/llama_cpp_state.py), and
/// export back byte for byte; files that lie are refused with the offset and field.
struct LlamaCppTests {
    static let fixtureDirectory = packageRoot + "/Tests/Fixtures/llama.cpp"

    struct Fixture: Decodable {
        var file: String
        var kind: String
        var type_k: String
        var type_v: String
        var v_trans: Int
        var attn_rot_disabled: Bool
        var tokens: [Int32]
        var path: String { LlamaCppTests.fixtureDirectory + "/" + file }
    }

    struct FixtureList: Decodable {
        var fixtures: [Fixture]
        var model: String
    }

    static let fixtures: [Fixture] = {
        let data = try! Data(contentsOf: URL(fileURLWithPath: fixtureDirectory + "/fixtures.json"))
        return try! JSONDecoder().decode(FixtureList.self, from: data).fixtures
    }()

    /// SmolLM2-135M's cache geometry (the lab's model preset), so the fixtures import without the GGUF (the
    /// SmolLM2-gated test below imports them against the real one).
    static let smolLM2Shape: LlamaCppModel = {
        let preset = ModelPreset.named("smollm2-135m")!
        return LlamaCppModel(architecture: "llama", geometry: preset.geometry, rope: preset.rope, contextLength: Int(preset.maxPositions))
    }()

    static func importFixture(_ f: Fixture, to path: String, spec: String = "raw:f32") throws -> LlamaCppCache {
        let state = try LlamaCppState(file: MappedFile(path: f.path))
        let cache = try LlamaCppCache(state: state, model: smolLM2Shape, rotation: f.attn_rot_disabled ? .off : .auto)
        _ = try LlamaCppImport.write(cache, to: path, spec: spec, segmentTokens: nil, source: f.file, options: testOptions(), producer: "test")
        return cache
    }

    // MARK: Fixtures written by llama.cpp

    @Test("every fixture parses: its kind, version, tokens, types and value layout are what llama.cpp was asked for")
    func fixturesParse() throws {
        #expect(Self.fixtures.count == 9)
        for f in Self.fixtures {
            let state = try LlamaCppState(file: MappedFile(path: f.path))
            #expect(state.kind == (f.kind == "session" ? .session : .sequence), "\(f.file)")
            #expect(state.version == (f.kind == "session" ? 10 : 3), "\(f.file)")
            #expect(state.tokens == f.tokens, "\(f.file)")
            #expect(state.architecture == (f.kind == "session" ? "llama" : nil), "\(f.file)")
            let stream = try state.onlyStream()
            #expect(stream.cells.map(\.position) == (0 ..< Int32(f.tokens.count)).map { $0 }, "\(f.file)")
            #expect(stream.layers.count == 30 && stream.valuesTransposed == (f.v_trans == 1), "\(f.file)")
            #expect(stream.layers[0].keys.type.description == f.type_k && stream.layers[0].values.type.description == f.type_v, "\(f.file)")
        }
    }

    @Test("import then export gives back llama.cpp's file byte for byte (every writable type, both value layouts, rotated or not)")
    func fixturesRoundTrip() throws {
        let dir = temporaryDirectory()
        for f in Self.fixtures where f.type_v != "iq4_nl" {
            let kvpack = dir + "/\(f.file).kvpack", back = dir + "/\(f.file).back"
            let cache = try Self.importFixture(f, to: kvpack)
            let quantized = cache.keyType.isQuantized || cache.valueType.isQuantized
            #expect((cache.keyRotation != nil) == (cache.keyType.isQuantized && !f.attn_rot_disabled), "\(f.file)")
            let reader = try KVPackReader(path: kvpack)
            #expect(try reader.tokenIDs == f.tokens.map { UInt32(bitPattern: $0) })
            let o = LlamaCppExport.Options(kind: f.kind == "session" ? .session : .sequence, recordedIn: reader.manifest)
            #expect(o.rotation == (quantized && f.attn_rot_disabled ? .off : .auto), "\(f.file)")
            _ = try LlamaCppExport.export(reader, to: back, options: o)
            let original = try [UInt8](Data(contentsOf: URL(fileURLWithPath: f.path)))
            let exported = try [UInt8](Data(contentsOf: URL(fileURLWithPath: back)))
            if original != exported {
                let at = original.indices.first { $0 >= exported.count || original[$0] != exported[$0] } ?? original.count
                Issue.record("\(f.file): export differs from llama.cpp's file (\(exported.count) vs \(original.count) bytes, first difference at offset \(at))")
            }
        }
    }

    @Test("iq4_nl values import (llama.cpp reads them); exporting them is refused, not approximated")
    func iq4nlImportOnly() throws {
        let dir = temporaryDirectory()
        let f = try #require(Self.fixtures.first { $0.type_v == "iq4_nl" })
        _ = try Self.importFixture(f, to: dir + "/iq4.kvpack")
        let reader = try KVPackReader(path: dir + "/iq4.kvpack")
        var o = LlamaCppExport.Options(kind: .sequence, recordedIn: reader.manifest)
        #expect(o.valueType == .f16)   // the recorded iq4_nl is not a default the writer can meet
        o.valueType = .iq4_nl
        let e = #expect(throws: KVPackError.self) { try LlamaCppExport.export(reader, to: dir + "/x.bin", options: o) }
        #expect(e?.message.contains("iq4_nl is read, not written") == true, "\(String(describing: e))")
        #expect(!FileManager.default.fileExists(atPath: dir + "/x.bin"))
    }

    @Test("imported keys and values equal the independent Python reader's (gguf-py dequantization, numpy Hadamard)")
    func fixturesMatchOracle() throws {
        let dir = temporaryDirectory()
        for f in Self.fixtures {
            let out = dir + "/" + f.file + ".npy"
            try runPython([packageRoot + "/Tests/Oracles/llama_cpp_state.py", f.path, "--kv-heads", "3", "--head-dim", "64", "--out", out]
                          + (f.attn_rot_disabled ? ["--no-rotation"] : []))
            let kvpack = dir + "/\(f.file).kvpack"
            let cache = try Self.importFixture(f, to: kvpack)
            let reader = try KVPackReader(path: kvpack)
            // Dequantizing is exact in both readers; undoing the rotation rounds once from double
            // in both, but the Python side sums in another order: a few ulps apart at most.
            for layer in [0, 13, 29] {
                for (kind, name, rotated) in [(KVKind.key, "k", cache.keyRotation != nil), (.value, "v", cache.valueRotation != nil)] {
                    let oracle = try NpyArray(path: out + String(format: "/%@_layer%02d.npy", name, layer)).floats()
                    let ours = try (0 ..< 3).flatMap { try reader.decode(layer: layer, kvHead: $0, kind: kind) }
                    try #require(oracle.count == ours.count, "\(f.file) \(name)\(layer)")
                    let scale = oracle.map { abs($0) }.max() ?? 1
                    let worst = zip(oracle, ours).map { abs($0 - $1) }.max() ?? 0
                    if rotated {
                        #expect(worst <= 4e-7 * scale, "\(f.file) \(name) layer \(layer): worst \(worst) of \(scale)")
                    } else {
                        #expect(worst == 0, "\(f.file) \(name) layer \(layer): worst \(worst)")
                    }
                }
            }
        }
    }

    @Test("the import records where it came from (llama.cpp.* metadata, shown by kvpack info)")
    func provenance() throws {
        let dir = temporaryDirectory()
        let f = try #require(Self.fixtures.first { $0.file == "session-q8_0-f16-vtrans.bin" })
        _ = try Self.importFixture(f, to: dir + "/p.kvpack", spec: "int:k4v2:kc64")
        let m = try KVPackReader(path: dir + "/p.kvpack").manifest
        func meta(_ key: String) -> String? { m.metadata("llama.cpp." + key) }
        #expect(meta("kind") == "session" && meta("version") == "10" && meta("architecture") == "llama")
        #expect(meta("type_k") == "q8_0" && meta("type_v") == "f16" && meta("v_trans") == "1")
        #expect(meta("rotation_k") == "64" && meta("rotation_v") == "none")
        #expect(meta("source") == f.file)
        let (status, out, err) = try runKVPack(["info", dir + "/p.kvpack"])
        #expect(status == 0, "\(err)")
        #expect(out.contains("llama.cpp.type_k") && out.contains("q8_0"), "\(out)")
    }

    // MARK: Files that lie

    /// A small cache (2 layers, 1 KV head of 64, 3 tokens) exported as a llama.cpp state: the
    /// base every malformed file below is cut from.
    static func smallState(_ dir: String, kind: LlamaCppState.Kind = .sequence, version: UInt32? = nil, keyType: GGMLType = .q8_0,
                           valueType: GGMLType = .q8_0, transposed: Bool = false, architecture: String = "llama") throws -> [UInt8] {
        let g = ModelGeometry(layerCount: 2, queryHeadCount: 2, kvHeadCount: 1, headDim: 64)
        let path = dir + "/small-\(UInt32.random(in: 0 ... .max)).kvpack"
        let writer = try KVPackWriter.create(path: path, file: NewFile(geometry: g, rope: .none, schemes: SchemeSpec.parse("raw:f32", geometry: g),
                                                                       producer: "test"), options: testOptions())
        try RandomKV(geometry: g, tokens: 3, seed: 21, maxExponent: 4).append(to: writer, 0 ..< 3, id: { UInt32(100 + $0) })
        try writer.close()
        var o = LlamaCppExport.Options()
        o.kind = kind
        o.version = version
        o.keyType = keyType
        o.valueType = valueType
        o.valuesTransposed = transposed
        o.architecture = architecture
        _ = try LlamaCppExport.export(try KVPackReader(path: path), to: path + ".bin", options: o)
        return Array(try Data(contentsOf: URL(fileURLWithPath: path + ".bin")))
    }

    static let smallModel = LlamaCppModel(architecture: "llama", geometry: ModelGeometry(layerCount: 2, queryHeadCount: 2, kvHeadCount: 1, headDim: 64),
                                          rope: .none)

    static func parse(_ bytes: [UInt8]) throws -> LlamaCppState {
        try bytes.withUnsafeBytes { try LlamaCppState(file: MappedFile(copying: $0)) }
    }

    static func put(_ v: UInt32, at offset: Int, in bytes: inout [UInt8]) {
        withUnsafeBytes(of: v.littleEndian) { for i in 0 ..< 4 { bytes[offset + i] = $0[i] } }
    }

    /// Expects `bytes` to be refused with `code` at `offset` naming `field`.
    static func expectRefused(_ bytes: [UInt8], _ code: KVPackError.Code, offset: UInt64?, field: String,
                              sourceLocation: SourceLocation = #_sourceLocation) {
        do {
            _ = try parse(bytes)
            Issue.record("accepted a file with a bad \(field)", sourceLocation: sourceLocation)
        } catch let e as KVPackError {
            #expect(e.code == code && e.field == field && (offset == nil || e.offset == offset), "\(e)", sourceLocation: sourceLocation)
        } catch {
            Issue.record("\(error)", sourceLocation: sourceLocation)
        }
    }

    @Test("a header that lies is refused with its offset and field, before anything is sized from it")
    func lyingFields() throws {
        let dir = temporaryDirectory()
        let base = try Self.smallState(dir)
        // Sequence file: magic 0, version 4, n_token 8, tokens 12..<24, n_stream 24, cell_count 28,
        // cells 32..<68 (pos, n_seq_id, seq_id), v_trans 68, n_layer 72, layer 0 K type 76, row bytes 80.
        #expect(try Self.parse(base).tokens == [100, 101, 102])
        var b = base
        Self.put(0x4655_4747, at: 0, in: &b)
        Self.expectRefused(b, .badMagic, offset: 0, field: "magic")
        b = base; Self.put(4, at: 4, in: &b)
        Self.expectRefused(b, .unsupportedVersion, offset: 4, field: "ggsq.version")
        b = base; Self.put(0xFFFF_FFFF, at: 8, in: &b)
        Self.expectRefused(b, .truncated, offset: 12, field: "ggsq.tokens")
        b = base; Self.put(0, at: 24, in: &b)
        Self.expectRefused(b, .invalidField, offset: 24, field: "memory.streamCount")
        b = base; Self.put(0x7FFF_FFFF, at: 28, in: &b)
        Self.expectRefused(b, .truncated, offset: 32, field: "memory.stream[0].cells")
        b = base; Self.put(100_000, at: 36, in: &b)
        Self.expectRefused(b, .invalidField, offset: 36, field: "memory.stream[0].cell[0].seqCount")
        b = base; Self.put(2, at: 68, in: &b)
        Self.expectRefused(b, .invalidField, offset: 68, field: "memory.stream[0].vTrans")
        b = base; Self.put(0, at: 72, in: &b)
        Self.expectRefused(b, .invalidField, offset: 72, field: "memory.stream[0].layerCount")
        b = base; Self.put(5000, at: 72, in: &b)
        Self.expectRefused(b, .invalidField, offset: 72, field: "memory.stream[0].layerCount")
        b = base; Self.put(3, at: 72, in: &b)   // a third layer that is not there
        Self.expectRefused(b, .truncated, offset: nil, field: "memory.stream[0].layer[1].V.type")   // its rows ran into V
        b = base; Self.put(99, at: 76, in: &b)
        Self.expectRefused(b, .invalidField, offset: 76, field: "memory.stream[0].layer[0].K.type")
        b = base; Self.put(35, at: 80, in: &b)   // not whole 34-byte q8_0 blocks
        Self.expectRefused(b, .invalidField, offset: 80, field: "memory.stream[0].layer[0].K.rowBytes")
        b = base; Self.put(1, at: 84, in: &b)   // the u64's high word: 4 GiB rows
        Self.expectRefused(b, .invalidField, offset: 80, field: "memory.stream[0].layer[0].K.rowBytes")
        b = base; Self.put(34 * 1000, at: 80, in: &b)
        Self.expectRefused(b, .truncated, offset: 88, field: "memory.stream[0].layer[0].K.rows")
        Self.expectRefused(base + [0], .invalidField, offset: UInt64(base.count), field: "end")
        // Transposed values: the element size must be the type's, the type not quantized.
        let t = try Self.smallState(dir, valueType: .f16, transposed: true)
        let vAt = 76 + 2 * (4 + 8 + 3 * 68)   // after both layers' keys (rows of two q8_0 blocks)
        b = t; Self.put(4, at: vAt + 4, in: &b)
        Self.expectRefused(b, .invalidField, offset: UInt64(vAt + 4), field: "memory.stream[0].layer[0].V.elementBytes")
        b = t; Self.put(UInt32(GGMLType.q8_0.rawValue), at: vAt, in: &b); Self.put(34, at: vAt + 4, in: &b)
        Self.expectRefused(b, .invalidField, offset: UInt64(vAt + 4), field: "memory.stream[0].layer[0].V.elementBytes")
        b = t; Self.put(0x00FF_FFFF, at: vAt + 8, in: &b)
        Self.expectRefused(b, .invalidField, offset: UInt64(vAt + 8), field: "memory.stream[0].layer[0].V.elementCount")
        b = t; Self.put(1 << 20, at: vAt + 8, in: &b)
        Self.expectRefused(b, .truncated, offset: UInt64(vAt + 12), field: "memory.stream[0].layer[0].V.data")
        // Session: the architecture name's length.
        let s = try Self.smallState(dir, kind: .session)
        b = s; Self.put(4096, at: 24, in: &b)
        Self.expectRefused(b, .invalidField, offset: 24, field: "ggsn.architecture.length")
        b = s; Self.put(1000, at: 24, in: &b)
        Self.expectRefused(b, .truncated, offset: 28, field: "ggsn.architecture")
        b = s; b[28] = 0xFF
        Self.expectRefused(b, .invalidField, offset: 28, field: "ggsn.architecture")
    }

    @Test("a file cut at any byte is refused, never read past its end (session, sequence, transposed values)")
    func everyTruncation() throws {
        let dir = temporaryDirectory()
        for base in [try Self.smallState(dir), try Self.smallState(dir, kind: .session, valueType: .f16, transposed: true),
                     try Self.smallState(dir, kind: .session, version: 9, keyType: .q4_1, valueType: .q5_0)] {
            _ = try Self.parse(base)
            for cut in 0 ..< base.count {
                #expect(throws: KVPackError.self, "cut at \(cut)") { try Self.parse(Array(base[0 ..< cut])) }
            }
        }
    }

    @Test("version 9 sessions: with the output section llama.cpp wrote before PR #18862, and without it")
    func version9Layouts() throws {
        let dir = temporaryDirectory()
        let v10 = try Self.parse(Self.smallState(dir, kind: .session))
        // The exporter writes version 9 with an empty output section.
        let empty = try Self.smallState(dir, kind: .session, version: 9)
        let e = try Self.parse(empty)
        #expect(e.outputSection == LlamaCppState.OutputSection(outputs: 0, logits: 0, embeddings: 0))
        #expect(e.streams == v10.streams.map { Self.shifted($0, by: 20) })
        // One output (position 2) with 3 logits and no embeddings, as an older llama.cpp saved it.
        let at = 28 + 5   // after the architecture "llama"
        var withOutputs = Array(empty[0 ..< at])
        for word: UInt32 in [1, 2] { withUnsafeBytes(of: word.littleEndian) { withOutputs += $0 } }
        withUnsafeBytes(of: UInt64(3).littleEndian) { withOutputs += $0 }
        for logit: Float in [0.5, -1, 2] { withUnsafeBytes(of: logit.bitPattern.littleEndian) { withOutputs += $0 } }
        withUnsafeBytes(of: UInt64(0).littleEndian) { withOutputs += $0 }
        withOutputs += empty[(at + 20)...]
        let o = try Self.parse(withOutputs)
        #expect(o.outputSection == LlamaCppState.OutputSection(outputs: 1, logits: 3, embeddings: 0))
        #expect(o.streams == v10.streams.map { Self.shifted($0, by: 36) })
        // Version 9 as llama.cpp writes it since #18862: no output section at all.
        var bare = try Self.smallState(dir, kind: .session)
        Self.put(9, at: 4, in: &bare)
        let n = try Self.parse(bare)
        #expect(n.outputSection == nil && n.streams == v10.streams)
        // Both caches import to the same rows.
        let a = try LlamaCppCache(state: o, model: Self.smallModel), b = try LlamaCppCache(state: n, model: Self.smallModel)
        #expect(a.rows(layer: 1, kvHead: 0, kind: .value, tokens: 0 ..< 3) == b.rows(layer: 1, kvHead: 0, kind: .value, tokens: 0 ..< 3))
    }

    /// `stream` with every row offset moved by `delta` bytes.
    static func shifted(_ stream: LlamaCppState.Stream, by delta: Int) -> LlamaCppState.Stream {
        var s = stream
        for i in s.layers.indices {
            s.layers[i].keys.offset += delta
            switch s.layers[i].values {
            case var .rows(r): r.offset += delta; s.layers[i].values = .rows(r)
            case let .transposed(type, elements, offset): s.layers[i].values = .transposed(type: type, elements: elements, offset: offset + delta)
            }
        }
        return s
    }

    @Test("a state that does not fit the model, or holds more than one conversation, is refused with the reason")
    func cacheMismatches() throws {
        let dir = temporaryDirectory()
        let base = try Self.smallState(dir)
        func refused(_ bytes: [UInt8], model: LlamaCppModel = Self.smallModel, _ field: String, _ words: String,
                     sourceLocation: SourceLocation = #_sourceLocation) {
            do {
                _ = try LlamaCppCache(state: Self.parse(bytes), model: model)
                Issue.record("imported a state that does not fit (\(field))", sourceLocation: sourceLocation)
            } catch let e as KVPackError {
                #expect(e.field == field && e.message.contains(words), "\(e)", sourceLocation: sourceLocation)
            } catch { Issue.record("\(error)", sourceLocation: sourceLocation) }
        }
        let g = Self.smallModel.geometry
        let threeLayers = LlamaCppModel(architecture: "llama", geometry: ModelGeometry(layerCount: 3, queryHeadCount: 2, kvHeadCount: 1, headDim: 64), rope: .none)
        refused(base, model: threeLayers, "memory.layerCount", "the state has 2 layers")
        let twoHeads = LlamaCppModel(architecture: "llama", geometry: ModelGeometry(layerCount: 2, queryHeadCount: 2, kvHeadCount: 2, headDim: 64), rope: .none)
        refused(base, model: twoHeads, "memory.layer[0]", "2 KV heads x 64 = 128")
        refused(try Self.smallState(dir, kind: .session, architecture: "qwen2"), "ggsn.architecture", "saved by a qwen2 model")
        var b = base
        Self.put(0, at: 32 + 12, in: &b)   // cell 1 at position 0, like cell 0
        refused(b, "memory.cells", "two cells hold position 0")
        b = base; Self.put(7, at: 32 + 24 + 8, in: &b)   // cell 2 in sequence 7
        refused(b, "memory.cells", "2 different sets of sequences")
        b = base; Self.put(0xFFFF_FFFF, at: 32, in: &b)
        refused(b, "memory.cells", "negative position -1")
        // Two tokens listed for three cells.
        b = Array(base[0 ..< 20]) + base[24...]
        Self.put(2, at: 8, in: &b)
        refused(b, "tokens", "2 tokens for 3 cached cells")
        #expect(try LlamaCppCache(state: Self.parse(base), model: Self.smallModel).geometry == g)
    }

    @Test("two streams with cells (a multi-sequence unified cache saved whole) are refused, empty streams skipped")
    func streams() throws {
        let dir = temporaryDirectory()
        let base = try Self.smallState(dir)
        // [n_stream = 3][stream 0: no cells][stream 1: the cache][stream 2: no cells]
        var three = Array(base[0 ..< 24])
        for w: UInt32 in [3, 0] { withUnsafeBytes(of: w.littleEndian) { three += $0 } }
        three += base[28...]
        withUnsafeBytes(of: UInt32(0).littleEndian) { three += $0 }
        let state = try Self.parse(three)
        #expect(state.streams.map(\.cells.count) == [0, 3, 0])
        #expect(try LlamaCppCache(state: state, model: Self.smallModel).tokenCount == 3)
        var two = Array(base[0 ..< 24])
        withUnsafeBytes(of: UInt32(2).littleEndian) { two += $0 }
        two += base[28...] + base[28...]
        let e = #expect(throws: KVPackError.self) { try LlamaCppCache(state: Self.parse(two), model: Self.smallModel) }
        #expect(e?.field == "memory.streams" && e?.message.contains("2 streams with cells") == true, "\(String(describing: e))")
    }

    // MARK: corpus/llama.cpp

    static let corpusFiles: [String] = {
        let dir = packageRoot + "/corpus/llama.cpp"
        return ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).filter { $0.hasSuffix(".bin") }.sorted()
    }()

    @Test("each corpus/llama.cpp file parses or is refused as its name says; those that parse import or are refused, never trap",
          arguments: corpusFiles)
    func corpus(name: String) throws {
        let path = packageRoot + "/corpus/llama.cpp/" + name
        let expect = String(name.prefix { $0 != "_" })
        let file = try MappedFile(path: path)
        guard expect == "valid" else {
            let code = String(expect.dropFirst("error-".count))
            let e = #expect(throws: KVPackError.self) { try LlamaCppState(file: file) }
            #expect(e.map { "\($0.code)" } == code, "\(String(describing: e))")
            #expect(e?.offset != nil && e?.field != nil, "an error names where: \(String(describing: e))")
            return
        }
        let state = try LlamaCppState(file: file)
        if name.contains("outputs") { #expect(state.outputSection != nil) }
        guard let stream = state.streams.first(where: { !$0.cells.isEmpty }) else {
            #expect(throws: KVPackError.self) { try state.onlyStream() }
            return
        }
        let width = stream.layers[0].keys.elements
        let model = LlamaCppModel(architecture: "llama", geometry: ModelGeometry(layerCount: stream.layers.count, queryHeadCount: 1,
                                                                                   kvHeadCount: 1, headDim: width), rope: .none)
        if name.contains("two-streams") {
            #expect(throws: KVPackError.self) { try LlamaCppCache(state: state, model: model) }
            return
        }
        let cache = try LlamaCppCache(state: state, model: model)
        #expect(cache.tokenCount == state.tokens.count)
        let rows = cache.rows(layer: stream.layers.count - 1, kvHead: 0, kind: .value, tokens: 0 ..< cache.tokenCount)
        #expect(rows.count == cache.tokenCount * width)
    }

    @Test("the corpus has a file of every layout and every refusal")
    func corpusPresent() {
        #expect(Self.corpusFiles.filter { $0.hasPrefix("valid__") }.count >= 10)
        for code in ["badMagic", "unsupportedVersion", "truncated", "invalidField"] {
            #expect(Self.corpusFiles.contains { $0.hasPrefix("error-\(code)__") }, "\(code)")
        }
    }

    // MARK: The model's side

    @Test("the GGUF gives the head split, RoPE layout and context; memories other than one plain KV cache are refused naming why")
    func models() throws {
        let dir = temporaryDirectory()
        func model(_ arch: String, _ extra: [(String, GGUFBuilder.Meta)] = [], kvHeads: UInt32 = 2) throws -> LlamaCppModel {
            var b = GGUFBuilder()
            b.metadata = [("general.architecture", .string(arch)), ("\(arch).embedding_length", .u32(64)), ("\(arch).block_count", .u32(2)),
                          ("\(arch).attention.head_count", .u32(4)), ("\(arch).attention.head_count_kv", .u32(kvHeads)),
                          ("\(arch).context_length", .u32(256)), ("\(arch).rope.freq_base", .f32(5e5))] + extra
            let path = dir + "/\(arch)-\(extra.count)-\(kvHeads).gguf"
            try Data(b.bytes()).write(to: URL(fileURLWithPath: path))
            return try LlamaCppModel(path: path)
        }
        let llama = try model("llama")
        #expect(llama.geometry == ModelGeometry(layerCount: 2, queryHeadCount: 4, kvHeadCount: 2, headDim: 16))
        #expect(llama.rope == RoPEConfig(theta: 5e5, layout: .interleaved, keysArePostRoPE: true) && llama.contextLength == 256)
        #expect(llama.fingerprint.count == 16 && llama.fingerprint != [UInt8](repeating: 0, count: 16))
        #expect(try model("qwen2").rope.layout == .rotateHalf)
        #expect(try model("qwen3", [("qwen3.attention.key_length", .u32(32)), ("qwen3.attention.value_length", .u32(32))]).keyHeadDim == 32)
        for (arch, extra, words) in [("mamba", [("mamba.ssm.conv_kernel", GGUFBuilder.Meta.u32(4))], "recurrent"),
                                     ("deepseek2", [("deepseek2.attention.kv_lora_rank", .u32(512))], "latent attention"),
                                     ("gemma2", [("gemma2.attention.sliding_window", .u32(4096))], "sliding-window"),
                                     ("qwen2vl", [], "M-RoPE")] {
            let e = #expect(throws: KVPackError.self) { try model(arch, extra) }
            #expect(e?.message.contains(words) == true, "\(String(describing: e))")
        }
        let e = #expect(throws: KVPackError.self) { try model("llama", kvHeads: 3) }
        #expect(e?.message.contains("do not form a grouped-query geometry") == true, "\(String(describing: e))")
    }

    // MARK: GGML types

    @Test("quantize then dequantize is within each type's step; f16/bf16/f32 are exact on their own values")
    func ggmlTypes() throws {
        var rng = SplitMix64(seed: 5)
        let x = (0 ..< 256).map { _ in Float(rng.nextGaussian()) }
        for type in GGMLType.allCases where type.canQuantize {
            let bytes = try #require(type.rowBytes(x.count))
            var encoded = [UInt8](repeating: 0, count: bytes), back = [Float](repeating: 0, count: x.count)
            x.withUnsafeBufferPointer { src in encoded.withUnsafeMutableBytes { type.quantize(src.baseAddress!, count: x.count, into: $0.baseAddress!) } }
            encoded.withUnsafeBytes { e in back.withUnsafeMutableBufferPointer { type.dequantize(e.baseAddress!, count: x.count, into: $0.baseAddress!) } }
            let rms = (zip(x, back).map { Double(($0 - $1) * ($0 - $1)) }.reduce(0, +) / Double(x.count)).squareRoot()
            let bound: Double = switch type {
            case .f32: 0
            case .f16: 1e-3
            case .bf16: 5e-3
            case .q8_0: 0.02
            case .q5_0, .q5_1: 0.08
            default: 0.16
            }
            #expect(rms <= bound, "\(type): rms \(rms)")
        }
        #expect(GGMLType.q8_0.rowBytes(64) == 68 && GGMLType.q4_0.rowBytes(48) == nil)
        #expect(!GGMLType.iq4_nl.canQuantize)
    }

    @Test("the Hadamard rotation is orthonormal and its own inverse")
    func hadamard() {
        var rng = SplitMix64(seed: 9)
        let x = (0 ..< 128).map { _ in Float(rng.nextGaussian()) }
        var y = x
        y.withUnsafeMutableBufferPointer { Hadamard.apply($0.baseAddress!, count: 128, chunk: 64) }
        let norm = { (v: [Float]) in v.map { Double($0 * $0) }.reduce(0, +) }
        #expect(abs(norm(x) - norm(y)) < 1e-4 * norm(x))
        #expect(y != x)
        y.withUnsafeMutableBufferPointer { Hadamard.apply($0.baseAddress!, count: 128, chunk: 64) }
        #expect(zip(x, y).allSatisfy { abs($0 - $1) < 1e-6 })
        // The first output of a chunk is the chunk's sum over sqrt(n).
        var ones = [Float](repeating: 1, count: 64)
        ones.withUnsafeMutableBufferPointer { Hadamard.apply($0.baseAddress!, count: 64, chunk: 64) }
        #expect(ones[0] == 8 && ones[1 ..< 64].allSatisfy { $0 == 0 })
        #expect(LlamaCppModel.keyRotation(headDim: 128, type: .q8_0) == 128 && LlamaCppModel.keyRotation(headDim: 192, type: .q4_0) == 64)
        #expect(LlamaCppModel.valueRotation(headDim: 128, type: .q8_0) == 64 && LlamaCppModel.keyRotation(headDim: 80, type: .q8_0) == nil)
        #expect(LlamaCppModel.keyRotation(headDim: 64, type: .f16) == nil)
    }

    // MARK: CLI

    @Test("kvpack import/export: llama.cpp detected by its magic, --model required, round trip through the CLI")
    func cli() throws {
        let dir = temporaryDirectory()
        let f = try #require(Self.fixtures.first { $0.file == "seq-q4_0.bin" })
        let (s0, _, e0) = try runKVPack(["import", f.path, dir + "/a.kvpack"])
        #expect(s0 != 0 && e0.contains("needs --model"), "\(e0)")
        #expect(!FileManager.default.fileExists(atPath: dir + "/a.kvpack"))
        let (s1, _, e1) = try runKVPack(["export", packageRoot + "/corpus/valid__v2-raw-f32.kvpack", dir + "/x.bin", "--format", "llama.cpp-seq", "--v-trans", "2"])
        #expect(s1 != 0 && e1.contains("--v-trans is 0"), "\(e1)")
        let (s2, _, e2) = try runKVPack(["import", Self.fixtureDirectory + "/fixtures.json", dir + "/b.kvpack", "--format", "llama.cpp", "--model", "smollm2"])
        #expect(s2 != 0 && (e2.contains("not a llama.cpp state file") || e2.contains("SmolLM2")), "\(e2)")
        // A damaged state is reported with its own name, offset and field (not the output's).
        let cut = dir + "/cut.bin"
        try Data(try Data(contentsOf: URL(fileURLWithPath: f.path)).prefix(50_000)).write(to: URL(fileURLWithPath: cut))
        let (sc, _, ec) = try runKVPack(["import", cut, dir + "/cut.kvpack", "--model", "smollm2"])
        #expect(sc != 0 && ec.contains("cut.bin: truncated memory.stream[0].layer[") && ec.contains("at offset"), "\(ec)")
        #expect(!FileManager.default.fileExists(atPath: dir + "/cut.kvpack"))
        guard !smolLM2Missing else { return }
        let (s3, o3, e3) = try runKVPack(["import", f.path, dir + "/a.kvpack", "--model", "smollm2", "--scheme", "raw:f32", "--json"])
        #expect(s3 == 0, "\(e3)")
        #expect(o3.contains("\"keyRotation\" : 64") || o3.contains("\"keyRotation\":64"), "\(o3)")
        let (s4, o4, e4) = try runKVPack(["export", dir + "/a.kvpack", dir + "/a.bin", "--format", "llama.cpp-seq"])
        #expect(s4 == 0 && o4.contains("q4_0 keys"), "\(e4)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: dir + "/a.bin")) == Data(contentsOf: URL(fileURLWithPath: f.path)))
        let (s5, _, e5) = try runKVPack(["export", dir + "/a.kvpack", dir + "/a.bin", "--format", "llama.cpp-seq"])
        #expect(s5 != 0 && e5.contains("exists"), "\(e5)")
    }
}

/// With the real SmolLM2 GGUF (skipped when `make models` has not fetched it).
@Suite(.serialized, .enabled(if: !smolLM2Missing, Comment(rawValue: smolLM2SkipNote)))
struct LlamaCppSmolLM2Tests {
    @Test("kvpack chat --resume on an imported session finishes the assistant reply llama.cpp's prompt opened, then takes the next message")
    func chatResumesImportedSession() throws {
        let dir = temporaryDirectory()
        let f = try #require(LlamaCppTests.fixtures.first { $0.file == "session-q8_0-f16-vtrans.bin" })
        for name in ["c", "g"] {
            let (s, _, e) = try runKVPack(["import", f.path, dir + "/\(name).kvpack", "--model", "smollm2", "--scheme", "int:k4v2:kc64"])
            try #require(s == 0, "\(e)")
        }
        let (s2, o2, e2) = try runKVPack(["generate", "--resume", dir + "/g.kvpack", "--steps", "6", "--json", "--no-fsync"])
        try #require(s2 == 0, "\(e2)")
        let (s3, o3, e3) = try runKVPack(["chat", "--resume", dir + "/c.kvpack", "--message", "And another one?", "--max-tokens", "24",
                                          "--temperature", "0", "--json", "--no-fsync"])
        try #require(s3 == 0, "\(e3)")
        struct Generated: Decodable { var generated: [Int] }
        struct Turn: Decodable { var message: String; var replyTokens: [Int] }
        struct Summary: Decodable { var turns: [Turn] }
        let turns = try JSONDecoder().decode(Summary.self, from: Data(o3.utf8)).turns
        try #require(turns.count == 2)
        // The first turn is the reply llama.cpp's prompt asked for: what generate --resume continues with.
        let expected = try JSONDecoder().decode(Generated.self, from: Data(o2.utf8)).generated
        #expect(turns[0].message.isEmpty && Array(turns[0].replyTokens.prefix(6)) == Array(expected.prefix(turns[0].replyTokens.count)))
        #expect(turns[1].message == "And another one?" && !turns[1].replyTokens.isEmpty)
        let (_, text, _) = try runKVPack(["info", dir + "/c.kvpack", "--text"])
        #expect(text.hasPrefix("<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\n"), "\(text)")
        #expect(text.components(separatedBy: "<|im_end|>").count == 5, "four closed messages: \(text)")
    }

    @Test("a session llama.cpp saved continues in KVPack as KVPack's own prefill of the same tokens does")
    func continueImportedSession() throws {
        let dir = temporaryDirectory()
        let f = try #require(LlamaCppTests.fixtures.first { $0.file == "session-f16.bin" })
        let (s1, _, e1) = try runKVPack(["import", f.path, dir + "/imported.kvpack", "--model", "smollm2", "--scheme", "raw:f16"])
        try #require(s1 == 0, "\(e1)")
        // The GGUF's fingerprint and path are recorded, so generate --resume finds the model.
        let reader = try KVPackReader(path: dir + "/imported.kvpack")
        #expect(reader.manifest.modelFingerprint == (try LlamaCppModel(path: ModelLocator.smolLM2Path)).fingerprint)
        #expect(reader.manifest.rope == RoPEConfig(theta: 100_000, layout: .interleaved, keysArePostRoPE: true))
        let (s2, o2, e2) = try runKVPack(["generate", "--resume", dir + "/imported.kvpack", "--steps", "8", "--json", "--no-fsync"])
        try #require(s2 == 0, "\(e2)")
        let ids = f.tokens.map(String.init).joined(separator: ",")
        let (s3, o3, e3) = try runKVPack(["generate", "--model", "smollm2", "--save", dir + "/own.kvpack", "--prompt-tokens", ids,
                                          "--steps", "8", "--json", "--no-fsync"])
        try #require(s3 == 0, "\(e3)")
        struct Summary: Decodable { var generated: [Int]; var margins: [Float] }
        let imported = try JSONDecoder().decode(Summary.self, from: Data(o2.utf8))
        let own = try JSONDecoder().decode(Summary.self, from: Data(o3.utf8))
        // Both caches are f16 of the same tokens, computed by two engines: the same greedy tokens
        // unless a step is a near tie (none is, for this prompt: margins printed on failure).
        #expect(imported.generated == own.generated, "imported \(imported.generated) \(imported.margins), own \(own.generated) \(own.margins)")
        // The keys llama.cpp cached are KVPack's own to f16 and arithmetic-order rounding.
        let mine = try KVPackReader(path: dir + "/own.kvpack")
        for layer in [0, 15, 29] {
            let a = try reader.decode(layer: layer, kvHead: 2, kind: .key, tokens: 0 ..< f.tokens.count)
            let b = try mine.decode(layer: layer, kvHead: 2, kind: .key, tokens: 0 ..< f.tokens.count)
            let scale = b.map { abs($0) }.max() ?? 1
            let worst = zip(a, b).map { abs($0 - $1) }.max() ?? 0
            #expect(worst < 0.02 * scale, "layer \(layer): worst \(worst) of \(scale)")
        }
    }
}

/// The llama.cpp `make llama.cpp` builds (from the llama-cpp-python sdist), when it is built.
let llamaCppDirectory = ProcessInfo.processInfo.environment["LLAMA_CPP_DIR"] ?? ModelLocator.cacheDirectory + "/llama.cpp"
let llamaCppMissing = !FileManager.default.fileExists(atPath: llamaCppDirectory + "/build/bin/libllama.so") || smolLM2Missing

@Suite(.serialized, .enabled(if: !llamaCppMissing, "llama.cpp is not built (make llama.cpp) or SmolLM2 is not downloaded (make models); skipping"))
struct LlamaCppLiveTests {
    @Test("the real llama.cpp and KVPack continue each other's caches, both directions, agreeing but for near ties")
    func roundTrip() throws {
        let (status, o, e) = try runProcess("/bin/bash", [packageRoot + "/scripts/llama-cpp.sh", "python", packageRoot + "/scripts/llama_cpp_roundtrip.py",
                                                          "--kvpack", kvpackBinary, "--model", ModelLocator.smolLM2Path, "--prompts", "2", "--steps", "16"])
        // Exit 0: every disagreement is a near tie (a logit margin under 0.5 in one engine).
        #expect(status == 0, "\(o)\n\(e)")
        let line = try #require(o.split(separator: "\n").first { $0.hasPrefix("Teacher-forced agreement:") }, "\(o)\n\(e)")
        let numbers = line.split(whereSeparator: { !$0.isNumber }).compactMap { Int($0) }
        try #require(numbers.count >= 2)
        #expect(numbers[1] == 2 * 2 * 2 * 16 && Double(numbers[0]) >= 0.85 * Double(numbers[1]), "\(o)")
    }
}

