import ArgumentParser
import Foundation
import KVPack
import KVPackModels

struct ChatCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "chat",
        abstract: "Chat with a GGUF model (SmolLM2-135M-Instruct by default); the conversation's KV cache is a .kvpack file you can resume.",
        discussion: """
          kvpack chat --save chat.kvpack                               (interactive, on a terminal)
          kvpack chat --save chat.kvpack --message "Name three rivers."  (one turn; repeat --message for more)
          kvpack chat --resume chat.kvpack --message "Which is longest?"
          kvpack info chat.kvpack --text                                (the transcript)

        Each turn feeds your message (ChatML: <|im_start|>user ... <|im_end|>) as one batch, streams the reply to standard output as it is produced, and closes it with <|im_end|>, then commits: the file always holds a complete transcript, and a resumed chat attends over it straight from the mapped file. A transcript that ends in an open assistant reply (a llama.cpp session imported with `kvpack import`, saved after its ChatML prompt) gets that reply finished first. With a lossless --scheme, three turns in one process and the same turns across three processes give the same replies, token for token. Without --message, messages are read from standard input, one per line (with a prompt on a terminal; an empty line or end of input ends the chat). Speeds go to standard error.

        --model smollm2 is the model `make models` downloads (SmolLM2-135M-Instruct, Q4_1 GGUF, into ~/.cache/kvpack); any Llama-architecture GGUF with a byte-level BPE tokenizer and ChatML tokens works. Store the cache compactly with --scheme (e.g. int:k4v2:kc64), or convert the file later with `kvpack convert`.
        """)

    @Option(help: "GGUF model: a path, or smollm2 (the downloaded SmolLM2-135M-Instruct). With --resume, defaults to the model the file records.")
    var model: String?
    @Option(help: "Start a new chat in this file.") var save: String?
    @Option(help: "Continue the chat in this file.") var resume: String?
    @Option(name: .customLong("message"), help: "A user message; repeat for several turns. Without it, messages are read from standard input.")
    var messages: [String] = []
    @Option(help: "System message for a new chat (default: the model template's own, if it has one).") var system: String?
    @Flag(help: "Start a new chat without any system message.") var noSystem = false
    @Option(help: "Most tokens per reply.") var maxTokens = 256
    @Option(help: "Sampling temperature; 0 is greedy.") var temperature: Float = 0
    @Option(help: "Sampling seed.") var seed: UInt64 = 1
    @Option(help: "Scheme spec for a new file (see `kvpack --help`).") var scheme = "raw:f16"
    @OptionGroup(title: "Writing the file") var writing: WritingOptions
    @Flag(help: "Print the turns as JSON at the end instead of streaming the replies.") var json = false

    struct Summary: Codable {
        var file: String
        var model: String
        var turns: [Chat.Turn]
        var totalTokens: Int
    }

    func validate() throws {
        guard (save == nil) != (resume == nil) else { throw ValidationError("give exactly one of --save FILE (new chat) and --resume FILE (continue)") }
        guard maxTokens >= 1 else { throw ValidationError("--max-tokens must be at least 1") }
        if resume != nil, system != nil || noSystem { throw ValidationError("--system and --no-system apply to a new chat (--save)") }
    }

    func run() throws {
        let options = writing.writerOptions()
        // A resumed file is mapped once: its recorded model, the model check and the session.
        let resumed = try resume.map { try KVPackReader(path: $0) }
        let modelPath = try ModelLocator.resolve(model ?? (resumed.map(recordedModelPath) ?? "smollm2"))
        let llama = try LlamaModel(path: modelPath)
        let path = save ?? resume!
        let chat: Chat
        if let save {
            let template = try ChatTemplate(model: llama)
            // int:auto plans from the statistics of the first turn's prompt.
            let firstPrompt = (noSystem ? [] : template.message(role: "system", system ?? template.defaultSystem ?? ""))
                + template.message(role: "user", messages.first ?? "Hello!")
            let spec = try Conversation.parseSpec(scheme, model: llama, prompt: firstPrompt)
            chat = try Chat.start(path: save, model: llama, spec: spec,
                                  segmentTokens: try spec.segmentTokens(requested: writing.segmentTokens, fallback: 64),
                                  options: options, producer: "\(KVPackVersion.producer) chat")
        } else {
            chat = try Chat.resume(reader: resumed!, model: llama, options: options)
        }
        let systemMessage = noSystem ? nil : (system ?? chat.template.defaultSystem)
        let interactive = messages.isEmpty && isatty(0) == 1
        if !json { printError("kvpack chat: \(llama.path) (\(llama.format)); cache \(path), \(chat.conversation.tokenIDs.count) tokens so far") }
        var sampler = Sampler(temperature: temperature, seed: seed)
        var turns: [Chat.Turn] = []
        var pending = messages
        // A transcript another engine saved mid-reply (a llama.cpp session of a ChatML prompt
        // ends with <|im_start|>assistant): the reply is finished first, then the messages follow.
        if let open = chat.openReply {
            if !json {
                printError("kvpack chat: the transcript ends in an open assistant reply (\(open.count) tokens so far); finishing it")
                if interactive { FileHandle.standardError.write(Data("assistant> ".utf8)) }
            }
            let turn = try chat.finishReply(maxTokens: maxTokens, sampler: &sampler, clock: Self.now) { text in
                if !json { FileHandle.standardOutput.write(Data(text.utf8)) }
            }
            turns.append(turn)
            if !json { report(turn, chat: chat, path: path) }
        }
        let dropped = Set(chat.template.tokenizer.unrepresentableBytes)
        while true {
            let message: String
            if !messages.isEmpty {
                guard !pending.isEmpty else { break }
                message = pending.removeFirst()
            } else {
                if interactive { FileHandle.standardError.write(Data("you> ".utf8)) }
                guard let line = readLine(strippingNewline: true), !line.isEmpty else { break }
                message = line
            }
            if message.utf8.contains(where: dropped.contains) {
                printError("kvpack chat: the message has control characters the model's vocabulary lacks; they are dropped")
            }
            if interactive { FileHandle.standardError.write(Data("assistant> ".utf8)) }
            let turn = try chat.turn(message, prefix: chat.systemPrefix(systemMessage), maxTokens: maxTokens, sampler: &sampler,
                                     clock: Self.now) { text in
                if !json { FileHandle.standardOutput.write(Data(text.utf8)) }
            }
            turns.append(turn)
            if !json { report(turn, chat: chat, path: path) }
        }
        try chat.close()
        if json {
            try printJSON(Summary(file: path, model: llama.path, turns: turns, totalTokens: chat.conversation.tokenIDs.count))
        }
    }

    /// Ends the streamed reply's line and prints the turn's speeds to standard error.
    func report(_ turn: Chat.Turn, chat: Chat, path: String) {
        FileHandle.standardOutput.write(Data("\n".utf8))
        let rate = Double(turn.replyTokens.count) / max(turn.generateSeconds, 1e-9)
        printError(String(format: "[%d prompt tokens in %.2f s (%.0f tok/s); %d reply tokens at %.1f tok/s%@; %d tokens in %@]",
                          turn.promptTokens, turn.prefillSeconds, Double(turn.promptTokens) / max(turn.prefillSeconds, 1e-9),
                          turn.replyTokens.count, rate, turn.truncated ? ", cut at --max-tokens" : "",
                          chat.conversation.tokenIDs.count, path))
    }

    static func now() -> Double {
        var t = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t)
        return Double(t.tv_sec) + Double(t.tv_nsec) * 1e-9
    }
}
