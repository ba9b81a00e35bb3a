import Foundation
import KVPack

/// The hardening harnesses behind `kvpack torture` (counts recorded in FUZZING.md): writers killed
/// anywhere, files torn at every byte, bits rotted. Lab code: it spawns processes and holds whole
/// files in memory, which the shipped library never does.
public enum Torture {
    /// Commits between acknowledgements in the kill harness's writers.
    public static let commitEvery = 7
    public static let preset = ModelPreset.named("stories260k")!

    // MARK: Kill

    public struct KillResult: Codable, Sendable {
        public var points = 0, passed = 0, killedWhileWriting = 0, lostCommits = 0, notACommitPoint = 0, invalid = 0, wrongContent = 0, appendFailed = 0
        public var schemes: [String: Int] = [:]
        public var tokensMin = Int.max, tokensMax = 0
        public var seconds = 0.0
    }

    enum Problem { case lost, notCommitPoint, invalid, content, append }

    /// Runs `points` `synth` writers (`executable` is the kvpack binary) in `directory`, SIGKILLs
    /// each after a random number of acknowledged commits plus a random delay, and checks every
    /// file. `report` receives a line per failure and progress lines.
    public static func kill(points: Int, seed: UInt64, executable: String, directory: String,
                            report: (String) -> Void) throws -> KillResult {
        var rng = SplitMix64(seed: seed)
        var result = KillResult()
        let start = Date()
        let schemes = ["raw:f32", "raw:f32:zstd", "int:k4v2", "raw:bf16"]
        for point in 0 ..< points {
            let scheme = schemes[Int(rng.next() % UInt64(schemes.count))]
            let acks = 1 + Int(rng.next() % 40)
            let extra = UInt32(rng.next() % 6000)
            let fsync = rng.next() % 4 == 0
            let path = "\(directory)/kill-\(point).kvpack"
            let outcome = try killOnce(executable: executable, path: path, scheme: scheme, acks: acks, extraMicros: extra, fsync: fsync,
                                       seed: UInt64(point) &+ seed)
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
                report("torture kill: point \(point) (\(scheme), \(acks) acks + \(extra) us): \(outcome.detail)")
            } else {
                result.passed += 1
                try? FileManager.default.removeItem(atPath: path)
            }
            result.tokensMin = min(result.tokensMin, outcome.tokens)
            result.tokensMax = max(result.tokensMax, outcome.tokens)
            if (point + 1) % 50 == 0 { report("torture kill: \(point + 1)/\(points) points, \(result.passed) passed") }
        }
        result.seconds = Date().timeIntervalSince(start)
        return result
    }

    static func killOnce(executable: String, path: String, scheme: String, acks: Int, extraMicros: UInt32, fsync: Bool, seed: UInt64)
        throws -> (killedWhileWriting: Bool, tokens: Int, problem: Problem?, detail: String) {
        let child = Process()
        child.executableURL = URL(fileURLWithPath: executable)
        child.arguments = ["synth", path, "--model", "stories260k", "--tokens", "100000", "--segment-tokens", "16",
                           "--scheme", scheme, "--batch", "5", "--commit-every", String(commitEvery),
                           "--seed", String(seed), "--print-commits"] + (fsync ? ["--fsync"] : [])
        let out = Pipe()
        child.standardOutput = out
        child.standardError = FileHandle.nullDevice
        try child.run()
        var acknowledged = 0, seen = 0
        var lines = CommitAnnouncements(out.fileHandleForReading)
        while seen < acks, let n = lines.next() {
            acknowledged = n
            seen += 1
        }
        if extraMicros > 0 { usleep(extraMicros) }
        Foundation.kill(child.processIdentifier, SIGKILL)
        child.waitUntilExit()
        let killed = child.terminationReason == .uncaughtSignal
        let reader: KVPackReader
        do { reader = try KVPackReader(path: path) } catch {
            return (killed, 0, .invalid, "does not open: \(error)")
        }
        let n = reader.tokenCount
        if n < acknowledged { return (killed, n, .lost, "holds \(n) tokens, the child acknowledged \(acknowledged)") }
        if n % commitEvery != 0 && killed { return (killed, n, .notCommitPoint, "\(n) tokens is not a commit point") }
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
            var options = WriterOptions()
            options.durability = .flush
            let writer = try KVPackWriter.resume(path: path, options: options)
            try append(writer, gen, tokens: n ..< n + 11)
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

    // MARK: Torn writes

    public struct TornResult: Codable, Sendable {
        public var fileBytes = 0, cuts = 0, openedAtCommit = 0, refused = 0, failures = 0
        public var commitsSeen: [Int] = []
        /// The first offset cut at.
        public var from = 0
    }

    /// Writes a 43-token file (commits every 5) and cuts it at every byte offset of its last
    /// `bytes` (0: of the whole file): each cut must open at a commit with that commit's content,
    /// or be refused with a KVPackError.
    public static func torn(bytes: Int, scheme: String, report: (String) -> Void) throws -> TornResult {
        let path = NSTemporaryDirectory() + "kvpack-torn-\(getpid()).kvpack"
        defer { unlink(path) }
        _ = try smallFile(path, scheme: scheme, tokens: 43, seed: 5)
        let original = [UInt8](FileManager.default.contents(atPath: path)!)
        var result = TornResult(fileBytes: original.count)
        var byCount: [Int: [[UInt32]]] = [:]
        let full = MappedFile(copying: original)
        if let c = content(full) { byCount[(try KVPackReader(file: full)).tokenCount] = c }
        var commits = Set<Int>()
        let from = bytes > 0 ? max(64, original.count - bytes) : 64
        result.from = from
        for cut in from ..< original.count {
            result.cuts += 1
            let file = MappedFile(copying: Array(original[..<cut]))
            guard let reader = try? KVPackReader(file: file) else {
                result.refused += 1
                continue
            }
            let n = reader.tokenCount
            commits.insert(n)
            guard n % 5 == 0 || n == 43, let c = content(file) else {
                result.failures += 1
                report("torture torn: cut at \(cut) opens with \(n) tokens, not a commit point, or does not decode")
                continue
            }
            if let known = byCount[n], known != c {
                result.failures += 1
                report("torture torn: cut at \(cut): the commit of \(n) tokens reads differently from the intact file's")
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
        return result
    }

    // MARK: Bit rot

    public struct BitRotResult: Codable, Sendable {
        public var fileBytes = 0, flips = 0, reportedByValidate = 0, harmless = 0, silentlyWrong = 0
    }

    /// Flips bits of a generated file (every bit, or `flips` random ones) and counts how each
    /// flip was caught: by validate, or harmless (content unchanged). A flip that changes what
    /// the reader returns without a report is a failure (`silentlyWrong`).
    public static func bitrot(flips: Int, tokens: Int, scheme: String, seed: UInt64, report: (String) -> Void) throws -> BitRotResult {
        let path = NSTemporaryDirectory() + "kvpack-bitrot-\(getpid()).kvpack"
        defer { unlink(path) }
        _ = try smallFile(path, scheme: scheme, tokens: tokens, seed: 9)
        var bytes = [UInt8](FileManager.default.contents(atPath: path)!)
        let truth = content(MappedFile(copying: bytes))
        var result = BitRotResult(fileBytes: bytes.count)
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
            } else if content(file) == truth {
                result.harmless += 1
            } else {
                result.silentlyWrong += 1
                report("torture bitrot: bit \(bit) (byte \(bit / 8)) changed what the reader returns without a report")
            }
            if flips > 0, (i + 1) % 5000 == 0 { report("torture bitrot: \(i + 1)/\(total)") }
        }
        return result
    }

    // MARK: Shared

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
}

/// The `committed N` lines `kvpack synth --print-commits` writes after each commit, read from its
/// standard output as they come: the acknowledgements crash and concurrency tests count on.
public struct CommitAnnouncements: IteratorProtocol {
    private let handle: FileHandle
    private var buffer = ""

    public init(_ handle: FileHandle) { self.handle = handle }

    /// The next announced token count, or nil at the end of the output.
    public mutating func next() -> Int? {
        while true {
            while let nl = buffer.firstIndex(of: "\n") {
                let line = buffer[..<nl]
                buffer.removeSubrange(...nl)
                if line.hasPrefix("committed "), let n = Int(line.dropFirst(10)) { return n }
            }
            let data = handle.availableData
            if data.isEmpty { return nil }
            buffer += String(decoding: data, as: UTF8.self)
        }
    }
}
