import ArgumentParser
import Foundation
import KVPack

enum KVPackVersion {
    static let string = "0.1.0"
    static var producer: String { "kvpack \(string)" }
}

/// Exit with a message for a library error, keeping its offset and field.
struct CLIError: Error, CustomStringConvertible {
    var description: String
    init(_ d: String) { description = d }
}

func openReader(_ path: String) throws -> KVPackReader {
    do {
        return try KVPackReader(path: path)
    } catch let e as KVPackError {
        throw CLIError("\(path): \(e)")
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

/// The model path a conversation file records (`model.path` metadata).
func recordedModelPath(_ path: String) throws -> String {
    let reader = try openReader(path)
    guard let recorded = reader.manifest.userMetadata.first(where: { $0.key == "model.path" })?.value else {
        throw CLIError("\(path) does not record its model; pass --model")
    }
    return recorded
}
