#if canImport(Glibc)
import Glibc
#endif
import KVPack

/// `kvpack eval --prune`: what token selection does to a real model. The model reads a text
/// once with a lossless cache (the baseline). At each prune point P the baseline file's first P
/// tokens are observed (`AttentionObserver`), pruned by each policy to each budget
/// (`kvpack prune`'s code path: a real pruned file), and the model then reads the next
/// `continuation` tokens over the pruned file. Their perplexity and greedy choices are compared
/// with the baseline's at the same positions.
public enum PruneEval {
    public struct Options: Sendable {
        public var budgets: [Double] = [0.5, 0.25, 0.1]
        public var policies: [TokenSelection.Policy] = [.kvcrush, .importance, .recent]
        /// Prune points; default every 512 tokens from 512 while a continuation fits.
        public var points: [Int]?
        public var continuation = 256
        /// Selection parameters shared by every policy (budget, policy and representatives are
        /// set per run).
        public var selection = TokenSelection.Parameters()
        /// The pruned files' scheme (raw:f32 measures pruning alone).
        public var storage = "raw:f32"
        /// KVCrush representatives as a share of the budget.
        public var representativeShare = 0.25
        public var segmentTokens = 64
        public var directory: String
        /// Recorded as the pruned files' producer.
        public var tool = "kvpack"
        /// Renumber the kept tokens from 0 with their keys rotated (a context shift) instead of
        /// keeping their original positions.
        public var repositioned = false

        public init(directory: String) { self.directory = directory }
    }

    public struct Result: Sendable, Codable {
        public var policy: String
        public var budget: Double
        /// Kept tokens over context tokens, over all prune points.
        public var keptFraction: Double
        public var perplexity: Double
        public var baselinePerplexity: Double
        public var perplexityDelta: Double
        public var greedyAgreement: Double
        public var evaluatedTokens: Int
    }

    public struct Report: Sendable, Codable {
        public var model: String
        public var text: String
        public var tokens: Int
        public var points: [Int]
        public var continuation: Int
        public var observationWindow: Int
        public var recentWindow: Int
        public var sinkTokens: Int
        public var anchor: String
        public var storage: String
        public var repositioned: Bool
        public var results: [Result]
    }

    public static func run(model: LlamaModel, text: [Int], textSource: String, options: Options,
                           progress: (String) -> Void = { _ in }) throws -> Report {
        let n = text.count
        let points = options.points ?? (n >= 1024 ? Array(stride(from: 512, to: n - 64, by: 512)) : [n / 2])
        guard !points.isEmpty, points.allSatisfy({ $0 >= 2 && $0 < n - 1 }) else {
            throw ModelError(model.path, "prune points \(points) must lie within 2..<\(n - 1) (the text has \(n) tokens)")
        }
        guard options.budgets.allSatisfy({ $0 > 0 && $0 <= 1 }) else {
            throw KVPackError.argument("budgets are fractions in (0, 1], got \(options.budgets)")
        }
        let g = model.config.geometry
        var baseOptions = QualityEval.Options(directory: options.directory)
        baseOptions.segmentTokens = options.segmentTokens
        let baseline = try QualityEval.evaluate(spec: try SchemeSpec.parse("raw:f32", geometry: g), model: model, texts: [text],
                                                options: baseOptions, noise: 0)
        progress("raw:f32 baseline done (\(n) tokens)")
        let source = try KVPackReader(path: baseline.paths[0])
        let storage = try SchemeSpec.parse(options.storage, geometry: g)

        struct Tally { var logProbs: [Double] = []; var base: [Double] = []; var agree = 0; var kept = 0; var context = 0 }
        var tallies: [String: Tally] = [:]
        func key(_ p: TokenSelection.Policy, _ b: Double) -> String { "\(p) \(b)" }
        for point in points {
            let observation = try AttentionObserver.observe(model: model, reader: source, tokens: point, window: options.selection.observationWindow)
            let end = min(n, point + options.continuation + 1)
            for policy in options.policies {
                for budget in options.budgets {
                    var p = options.selection
                    p.policy = policy
                    p.budget = max(1, Int((budget * Double(point)).rounded()))
                    p.representatives = policy == .kvcrush ? Int((options.representativeShare * Double(p.budget)).rounded()) : 0
                    let selection = KVCrush.select(observation, parameters: p)
                    let path = "\(options.directory)/prune-\(policy)-\(budget)-at\(point).kvpack"
                    var convertOptions = Converter.Options()
                    convertOptions.overwrite = true
                    convertOptions.durability = .flush
                    convertOptions.segmentTokens = options.segmentTokens
                    convertOptions.attentionSamples = 0
                    convertOptions.tool = options.tool
                    convertOptions.repositioned = options.repositioned
                    _ = try Converter.convert(input: baseline.paths[0], output: path, spec: storage, selection: selection, options: convertOptions)
                    var writerOptions = WriterOptions()
                    writerOptions.durability = .flush
                    let session = try KVCacheSession.resume(path: path, options: writerOptions)
                    let logits = try model.forward(tokens: Array(text[point ..< end - 1]), cache: session, logits: .all)
                    try session.close()
                    var t = tallies[key(policy, budget)] ?? Tally()
                    let vocab = model.config.vocabSize
                    for i in point ..< end - 1 {
                        let s = QualityEval.Run.score(logits: logits[(i - point) * vocab ..< (i - point + 1) * vocab], target: text[i + 1])
                        t.logProbs.append(s.logProb)
                        t.base.append(baseline.targetLogProbs[i])
                        if s.greedy == baseline.greedy[i] { t.agree += 1 }
                    }
                    t.kept += selection.keptCount
                    t.context += point
                    tallies[key(policy, budget)] = t
                    unlink(path)
                }
            }
            progress("prune point \(point): \(options.policies.count * options.budgets.count) selections evaluated over tokens \(point)..<\(end)")
        }
        var results: [Result] = []
        for policy in options.policies {
            for budget in options.budgets {
                let t = tallies[key(policy, budget)]!
                let ppl = exp(-t.logProbs.reduce(0, +) / Double(t.logProbs.count))
                let base = exp(-t.base.reduce(0, +) / Double(t.base.count))
                results.append(Result(policy: policy.description, budget: budget, keptFraction: Double(t.kept) / Double(t.context),
                                      perplexity: ppl, baselinePerplexity: base, perplexityDelta: ppl - base,
                                      greedyAgreement: Double(t.agree) / Double(t.logProbs.count), evaluatedTokens: t.logProbs.count))
            }
        }
        let s = options.selection
        return Report(model: model.path, text: textSource, tokens: n, points: points, continuation: options.continuation,
                      observationWindow: s.observationWindow, recentWindow: s.recentWindow, sinkTokens: s.sinkTokens,
                      anchor: s.anchor.description, storage: options.storage, repositioned: options.repositioned, results: results)
    }
}
