import KVPack

/// ChatML, the template SmolLM2-Instruct (and many others) are trained on:
/// `<|im_start|>role\ncontent<|im_end|>\n` per message, and `<|im_start|>assistant\n` to ask for
/// a reply. Message text is encoded without parsing special tokens, so a user cannot end a turn
/// by typing `<|im_end|>`.
public struct ChatTemplate: Sendable {
    public let tokenizer: BPETokenizer
    public let imStart: Int
    public let imEnd: Int
    public let newline: [Int]
    /// The system message the model's template inserts when the conversation has none.
    public let defaultSystem: String?
    /// Where the template came from: the GGUF's `tokenizer.chat_template`, or the ChatML fallback.
    public let source: String

    /// The model's own template (`tokenizer.chat_template`) when it is ChatML; ChatML when the
    /// model has none and its vocabulary has the ChatML tokens. Other templates (Llama 3's
    /// headers, Mistral's [INST], Gemma's turns) are refused with a message naming them: a wrong
    /// template gives fluent nonsense rather than an error.
    public init(model: LlamaModel) throws {
        guard let t = model.tokenizer else { throw ModelError(model.path, "has no tokenizer; chat needs a GGUF model with one") }
        let jinja = model.weights.chatTemplate
        if let jinja, !(jinja.contains("<|im_start|>") && jinja.contains("<|im_end|>")) {
            throw ModelError(model.path, "its chat template (tokenizer.chat_template) is not ChatML (\(Self.family(of: jinja))); kvpack chat supports ChatML templates (<|im_start|>role ... <|im_end|>). The template begins: \(String(jinja.prefix(80)).debugDescription)")
        }
        guard let start = t.id(of: "<|im_start|>"), let end = t.id(of: "<|im_end|>") else {
            throw ModelError(model.path, "the vocabulary has no <|im_start|>/<|im_end|> tokens; chat supports ChatML models")
        }
        source = jinja == nil ? "ChatML (the model has no tokenizer.chat_template; its vocabulary has the ChatML tokens)" : "ChatML (the model's tokenizer.chat_template)"
        tokenizer = t
        imStart = start
        imEnd = end
        newline = t.encode("\n")
        defaultSystem = Self.defaultSystem(in: model.weights.chatTemplate)
    }

    /// Tokens whose text holds a newline, `:`, `"` or `*` (llama.cpp's default DRY sequence
    /// breakers), and the ChatML markers: a DRY run never crosses them. Decodes the whole
    /// vocabulary, so a chat computes it once, when DRY first needs it.
    func sequenceBreakers() -> Set<Int> {
        let breakerBytes: Set<UInt8> = [0x0A, 0x3A, 0x22, 0x2A]
        var breakers: Set<Int> = [imStart, imEnd]
        for id in 0 ..< tokenizer.vocabulary.count
        where tokenizer.decodeBytes([id], renderSpecial: false).contains(where: breakerBytes.contains) {
            breakers.insert(id)
        }
        return breakers
    }

    /// A name for a template that is not ChatML, from the markers it uses.
    static func family(of jinja: String) -> String {
        let known = [("<|start_header_id|>", "Llama 3 style"), ("[INST]", "Llama 2 / Mistral [INST] style"),
                     ("<start_of_turn>", "Gemma style"), ("<|user|>", "Zephyr / Phi style"), ("<|turn>", "a turn-marker style")]
        return known.first { jinja.contains($0.0) }.map { $0.1 } ?? "an unrecognised template"
    }

    /// The literal default system message of a ChatML Jinja template (SmolLM2's inserts one when
    /// the first message is not a system message).
    static func defaultSystem(in template: String?) -> String? {
        guard let template, let open = template.firstRange(of: "<|im_start|>system\n") else { return nil }
        guard let close = template[open.upperBound...].firstRange(of: "<|im_end|>") else { return nil }
        let text = String(template[open.upperBound ..< close.lowerBound])
        return text.contains("{{") || text.contains("{%") || text.isEmpty ? nil : text
    }

    public func message(role: String, _ content: String) -> [Int] {
        [imStart] + tokenizer.encode(role + "\n" + content) + [imEnd] + newline
    }

    public var replyPrompt: [Int] { [imStart] + tokenizer.encode("assistant\n") }

    /// What closes a reply whose `<|im_end|>` was sampled (or that was cut at the token limit).
    public var replyEnd: [Int] { [imEnd] + newline }

    /// Where the reply tokens of an assistant message the transcript leaves open begin (nil when
    /// its last message is closed). A cache saved by another engine (a llama.cpp session of a
    /// ChatML prompt) ends with `<|im_start|>assistant\n` and perhaps part of the reply.
    func openReplyStart(_ ids: [UInt32]) -> Int? {
        guard let start = ids.lastIndex(of: UInt32(imStart)), !ids[start...].contains(UInt32(imEnd)) else { return nil }
        let header = replyPrompt.map { UInt32($0) }
        guard ids[start...].starts(with: header) else { return nil }
        return start + header.count
    }
}

/// A ChatML conversation whose KV cache lives in a .kvpack file: each turn feeds the user's
/// message, streams the reply, and closes it with `<|im_end|>\n`, so the file's token ids are
/// the complete transcript and the next turn (in this process or a later one) continues it.
public final class Chat {
    public let conversation: Conversation
    public let template: ChatTemplate

    public struct Turn: Sendable, Codable {
        public var message: String
        public var reply: String
        public var promptTokens: Int
        public var replyTokens: [Int]
        public var prefillSeconds: Double
        public var generateSeconds: Double
        /// The reply stopped at the token limit rather than at `<|im_end|>`.
        public var truncated: Bool
        /// The reply was stopped by the user (Ctrl-C); what was produced is kept and closed.
        public var interrupted: Bool = false
        /// How the tokens were chosen (`SamplerSettings.summary`).
        public var sampling: String = ""
        /// The conversation was shrunk before this turn to fit the context.
        public var shrink: Shrink?
    }

    /// What a context shift did (`makeRoom`).
    public struct Shrink: Sendable, Codable {
        public var before: Int
        public var kept: Int
        public var policy: String
        public var sinkTokens: Int
        public var seconds: Double
    }

    /// How the conversation makes room when the next turn would pass the context limit.
    public struct ContextPolicy: Sendable {
        public enum Selection: String, Sendable, CaseIterable {
            /// The first message (system prompt, or 4 sink tokens) and the most recent whole messages.
            case recent
            /// The first message, the most recent messages (a quarter of the budget), and the rest
            /// of the budget chosen by KVCrush from the model's attention.
            case kvcrush
        }
        public var selection: Selection = .recent
        /// Tokens kept, as a share of the context limit.
        public var keep = 0.5
        public init() {}
    }

    public var contextPolicy = ContextPolicy()
    private lazy var sequenceBreakers = template.sequenceBreakers()
    /// Asked before every reply token: true stops the reply there (it is kept and closed).
    public var interrupted: () -> Bool = { false }

    init(conversation: Conversation, template: ChatTemplate) {
        self.conversation = conversation
        self.template = template
    }

    /// A new file. Nothing is fed until the first turn (which carries the system message).
    public static func start(path: String, model: LlamaModel, spec: SchemeSpec, segmentTokens: Int,
                             options: WriterOptions, producer: String) throws -> Chat {
        let template = try ChatTemplate(model: model)
        // Each turn records its sampler settings in a note (format 2.1 / 1.5).
        var options = options
        options.features.insert(.notes)
        let conversation = try Conversation.create(path: path, model: model, spec: spec, segmentTokens: segmentTokens,
                                                   options: options, producer: producer,
                                                   metadata: [.init("chat.template", "chatml")])
        return Chat(conversation: conversation, template: template)
    }

    public static func resume(path: String, model: LlamaModel, options: WriterOptions) throws -> Chat {
        try resume(reader: KVPackReader(path: path), model: model, options: options)
    }

    /// Continues the chat in the file `reader` has open (mapped once, from the model check to the
    /// first token).
    public static func resume(reader: KVPackReader, model: LlamaModel, options: WriterOptions) throws -> Chat {
        let template = try ChatTemplate(model: model)
        let chat = Chat(conversation: try Conversation.resume(reader: reader, model: model, options: options, recomputeLogits: false),
                        template: template)
        // A turn feeds the user's message first, so the last token's logits are needed only to
        // finish a reply the transcript leaves open.
        if chat.openReply != nil { try chat.conversation.recomputeLogits() }
        return chat
    }

    /// The tokens of the open assistant reply so far (empty: only its header), or nil when the
    /// transcript's last message is closed. `finishReply` completes it.
    public var openReply: [Int]? {
        let ids = conversation.tokenIDs
        return template.openReplyStart(ids).map { ids[$0...].map { Int($0) } }
    }

    /// Completes the open assistant reply (see `openReply`): samples until `<|im_end|>` or
    /// `maxTokens`, closes the message and commits. The turn's message is empty.
    @discardableResult
    public func finishReply(maxTokens: Int, sampler: inout Sampler, clock: () -> Double, onText: (String) throws -> Void) throws -> Turn {
        guard openReply != nil else { throw ModelError(conversation.path, "the transcript has no open assistant reply to finish") }
        return try reply(message: "", promptTokens: 0, prefillSeconds: 0, maxTokens: maxTokens, sampler: &sampler, clock: clock, onText: onText)
    }

    /// Tokens the first turn feeds before the user's message: the system message, if any.
    public func systemPrefix(_ system: String?) -> [Int] {
        guard conversation.tokenIDs.isEmpty, let system, !system.isEmpty else { return [] }
        return template.message(role: "system", system)
    }

    /// One turn: feeds `message` (after `prefix`) as one batch, then samples until
    /// `<|im_end|>` or `maxTokens`, calling `onText` with each complete piece of UTF-8.
    @discardableResult
    public func turn(_ message: String, prefix: [Int] = [], maxTokens: Int, sampler: inout Sampler,
                     clock: () -> Double, onShrink: (Shrink) -> Void = { _ in }, onText: (String) throws -> Void) throws -> Turn {
        let prompt = prefix + template.message(role: "user", message) + template.replyPrompt
        let need = prompt.count + maxTokens + template.replyEnd.count
        let shrink = need > conversation.room ? try makeRoom(for: need, clock: clock) : nil
        if let shrink { onShrink(shrink) }
        let t0 = clock()
        try conversation.feed(prompt)
        let t1 = clock()
        var turn = try reply(message: message, promptTokens: prompt.count, prefillSeconds: t1 - t0, maxTokens: maxTokens, sampler: &sampler,
                             clock: clock, onText: onText)
        turn.shrink = shrink
        return turn
    }

    /// Shrinks the conversation (`Conversation.shrink`) so that `need` more positions fit:
    /// keeps `contextPolicy.keep` of the context limit (less if `need` requires), chosen by
    /// `contextPolicy.selection`, and records what it did in the file's metadata.
    public func makeRoom(for need: Int, clock: () -> Double) throws -> Shrink {
        let t0 = clock()
        let limit = conversation.contextLimit
        let ids = conversation.tokenIDs, n = ids.count
        let budget = min(Int(contextPolicy.keep * Double(limit)), limit - need)
        let sinks = min(firstMessageEnd(ids) ?? 4, max(budget / 4, 1), n)
        guard budget >= sinks + 1 else {
            throw ModelError(conversation.path, "this turn needs \(need) positions (message, --max-tokens and the reply's end) and the context limit is \(limit): too little is left for the conversation so far; send a shorter message or lower --max-tokens")
        }
        var p = TokenSelection.Parameters()
        p.budget = budget
        p.sinkTokens = sinks
        let selection: TokenSelection
        switch contextPolicy.selection {
        case .recent:
            let cut = messageStart(ids, atOrAfter: max(n - (budget - sinks), sinks))
            p.policy = .recent
            p.recentWindow = n - cut
            p.observationWindow = 0
            p.anchor = .zeros
            let kept = Array(0 ..< sinks) + Array(cut ..< n)
            selection = TokenSelection(parameters: p, sourceTokenCount: n, signatureBits: 0, kept: kept,
                                       reasons: kept.map { $0 < sinks ? .sink : .recent }, importance: kept.map { _ in 0 },
                                       signatures: [], anchor: [])
        case .kvcrush:
            p.policy = .kvcrush
            p.recentWindow = n - messageStart(ids, atOrAfter: max(n - max(budget / 4, 1), sinks))
            p.observationWindow = 32
            p.representatives = KVCrush.defaultRepresentatives(budget: budget)
            try conversation.commit()
            let reader = try KVPackReader(path: conversation.path)
            let observation = try AttentionObserver.observe(model: conversation.model, reader: reader, tokens: n, window: p.observationWindow)
            selection = KVCrush.select(observation, parameters: p)
        }
        let lastPosition = Int(conversation.session.nextPosition) - 1
        let kept = Set(selection.kept)
        let previous = conversation.session.manifest.userMetadata.filter { $0.key.hasPrefix("chat.shrink.") && $0.key.hasSuffix(".kept") }.count
        let key = "chat.shrink.\(previous + 1)"
        let metadata: [Manifest.MetadataEntry] = [
            .init("\(key).kept", "\(selection.keptCount) of \(n) tokens (last position \(lastPosition) -> \(selection.keptCount - 1))"),
            .init("\(key).policy", "\(contextPolicy.selection.rawValue): first \(sinks) tokens, \(selection.reasons.filter { $0 == .recent }.count) most recent\(contextPolicy.selection == .kvcrush ? ", the rest by KVCrush" : ""); renumbered from 0, keys rotated to their new positions"),
            .init("\(key).limit", "\(limit)"),
            .init("\(key).droppedReplies", "\(replyStarts(ids).filter { !kept.contains($0) }.count)"),
        ]
        try conversation.shrink(to: selection, metadata: metadata, tool: "kvpack chat")
        return Shrink(before: n, kept: selection.keptCount, policy: contextPolicy.selection.rawValue, sinkTokens: sinks, seconds: clock() - t0)
    }

    /// Tokens of the first message when it is a system message (its `<|im_end|>\n` included).
    func firstMessageEnd(_ ids: [UInt32]) -> Int? {
        let system = [imStartID] + template.tokenizer.encode("system").map { UInt32($0) }
        guard ids.starts(with: system), let end = ids.firstIndex(of: UInt32(template.imEnd)) else { return nil }
        return min(end + 1 + template.newline.count, ids.count)
    }

    /// The first `<|im_start|>` at or after `index` (whole messages are kept), else `index`.
    func messageStart(_ ids: [UInt32], atOrAfter index: Int) -> Int {
        let from = max(index, 0)
        return ids[from...].firstIndex(of: imStartID) ?? from
    }

    var imStartID: UInt32 { UInt32(template.imStart) }

    /// Samples the assistant's reply from the current logits, streams it, closes and commits it.
    func reply(message: String, promptTokens: Int, prefillSeconds: Double, maxTokens: Int, sampler: inout Sampler,
               clock: () -> Double, onText: (String) throws -> Void) throws -> Turn {
        let t1 = clock()
        var stream = UTF8Stream()
        let tokenizer = template.tokenizer
        // The reply depends only on the transcript and the settings, in this process or a later one.
        sampler.reseed(position: Int(conversation.session.nextPosition))
        sampler.exempt = Set([template.imStart, template.imEnd] + template.newline)
        if sampler.settings.dry { sampler.sequenceBreakers = sequenceBreakers }
        var stopped = false
        let reply = try conversation.generate(maxSteps: maxTokens, sampler: &sampler, stop: [template.imEnd],
                                              interrupted: { stopped = stopped || self.interrupted(); return stopped }) { token in
            let text = stream.feed(tokenizer.decodeBytes([token], renderSpecial: false))
            if !text.isEmpty { try onText(text) }
        }
        let rest = stream.flush()
        if !rest.isEmpty { try onText(rest) }
        let t2 = clock()
        let truncated = reply.stopped == nil && !stopped
        try conversation.feed(template.replyEnd)
        try recordTurn(sampling: sampler.settings.summary, ending: stopped ? "ctrl-c" : truncated ? "max-tokens" : "im_end")
        try conversation.commit()
        return Turn(message: message, reply: tokenizer.decode(reply.tokens, renderSpecial: false), promptTokens: promptTokens,
                    replyTokens: reply.tokens, prefillSeconds: prefillSeconds, generateSeconds: t2 - t1, truncated: truncated,
                    interrupted: stopped, sampling: sampler.settings.summary)
    }

    /// Records how the reply just closed was made, in a note the commit makes visible:
    /// `chat.turn.N.sampling` (the settings) and `chat.turn.N.end` (im_end, max-tokens or
    /// ctrl-c), N counting the transcript's assistant replies from 1. A file older than format
    /// 2.1 (1.5) cannot hold notes; its turns go unrecorded.
    func recordTurn(sampling: String, ending: String) throws {
        let writer = conversation.session.writer
        guard writer.acceptsNotes else { return }
        let turn = previousShrinkReplies + replyStarts(conversation.tokenIDs).count
        try writer.attach(note: MetadataNote(entries: [.init("chat.turn.\(turn).sampling", sampling), .init("chat.turn.\(turn).end", ending)]))
    }

    /// Where each assistant reply header (`<|im_start|>assistant\n`) of a transcript starts.
    func replyStarts(_ ids: [UInt32]) -> [Int] {
        let header = template.replyPrompt.map { UInt32($0) }
        var starts: [Int] = [], i = 0
        while i < ids.count, let start = ids[i...].firstIndex(of: header[0]) {
            if ids[start...].starts(with: header) { starts.append(start) }
            i = start + 1
        }
        return starts
    }

    /// Replies a context shift dropped from the transcript (turn numbers keep counting them).
    var previousShrinkReplies: Int {
        conversation.session.manifest.userMetadata.filter { $0.key.hasPrefix("chat.shrink.") && $0.key.hasSuffix(".droppedReplies") }
            .compactMap { Int($0.value) }.reduce(0, +)
    }

    public func close() throws { try conversation.close() }
}
