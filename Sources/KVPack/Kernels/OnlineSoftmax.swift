import CKVKernels

/// In-memory f32 rows attended after a file's tokens: `count` rows of headDim floats each,
/// token-major. The memory must stay valid for the call.
public struct AppendedRows {
    public var keys: UnsafePointer<Float>
    public var values: UnsafePointer<Float>
    public var count: Int

    public init(keys: UnsafePointer<Float>, values: UnsafePointer<Float>, count: Int) {
        self.keys = keys
        self.values = values
        self.count = count
    }
}

/// Attention over in-memory rows only (a session whose file holds no tokens yet).
extension AttentionWorkspace {
    public func attend(rows: AppendedRows, queries: UnsafePointer<Float>, groupSize g: Int, headDim d: Int,
                       scale: Float? = nil, output: UnsafeMutablePointer<Float>) {
        let stride = 256
        reserve(scores: g * stride, keyState: 0, tailState: g * d, acc: g * d, group: g)
        RowKernels.scaled(queries, by: scale ?? 1 / Float(d).squareRoot(), into: tailState.pointer, count: g * d)
        let softmax = OnlineSoftmax(groupSize: g, dim: d, runMax: runMax.pointer, runSum: runSum.pointer,
                                    blockAcc: blockAcc.pointer, tailAcc: tailAcc.pointer)
        softmax.absorb(rows, dim: d, queryState: tailState.pointer, scores: scores.pointer, stride: stride)
        softmax.finish(into: output)
    }
}

/// Streaming softmax over score chunks (Milakov & Gimelshein's online normaliser): keeps a
/// running max and sum per query and rescales the value accumulators when the max grows, so
/// attention over any number of blocks needs one pass and no full score row.
struct OnlineSoftmax {
    static let inC = kvk_softmax_available() != 0
    let groupSize: Int
    let dim: Int
    let runMax: UnsafeMutablePointer<Float>
    let runSum: UnsafeMutablePointer<Float>
    /// Two value accumulators (groupSize x dim each), rescaled together; their sum is the
    /// output. Sealed blocks and tail rows accumulate separately because a scheme may
    /// accumulate in its own space (see `KVScheme.finishAccumulation`).
    let blockAcc: UnsafeMutablePointer<Float>
    let tailAcc: UnsafeMutablePointer<Float>

    init(groupSize: Int, dim: Int, runMax: UnsafeMutablePointer<Float>, runSum: UnsafeMutablePointer<Float>,
         blockAcc: UnsafeMutablePointer<Float>, tailAcc: UnsafeMutablePointer<Float>) {
        self.groupSize = groupSize
        self.dim = dim
        self.runMax = runMax
        self.runSum = runSum
        self.blockAcc = blockAcc
        self.tailAcc = tailAcc
        runMax.update(repeating: -.infinity, count: groupSize)
        runSum.update(repeating: 0, count: groupSize)
        blockAcc.update(repeating: 0, count: groupSize * dim)
        tailAcc.update(repeating: 0, count: groupSize * dim)
    }

    /// Turns `count` scores per query (row g at scores + g*stride) into unnormalised weights
    /// exp(s - max), in place, updating the running max, sum and accumulators.
    func absorb(scores: UnsafeMutablePointer<Float>, stride: Int, count: Int) {
        // The same arithmetic in C where the CPU has AVX2 (the vector max and exp that Swift
        // cannot select in a baseline build).
        if Self.inC {
            _ = kvk_softmax_absorb(scores, stride, count, Int32(groupSize), runMax, runSum, blockAcc, tailAcc, Int32(dim))
            return
        }
        absorbInSwift(scores: scores, stride: stride, count: count)
    }

    /// The portable path of `absorb` (what runs without AVX2, and what tests hold the C one to).
    func absorbInSwift(scores: UnsafeMutablePointer<Float>, stride: Int, count: Int) {
        let vectorEnd = count & ~7
        for g in 0 ..< groupSize {
            let row = scores + g * stride
            let raw = UnsafeMutableRawPointer(row)
            // Scalar: the generic pointwiseMax is an out-of-line call per vector.
            var chunkMax = -Float.infinity
            for t in 0 ..< count where row[t] > chunkMax { chunkMax = row[t] }
            let oldMax = runMax[g]
            let newMax = max(oldMax, chunkMax)
            let shift = SIMD8<Float>(repeating: newMax)
            var sums = SIMD8<Float>()
            var t = 0
            while t < vectorEnd {
                let w = TileKernels.exp(raw.loadUnaligned(fromByteOffset: 4 * t, as: SIMD8<Float>.self) - shift)
                raw.storeBytes(of: w, toByteOffset: 4 * t, as: SIMD8<Float>.self)
                sums += w
                t += 8
            }
            if t < count {
                // The last partial vector goes through the same exp, so a weight does not depend
                // on where its token falls in the chunk.
                var x = SIMD8<Float>(repeating: -.infinity)
                for i in 0 ..< count - t { x[i] = row[t + i] - newMax }
                let w = TileKernels.exp(x)
                for i in 0 ..< count - t {
                    row[t + i] = w[i]
                    sums[i] += w[i]
                }
            }
            let sum = sums.sum()
            if newMax > oldMax {
                let correction = oldMax == -.infinity ? 0 : LibM.expf(oldMax - newMax)
                runSum[g] *= correction
                RowKernels.scale(blockAcc + g * dim, by: correction, dim)
                RowKernels.scale(tailAcc + g * dim, by: correction, dim)
                runMax[g] = newMax
            }
            runSum[g] += sum
        }
    }

    /// Scores and accumulates in-memory f32 rows, `stride` at a time (the score buffer's width),
    /// into the tail accumulator. `queryState` is the scaled queries.
    func absorb(_ rows: AppendedRows, dim: Int, queryState: UnsafePointer<Float>, scores: UnsafeMutablePointer<Float>, stride: Int) {
        var start = 0
        while start < rows.count {
            let chunk = start ..< min(rows.count, start + stride)
            // Kernels read rows by absolute index and write scores at 0..<chunk.count.
            let k = UnsafeRawPointer(rows.keys), v = UnsafeRawPointer(rows.values)
            RowKernels.scores(rows: k, type: .float32, dim: dim, tokens: chunk, queries: queryState, groupSize: groupSize,
                              into: scores, stride: stride)
            absorb(scores: scores, stride: stride, count: chunk.count)
            RowKernels.accumulate(rows: v, type: .float32, dim: dim, tokens: chunk, weights: scores, stride: stride,
                                  groupSize: groupSize, into: tailAcc)
            start = chunk.upperBound
        }
    }

    func finish(into output: UnsafeMutablePointer<Float>) {
        for g in 0 ..< groupSize {
            let inv = runSum[g] > 0 ? 1 / runSum[g] : 0
            for i in g * dim ..< (g + 1) * dim { output[i] = (blockAcc[i] + tailAcc[i]) * inv }
        }
    }

    /// The state instead of the output, for a merge with other token ranges' (`merge`): per
    /// query head, dim unnormalised output floats (the two accumulators added, as `finish` adds
    /// them), then the running max and the running sum.
    func leave(into state: UnsafeMutablePointer<Float>) {
        for g in 0 ..< groupSize {
            let row = state + g * (dim + 2)
            for i in 0 ..< dim { row[i] = blockAcc[g * dim + i] + tailAcc[g * dim + i] }
            row[dim] = runMax[g]
            row[dim + 1] = runSum[g]
        }
    }

    /// The output of attention over consecutive token ranges from their `leave` states, in
    /// range order: each range's sums rescaled to the largest running max, then normalised.
    /// An empty range (max -inf, sum 0) adds nothing; so does one whose scores were all -inf.
    static func merge(_ states: UnsafePointer<Float>, count: Int, groupSize: Int, dim: Int, into output: UnsafeMutablePointer<Float>) {
        let per = groupSize * (dim + 2)
        for g in 0 ..< groupSize {
            var top = -Float.infinity
            for k in 0 ..< count where states[k * per + g * (dim + 2) + dim] > top { top = states[k * per + g * (dim + 2) + dim] }
            let out = output + g * dim
            out.update(repeating: 0, count: dim)
            var sum: Float = 0
            for k in 0 ..< count {
                let row = states + k * per + g * (dim + 2)
                guard row[dim] > -.infinity, row[dim + 1] > 0 else { continue }
                let w = row[dim] == top ? 1 : LibM.expf(row[dim] - top)
                sum += w * row[dim + 1]
                for i in 0 ..< dim { out[i] += w * row[i] }
            }
            let inv = sum > 0 ? 1 / sum : 0
            for i in 0 ..< dim { out[i] *= inv }
        }
    }
}
