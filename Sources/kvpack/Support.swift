import ArgumentParser
import Foundation
import KVPack
import KVPackRemote

enum KVPackVersion {
    static let string = "0.1.0"
    static var producer: String { "kvpack \(string)" }
}

/// A failure the CLI itself reports (a library error is reported as it is: `KVPackCommand.main`).
struct CLIError: Error, CustomStringConvertible {
    var description: String
    init(_ d: String) { description = d }
}

/// A reader over a local file or an `s3://bucket/key` object (fetched as it is read; README:
/// "Object storage").
func openReader(_ path: String, arithmetic: AttentionArithmetic = .fast) throws -> KVPackReader {
    try RemoteFiles.reader(path: path, arithmetic: arithmetic)
}

/// The local working file of a conversation kept in object storage (`chat`/`generate --resume
/// s3://...`): downloaded unless this machine has the object's current version already.
func pullConversation(_ location: S3Location, tool: String) throws -> RemoteConversation {
    let client = S3Client(configuration: try S3Configuration.load())
    let remote = try RemoteConversation(location, client: client, directory: RemoteConversation.defaultDirectory(cache: try RemoteFiles.cache()))
    printError(String(format: "kvpack %@: %@ is %@ in %@ (%@, %.2f s); its new commits are published back", tool, location.description,
                      formatBytes(remote.version.size), remote.path, remote.reused ? "unchanged since this machine last had it: no download" : "downloaded",
                      remote.pullSeconds))
    if let aside = remote.unpublished {
        printError("kvpack \(tool): this machine's copy held commits never published to \(location) (another writer published first, or a publish failed); kept as \(aside)")
    }
    return remote
}

/// Publishes a remote conversation's newest commit and says what it cost (unless `quiet`).
func publishConversation(_ remote: RemoteConversation, quiet: Bool) throws {
    guard let r = try remote.publish() else { return }
    if !quiet {
        printError(String(format: "[published to %@: %@ uploaded, %@ copied on the server, %d part%@, %.2f s]", remote.location.description,
                          formatBytes(r.uploadedBytes), formatBytes(r.copiedBytes), r.parts, r.parts == 1 ? "" : "s", r.seconds))
    }
}

/// For a remote file, one line on stderr saying what reading it cost.
func reportFetches(_ file: MappedFile) {
    guard let name = file.remoteName, let s = file.remoteStatistics else { return }
    let cached = s.cachedPagesAtOpen > 0 ? ", \(formatBytes(s.cachedPagesAtOpen * 4096)) already in the local cache" : ""
    printError("\(name): \(s.requests) request\(s.requests == 1 ? "" : "s"), \(formatBytes(s.bytes)) fetched in \(String(format: "%.2f", s.seconds)) s\(cached)")
}

/// The flags every command that writes a .kvpack file shares (chat, generate, convert, prune,
/// import, synth), declared and checked once.
struct WritingOptions: ParsableArguments {
    @Option(help: "Tokens per sealed block of a new file (default: the scheme's residual window, else 64 for chat and generate, 128 for import and synth, the source's for convert and prune).")
    var segmentTokens: Int?
    @Flag(inversion: .prefixedNo, help: "fsync at each commit, so a commit survives power loss; with --no-fsync it survives a crash of this process only. Default: on (synth: off).")
    var fsync: Bool?
    @Flag(help: "Replace the output file if it exists (atomically: a reader that has it open keeps its version).")
    var overwrite = false
    @Option(help: "Format major version of a new file: 2 (opens in constant time) or 1 (for readers older than KVPack 2.0). A resumed file keeps its own.")
    var formatVersion: UInt16 = FileHeader.currentMajor
    @Option(help: "Header-checksum salt of a new file (default: random; fix it for reproducible bytes).")
    var salt: UInt64?

    func validate() throws {
        guard FileHeader.supportedMajors.contains(formatVersion) else {
            throw ValidationError("--format-version must be \(FileHeader.supportedMajors.map(String.init).joined(separator: " or "))")
        }
        if let segmentTokens, !(1 ... Limits.maxSegmentTokens).contains(segmentTokens) {
            throw ValidationError("--segment-tokens must be in 1...\(Limits.maxSegmentTokens)")
        }
    }

    func durability(fsyncByDefault: Bool = true) -> WriterOptions.Durability {
        fsync ?? fsyncByDefault ? .fsync : .flush
    }

    func writerOptions(fsyncByDefault: Bool = true) -> WriterOptions {
        var options = WriterOptions()
        options.durability = durability(fsyncByDefault: fsyncByDefault)
        options.overwrite = overwrite
        options.majorVersion = formatVersion
        options.salt = salt
        return options
    }
}

func printJSON<T: Encodable>(_ value: T) throws {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
    let data = try encoder.encode(value)
    FileHandle.standardOutput.write(data)
    FileHandle.standardOutput.write(Data("\n".utf8))
}

func printError(_ text: String) {
    FileHandle.standardError.write(Data((text + "\n").utf8))
}

/// A one-line progress display on stderr, only when stderr is a terminal.
final class Progress: @unchecked Sendable {
    // @unchecked: used from one thread (the writer's callbacks run on the caller's thread).
    private let total: Int
    private let label: String
    private let enabled: Bool
    private var last = ContinuousClock.now
    private let start = ContinuousClock.now

    init(label: String, total: Int) {
        self.total = total
        self.label = label
        enabled = isatty(2) != 0
    }

    func update(_ done: Int) {
        guard enabled else { return }
        let now = ContinuousClock.now
        guard now - last > .milliseconds(100) || done == total else { return }
        last = now
        let pct = total > 0 ? 100 * done / total : 100
        FileHandle.standardError.write(Data("\r\(label): \(done)/\(total) (\(pct)%)".utf8))
    }

    func finish() {
        guard enabled else { return }
        let secs = Double((ContinuousClock.now - start).components.attoseconds) / 1e18 + Double((ContinuousClock.now - start).components.seconds)
        FileHandle.standardError.write(Data("\r\(label): \(total)/\(total) done in \(String(format: "%.2f", secs)) s\u{1B}[K\n".utf8))
    }
}

/// Token ranges on the command line: `A..<B`, `A..B` (inclusive) or `A:B` (half-open).
struct TokenRange: ExpressibleByArgument {
    var range: Range<Int>

    init?(argument: String) {
        func pair(_ sep: String) -> (Int, Int)? {
            let parts = argument.components(separatedBy: sep)
            guard parts.count == 2, let a = Int(parts[0]), let b = Int(parts[1]) else { return nil }
            return (a, b)
        }
        if let (a, b) = pair("..<"), a <= b {
            range = a ..< b
        } else if let (a, b) = pair(".."), a <= b {
            range = a ..< b + 1
        } else if let (a, b) = pair(":"), a <= b {
            range = a ..< b
        } else {
            return nil
        }
    }
}

extension String {
    func padded(_ width: Int) -> String { count >= width ? self : self + String(repeating: " ", count: width - count) }
    func leftPad(_ width: Int) -> String { count >= width ? self : String(repeating: " ", count: width - count) + self }
}

func formatBytes(_ n: Int) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"]
    var v = Double(n), u = 0
    while v >= 1024, u < units.count - 1 {
        v /= 1024
        u += 1
    }
    return u == 0 ? "\(n) B" : String(format: "%.2f %@", v, units[u])
}

/// Rows of cells as left-aligned columns, two spaces apart (the first row is the header).
func formatTable(_ rows: [[String]]) -> String {
    let widths = rows[0].indices.map { c in rows.map { $0[c].count }.max()! }
    return rows.map { row in row.enumerated().map { $1.padded(widths[$0]) }.joined(separator: "  ") }.joined(separator: "\n")
}

/// Runs `body` in `keep` (created if needed) or in a temporary directory removed afterwards.
func withWorkDirectory<T>(keep: String?, prefix: String, _ body: (String) throws -> T) throws -> T {
    let directory = keep ?? NSTemporaryDirectory() + "\(prefix)-\(getpid())"
    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    defer { if keep == nil { try? FileManager.default.removeItem(atPath: directory) } }
    return try body(directory)
}

extension Converter.Options {
    /// A conversion (convert, prune) writing its output as the shared flags say.
    init(writing: WritingOptions) {
        self.init()
        segmentTokens = writing.segmentTokens
        overwrite = writing.overwrite
        durability = writing.durability()
        formatVersion = writing.formatVersion
        salt = writing.salt
        tool = KVPackVersion.producer
    }
}

/// The model path a conversation file records (`model.path` metadata).
/// A --rope-layout that keys move to: interleaved or rotate-half (convert, export).
func pairLayout(_ text: String) throws -> RoPELayout {
    guard let layout = RoPELayout(name: text), layout != .none else {
        throw ValidationError("--rope-layout must be interleaved or rotate-half, got \(text)")
    }
    return layout
}

func recordedModelPath(_ reader: KVPackReader) throws -> String {
    guard let recorded = reader.manifest.metadata("model.path") else {
        throw CLIError("\(reader.path ?? "the file") does not record its model; pass --model")
    }
    return recorded
}
