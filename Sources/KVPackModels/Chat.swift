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

    public init(model: LlamaModel) throws {
        guard let t = model.tokenizer else { throw ModelError(model.path, "has no tokenizer; chat needs a GGUF model with one") }
        guard let start = t.id(of: "<|im_start|>"), let end = t.id(of: "<|im_end|>") else {
            throw ModelError(model.path, "the vocabulary has no <|im_start|>/<|im_end|> tokens; chat supports ChatML models")
        }
        tokenizer = t
        imStart = start
        imEnd = end
        newline = t.encode("\n")
        defaultSystem = Self.defaultSystem(in: model.weights.chatTemplate)
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
    }

    init(conversation: Conversation, template: ChatTemplate) {
        self.conversation = conversation
        self.template = template
    }

    /// A new file. Nothing is fed until the first turn (which carries the system message).
    public static func start(path: String, model: LlamaModel, spec: SchemeSpec, segmentTokens: Int,
                             options: WriterOptions, producer: String) throws -> Chat {
        let template = try ChatTemplate(model: model)
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
                     clock: () -> Double, onText: (String) throws -> Void) throws -> Turn {
        let prompt = prefix + template.message(role: "user", message) + template.replyPrompt
        let t0 = clock()
        try conversation.feed(prompt)
        let t1 = clock()
        return try reply(message: message, promptTokens: prompt.count, prefillSeconds: t1 - t0, maxTokens: maxTokens, sampler: &sampler,
                         clock: clock, onText: onText)
    }

    /// Samples the assistant's reply from the current logits, streams it, closes and commits it.
    func reply(message: String, promptTokens: Int, prefillSeconds: Double, maxTokens: Int, sampler: inout Sampler,
               clock: () -> Double, onText: (String) throws -> Void) throws -> Turn {
        let t1 = clock()
        var stream = UTF8Stream()
        let tokenizer = template.tokenizer
        let reply = try conversation.generate(maxSteps: maxTokens, sampler: &sampler, stop: [template.imEnd]) { token in
            let text = stream.feed(tokenizer.decodeBytes([token], renderSpecial: false))
            if !text.isEmpty { try onText(text) }
        }
        let rest = stream.flush()
        if !rest.isEmpty { try onText(rest) }
        let t2 = clock()
        let truncated = reply.stopped == nil
        try conversation.feed(template.replyEnd)
        try conversation.commit()
        return Turn(message: message, reply: tokenizer.decode(reply.tokens, renderSpecial: false), promptTokens: promptTokens,
                    replyTokens: reply.tokens, prefillSeconds: prefillSeconds, generateSeconds: t2 - t1, truncated: truncated)
    }

    public func close() throws { try conversation.close() }
}
