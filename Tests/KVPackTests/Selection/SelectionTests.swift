import Foundation
import Testing
@testable import KVPack

/// Token selection (KVCrush and its baselines), pruned files (`tsel` frames) and attention over them.
struct SelectionTests {
    static let geometry = ModelGeometry(layerCount: 2, queryHeadCount: 4, kvHeadCount: 2, headDim: 8)

    /// A made-up observation with structure: a few heavy hitters, two families of heads.
    static func observation(tokens n: Int, heads: Int = 8, seed: UInt64 = 3) -> AttentionObservation {
        var rng = SplitMix64(seed: seed)
        var w = [Float](repeating: 0, count: heads * n)
        for h in 0 ..< heads {
            for t in 0 ..< n {
                var x = Float(rng.nextUniform()) * 0.2
                if t % 7 == h % 2 { x += 1 }
                if t % 23 == 0 { x += 3 }
                w[h * n + t] = x / Float(n)
            }
        }
        return AttentionObservation(heads: heads, tokens: n, queries: 4, weights: w)
    }

    static func parameters(_ policy: TokenSelection.Policy, budget: Int, representatives: Int = 0,
                           anchor: TokenSelection.Anchor = .random) -> TokenSelection.Parameters {
        var p = TokenSelection.Parameters()
        p.policy = policy
        p.budget = budget
        p.representatives = representatives
        p.recentWindow = 5
        p.sinkTokens = 2
        p.anchor = anchor
        return p
    }

    @Test("selection keeps the budget, the sink and recent tokens, in order, by each policy's rule")
    func policies() {
        let n = 150
        let obs = Self.observation(tokens: n)
        let importance = obs.importance()
        for policy in TokenSelection.Policy.allCases {
            for budget in [1, 2, 7, 15, 40, 149, 150, 400] {
                let s = KVCrush.select(obs, parameters: Self.parameters(policy, budget: budget, representatives: budget / 4))
                let want = min(budget, n)
                #expect(s.keptCount == want, "\(policy) \(budget)")
                #expect(s.kept == s.kept.sorted() && Set(s.kept).count == s.kept.count)
                #expect(s.kept.last == n - 1, "the last token is always kept")
                #expect(s.reasons.count == s.keptCount && s.importance.count == s.keptCount)
                #expect(s.signatures.count == s.keptCount * 1)
                if want >= 7 {
                    #expect(Array(s.kept.prefix(2)) == [0, 1], "sink tokens")
                    #expect(Array(s.kept.suffix(5)) == Array(n - 5 ..< n), "recent window")
                }
                let middle = s.kept.enumerated().filter { s.reasons[$0.offset] != .sink && !(n - 5 ..< n).contains($0.element) }.map(\.element)
                switch policy {
                case .recent:
                    if want >= 7 { #expect(middle == Array(n - 5 - middle.count ..< n - 5)) }
                case .importance:
                    // Every kept middle token is at least as important as every dropped one.
                    let dropped = Set(2 ..< n - 5).subtracting(middle)
                    if let low = middle.map({ importance[$0] }).min(), let high = dropped.map({ importance[$0] }).max(), want >= 7 {
                        #expect(low >= high)
                    }
                case .kvcrush:
                    let reps = s.reasons.filter { $0 == .representative }.count
                    if want >= 7 && want < n { #expect(reps == min(budget / 4, want - 7)) }
                }
            }
        }
    }

    @Test("representatives come from distinct Hamming-distance buckets; anchors are deterministic")
    func buckets() {
        // Independent random weights: signatures spread over many Hamming distances.
        var rng = SplitMix64(seed: 21)
        let obs = AttentionObservation(heads: 13, tokens: 200, queries: 1, weights: (0 ..< 13 * 200).map { _ in Float(rng.nextUniform()) })
        let signatures = obs.signatures()
        #expect(signatures.count == 200 * 2)
        for anchor in TokenSelection.Anchor.allCases {
            let p = Self.parameters(.kvcrush, budget: 60, representatives: 10, anchor: anchor)
            let a = KVCrush.select(obs, parameters: p), b = KVCrush.select(obs, parameters: p)
            #expect(a == b, "\(anchor) is deterministic")
            #expect(a.anchor.count == 2 && a.anchor[1] & 0xE0 == 0, "bits beyond 13 are zero")
            let reps = a.kept.indices.filter { a.reasons[$0] == .representative }
            #expect(reps.count == 10)
            switch anchor {
            case .zeros: #expect(a.anchor == [0, 0])
            case .ones: #expect(a.anchor == [0xFF, 0x1F])
            case .alternating: #expect(a.anchor == [0x55, 0x15])
            default: break
            }
            // Representatives spread over the distance range rather than bunching at one end.
            let distance = { (i: Int) in zip(a.signatures[i * 2 ..< i * 2 + 2], a.anchor).reduce(0) { $0 + ($1.0 ^ $1.1).nonzeroBitCount } }
            let d = reps.map(distance)
            #expect(Set(d).count >= 3, "\(anchor): representative distances \(d)")
        }
        var seeded = Self.parameters(.kvcrush, budget: 60, representatives: 10)
        seeded.anchorSeed = 99
        #expect(KVCrush.select(obs, parameters: seeded).anchor != KVCrush.select(obs, parameters: Self.parameters(.kvcrush, budget: 60, representatives: 10)).anchor)
    }

    /// A 150-token source file, pruned by the given policy into `spec`.
    static func pruned(spec: String, policy: TokenSelection.Policy = .kvcrush, budget: Int = 40) throws -> (source: KVPackReader, out: KVPackReader, selection: TokenSelection, dir: String) {
        let dir = temporaryDirectory()
        let data = RandomKV(geometry: geometry, tokens: 150, seed: 11, maxExponent: 5)
        try writeFile(dir + "/src.kvpack", data: data, segmentTokens: 16, spec: "raw:f32", batches: [9, 30, 1], commitsAfter: [40, 80])
        let selection = KVCrush.select(Self.observation(tokens: 150, heads: geometry.layerCount * geometry.queryHeadCount),
                                       parameters: Self.parameters(policy, budget: budget, representatives: 8))
        var options = Converter.Options()
        options.durability = .flush
        _ = try Converter.convert(input: dir + "/src.kvpack", output: dir + "/out.kvpack", spec: SchemeSpec.parse(spec, geometry: geometry),
                                  selection: selection, options: options)
        return (try KVPackReader(path: dir + "/src.kvpack"), try KVPackReader(path: dir + "/out.kvpack"), selection, dir)
    }

    @Test("attention over a pruned file equals dense attention over the source's kept tokens")
    func attentionOverKeptTokens() throws {
        let (source, out, selection, _) = try Self.pruned(spec: "raw:f32")
        #expect(out.tokenCount == selection.keptCount)
        let sourcePositions = try source.positions
        #expect(try out.positions == selection.kept.map { sourcePositions[$0] }, "original positions are kept")
        let sourceTokenIDs = try source.tokenIDs
        #expect(try out.tokenIDs == selection.kept.map { sourceTokenIDs[$0] })
        let g = Self.geometry
        var rng = SplitMix64(seed: 5)
        for layer in 0 ..< g.layerCount {
            for head in 0 ..< g.kvHeadCount {
                let q = (0 ..< g.groupSize * g.headDim).map { _ in Float(rng.nextGaussian()) }
                let keys = try source.decode(layer: layer, kvHead: head, kind: .key)
                let values = try source.decode(layer: layer, kvHead: head, kind: .value)
                let d = g.headDim
                let keptKeys = selection.kept.flatMap { keys[$0 * d ..< ($0 + 1) * d] }
                let keptValues = selection.kept.flatMap { values[$0 * d ..< ($0 + 1) * d] }
                let want = DenseAttention.reference(queries: q, keys: keptKeys, values: keptValues, groupSize: g.groupSize, headDim: d)
                let got = try out.attend(layer: layer, kvHead: head, queries: q)
                #expect(DenseAttention.maxRelativeError(got, want) < 1e-5)
                // ... and differs from attention over every token (the test can fail).
                let all = DenseAttention.reference(queries: q, keys: keys, values: values, groupSize: g.groupSize, headDim: d)
                #expect(DenseAttention.maxRelativeError(got, all) > 1e-3)
            }
        }
    }

    @Test("a pruned file records its selection (format 1.4 or 2.0), validates, and composes with lossy schemes")
    func selectionRecord() throws {
        for spec in ["raw:f16", "int:k4v2", "polar:r3a4+v:int:k4v2"] {
            let (_, out, selection, _) = try Self.pruned(spec: spec, policy: .importance, budget: 33)
            #expect(out.header.major == 2 && out.header.minor == 0, "2.0 defines tsel")
            #expect(try out.tokenSelection() == selection, "\(spec)")
            #expect(Validator.validate(file: out.file, path: "out", deep: true).isValid)
            #expect(try FileSummary(reader: out).tokenSelection?.hasPrefix("importance: tokens 0..<33 are 33 of 150") == true)
            try expectAttentionMatchesDecoded(out, label: spec, seed: 8, ranges: [0 ..< 33, 3 ..< 20])
        }
    }

    @Test("a pruned file resumes: appends keep the selection through index rewrites, and it prunes again")
    func resumeAndPruneAgain() throws {
        let (_, out, selection, dir) = try Self.pruned(spec: "raw:f32")
        let path = dir + "/out.kvpack"
        let last = try out.positions.last!
        var options = testOptions()
        options.maxIndexChain = 2
        let writer = try KVPackWriter.resume(path: path, options: options)
        let g = Self.geometry
        let more = RandomKV(geometry: g, tokens: 50, seed: 12)
        for t in 0 ..< 50 {
            try more.append(to: writer, t ..< t + 1, positions: [last + 1 + UInt32(t)])
            if t % 3 == 0 { try writer.commit() }
        }
        #expect(throws: KVPackError.self) { try writer.attach(selection: selection) }
        try writer.close()
        let grown = try KVPackReader(path: path)
        #expect(grown.tokenCount == selection.keptCount + 50)
        #expect(try grown.tokenSelection() == selection, "the FULL index rewrites carry the tsel entry")
        #expect(Validator.validate(file: grown.file, path: path, deep: true).isValid)

        let again = KVCrush.select(Self.observation(tokens: grown.tokenCount, heads: 8), parameters: Self.parameters(.kvcrush, budget: 30, representatives: 5))
        var o = Converter.Options()
        o.durability = .flush
        _ = try Converter.convert(input: path, output: dir + "/again.kvpack", spec: SchemeSpec.parse("raw:f32", geometry: g), selection: again, options: o)
        let twice = try KVPackReader(path: dir + "/again.kvpack")
        let grownPositions = try grown.positions
        #expect(try twice.positions == again.kept.map { grownPositions[$0] })
        #expect(try twice.tokenSelection()?.sourceTokenCount == grown.tokenCount)
    }

    @Test("a writer refuses a selection on a version 1 file created before 1.4, and an inconsistent one")
    func writerChecks() throws {
        let dir = temporaryDirectory()
        let data = RandomKV(geometry: Self.geometry, tokens: 20, seed: 1)
        let w = try writeFile(dir + "/a.kvpack", data: data, segmentTokens: 8, spec: "raw:f16", batches: [20],
                              options: testOptions(major: 1))
        _ = w
        let writer = try KVPackWriter.resume(path: dir + "/a.kvpack", options: testOptions())
        let s = KVCrush.select(Self.observation(tokens: 20), parameters: Self.parameters(.recent, budget: 10))
        #expect(throws: KVPackError.self) { try writer.attach(selection: s) }
        try writer.close()
        var bad = s
        bad.kept[3] = bad.kept[2]
        #expect(throws: KVPackError.self) { try bad.validate(fileTokens: 20) }
        bad = s
        bad.signatures.removeLast()
        #expect(throws: KVPackError.self) { try bad.validate(fileTokens: 20) }
        #expect(throws: KVPackError.self) { try s.validate(fileTokens: 5) }
    }

    @Test("damaged tsel frames: each field's lie is a clear error from tokenSelection and validate, never a trap; the tokens still read")
    func damagedSelection() throws {
        let (_, out, _, dir) = try Self.pruned(spec: "raw:f16", budget: 20)
        let bytes = fileBytes(dir + "/out.kvpack")
        let frames = try BadInputTests.frames(bytes)
        let tsel = try #require(frames.first { $0.tag == TokenSelection.tag })
        let salt = out.header.salt
        typealias Edit = (inout FrameHeader) -> Void
        let cases: [(String, Edit, (inout [UInt8]) -> Void)] = [
            ("tsel.keptCount", { h in h.fields.0 = (h.fields.0 & ~0xFFFF_FFFF) | 0xFFFF_FFFF }, { _ in }),
            ("tsel.sourceTokenCount", { h in h.fields.0 = (h.fields.0 & 0xFFFF_FFFF) | (5 << 32) }, { _ in }),
            ("tsel.signatureBits", { h in h.fields.1 = (h.fields.1 & ~0xFFFF_FFFF) | 0xFFFF_FFFF }, { _ in }),
            ("tsel.policy", { h in h.fields.1 = h.fields.1 & ~(0xFF << 32) | (9 << 32) }, { _ in }),
            ("tsel.anchor", { h in h.fields.1 = h.fields.1 & ~(0xFF << 40) }, { _ in }),
            ("tsel.sourceIndex[1]", { _ in }, { p in p[28] = 0; p[29] = 0; p[30] = 0; p[31] = 0 }),
            ("tsel.importance[0]", { _ in }, { p in let at = 24 + 4 * 20; p[at + 3] = 0x7F; p[at + 2] = 0xC0 }),
            ("tsel.reason[2]", { _ in }, { p in p[24 + 8 * 20 + 2] = 0 }),
        ]
        for (field, edit, payload) in cases {
            var damaged = bytes
            BadInputTests.reseal(&damaged, frame: tsel, salt: salt, header: edit, payload: payload)
            let reader = try KVPackReader(file: MappedFile(copying: damaged))
            #expect(reader.tokenCount == 20, "the tokens do not depend on the selection")
            do {
                _ = try reader.tokenSelection()
                Issue.record("\(field): no error")
            } catch let e as KVPackError {
                #expect(e.field == field, "\(field): \(e)")
            }
            #expect(!Validator.validate(file: MappedFile(copying: damaged), path: "x").isValid, "\(field)")
        }
        // A flipped payload bit (checksum not resealed) is a checksum error.
        var flipped = bytes
        flipped[Int(tsel.payloadOffset) + 30] ^= 4
        #expect(throws: KVPackError.self) { try KVPackReader(file: MappedFile(copying: flipped)).tokenSelection() }
    }

    @Test("budgets parse as fractions, percentages and counts")
    func budgetNames() {
        #expect(TokenSelection.Policy(name: "crush") == .kvcrush)
        #expect(TokenSelection.Policy(name: "h2o") == .importance)
        #expect(TokenSelection.Anchor(name: "mean") == .mean)
        #expect(TokenSelection.Anchor(name: "median") == nil)
    }
}

/// A batch longer than a segment, attended row by row while it is staged (a prefill of a long
/// prompt): regression for a trap when the staged rows spanned segments past the file's end.
struct LongBatchTests {
    @Test("attention over staged rows spanning several segments equals dense attention")
    func longBatch() throws {
        let g = ModelGeometry(layerCount: 1, queryHeadCount: 2, kvHeadCount: 1, headDim: 8)
        let dir = temporaryDirectory()
        let data = RandomKV(geometry: g, tokens: 230, seed: 2, maxExponent: 4)
        let (m, blobs) = try makeManifest(g, segmentTokens: 16, spec: "raw:f32")
        let session = try KVCacheSession.create(path: dir + "/s.kvpack", manifest: m, blobs: blobs, options: testOptions())
        let first = 21, batch = 200
        func feed(_ range: Range<Int>) throws {
            try session.beginBatch(tokenIDs: range.map { UInt32($0) })
            let k = data.batch(data.keys, from: range.lowerBound, to: range.upperBound)
            let v = data.batch(data.values, from: range.lowerBound, to: range.upperBound)
            for i in 0 ..< range.count {
                k.withUnsafeBufferPointer { kp in v.withUnsafeBufferPointer { vp in
                    session.store(layer: 0, index: i, keys: kp.baseAddress! + i * 8, values: vp.baseAddress! + i * 8)
                } }
            }
        }
        try feed(0 ..< first)
        try session.endBatch()
        try feed(first ..< first + batch)
        var rng = SplitMix64(seed: 1)
        for count in [first + 1, 40, 64, 100, first + batch] {
            let q = (0 ..< 16).map { _ in Float(rng.nextGaussian()) }
            var out = [Float](repeating: 0, count: 16)
            try q.withUnsafeBufferPointer { qp in
                try out.withUnsafeMutableBufferPointer { try session.attend(layer: 0, kvHead: 0, queries: qp.baseAddress!, count: count, output: $0.baseAddress!) }
            }
            let want = DenseAttention.reference(queries: q, keys: data.stream(layer: 0, head: 0, kind: .key, tokens: 0 ..< count),
                                                values: data.stream(layer: 0, head: 0, kind: .value, tokens: 0 ..< count), groupSize: 2, headDim: 8)
            #expect(DenseAttention.maxRelativeError(out, want) < 1e-5, "count \(count)")
        }
        try session.endBatch()
        try session.close()
    }
}
