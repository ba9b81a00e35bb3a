/// Byte planes (raw codec 2, Spec 7.2 scheme 1): a block's elements regrouped so zstd sees like
/// bytes together. Plane p holds byte p (little-endian) of every element, channel-major within
/// the plane: element (t, c) of a `tokens x dim` block is at `p * n + c * tokens + t`, n the
/// element count. The high plane of f16/bf16 (sign, exponent, top mantissa bits) repeats along a
/// channel; the low plane is mantissa noise. Measured on SmolLM2's f16 K/V: zstd over planes
/// 1.16x against 1.08x over rows (BENCHMARKS.md).
enum BytePlanes {
    /// Rows (`tokens x dim` elements of `width` bytes, token-major) to planes.
    static func split(_ rows: UnsafeRawPointer, into planes: UnsafeMutableRawPointer, tokens: Int, dim: Int, width: Int) {
        let n = tokens * dim
        let src = rows.assumingMemoryBound(to: UInt8.self), dst = planes.assumingMemoryBound(to: UInt8.self)
        for t in 0 ..< tokens {
            for c in 0 ..< dim {
                let from = (t * dim + c) * width, to = c * tokens + t
                for p in 0 ..< width { dst[p * n + to] = src[from + p] }
            }
        }
    }

    /// Planes back to rows, byte for byte.
    static func join(_ planes: UnsafeRawPointer, into rows: UnsafeMutableRawPointer, tokens: Int, dim: Int, width: Int) {
        let n = tokens * dim
        let src = planes.assumingMemoryBound(to: UInt8.self), dst = rows.assumingMemoryBound(to: UInt8.self)
        for c in 0 ..< dim {
            for t in 0 ..< tokens {
                let to = (t * dim + c) * width, from = c * tokens + t
                for p in 0 ..< width { dst[to + p] = src[p * n + from] }
            }
        }
    }
}
