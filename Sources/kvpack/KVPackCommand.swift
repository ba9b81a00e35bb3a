import ArgumentParser
import KVPack

@main
struct KVPackCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kvpack",
        abstract: "Store, inspect and attend over quantized transformer KV caches in .kvpack files.",
        discussion: """
        A .kvpack file holds a model's key/value cache: per layer, per KV head, blocks of keys and values in a chosen encoding, plus the model geometry, RoPE settings and token ids. Files are append-only and crash-safe: a reader sees exactly the tokens of the last commit. The format is specified in Spec/kvpack-format.md.

        Scheme specs (--scheme):
        \(SchemeSpec.help)
          Prefix a part with k: or v: to set keys or values only; join parts with +,
          e.g. raw:f32+v:raw:f16:zstd.
        """,
        version: KVPackVersion.string,
        subcommands: [ChatCommand.self, GenerateCommand.self, BenchCommand.self, RemoteBenchCommand.self, CodebookCommand.self, ConvertCommand.self, ImportCommand.self, ExportCommand.self, EvalCommand.self, EvalTensorsCommand.self, PlanCommand.self, PruneCommand.self, InfoCommand.self, TortureCommand.self, ValidateCommand.self, AttendCommand.self, SynthCommand.self, PushCommand.self, PullCommand.self])

    /// The one place errors become messages: a library error is printed as it is (code, field,
    /// offset, message), naming the file the command works on when the error is about a file and
    /// does not name one; every other error as its own description. Exit status 1.
    static func main() {
        var command: ParsableCommand
        do {
            command = try parseAsRoot()
        } catch {
            exit(withError: error)
        }
        do {
            try command.run()
        } catch let e as KVPackError {
            // A bad argument (a scheme spec, a range) is not about the file's bytes.
            let aboutArguments = e.code == .invalidArgument || e.code == .needsCalibration
            exit(withError: CLIError((aboutArguments ? e : e.about((command as? WorksOnFile)?.file)).description))
        } catch {
            exit(withError: error)
        }
    }
}

/// A command whose errors are about one file (the one it reads), so a library error that does
/// not name its file is reported with it.
protocol WorksOnFile {
    var file: String { get }
}

extension AttendCommand: WorksOnFile {}
extension InfoCommand: WorksOnFile {}
extension PlanCommand: WorksOnFile {}
extension ValidateCommand: WorksOnFile {}
extension ExportCommand: WorksOnFile { var file: String { input } }
extension ConvertCommand: WorksOnFile { var file: String { input } }
extension PruneCommand: WorksOnFile { var file: String { input } }
extension ChatCommand: WorksOnFile { var file: String { save ?? resume ?? "" } }
extension GenerateCommand: WorksOnFile { var file: String { save ?? resume ?? "" } }
extension SynthCommand: WorksOnFile { var file: String { output } }
extension ImportCommand: WorksOnFile { var file: String { source } }   // what it parses; errors writing the output name it
