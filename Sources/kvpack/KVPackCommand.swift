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
        subcommands: [ChatCommand.self, GenerateCommand.self, BenchCommand.self, CodebookCommand.self, ConvertCommand.self, ImportCommand.self, ExportCommand.self, EvalCommand.self, EvalTensorsCommand.self, PlanCommand.self, PruneCommand.self, InfoCommand.self, TortureCommand.self, ValidateCommand.self, AttendCommand.self, SynthCommand.self])
}
