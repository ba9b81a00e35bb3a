import Foundation
import Testing
@testable import KVPack
@testable import KVPackInterop
@testable import KVPackModels

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

struct RoPELayoutConversionTests {
    @Test("RoPEPairing: interleaved <-> rotate-half are inverse permutations (HF dim j is 2j, j + d/2 is 2j+1)")
    func pairing() throws {
        let d = 8
        let toHalf = try RoPEPairing(from: .interleaved, to: .rotateHalf, headDim: d)
        let toPairs = try RoPEPairing(from: .rotateHalf, to: .interleaved, headDim: d)
        var row: [Float] = (0 ..< d).map(Float.init)
        row.withUnsafeMutableBufferPointer { toHalf.apply($0.baseAddress!) }
        #expect(row == [0, 2, 4, 6, 1, 3, 5, 7])
        row.withUnsafeMutableBufferPointer { toPairs.apply($0.baseAddress!) }
        #expect(row == (0 ..< d).map(Float.init))
        #expect(throws: KVPackError.self) { try RoPEPairing(from: .none, to: .rotateHalf, headDim: d) }
        #expect(throws: KVPackError.self) { try RoPEPairing(from: .interleaved, to: .rotateHalf, headDim: 7) }
    }

    @Test("convert --rope-layout: keys permuted per head, values/ids/positions kept, attention unchanged for permuted queries, and back is bit-exact")
    func convertLayout() throws {
        let dir = temporaryDirectory()
        let (src, _) = try ConverterTests.source(dir)
        var o = Converter.Options()
        o.durability = .flush
        o.ropeLayout = .rotateHalf
        let g = ConverterTests.geometry, d = g.headDim
        let keep = try SchemeSpec.parse("raw:f32", geometry: g)
        let report = try Converter.convert(input: src, output: dir + "/half.kvpack", spec: keep, layers: [], options: o)
        #expect(report.keyRelativeError == 0 && report.valueRelativeError == 0 && report.attentionRelativeError < 1e-6)
        let a = try KVPackReader(path: src), b = try KVPackReader(path: dir + "/half.kvpack")
        #expect(a.manifest.rope.layout == .interleaved && b.manifest.rope.layout == .rotateHalf)
        #expect(try b.tokenIDs == a.tokenIDs && b.positions == a.positions)
        for layer in 0 ..< g.layerCount {
            for head in 0 ..< g.kvHeadCount {
                let ka = try a.decode(layer: layer, kvHead: head, kind: .key), kb = try b.decode(layer: layer, kvHead: head, kind: .key)
                for t in 0 ..< a.tokenCount {
                    for j in 0 ..< d / 2 {
                        #expect(kb[t * d + j] == ka[t * d + 2 * j] && kb[t * d + j + d / 2] == ka[t * d + 2 * j + 1])
                    }
                }
                #expect(try b.decode(layer: layer, kvHead: head, kind: .value) == a.decode(layer: layer, kvHead: head, kind: .value))
                // Queries permuted the same way see the same attention.
                let q: [Float] = (0 ..< g.groupSize * d).map { Float(sin(Double($0) * 0.7)) }
                var qb = q
                qb.withUnsafeMutableBufferPointer { p in
                    for h in 0 ..< g.groupSize { try! RoPEPairing(from: .interleaved, to: .rotateHalf, headDim: d).apply(p.baseAddress! + h * d) }
                }
                let oa = try a.attend(layer: layer, kvHead: head, queries: q), ob = try b.attend(layer: layer, kvHead: head, queries: qb)
                #expect(zip(oa, ob).allSatisfy { abs($0 - $1) <= 1e-5 * max(1, abs($0)) })
            }
        }
        o.ropeLayout = .interleaved
        _ = try Converter.convert(input: dir + "/half.kvpack", output: dir + "/back.kvpack", spec: keep, layers: [], options: o)
        let c = try KVPackReader(path: dir + "/back.kvpack")
        for s in 0 ..< g.streamCount {
            let id = g.streamID(s)
            #expect(try c.decode(layer: id.layer, kvHead: id.kvHead, kind: id.kind) == a.decode(layer: id.layer, kvHead: id.kvHead, kind: id.kind))
        }
        // A layer that keeps a projection fitted to the old channel order is refused.
        let reader = try KVPackReader(path: src)
        let svdq = try SchemeSpec.parse("k:svdq:4+v:raw:f16", geometry: g) { try CacheStatistics(reader: reader) }
        o.ropeLayout = nil
        _ = try Converter.convert(input: src, output: dir + "/svdq.kvpack", spec: svdq, options: o)
        o.ropeLayout = .rotateHalf
        #expect(throws: KVPackError.self) {
            try Converter.convert(input: dir + "/svdq.kvpack", output: dir + "/svdq-half.kvpack", spec: keep, layers: [], options: o)
        }
    }

    @Test("a conversation with rotate-half keys is refused on resume, the file untouched, and resumes after convert --rope-layout interleaved")
    func resumeRefusesRotateHalf() throws {
        let dir = temporaryDirectory(), path = dir + "/chat.kvpack"
        let g = bundledModel.config.geometry
        var c = try Conversation.start(path: path, model: bundledModel, spec: try SchemeSpec.parse("raw:f32", geometry: g), prompt: [1, 200, 300],
                                       options: testOptions())
        try c.session.close()
        var o = Converter.Options()
        o.durability = .flush
        o.ropeLayout = .rotateHalf
        let keep = try SchemeSpec.parse("raw:f32", geometry: g)
        _ = try Converter.convert(input: path, output: dir + "/half.kvpack", spec: keep, layers: [], options: o)
        let before = fileBytes(dir + "/half.kvpack")
        #expect { try Conversation.resume(path: dir + "/half.kvpack", model: bundledModel, options: testOptions()) } throws: {
            "\($0)".contains("rotate-half") && "\($0)".contains("--rope-layout interleaved")
        }
        #expect(fileBytes(dir + "/half.kvpack") == before)
        o.ropeLayout = .interleaved
        _ = try Converter.convert(input: dir + "/half.kvpack", output: dir + "/back.kvpack", spec: keep, layers: [], options: o)
        c = try Conversation.resume(path: dir + "/back.kvpack", model: bundledModel, options: testOptions())
        #expect(c.session.tokenCount == 3)
        try c.session.close()
    }
}
