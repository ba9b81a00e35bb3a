import Foundation
import Testing
@testable import KVPack
@testable import KVPackModels

/// `kvpack chat` as a daily tool, with the real SmolLM2 (skipped when `make models` has not run).
@Suite(.serialized, .enabled(if: !smolLM2Missing, Comment(rawValue: smolLM2SkipNote)))
struct ChatToolTests {
    static let messages = ["Give me two tips for sleeping better.", "Which one is easier?", "Write one sentence about the sea."]

    func replies(_ json: String) throws -> [[Int]] {
        struct Turn: Decodable { var replyTokens: [Int] }
        struct Summary: Decodable { var turns: [Turn] }
        return try JSONDecoder().decode(Summary.self, from: Data(json.utf8)).turns.map(\.replyTokens)
    }

    @Test("any sampler: two turns in one process give the same tokens as the same turns across two processes",
          arguments: [["--temperature", "0.9", "--top-k", "0", "--top-p", "1", "--min-p", "0", "--seed", "7"],
                      ["--temperature", "1.2", "--top-k", "20", "--top-p", "0.8", "--min-p", "0.02", "--repeat-penalty", "1.3",
                       "--presence-penalty", "0.5", "--frequency-penalty", "0.1", "--penalty-last-n", "32", "--dry-multiplier", "0.8",
                       "--dry-allowed-length", "3", "--seed", "3"]])
    func samplingIsExactAcrossResume(sampling: [String]) throws {
        let dir = temporaryDirectory()
        let common = ["--max-tokens", "40", "--no-fsync", "--json", "--scheme", "int:k4v2:kc64"] + sampling
        let (s1, o1, e1) = try runKVPack(["chat", "--save", dir + "/one.kvpack"] + common + Self.messages.prefix(2).flatMap { ["--message", $0] })
        try #require(s1 == 0, "\(e1)")
        let (s2, o2, e2) = try runKVPack(["chat", "--save", dir + "/two.kvpack", "--message", Self.messages[0]] + common)
        try #require(s2 == 0, "\(e2)")
        let (s3, o3, e3) = try runKVPack(["chat", "--resume", dir + "/two.kvpack", "--message", Self.messages[1]] + common)
        try #require(s3 == 0, "\(e3)")
        let one = try replies(o1), two = try replies(o2) + replies(o3)
        #expect(one == two)
        #expect(one.allSatisfy { !$0.isEmpty })
        // A different seed changes the draw (these settings leave many tokens in play).
        let (s4, o4, _) = try runKVPack(["chat", "--save", dir + "/other.kvpack", "--message", Self.messages[0]] + common + ["--seed", "99"])
        try #require(s4 == 0)
        #expect(try replies(o4)[0] != one[0])
    }

    @Test("the chat shifts its context in its own file: kept tokens renumbered from 0, recorded, valid and resumable")
    func contextShift() throws {
        let dir = temporaryDirectory()
        let path = dir + "/long.kvpack"
        let args = ["--context", "192", "--max-tokens", "40", "--temperature", "0", "--no-fsync"]
        let (s, o, e) = try runKVPack(["chat", "--save", path, "--json"] + args + Self.messages.flatMap { ["--message", $0] } + ["--message", "Thank you."])
        try #require(s == 0, "\(e)")
        struct Shrink: Decodable { var before: Int; var kept: Int; var sinkTokens: Int }
        struct Turn: Decodable { var shrink: Shrink? }
        struct Summary: Decodable { var turns: [Turn]; var totalTokens: Int }
        let summary = try JSONDecoder().decode(Summary.self, from: Data(o.utf8))
        let shifts = summary.turns.compactMap(\.shrink)
        try #require(!shifts.isEmpty, "no context shift happened in \(summary.totalTokens) tokens")
        let reader = try KVPackReader(path: path)
        let (ids, positions) = try reader.tokens(0 ..< reader.tokenCount)
        #expect(positions == (0 ..< UInt32(ids.count)).map { $0 })
        #expect(ids.count <= 192)
        #expect(reader.manifest.metadata("chat.shrink.1.kept")?.hasPrefix("\(shifts[0].kept) of \(shifts[0].before) tokens") == true)
        #expect(reader.manifest.metadata("chat.shrink.1.policy")?.hasPrefix("recent") == true)
        // The system message (the first message) is kept whole, and the transcript is whole messages.
        let m = try #require(smolLM2)
        let template = try ChatTemplate(model: m)
        let text = template.tokenizer.decode(ids.map { Int($0) })
        #expect(text.hasPrefix("<|im_start|>system\n\(template.defaultSystem!)<|im_end|>\n<|im_start|>"))
        #expect(text.hasSuffix("<|im_end|>\n"))
        #expect(try reader.tokenSelection()?.keptCount == shifts.last!.kept)
        let (sv, _, ev) = try runKVPack(["validate", path, "--deep"])
        #expect(sv == 0, "\(ev)")
        let (sr, _, er) = try runKVPack(["chat", "--resume", path, "--message", "Goodbye."] + args)
        #expect(sr == 0, "\(er)")
        // Without room even after a shift, the turn is refused with a message and the file is kept.
        let before = try Data(contentsOf: URL(fileURLWithPath: path))
        let (sf, _, ef) = try runKVPack(["chat", "--resume", path, "--message", "Hi", "--context", "64", "--max-tokens", "60", "--temperature", "0"])
        #expect(sf != 0 && ef.contains("too little is left"), "\(ef)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: path)) == before)
    }

    @Test("Ctrl-C (SIGINT) mid-reply keeps the partial reply, closed and committed; the file validates and resumes")
    func interruptMidReply() throws {
        let dir = temporaryDirectory()
        let path = dir + "/story.kvpack", outPath = dir + "/stdout.txt"
        _ = FileManager.default.createFile(atPath: outPath, contents: nil)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: kvpackBinary)
        p.arguments = ["chat", "--save", path, "--message", "Write a long story about a dragon who learns to fly.", "--max-tokens", "400",
                       "--temperature", "0", "--no-fsync"]
        p.standardOutput = try FileHandle(forWritingTo: URL(fileURLWithPath: outPath))
        p.standardError = FileHandle.nullDevice
        try p.run()
        // Wait until the reply is streaming, then interrupt it.
        let deadline = Date().addingTimeInterval(120)
        while (try? FileManager.default.attributesOfItem(atPath: outPath)[.size] as? Int) ?? 0 < 40, p.isRunning, Date() < deadline {
            usleep(20_000)
        }
        try #require(p.isRunning, "the chat ended before it could be interrupted")
        p.interrupt()
        p.waitUntilExit()
        #expect(p.terminationReason == .exit && p.terminationStatus == 130)
        let streamed = try String(contentsOfFile: outPath, encoding: .utf8)
        let reader = try KVPackReader(path: path)
        let m = try #require(smolLM2)
        let template = try ChatTemplate(model: m)
        let text = template.tokenizer.decode(try reader.tokenIDs.map { Int($0) })
        let reply = try #require(text.components(separatedBy: "<|im_start|>assistant\n").last)
        #expect(reply.hasSuffix("<|im_end|>\n"))
        let replyText = String(reply.dropLast("<|im_end|>\n".count))
        #expect(!replyText.isEmpty && streamed.hasPrefix(replyText.prefix(20)))
        #expect(template.tokenizer.encode(replyText).count < 400)
        let (sv, _, ev) = try runKVPack(["validate", path, "--deep"])
        #expect(sv == 0, "\(ev)")
        let (sr, o, er) = try runKVPack(["chat", "--resume", path, "--message", "Thanks!", "--max-tokens", "8", "--temperature", "0", "--no-fsync"])
        #expect(sr == 0 && !o.isEmpty, "\(er)")
    }

    @Test("a GGUF whose chat template is not ChatML is refused with a message naming it")
    func unknownTemplate() throws {
        let dir = temporaryDirectory()
        var bytes = try Data(contentsOf: URL(fileURLWithPath: ModelLocator.smolLM2Path))
        // Same-length edits inside tokenizer.chat_template's value: no ChatML markers remain.
        let key = Data("tokenizer.chat_template".utf8)
        let keyAt = try #require(bytes.range(of: key))
        let length = Int(bytes[keyAt.upperBound + 4 ..< keyAt.upperBound + 12].withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) })
        let value = keyAt.upperBound + 12 ..< keyAt.upperBound + 12 + length
        let edited = String(decoding: bytes[value], as: UTF8.self)
            .replacingOccurrences(of: "<|im_start|>", with: "[INST]<<<<<<").replacingOccurrences(of: "<|im_end|>", with: "[/INST]>>>")
        try #require(edited.utf8.count == length)
        bytes.replaceSubrange(value, with: Data(edited.utf8))
        let model = dir + "/other-template.gguf"
        try bytes.write(to: URL(fileURLWithPath: model))
        let (s, _, e) = try runKVPack(["chat", "--model", model, "--save", dir + "/x.kvpack", "--message", "hi"])
        #expect(s != 0 && e.contains("is not ChatML (Llama 2 / Mistral [INST] style)"), "\(e)")
        #expect(!FileManager.default.fileExists(atPath: dir + "/x.kvpack"))
    }

    @Test("SmolLM2's defaults: its model card's temperature and top-p, with the measured repetition penalty and DRY")
    func smolLM2Defaults() throws {
        let m = try #require(smolLM2)
        let (s, source) = SamplerSettings.defaults(for: m.weights)
        #expect(s == SamplerSettings(temperature: 0.2, topK: 40, topP: 0.9, minP: 0.05, repeatPenalty: 1.1, dryMultiplier: 0.8))
        #expect(source.contains("SmolLM2"))
    }
}
