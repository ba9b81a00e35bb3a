import CKVKernels

/// The svdq scheme's key scores in C (Sources/CKVKernels/svdq.c): every stored latent channel
/// decoded once per eight tokens for four query heads, runs of channels of one width in loops of
/// their own, the same bits as the Swift loop in `SVDqScheme.scores`. Only where the CPU has
/// AVX2 + FMA + F16C.
public enum SVDqKernels {
    /// The layout of a scheme's blocks as the kernel reads it, made once per scheme: nil when the
    /// kernel does not run here or does not take this layout (`tokens` not a positive multiple
    /// of 8, rank above 512).
    public static func plan(blockBytes: Int, rank: Int, channelBits: [Int], streamOffsets: [Int], tokens: Int) -> [Int64]? {
        guard RowKernels.inC(dim: 8), tokens > 0, rank > 0, rank <= 512 else { return nil }
        var plan = [Int64](repeating: 0, count: kvk_svdq_plan_ints(Int32(rank)))
        let made = channelBits.withUnsafeBufferPointer { bits in
            streamOffsets.withUnsafeBufferPointer { offsets in
                plan.withUnsafeMutableBufferPointer {
                    kvk_svdq_plan(blockBytes, Int32(rank), bits.baseAddress!, offsets.baseAddress!, tokens, $0.baseAddress!) == 0
                }
            }
        }
        return made ? plan : nil
    }

    /// Scores of `tokens` (aligned to 8 at both ends) of a block laid out as `plan` says; false
    /// when it did not run (nothing written).
    @inline(__always)
    public static func scores(_ block: UnsafeRawBufferPointer, plan: [Int64], tokens: Range<Int>, state: UnsafePointer<Float>, groupSize g: Int,
                              into scores: UnsafeMutablePointer<Float>, stride: Int) -> Bool {
        plan.withUnsafeBufferPointer {
            kvk_svdq_scores(block.baseAddress!.assumingMemoryBound(to: UInt8.self), block.count, $0.baseAddress!, tokens.lowerBound, tokens.count,
                            state, Int32(g), scores, stride) == 0
        }
    }
}
