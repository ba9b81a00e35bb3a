import Foundation
import Testing
@testable import KVPack
@testable import KVPackModels

/// `kvpack generate` in separate processes, as a user runs it.
@Suite(.serialized)
struct GenerateCommandTests {
    func tokens(_ stdout: String) -> [Int] {
        stdout.split(whereSeparator: { $0 == "," || $0 == "\n" }).compactMap { Int($0) }
    }

    @Test("one run of 120 tokens equals 50 + exit + resume 70")
    func resumeAcrossProcesses() throws {
        let dir = temporaryDirectory()
        let (s1, o1, e1) = try runKVPack(["generate", "--model", bundledModelPath, "--save", dir + "/a.kvpack", "--steps", "120", "--no-fsync"])
        #expect(s1 == 0, "\(e1)")
        let (s2, o2, _) = try runKVPack(["generate", "--model", bundledModelPath, "--save", dir + "/b.kvpack", "--steps", "50"])
        let (s3, o3, e3) = try runKVPack(["generate", "--resume", dir + "/b.kvpack", "--steps", "70"])
        #expect(s2 == 0 && s3 == 0, "\(e3)")
        #expect(tokens(o1).count == 120)
        #expect(tokens(o2) + tokens(o3) == tokens(o1))
        #expect(fileBytes(dir + "/a.kvpack").count > 0)
        let a = try KVPackReader(path: dir + "/a.kvpack"), b = try KVPackReader(path: dir + "/b.kvpack")
        #expect(try a.tokenIDs == b.tokenIDs)
        #expect(try a.decode(layer: 4, kvHead: 2, kind: .key) == b.decode(layer: 4, kvHead: 2, kind: .key))
    }

    @Test("--json reports each step's margin and runner-up; --follow feeds given tokens and reports the model's own choices")
    func marginsAndFollow() throws {
        let dir = temporaryDirectory()
        struct Summary: Decodable { var generated: [Int]; var margins: [Float]; var runnersUp: [Int]; var totalTokens: Int }
        let (s1, o1, e1) = try runKVPack(["generate", "--model", bundledModelPath, "--save", dir + "/a.kvpack", "--steps", "12", "--json", "--no-fsync"])
        try #require(s1 == 0, "\(e1)")
        let free = try JSONDecoder().decode(Summary.self, from: Data(o1.utf8))
        #expect(free.generated.count == 12 && free.margins.count == 12 && free.runnersUp.count == 12)
        #expect(free.margins.allSatisfy { $0 >= 0 } && zip(free.generated, free.runnersUp).allSatisfy { $0 != $1 })
        // Fed its own greedy tokens, the model chooses them again with the same margins.
        let ids = free.generated.map(String.init).joined(separator: ",")
        let (s2, o2, e2) = try runKVPack(["generate", "--model", bundledModelPath, "--save", dir + "/b.kvpack", "--follow", ids, "--json", "--no-fsync"])
        try #require(s2 == 0, "\(e2)")
        let forced = try JSONDecoder().decode(Summary.self, from: Data(o2.utf8))
        #expect(forced.generated == free.generated && forced.margins == free.margins && forced.runnersUp == free.runnersUp)
        // Fed other tokens, it still reports its own choice at each step (the first one is unchanged).
        let other = free.generated.map { String(($0 + 7) % 512) }.joined(separator: ",")
        let (s3, o3, e3) = try runKVPack(["generate", "--model", bundledModelPath, "--save", dir + "/c.kvpack", "--follow", other, "--json", "--no-fsync"])
        try #require(s3 == 0, "\(e3)")
        let steered = try JSONDecoder().decode(Summary.self, from: Data(o3.utf8))
        #expect(steered.generated.first == free.generated.first && steered.generated != free.generated)
        let fed = try KVPackReader(path: dir + "/c.kvpack").tokenIDs.dropFirst().map { Int($0) }
        #expect(steered.totalTokens == 13 && fed == free.generated.map { ($0 + 7) % 512 })
    }

    @Test("resuming with a different model fails clearly and leaves the file untouched")
    func differentModel() throws {
        let dir = temporaryDirectory()
        var weights = fileBytes(bundledModelPath)
        weights[5000] ^= 0x01  // one weight bit: same geometry, different model
        writeBytes(weights, to: dir + "/other.bin")
        let (s1, _, _) = try runKVPack(["generate", "--model", bundledModelPath, "--save", dir + "/c.kvpack", "--steps", "20"])
        #expect(s1 == 0)
        let before = fileBytes(dir + "/c.kvpack")
        let (s2, _, err) = try runKVPack(["generate", "--resume", dir + "/c.kvpack", "--model", dir + "/other.bin", "--steps", "5"])
        #expect(s2 != 0)
        #expect(err.contains("different model") && err.contains("fingerprint") && err.contains("not modified"), "\(err)")
        #expect(fileBytes(dir + "/c.kvpack") == before)
    }

    @Test("a resumed run killed mid-turn reopens at its last commit and resumes again")
    func killedResume() throws {
        let dir = temporaryDirectory()
        let path = dir + "/k.kvpack"
        // The uninterrupted conversation, in-process: the file must always hold a prefix of it.
        let reference = try Conversation.start(path: dir + "/ref.kvpack", model: bundledModel,
                                               spec: try SchemeSpec.parse("raw:f16", geometry: bundledModel.config.geometry),
                                               segmentTokens: 64, prompt: [1], options: testOptions())
        var sampler = Sampler()
        let expected = [1] + (try reference.generate(steps: 440, sampler: &sampler))
        try reference.close()

        let (s0, _, _) = try runKVPack(["generate", "--model", bundledModelPath, "--save", path, "--steps", "10"])
        #expect(s0 == 0)
        let child = Process()
        child.executableURL = URL(fileURLWithPath: kvpackBinary)
        child.arguments = ["generate", "--resume", path, "--steps", "420", "--commit-every", "5", "--no-fsync"]
        let out = Pipe()
        child.standardOutput = out
        child.standardError = FileHandle.nullDevice
        try child.run()
        var printed = 0
        while printed < 90 {
            let data = out.fileHandleForReading.availableData
            if data.isEmpty { break }
            printed += data.filter { $0 == UInt8(ascii: ",") }.count
        }
        kill(child.processIdentifier, SIGKILL)
        child.waitUntilExit()
        #expect(child.terminationReason == .uncaughtSignal)

        let r = try KVPackReader(path: path)
        let n = r.tokenCount
        #expect(n >= 11 && n < 431)
        #expect((n - 11) % 5 == 0 || n % 64 == 0, "\(n) tokens is not a commit point")
        #expect(try r.tokenIDs.map { Int($0) } == Array(expected.prefix(n)))
        #expect(Validator.validate(file: r.file, path: path, deep: true).isValid)

        let (s2, o2, e2) = try runKVPack(["generate", "--resume", path, "--steps", "10"])
        #expect(s2 == 0, "\(e2)")
        #expect(tokens(o2) == Array(expected[n ..< n + 10]))
    }
}
