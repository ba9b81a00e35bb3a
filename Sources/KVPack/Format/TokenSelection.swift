/// Which tokens of a longer sequence a file keeps, and why (Spec/: "Token selection (`tsel`)").
///
/// A pruned file's tokens `[0, keptCount)` are the kept tokens, in their original order and at
/// their original RoPE positions (the index records the positions, as for every token); tokens
/// appended later follow them. This record says what they were chosen from and how: the source
/// token each one was, its importance, its head-behaviour signature, and the policy's parameters,
/// so the selection can be inspected, reproduced, and re-applied when the conversation grows.
/// Attention needs none of it, so the frame is ancillary: a reader that ignores it still computes
/// attention over the kept tokens correctly.
public struct TokenSelection: Sendable, Equatable {
    public enum Policy: UInt8, Sendable, CaseIterable, CustomStringConvertible {
        /// KVCrush: top tokens by importance, plus one representative per bucket of the tokens
        /// that would be dropped, bucketed by Hamming distance of their signature to an anchor.
        case kvcrush = 1
        /// Keep the most recent tokens only (besides the sink tokens).
        case recent = 2
        /// Keep the top tokens by importance only (H2O-like).
        case importance = 3

        public var description: String {
            switch self {
            case .kvcrush: "kvcrush"
            case .recent: "recent"
            case .importance: "importance"
            }
        }

        public init?(name: String) {
            switch name {
            case "kvcrush", "crush": self = .kvcrush
            case "recent": self = .recent
            case "importance", "h2o": self = .importance
            default: return nil
            }
        }
    }

    public enum Anchor: UInt8, Sendable, CaseIterable, CustomStringConvertible {
        /// Bits from SplitMix64(anchorSeed): bit h is the top bit of the h-th output.
        case random = 1
        case zeros = 2
        case ones = 3
        /// Bit h is 1 for even h.
        case alternating = 4
        /// Bit h is 1 when more than half of the tokens being bucketed have it set.
        case mean = 5

        public var description: String {
            switch self {
            case .random: "random"
            case .zeros: "zeros"
            case .ones: "ones"
            case .alternating: "alternating"
            case .mean: "mean"
            }
        }

        public init?(name: String) {
            guard let a = Self.allCases.first(where: { $0.description == name }) else { return nil }
            self = a
        }
    }

    /// Why a token was kept.
    public enum Reason: UInt8, Sendable, CaseIterable {
        /// One of the first `sinkTokens` (BOS, the attention sink).
        case sink = 1
        /// One of the last `recentWindow` tokens, or kept by the `recent` policy.
        case recent = 2
        /// Among the top tokens by importance.
        case important = 3
        /// A KVCrush bucket's representative.
        case representative = 4
    }

    public struct Parameters: Sendable, Equatable {
        public var policy: Policy = .kvcrush
        public var anchor: Anchor = .random
        public var anchorSeed: UInt64 = 1
        /// Tokens to keep in all (sink, recent window, important and representatives).
        public var budget: Int = 0
        /// KVCrush bucket count: representatives kept from the tokens importance would drop.
        public var representatives: Int = 0
        /// The last tokens, always kept.
        public var recentWindow: Int = 16
        /// The first tokens, always kept.
        public var sinkTokens: Int = 1
        /// Queries whose attention weights were observed (the last this-many positions).
        public var observationWindow: Int = 32

        public init() {}
    }

    public var parameters: Parameters
    /// Tokens the selection chose from (the source's first `sourceTokenCount`).
    public var sourceTokenCount: Int
    /// Bits per signature: one per observed attention head.
    public var signatureBits: Int
    /// Source token index of each kept token, strictly increasing.
    public var kept: [Int]
    public var reasons: [Reason]
    /// Cumulative attention each kept token received over the observed heads and queries.
    public var importance: [Float]
    /// `keptCount * signatureBytes` bytes: bit h of token i is bit `h % 8` of byte `i * S + h / 8`.
    public var signatures: [UInt8]
    /// `signatureBytes` bytes, same bit order.
    public var anchor: [UInt8]

    public init(parameters: Parameters, sourceTokenCount: Int, signatureBits: Int, kept: [Int], reasons: [Reason],
                importance: [Float], signatures: [UInt8], anchor: [UInt8]) {
        self.parameters = parameters
        self.sourceTokenCount = sourceTokenCount
        self.signatureBits = signatureBits
        self.kept = kept
        self.reasons = reasons
        self.importance = importance
        self.signatures = signatures
        self.anchor = anchor
    }

    public var keptCount: Int { kept.count }
    public var signatureBytes: Int { (signatureBits + 7) / 8 }

    public func signatureBit(token i: Int, head h: Int) -> Bool {
        signatures[i * signatureBytes + h / 8] >> (h % 8) & 1 == 1
    }

    static let tag = FrameTag("tsel")
    static let parameterBytes = 24
    /// Signatures longer than this are refused (a million heads is far beyond any model).
    static let maxSignatureBits = 1 << 20

    static func payloadSize(kept: Int, signatureBits: Int) -> UInt64? {
        let s = UInt64((signatureBits + 7) / 8)
        let (perToken, o1) = (9 + s).multipliedReportingOverflow(by: UInt64(kept))
        guard !o1 else { return nil }
        let (total, o2) = perToken.addingReportingOverflow(UInt64(parameterBytes) + s)
        return o2 ? nil : total
    }

    /// Type fields of the frame header (offsets 32..55).
    var typeFields: FrameHeader.TypeFields {
        var f = FrameHeader.FieldPacker()
        f.set(32, UInt32(keptCount))
        f.set(36, UInt32(sourceTokenCount))
        f.set(40, UInt32(signatureBits))
        f.set(44, parameters.policy.rawValue)
        f.set(45, parameters.anchor.rawValue)
        f.set(48, parameters.anchorSeed)
        return f.words
    }

    /// The frame payload (Spec/: parameters, source indices, importance, reasons, anchor, signatures).
    func encodedPayload() -> [UInt8] {
        var w = ByteWriter(capacity: Int(Self.payloadSize(kept: keptCount, signatureBits: signatureBits) ?? 0))
        let p = parameters
        for v in [p.budget, p.representatives, p.recentWindow, p.sinkTokens, p.observationWindow, 0] { w.write(UInt32(v)) }
        for i in kept { w.write(UInt32(i)) }
        for x in importance { w.write(x.bitPattern) }
        w.bytes += reasons.map(\.rawValue)
        w.bytes += anchor
        w.bytes += signatures
        return w.bytes
    }

    /// Checks a selection before it is written: the same rules a reader applies.
    func validate(fileTokens: Int) throws {
        let k = keptCount, s = signatureBytes
        guard (0 ... Self.maxSignatureBits).contains(signatureBits), reasons.count == k, importance.count == k,
              signatures.count == k * s, anchor.count == s, k <= sourceTokenCount, k <= fileTokens,
              sourceTokenCount <= Int(UInt32.max) else {
            throw KVPackError.argument("the token selection is inconsistent (\(k) kept of \(sourceTokenCount), \(signatureBits) signature bits, file has \(fileTokens) tokens)")
        }
        for i in 0 ..< k where kept[i] < 0 || kept[i] >= sourceTokenCount || (i > 0 && kept[i] <= kept[i - 1]) {
            throw KVPackError.argument("kept token indices must increase strictly within 0..<\(sourceTokenCount); entry \(i) is \(kept[i])")
        }
    }

    /// Parses and checks a `tsel` frame whose header has been verified. `fileTokens` is the
    /// committed token count (the kept tokens are the file's first `keptCount`).
    static func decode(header h: FrameHeader, file: UnsafeRawBufferPointer, fileTokens: Int) throws -> TokenSelection {
        let at = h.offset
        guard h.tag == tag else { throw KVPackError.invalid(at, "tsel.tag", "expected a tsel frame, found \(h.tag)") }
        guard !h.isCompressed else { throw KVPackError.invalid(at + 4, "tsel.flags", "a tsel frame is never compressed") }
        let k = Int(h.field32(32)), n = Int(h.field32(36)), bits = Int(h.field32(40))
        guard k <= fileTokens else {
            throw KVPackError.invalid(at + 32, "tsel.keptCount", "is \(k); the commit holds \(fileTokens) tokens")
        }
        guard k <= n else { throw KVPackError.invalid(at + 36, "tsel.sourceTokenCount", "is \(n), fewer than the \(k) kept") }
        guard bits <= maxSignatureBits else {
            throw KVPackError.invalid(at + 40, "tsel.signatureBits", "is \(bits), more than the limit \(maxSignatureBits)")
        }
        guard let policy = Policy(rawValue: h.field8(44)) else {
            throw KVPackError.invalid(at + 44, "tsel.policy", "is \(h.field8(44)), not 1 (kvcrush), 2 (recent) or 3 (importance)")
        }
        guard let anchor = Anchor(rawValue: h.field8(45)) else {
            throw KVPackError.invalid(at + 45, "tsel.anchor", "is \(h.field8(45)), not 1...5")
        }
        guard let size = payloadSize(kept: k, signatureBits: bits), size == h.storedLength, h.rawLength == size else {
            throw KVPackError.invalid(at + 8, "tsel.storedLength",
                                      "is \(h.storedLength); \(k) kept tokens with \(bits)-bit signatures need \(payloadSize(kept: k, signatureBits: bits).map(String.init) ?? "more than 2^64")")
        }
        try h.verifyPayload(in: file, field: "tsel")
        var c = ByteCursor(h.storedPayload(in: file), base: h.payloadOffset, structure: "tsel")
        var p = Parameters()
        p.policy = policy
        p.anchor = anchor
        p.anchorSeed = h.field64(48)
        p.budget = Int(try c.read(UInt32.self, "budget"))
        p.representatives = Int(try c.read(UInt32.self, "representatives"))
        p.recentWindow = Int(try c.read(UInt32.self, "recentWindow"))
        p.sinkTokens = Int(try c.read(UInt32.self, "sinkTokens"))
        p.observationWindow = Int(try c.read(UInt32.self, "observationWindow"))
        _ = try c.read(UInt32.self, "reserved")
        var kept: [Int] = []
        kept.reserveCapacity(k)
        for i in 0 ..< k {
            let entry = c.absolutePosition
            let v = Int(try c.read(UInt32.self, "sourceIndex"))
            guard v < n, kept.last.map({ v > $0 }) ?? true else {
                throw KVPackError.invalid(entry, "tsel.sourceIndex[\(i)]", "is \(v); indices increase strictly and stay below sourceTokenCount \(n)")
            }
            kept.append(v)
        }
        var importance: [Float] = []
        importance.reserveCapacity(k)
        for i in 0 ..< k {
            let entry = c.absolutePosition
            let x = Float(bitPattern: try c.read(UInt32.self, "importance"))
            guard x.isFinite, x >= 0 else { throw KVPackError.invalid(entry, "tsel.importance[\(i)]", "is \(x); must be finite and >= 0") }
            importance.append(x)
        }
        var reasons: [Reason] = []
        reasons.reserveCapacity(k)
        for i in 0 ..< k {
            let entry = c.absolutePosition
            let raw = try c.read(UInt8.self, "reason")
            guard let r = Reason(rawValue: raw) else { throw KVPackError.invalid(entry, "tsel.reason[\(i)]", "is \(raw), not 1...4") }
            reasons.append(r)
        }
        let s = (bits + 7) / 8
        let anchorBytes = Array(try c.readBytes(s, "anchor"))
        let signatures = Array(try c.readBytes(k * s, "signatures"))
        return TokenSelection(parameters: p, sourceTokenCount: n, signatureBits: bits, kept: kept, reasons: reasons,
                              importance: importance, signatures: signatures, anchor: anchorBytes)
    }

    /// One line for `kvpack info`.
    public var summary: String {
        let p = parameters
        var counts: [Reason: Int] = [:]
        for r in reasons { counts[r, default: 0] += 1 }
        let parts = [(Reason.sink, "sink"), (.recent, "recent"), (.important, "important"), (.representative, "representative")]
            .compactMap { r, name in counts[r].map { "\($0) \(name)" } }
        var text = "\(p.policy): tokens 0..<\(keptCount) are \(keptCount) of \(sourceTokenCount) source tokens (\(parts.joined(separator: ", "))); budget \(p.budget), sink \(p.sinkTokens), recent \(p.recentWindow), \(p.observationWindow) observed queries, \(signatureBits)-bit signatures"
        if p.policy == .kvcrush { text += ", \(p.representatives) buckets, anchor \(p.anchor)" + (p.anchor == .random ? " (seed \(p.anchorSeed))" : "") }
        return text
    }
}
