import Foundation
import Testing
@testable import KVPack

/// A writer process killed with SIGKILL at several points leaves a file that opens, validates,
/// holds exactly the tokens of a commit at or after the last one it acknowledged, and accepts
/// appends.
@Suite(.serialized)
struct CrashTests {
    static let commitEvery = 7
    static let seed: UInt64 = 99

    /// (acknowledged commits to wait for, microseconds to let the child run on after that)
    static let killPoints: [(Int, UInt32)] = [(1, 0), (2, 150), (3, 900), (6, 40), (11, 2500), (17, 300), (25, 0), (40, 5000)]

    @Test("SIGKILL mid-append: reopen at the last commit, validate, resume", arguments: 0 ..< killPoints.count)
    func killedWriter(point: Int) throws {
        let (acks, extraMicros) = Self.killPoints[point]
        let dir = temporaryDirectory()
        let path = dir + "/crash.kvpack"
        let child = Process()
        child.executableURL = URL(fileURLWithPath: kvpackBinary)
        // f32 so the content can be compared bit for bit with the generator; segments of 16 and
        // batches of 5 put seals, deltas and index frames at every phase of a commit.
        child.arguments = ["synth", path, "--model", "stories260k", "--tokens", "200000", "--segment-tokens", "16",
                           "--scheme", point % 2 == 0 ? "raw:f32" : "raw:f32:zstd", "--batch", "5",
                           "--commit-every", String(Self.commitEvery), "--seed", String(Self.seed), "--print-commits"]
        let out = Pipe()
        child.standardOutput = out
        child.standardError = FileHandle.nullDevice
        try child.run()
        var acknowledged = 0
        var seen = 0
        var buffer = ""
        while seen < acks {
            let data = out.fileHandleForReading.availableData
            if data.isEmpty { break }
            buffer += String(decoding: data, as: UTF8.self)
            while let nl = buffer.firstIndex(of: "\n") {
                let line = buffer[..<nl]
                buffer.removeSubrange(...nl)
                if line.hasPrefix("committed "), let n = Int(line.dropFirst(10)) {
                    acknowledged = n
                    seen += 1
                }
            }
        }
        if extraMicros > 0 { usleep(extraMicros) }
        kill(child.processIdentifier, SIGKILL)
        child.waitUntilExit()
        #expect(child.terminationReason == .uncaughtSignal, "the writer must still have been running when killed")
        #expect(seen >= acks)

        let reader = try KVPackReader(path: path)
        let n = reader.tokenCount
        #expect(n >= acknowledged, "lost an acknowledged commit: file has \(n), child acknowledged \(acknowledged)")
        #expect(n % Self.commitEvery == 0, "\(n) tokens is not a commit point")
        let report = Validator.validate(file: reader.file, path: path, deep: true)
        #expect(report.isValid, "\(report.problems)")
        try expectSyntheticContent(reader, tokens: 0 ..< n)

        // Appending resumes: add tokens from the same generator and check the whole file.
        let writer = try KVPackWriter.resume(path: path, options: testOptions())
        let gen = SyntheticKV(geometry: reader.geometry, rope: reader.manifest.rope, seed: Self.seed)
        try appendSynthetic(writer, gen: gen, tokens: n ..< n + 23)
        try writer.close()
        let resumed = try KVPackReader(path: path)
        #expect(resumed.tokenCount == n + 23)
        #expect(resumed.recoveryNotes.isEmpty, "resume truncates uncommitted bytes: \(resumed.recoveryNotes)")
        #expect(Validator.validate(file: resumed.file, path: path, deep: true).problems.isEmpty)
        try expectSyntheticContent(resumed, tokens: 0 ..< n + 23)
    }
}

func appendSynthetic(_ writer: KVPackWriter, gen: SyntheticKV, tokens: Range<Int>) throws {
    let g = gen.geometry
    let per = g.layerCount * g.kvHeadCount * g.headDim
    var keys = [Float](repeating: 0, count: per), values = keys
    for t in tokens {
        keys.withUnsafeMutableBufferPointer { k in
            values.withUnsafeMutableBufferPointer { v in gen.token(t, position: t, keys: k.baseAddress!, values: v.baseAddress!) }
        }
        try writer.append(tokenIDs: [gen.tokenID(t)], keys: keys, values: values, layout: .layerTokenHead(g, tokens: 1))
    }
}

/// Every stream of `reader` equals the synthetic generator's output, bit for bit.
func expectSyntheticContent(_ reader: KVPackReader, tokens: Range<Int>, seed: UInt64 = CrashTests.seed) throws {
    let gen = SyntheticKV(geometry: reader.geometry, rope: reader.manifest.rope, seed: seed)
    #expect(try gen.mismatches(in: reader, tokens: tokens) == 0)
}
