import Foundation
import Testing
@testable import KVPack

/// Spec/kvpack-format.md's worked example: its hex dump, Spec/example.kvpack and what the
/// writer produces today must be the same bytes, and the reader must read them as documented.
struct SpecExampleTests {
    static let specPath = packageRoot + "/Spec/kvpack-format.md"
    static let examplePath = packageRoot + "/Spec/example.kvpack"

    /// The example, as the Spec describes its inputs: 1 layer, 1 query head, 1 KV head,
    /// head_dim 2, segments of 2 tokens, raw f16, salt 0x1122334455667788; three tokens
    /// (ids 1, 72, 101) appended one by one, then one commit.
    static func build() throws -> [UInt8] {
        let g = ModelGeometry(layerCount: 1, queryHeadCount: 1, kvHeadCount: 1, headDim: 2)
        let plan = SchemePlan(spec: try SchemeSpec.parse("raw:f16", geometry: g))
        let m = Manifest(geometry: g, segmentTokens: 2, rope: RoPEConfig(theta: 10000, layout: .interleaved),
                         maxPositions: 512, schemes: plan.schemes, layerSchemes: plan.layerSchemes,
                         producer: "spec", userMetadata: [.init("lang", "en")])
        let dir = temporaryDirectory()
        var options = testOptions(salt: 0x1122_3344_5566_7788)
        options.durability = .flush
        let w = try KVPackWriter.create(path: dir + "/example.kvpack", manifest: m, options: options)
        for (i, id) in [UInt32(1), 72, 101].enumerated() {
            let k: [Float] = [Float(2 * i + 1), Float(2 * i + 2)]
            let v: [Float] = [0.5 * Float(i + 1), -0.25]
            try w.append(tokenIDs: [id], keys: k, values: v, layout: .layerTokenHead(g, tokens: 1))
        }
        try w.close()
        return fileBytes(dir + "/example.kvpack")
    }

    /// Bytes of the `xxd`-style lines ("OFFSET: hh hh ...") between the example markers.
    static func specHexBytes() throws -> [UInt8] {
        let text = try String(contentsOfFile: specPath, encoding: .utf8)
        guard let start = text.range(of: "<!-- example-hex-begin -->"), let end = text.range(of: "<!-- example-hex-end -->") else {
            Issue.record("example markers missing from \(specPath)")
            return []
        }
        var bytes: [UInt8] = []
        for line in text[start.upperBound ..< end.lowerBound].split(separator: "\n") {
            let parts = line.split(separator: ":", maxSplits: 1)
            guard parts.count == 2, parts[0].count == 8, let offset = Int(parts[0], radix: 16) else { continue }
            // Lines of zeros (padding) are left out of the dump, as `xxd -a` does.
            #expect(offset >= bytes.count && offset % 16 == 0, "hex dump line at \(parts[0]) is out of sequence")
            if offset > bytes.count { bytes += [UInt8](repeating: 0, count: offset - bytes.count) }
            let hexPart = parts[1].split(separator: "|", maxSplits: 1)[0]  // text after | is a comment
            for h in hexPart.split(separator: " ") {
                guard let b = UInt8(h, radix: 16) else { break }
                bytes.append(b)
            }
        }
        return bytes
    }

    @Test("the writer, Spec/example.kvpack and the Spec's hex dump agree byte for byte")
    func sameBytes() throws {
        let built = try Self.build()
        if ProcessInfo.processInfo.environment["KVPACK_WRITE_SPEC_EXAMPLE"] == "1" {
            writeBytes(built, to: Self.examplePath)
        }
        let stored = fileBytes(Self.examplePath)
        #expect(built == stored, "the writer's bytes differ from Spec/example.kvpack (format change? bump the version and update Spec/)")
        #expect(try Self.specHexBytes() == stored, "the hex dump in Spec/kvpack-format.md differs from Spec/example.kvpack")
    }

    @Test("the reader reads the example as the Spec documents it")
    func documentedContent() throws {
        let r = try KVPackReader(path: Self.examplePath)
        #expect(r.header.salt == 0x1122_3344_5566_7788)
        #expect(r.tokenCount == 3)
        #expect(r.sealedTokenCount == 2)
        #expect(try r.tokenIDs == [1, 72, 101])
        #expect(try r.positions == [0, 1, 2])
        #expect(r.manifest.producer == "spec")
        #expect(r.manifest.userMetadata == [.init("lang", "en")])
        #expect(try r.decode(layer: 0, kvHead: 0, kind: .key) == [1, 2, 3, 4, 5, 6])
        #expect(try r.decode(layer: 0, kvHead: 0, kind: .value) == [0.5, -0.25, 1, -0.25, 1.5, -0.25])
        // Documented offsets: blocks at 0x1C0 (K) and 0x240 (V), their segment table at 0x2C0,
        // tail run at 0x340, index at 0x440, commit at 0x4C0; the first (empty) commit at 0x180
        // is superseded.
        #expect(r.header.major == 2 && r.header.minor == 0)
        #expect(r.state.segmentTables == [0x2C0])
        #expect(try r.blockOffset(segment: 0, stream: 0) == 0x1C0)
        #expect(try r.blockOffset(segment: 0, stream: 1) == 0x240)
        #expect(r.state.tail.map(\.frameOffset) == [0x340])
        #expect(r.state.chain.map(\.offset) == [0x440])
        #expect(r.commitOffset == 0x4C0)
        #expect(r.fileSize == 0x500)
        #expect(Validator.validate(file: r.file, path: "example", deep: true).problems.isEmpty)
    }
}
