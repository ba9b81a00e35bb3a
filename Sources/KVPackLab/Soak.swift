import Foundation
import KVPack

/// `kvpack torture soak`: one writer appending at full speed (a commit every 3 tokens; one run
/// in four every 2,000), reader
/// processes opening, checking, attending over and validating the same file in a loop, and the
/// writer SIGKILLed at random moments and resumed. Nothing a writer acknowledged may be lost,
/// and no reader may ever see an error, a token that differs from what was written, a commit
/// older than one it already saw, or die.
///
/// Files rotate: each generation is created with one commit, renamed into place (readers never
/// see a file without a commit), resumed by killed writers until it holds `tokensPerFile`, then
/// replaced by the next generation (the old one is unlinked while readers may still map it).
extension Torture {
    public static let soakCommitEvery = 3
    static let soakScheme = "raw:f32"

    public struct SoakResult: Codable, Sendable {
        public var seconds = 0.0, readers = 0
        public var files = 0, writerRuns = 0, kills = 0, writersFinished = 0
        /// `committed N` lines the writers printed (each after its commit returned).
        public var commitsAcknowledged = 0
        public var tokensWritten = 0
        /// Committed tokens a writer acknowledged that a later open did not find (must be 0).
        public var tokensLost = 0
        /// Reader side, summed over the reader processes.
        public var readerOpens = 0, readerAttends = 0, readerValidations = 0, readerCommitsObserved = 0
        public var readerCrashes = 0
        /// Every failed check, writer side and reader side (must be 0); the first few are in `samples`.
        public var errors = 0
        public var samples: [String] = []
    }

    public struct SoakReaderResult: Codable, Sendable {
        public var opens = 0, attends = 0, validations = 0, commitsObserved = 0, errors = 0
        public var samples: [String] = []

        mutating func fail(_ text: String) {
            errors += 1
            if samples.count < 10 { samples.append(text) }
        }
    }

    static func soakPath(_ directory: String, _ generation: Int) -> String {
        "\(directory)/soak-\(String(format: "%06d", generation)).kvpack"
    }

    /// One writer run in four commits only every `soakLongCommit` tokens instead: killed, it
    /// leaves megabytes of sealed but uncommitted segments for the next run to truncate while
    /// readers are scanning past them (readers died of SIGBUS there before the scan used pread).
    static let soakLongCommit = 2000

    static func synthArguments(_ path: String, tokens: Int, batch: Int, seed: UInt64, resume: Bool, commitEvery: Int = soakCommitEvery) -> [String] {
        ["synth", path, "--model", "stories260k", "--tokens", String(tokens), "--segment-tokens", "16", "--scheme", soakScheme,
         "--batch", String(batch), "--commit-every", String(commitEvery), "--seed", String(seed), "--print-commits"]
            + (resume ? ["--resume"] : [])
    }

    /// Runs the soak for `seconds` with `readers` reader processes (`executable` is the kvpack
    /// binary; readers run `torture soak-reader`). Each writer run is killed after a random delay
    /// of up to `maxRunMillis`.
    public static func soak(seconds: Double, readers readerCount: Int, tokensPerFile: Int, maxRunMillis: Int, seed: UInt64,
                            executable: String, directory: String, report: (String) -> Void) throws -> SoakResult {
        var rng = SplitMix64(seed: seed)
        var result = SoakResult(readers: readerCount)
        func fail(_ text: String) {
            result.errors += 1
            if result.samples.count < 20 { result.samples.append(text) }
            report("torture soak: \(text)")
        }
        let start = Date()
        let deadline = start.addingTimeInterval(seconds)
        let fileSeed = seed &* 0x9E37_79B9 &+ 11

        // Generation 0 exists before the readers start.
        var generation = 0
        try createGeneration(directory, generation, seed: fileSeed, executable: executable)
        result.files = 1

        var readers: [(process: Process, output: Pipe)] = []
        for r in 0 ..< readerCount {
            readers.append(try spawnReader(executable: executable, directory: directory, deadline: deadline, seed: seed &+ UInt64(r)))
        }

        var path = soakPath(directory, generation)
        var lastProgress = start
        while Date() < deadline {
            // The committed state before this run; every run must keep it and add to it.
            let before = try KVPackReader(path: path).tokenCount
            let remaining = tokensPerFile - before
            if remaining <= 0 {
                generation += 1
                try createGeneration(directory, generation, seed: fileSeed, executable: executable)
                try? FileManager.default.removeItem(atPath: path)
                path = soakPath(directory, generation)
                result.files += 1
                continue
            }
            let child = Process()
            child.executableURL = URL(fileURLWithPath: executable)
            let commitEvery = rng.next() % 4 == 0 ? soakLongCommit : soakCommitEvery
            child.arguments = synthArguments(path, tokens: remaining, batch: 1 + Int(rng.next() % 4), seed: fileSeed, resume: true,
                                             commitEvery: commitEvery)
            let out = Pipe()
            child.standardOutput = out
            let errors = Pipe()
            child.standardError = errors
            let acknowledgements = AcknowledgementCounter()
            let drained = DispatchGroup()
            drained.enter()
            DispatchQueue.global().async {
                var lines = CommitAnnouncements(out.fileHandleForReading)
                while let n = lines.next() { acknowledgements.record(n) }
                drained.leave()
            }
            try child.run()
            result.writerRuns += 1
            usleep(UInt32(rng.next() % UInt64(maxRunMillis * 1000 + 1)))
            Foundation.kill(child.processIdentifier, SIGKILL)
            child.waitUntilExit()
            drained.wait()
            let stderr = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            if child.terminationReason == .uncaughtSignal { result.kills += 1 } else if child.terminationStatus == 0 {
                result.writersFinished += 1
            } else {
                fail("writer run \(result.writerRuns) on \(path) exited with status \(child.terminationStatus): \(stderr.suffix(300))")
            }
            let (count, last) = acknowledgements.snapshot
            result.commitsAcknowledged += count

            // The file after the kill: at least what was acknowledged, exactly what was written.
            do {
                let reader = try KVPackReader(path: path)
                let n = reader.tokenCount
                if n < last {
                    result.tokensLost += last - n
                    fail("\(path) holds \(n) tokens after the kill; the writer acknowledged \(last)")
                }
                if n < before { fail("\(path) holds \(n) tokens after the kill; it held \(before) before the run") }
                result.tokensWritten += max(0, n - before)
                let gen = SyntheticKV(geometry: reader.geometry, rope: reader.manifest.rope, seed: fileSeed)
                let bad = try gen.mismatches(in: reader, tokens: min(before, n) ..< n)
                if bad > 0 { fail("\(path): \(bad) elements of tokens \(before)..<\(n) differ from what the writer appended") }
                let validation = Validator.validate(file: reader.file, path: path, deep: true)
                if !validation.isValid { fail("\(path) after the kill: \(validation.problems.map(\.description))") }
            } catch {
                fail("\(path) after writer run \(result.writerRuns): \(error)")
            }
            // A reader that died is a finding; a new one takes its place for the rest of the run.
            for r in readers.indices where !readers[r].process.isRunning && Date() < deadline {
                if readers[r].process.terminationReason == .uncaughtSignal {
                    result.readerCrashes += 1
                    fail("reader \(r) died of signal \(readers[r].process.terminationStatus) (restarted)")
                } else {
                    fail("reader \(r) stopped early with status \(readers[r].process.terminationStatus) (restarted)")
                }
                readers[r] = try spawnReader(executable: executable, directory: directory, deadline: deadline, seed: seed &+ UInt64(r) &+ UInt64(result.writerRuns) << 8)
            }
            if Date().timeIntervalSince(lastProgress) >= 30 {
                lastProgress = Date()
                report("torture soak: \(Int(lastProgress.timeIntervalSince(start))) s, \(result.kills) kills, \(result.commitsAcknowledged) commits acknowledged, \(result.errors) errors")
            }
        }

        // The readers stop at the deadline on their own; a reader that died is a finding.
        for (r, reader) in readers.enumerated() {
            let data = reader.output.fileHandleForReading.readDataToEndOfFile()
            reader.process.waitUntilExit()
            if reader.process.terminationReason == .uncaughtSignal {
                result.readerCrashes += 1
                fail("reader \(r) died of signal \(reader.process.terminationStatus)")
                continue
            }
            guard let counts = try? JSONDecoder().decode(SoakReaderResult.self, from: data) else {
                fail("reader \(r) exited with status \(reader.process.terminationStatus) without its counts")
                continue
            }
            result.readerOpens += counts.opens
            result.readerAttends += counts.attends
            result.readerValidations += counts.validations
            result.readerCommitsObserved += counts.commitsObserved
            result.errors += counts.errors
            for s in counts.samples where result.samples.count < 20 { result.samples.append("reader \(r): \(s)") }
        }
        // The last file, whole.
        do {
            let reader = try KVPackReader(path: path)
            let gen = SyntheticKV(geometry: reader.geometry, rope: reader.manifest.rope, seed: fileSeed)
            let bad = try gen.mismatches(in: reader, tokens: 0 ..< reader.tokenCount)
            if bad > 0 { fail("\(path): \(bad) elements differ from what the writers appended") }
        } catch {
            fail("\(path) at the end: \(error)")
        }
        result.seconds = Date().timeIntervalSince(start)
        return result
    }

    /// A new file holding one commit (`soakCommitEvery` tokens), renamed into place whole.
    static func createGeneration(_ directory: String, _ generation: Int, seed: UInt64, executable: String) throws {
        let path = soakPath(directory, generation)
        let staging = directory + "/staging.kvpack"
        let child = Process()
        child.executableURL = URL(fileURLWithPath: executable)
        child.arguments = synthArguments(staging, tokens: soakCommitEvery, batch: 1, seed: seed, resume: false) + ["--overwrite"]
        child.standardOutput = FileHandle.nullDevice
        try child.run()
        child.waitUntilExit()
        guard child.terminationStatus == 0 else { throw KVPackError.argument("kvpack synth could not create \(staging)") }
        guard rename(staging, path) == 0 else { throw KVPackError.argument("cannot rename \(staging) to \(path)") }
    }

    static func spawnReader(executable: String, directory: String, deadline: Date, seed: UInt64) throws -> (process: Process, output: Pipe) {
        let child = Process()
        child.executableURL = URL(fileURLWithPath: executable)
        child.arguments = ["torture", "soak-reader", directory, "--until", String(deadline.timeIntervalSince1970), "--seed", String(seed)]
        let out = Pipe()
        child.standardOutput = out
        try child.run()
        return (child, out)
    }

    /// One reader process of the soak: until `deadline`, open the newest file of `directory`,
    /// check that its commit is not older than one seen before and that its token ids and
    /// newest tokens are what the writer wrote, attend over a layer, and (every third round)
    /// validate it deeply.
    public static func soakReader(directory: String, deadline: Date, seed: UInt64) -> SoakReaderResult {
        var result = SoakReaderResult()
        var rng = SplitMix64(seed: seed)
        var seen: [String: Int] = [:]
        let workspaces = [AttentionWorkspace()]
        var round = 0
        while Date() < deadline {
            round += 1
            let names = ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? [])
                .filter { $0.hasPrefix("soak-") && $0.hasSuffix(".kvpack") }.sorted()
            guard let name = names.last else {
                usleep(1000)
                continue
            }
            let path = directory + "/" + name
            let reader: KVPackReader
            do { reader = try KVPackReader(path: path) } catch {
                // Rotated away between the listing and the open: not a finding.
                if !FileManager.default.fileExists(atPath: path) { continue }
                result.fail("open \(name): \(error)")
                continue
            }
            result.opens += 1
            let n = reader.tokenCount
            if let before = seen[name] {
                if n < before { result.fail("\(name): opened with \(n) tokens after a commit of \(before) was seen") }
                if n > before { result.commitsObserved += 1 }
            } else {
                result.commitsObserved += 1
            }
            seen[name] = max(n, seen[name] ?? 0)
            do {
                guard let fileSeed = try reader.userMetadata().first(where: { $0.key == "synth.seed" }).flatMap({ UInt64($0.value) }) else {
                    result.fail("\(name): no synth.seed metadata")
                    continue
                }
                let gen = SyntheticKV(geometry: reader.geometry, rope: reader.manifest.rope, seed: fileSeed)
                let ids = try reader.tokens(0 ..< n).ids
                if let t = (0 ..< n).first(where: { ids[$0] != gen.tokenID($0) }) {
                    result.fail("\(name): token \(t) of \(n) has id \(ids[t]), the writer wrote \(gen.tokenID(t))")
                }
                let newest = max(0, n - 1 - Int(rng.next() % 40)) ..< n
                let bad = try gen.mismatches(in: reader, tokens: newest)
                if bad > 0 { result.fail("\(name): \(bad) elements of tokens \(newest) differ from what the writer wrote") }
                let g = reader.geometry
                let queries = (0 ..< g.queryHeadCount * g.headDim).map { _ in Float(rng.nextGaussian()) }
                var output = [Float](repeating: .nan, count: queries.count)
                let layer = Int(rng.next() % UInt64(g.layerCount))
                try queries.withUnsafeBufferPointer { q in
                    try output.withUnsafeMutableBufferPointer { o in
                        try reader.attendLayer(layer, queries: q.baseAddress!, output: o.baseAddress!, workspaces: workspaces)
                    }
                }
                result.attends += 1
                if n > 0, output.contains(where: { !$0.isFinite }) { result.fail("\(name): attention over \(n) tokens is not finite") }
                if round % 3 == 0 {
                    let report = Validator.validate(file: reader.file, path: path, deep: true)
                    result.validations += 1
                    if !report.isValid { result.fail("\(name) with \(n) tokens: \(report.problems.map(\.description))") }
                }
            } catch {
                result.fail("\(name) with \(n) tokens: \(error)")
            }
        }
        return result
    }
}

/// The latest `committed N` a writer printed, shared between the thread reading its output and
/// the soak loop.
final class AcknowledgementCounter: @unchecked Sendable {
    private let lock = NSLock()
    private var count = 0, last = 0

    func record(_ n: Int) {
        lock.lock()
        count += 1
        last = max(last, n)
        lock.unlock()
    }

    var snapshot: (count: Int, last: Int) {
        lock.lock()
        defer { lock.unlock() }
        return (count, last)
    }
}
