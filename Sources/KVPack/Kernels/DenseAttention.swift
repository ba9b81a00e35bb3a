/// The textbook attention the kernels are checked against: full scores, max-subtracted softmax,
/// weighted sum, in Double. Slow on purpose; for tests and `kvpack attend --check`.
public enum DenseAttention {
    /// queries: groupSize x headDim; keys, values: tokens x headDim. Returns groupSize x headDim.
    public static func reference(queries: [Float], keys: [Float], values: [Float], groupSize: Int, headDim: Int,
                                 scale: Float? = nil) -> [Float] {
        keys.withUnsafeBufferPointer { k in
            values.withUnsafeBufferPointer { v in
                queries.withUnsafeBufferPointer { q in reference(queries: q, keys: k, values: v, groupSize: groupSize, headDim: headDim, scale: scale) }
            }
        }
    }

    /// The same over borrowed rows (no copies of a long cache per call).
    public static func reference(queries: UnsafeBufferPointer<Float>, keys: UnsafeBufferPointer<Float>, values: UnsafeBufferPointer<Float>,
                                 groupSize: Int, headDim: Int, scale: Float? = nil) -> [Float] {
        let n = keys.count / headDim
        let s = Double(scale ?? 1 / Float(headDim).squareRoot())
        var out = [Float](repeating: 0, count: groupSize * headDim)
        for g in 0 ..< groupSize {
            var scores = [Double](repeating: 0, count: n)
            for t in 0 ..< n {
                var dot = 0.0
                for i in 0 ..< headDim { dot += Double(queries[g * headDim + i]) * Double(keys[t * headDim + i]) }
                scores[t] = dot * s
            }
            let m = scores.max() ?? 0
            let w = scores.map { LibM.exp($0 - m) }
            let total = w.reduce(0, +)
            for i in 0 ..< headDim {
                var acc = 0.0
                for t in 0 ..< n { acc += w[t] * Double(values[t * headDim + i]) }
                out[g * headDim + i] = Float(acc / total)
            }
        }
        return out
    }

    /// max |a - b| / max(|b|_inf, tiny): the error relative to the reference's magnitude.
    public static func maxRelativeError(_ a: [Float], _ b: [Float]) -> Double {
        let scale = max(b.map { abs(Double($0)) }.max() ?? 0, 1e-30)
        var worst = 0.0
        for (x, y) in zip(a, b) { worst = max(worst, abs(Double(x) - Double(y)) / scale) }
        return worst
    }
}

/// Accumulates ||got - want||^2 and ||want||^2 over many arrays: a relative Frobenius error, as
/// eval, eval-tensors and convert report it.
public struct RelativeError: Sendable {
    public var difference = 0.0
    public var reference = 0.0

    public init() {}

    public var relative: Double { reference > 0 ? (difference / reference).squareRoot() : 0 }

    public mutating func add(_ got: UnsafePointer<Float>, _ want: UnsafePointer<Float>, _ count: Int) {
        for i in 0 ..< count {
            let d = Double(got[i]) - Double(want[i])
            difference += d * d
            reference += Double(want[i]) * Double(want[i])
        }
    }

    public mutating func add(_ got: [Float], _ want: some Collection<Float>) {
        for (x, y) in zip(got, want) {
            let d = Double(x) - Double(y)
            difference += d * d
            reference += Double(y) * Double(y)
        }
    }

    public mutating func add(_ other: RelativeError) {
        difference += other.difference
        reference += other.reference
    }
}
