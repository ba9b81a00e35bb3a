import ArgumentParser
import Foundation
import KVPack
import KVPackModels
import KVPackRemote

struct GenerateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "generate",
        abstract: "Run a Llama model with its KV cache in a .kvpack file; start a conversation or continue one.",
        discussion: """
          kvpack generate --model M --save chat.kvpack --steps 80     (start)
          kvpack generate --resume chat.kvpack --steps 120          (continue)

        Each call is a turn: optional prompt tokens are fed as one batch, then --steps tokens are sampled and fed back. New token ids are printed as they are produced. The cache is written as it grows (a commit at every sealed segment, every --commit-every tokens, and at the end), so a killed run leaves a file that resumes from its last commit. A resumed turn attends over past tokens straight from the mapped file and continues exactly as an uninterrupted run would (the same float operations, so the same tokens and logits).

        The file records the model's fingerprint (XXH3-128 of the checkpoint) and path; resuming with another model is refused and leaves the file untouched.
        """)

    @Option(help: "The model: a Llama-architecture GGUF (smollm2: the downloaded SmolLM2-135M-Instruct) or a llama2.c checkpoint. With --resume, defaults to the one the file records.")
    var model: String?
    @Option(help: "Start a new conversation in this file.") var save: String?
    @Option(help: "Continue the conversation in this file, or in an object (s3://bucket/key: pulled into a local working file, its new commits published back).") var resume: String?
    @Option(help: "Comma-separated token ids to feed first (default for a new conversation: 1, BOS).")
    var promptTokens: String?
    @Option(help: "Tokens to generate.") var steps = 64
    @Option(help: "Sampling temperature; 0 is greedy.") var temperature: Float = 0
    @Option(help: "Sampling seed.") var seed: UInt64 = 1
    @Option(help: "Scheme spec for a new file (see `kvpack --help`).") var scheme = "raw:f16"
    @Option(help: "Also commit every N generated tokens (0: at seals and at the end only).") var commitEvery = 0
    @Option(help: ArgumentHelp("Feed these comma-separated token ids one at a time instead of sampling, and report the model's own greedy choice and margin at each step (to compare engines on the same context).", visibility: .hidden))
    var follow: String?
    @OptionGroup(title: "Writing the file") var writing: WritingOptions
    @Flag(help: "Print a JSON summary instead of token ids.") var json = false

    struct Summary: Codable {
        var file: String
        var model: String
        var resumed: Bool
        var prompt: [Int]
        var generated: [Int]
        /// For each generated token: the logit margin over the runner-up, and the runner-up.
        var margins: [Float]
        var runnersUp: [Int]
        var totalTokens: Int
        var nextPosition: UInt32
    }

    func validate() throws {
        guard (save == nil) != (resume == nil) else { throw ValidationError("give exactly one of --save FILE (new) and --resume FILE (continue)") }
        guard steps >= 0, commitEvery >= 0 else { throw ValidationError("--steps and --commit-every must not be negative") }
        if save != nil, model == nil { throw ValidationError("a new conversation needs --model") }
    }

    func run() throws {
        let prompt = try parseTokens(promptTokens) ?? (resume == nil ? [1] : [])
        let options = writing.writerOptions()
        let remote = try resume.flatMap(S3Location.init(url:)).map { try pullConversation($0, tool: "generate") }
        let conversation: Conversation
        let modelPath: String
        if let save {
            modelPath = try absolute(model!)
            let llama = try LlamaModel(path: modelPath)
            if try ParsedSchemeSpec(scheme, geometry: llama.config.geometry).needsCalibration, prompt.count < 8 {
                throw ValidationError("--scheme \(scheme) plans from the prompt's statistics; give at least 8 tokens with --prompt-tokens")
            }
            let spec = try Conversation.parseSpec(scheme, model: llama, prompt: prompt)
            conversation = try Conversation.start(path: save, model: llama, spec: spec,
                                                  segmentTokens: try spec.segmentTokens(requested: writing.segmentTokens, fallback: 64),
                                                  prompt: prompt, options: options, producer: "\(KVPackVersion.producer) generate")
        } else {
            // Mapped once: its recorded model, the model check and the session.
            let reader = try KVPackReader(path: remote?.path ?? resume!)
            modelPath = try model.map { try absolute($0) } ?? recordedModelPath(reader)
            let llama = try LlamaModel(path: modelPath)
            conversation = try Conversation.resume(reader: reader, model: llama, options: options)
            if !prompt.isEmpty { try conversation.feed(prompt) }
        }
        var sampler = Sampler(temperature: temperature, seed: seed)
        var produced = 0
        // The logits each token is chosen from: before the first step, then after each token.
        var margins: [Float] = [], runnersUp: [Int] = []
        func note() {
            guard !conversation.logits.isEmpty, margins.count < steps else { return }
            let top = Sampler.topTwo(conversation.logits)
            margins.append(top.margin)
            runnersUp.append(top.second)
        }
        note()
        if let follow = try parseTokens(follow) {
            // Teacher forcing: the model's own choice at each step, while the given tokens are fed.
            var chosen: [Int] = []
            margins.removeAll()
            runnersUp.removeAll()
            for token in follow {
                let top = Sampler.topTwo(conversation.logits)
                chosen.append(top.best)
                margins.append(top.margin)
                runnersUp.append(top.second)
                try conversation.feed([token])
            }
            try conversation.close()
            try remote.map { try publishConversation($0, quiet: true) }
            return try printJSON(Summary(file: conversation.path, model: modelPath, resumed: resume != nil, prompt: prompt, generated: chosen,
                                         margins: margins, runnersUp: runnersUp, totalTokens: conversation.tokenIDs.count,
                                         nextPosition: conversation.session.nextPosition))
        }
        let generated = try conversation.generate(steps: steps, sampler: &sampler) { token in
            note()
            produced += 1
            if !json {
                FileHandle.standardOutput.write(Data("\(token)\(produced < steps ? "," : "\n")".utf8))
            }
            if commitEvery > 0, produced % commitEvery == 0 { try conversation.commit() }
        }
        try conversation.close()
        try remote.map { try publishConversation($0, quiet: json) }
        let total = conversation.tokenIDs.count
        if json {
            try printJSON(Summary(file: conversation.path, model: modelPath, resumed: resume != nil, prompt: prompt,
                                  generated: generated, margins: margins, runnersUp: runnersUp, totalTokens: total,
                                  nextPosition: conversation.session.nextPosition))
        } else {
            printError("\(conversation.path): \(total) tokens (\(prompt.count) fed, \(generated.count) generated this turn), committed")
        }
    }

    func parseTokens(_ text: String?) throws -> [Int]? {
        guard let text else { return nil }
        let parts = text.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
        let ids = parts.compactMap { Int($0) }
        guard ids.count == parts.count else { throw ValidationError("--prompt-tokens takes comma-separated integers, got \"\(text)\"") }
        return ids
    }

    func absolute(_ name: String) throws -> String {
        let path = try ModelLocator.resolve(name)
        return path.hasPrefix("/") ? path : FileManager.default.currentDirectoryPath + "/" + path
    }
}
