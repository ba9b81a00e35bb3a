import Foundation
import Testing
@testable import KVPack

/// `window:N` (Spec 6.1, format 2.3): segments seal N tokens late, so the newest N tokens (at
/// least) stay lossless in tail runs at every commit.
struct LosslessWindowTests {
    static let geometry = ModelGeometry(layerCount: 2, queryHeadCount: 4, kvHeadCount: 2, headDim: 16)

    static func create(_ path: String, spec: String, segmentTokens: Int = 32, options: WriterOptions = testOptions()) throws -> KVPackWriter {
        var file = NewFile(geometry: geometry, rope: RoPEConfig(theta: 10000, layout: .interleaved),
                           schemes: try SchemeSpec.parse(spec, geometry: geometry), producer: "kvpack tests")
        file.segmentTokens = segmentTokens
        return try KVPackWriter.create(path: path, file: file, options: options)
    }

    @Test("the window's and the sinks' tokens read back as their f16 rows at every commit; the others as the scheme encodes them",
          arguments: [(40, 0), (40, 5), (0, 3), (0, 32)])
    func windowStaysLossless(w: Int, sinks: Int) throws {
        let c = 32
        let data = RandomKV(geometry: Self.geometry, tokens: 190, seed: 11, maxExponent: 6)
        let path = temporaryDirectory() + "/window.kvpack"
        let writer = try Self.create(path, spec: "int:k2v2:kc16+window:\(w)+sinks:\(sinks)")
        #expect(writer.manifest.windowTokens == w && writer.manifest.sinkTokens == sinks)
        var t = 0
        for n in [7, 45, 1, 1, 30, 64, 3, 39] {
            try data.append(to: writer, t ..< t + n)
            t += n
            try writer.commit()
            let reader = try KVPackReader(path: path)
            #expect(reader.header.minor == 3 && reader.header.major == 2)
            #expect(reader.tokenCount == t)
            let sealed = reader.sealedTokenCount
            #expect(sealed % c == 0 && sealed == max(0, t - w) / c * c, "\(t) tokens: \(sealed) sealed")
            #expect(t - sealed >= min(t, w) && t - sealed < w + c, "\(t) tokens: \(t - sealed) in the tail")
            #expect((reader.state.sink != nil) == (sealed > 0 && sinks > 0))
            for layer in 0 ..< 2 {
                for head in 0 ..< 2 {
                    for kind in KVKind.allCases {
                        let got = try reader.decode(layer: layer, kvHead: head, kind: kind)
                        let exact = data.stream(layer: layer, head: head, kind: kind, tokens: 0 ..< t)
                        let d = Self.geometry.headDim
                        // The tail (the window and the open segment) and the sinks are exact f16.
                        let lossless = Set(0 ..< min(sinks, t)).union(sealed ..< t)
                        for token in 0 ..< t {
                            let g = Array(got[token * d ..< (token + 1) * d]), e = exact[token * d ..< (token + 1) * d].map { Float(Float16($0)) }
                            // Sealed rows are 2-bit codes: not exact.
                            #expect((g == e) == lossless.contains(token), "\(t) tokens: token \(token) of layer \(layer) head \(head) \(kind)")
                        }
                    }
                }
            }
        }
        try writer.close()
        let reader = try KVPackReader(path: path)
        #expect(Validator.validate(file: reader.file, path: path, deep: true).problems.isEmpty)
        if sinks > 0, sinks < c {
            // Segment 0's blocks encode copies of row `sinks` where the sinks were (their ranges
            // are not stretched by the sinks' outliers); readers take the sinks from SINK.
            let workspace = AttentionWorkspace(), d = Self.geometry.headDim
            for stream in 0 ..< Self.geometry.streamCount {
                let payload = try reader.blockPayload(segment: 0, stream: stream, workspace: workspace)
                var rows = [Float](repeating: 0, count: c * d)
                rows.withUnsafeMutableBufferPointer { reader.streamSchemes[stream].decode(block: payload, tokens: 0 ..< c, into: $0.baseAddress!) }
                for row in 0 ..< sinks { #expect(rows[row * d ..< (row + 1) * d] == rows[sinks * d ..< (sinks + 1) * d]) }
            }
        }
        try expectAttentionMatchesDecoded(reader, label: "window \(w) sinks \(sinks)", seed: 3,
                                          ranges: [0 ..< 190, 31 ..< 97, 64 ..< 96, 120 ..< 190, 150 ..< 151, 2 ..< 3, 1 ..< 40])
    }

    @Test("a windowed file written in one batch, in many, and resumed in between decodes to the same rows")
    func resumeMatchesUninterrupted() throws {
        // Rows f16 can hold: a resumed writer reloads the tail from its f16 runs, while an
        // uninterrupted one still has the f32 rows, so only such rows encode the same both ways.
        var data = RandomKV(geometry: Self.geometry, tokens: 170, seed: 12, maxExponent: 6)
        data.keys = data.keys.map { Float(Float16($0)) }
        data.values = data.values.map { Float(Float16($0)) }
        let dir = temporaryDirectory()
        let spec = "int:k4v2:kc32+window:50+sinks:4"
        let whole = try Self.create(dir + "/whole.kvpack", spec: spec)
        try data.append(to: whole, 0 ..< 170)
        try whole.close()

        let resumed = try Self.create(dir + "/resumed.kvpack", spec: spec)
        try data.append(to: resumed, 0 ..< 61)
        try resumed.close()
        for range in [61 ..< 99, 99 ..< 100, 100 ..< 170] {
            let w = try KVPackWriter.resume(path: dir + "/resumed.kvpack", options: testOptions())
            try data.append(to: w, range)
            try w.close()
        }
        let a = try KVPackReader(path: dir + "/whole.kvpack"), b = try KVPackReader(path: dir + "/resumed.kvpack")
        #expect(a.sealedTokenCount == 96 && b.sealedTokenCount == 96)
        for layer in 0 ..< 2 {
            for head in 0 ..< 2 {
                for kind in KVKind.allCases {
                    #expect(try a.decode(layer: layer, kvHead: head, kind: kind) == b.decode(layer: layer, kvHead: head, kind: kind))
                }
            }
        }
        #expect(Validator.validate(file: b.file, path: "resumed", deep: true).problems.isEmpty)
    }

    @Test("what a window cannot be: in a version 1 file, too large, malformed in the spec")
    func refusals() throws {
        let dir = temporaryDirectory()
        #expect(throws: KVPackError.self) { try Self.create(dir + "/v1.kvpack", spec: "raw:f16+window:8", options: testOptions(major: 1)) }
        for bad in ["int:k4v2+window", "int:k4v2+window:-1", "int:k4v2+window:65537", "int:k4v2+window:x", "window:8", "int:k4v2+fit:best"] {
            #expect(throws: KVPackError.self, "\(bad)") { try SchemeSpec.parse(bad, geometry: Self.geometry) }
        }
        let spec = try SchemeSpec.parse("int:k4v2+window:0+fit:minmax", geometry: Self.geometry)
        #expect(spec.fileOptions.windowTokens == 0 && spec.fileOptions.keyFit == .minMax && spec.fileOptions.valueFit == .minMax)
        let perRole = try SchemeSpec.parse("int:k4v2+fit:minmax+v:fit:mse", geometry: Self.geometry).fileOptions
        #expect(perRole.keyFit == .minMax && perRole.valueFit == .minimumError)
        #expect(throws: KVPackError.self) { try SchemeSpec.parse("int:k4v2+k:window:8", geometry: Self.geometry) }
        #expect(throws: KVPackError.self) { try SchemeSpec.parse("int:k4v2+v:sinks:8", geometry: Self.geometry) }
        // Sinks lie in the first segment.
        #expect(throws: KVPackError.self) { try Self.create(dir + "/sinks.kvpack", spec: "raw:f16+sinks:33") }
        // window:0 is no window: the file is what it was before 2.3.
        let plain = try Self.create(dir + "/w0.kvpack", spec: "raw:f16+window:0")
        try plain.close()
        #expect(try KVPackReader(path: dir + "/w0.kvpack").header.minor == 0)
        // Codes copied from elsewhere cannot bypass the window.
        let windowed = try Self.create(dir + "/copy.kvpack", spec: "int:k4v4+window:4")
        #expect(throws: KVPackError.self) { try windowed.appendEncodedSegment(tokenIDs: Array(0 ..< 32)) { _ in [] } }
        try windowed.close()
    }

    @Test("the manifest's window and sinks fields: written with the LOSSLESS_TOKENS flag, refused without counts or beyond their bounds")
    func manifestField() throws {
        let (plainManifest, _) = try makeManifest(Self.geometry, segmentTokens: 32, spec: "raw:f16")
        var m = plainManifest
        m.windowTokens = 100
        let bytes = m.encoded()
        let decoded = try bytes.withUnsafeBytes { try Manifest.decode($0, base: 0) }
        #expect(decoded.windowTokens == 100 && decoded == m)
        func field(_ at: Int, _ value: UInt32, in source: [UInt8]) -> [UInt8] {
            var b = source
            withUnsafeBytes(of: value.littleEndian) { for i in 0 ..< 4 { b[at + i] = $0[i] } }
            return b
        }
        func decodeError(_ b: [UInt8]) -> KVPackError? {
            do { _ = try b.withUnsafeBytes { try Manifest.decode($0, base: 0) } } catch let e as KVPackError { return e } catch {}
            return nil
        }
        // The flag with no window and no sinks, a window past the bound, sinks past the segment,
        // an unknown flag bit.
        #expect(decodeError(field(56, 0, in: bytes))?.offset == 20)
        #expect(decodeError(field(60, 33, in: bytes))?.offset == 60)
        m.sinkTokens = 32
        #expect(try m.encoded().withUnsafeBytes { try Manifest.decode($0, base: 0) } == m)
        #expect(decodeError(field(56, 65537, in: bytes))?.offset == 56)
        #expect(decodeError(field(20, 4, in: bytes))?.offset == 20)
        // A version 1 file cannot hold the flag: its reader refuses one that says it does.
        let dir = temporaryDirectory()
        try writeFile(dir + "/v1.kvpack", data: RandomKV(geometry: Self.geometry, tokens: 40, seed: 3), segmentTokens: 32, spec: "raw:f16",
                      batches: [40], options: testOptions(major: 1))
        var v1 = fileBytes(dir + "/v1.kvpack")
        let salt = v1.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 24, as: UInt64.self) }
        let manifestFrame = try BadInputTests.frames(v1)[0]
        BadInputTests.reseal(&v1, frame: manifestFrame, salt: salt, payload: { payload in
            payload[20] |= 2
            payload[56] = 8
        })
        #expect(openError(v1)?.field == "manifest.flags")
        // Without the flag the word is reserved: ignored, as a 2.2 reader ignores it.
        let plain = plainManifest.encoded()
        let ignored = try field(56, 77, in: plain).withUnsafeBytes { try Manifest.decode($0, base: 0) }
        #expect(ignored.windowTokens == 0)
    }
}
