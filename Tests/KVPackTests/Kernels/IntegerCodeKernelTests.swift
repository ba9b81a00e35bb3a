import CKVKernels
import Testing
@testable import KVPack
@testable import KVPackInterop

/// The int scheme's integer-dot-product kernels (Sources/CKVKernels/int_codes.c) against f32
/// attention over the decoded codes: the same blocks, the same queries and weights, through
/// the scheme's own `scores` / `accumulate` (so the slot layout and its undoing are tested too).
struct IntegerCodeKernelTests {
    /// A block of `int` codes written by the encoder from rows with a few outlier channels (as
    /// RoPE'd keys have), and the scheme read back both ways.
    struct Block {
        var fast: IntScheme
        var exact: IntScheme
        var bytes: [UInt8]
        var dim: Int
        var tokens: Int
    }

    static func block(bits: Int, dim: Int, perChannel: Bool, group: Int = 64, seed: UInt64) throws -> Block {
        let c = 64
        let geometry = ModelGeometry(layerCount: 1, queryHeadCount: 1, kvHeadCount: 1, headDim: dim)
        let descriptor = IntScheme.descriptor(bits: bits, perChannelTokens: perChannel ? 32 : nil, groupSize: group)
        func make(_ a: AttentionArithmetic) throws -> IntScheme {
            try IntScheme(descriptor: descriptor, context: SchemeContext(geometry: geometry, segmentTokens: c, rope: .none,
                                                                          role: perChannel ? .key : .value, arithmetic: a))
        }
        let fast = try make(.fast), exact = try make(.exact)
        var rng = SplitMix64(seed: seed)
        let rows = (0 ..< c * dim).map { i in Float(rng.nextGaussian()) * (i % dim % 29 == 3 ? 9 : 1) + (i % dim == 5 ? 4 : 0) }
        var bytes = [UInt8](repeating: 0, count: fast.encodedBlockSize(tokens: c))
        rows.withUnsafeBufferPointer { r in
            bytes.withUnsafeMutableBytes { fast.encode(rows: r.baseAddress!, tokens: c, into: $0) }
        }
        return Block(fast: fast, exact: exact, bytes: bytes, dim: dim, tokens: c)
    }

    /// sqrt(sum (a - b)^2 / sum b^2)
    static func relative(_ a: [Float], _ b: [Float]) -> Double {
        var e = RelativeError()
        e.add(a, b)
        return e.relative
    }

    static let available = kvk_int_codes_isa() != 0

    @Test("key scores with int8 queries are within 2% (1, 2 bits) or 0.02% (4 bits, two-level) of the terms of f32 scores over the decoded codes, any token range, 1-9 query heads",
          arguments: [(1, 128), (2, 64), (2, 128), (4, 64), (4, 128), (2, 256), (4, 256)])
    func keyScores(bits: Int, dim: Int) throws {
        let b = try Self.block(bits: bits, dim: dim, perChannel: true, seed: UInt64(bits * 1000 + dim))
        #expect(b.fast.fastScores == Self.available, "the fast path must be taken wherever the CPU has it")
        var rng = SplitMix64(seed: 9)
        for group in [1, 3, 4, 9] {
            let q = (0 ..< group * dim).map { _ in Float(rng.nextGaussian()) }
            for range in [0 ..< 64, 5 ..< 37, 30 ..< 33, 63 ..< 64] {
                var fast = [Float](repeating: .nan, count: group * 64), exact = fast
                b.bytes.withUnsafeBytes { p in
                    q.withUnsafeBufferPointer { qp in
                        b.fast.scores(block: p, tokens: range, state: qp.baseAddress!, groupSize: group, into: &fast, stride: 64)
                        b.exact.scores(block: p, tokens: range, state: qp.baseAddress!, groupSize: group, into: &exact, stride: 64)
                    }
                }
                // Relative to the size of the terms, sum_c |q_c k_tc|, not of the score (which
                // can cancel to near 0 for a few tokens).
                var rows = [Float](repeating: 0, count: range.count * dim)
                b.bytes.withUnsafeBytes { p in b.exact.decode(block: p, tokens: range, into: &rows) }
                var difference = 0.0, size = 0.0
                for g in 0 ..< group {
                    for i in 0 ..< range.count {
                        let terms = (0 ..< dim).reduce(0.0) { $0 + abs(Double(q[g * dim + $1]) * Double(rows[i * dim + $1])) }
                        let d = Double(fast[g * 64 + i]) - Double(exact[g * 64 + i])
                        difference += d * d
                        size += terms * terms
                    }
                }
                let err = (difference / size).squareRoot()
                #expect(err < (bits >= 4 ? 2e-4 : 2e-2), "bits \(bits), dim \(dim), group \(group), tokens \(range): \(err)")
                // Nothing outside the range is written.
                #expect((0 ..< group).allSatisfy { g in (range.count ..< 64).allSatisfy { fast[g * 64 + $0].isNaN } })
            }
        }
    }

    @Test("value accumulation with quantized weights is within 4% (1, 2 bits) or 0.1% (4 bits, two-level) of f32 over the decoded codes; the slot order is undone",
          arguments: [(1, 128, 128), (2, 64, 64), (2, 128, 64), (2, 128, 128), (4, 64, 64), (4, 128, 32), (4, 256, 64)])
    func valueAccumulation(bits: Int, dim: Int, group size: Int) throws {
        let b = try Self.block(bits: bits, dim: dim, perChannel: false, group: size, seed: UInt64(bits * 77 + dim + size))
        #expect(b.fast.fastAccumulate == Self.available)
        var rng = SplitMix64(seed: 5)
        for group in [1, 3, 4, 9] {
            // Softmax-like weights: one large, most small, some below 1e-20 (treated as 0).
            let w = (0 ..< group * 64).map { i -> Float in i % 64 == 17 ? 1 : Float(LibM.exp(-abs(rng.nextGaussian()) * (i % 5 == 0 ? 60 : 3))) }
            for range in [0 ..< 64, 3 ..< 50, 60 ..< 63] {
                var fast = [Float](repeating: 0.25, count: group * dim), exact = fast
                b.bytes.withUnsafeBytes { p in
                    w.withUnsafeBufferPointer { wp in
                        let weights = wp.baseAddress! + range.lowerBound
                        // Accumulators start non-zero: accumulation adds (after the slot order is undone).
                        b.fast.accumulate(block: p, tokens: range, weights: weights, stride: 64, groupSize: group, into: &fast)
                        b.fast.finishAccumulation(&fast, groupSize: group)
                        b.exact.accumulate(block: p, tokens: range, weights: weights, stride: 64, groupSize: group, into: &exact)
                        b.exact.finishAccumulation(&exact, groupSize: group)
                    }
                }
                let err = Self.relative(fast, exact)
                #expect(err < (bits >= 4 ? 1e-3 : 4e-2), "bits \(bits), dim \(dim), groups of \(size), heads \(group), tokens \(range): \(err)")
            }
        }
    }

    @Test("the AVX2 and the AVX-512 VNNI variants compute the same bits")
    func variantsAgree() throws {
        guard kvk_int_codes_isa() == 2 else { return }   // this CPU runs only one of them
        for (bits, dim) in [(2, 64), (2, 128), (4, 64), (4, 128), (1, 128)] {
            let keys = try Self.block(bits: bits, dim: dim, perChannel: true, seed: 3)
            var rng = SplitMix64(seed: 7)
            let group = 5
            let q = (0 ..< group * dim).map { _ in Float(rng.nextGaussian()) }
            let w = (0 ..< group * 64).map { _ in Float(LibM.exp(-abs(rng.nextGaussian()) * 4)) }
            func scores(_ isa: Int32) -> [Float] {
                var out = [Float](repeating: 0, count: group * 64)
                keys.bytes.withUnsafeBytes { p in
                    let base = p.baseAddress!, codes = 64 * dim * bits / 8
                    _ = kvk_int_channel_scores(base.assumingMemoryBound(to: UInt8.self), base + codes, base + codes + 2 * 2 * dim, Int32(bits),
                                               Int32(dim), 32, 1, 62, q, Int32(group), &out, 64, isa)
                }
                return out
            }
            #expect(scores(1).map(\.bitPattern) == scores(2).map(\.bitPattern), "keys, \(bits) bits, dim \(dim)")
            // One value group per token, and two (5 heads x 2 groups: the weights' steps are
            // computed eight (head, group) pairs at a time, so this crosses a batch).
            for valueGroup in [dim, dim / 2] where IntegerCodeKernels.tokenAccumulateSupported(bits: bits, dim: dim, groupSize: valueGroup) {
                let values = try Self.block(bits: bits, dim: dim, perChannel: false, group: valueGroup, seed: 4)
                func accumulated(_ isa: Int32) -> [Float] {
                    var out = [Float](repeating: 0, count: group * dim)
                    values.bytes.withUnsafeBytes { p in
                        let base = p.baseAddress!, codes = 64 * dim * bits / 8, groups = 64 * (dim / valueGroup)
                        let ran = kvk_int_token_accumulate(base.assumingMemoryBound(to: UInt8.self), base + codes, base + codes + 2 * groups,
                                                           Int32(bits), Int32(dim), Int32(valueGroup), 2, 61, w, 64, Int32(group), &out, isa)
                        #expect(ran == 0)
                    }
                    return out
                }
                #expect(accumulated(1).map(\.bitPattern) == accumulated(2).map(\.bitPattern),
                        "values, \(bits) bits, dim \(dim), groups of \(valueGroup)")
            }
        }
    }

    @Test("layouts the kernels do not take are refused (the scheme keeps its f32 path)")
    func unsupported() {
        #expect(kvk_int_channel_supported(3, 128) == 0)
        #expect(kvk_int_channel_supported(8, 128) == 0)
        #expect(kvk_int_channel_supported(1, 64) == 0)     // 8-byte rows
        #expect(kvk_int_channel_supported(2, 96) == 0)     // three 16-byte chunks
        #expect(kvk_int_token_supported(2, 128, 32) == 0)  // a 64-channel chunk spans two groups
        #expect(kvk_int_token_supported(2, 512, 64) == 0)
        var out = [Float](repeating: 0, count: 4)
        #expect(kvk_int_channel_scores(nil, nil, nil, 3, 128, 64, 0, 1, out, 1, &out, 1, 0) == -1)
    }

    @Test("the C online-softmax step computes the same bits as the Swift one, in every variant this machine runs")
    func softmaxStepAgrees() {
        guard OnlineSoftmax.inC else { return }
        var rng = SplitMix64(seed: 11)
        // Four heads take their own C path (the head count a constant): full and partial vectors,
        // counts whose eight-lane vectors are not a whole number of sixteen-lane ones (40, 24).
        let variants = [1, 2].filter { Int(kvk_softmax_isa()) >= $0 }
        for (group, dim, count) in [(4, 128, 64), (4, 64, 37), (4, 64, 40), (3, 64, 24), (3, 64, 37), (9, 64, 5), (1, 16, 1), (17, 8, 64)] {
            var states: [[Float]] = []
            let start = rng
            for variant in variants + [0] {
                let inC = variant != 0
                var r = start
                let floats = group * 64 + 2 * group + 2 * group * dim
                let memory = UnsafeMutablePointer<Float>.allocate(capacity: floats)
                defer { memory.deallocate() }
                let scores = memory, runMax = memory + group * 64, runSum = runMax + group
                let blockAcc = runSum + group, tailAcc = blockAcc + group * dim
                let softmax = OnlineSoftmax(groupSize: group, dim: dim, runMax: runMax, runSum: runSum, blockAcc: blockAcc, tailAcc: tailAcc)
                // Accumulators as earlier steps would have left them, so rescaling shows.
                for i in 0 ..< 2 * group * dim { blockAcc[i] = Float(r.nextGaussian()) }
                var all: [Float] = []
                for step in 0 ..< 3 {
                    for i in 0 ..< group * 64 { scores[i] = Float(r.nextGaussian()) * (step == 1 ? 40 : 3) + Float(step) }
                    // Scores far below the max (step 1), -inf, and NaN of either sign in the last step.
                    if step == 2 { scores[1] = -.infinity; scores[64 * (group - 1)] = .nan; scores[min(count, 64) - 1] = -Float.nan }
                    // Exps of exactly -80 (kept) and of the floats on either side (one zeroed).
                    if step == 0 { scores[0] = 100; scores[2] = 20; scores[3] = 20 - Float(80).ulp; scores[4] = 20 + Float(80).ulp }
                    if inC {
                        #expect(kvk_softmax_absorb_variant(Int32(variant), scores, 64, count, Int32(group), runMax, runSum, blockAcc, tailAcc,
                                                           Int32(dim)) == 0)
                    } else {
                        softmax.absorbInSwift(scores: scores, stride: 64, count: count)
                    }
                    all += Array(UnsafeBufferPointer(start: memory, count: floats))
                }
                states.append(all)
                rng = r
            }
            // The first float that differs, rather than both arrays (thousands of floats).
            for (i, variant) in variants.enumerated() {
                let differs = states[i].indices.first { states[i][$0].bitPattern != states.last![$0].bitPattern }
                #expect(differs == nil, "variant \(variant), group \(group), dim \(dim), count \(count): float \(differs ?? -1) differs")
            }
        }
    }

    @Test("on real SmolLM2 tensors the fast path adds at most a tenth of each int scheme's own attention error")
    func realTensors() throws {
        let samples = try SampleTensors(directory: kvSamplesDirectory)
        let schemes = ["int:k2v2:kc64", "int:k4v2:kc64", "int:k4v4:kc64", "int:k2v2", "int:k4v4", "int:k2v4:kc64"]
        let report = try TensorEval.run(samples: samples, schemes: schemes, directory: temporaryDirectory(), positionStride: 8, layerLimit: 6)
        for r in report.results {
            #expect(r.fastVsExactRelativeError <= r.exactAttentionRelativeError / 10,
                    "\(r.spec): fast vs exact \(r.fastVsExactRelativeError), the scheme's own attention error \(r.exactAttentionRelativeError)")
            if Self.available {
                #expect(r.fastVsExactRelativeError > 0, "\(r.spec): the fast path did not run")
            }
        }
    }
}
