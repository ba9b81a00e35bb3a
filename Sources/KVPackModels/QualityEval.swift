#if canImport(Glibc)
import Glibc
#endif
import KVPack

/// `kvpack eval`: what a scheme does to a real model. The model reads a fixed text twice per
/// scheme, through a real file-backed session each time: once with a lossless raw f32 cache (the
/// baseline) and once with the scheme. Teacher forcing: both runs see the same tokens.
public enum QualityEval {
    public struct Options: Sendable {
        public var schemes: [String] = ["raw:f16", "raw:bf16"]
        public var storyCount = 4
        /// Tokens in all stories together (each story starts with BOS).
        public var totalTokens = 1280
        public var seed: UInt64 = 1
        public var temperature: Float = 1
        public var segmentTokens = 64
        /// Attention-output error is measured at every n-th position (at least; long texts are
        /// sampled at about 256 positions, since each sample costs a pass over the whole past).
        public var attentionSampleEvery = 4
        /// Files go here (kept for inspection).
        public var directory: String
        /// Planners calibrate on this many tokens from the start of the baseline's cache.
        public var calibrationTokens = 512
        /// Tokens of the first text `int:auto:B:measured` measures layer sensitivity on.
        public var sensitivityTokens = 256
        /// A fixed text (token ids) to read instead of sampled stories: one sequence.
        public var text: [Int]?
        /// Where `text` came from, for the report.
        public var textSource: String?
        /// Testing aid: Gaussian noise, relative to each key row's RMS, added to keys before they
        /// are stored, to show the metrics respond to a damaged cache.
        public var keyNoise: Float = 0
        /// How attention over the quantized files computes (integer dot products where a scheme
        /// has them, or f32 over the decoded codes).
        public var arithmetic: AttentionArithmetic = .fast

        public init(directory: String) { self.directory = directory }
    }

    /// The context length `SchemeResult.asymptoticBitsPerElement` is given for.
    public static let asymptoticTokens = 32768

    public struct SchemeResult: Sendable, Codable {
        public var spec: String
        public var keyBitsPerElement: Double
        public var valueBitsPerElement: Double
        /// Whole files (manifest, index, blobs, tails, headers) per cached K/V element.
        public var totalBitsPerElement: Double
        /// The same file grown to `asymptoticTokens` tokens: sealed blocks at this run's bits per
        /// sealed element, an average tail (window + half a segment) and the sinks at their
        /// tail type's width, blobs spread over every token.
        public var asymptoticBitsPerElement: Double
        public var compressionVsF16: Double
        /// ||K_decoded - K|| / ||K|| over every stored key, K as the model produced it in this run.
        public var keyRelativeError: Double
        public var valueRelativeError: Double
        /// ||attention(decoded) - attention(exact K/V)|| / ||attention(exact)|| at sampled positions.
        public var attentionRelativeError: Double
        public var perplexity: Double
        public var perplexityDelta: Double
        /// Positions where this run's greedy choice equals the baseline's.
        public var greedyAgreement: Double
        /// How a planner chose per-layer settings (`int:auto:...`), if one did.
        public var plan: [String]?
    }

    public struct Report: Sendable, Codable {
        public var model: String
        /// The fixed text read, if one was (else sampled stories).
        public var text: String?
        public var stories: Int
        public var tokens: Int
        public var temperature: Float
        public var seed: UInt64
        public var baseline: SchemeResult
        public var schemes: [SchemeResult]
    }

    /// The evaluation text: `storyCount` stories sampled from BOS by the model itself.
    public static func stories(model: LlamaModel, options: Options) throws -> [[Int]] {
        let per = options.totalTokens / options.storyCount
        guard per >= 2, per <= model.config.maxSequence else {
            throw ModelError(model.path, "\(options.totalTokens) tokens in \(options.storyCount) stories gives \(per) per story; it must be 2...\(model.config.maxSequence)")
        }
        return try (0 ..< options.storyCount).map { s in
            let cache = DenseKVCache(geometry: model.config.geometry)
            var sampler = Sampler(temperature: options.temperature, seed: options.seed &+ UInt64(s))
            var tokens = [1]
            var logits = try model.forward(tokens: [1], cache: cache)
            while tokens.count < per {
                let next = sampler.sample(logits)
                tokens.append(next)
                if tokens.count < per { logits = try model.forward(tokens: [next], cache: cache) }
            }
            return tokens
        }
    }

    public static func run(model: LlamaModel, options: Options, progress: (String) -> Void = { _ in }) throws -> Report {
        let texts: [[Int]]
        if let text = options.text {
            guard text.count >= 2, text.count <= model.config.maxSequence else {
                throw ModelError(model.path, "the evaluation text has \(text.count) tokens; it must be 2...\(model.config.maxSequence) (the context)")
            }
            texts = [text]
            progress("text: \(text.count) tokens from \(options.textSource ?? "the caller")")
        } else {
            texts = try stories(model: model, options: options)
            progress("stories: \(texts.count) x \(texts[0].count) tokens")
        }
        let g = model.config.geometry
        let baseline = try evaluate(spec: try SchemeSpec.parse("raw:f32", geometry: g), model: model, texts: texts, options: options, noise: 0)
        progress("raw:f32 baseline done")
        var results: [SchemeResult] = []
        // Measured sensitivities, one per probe and file options (2 x layers + 1 passes each).
        var measured: [(probe: LayerSetup, fileOptions: SchemeSpec.FileOptions, sensitivity: CacheStatistics.LayerSensitivity)] = []
        // The calibration prefix's statistics and its queries' RMS, computed for the first scheme
        // that needs them and shared by the rest.
        var prefix: CacheStatistics?
        var prefixQueryRMS: [[Double]]?
        for text in options.schemes {
            // Planners (int:auto norms, svdq bases) calibrate on the first `calibrationTokens` of
            // the baseline's cache of the first story: what a prefill would give them.
            let parsed = try ParsedSchemeSpec(text, geometry: g)
            var calibration: CacheStatistics?
            if parsed.needsCalibration {
                if prefix == nil { prefix = try CacheStatistics(reader: KVPackReader(path: baseline.paths[0]), tokens: options.calibrationTokens) }
                var statistics = prefix!
                if parsed.needsQueryStatistics {
                    if prefixQueryRMS == nil {
                        // The same tokens' queries, from one more prefill (the baseline file holds no queries).
                        let cache = DenseKVCache(geometry: g)
                        cache.querySums = QueryChannelSums(geometry: g)
                        try model.forward(tokens: Array(texts[0].prefix(statistics.tokens)), cache: cache)
                        prefixQueryRMS = cache.querySums?.rms ?? []
                    }
                    statistics.queryRMS = prefixQueryRMS!
                }
                if let probe = parsed.sensitivityProbe {
                    if let done = measured.first(where: { $0.probe == probe && $0.fileOptions == parsed.fileOptions }) {
                        statistics.sensitivity = done.sensitivity
                    } else {
                        let s = try LayerSensitivityProbe.measure(
                            model: model, tokens: Array(texts[0].prefix(options.sensitivityTokens)), probe: probe,
                            fileOptions: parsed.fileOptions, segmentTokens: options.segmentTokens, directory: options.directory, progress: progress)
                        measured.append((probe, parsed.fileOptions, s))
                        statistics.sensitivity = s
                    }
                }
                calibration = statistics
            }
            let spec = try parsed.planned(calibration: calibration)
            let run = try evaluate(spec: spec, model: model, texts: texts, options: options, noise: options.keyNoise)
            var result = run.result(baseline: baseline)
            if !spec.rationale.isEmpty { result.plan = spec.rationale }
            results.append(result)
            progress("\(text) done")
        }
        return Report(model: model.path, text: options.text == nil ? nil : options.textSource, stories: texts.count, tokens: texts.reduce(0) { $0 + $1.count },
                      temperature: options.temperature, seed: options.seed,
                      baseline: baseline.result(baseline: baseline), schemes: results)
    }

    /// Everything one scheme's pass over the texts measured.
    struct Run {
        var spec: String
        var paths: [String] = []
        /// Per position with a next token (all stories): log-probability of that token, and the
        /// greedy choice. Whole logit rows are not kept (49,152 floats a position for SmolLM2).
        var targetLogProbs: [Double] = []
        var greedy: [Int] = []
        var keyBytes = 0, valueBytes = 0, fileBytes = 0, elements = 0
        /// For `asymptoticBits`: bytes of sealed blocks and the elements they hold, blob bytes,
        /// and the file's window, sinks, segment size and tail width (the same in every file).
        var sealedBlockBytes = 0, sealedElements = 0, blobBytes = 0, elementsPerToken = 0
        var windowTokens = 0, sinkTokens = 0, segmentTokens = 1, tailBits = 16.0

        /// Bits per element of a file of `tokens` tokens like this run's.
        func asymptoticBits(tokens n: Int) -> Double {
            guard sealedElements > 0, elementsPerToken > 0 else { return Double(fileBytes * 8) / Double(max(2 * elements, 1)) }
            let sealedBits = Double(sealedBlockBytes * 8) / Double(sealedElements)
            let tail = min(Double(n), Double(windowTokens) + Double(segmentTokens - 1) / 2)
            let lossless = tail + Double(sinkTokens)
            return (sealedBits * (Double(n) - tail) + tailBits * lossless) / Double(n)
                + Double(blobBytes * 8) / Double(n * elementsPerToken)
        }
        var keyError = RelativeError(), valueError = RelativeError(), attentionError = RelativeError()

        func result(baseline: Run) -> SchemeResult {
            let ppl = perplexity()
            let agree = zip(greedy, baseline.greedy).filter { $0 == $1 }.count
            let total = Double(fileBytes * 8) / Double(2 * elements)
            return SchemeResult(spec: spec, keyBitsPerElement: Double(keyBytes * 8) / Double(elements),
                                valueBitsPerElement: Double(valueBytes * 8) / Double(elements), totalBitsPerElement: total,
                                asymptoticBitsPerElement: asymptoticBits(tokens: QualityEval.asymptoticTokens),
                                compressionVsF16: 16 / total, keyRelativeError: keyError.relative,
                                valueRelativeError: valueError.relative, attentionRelativeError: attentionError.relative,
                                perplexity: ppl, perplexityDelta: ppl - baseline.perplexity(),
                                greedyAgreement: Double(agree) / Double(max(greedy.count, 1)), plan: nil)
        }

        func perplexity() -> Double {
            exp(-targetLogProbs.reduce(0, +) / Double(max(targetLogProbs.count, 1)))
        }

        mutating func record(logits l: ArraySlice<Float>, target: Int) {
            let s = Self.score(logits: l, target: target)
            targetLogProbs.append(s.logProb)
            greedy.append(s.greedy)
        }

        /// log p(target) under softmax(logits), and the greedy choice.
        static func score(logits l: ArraySlice<Float>, target: Int) -> (logProb: Double, greedy: Int) {
            let m = Double(l.max() ?? 0)
            let logSum = log(l.reduce(0.0) { $0 + exp(Double($1) - m) }) + m
            return (Double(l[l.startIndex + target]) - logSum, Sampler.argmax(l))
        }
    }

    /// Reads `text` by teacher forcing through `cache`, handing each position's logits and the
    /// next token to `body`. Batches end where segments seal (with a lossless window W, at
    /// W + k * segmentTokens tokens), so every token attends to exactly what it would token by
    /// token: earlier segments as the file encodes them, the rest as tail rows.
    static func teacherForce(model: LlamaModel, text: [Int], cache: KVCache, segmentTokens: Int, windowTokens: Int,
                             _ body: (ArraySlice<Float>, Int) -> Void) throws {
        let vocab = model.config.vocabSize
        var at = 0
        while at < text.count {
            let phase = ((at - windowTokens) % segmentTokens + segmentTokens) % segmentTokens
            let end = min(text.count, at + segmentTokens - phase)
            let logits = try model.forward(tokens: Array(text[at ..< end]), cache: cache, logits: .all)
            for i in at ..< end where i + 1 < text.count { body(logits[(i - at) * vocab ..< (i - at + 1) * vocab], text[i + 1]) }
            at = end
        }
    }

    static func evaluate(spec: SchemeSpec, model: LlamaModel, texts: [[Int]], options: Options, noise: Float) throws -> Run {
        let g = model.config.geometry
        var run = Run(spec: spec.text)
        let segmentTokens = try spec.segmentTokens(requested: nil, fallback: options.segmentTokens)
        let windowTokens = spec.fileOptions.windowTokens
        for (s, text) in texts.enumerated() {
            let name = spec.text.map { $0.isLetter || $0.isNumber ? $0 : "_" }
            let path = "\(options.directory)/eval-\(String(name))-story\(s)\(noise > 0 ? "-noisy" : "").kvpack"
            run.paths.append(path)
            let file = Conversation.newFile(for: model, spec: spec, segmentTokens: segmentTokens, producer: "kvpack eval")
            var writerOptions = WriterOptions()
            writerOptions.durability = .flush
            writerOptions.overwrite = true
            let session = try KVCacheSession.create(path: path, file: file, options: writerOptions, arithmetic: options.arithmetic)
            let recorder = RecordingCache(inner: session, noise: noise, seed: options.seed &+ UInt64(s), sampleEvery: max(options.attentionSampleEvery, text.count / 256))
            try teacherForce(model: model, text: text, cache: recorder, segmentTokens: segmentTokens, windowTokens: windowTokens) { logits, target in
                run.record(logits: logits, target: target)
            }
            try session.close()
            run.attentionError.add(recorder.attentionError)
            // Reconstruction: what the finished file decodes to, against what the model produced.
            let reader = try KVPackReader(path: path)
            for layer in 0 ..< g.layerCount {
                for head in 0 ..< g.kvHeadCount {
                    for kind in KVKind.allCases {
                        let decoded = try reader.decode(layer: layer, kvHead: head, kind: kind)
                        let exact = recorder.exact(layer: layer, kvHead: head, kind: kind)
                        decoded.withUnsafeBufferPointer { d in
                            exact.withUnsafeBufferPointer { e in
                                if kind == .key { run.keyError.add(d.baseAddress!, e.baseAddress!, d.count) } else { run.valueError.add(d.baseAddress!, e.baseAddress!, d.count) }
                            }
                        }
                    }
                }
            }
            let summary = try FileSummary(reader: reader)
            run.keyBytes += summary.layers.reduce(0) { $0 + $1.keyBytes }
            run.valueBytes += summary.layers.reduce(0) { $0 + $1.valueBytes }
            // Bits count what the cache holds: superseded frames (tail runs of tokens sealed
            // since, which a window leaves behind at every commit, and older index frames) are
            // not part of it; `kvpack convert` writes the file without them.
            run.fileBytes += summary.fileSize - Validator.validate(file: reader.file, path: path).supersededBytes
            // Sealed blocks alone: every stream's stored bytes less its lossless rows (the tail,
            // and the sink rows once segment 0 is sealed).
            let m = reader.manifest, d = g.headDim
            let lossless = reader.tokenCount - reader.sealedTokenCount + (reader.sealedTokenCount > 0 ? m.sinkTokens : 0)
            let widths = (0 ..< g.streamCount).map { m.schemes[m.scheme(forStream: $0)].residualType.byteWidth }
            run.sealedBlockBytes += try reader.streamBytes().reduce(0, +) - lossless * d * widths.reduce(0, +)
            run.sealedElements += reader.sealedTokenCount * d * g.streamCount
            run.blobBytes += summary.blobBytes
            run.elementsPerToken = d * g.streamCount
            run.windowTokens = m.windowTokens
            run.sinkTokens = m.sinkTokens
            run.segmentTokens = m.segmentTokens
            run.tailBits = Double(8 * widths.max()!)
            run.elements += reader.tokenCount * g.headDim * g.kvHeadCount * g.layerCount
        }
        return run
    }
}

/// Passes a forward pass through to a session, keeping the exact K/V rows the model produced
/// (before any encoding) and measuring, at sampled positions, how far the session's attention is
/// from dense attention over those exact rows.
final class RecordingCache: KVCache {
    let inner: KVCache
    let noise: Float
    var rng: SplitMix64
    let sampleEvery: Int
    /// [layer * kvHeads + head][token * headDim]
    private var keys: [[Float]], values: [[Float]]
    var attentionError = RelativeError()
    private var noisy: [Float]

    init(inner: KVCache, noise: Float, seed: UInt64, sampleEvery: Int) {
        self.inner = inner
        self.noise = noise
        rng = SplitMix64(seed: seed ^ 0xA77E)
        self.sampleEvery = max(sampleEvery, 1)
        let n = inner.geometry.layerCount * inner.geometry.kvHeadCount
        keys = Array(repeating: [], count: n)
        values = keys
        noisy = []
    }

    var geometry: ModelGeometry { inner.geometry }
    var tokenCount: Int { inner.tokenCount }
    var batchPositions: [UInt32] { inner.batchPositions }
    var nextPosition: UInt32 { inner.nextPosition }
    func beginBatch(tokenIDs: [UInt32], positions: [UInt32]?) throws { try inner.beginBatch(tokenIDs: tokenIDs, positions: positions) }
    func endBatch() throws { try inner.endBatch() }

    func store(layer: Int, index: Int, keys k: UnsafePointer<Float>, values v: UnsafePointer<Float>) {
        let g = geometry, d = g.headDim
        for h in 0 ..< g.kvHeadCount {
            keys[layer * g.kvHeadCount + h] += UnsafeBufferPointer(start: k + h * d, count: d)
            values[layer * g.kvHeadCount + h] += UnsafeBufferPointer(start: v + h * d, count: d)
        }
        guard noise > 0 else { return inner.store(layer: layer, index: index, keys: k, values: v) }
        let n = g.kvHeadCount * d
        noisy = Array(UnsafeBufferPointer(start: k, count: n))
        for h in 0 ..< g.kvHeadCount {
            let row = noisy[h * d ..< (h + 1) * d]
            let rms = (row.reduce(0) { $0 + $1 * $1 } / Float(d)).squareRoot()
            for i in h * d ..< (h + 1) * d { noisy[i] += noise * rms * Float(rng.nextGaussian()) }
        }
        noisy.withUnsafeBufferPointer { inner.store(layer: layer, index: index, keys: $0.baseAddress!, values: v) }
    }

    func attend(layer: Int, kvHead: Int, queries: UnsafePointer<Float>, count: Int, scale: Float?,
                output: UnsafeMutablePointer<Float>) throws {
        try inner.attend(layer: layer, kvHead: kvHead, queries: queries, count: count, scale: scale, output: output)
        guard count % sampleEvery == 0 else { return }
        let g = geometry, d = g.headDim, i = layer * g.kvHeadCount + kvHead
        let q = UnsafeBufferPointer(start: queries, count: g.groupSize * d)
        let reference = keys[i].withUnsafeBufferPointer { k in
            values[i].withUnsafeBufferPointer { v in
                DenseAttention.reference(queries: q, keys: UnsafeBufferPointer(rebasing: k[0 ..< count * d]),
                                         values: UnsafeBufferPointer(rebasing: v[0 ..< count * d]), groupSize: g.groupSize, headDim: d, scale: scale)
            }
        }
        reference.withUnsafeBufferPointer { attentionError.add(output, $0.baseAddress!, $0.count) }
    }

    func exact(layer: Int, kvHead: Int, kind: KVKind) -> [Float] {
        let i = layer * geometry.kvHeadCount + kvHead
        return kind == .key ? keys[i] : values[i]
    }
}
