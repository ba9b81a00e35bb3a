#if canImport(Glibc)
import Glibc
#endif

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and reproducible across platforms.
public struct SplitMix64: RandomNumberGenerator, Sendable {
    var state: UInt64
    public init(seed: UInt64) { state = seed }

    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    public mutating func nextUniform() -> Double { Double(next() >> 11) * 0x1.0p-53 }

    /// Standard normal (Box-Muller; the second of the pair is discarded to stay stateless).
    public mutating func nextGaussian() -> Double { nextGaussianPair().0 }

    /// Two independent standard normals (both outputs of Box-Muller).
    public mutating func nextGaussianPair() -> (Double, Double) {
        let u = max(nextUniform(), 0x1.0p-60)
        let v = nextUniform()
        let r = (-2 * log(u)).squareRoot()
        let angle = 2 * Double.pi * v
        return (r * cos(angle), r * sin(angle))
    }
}
