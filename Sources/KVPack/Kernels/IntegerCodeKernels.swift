import CKVKernels

/// How attention over codes does its arithmetic.
public enum AttentionArithmetic: Sendable, Equatable {
    /// Integer dot products over the codes where a scheme has them (int8 queries against the
    /// stored codes, u8 softmax weights against value codes): int:k2v2:kc64 2.9x faster than
    /// `exact` at 32K tokens (BENCHMARKS.md), and within a small bound of it (tests hold it to a
    /// tenth of the scheme's own attention error on real SmolLM2 tensors).
    case fast
    /// f32 over decoded codes: attention over exactly the rows `decode` returns, up to float
    /// rounding. What tests compare with decode and what `kvpack attend --exact` uses.
    case exact
}

/// The int scheme's kernels in C (Sources/CKVKernels/int_codes.c): integer dot products of the
/// codes read from mapped memory, with AVX-512 VNNI or AVX2 chosen when the library loads.
/// Both variants give bit-identical results; machines without AVX2 keep the Swift path.
public enum IntegerCodeKernels {
    /// The variant that runs here ("avx512vl-vnni vpdpbusd", "avx2 vpmaddubsw" or none).
    public static var isaName: String { String(cString: kvk_int_codes_isa_name()) }

    /// Whether `channelScores` runs for `bits`-bit keys of `dim` channels here.
    public static func channelScoresSupported(bits: Int, dim: Int) -> Bool {
        kvk_int_channel_supported(Int32(bits), Int32(dim)) != 0
    }

    /// Whether `tokenAccumulate` runs for `bits`-bit values in groups of `groupSize` channels here.
    public static func tokenAccumulateSupported(bits: Int, dim: Int, groupSize: Int) -> Bool {
        kvk_int_token_supported(Int32(bits), Int32(dim), Int32(groupSize)) != 0
    }

    /// Scores of `tokens` of a block with per-channel groups of `runTokens` tokens (`codes`: the
    /// first row; `scales`, `offsets`: the f16 arrays). Only called where supported.
    @inline(__always)
    public static func channelScores(codes: UnsafeRawPointer, scales: UnsafeRawPointer, offsets: UnsafeRawPointer, bits: Int, dim: Int,
                                     runTokens: Int, tokens: Range<Int>, queries: UnsafePointer<Float>, groupSize g: Int,
                                     into scores: UnsafeMutablePointer<Float>, stride: Int) {
        _ = kvk_int_channel_scores(codes.assumingMemoryBound(to: UInt8.self), scales, offsets, Int32(bits), Int32(dim), Int32(runTokens),
                                   tokens.lowerBound, tokens.count, queries, Int32(g), scores, stride, 0)
    }

    /// Adds the weighted values of `tokens` (per-token groups of `groupSize` channels) to `acc`,
    /// in slot order (`tokenLayout`). Only called where supported.
    @inline(__always)
    public static func tokenAccumulate(codes: UnsafeRawPointer, scales: UnsafeRawPointer, offsets: UnsafeRawPointer, bits: Int, dim: Int,
                                       groupSize: Int, tokens: Range<Int>, weights: UnsafePointer<Float>, stride: Int, queryCount g: Int,
                                       into acc: UnsafeMutablePointer<Float>) {
        _ = kvk_int_token_accumulate(codes.assumingMemoryBound(to: UInt8.self), scales, offsets, Int32(bits), Int32(dim), Int32(groupSize),
                                     tokens.lowerBound, tokens.count, weights, stride, Int32(g), acc, 0)
    }

    /// Rows `tokens` of an int block decoded to f32 (`kvk_int_decode`); false when it did not run.
    @inline(__always)
    public static func decode(_ block: UnsafeRawPointer, blockBytes: Int, bits: Int, dim: Int, channelGrouping: Bool, groupSize: Int,
                              scalesOffset: Int, offsetsOffset: Int, tokens: Range<Int>, into tile: UnsafeMutablePointer<Float>,
                              rowStride: Int) -> Bool {
        kvk_int_decode(block.assumingMemoryBound(to: UInt8.self), blockBytes, Int32(bits), Int32(dim), channelGrouping ? 1 : 0, Int32(groupSize),
                       scalesOffset, offsetsOffset, tokens.lowerBound, tokens.count, tile, rowStride) == 0
    }

    /// The channel each accumulator slot of `tokenAccumulate` holds.
    public static func tokenLayout(bits: Int, dim: Int) -> [Int32] {
        var channels = [Int32](repeating: 0, count: dim)
        _ = channels.withUnsafeMutableBufferPointer { kvk_int_token_layout(Int32(bits), Int32(dim), $0.baseAddress!) }
        return channels
    }

    /// Puts `count` rows of `dim` slot-ordered floats back in channel order, in place.
    public static func unpermute(_ acc: UnsafeMutablePointer<Float>, rows count: Int, dim: Int, channelOfSlot: [Int32]) {
        channelOfSlot.withUnsafeBufferPointer { map in
            withUnsafeTemporaryAllocation(of: Float.self, capacity: dim) { tmp in
                for r in 0 ..< count {
                    let row = acc + r * dim
                    for s in 0 ..< dim { tmp[Int(map[s])] = row[s] }
                    row.update(from: tmp.baseAddress!, count: dim)
                }
            }
        }
    }
}
