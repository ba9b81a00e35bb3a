import ArgumentParser
import Foundation
import KVPack
import KVPackRemote

struct ValidateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "validate",
        abstract: "Check a .kvpack file against the format specification.",
        discussion: """
        Checks structure, bounds, alignment, checksums (every frame header and payload), version, index consistency and scheme parameters. --deep also decodes every block and tail row and reports NaN or infinite values and decoder errors. Each problem names its file offset and field. Bytes after the last commit (a crashed writer's torn tail) are a warning, not an error: readers ignore them.

        Exit status: 0 valid, 1 invalid, 2 unreadable (the file cannot be opened or mapped).
        """)

    @Argument(help: "The .kvpack file, or s3://bucket/key.") var file: String
    @Flag(help: "Decode every block and check every value is finite.") var deep = false
    @Flag(help: "Print the report as JSON.") var json = false

    func run() throws {
        let mapped: MappedFile
        do {
            mapped = try RemoteFiles.mappedFile(path: file)
        } catch {
            printError("\(file): unreadable: \(error)")
            throw ExitCode(2)
        }
        let report = Validator.validate(file: mapped, path: file, deep: deep)
        reportFetches(mapped)
        if json {
            try printJSON(report)
        } else {
            for p in report.problems { print(p) }
            let tokens = report.tokenCount.map { "\($0) tokens, " } ?? ""
            let summary = "\(tokens)\(report.framesWalked) frames, \(report.blocksChecked) blocks checked"
                + (deep ? ", \(report.valuesChecked) values decoded" : "")
                + (report.supersededBytes > 0 ? ", \(report.supersededBytes) bytes in superseded frames" : "")
            print("\(file): \(report.isValid ? "valid" : "INVALID") (\(summary))")
        }
        if !report.isValid { throw ExitCode(1) }
    }
}
