import CKVKernels
import Foundation
import Testing
@testable import KVPack
@testable import KVPackModels

/// Builds GGUF v3 files byte by byte (from the format's description, independently of the reader).
struct GGUFBuilder {
    enum Meta { case u32(UInt32), f32(Float), string(String), strings([String]), i32s([Int32]) }
    var metadata: [(String, Meta)] = []
    var tensors: [(name: String, dims: [Int], type: UInt32, data: [UInt8])] = []
    var versionField: UInt32 = 3

    func bytes() -> [UInt8] {
        var out: [UInt8] = []
        func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { out += $0 } }
        func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { out += $0 } }
        func str(_ s: String) { u64(UInt64(s.utf8.count)); out += Array(s.utf8) }
        out += Array("GGUF".utf8)
        u32(versionField)
        u64(UInt64(tensors.count))
        u64(UInt64(metadata.count))
        for (key, value) in metadata {
            str(key)
            switch value {
            case .u32(let v): u32(4); u32(v)
            case .f32(let v): u32(6); u32(v.bitPattern)
            case .string(let s): u32(8); str(s)
            case .strings(let a): u32(9); u32(8); u64(UInt64(a.count)); a.forEach(str)
            case .i32s(let a): u32(9); u32(5); u64(UInt64(a.count)); a.forEach { u32(UInt32(bitPattern: $0)) }
            }
        }
        var offset = 0
        var offsets: [Int] = []
        for t in tensors {
            offsets.append(offset)
            offset += (t.data.count + 31) / 32 * 32
        }
        for (t, o) in zip(tensors, offsets) {
            str(t.name)
            u32(UInt32(t.dims.count))
            t.dims.forEach { u64(UInt64($0)) }
            u32(t.type)
            u64(UInt64(o))
        }
        while out.count % 32 != 0 { out.append(0) }
        for t in tensors {
            out += t.data
            while out.count % 32 != 0 { out.append(0) }
        }
        return out
    }
}

/// ggml block encodings written from their definitions: (type id, bytes of `weights`).
enum GGMLEncode {
    static func f16(_ x: Float) -> [UInt8] { withUnsafeBytes(of: Float16(x).bitPattern.littleEndian) { Array($0) } }

    static func encode(_ w: [Float], as type: UInt32) -> [UInt8] {
        var out: [UInt8] = []
        switch type {
        case 0: for v in w { withUnsafeBytes(of: v.bitPattern.littleEndian) { out += $0 } }
        case 1: for v in w { out += f16(v) }
        default:
            for b in stride(from: 0, to: w.count, by: 32) {
                let block = Array(w[b ..< b + 32])
                switch type {
                case 8:   // Q8_0: d = max|w| / 127, q = round(w / d)
                    let d = (block.map(abs).max() ?? 0) / 127
                    out += f16(d)
                    out += block.map { UInt8(bitPattern: Int8(d == 0 ? 0 : max(-127, min(127, ($0 / d).rounded())))) }
                case 2:   // Q4_0: d = max-magnitude / -8, q = round(w / d) + 8 in 0...15
                    let m = block.max { abs($0) < abs($1) } ?? 0
                    let d = m / -8
                    out += f16(d)
                    let q = block.map { d == 0 ? 8 : UInt8(max(0, min(15, ($0 / d).rounded() + 8))) }
                    for j in 0 ..< 16 { out.append(q[j] | q[j + 16] << 4) }
                default:  // Q4_1: d = (max - min) / 15, m = min, q = round((w - m) / d)
                    let lo = block.min() ?? 0, hi = block.max() ?? 0
                    let d = (hi - lo) / 15
                    out += f16(d) + f16(lo)
                    let q = block.map { d == 0 ? 0 : UInt8(max(0, min(15, (($0 - lo) / d).rounded()))) }
                    for j in 0 ..< 16 { out.append(q[j] | q[j + 16] << 4) }
                }
            }
        }
        return out
    }

    /// The weights the encoded bytes stand for, decoded with scalar arithmetic.
    static func decode(_ bytes: [UInt8], as type: UInt32, count: Int) -> [Float] {
        func half(_ at: Int) -> Float { Float(Float16(bitPattern: UInt16(bytes[at]) | UInt16(bytes[at + 1]) << 8)) }
        var out: [Float] = []
        switch type {
        case 0: for i in 0 ..< count { out.append(Float(bitPattern: UInt32(bytes[4 * i]) | UInt32(bytes[4 * i + 1]) << 8 | UInt32(bytes[4 * i + 2]) << 16 | UInt32(bytes[4 * i + 3]) << 24)) }
        case 1: for i in 0 ..< count { out.append(half(2 * i)) }
        case 8:
            for b in 0 ..< count / 32 {
                let d = half(34 * b)
                for j in 0 ..< 32 { out.append(d * Float(Int8(bitPattern: bytes[34 * b + 2 + j]))) }
            }
        case 2:
            for b in 0 ..< count / 32 {
                let d = half(18 * b)
                let q = (0 ..< 32).map { j in Int(j < 16 ? bytes[18 * b + 2 + j] & 15 : bytes[18 * b + 2 + j - 16] >> 4) }
                out += q.map { d * Float($0 - 8) }
            }
        default:
            for b in 0 ..< count / 32 {
                let d = half(20 * b), m = half(20 * b + 2)
                let q = (0 ..< 32).map { j in Int(j < 16 ? bytes[20 * b + 4 + j] & 15 : bytes[20 * b + 4 + j - 16] >> 4) }
                out += q.map { d * Float($0) + m }
            }
        }
        return out
    }
}

/// A tiny random Llama as GGUF: every matrix in `type`, norms f32, optional tied output.
func tinyLlamaGGUF(type: UInt32, seed: UInt64 = 3) -> [UInt8] {
    var rng = SplitMix64(seed: seed)
    let dim = 64, hidden = 96, layers = 2, heads = 4, kvHeads = 2, vocab = 40
    func random(_ n: Int, _ scale: Float) -> [Float] { (0 ..< n).map { _ in Float(rng.nextGaussian()) * scale } }
    var b = GGUFBuilder()
    b.metadata = [
        ("general.architecture", .string("llama")), ("llama.embedding_length", .u32(UInt32(dim))),
        ("llama.block_count", .u32(UInt32(layers))), ("llama.attention.head_count", .u32(UInt32(heads))),
        ("llama.attention.head_count_kv", .u32(UInt32(kvHeads))), ("llama.feed_forward_length", .u32(UInt32(hidden))),
        ("llama.context_length", .u32(256)), ("llama.rope.freq_base", .f32(10000)),
        ("llama.attention.layer_norm_rms_epsilon", .f32(1e-5)),
    ]
    func matrix(_ name: String, _ rows: Int, _ cols: Int) {
        b.tensors.append((name, [cols, rows], type, GGMLEncode.encode(random(rows * cols, 0.2), as: type)))
    }
    func norm(_ name: String) { b.tensors.append((name, [dim], 0, GGMLEncode.encode(random(dim, 0.1).map { 1 + $0 }, as: 0))) }
    matrix("token_embd.weight", vocab, dim)
    norm("output_norm.weight")
    for l in 0 ..< layers {
        norm("blk.\(l).attn_norm.weight"); norm("blk.\(l).ffn_norm.weight")
        matrix("blk.\(l).attn_q.weight", dim, dim); matrix("blk.\(l).attn_k.weight", dim / heads * kvHeads, dim)
        matrix("blk.\(l).attn_v.weight", dim / heads * kvHeads, dim); matrix("blk.\(l).attn_output.weight", dim, dim)
        matrix("blk.\(l).ffn_gate.weight", hidden, dim); matrix("blk.\(l).ffn_down.weight", dim, hidden)
        matrix("blk.\(l).ffn_up.weight", hidden, dim)
    }
    return b.bytes()
}

struct GGUFTests {
    static let types: [(UInt32, String)] = [(0, "F32"), (1, "F16"), (8, "Q8_0"), (2, "Q4_0"), (3, "Q4_1")]

    @Test("products on encoded weights equal scalar dequantisation, for any batch size", arguments: types)
    func kernels(type: UInt32, name: String) throws {
        var rng = SplitMix64(seed: UInt64(type) + 11)
        let rows = 37, cols = 96
        let weights = (0 ..< rows * cols).map { _ in Float(rng.nextGaussian()) }
        let bytes = GGMLEncode.encode(weights, as: type)
        let reference = GGMLEncode.decode(bytes, as: type, count: rows * cols)
        // Encoding error is bounded by the format (a wrong nibble order would break this).
        let err = zip(weights, reference).map { abs($0 - $1) }.max()!
        #expect(err < (type == 0 ? 1e-9 : type == 1 ? 2e-3 : type == 8 ? 0.03 : 0.5), "\(name) encode/decode error \(err)")
        let encoding: [UInt32: WeightMatrix.Encoding] = [0: .f32, 1: .f16, 8: .q8_0, 2: .q4_0, 3: .q4_1]
        let x = (0 ..< 6 * cols).map { _ in Float(rng.nextGaussian()) }
        try bytes.withUnsafeBytes { raw in
            let m = WeightMatrix(rows: rows, cols: cols, encoding: encoding[type]!, data: raw.baseAddress!)
            var single = [Float](repeating: 0, count: rows)
            var row = [Float](repeating: 0, count: cols)
            for r in 0 ..< rows {
                row.withUnsafeMutableBufferPointer { m.row(r, into: $0.baseAddress!) }
                #expect(row == Array(reference[r * cols ..< (r + 1) * cols]), "\(name) row \(r)")
            }
            for count in 1 ... 6 {
                var y = [Float](repeating: 0, count: count * rows)
                x.withUnsafeBufferPointer { xp in y.withUnsafeMutableBufferPointer { m.apply(xp.baseAddress!, count: count, into: $0.baseAddress!) } }
                for t in 0 ..< count {
                    for r in 0 ..< rows {
                        var want = 0.0
                        for c in 0 ..< cols { want += Double(reference[r * cols + c]) * Double(x[t * cols + c]) }
                        let got = y[t * rows + r]
                        #expect(abs(Double(got) - want) <= 1e-4 * max(1, abs(want)), "\(name) count \(count) t \(t) r \(r)")
                    }
                }
                // A token's result does not depend on the batch it is in (prefill vs decode).
                if count == 1 { single = y }
                #expect(Array(y[0 ..< rows]) == single, "\(name): batch of \(count) changed token 0")
            }
            _ = try #require(single.count == rows)
        }
    }

    @Test("a tiny GGUF Llama loads in every weight type and runs", arguments: types)
    func tinyModels(type: UInt32, name: String) throws {
        let dir = temporaryDirectory()
        let path = dir + "/tiny-\(name).gguf"
        try Data(tinyLlamaGGUF(type: type)).write(to: URL(fileURLWithPath: path))
        let model = try LlamaModel(path: path)
        #expect(model.config.geometry == ModelGeometry(layerCount: 2, queryHeadCount: 4, kvHeadCount: 2, headDim: 16))
        #expect(model.tokenizer == nil)
        #expect(model.format.contains(name == "F32" ? "F32" : name))
        let logits = try model.forward(tokens: [1, 5, 7, 9], cache: DenseKVCache(geometry: model.config.geometry))
        #expect(logits.count == 40 && logits.allSatisfy(\.isFinite))
    }

    @Test("every truncation, lying counts and bad types are errors naming the offset, never a crash")
    func badFiles() throws {
        let good = tinyLlamaGGUF(type: 3)
        let dir = temporaryDirectory()
        // Truncations across the header and into the data section.
        for cut in Array(0 ..< 1200) + [good.count / 2, good.count - 1] {
            let file = MappedFile(copying: Array(good[0 ..< cut]))
            #expect(throws: ModelError.self, "cut at \(cut)") { try LlamaWeights(gguf: GGUFFile(file: file, path: "cut")) }
        }
        func patched(_ at: Int, _ value: UInt64, width: Int = 8) -> MappedFile {
            var b = good
            for i in 0 ..< width { b[at + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))) }
            return MappedFile(copying: b)
        }
        let cases: [(String, MappedFile, String)] = [
            ("tensor count 2^63", patched(8, 1 << 63), "cannot fit"),
            ("kv count 2^64-1", patched(16, .max), "cannot fit"),
            ("first key length 2^64-1", patched(24, .max), "claims"),
            ("version 1", patched(4, 1, width: 4), "version 1"),
            ("magic", patched(0, 0x46554748, width: 4), "not a GGUF"),
        ]
        for (label, file, message) in cases {
            #expect(label.isEmpty == false)
            #expect { try GGUFFile(file: file, path: label) } throws: { "\($0)".contains(message) && "\($0)".contains("offset") }
        }
        // Random corruption of header bytes: loads or throws, never traps.
        var rng = SplitMix64(seed: 99)
        for _ in 0 ..< 2000 {
            var b = good
            for _ in 0 ..< 1 + Int(rng.next() % 4) { b[Int(rng.next() % 1100)] ^= UInt8(1 << (rng.next() % 8)) }
            _ = try? LlamaWeights(gguf: GGUFFile(file: MappedFile(copying: b), path: "flip"))
        }
        try Data(good).write(to: URL(fileURLWithPath: dir + "/ok.gguf"))
        _ = try LlamaModel(path: dir + "/ok.gguf")
    }
}

/// The runner's products on 8-bit activations (`WeightMatrix.Activations.q8`, C `kvk_weight_dots`).
struct Q8ActivationTests {
    static let types: [(UInt32, WeightMatrix.Encoding, Int32)] = [(8, .q8_0, Int32(KVK_WEIGHTS_Q8_0)), (2, .q4_0, Int32(KVK_WEIGHTS_Q4_0)),
                                                                 (3, .q4_1, Int32(KVK_WEIGHTS_Q4_1))]

    @Test("the exact f32-input block products in C (the default path) equal the Swift ones bit for bit, one to nine inputs, all three encodings",
          arguments: [0, 1, 2])
    func exactProductsInC(index: Int) {
        let (type, encoding, _) = Self.types[index]
        var rng = SplitMix64(seed: 40 + UInt64(type))
        let rows = 29, cols = 192
        let bytes = GGMLEncode.encode((0 ..< rows * cols).map { _ in Float(rng.nextGaussian()) }, as: type)
        let x = (0 ..< 9 * cols).map { _ in Float(rng.nextGaussian()) * 3 }
        bytes.withUnsafeBytes { raw in
            let m = WeightMatrix(rows: rows, cols: cols, encoding: encoding, data: raw.baseAddress!)
            for count in 1 ... 9 {
                var fast = [Float](repeating: .nan, count: count * rows), swift = fast
                x.withUnsafeBufferPointer { xp in
                    fast.withUnsafeMutableBufferPointer { m.apply(xp.baseAddress!, count: count, into: $0.baseAddress!, activations: .f32) }
                    swift.withUnsafeMutableBufferPointer { m.blockRows(0 ..< rows, xp.baseAddress!, count: count, into: $0.baseAddress!) }
                }
                #expect(fast.map(\.bitPattern) == swift.map(\.bitPattern), "count \(count)")
            }
            if kvk_weights_isa() >= 1 {  // the kernel itself ran (not the Swift fallback)
                var y = [Float](repeating: 0, count: rows)
                #expect(kvk_weight_dots_f32(Int32(index == 0 ? KVK_WEIGHTS_Q8_0 : index == 1 ? KVK_WEIGHTS_Q4_0 : KVK_WEIGHTS_Q4_1),
                                            raw.baseAddress!, bytes.count / rows, Int32(rows), Int32(cols / 32), x, 1, cols, &y, rows) == 0)
            }
        }
    }

    @Test("every quantizer variant this machine runs gives the portable codes, steps and sums, for ordinary, tiny, huge, zero, infinite and NaN inputs")
    func quantizerVariants() {
        var rng = SplitMix64(seed: 77)
        let blocks = 40
        var x = (0 ..< 32 * blocks).map { _ in Float(rng.nextGaussian()) * 5 }
        for i in 0 ..< 32 { x[32 + i] = 0 }                                     // block 1: zeros
        for i in 0 ..< 32 { x[64 + i] = Float(rng.nextGaussian() * 1e-41) }    // block 2: subnormals
        for i in 0 ..< 32 { x[96 + i] = Float(rng.nextGaussian()) * 1e37 }     // block 3: huge
        x[128 + 5] = .infinity                                                 // block 4: an infinity
        x[160 + 31] = -.infinity
        x[192 + 0] = .nan                                                      // block 6: NaN first
        x[224 + 17] = .nan
        for i in 0 ..< 32 { x[256 + i] = 127 * Float(i - 16) / 16 + 0.5 }     // block 8: ties at .5
        func run(_ variant: Int32) -> ([Int8], [UInt32], [UInt32])? {
            var q = [Int8](repeating: 0, count: x.count), step = [Float](repeating: .nan, count: blocks), sum = step
            guard kvk_quantize_q8_variant(variant, x, Int32(x.count), &q, &step, &sum) == 0 else { return nil }
            return (q, step.map(\.bitPattern), sum.map(\.bitPattern))
        }
        let portable = run(0)!
        #expect(portable.1[1] == 0 && portable.0[32 ..< 64].allSatisfy { $0 == 0 })
        for variant in 1 ... kvk_weights_isa() {
            let other = run(variant)
            #expect(other?.0 == portable.0, "variant \(variant) codes")
            #expect(other?.1 == portable.1, "variant \(variant) steps")
            #expect(other?.2 == portable.2, "variant \(variant) sums")
        }
        #expect(run(kvk_weights_isa() + 1) == nil)
    }

    @Test("activations quantize to int8 per 32 with step max/127; the dispatched kernel equals the portable one bit for bit and the exact product within the int8 rounding",
          arguments: [0, 1, 2])
    func products(index: Int) {
        let (type, encoding, code) = Self.types[index]
        var rng = SplitMix64(seed: 90 + UInt64(type))
        let rows = 29, cols = 160, blocks = cols / 32
        let weights = (0 ..< rows * cols).map { _ in Float(rng.nextGaussian()) }
        let bytes = GGMLEncode.encode(weights, as: type)
        let reference = GGMLEncode.decode(bytes, as: type, count: rows * cols)
        var x = (0 ..< 5 * cols).map { _ in Float(rng.nextGaussian()) * 3 }
        for c in 0 ..< 32 { x[2 * cols + c] = 0 }  // an all-zero block
        x[3 * cols + 40] = 400                     // an outlier coarsens its block only
        var q = [Int8](repeating: 0, count: x.count), step = [Float](repeating: 0, count: 5 * blocks), sum = step
        for t in 0 ..< 5 {
            x.withUnsafeBufferPointer { xp in
                q.withUnsafeMutableBufferPointer { qp in
                    step.withUnsafeMutableBufferPointer { sp in
                        sum.withUnsafeMutableBufferPointer { up in
                            kvk_quantize_q8(xp.baseAddress! + t * cols, Int32(cols), qp.baseAddress! + t * cols, sp.baseAddress! + t * blocks,
                                            up.baseAddress! + t * blocks)
                        }
                    }
                }
            }
        }
        for t in 0 ..< 5 {
            for b in 0 ..< blocks {
                let v = x[t * cols + 32 * b ..< t * cols + 32 * b + 32], codes = q[t * cols + 32 * b ..< t * cols + 32 * b + 32]
                #expect(step[t * blocks + b] == v.map(abs).max()! / 127)
                #expect(codes.allSatisfy { abs(Int($0)) <= 127 } && (v.map(abs).max()! == 0) == codes.allSatisfy { $0 == 0 })
                #expect(sum[t * blocks + b] == step[t * blocks + b] * Float(codes.reduce(0) { $0 + Int($1) }))
                for (a, c) in zip(v, codes) { #expect(abs(a - step[t * blocks + b] * Float(c)) <= step[t * blocks + b] / 2 * 1.0001) }
            }
        }
        let rowBytes = bytes.count / rows
        bytes.withUnsafeBytes { raw in
            for count in 1 ... 5 {
                // All rows in one call (four at a time for one input), and each row alone.
                var fast = [Float](repeating: 0, count: count * rows), portable = fast, single = fast
                kvk_weight_dots(code, raw.baseAddress!, rowBytes, Int32(rows), Int32(blocks), q, step, sum, Int32(count), cols, &fast, rows)
                #expect(kvk_weight_dots_variant(0, code, raw.baseAddress!, rowBytes, Int32(rows), Int32(blocks), q, step, sum, Int32(count), cols,
                                                &portable, rows) == 0)
                // Every variant this machine runs (AVX2, VNNI) gives the portable bits.
                for variant in 1 ... kvk_weights_isa() {
                    var other = [Float](repeating: .nan, count: count * rows)
                    #expect(kvk_weight_dots_variant(variant, code, raw.baseAddress!, rowBytes, Int32(rows), Int32(blocks), q, step, sum, Int32(count),
                                                    cols, &other, rows) == 0)
                    #expect(other.map(\.bitPattern) == portable.map(\.bitPattern), "variant \(variant) count \(count)")
                }
                #expect(kvk_weight_dots_variant(kvk_weights_isa() + 1, code, raw.baseAddress!, rowBytes, Int32(rows), Int32(blocks), q, step, sum,
                                                Int32(count), cols, &single, rows) == -1)
                for r in 0 ..< rows {
                    single.withUnsafeMutableBufferPointer {
                        kvk_weight_dots(code, raw.baseAddress! + r * rowBytes, rowBytes, 1, Int32(blocks), q, step, sum, Int32(count), cols,
                                        $0.baseAddress! + r, rows)
                    }
                }
                #expect(fast.map(\.bitPattern) == portable.map(\.bitPattern), "count \(count)")
                #expect(fast.map(\.bitPattern) == single.map(\.bitPattern), "count \(count)")
                for t in 0 ..< count {
                    for r in 0 ..< rows {
                        var exact = 0.0, scale = 0.0
                        for c in 0 ..< cols {
                            exact += Double(reference[r * cols + c]) * Double(x[t * cols + c])
                            scale += abs(Double(reference[r * cols + c])) * Double(step[t * blocks + c / 32])
                        }
                        // Each activation is off by at most half its step.
                        #expect(abs(Double(fast[t * rows + r]) - exact) <= 0.5 * scale + 1e-3, "row \(r) input \(t)")
                    }
                }
                // Through WeightMatrix: q8 mode gives the kernel's results for every batch size.
                let m = WeightMatrix(rows: rows, cols: cols, encoding: encoding, data: raw.baseAddress!)
                var y = [Float](repeating: 0, count: count * rows)
                x.withUnsafeBufferPointer { xp in y.withUnsafeMutableBufferPointer { m.apply(xp.baseAddress!, count: count, into: $0.baseAddress!, activations: .q8) } }
                #expect(y.map(\.bitPattern) == fast.map(\.bitPattern), "count \(count)")
            }
        }
    }
}
