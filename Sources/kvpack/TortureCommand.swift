import ArgumentParser
import Foundation
import KVPack
import KVPackLab

/// Hardening harnesses with counts to record (FUZZING.md): kill a writer anywhere, tear its last
/// writes, rot its bits. The harnesses are KVPackLab's `Torture`; this prints their counts.
struct TortureCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "torture",
        abstract: "Crash, tear and corrupt .kvpack files on purpose and check that nothing committed is lost and nothing is misread.",
        discussion: """
        kill     runs `kvpack synth` writers in child processes and SIGKILLs each at a random moment (after a random number of acknowledged commits plus a random delay): across appends, block seals, tail runs, index frames and commits. Every file must open, validate, hold exactly the tokens of a commit at or after the last one the child acknowledged (bit for bit, for the lossless schemes), and accept appends that again validate.
        torn     writes a small file and truncates it at every byte offset of its last frames (a torn write of each): every cut must open at a commit point with exactly that commit's content, or be refused with a KVPackError.
        bitrot   flips bits of a file (every bit of a small one, or --flips random bits of a larger one) and counts how each flip was caught: by validate (checksums, structure), or harmless (padding no checksum covers, content unchanged). A flip that changes what the reader returns without being reported is a failure.
        soak     one writer appending at full speed (a commit every 3 tokens; one run in four every 2,000, so a kill leaves megabytes of uncommitted segments for the next run to truncate) while reader processes open, check, attend over and validate the same file in a loop; the writer is SIGKILLed at random moments and resumed, files rotate when they reach --tokens-per-file. No acknowledged token may be lost, and no reader may see an error, a wrong token, a commit older than one it saw, or die.
        Exit status 0 when every case passed; the counts are printed (or --json).
        """,
        subcommands: [Kill.self, Torn.self, BitRot.self, Soak.self, SoakReader.self])

    /// Path of this executable, for child writers.
    static var executable: String {
        (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
    }

    struct Kill: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "SIGKILL writers at random points; check every file.")
        @Option(help: "Kill points.") var points = 200
        @Option(help: "Seed of the kill points.") var seed: UInt64 = 1
        @Option(help: "Directory for the files (default: a temporary one, removed).") var keep: String?
        @Flag(help: "Print the counts as JSON.") var json = false

        func run() throws {
            let result = try withWorkDirectory(keep: keep, prefix: "kvpack-torture") { dir in
                try Torture.kill(points: points, seed: seed, executable: TortureCommand.executable, directory: dir) { line in
                    if !json || !line.hasSuffix("passed") { printError(line) }
                }
            }
            if json { try printJSON(result) } else {
                print("kill points: \(result.points), passed \(result.passed) (writer still running when killed: \(result.killedWhileWriting))")
                print("failures: lost commit \(result.lostCommits), not a commit point \(result.notACommitPoint), invalid \(result.invalid), wrong content \(result.wrongContent), append failed \(result.appendFailed)")
                print("schemes: " + result.schemes.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))
                print("surviving files held \(result.tokensMin)...\(result.tokensMax) tokens; \(String(format: "%.1f", result.seconds)) s")
            }
            if result.passed != result.points { throw ExitCode(1) }
        }
    }

    struct Torn: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Truncate a small file at every byte offset of its last frames.")
        @Option(help: "Bytes from the end of the file to cut through (0: every offset of the file).") var bytes = 0
        @Option(help: "Scheme of the file.") var scheme = "raw:f16"
        @Flag(help: "Print the counts as JSON.") var json = false

        func run() throws {
            let result = try Torture.torn(bytes: bytes, scheme: scheme, report: printError)
            if json { try printJSON(result) } else {
                print("torn writes: \(result.cuts) cuts, at every byte offset from \(result.from) to the end of a \(result.fileBytes)-byte file")
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

        func run() throws {
            let result = try Torture.bitrot(flips: flips, tokens: tokens, scheme: scheme, seed: seed) { line in
                if !json || line.contains("silently") || line.contains("changed") { printError(line) }
            }
            if json { try printJSON(result) } else {
                print("bit flips: \(result.flips) over a \(result.fileBytes)-byte \(scheme) file (\(flips > 0 ? "random bits" : "every bit"))")
                print("reported by validate: \(result.reportedByValidate); harmless (padding, content unchanged): \(result.harmless); silently wrong: \(result.silentlyWrong)")
            }
            if result.silentlyWrong > 0 { throw ExitCode(1) }
        }
    }

    struct Soak: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "A writer killed and resumed under load while readers attend and validate; count errors and lost tokens.")
        @Option(help: "How long to run, in seconds.") var seconds = 60.0
        @Option(help: "Reader processes.") var readers = 4
        @Option(help: "Start a new file when the current one holds this many tokens (bounds the disk used).") var tokensPerFile = 30000
        @Option(help: "Each writer run is killed after a random delay of up to this many milliseconds.") var maxRunMillis = 150
        @Option(help: "Seed of the delays, batch sizes and file contents.") var seed: UInt64 = 1
        @Option(help: "Directory for the files (default: a temporary one, removed).") var keep: String?
        @Flag(help: "Print the counts as JSON.") var json = false

        func validate() throws {
            guard seconds > 0, readers >= 0, tokensPerFile >= 2 * Torture.soakCommitEvery, maxRunMillis >= 1 else {
                throw ValidationError("--seconds and --max-run-millis must be positive, --readers not negative, --tokens-per-file at least \(2 * Torture.soakCommitEvery)")
            }
        }

        func run() throws {
            let result = try withWorkDirectory(keep: keep, prefix: "kvpack-soak") { dir in
                try Torture.soak(seconds: seconds, readers: readers, tokensPerFile: tokensPerFile, maxRunMillis: maxRunMillis, seed: seed,
                                 executable: TortureCommand.executable, directory: dir, report: printError)
            }
            if json { try printJSON(result) } else {
                print("soak: \(String(format: "%.0f", result.seconds)) s, \(result.readers) readers, \(result.files) files")
                print("writer: \(result.writerRuns) runs, \(result.kills) killed, \(result.writersFinished) finished; \(result.commitsAcknowledged) commits acknowledged, \(result.tokensWritten) tokens written")
                print("readers: \(result.readerOpens) opens, \(result.readerAttends) layer attentions, \(result.readerValidations) deep validations, \(result.readerCommitsObserved) new commits observed, \(result.readerCrashes) crashed")
                print("errors: \(result.errors); committed tokens lost: \(result.tokensLost)")
                for s in result.samples { print("  " + s) }
            }
            if result.errors > 0 || result.tokensLost > 0 { throw ExitCode(1) }
        }
    }

    /// One reader process of `soak` (run by it; prints its counts as JSON).
    struct SoakReader: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "soak-reader", abstract: "A reader process of torture soak.", shouldDisplay: false)
        @Argument var directory: String
        @Option var until: Double
        @Option var seed: UInt64 = 1

        func run() throws {
            try printJSON(Torture.soakReader(directory: directory, deadline: Date(timeIntervalSince1970: until), seed: seed))
        }
    }
}
