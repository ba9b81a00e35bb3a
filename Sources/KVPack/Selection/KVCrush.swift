/// Attention weights a model paid to the tokens of a sequence: for each attention head (one per
/// layer and query head, `head = layer * queryHeads + queryHead`), the softmax weight each token
/// received, summed over the observed query positions.
public struct AttentionObservation: Sendable {
    public var heads: Int
    public var tokens: Int
    /// Query positions whose weights were summed.
    public var queries: Int
    /// `heads x tokens`, head-major.
    public var weights: [Float]

    public init(heads: Int, tokens: Int, queries: Int, weights: [Float]) {
        precondition(weights.count == heads * tokens)
        self.heads = heads
        self.tokens = tokens
        self.queries = queries
        self.weights = weights
    }

    /// Cumulative attention per token over every head (H2O's score).
    public func importance() -> [Float] {
        var out = [Float](repeating: 0, count: tokens)
        for h in 0 ..< heads {
            for t in 0 ..< tokens { out[t] += weights[h * tokens + t] }
        }
        return out
    }

    /// One bit per head per token: 1 when the head's weight on the token is above that head's
    /// mean weight over the sequence. Packed `tokens x ceil(heads / 8)` bytes, bit h of token t
    /// at byte `t * S + h / 8`, bit `h % 8`.
    public func signatures() -> [UInt8] {
        let s = (heads + 7) / 8
        var out = [UInt8](repeating: 0, count: tokens * s)
        guard tokens > 0 else { return out }
        for h in 0 ..< heads {
            let row = weights[h * tokens ..< (h + 1) * tokens]
            let threshold = row.reduce(0, +) / Float(tokens)
            for t in 0 ..< tokens where weights[h * tokens + t] > threshold {
                out[t * s + h / 8] |= 1 << UInt8(h % 8)
            }
        }
        return out
    }
}

/// Token selection by head-behaviour signatures (KVCrush, `../shared/METHODS.md` section 2) and
/// the two baselines it is compared with, as one pure function of an observation.
public enum KVCrush {
    /// The representative share when none is given: a quarter of the budget.
    public static func defaultRepresentatives(budget: Int) -> Int { budget / 4 }

    /// Chooses `parameters.budget` tokens of the observed sequence.
    ///
    /// Always kept: the last `recentWindow` tokens (at least one: the last token's position is
    /// where the sequence continues) and the first `sinkTokens`, within the budget. The
    /// rest of the budget goes, by policy, to the most recent remaining tokens (`recent`), to the
    /// top remaining tokens by importance (`importance`), or (`kvcrush`) to the top
    /// `budget' - representatives` by importance plus one representative per bucket of the
    /// tokens that would be dropped: those sorted by Hamming distance of their signature to the
    /// anchor (then by position) and cut into `representatives` equal runs, each contributing its
    /// middle token.
    public static func select(_ observation: AttentionObservation, parameters: TokenSelection.Parameters) -> TokenSelection {
        let n = observation.tokens
        let s = (observation.heads + 7) / 8
        let importance = observation.importance()
        let signatures = observation.signatures()
        let budget = min(max(parameters.budget, 0), n)
        var reason = [TokenSelection.Reason?](repeating: nil, count: n)

        // The last token is always kept: its position is where the sequence continues.
        let recent = min(max(parameters.recentWindow, 1), budget)
        let sink = min(max(parameters.sinkTokens, 0), budget - recent, n - recent)
        for t in 0 ..< sink { reason[t] = .sink }
        for t in n - recent ..< n { reason[t] = .recent }
        let remaining = budget - sink - recent
        let candidates = Array(sink ..< n - recent)
        // Most important first; ties go to the later token.
        let byImportance = candidates.sorted { importance[$0] != importance[$1] ? importance[$0] > importance[$1] : $0 > $1 }
        var anchor = [UInt8](repeating: 0, count: s)

        switch parameters.policy {
        case .recent:
            for t in candidates.suffix(remaining) { reason[t] = .recent }
        case .importance:
            for t in byImportance.prefix(remaining) { reason[t] = .important }
        case .kvcrush:
            let reps = min(max(parameters.representatives, 0), remaining)
            for t in byImportance.prefix(remaining - reps) { reason[t] = .important }
            let evictable = candidates.filter { reason[$0] == nil }
            anchor = makeAnchor(parameters, bits: observation.heads, signatures: signatures, tokens: evictable)
            let distance = { (t: Int) -> Int in
                var d = 0
                for b in 0 ..< s { d += (signatures[t * s + b] ^ anchor[b]).nonzeroBitCount }
                return d
            }
            let ordered = evictable.map { ($0, distance($0)) }.sorted { $0.1 != $1.1 ? $0.1 < $1.1 : $0.0 < $1.0 }.map(\.0)
            let m = ordered.count
            if reps > 0, m > 0 {
                if m <= reps {
                    for t in ordered { reason[t] = .representative }
                } else {
                    for j in 0 ..< reps {
                        let lo = j * m / reps, hi = (j + 1) * m / reps
                        reason[ordered[(lo + hi - 1) / 2]] = .representative
                    }
                }
            }
        }

        var kept: [Int] = [], reasons: [TokenSelection.Reason] = [], keptImportance: [Float] = [], keptSignatures: [UInt8] = []
        for t in 0 ..< n {
            guard let r = reason[t] else { continue }
            kept.append(t)
            reasons.append(r)
            keptImportance.append(max(importance[t], 0))
            keptSignatures += signatures[t * s ..< (t + 1) * s]
        }
        var p = parameters
        p.budget = budget
        return TokenSelection(parameters: p, sourceTokenCount: n, signatureBits: observation.heads, kept: kept, reasons: reasons,
                              importance: keptImportance, signatures: keptSignatures, anchor: anchor)
    }

    /// The anchor signature the evictable tokens are bucketed against.
    static func makeAnchor(_ p: TokenSelection.Parameters, bits: Int, signatures: [UInt8], tokens: [Int]) -> [UInt8] {
        let s = (bits + 7) / 8
        var anchor = [UInt8](repeating: 0, count: s)
        for h in 0 ..< bits {
            let on: Bool
            switch p.anchor {
            case .zeros: on = false
            case .ones: on = true
            case .alternating: on = h % 2 == 0
            case .random: on = false // filled below from one generator
            case .mean:
                let count = tokens.reduce(0) { $0 + Int(signatures[$1 * s + h / 8] >> (h % 8) & 1) }
                on = 2 * count > tokens.count
            }
            if on { anchor[h / 8] |= 1 << UInt8(h % 8) }
        }
        if p.anchor == .random {
            var rng = SplitMix64(seed: p.anchorSeed)
            for h in 0 ..< bits where rng.next() >> 63 == 1 { anchor[h / 8] |= 1 << UInt8(h % 8) }
        }
        return anchor
    }
}
