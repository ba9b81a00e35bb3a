/// Moves post-RoPE keys to other positions: rotating a key encoded at position p by the angles
/// of `delta` gives the key encoded at p + delta (rotations of one frequency compose by adding
/// angles), so a cache can be renumbered without the model: a context shift.
///
/// One table per delta (cos and sin of `delta * theta^(-2i/d)`, computed in double precision)
/// serves every layer and head of a token.
public struct RoPEShift: Sendable {
    public let rope: RoPEConfig
    public let headDim: Int
    /// cos, sin interleaved: 2 * headDim / 2 values.
    private var table: [Float]
    /// The delta the table holds.
    public private(set) var delta: Int = 0

    public init(rope: RoPEConfig, headDim: Int) throws {
        guard rope.layout != .none, rope.keysArePostRoPE, rope.theta > 0 else {
            throw KVPackError.argument("keys can be moved to other positions only when they are stored after a known rotary embedding (this file: layout \(rope.layout), keys \(rope.keysArePostRoPE ? "after" : "before") RoPE, theta \(rope.theta))")
        }
        guard headDim % 2 == 0 else { throw KVPackError.argument("rotary pairs need an even head dimension, got \(headDim)") }
        self.rope = rope
        self.headDim = headDim
        table = [Float](repeating: 0, count: headDim)
        fill(delta: 0)
    }

    /// Prepares the table for `delta` positions (no work when it is already set).
    public mutating func set(delta: Int) {
        if delta != self.delta { fill(delta: delta) }
    }

    private mutating func fill(delta: Int) {
        self.delta = delta
        let pairs = headDim / 2
        for i in 0 ..< pairs {
            let frequency = 1 / LibM.pow(rope.theta, Double(2 * i) / Double(headDim))
            let angle = Double(delta) * frequency
            table[2 * i] = Float(LibM.cos(angle))
            table[2 * i + 1] = Float(LibM.sin(angle))
        }
    }

    /// Rotates one key row of `headDim` floats in place by the current delta.
    public func apply(_ row: UnsafeMutablePointer<Float>) {
        let pairs = headDim / 2
        let (stride, offset) = rope.layout == .interleaved ? (2, 1) : (1, pairs)
        table.withUnsafeBufferPointer { t in
            for i in 0 ..< pairs {
                let a = i * stride, b = a + offset
                let c = t[2 * i], s = t[2 * i + 1]
                let x = row[a], y = row[b]
                row[a] = x * c - y * s
                row[b] = x * s + y * c
            }
        }
    }
}

/// Moves key rows between the two RoPE pair layouts: interleaved pairs (2j, 2j+1), as llama.cpp
/// and GGUF Llama models store keys, and rotate-half pairs (j, j + d/2), as Hugging Face does.
/// The two are one fixed permutation of each head's dimensions apart (rotate-half dim j is
/// interleaved dim 2j, j + d/2 is 2j+1); attention is unchanged when queries move the same way,
/// and values are not permuted.
public struct RoPEPairing: Sendable {
    public let from: RoPELayout
    public let to: RoPELayout
    public let headDim: Int
    /// out[i] = in[source[i]].
    private let source: [Int]

    public init(from: RoPELayout, to: RoPELayout, headDim: Int) throws {
        guard from != .none, to != .none else {
            throw KVPackError.argument("keys move between RoPE layouts only when both are known pair layouts (from \(from) to \(to))")
        }
        guard headDim % 2 == 0 else { throw KVPackError.argument("rotary pairs need an even head dimension, got \(headDim)") }
        self.from = from
        self.to = to
        self.headDim = headDim
        let half = headDim / 2
        var source = Array(0 ..< headDim)
        if from == .interleaved && to == .rotateHalf {
            for j in 0 ..< half { source[j] = 2 * j; source[j + half] = 2 * j + 1 }
        } else if from == .rotateHalf && to == .interleaved {
            for j in 0 ..< half { source[2 * j] = j; source[2 * j + 1] = j + half }
        }
        self.source = source
    }

    public var isIdentity: Bool { from == to }

    /// Permutes `count` consecutive rows of `headDim` floats in place.
    public func apply(rows: UnsafeMutablePointer<Float>, count: Int) {
        for r in 0 ..< count { apply(rows + r * headDim) }
    }

    /// Permutes every row of `rows` (a whole number of rows of `headDim` floats) in place.
    public func apply(_ rows: inout [Float]) {
        rows.withUnsafeMutableBufferPointer { apply(rows: $0.baseAddress!, count: $0.count / headDim) }
    }

    /// Permutes one row of `headDim` floats in place.
    public func apply(_ row: UnsafeMutablePointer<Float>) {
        guard !isIdentity else { return }
        withUnsafeTemporaryAllocation(of: Float.self, capacity: headDim) { tmp in
            for i in 0 ..< headDim { tmp[i] = row[source[i]] }
            for i in 0 ..< headDim { row[i] = tmp[i] }
        }
    }
}
