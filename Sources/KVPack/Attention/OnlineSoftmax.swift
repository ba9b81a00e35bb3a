#if canImport(Glibc)
import Glibc
#endif

/// Streaming softmax over score chunks (Milakov & Gimelshein's online normaliser): keeps a
/// running max and sum per query and rescales the value accumulators when the max grows, so
/// attention over any number of blocks needs one pass and no full score row.
struct OnlineSoftmax {
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
        for g in 0 ..< groupSize {
            let row = scores + g * stride
            var chunkMax = -Float.infinity
            for t in 0 ..< count where row[t] > chunkMax { chunkMax = row[t] }
            let oldMax = runMax[g]
            let newMax = max(oldMax, chunkMax)
            var sum: Float = 0
            for t in 0 ..< count {
                let w = expf(row[t] - newMax)
                row[t] = w
                sum += w
            }
            if newMax > oldMax {
                let correction = oldMax == -.infinity ? 0 : expf(oldMax - newMax)
                runSum[g] *= correction
                RowKernels.scale(blockAcc + g * dim, by: correction, dim)
                RowKernels.scale(tailAcc + g * dim, by: correction, dim)
                runMax[g] = newMax
            }
            runSum[g] += sum
        }
    }

    func finish(into output: UnsafeMutablePointer<Float>) {
        for g in 0 ..< groupSize {
            let inv = runSum[g] > 0 ? 1 / runSum[g] : 0
            for i in g * dim ..< (g + 1) * dim { output[i] = (blockAcc[i] + tailAcc[i]) * inv }
        }
    }
}
