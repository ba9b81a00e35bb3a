import ArgumentParser
import Foundation
import KVPack
import KVPackLab

/// Hardening harnesses with counts to record (FUZZING.md): kill a writer anywhere, tear its last
/// writes, rot its bits.
struct TortureCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "torture",
        abstract: "Crash, tear and corrupt .kvpack files on purpose and check that nothing committed is lost and nothing is misread.",
        discussion: """
        kill     runs `kvpack synth` writers in child processes and SIGKILLs each at a random moment (after a random number of acknowledged commits plus a random delay): across appends, block seals, tail runs, index frames and commits. Every file must open, validate, hold exactly the tokens of a commit at or after the last one the child acknowledged (bit for bit, for the lossless schemes), and accept appends that again validate.
        torn     writes a small file and truncates it at every byte offset of its last frames (a torn write of each): every cut must open at a commit point with exactly that commit's content, or be refused with a KVPackError.
        bitrot   flips bits of a file (every bit of a small one, or --flips random bits of a larger one) and counts how each flip was caught: by validate (checksums, structure), or harmless (padding no checksum covers, content unchanged). A flip that changes what the reader returns without being reported is a failure.
        Exit status 0 when every case passed; the counts are printed (or --json).
        """,
        subcommands: [Kill.self, Torn.self, BitRot.self])

    /// Path of this executable, for child writers.
    static var executable: String {
        (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
    }

    static let commitEvery = 7
    static let preset = ModelPreset.named("stories260k")!

    struct Kill: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "SIGKILL writers at random points; check every file.")
        @Option(help: "Kill points.") var points = 200
        @Option(help: "Seed of the kill points.") var seed: UInt64 = 1
        @Option(help: "Directory for the files (default: a temporary one, removed).") var keep: String?
        @Flag(help: "Print the counts as JSON.") var json = false

        struct Result: Encodable {
            var points = 0, passed = 0, killedWhileWriting = 0, lostCommits = 0, notACommitPoint = 0, invalid = 0, wrongContent = 0, appendFailed = 0
            var schemes: [String: Int] = [:]
            var tokensMin = Int.max, tokensMax = 0
            var seconds = 0.0
        }

        func run() throws {
            var rng = SplitMix64(seed: seed)
            var result = Result()
            let start = Date()
            let schemes = ["raw:f32", "raw:f32:zstd", "int:k4v2", "raw:bf16"]
            try withWorkDirectory(keep: keep, prefix: "kvpack-torture") { dir in
                for point in 0 ..< points {
                    let scheme = schemes[Int(rng.next() % UInt64(schemes.count))]
                    let acks = 1 + Int(rng.next() % 40)
                    let extra = UInt32(rng.next() % 6000)
                    let fsync = rng.next() % 4 == 0
                    let path = "\(dir)/kill-\(point).kvpack"
                    let outcome = try killOnce(path: path, scheme: scheme, acks: acks, extraMicros: extra, fsync: fsync, seed: UInt64(point) &+ seed)
                    result.points += 1
                    result.schemes[scheme, default: 0] += 1
                    if outcome.killedWhileWriting { result.killedWhileWriting += 1 }
                    if let problem = outcome.problem {
                        switch problem {
                        case .lost: result.lostCommits += 1
                        case .notCommitPoint: result.notACommitPoint += 1
                        case .invalid: result.invalid += 1
                        case .content: result.wrongContent += 1
                        case .append: result.appendFailed += 1
                        }
                        printError("torture kill: point \(point) (\(scheme), \(acks) acks + \(extra) us): \(outcome.detail)")
                    } else {
                        result.passed += 1
                        try? FileManager.default.removeItem(atPath: path)
                    }
                    result.tokensMin = min(result.tokensMin, outcome.tokens)
                    result.tokensMax = max(result.tokensMax, outcome.tokens)
                    if !json, (point + 1) % 50 == 0 { printError("torture kill: \(point + 1)/\(points) points, \(result.passed) passed") }
                }
            }
            result.seconds = Date().timeIntervalSince(start)
            if json { try printJSON(result) } else {
                print("kill points: \(result.points), passed \(result.passed) (writer still running when killed: \(result.killedWhileWriting))")
                print("failures: lost commit \(result.lostCommits), not a commit point \(result.notACommitPoint), invalid \(result.invalid), wrong content \(result.wrongContent), append failed \(result.appendFailed)")
                print("schemes: " + result.schemes.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))
                print("surviving files held \(result.tokensMin)...\(result.tokensMax) tokens; \(String(format: "%.1f", result.seconds)) s")
            }
            if result.passed != result.points { throw ExitCode(1) }
        }

        enum Problem { case lost, notCommitPoint, invalid, content, append }

        func killOnce(path: String, scheme: String, acks: Int, extraMicros: UInt32, fsync: Bool, seed: UInt64)
            throws -> (killedWhileWriting: Bool, tokens: Int, problem: Problem?, detail: String) {
            let child = Process()
            child.executableURL = URL(fileURLWithPath: TortureCommand.executable)
            child.arguments = ["synth", path, "--model", "stories260k", "--tokens", "100000", "--segment-tokens", "16",
                               "--scheme", scheme, "--batch", "5", "--commit-every", String(TortureCommand.commitEvery),
                               "--seed", String(seed), "--print-commits"] + (fsync ? ["--fsync"] : [])
            let out = Pipe()
            child.standardOutput = out
            child.standardError = FileHandle.nullDevice
            try child.run()
            var acknowledged = 0, seen = 0
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
            let killed = child.terminationReason == .uncaughtSignal
            let reader: KVPackReader
            do { reader = try KVPackReader(path: path) } catch {
                return (killed, 0, .invalid, "does not open: \(error)")
            }
            let n = reader.tokenCount
            if n < acknowledged { return (killed, n, .lost, "holds \(n) tokens, the child acknowledged \(acknowledged)") }
            if n % TortureCommand.commitEvery != 0 && killed { return (killed, n, .notCommitPoint, "\(n) tokens is not a commit point") }
            let report = Validator.validate(file: reader.file, path: path, deep: true)
            if !report.isValid { return (killed, n, .invalid, "\(report.problems.map(\.description))") }
            let gen = SyntheticKV(geometry: reader.geometry, rope: reader.manifest.rope, seed: seed)
            if scheme.hasPrefix("raw:f32") {
                let bad = try gen.mismatches(in: reader, tokens: 0 ..< n)
                if bad > 0 { return (killed, n, .content, "\(bad) elements differ from what the writer appended") }
            } else if try zip(reader.tokenIDs, (0 ..< n).map(gen.tokenID)).contains(where: { $0 != $1 }) {
                return (killed, n, .content, "token ids differ from what the writer appended")
            }
            // The file accepts appends, and the result validates.
            do {
                let writer = try KVPackWriter.resume(path: path, options: { var o = WriterOptions(); o.durability = .flush; return o }())
                try TortureCommand.append(writer, gen, tokens: n ..< n + 11)
                try writer.close()
                let grown = try KVPackReader(path: path)
                guard grown.tokenCount == n + 11, Validator.validate(file: grown.file, path: path, deep: true).problems.isEmpty else {
                    return (killed, n, .append, "after appending 11 tokens: \(grown.tokenCount) tokens, problems \(Validator.validate(file: grown.file, path: path).problems.map(\.description))")
                }
                if scheme.hasPrefix("raw:f32"), try gen.mismatches(in: grown, tokens: 0 ..< n + 11) > 0 {
                    return (killed, n, .append, "appended content differs")
                }
            } catch {
                return (killed, n, .append, "append failed: \(error)")
            }
            return (killed, n, nil, "")
        }
    }

    /// A small file with several commits, sealed blocks and tail runs, written by the generator.
    static func smallFile(_ path: String, scheme: String, tokens: Int, seed: UInt64) throws -> SyntheticKV {
        var g = preset.geometry
        g.layerCount = 2
        var file = NewFile(geometry: g, rope: preset.rope, schemes: try SchemeSpec.parse(scheme, geometry: g), producer: "kvpack torture")
        file.segmentTokens = 8
        file.maxPositions = preset.maxPositions
        var options = WriterOptions()
        options.durability = .flush
        options.overwrite = true
        options.salt = 0x7041
        let writer = try KVPackWriter.create(path: path, file: file, options: options)
        let gen = SyntheticKV(geometry: g, rope: preset.rope, seed: seed)
        try append(writer, gen, tokens: 0 ..< tokens, commitEvery: 5)
        try writer.close()
        return gen
    }

    /// Appends the generator's tokens one at a time (positions = indices), committing after
    /// every `commitEvery`-th.
    static func append(_ writer: KVPackWriter, _ gen: SyntheticKV, tokens: Range<Int>, commitEvery: Int = 0) throws {
        let g = gen.geometry
        let per = g.layerCount * g.kvHeadCount * g.headDim
        var keys = [Float](repeating: 0, count: per), values = keys
        for t in tokens {
            keys.withUnsafeMutableBufferPointer { k in
                values.withUnsafeMutableBufferPointer { v in gen.token(t, position: t, keys: k.baseAddress!, values: v.baseAddress!) }
            }
            try writer.append(tokenIDs: [gen.tokenID(t)], keys: keys, values: values, layout: .layerTokenHead(g, tokens: 1))
            if commitEvery > 0, t % commitEvery == commitEvery - 1 { try writer.commit() }
        }
    }

    /// Token ids, positions and every decoded value's bits, or nil when the bytes do not open or decode.
    static func content(_ file: MappedFile) -> [[UInt32]]? {
        guard let r = try? KVPackReader(file: file), let tokens = try? r.tokens(0 ..< r.tokenCount) else { return nil }
        var out = [tokens.ids, tokens.positions]
        for l in 0 ..< r.geometry.layerCount {
            for h in 0 ..< r.geometry.kvHeadCount {
                for kind in KVKind.allCases {
                    guard let v = try? r.decode(layer: l, kvHead: h, kind: kind) else { return nil }
                    out.append(v.map(\.bitPattern))
                }
            }
        }
        return out
    }

    struct Torn: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Truncate a small file at every byte offset of its last frames.")
        @Option(help: "Bytes from the end of the file to cut through (0: every offset of the file).") var bytes = 0
        @Option(help: "Scheme of the file.") var scheme = "raw:f16"
        @Flag(help: "Print the counts as JSON.") var json = false

        struct Result: Encodable {
            var fileBytes = 0, cuts = 0, openedAtCommit = 0, refused = 0, failures = 0
            var commitsSeen: [Int] = []
        }

        func run() throws {
            let path = NSTemporaryDirectory() + "kvpack-torn-\(getpid()).kvpack"
            defer { unlink(path) }
            _ = try TortureCommand.smallFile(path, scheme: scheme, tokens: 43, seed: 5)
            let original = [UInt8](FileManager.default.contents(atPath: path)!)
            // The content of every commit: open each prefix ending right after a CMIT frame.
            var result = Result(fileBytes: original.count)
            var byCount: [Int: [[UInt32]]] = [:]
            let full = MappedFile(copying: original)
            if let c = TortureCommand.content(full) { byCount[(try KVPackReader(file: full)).tokenCount] = c }
            var commits = Set<Int>()
            let from = bytes > 0 ? max(64, original.count - bytes) : 64
            for cut in from ..< original.count {
                result.cuts += 1
                let file = MappedFile(copying: Array(original[..<cut]))
                guard let reader = try? KVPackReader(file: file) else {
                    result.refused += 1
                    continue
                }
                let n = reader.tokenCount
                commits.insert(n)
                guard n % 5 == 0 || n == 43, let c = TortureCommand.content(file) else {
                    result.failures += 1
                    printError("torture torn: cut at \(cut) opens with \(n) tokens, not a commit point, or does not decode")
                    continue
                }
                if let known = byCount[n], known != c {
                    result.failures += 1
                    printError("torture torn: cut at \(cut): the commit of \(n) tokens reads differently from the intact file's")
                    continue
                }
                // Content must be a prefix of the full file's content.
                if let whole = byCount[43], zip(c[0], whole[0]).contains(where: { $0 != $1 }) {
                    result.failures += 1
                    continue
                }
                byCount[n] = c
                result.openedAtCommit += 1
            }
            result.commitsSeen = commits.sorted()
            if json { try printJSON(result) } else {
                print("torn writes: \(result.cuts) cuts, at every byte offset from \(from) to the end of a \(result.fileBytes)-byte file")
                print("opened at a commit with that commit's content: \(result.openedAtCommit); refused with a KVPackError: \(result.refused); failures: \(result.failures)")
                print("commits reached: \(result.commitsSeen.map(String.init).joined(separator: ", ")) tokens")
            }
            if result.failures > 0 { throw ExitCode(1) }
        }
    }

    struct BitRot: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "bitrot", abstract: "Flip bits and count how each flip is caught.")
        @Option(help: "Random flips (0: every bit of the file).") var flips = 0
        @Option(help: "Tokens of the generated file.") var tokens = 43
        @Option(help: "Scheme of the generated file.") var scheme = "raw:f16"
        @Option(help: "Seed of the flip positions.") var seed: UInt64 = 1
        @Flag(help: "Print the counts as JSON.") var json = false

        struct Result: Encodable {
            var fileBytes = 0, flips = 0, reportedByValidate = 0, harmless = 0, silentlyWrong = 0
        }

        func run() throws {
            let path = NSTemporaryDirectory() + "kvpack-bitrot-\(getpid()).kvpack"
            defer { unlink(path) }
            _ = try TortureCommand.smallFile(path, scheme: scheme, tokens: tokens, seed: 9)
            var bytes = [UInt8](FileManager.default.contents(atPath: path)!)
            let truth = TortureCommand.content(MappedFile(copying: bytes))
            var result = Result(fileBytes: bytes.count)
            var rng = SplitMix64(seed: seed)
            let total = flips > 0 ? flips : bytes.count * 8
            for i in 0 ..< total {
                let bit = flips > 0 ? Int(rng.next() % UInt64(bytes.count * 8)) : i
                bytes[bit / 8] ^= UInt8(1 << (bit % 8))
                defer { bytes[bit / 8] ^= UInt8(1 << (bit % 8)) }
                result.flips += 1
                let file = MappedFile(copying: bytes)
                if !Validator.validate(file: file, path: "flip", deep: true).problems.isEmpty {
                    result.reportedByValidate += 1
                } else if TortureCommand.content(file) == truth {
                    result.harmless += 1
                } else {
                    result.silentlyWrong += 1
                    printError("torture bitrot: bit \(bit) (byte \(bit / 8)) changed what the reader returns without a report")
                }
                if !json, flips > 0, (i + 1) % 5000 == 0 { printError("torture bitrot: \(i + 1)/\(total)") }
            }
            if json { try printJSON(result) } else {
                print("bit flips: \(result.flips) over a \(result.fileBytes)-byte \(scheme) file (\(flips > 0 ? "random bits" : "every bit"))")
                print("reported by validate: \(result.reportedByValidate); harmless (padding, content unchanged): \(result.harmless); silently wrong: \(result.silentlyWrong)")
            }
            if result.silentlyWrong > 0 { throw ExitCode(1) }
        }
    }
}
