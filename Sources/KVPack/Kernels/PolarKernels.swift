import CKVKernels

/// The polar scheme's key decoder in C (Sources/CKVKernels/polar.c): eight pairs per step with
/// cos and sin from registers, the same bits as the Swift vector decoder. Only where the CPU has
/// AVX2 + FMA + F16C, for the widths the vector decoder takes.
public enum PolarKernels {
    /// Decodes rows `tokens` of the block at `block` into `out`; false when it did not run.
    @inline(__always)
    public static func decode(_ block: UnsafeRawPointer, angleBits: Int, radiusBits: Int, pairs: Int, radiusGroup: Int,
                              radiusSection: Int, scalesOffset: Int, offsetsOffset: Int, table: UnsafePointer<Float>, half: Bool,
                              tokens: Range<Int>, into out: UnsafeMutablePointer<Float>) -> Bool {
        kvk_polar_decode(block.assumingMemoryBound(to: UInt8.self), Int32(angleBits), Int32(radiusBits), Int32(pairs), Int32(radiusGroup),
                         radiusSection, scalesOffset, offsetsOffset, table, half ? 1 : 0, tokens.lowerBound, tokens.count, out) == 0
    }
}
