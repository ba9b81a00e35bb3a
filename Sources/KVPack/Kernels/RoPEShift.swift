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
