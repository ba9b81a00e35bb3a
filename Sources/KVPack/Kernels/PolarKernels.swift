import CKVKernels

/// The polar scheme's keys in C (Sources/CKVKernels/polar.c): a decoder (eight pairs per step,
/// cos and sin from registers, the same bits as the Swift vector decoder; where the CPU has
/// AVX2 + FMA + F16C) and key scores without a tile (AVX-512 VL machines: the same bits as the
/// tile kernels over rows decoded in the scoring layout).
public enum PolarKernels {
    /// Where the decoder puts pair j's x and y (kvk_polar_decode's `layout`).
    public enum Layout: Int32 {
        /// Dimensions (2j, 2j + 1).
        case adjacent = 0
        /// Dimensions (j, j + pairs).
        case rotateHalf = 1
        /// Per group of eight pairs, their eight x then their eight y: what the key scores use
        /// (a dot product does not depend on the order of its channels, as long as the query's
        /// are in the same order), so both pairings decode without an interleave.
        case scoring = 2
    }

    /// Whether `scores` runs here (kvk_polar_isa's tier 2).
    public static let scoresInC = kvk_polar_isa() >= 2

    /// Decodes rows `tokens` of the block at `block` into `out`; false when it did not run.
    @inline(__always)
    public static func decode(_ block: UnsafeRawPointer, angleBits: Int, radiusBits: Int, pairs: Int, radiusGroup: Int,
                              radiusSection: Int, scalesOffset: Int, offsetsOffset: Int, table: UnsafePointer<Float>, layout: Layout,
                              tokens: Range<Int>, into out: UnsafeMutablePointer<Float>) -> Bool {
        kvk_polar_decode(block.assumingMemoryBound(to: UInt8.self), Int32(angleBits), Int32(radiusBits), Int32(pairs), Int32(radiusGroup),
                         radiusSection, scalesOffset, offsetsOffset, table, layout.rawValue, tokens.lowerBound, tokens.count, out) == 0
    }

    /// out[q * stride + (t - tokens.lowerBound)] = the score of token t for query head q < groupSize
    /// (queries in the scoring layout); false when it did not run.
    @inline(__always)
    public static func scores(_ block: UnsafeRawPointer, angleBits: Int, radiusBits: Int, pairs: Int, radiusGroup: Int,
                              radiusSection: Int, scalesOffset: Int, offsetsOffset: Int, table: UnsafePointer<Float>, tokens: Range<Int>,
                              queries: UnsafePointer<Float>, groupSize: Int, into out: UnsafeMutablePointer<Float>, stride: Int) -> Bool {
        kvk_polar_scores(block.assumingMemoryBound(to: UInt8.self), Int32(angleBits), Int32(radiusBits), Int32(pairs), Int32(radiusGroup),
                         radiusSection, scalesOffset, offsetsOffset, table, tokens.lowerBound, tokens.count, queries, Int32(groupSize), out,
                         stride) == 0
    }
}
