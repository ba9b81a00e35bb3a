import CKVKernels
import Testing
@testable import KVPack

/// The C kernels (Sources/CKVKernels) against the Double reference: the dense f16 baseline of
/// `kvpack bench` must compute the attention it claims to (whichever variant the CPU selected),
/// and the bandwidth probe must read every byte.
struct CKernelTests {
    @Test("C dense f16 attention equals the Double reference over the same f16 rows (groups 1-8, head_dim 8-256, 0-1000 tokens)")
    func denseF16MatchesReference() throws {
        var rng = SplitMix64(seed: 3)
        for (group, dim, tokens) in [(4, 128, 1000), (1, 8, 1), (3, 64, 33), (8, 256, 97), (2, 16, 32), (5, 24, 31), (4, 128, 0)] {
            let q = (0 ..< group * dim).map { _ in Float(rng.nextGaussian()) * 1.5 }
            // Keys with a few large channels (as RoPE'd keys have), values unit-scale.
            let keys = (0 ..< tokens * dim).map { i in Float16(Float(rng.nextGaussian()) * (i % dim < 2 ? 12 : 1)) }
            let values = (0 ..< tokens * dim).map { _ in Float16(Float(rng.nextGaussian())) }
            let scale = 1 / Float(dim).squareRoot()
            let want = DenseAttention.reference(queries: q, keys: keys.map(Float.init), values: values.map(Float.init), groupSize: group, headDim: dim)
            for (variant, kernel) in [(String(cString: kvk_isa_name()), kvk_dense_f16_attention), ("portable", kvk_dense_f16_attention_portable)] {
                var out = [Float](repeating: .nan, count: group * dim)
                let status = keys.map(\.bitPattern).withUnsafeBufferPointer { k in
                    values.map(\.bitPattern).withUnsafeBufferPointer { v in
                        kernel(q, Int32(group), Int32(dim), k.baseAddress, v.baseAddress, tokens, scale, &out)
                    }
                }
                #expect(status == 0)
                if tokens == 0 {
                    #expect(out.allSatisfy { $0 == 0 }, "\(variant)")
                    continue
                }
                let err = DenseAttention.maxRelativeError(out, want)
                #expect(err < 1e-5, "group \(group), head_dim \(dim), \(tokens) tokens (\(variant)): \(err)")
            }
        }
        // Sizes it does not take are refused, not read.
        var out = [Float](repeating: 0, count: 16)
        #expect(kvk_dense_f16_attention([Float](repeating: 1, count: 12), 1, 12, nil, nil, 4, 1, &out) == -1)
        #expect(kvk_dense_f16_attention([Float](repeating: 1, count: 8), 9, 8, nil, nil, 4, 1, &out) == -1)
    }

    @Test("the C bandwidth probe reads every byte: one changed byte anywhere changes what it returns, the same bytes give the same result")
    func streamReadTouchesEveryByte() {
        var bytes = [UInt8](repeating: 0, count: 4096)
        for i in bytes.indices { bytes[i] = UInt8(truncatingIfNeeded: i &* 7) }
        for probe in [kvk_stream_read, kvk_stream_read_portable] {
            let base = bytes.withUnsafeBytes { probe($0.baseAddress, 4096) }
            #expect(base == bytes.withUnsafeBytes { probe($0.baseAddress, 4096) })
            for at in [0, 1, 2, 3, 17, 31, 32, 255, 256, 1000, 4095] {
                var changed = bytes
                changed[at] ^= 0x80
                #expect(changed.withUnsafeBytes { probe($0.baseAddress, 4096) } != base, "byte \(at)")
            }
        }
    }

    @Test("the integer multiply-add probe counts the products of the variant it ran, whose chains sum as the arithmetic says")
    func int8Probe() {
        var sink: Int32 = 99
        let products = kvk_int8_madd_probe(1000, &sink)
        switch String(cString: kvk_int8_isa_name()) {
        case "avx512-vnni vpdpbusd":
            #expect(products == 1000 * 8 * 64 && sink == 0)   // chains of 3 x (1, -1, 2, -2, 5, -5, 7, -7) cancel
        case "avx2 vpmaddubsw":
            #expect(products == 1000 * 8 * 32 && sink == 0)
        default:
            #expect(products == 1000 * 8)
        }
    }
}
