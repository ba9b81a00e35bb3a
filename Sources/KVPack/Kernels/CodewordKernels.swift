import CKVKernels

/// The nsn scheme's codes read in place by the C row kernels (Sources/CKVKernels/rows.c): each
/// 8-dim piece decoded to its codeword in registers and multiplied into every query head of the
/// group, instead of decoded into an f32 tile first. Only where the CPU has AVX2 + FMA.
public enum CodewordKernels {
    /// Whether the kernels run here for `dim` channels.
    public static func available(dim: Int) -> Bool { RowKernels.inC(dim: dim) }

    /// out[g * stride + t] = queries[g] . codewords(t) for `count` tokens of codes at `codes`
    /// (`bits` 1: a code byte per piece; 2: a sign byte and a magnitude byte). `book`: the
    /// 256 x 8 codebook; `signs`: the 256 sign masks of 8 lanes (2 bits).
    @inline(__always)
    public static func dots(codes: UnsafeRawPointer, bits: Int, dim: Int, count: Int, book: UnsafeRawPointer, signs: UnsafeRawPointer,
                            queries: UnsafePointer<Float>, groupSize g: Int, into out: UnsafeMutablePointer<Float>, stride: Int,
                            isa: Int32 = 0) {
        _ = kvk_nsn_dots(codes.assumingMemoryBound(to: UInt8.self), Int32(bits), Int32(dim), count, book.assumingMemoryBound(to: Float.self),
                         signs.assumingMemoryBound(to: UInt32.self), queries, Int32(g), out, stride, isa)
    }

    /// acc[g * dim ...] += weights[g * stride + t] * codewords(t), tokens in order.
    @inline(__always)
    public static func accumulate(codes: UnsafeRawPointer, bits: Int, dim: Int, count: Int, book: UnsafeRawPointer, signs: UnsafeRawPointer,
                                  weights: UnsafePointer<Float>, stride: Int, groupSize g: Int, into acc: UnsafeMutablePointer<Float>,
                                  isa: Int32 = 0) {
        _ = kvk_nsn_accumulate(codes.assumingMemoryBound(to: UInt8.self), Int32(bits), Int32(dim), count, book.assumingMemoryBound(to: Float.self),
                               signs.assumingMemoryBound(to: UInt32.self), weights, stride, Int32(g), acc, isa)
    }

    /// out[q * n + i] = weights[q * stride + i] * (n1[i] * (n2[i] * invRoot)): a block's value
    /// weights times each token's norms, element by element (tests hold it to that loop's bits).
    @inline(__always)
    public static func tokenWeights(_ weights: UnsafePointer<Float>, stride: Int, groupSize g: Int, n1: UnsafePointer<Float>,
                                    n2: UnsafePointer<Float>, invRoot: Float, count n: Int, into out: UnsafeMutablePointer<Float>) {
        _ = kvk_nsn_token_weights(weights, stride, Int32(g), n1, n2, invRoot, n, out)
    }

    /// scores[q * stride + i] = (n1[i] * n2[i]) * scores[q * stride + i] + meanTerms[q] * n1[i]:
    /// a block's key scores from its codeword dots (tests hold it to that loop's bits).
    @inline(__always)
    public static func normScores(_ scores: UnsafeMutablePointer<Float>, stride: Int, groupSize g: Int, n1: UnsafePointer<Float>,
                                  n2: UnsafePointer<Float>, meanTerms: UnsafePointer<Float>, count n: Int) {
        _ = kvk_nsn_norm_scores(scores, stride, Int32(g), n1, n2, meanTerms, n)
    }

    /// Floats of the 1-bit lookup table for `g` heads of `dim` channels.
    public static func tableFloats(groupSize g: Int, dim: Int) -> Int { kvk_nsn_lut_floats(Int32(g), Int32(dim)) }

    /// The 1-bit lookup table: every (rotated, scaled) query piece's dot product with every codeword.
    @inline(__always)
    public static func buildTable(book: UnsafeRawPointer, queries: UnsafePointer<Float>, groupSize g: Int, dim: Int,
                                  into table: UnsafeMutablePointer<Float>) {
        _ = kvk_nsn_lut(book.assumingMemoryBound(to: Float.self), queries, Int32(g), Int32(dim), table)
    }

    /// `dots` for 1-bit codes from the table: one lookup per piece and token for four heads.
    @inline(__always)
    public static func tableDots(codes: UnsafeRawPointer, dim: Int, count: Int, table: UnsafePointer<Float>, groupSize g: Int,
                                 into out: UnsafeMutablePointer<Float>, stride: Int) {
        _ = kvk_nsn_lut_dots(codes.assumingMemoryBound(to: UInt8.self), Int32(dim), count, table, Int32(g), out, stride)
    }

    /// The orthonormal Walsh-Hadamard transform of `size` floats in place (a power of two, at
    /// least 8), in C: the same bits as the loop it stands in for. False when it did not run.
    @inline(__always)
    public static func hadamard(_ x: UnsafeMutablePointer<Float>, size: Int, norm: Float) -> Bool {
        kvk_hadamard(x, Int32(size), norm) == 0
    }
}
