import KVPack

/// A conversation with a model whose KV cache lives in a KVPack file: started, continued for
/// any number of turns, closed, and resumed later (in another process) from the file alone.
public final class Conversation {
    public let model: LlamaModel
    /// Replaced when the conversation shrinks (`shrink`): the file is rewritten and resumed.
    public private(set) var session: KVCacheSession
    /// Logits after the last token in the cache: where the next token is sampled from.
    public private(set) var logits: [Float]
    let options: WriterOptions
    /// Positions the conversation may use: the model's context unless lowered.
    public var contextLimit: Int {
        didSet { contextLimit = max(1, min(contextLimit, model.config.maxSequence)) }
    }

    public var path: String { session.path }
    public var tokenIDs: [UInt32] { session.tokenIDs }
    /// Positions left before the context limit.
    public var room: Int { contextLimit - Int(session.nextPosition) }

    private init(model: LlamaModel, session: KVCacheSession, logits: [Float], options: WriterOptions) {
        self.model = model
        self.session = session
        self.logits = logits
        self.options = options
        contextLimit = model.config.maxSequence
    }

    /// What a new file for `model` is: its geometry and RoPE, keys after RoPE, the model's
    /// fingerprint (checked on resume) and where the model came from.
    public static func newFile(for model: LlamaModel, spec: SchemeSpec, segmentTokens: Int, producer: String,
                               metadata: [Manifest.MetadataEntry] = []) -> NewFile {
        let c = model.config
        var file = NewFile(geometry: c.geometry, rope: RoPEConfig(theta: Double(c.ropeTheta), layout: .interleaved, keysArePostRoPE: true),
                           schemes: spec, producer: producer)
        file.segmentTokens = segmentTokens
        file.maxPositions = UInt32(c.maxSequence)
        file.modelFingerprint = model.fingerprint
        file.metadata = [.init("model.path", model.path), .init("model.format", model.format)] + spec.metadata + metadata
        return file
    }

    /// Parses a scheme spec for `model`; a planner that needs calibration (`int:auto`) gets the
    /// statistics of `prompt` run through an in-memory cache.
    /// A planner that measures layer sensitivity (`int:auto:B:measured`) runs the model over the
    /// prompt once per layer and role.
    public static func parseSpec(_ text: String, model: LlamaModel, prompt: [Int]) throws -> SchemeSpec {
        let g = model.config.geometry
        let parsed = try ParsedSchemeSpec(text, geometry: g)
        guard parsed.needsCalibration else { return try parsed.planned(calibration: nil) }
        guard prompt.count >= 8 else {
            throw KVPackError(.needsCalibration, "\(text) plans from calibration statistics, here those of the prompt, which has \(prompt.count) tokens; a planner needs at least 8")
        }
        let cache = DenseKVCache(geometry: g)
        if parsed.needsQueryStatistics { cache.querySums = QueryChannelSums(geometry: g) }
        try model.forward(tokens: prompt, cache: cache)
        var statistics = CacheStatistics(geometry: g, tokens: prompt.count) { layer, head, kind in
            Array(cache.rows(layer: layer, kvHead: head, kind: kind))
        }
        statistics.queryRMS = cache.querySums?.rms ?? []
        if let probe = parsed.sensitivityProbe {
            statistics.sensitivity = try LayerSensitivityProbe.measure(model: model, tokens: prompt, probe: probe,
                                                                        directory: TemporaryDirectory.path)
        }
        return try parsed.planned(calibration: statistics)
    }

    /// Starts a conversation in a new file and feeds `prompt` (one batched prefill).
    public static func start(path: String, model: LlamaModel, spec: SchemeSpec, segmentTokens: Int = 64, prompt: [Int],
                             options: WriterOptions = WriterOptions(), producer: String = "kvpack") throws -> Conversation {
        guard !prompt.isEmpty else { throw ModelError(path, "a conversation starts with at least one token (BOS is 1)") }
        let conversation = try create(path: path, model: model, spec: spec, segmentTokens: segmentTokens, options: options, producer: producer)
        try conversation.feed(prompt)
        return conversation
    }

    /// A new, empty conversation file (the first `feed` gives it tokens).
    public static func create(path: String, model: LlamaModel, spec: SchemeSpec, segmentTokens: Int = 64,
                              options: WriterOptions = WriterOptions(), producer: String = "kvpack",
                              metadata: [Manifest.MetadataEntry] = []) throws -> Conversation {
        let file = newFile(for: model, spec: spec, segmentTokens: segmentTokens, producer: producer, metadata: metadata)
        let session = try KVCacheSession.create(path: path, file: file, options: options)
        return Conversation(model: model, session: session, logits: [], options: options)
    }

    /// Checks that `model` is the model `path` was written with, without modifying the file.
    public static func checkModel(_ model: LlamaModel, matches path: String) throws {
        try checkModel(model, matches: KVPackReader(path: path))
    }

    /// Checks that `model` is the model the file `reader` has open was written with.
    public static func checkModel(_ model: LlamaModel, matches reader: KVPackReader) throws {
        let path = reader.path ?? "the file"
        let m = reader.manifest
        guard m.geometry == model.config.geometry else {
            throw ModelError(path, "was written for \(m.geometry); the model \(model.path) has \(model.config.geometry)")
        }
        guard m.modelFingerprint == model.fingerprint else {
            let recorded = m.metadata("model.path") ?? "an unrecorded path"
            throw ModelError(path, "was written with a different model (fingerprint \(Manifest.fingerprintText(m.modelFingerprint)), from \(recorded)); \(model.path) has fingerprint \(Manifest.fingerprintText(model.fingerprint)). The file was not modified.")
        }
        guard m.rope.layout == .interleaved else {
            throw ModelError(path, "holds keys in \(m.rope.layout) RoPE pairs\(m.rope.layout == .rotateHalf ? " (Hugging Face's layout)" : ""); this model runner stores and attends interleaved pairs (llama.cpp's). `kvpack convert \(path) OUT --rope-layout interleaved` writes a copy it can continue. The file was not modified.")
        }
        guard reader.tokenCount > 0 else { throw ModelError(path, "holds no tokens to continue from") }
    }

    /// Continues the conversation in `path`. Past tokens are attended straight from the mapped
    /// file; the logits to continue from are recomputed for the last token.
    /// `recomputeLogits: false` skips that forward step for callers that feed new tokens before
    /// sampling (a chat's next user turn); `generate` then refuses until something is fed.
    public static func resume(path: String, model: LlamaModel, options: WriterOptions = WriterOptions(),
                              recomputeLogits: Bool = true) throws -> Conversation {
        try resume(reader: KVPackReader(path: path), model: model, options: options, recomputeLogits: recomputeLogits)
    }

    /// Continues the conversation in the file `reader` has open: the model is checked against
    /// it, then the session writes and attends through that one mapping of the file.
    public static func resume(reader: KVPackReader, model: LlamaModel, options: WriterOptions = WriterOptions(),
                              recomputeLogits: Bool = true) throws -> Conversation {
        try checkModel(model, matches: reader)
        let session = try KVCacheSession.resume(reader: reader, options: options)
        let conversation = Conversation(model: model, session: session, logits: [], options: options)
        if recomputeLogits { try conversation.recomputeLogits() }
        return conversation
    }

    /// Recomputes the logits to continue from (the last token's), for a conversation resumed
    /// without them that turns out to need them.
    public func recomputeLogits() throws {
        logits = try model.recomputeLast(tokenID: Int(session.tokenIDs.last!), cache: session)
    }

    /// Feeds tokens (a prompt, a user turn) as one batch.
    public func feed(_ tokens: [Int]) throws {
        try checkRoom(tokens.count)
        logits = try model.forward(tokens: tokens, cache: session)
    }

    /// Samples `steps` tokens, feeding each back; calls `onToken` as each is chosen.
    @discardableResult
    public func generate(steps: Int, sampler: inout Sampler, onToken: (Int) throws -> Void = { _ in }) throws -> [Int] {
        guard steps == 0 || !logits.isEmpty else { throw ModelError(path, "nothing has been fed yet to generate from") }
        try checkRoom(steps)
        var out: [Int] = []
        for _ in 0 ..< steps {
            let next = sampler.sample(logits, recent: session.tokenIDs[...])
            logits = try model.forward(tokens: [next], cache: session)
            out.append(next)
            try onToken(next)
        }
        return out
    }

    /// Samples up to `maxSteps` tokens, feeding each back, and stops before feeding a token in
    /// `stop` (returned as `stopped`; the caller decides what closes the turn).
    /// `interrupted` is asked before each token; when it says yes, generation ends there.
    public func generate(maxSteps: Int, sampler: inout Sampler, stop: Set<Int>, interrupted: () -> Bool = { false },
                         onToken: (Int) throws -> Void = { _ in }) throws -> (tokens: [Int], stopped: Int?) {
        guard !logits.isEmpty else { throw ModelError(path, "nothing has been fed yet to generate from") }
        var out: [Int] = []
        for _ in 0 ..< maxSteps {
            if interrupted() { return (out, nil) }
            let next = sampler.sample(logits, recent: session.tokenIDs[...])
            if stop.contains(next) { return (out, next) }
            try checkRoom(1)
            logits = try model.forward(tokens: [next], cache: session)
            out.append(next)
            try onToken(next)
        }
        return (out, nil)
    }

    private func checkRoom(_ more: Int) throws {
        if more > room {
            let what = contextLimit == model.config.maxSequence ? "the model's context of" : "the context limit of"
            throw ModelError(path, "the conversation would reach position \(Int(session.nextPosition) + more), past \(what) \(contextLimit) tokens")
        }
    }

    /// Keeps only `selection`'s tokens, renumbered 0, 1, 2, ... with their keys rotated to
    /// match (a context shift), in the conversation's own file: the session commits and closes,
    /// the file is rewritten in its own schemes beside itself and renamed over itself (a crash
    /// leaves the old file), and the session resumes on it. The next step must feed tokens
    /// (the logits are dropped). `metadata` joins the file's manifest.
    @discardableResult
    public func shrink(to selection: TokenSelection, metadata: [Manifest.MetadataEntry], tool: String) throws -> Converter.Report {
        try session.commit()
        try session.close()
        var convert = Converter.Options()
        convert.overwrite = true
        convert.durability = options.durability
        convert.repositioned = true
        convert.attentionSamples = 8
        convert.tool = tool
        convert.metadata = metadata
        if session.writer.acceptsNotes { convert.features.insert(.notes) }
        // Every layer keeps the file's own schemes; the spec only fixes the layer count.
        let keepOwn = try SchemeSpec.parse("raw:f32", geometry: model.config.geometry)
        let converted = Result { try Converter.convert(input: path, output: path, spec: keepOwn, layers: [], selection: selection, options: convert) }
        // Resumed either way: on the shifted file, or, when the conversion failed, on the file as
        // it was (the error then says why it could not shrink).
        session = try KVCacheSession.resume(path: path, options: options)
        let report = try converted.get()
        logits = []
        return report
    }

    public func commit() throws { try session.commit() }
    public func close() throws { try session.close() }
}
