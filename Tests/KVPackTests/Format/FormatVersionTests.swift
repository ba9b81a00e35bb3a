import Foundation
import Testing
@testable import KVPack

/// Version 2 (segment tables, Spec/ 8.1) against version 1: what opening reads, where damage is
/// reported, and that both majors hold the same content and keep their own layout on resume.
struct FormatVersionTests {
    static let geometry = ModelGeometry(layerCount: 2, queryHeadCount: 4, kvHeadCount: 2, headDim: 8)

    /// 43 tokens in segments of 4 (10 sealed, a tail of 3 in two runs: commits at 41 and 43), ids 7t mod 501, positions
    /// 3t + 1 (not the indices, so a mix-up of ids, positions or token order shows).
    static func write(major: UInt16, spec: String = "raw:f16", tokens: Int = 43) throws -> (path: String, data: RandomKV) {
        let data = RandomKV(geometry: geometry, tokens: tokens, seed: 17, maxExponent: 6)
        let path = temporaryDirectory() + "/v\(major).kvpack"
        try writeFile(path, data: data, segmentTokens: 4, spec: spec, batches: [5, 9, 1, 17, 9, 2], commitsAfter: [5, 14, 15, 32, 41],
                      position: position, options: testOptions(salt: 99, major: major))
        return (path, data)
    }

    static func position(_ t: Int) -> UInt32 { UInt32(3 * t + 1) }

    static func content(_ r: KVPackReader) throws -> [[Float]] {
        var out: [[Float]] = []
        for layer in 0 ..< r.geometry.layerCount {
            for head in 0 ..< r.geometry.kvHeadCount {
                for kind in KVKind.allCases { out.append(try r.decode(layer: layer, kvHead: head, kind: kind)) }
            }
        }
        return out
    }

    @Test("a version 2 index lists one entry per segment and no tokens; ids and positions read back from tables and tail runs")
    func segmentTables() throws {
        let (path, _) = try Self.write(major: 2)
        let r = try KVPackReader(path: path)
        #expect(r.header.major == 2 && r.header.minor == 0)
        #expect(r.tokenCount == 43 && r.sealedTokenCount == 40)
        #expect(r.state.blockOffsets.isEmpty && r.state.tokenIDs.isEmpty, "nothing per block or token is loaded at open")
        #expect(r.state.segmentTables.count == 10)
        #expect(r.state.chain.allSatisfy { $0.tokenCount == 0 })
        #expect(r.state.chain.reduce(0) { $0 + $1.blockCount } == 10)
        #expect(r.state.tail.count == 2, "the tail is two runs (commits at 41 and 43)")
        let ids: [UInt32] = (0 ..< 43).map { UInt32($0 * 7 % 501) }
        let positions: [UInt32] = (0 ..< 43).map(Self.position)
        #expect(try r.tokenIDs == ids)
        #expect(try r.positions == positions)
        // Ranges that start and end inside segments and inside the tail.
        let part = try r.tokens(6 ..< 42)
        #expect(part.ids == Array(ids[6 ..< 42]))
        #expect(part.positions == Array(positions[6 ..< 42]))
        #expect(throws: KVPackError.self) { try r.tokens(40 ..< 44) }
        #expect(Validator.validate(file: r.file, path: path, deep: true).problems.isEmpty)
    }

    @Test("version 1 is still written on request, holds the same content, and a resumed file keeps its major", arguments: ["raw:f16", "int:k4v2", "nsn:1"])
    func bothMajors(spec: String) throws {
        let (p1, _) = try Self.write(major: 1, spec: spec, tokens: 30)
        let (p2, _) = try Self.write(major: 2, spec: spec, tokens: 30)
        for (path, major) in [(p1, UInt16(1)), (p2, 2)] {
            let w = try KVPackWriter.resume(path: path, options: testOptions())
            try w.close()
            let r = try KVPackReader(path: path)
            #expect(r.header.major == major)
            #expect(Validator.validate(file: r.file, path: path, deep: true).problems.isEmpty)
        }
        let more = RandomKV(geometry: Self.geometry, tokens: 43, seed: 17, maxExponent: 6)
        for path in [p1, p2] {
            let w = try KVPackWriter.resume(path: path, options: testOptions())
            try more.append(to: w, 30 ..< 43, positions: (30 ..< 43).map(Self.position)) { UInt32($0 * 7 % 501) }
            try w.close()
        }
        let a = try KVPackReader(path: p1), b = try KVPackReader(path: p2)
        #expect(a.header.major == 1 && b.header.major == 2)
        #expect(a.header.minor == a.manifest.requiredMinorVersion, "version 1 files record the lowest minor they need")
        #expect(a.tokenCount == 43 && b.tokenCount == 43)
        let ta = try a.tokens(0 ..< 43), tb = try b.tokens(0 ..< 43)
        #expect(ta.ids == tb.ids)
        #expect(ta.positions == tb.positions)
        let ca = try Self.content(a), cb = try Self.content(b)
        #expect(ca == cb, "same codes whatever the container version")
        let q = [Float](repeating: 0.25, count: Self.geometry.groupSize * Self.geometry.headDim)
        let oa = try a.attend(layer: 1, kvHead: 1, queries: q), ob = try b.attend(layer: 1, kvHead: 1, queries: q)
        #expect(oa == ob)
    }

    @Test("opening a version 2 file reads no segment table: a damaged one is an error of the call that reaches it, and of validate")
    func lazyTables() throws {
        let (path, _) = try Self.write(major: 2)
        var bytes = fileBytes(path)
        let frames = try BadInputTests.frames(bytes)
        let tables = frames.filter { $0.tag == .segmentTable }
        #expect(tables.count == 10)
        let third = tables[2]
        bytes[Int(third.payloadOffset) + 5] ^= 0x20   // block offset of stream 0 (K of layer 0, head 0)
        let r = try KVPackReader(file: MappedFile(copying: bytes))
        #expect(r.recoveryNotes.isEmpty && r.tokenCount == 43, "the commit still loads: tables are checked on first use")
        let q = [Float](repeating: 0.25, count: Self.geometry.groupSize * Self.geometry.headDim)
        // Segments 0, 1 and 3... are intact: a range that avoids segment 2 attends.
        #expect(throws: Never.self) { try r.attend(layer: 1, kvHead: 0, queries: q, tokens: 12 ..< 43) }
        do {
            _ = try r.attend(layer: 0, kvHead: 0, queries: q)
            Issue.record("attention over the damaged segment table did not fail")
        } catch let e as KVPackError {
            #expect(e.code == .checksumMismatch)
            #expect(e.field?.hasPrefix("SEGT") == true, "\(e)")
        }
        #expect(throws: KVPackError.self) { try r.tokens(0 ..< 43) }
        let report = Validator.validate(file: r.file, path: "damaged", deep: true)
        #expect(report.problems.contains { $0.severity == .error && $0.code == "checksumMismatch" && $0.field?.hasPrefix("SEGT") == true },
                "\(report.problems)")

        // A table whose entry names a frame after it (checksums resealed: a lie, not bit rot).
        var lying = fileBytes(path)
        BadInputTests.reseal(&lying, frame: third, salt: 99, payload: { BadInputTests.put(third.offset + 64, at: 8, in: &$0) })
        let l = try KVPackReader(file: MappedFile(copying: lying))
        do {
            _ = try l.attend(layer: 0, kvHead: 0, queries: q)
            Issue.record("a block offset after its table was used")
        } catch let e as KVPackError {
            #expect(e.code == .invalidField && e.field == "SEGT.blockOffset[1]" && e.offset == third.payloadOffset + 8, "\(e)")
        }
    }

    @Test("attention over a cold mapped file (first use prefetches pages) equals attention after it; a bad layer is an error")
    func prefetchedAttention() throws {
        let (path, _) = try Self.write(major: 2)
        let g = Self.geometry
        let q = (0 ..< g.kvHeadCount * g.groupSize * g.headDim).map { Float($0 % 7) * 0.1 - 0.3 }
        var first = [Float](repeating: 0, count: q.count), again = first
        let r = try KVPackReader(path: path)
        try q.withUnsafeBufferPointer { qp in
            try first.withUnsafeMutableBufferPointer { try r.attendLayer(1, queries: qp.baseAddress!, output: $0.baseAddress!, workspaces: [AttentionWorkspace()]) }
            try again.withUnsafeMutableBufferPointer { try r.attendLayer(1, queries: qp.baseAddress!, output: $0.baseAddress!, workspaces: [AttentionWorkspace()]) }
            #expect(throws: KVPackError.self) {
                try first.withUnsafeMutableBufferPointer { try r.attendLayer(2, queries: qp.baseAddress!, output: $0.baseAddress!, workspaces: [AttentionWorkspace()]) }
            }
        }
        #expect(first == again)
        let one = try r.attend(layer: 1, kvHead: 1, queries: Array(q[g.groupSize * g.headDim ..< 2 * g.groupSize * g.headDim]))
        #expect(one == Array(first[g.groupSize * g.headDim ..< 2 * g.groupSize * g.headDim]))
    }
}
