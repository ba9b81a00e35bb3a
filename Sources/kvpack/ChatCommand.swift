import ArgumentParser
import Foundation
import KVPack
import KVPackModels
import KVPackRemote

struct ChatCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "chat",
        abstract: "Chat with a GGUF model (SmolLM2-135M-Instruct by default); the conversation's KV cache is a .kvpack file you can resume.",
        discussion: """
          kvpack chat --save chat.kvpack                               (interactive, on a terminal)
          kvpack chat --save chat.kvpack --message "Name three rivers."  (one turn; repeat --message for more)
          kvpack chat --resume chat.kvpack --message "Which is longest?"
          kvpack info chat.kvpack --text                                (the transcript)

        Each turn feeds your message (ChatML: <|im_start|>user ... <|im_end|>) as one batch, streams the reply to standard output as it is produced, and closes it with <|im_end|>, then commits: the file always holds a complete transcript, and a resumed chat attends over it straight from the mapped file. A transcript that ends in an open assistant reply (a llama.cpp session imported with `kvpack import`, saved after its ChatML prompt) gets that reply finished first. Speeds go to standard error.

        On a terminal: line editing (arrows, Home/End, Ctrl-A/E/U/K/W, Up/Down for earlier messages), /help, /info (tokens, file size, bits per element, scheme), /exit; Ctrl-D or Ctrl-C at the prompt ends the chat. Piped standard input: one message per line, an empty line or the end of input ends the chat.

        Ctrl-C while a reply streams stops it after the current token; the reply so far is KEPT: closed with <|im_end|> and committed, so the file is a valid transcript that resumes after that reply. At a terminal the chat then asks for the next message; otherwise (--message, piped input) it closes the file and exits with status 130. A second Ctrl-C before that ends the process at once; the file then holds its last commit (also valid).

        Sampling: each option not given comes from the model: its GGUF's general.sampling.* keys, else a known preset (SmolLM2: its model card's temperature 0.2 and top-p 0.9, with repeat-penalty 1.1 and DRY 0.8, measured in the README), else llama.cpp's defaults (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05). --temperature 0 is greedy. The chain runs as llama.cpp's: penalties (repetition, presence, frequency, DRY), top-k, top-p, min-p, temperature, draw. Each reply's draw is seeded from --seed and the position it starts at, so the same seed and settings give the same replies, token for token, in one process and across --resume, with any sampler and any --scheme.

        Longer than the context: before a turn would pass the context (the model's, or --context), the chat shifts it in its own file: it keeps --keep of the context (the first message, which is the system prompt, and the most recent whole messages with --shrink recent, which measured best; part by the model's attention with --shrink kvcrush), renumbers the kept tokens from position 0 and rotates their keys to match, rewrites the file beside itself and renames it into place (a crash leaves the previous file), and goes on. The shift is printed and recorded in the file's metadata (chat.shrink.N.*; `kvpack info`).

        --model smollm2 is the model `make models` downloads (SmolLM2-135M-Instruct, Q4_1 GGUF, into ~/.cache/kvpack); any Llama-architecture GGUF with a byte-level BPE tokenizer and a ChatML chat template (or none, with the ChatML tokens) works; other templates are refused with a message. Store the cache compactly with --scheme, or convert the file later with `kvpack convert`: int:k3v3:kc64+window:32+sinks:1 measured best at about 4 bits per element on SmolLM2 (perplexity +0.24 against lossless; int:k4v2:kc64 alone +1.91; BENCHMARKS.md "Quality per bit").
        """)

    @Option(help: "GGUF model: a path, or smollm2 (the downloaded SmolLM2-135M-Instruct). With --resume, defaults to the model the file records.")
    var model: String?
    @Option(help: "Start a new chat in this file.") var save: String?
    @Option(help: "Continue the chat in this file, or in an object (s3://bucket/key: pulled into a local working file, and each turn published back).") var resume: String?
    @Option(name: .customLong("message"), help: "A user message; repeat for several turns. Without it, messages are read from standard input.")
    var messages: [String] = []
    @Option(help: "System message for a new chat (default: the model template's own, if it has one).") var system: String?
    @Flag(help: "Start a new chat without any system message.") var noSystem = false
    @Option(help: "Most tokens per reply (a reply the model has not ended by then is closed there).") var maxTokens = 512
    @Option(help: "Scheme spec for a new file (see `kvpack --help`).") var scheme = "raw:f16"
    @OptionGroup(title: "Sampling (defaults: the model's recommendation, else llama.cpp's)") var sampling: SamplingOptions
    @OptionGroup(title: "Longer than the context") var context: ContextOptions
    @OptionGroup(title: "Writing the file") var writing: WritingOptions
    @Flag(help: "Print the turns as JSON at the end instead of streaming the replies.") var json = false

    struct ContextOptions: ParsableArguments {
        @Option(name: .customLong("context"), help: ArgumentHelp("Positions the chat may use (default: the model's context, 8,192 for SmolLM2). Lower it to see a context shift sooner.", valueName: "n"))
        var limit: Int?
        @Option(help: ArgumentHelp("What a context shift keeps: recent (the first message and the most recent whole messages) or kvcrush (the first message, the last quarter of the budget, the rest chosen by the model's attention).", valueName: "policy"))
        var shrink = "recent"
        @Option(help: ArgumentHelp("Share of the context a shift keeps.", valueName: "fraction"))
        var keep = 0.5

        func validate() throws {
            guard Chat.ContextPolicy.Selection(rawValue: shrink) != nil else { throw ValidationError("--shrink: recent or kvcrush") }
            guard keep > 0, keep < 1 else { throw ValidationError("--keep must be a fraction in (0, 1)") }
            if let limit, limit < 16 { throw ValidationError("--context must be at least 16") }
        }
    }

    struct Summary: Codable {
        var file: String
        var model: String
        var turns: [Chat.Turn]
        var totalTokens: Int
        var sampling: SamplerSettings
        var interrupted: Bool
    }

    func validate() throws {
        guard (save == nil) != (resume == nil) else { throw ValidationError("give exactly one of --save FILE (new chat) and --resume FILE (continue)") }
        guard maxTokens >= 1 else { throw ValidationError("--max-tokens must be at least 1") }
        if resume != nil, system != nil || noSystem { throw ValidationError("--system and --no-system apply to a new chat (--save)") }
    }

    func run() throws {
        let options = writing.writerOptions()
        let remote = try resume.flatMap(S3Location.init(url:)).map { try pullConversation($0, tool: "chat") }
        // A resumed file is mapped once: its recorded model, the model check and the session.
        let resumed = try (remote?.path ?? resume).map { try KVPackReader(path: $0) }
        let modelPath = try ModelLocator.resolve(model ?? (resumed.map(recordedModelPath) ?? "smollm2"))
        let llama = try LlamaModel(path: modelPath)
        let path = save ?? remote?.path ?? resume!
        /// After each committed turn, a remote conversation's new bytes go to the object.
        let publish = { (quiet: Bool) throws in try remote.map { try publishConversation($0, quiet: quiet) } }
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
        let (settings, settingsSource) = try sampling.settings(for: llama)
        var sampler = Sampler(settings: settings)
        if let limit = context.limit { chat.conversation.contextLimit = limit }
        chat.contextPolicy.selection = Chat.ContextPolicy.Selection(rawValue: context.shrink)!
        chat.contextPolicy.keep = context.keep
        chat.interrupted = { Interrupts.requested }
        let fromStdin = messages.isEmpty
        let editor = fromStdin && LineEditor.available ? LineEditor() : nil
        let interactive = fromStdin && isatty(0) == 1
        if !json {
            printError("kvpack chat: \(llama.path) (\(llama.format)); cache \(path), \(chat.conversation.tokenIDs.count) tokens so far")
            printError("template: \(chat.template.source); context: \(chat.conversation.contextLimit) positions, \(chat.conversation.room) left")
            printError("sampling: \(settings.summary) (defaults from \(settingsSource))")
            if interactive { printError("Type a message and press Enter. /help lists the commands; Ctrl-C stops a reply; Ctrl-D or /exit ends the chat.") }
        }
        var turns: [Chat.Turn] = []
        var pending = messages
        var interrupted = false
        let stream: (String) throws -> Void = { text in if !json { FileHandle.standardOutput.write(Data(text.utf8)) } }
        Interrupts.arm()
        // A transcript another engine saved mid-reply (a llama.cpp session of a ChatML prompt
        // ends with <|im_start|>assistant): the reply is finished first, then the messages follow.
        if let open = chat.openReply {
            if !json {
                printError("kvpack chat: the transcript ends in an open assistant reply (\(open.count) tokens so far); finishing it")
                if interactive { FileHandle.standardError.write(Data("assistant> ".utf8)) }
            }
            let turn = try chat.finishReply(maxTokens: maxTokens, sampler: &sampler, clock: Self.now, onText: stream)
            turns.append(turn)
            if !json { report(turn, chat: chat, path: path) }
            try publish(json)
            interrupted = turn.interrupted
        }
        let dropped = Set(chat.template.tokenizer.unrepresentableBytes)
        while !interrupted || editor != nil {
            // A Ctrl-C that came between replies (while a message was read, or at a shift) ends a
            // non-interactive chat too; at a terminal the prompt is where it counts.
            if Interrupts.requested && editor == nil {
                interrupted = true
                break
            }
            Interrupts.arm()
            let message: String
            if !fromStdin {
                guard !pending.isEmpty else { break }
                message = pending.removeFirst()
            } else if let editor {
                // Ctrl-D or Ctrl-C at the prompt ends the chat: every turn is already committed.
                guard case .line(let line) = editor.read(prompt: "you> ") else { break }
                if line.trimmingCharacters(in: .whitespaces).isEmpty { continue }
                message = line
            } else {
                if interactive { FileHandle.standardError.write(Data("you> ".utf8)) }
                guard let line = readLine(strippingNewline: true), !line.isEmpty else {
                    interrupted = Interrupts.requested
                    break
                }
                message = line
            }
            if fromStdin, message.hasPrefix("/") {
                if try command(message, chat: chat, path: path, settings: sampler.settings, remote: remote) { break }
                continue
            }
            if message.utf8.contains(where: dropped.contains) {
                printError("kvpack chat: the message has control characters the model's vocabulary lacks; they are dropped")
            }
            if interactive { FileHandle.standardError.write(Data("assistant> ".utf8)) }
            let turn = try chat.turn(message, prefix: chat.systemPrefix(systemMessage), maxTokens: maxTokens, sampler: &sampler,
                                     clock: Self.now, onShrink: { shrink in
                                         if !json {
                                             printError(String(format: "\n[context shift: kept %d of %d tokens (%@; first %d kept), renumbered from 0, in %.2f s]",
                                                               shrink.kept, shrink.before, shrink.policy, shrink.sinkTokens, shrink.seconds))
                                         }
                                     }, onText: stream)
            turns.append(turn)
            if !json { report(turn, chat: chat, path: path) }
            try publish(json)
            if turn.interrupted {
                interrupted = true
                // At a terminal, Ctrl-C stops the reply and the chat goes on; otherwise it ends.
                if editor == nil { break }
            }
        }
        try chat.close()
        try publish(json)
        if json {
            try printJSON(Summary(file: path, model: llama.path, turns: turns, totalTokens: chat.conversation.tokenIDs.count,
                                  sampling: sampler.settings, interrupted: interrupted))
        }
        if interrupted && editor == nil { throw ExitCode(130) }
    }

    /// Runs a /command typed at the prompt; true ends the chat.
    func command(_ line: String, chat: Chat, path: String, settings: SamplerSettings, remote: RemoteConversation? = nil) throws -> Bool {
        let word = line.split(separator: " ").first.map(String.init) ?? line
        switch word {
        case "/exit", "/quit", "/bye":
            return true
        case "/info":
            let summary = try FileSummary(reader: KVPackReader(path: path))
            let schemes = Set(summary.schemes.map(\.spec)).sorted().joined(separator: ", ")
            printError("""
              file:       \(path), \(summary.fileSize) bytes, format \(summary.version)
              tokens:     \(summary.tokenCount) (next position \(chat.conversation.session.nextPosition); \(chat.conversation.room) of \(chat.conversation.contextLimit) positions left)
              scheme:     \(schemes)
              bits/elem:  \(String(format: "%.2f cache, %.2f whole file", summary.cacheBitsPerElement, summary.fileBitsPerElement))
              sampling:   \(settings.summary)
              model:      \(chat.conversation.model.path)
            """)
            if let remote {
                printError("  object:     \(remote.location), published after each turn (\(formatBytes(remote.version.size)), ETag \(remote.version.etag))")
            }
        case "/help":
            printError("""
              /info   tokens, file size, bits per element, scheme, sampling
              /exit   end the chat (also /quit, Ctrl-D on an empty line, or Ctrl-C at the prompt)
              /help   this list
            Ctrl-C while a reply streams stops it: the reply so far is kept, closed and committed.
            Line editing: arrows, Home/End, Ctrl-A/E/U/K/W; Up/Down recall earlier messages.
            A message that starts with / but is not a command: type a space before it.
            """)
        default:
            printError("unknown command \(word); /help lists them (a message starting with / needs a space before it)")
        }
        return false
    }

    /// Ends the streamed reply's line and prints the turn's speeds to standard error.
    func report(_ turn: Chat.Turn, chat: Chat, path: String) {
        FileHandle.standardOutput.write(Data("\n".utf8))
        let rate = Double(turn.replyTokens.count) / max(turn.generateSeconds, 1e-9)
        printError(String(format: "[%d prompt tokens in %.2f s (%.0f tok/s); %d reply tokens at %.1f tok/s%@; %d tokens in %@]",
                          turn.promptTokens, turn.prefillSeconds, Double(turn.promptTokens) / max(turn.prefillSeconds, 1e-9),
                          turn.replyTokens.count, rate, turn.truncated ? ", cut at --max-tokens" : turn.interrupted ? ", stopped by Ctrl-C (kept, closed and committed)" : "",
                          chat.conversation.tokenIDs.count, path))
    }

    static func now() -> Double {
        var t = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t)
        return Double(t.tv_sec) + Double(t.tv_nsec) * 1e-9
    }
}
