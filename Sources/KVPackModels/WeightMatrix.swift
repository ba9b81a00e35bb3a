#if canImport(Glibc)
import Glibc
#endif
import CKVKernels
import CKVWorkers
import KVPack

/// A row-major weight matrix [rows x cols] in mapped memory, in one of the encodings models ship
/// in: f32 (llama2.c), f16, and ggml's block formats Q8_0, Q4_0 and Q4_1 (32 weights per block
/// with an f16 scale, and for Q4_1 an f16 minimum). Products run on the encoded weights: each
/// 32-weight block is expanded in registers, never into a dequantised copy of the matrix.
struct WeightMatrix: @unchecked Sendable {
    // @unchecked: `data` addresses a read-only mapping that the owning model keeps alive.
    enum Encoding: Sendable, Equatable {
        case f32, f16, q8_0, q4_0, q4_1
    }

    let rows: Int
    let cols: Int
    let encoding: Encoding
    let data: UnsafeRawPointer
    let rowBytes: Int

    init(rows: Int, cols: Int, encoding: Encoding, data: UnsafeRawPointer) {
        self.rows = rows
        self.cols = cols
        self.encoding = encoding
        self.data = data
        switch encoding {
        case .f32: rowBytes = 4 * cols
        case .f16: rowBytes = 2 * cols
        case .q8_0: rowBytes = cols / 32 * 34
        case .q4_0: rowBytes = cols / 32 * 18
        case .q4_1: rowBytes = cols / 32 * 20
        }
    }

    var isBlockQuantized: Bool { encoding == .q8_0 || encoding == .q4_0 || encoding == .q4_1 }

    /// Worker threads for large products (rows are split between them; each output is computed
    /// by one thread with the same operations, so results do not depend on the thread count).
    /// `KVPACK_THREADS` overrides the default of one per core.
    nonisolated(unsafe) static var threadCount: Int = {
        if let text = getenv("KVPACK_THREADS").map({ String(cString: $0) }), let n = Int(text), n >= 1 { return min(n, 64) }
        return max(1, min(sysconf(Int32(_SC_NPROCESSORS_ONLN)), 64))
    }()

    /// What the block-quantized products (Q8_0, Q4_0, Q4_1) multiply the weights with.
    enum Activations: String, Sendable {
        /// The f32 inputs, each weight block expanded to f32: the exact product of the stored
        /// weights, summed in `RowKernels.dot`'s order. The default: it is why the runner agrees
        /// with Hugging Face and a float64 reference where llama.cpp flips a near tie.
        case f32
        /// The inputs quantized to int8 per 32-element block, integer products per weight block
        /// (`kvk_weight_dots`), as llama.cpp computes its Q4/Q8 products: faster, not exact.
        case q8
    }

    /// `KVPACK_ACTIVATIONS=q8` selects `Activations.q8` for every model in the process (read once).
    static let activations: Activations = {
        getenv("KVPACK_ACTIVATIONS").flatMap { Activations(rawValue: String(cString: $0)) } ?? .f32
    }()

    /// Y[t] = W x X[t] for `count` input rows (stride cols) into output rows (stride rows).
    func apply(_ x: UnsafePointer<Float>, count: Int, into y: UnsafeMutablePointer<Float>, activations: Activations = WeightMatrix.activations) {
        if isBlockQuantized, activations == .q8 { return applyQuantized(x, count: count, into: y) }
        // Each chunk writes disjoint outputs.
        parallelRows(count: count, threshold: 1 << 18) { applyRows($0, x, count: count, into: y) }
    }

    /// Runs `body` over all rows, split between worker threads when the product has at least
    /// `threshold` multiply-adds (each output row is computed by one thread, so results do not
    /// depend on the thread count). The threads are `kvk_workers_run`'s pool, which stays alive
    /// between products: a split costs about a microsecond to start, where a dispatch queue's cost
    /// tens and made two threads decode slower than one (SmolLM2 q8: 134 against 140 tokens/s;
    /// with the pool 153-175). Thresholds, measured on SmolLM2 decode at 2 threads: f32 products
    /// pay for a split from 2^18 multiply-adds (the q and o projections); so do integer ones with
    /// the pool (2^19, which leaves q and o on one thread: 152-178 tokens/s; 2^18 and 2^17, the
    /// same split here: 171-184; 2^16, which splits k and v too: 157-177).
    private func parallelRows(count: Int, threshold: Int, _ body: (Range<Int>) -> Void) {
        let work = rows * cols * count
        let threads = work >= threshold ? Self.threadCount : 1
        if threads == 1 { return body(0 ..< rows) }
        // Chunks of whole four-row groups (the decode kernel's unit), four per thread so a slow
        // thread is caught up by the others.
        let chunk = ((rows + threads * 4 - 1) / (threads * 4) + 3) & ~3
        let chunks = (rows + chunk - 1) / chunk
        withoutActuallyEscaping(body) { body in
            var job = RowJob(rows: rows, chunk: chunk, body: body)
            withUnsafeMutablePointer(to: &job) { pointer in
                kvk_workers_run(Int32(threads), Int32(chunks), { context, c in
                    let job = context!.assumingMemoryBound(to: RowJob.self)
                    let lo = Int(c) * job.pointee.chunk
                    job.pointee.body(lo ..< min(job.pointee.rows, lo + job.pointee.chunk))
                }, pointer)
            }
        }
    }

    /// What the pool's C callback needs: read by every worker, written by none.
    private struct RowJob {
        let rows: Int
        let chunk: Int
        let body: (Range<Int>) -> Void
    }

    /// `Activations.q8`: every input row quantized once, then each weight row against all of them.
    private func applyQuantized(_ x: UnsafePointer<Float>, count: Int, into y: UnsafeMutablePointer<Float>) {
        let blocks = cols / 32, encoding = kernelEncoding
        withUnsafeTemporaryAllocation(of: Int8.self, capacity: count * cols) { q in
            withUnsafeTemporaryAllocation(of: Float.self, capacity: 2 * count * blocks) { f in
                let codes = q.baseAddress!, steps = f.baseAddress!, sums = steps + count * blocks
                // The input rows lie back to back, and cols is a multiple of 32: one call quantizes them all.
                kvk_quantize_q8(x, Int32(count * cols), codes, steps, sums)
                // Each chunk reads the shared inputs and writes disjoint outputs.
                parallelRows(count: count, threshold: 1 << 18) { range in
                    kvk_weight_dots(encoding, data + range.lowerBound * rowBytes, rowBytes, Int32(range.count), Int32(blocks), codes, steps, sums,
                                    Int32(count), cols, y + range.lowerBound, rows)
                }
            }
        }
    }

    /// The C kernels' name for a block encoding.
    private var kernelEncoding: Int32 {
        Int32(encoding == .q8_0 ? KVK_WEIGHTS_Q8_0 : encoding == .q4_0 ? KVK_WEIGHTS_Q4_0 : KVK_WEIGHTS_Q4_1)
    }

    private func applyRows(_ range: Range<Int>, _ x: UnsafePointer<Float>, count: Int, into y: UnsafeMutablePointer<Float>) {
        switch encoding {
        case .f32:
            // llama2.c's order of operations (the pinned reference), one dot per row and token.
            let w = data.assumingMemoryBound(to: Float.self)
            for r in range {
                for t in 0 ..< count { y[t * rows + r] = RowKernels.dot(w + r * cols, x + t * cols, cols) }
            }
        case .f16:
            let scratch = UnsafeMutablePointer<Float>.allocate(capacity: cols)
            defer { scratch.deallocate() }
            for r in range {
                RowKernels.widenFloat16(data + r * rowBytes, scratch, cols)
                for t in 0 ..< count { y[t * rows + r] = RowKernels.dot(scratch, x + t * cols, cols) }
            }
        case .q8_0, .q4_0, .q4_1:
            // The same arithmetic in C (AVX2 + FMA, decode rows prefetched ahead; the same bits,
            // tested): Swift cannot select those instructions in a baseline build, and its SIMD
            // code here spilled and called a generic conversion per block (SmolLM2 f32 decode on
            // one core: 29 tokens/s in Swift, 77 in C).
            if kvk_weight_dots_f32(kernelEncoding, data + range.lowerBound * rowBytes, rowBytes, Int32(range.count), Int32(cols / 32), x,
                                   Int32(count), cols, y + range.lowerBound, rows) == 0 { return }
            blockRows(range, x, count: count, into: y)
        }
    }

    /// The exact block products in Swift: where the C kernel cannot run, and for tests.
    func blockRows(_ range: Range<Int>, _ x: UnsafePointer<Float>, count: Int, into y: UnsafeMutablePointer<Float>) {
        switch encoding {
        case .f32, .f16: preconditionFailure("blockRows is for block encodings")
        case .q8_0, .q4_0, .q4_1:
            for r in range {
                var t = 0
                while t + 4 <= count {
                    let s = blockDot4(row: r, x + t * cols, stride: cols)
                    y[t * rows + r] = s.0
                    y[(t + 1) * rows + r] = s.1
                    y[(t + 2) * rows + r] = s.2
                    y[(t + 3) * rows + r] = s.3
                    t += 4
                }
                while t < count {
                    y[t * rows + r] = blockDot1(row: r, x + t * cols)
                    t += 1
                }
            }
        }
    }

    /// Row `r` as floats.
    func row(_ r: Int, into out: UnsafeMutablePointer<Float>) {
        let p = data + r * rowBytes
        switch encoding {
        case .f32: out.update(from: p.assumingMemoryBound(to: Float.self), count: cols)
        case .f16: RowKernels.widenFloat16(p, out, cols)
        case .q8_0, .q4_0, .q4_1:
            let raw = UnsafeMutableRawPointer(out)
            for b in 0 ..< cols / 32 {
                let w = expand(p + b * blockBytes)
                raw.storeBytes(of: w.0, toByteOffset: 128 * b, as: SIMD8<Float>.self)
                raw.storeBytes(of: w.1, toByteOffset: 128 * b + 32, as: SIMD8<Float>.self)
                raw.storeBytes(of: w.2, toByteOffset: 128 * b + 64, as: SIMD8<Float>.self)
                raw.storeBytes(of: w.3, toByteOffset: 128 * b + 96, as: SIMD8<Float>.self)
            }
        }
    }

    private var blockBytes: Int { encoding == .q8_0 ? 34 : encoding == .q4_0 ? 18 : 20 }

    /// The 32 weights of the block at `p`, as ggml defines them: Q8_0 d*q (q int8), Q4_0
    /// d*(q-8), Q4_1 d*q+m (q a nibble; byte j holds weight j low and weight j+16 high).
    @inline(__always)
    private func expand(_ p: UnsafeRawPointer) -> (SIMD8<Float>, SIMD8<Float>, SIMD8<Float>, SIMD8<Float>) {
        let d = SIMD8<Float>(repeating: Float(p.loadUnaligned(as: Float16.self)))
        switch encoding {
        case .q8_0:
            let q = p.loadUnaligned(fromByteOffset: 2, as: SIMD32<Int8>.self)
            let lo = SIMD16<Int32>(truncatingIfNeeded: q.lowHalf), hi = SIMD16<Int32>(truncatingIfNeeded: q.highHalf)
            return (d * SIMD8<Float>(lo.lowHalf), d * SIMD8<Float>(lo.highHalf), d * SIMD8<Float>(hi.lowHalf), d * SIMD8<Float>(hi.highHalf))
        case .q4_0:
            let q = p.loadUnaligned(fromByteOffset: 2, as: SIMD16<UInt8>.self)
            let lo = SIMD16<Int32>(truncatingIfNeeded: q & 15) &- 8, hi = SIMD16<Int32>(truncatingIfNeeded: q &>> 4) &- 8
            return (d * SIMD8<Float>(lo.lowHalf), d * SIMD8<Float>(lo.highHalf), d * SIMD8<Float>(hi.lowHalf), d * SIMD8<Float>(hi.highHalf))
        default:
            let m = SIMD8<Float>(repeating: Float(p.loadUnaligned(fromByteOffset: 2, as: Float16.self)))
            let q = p.loadUnaligned(fromByteOffset: 4, as: SIMD16<UInt8>.self)
            let lo = SIMD16<Int32>(truncatingIfNeeded: q & 15), hi = SIMD16<Int32>(truncatingIfNeeded: q &>> 4)
            var a = m, b = m, c = m, e = m
            a.addProduct(d, SIMD8<Float>(lo.lowHalf))
            b.addProduct(d, SIMD8<Float>(lo.highHalf))
            c.addProduct(d, SIMD8<Float>(hi.lowHalf))
            e.addProduct(d, SIMD8<Float>(hi.highHalf))
            return (a, b, c, e)
        }
    }

    @inline(__always)
    private func load8(_ x: UnsafePointer<Float>, _ i: Int) -> SIMD8<Float> {
        UnsafeRawPointer(x).loadUnaligned(fromByteOffset: 4 * i, as: SIMD8<Float>.self)
    }

    /// One row against one input: the accumulation order of `RowKernels.dot` (16 at a time into
    /// two accumulators), so it equals the dot product of the expanded row.
    private func blockDot1(row r: Int, _ x: UnsafePointer<Float>) -> Float {
        let p = data + r * rowBytes, bb = blockBytes
        var a0 = SIMD8<Float>(), a1 = SIMD8<Float>()
        for b in 0 ..< cols / 32 {
            let w = expand(p + b * bb), i = 32 * b
            a0.addProduct(w.0, load8(x, i)); a1.addProduct(w.1, load8(x, i + 8))
            a0.addProduct(w.2, load8(x, i + 16)); a1.addProduct(w.3, load8(x, i + 24))
        }
        return (a0 + a1).sum()
    }

    /// One row against four inputs, expanding each block once; each input's result equals
    /// `blockDot1`'s bit for bit (same operations in the same order).
    private func blockDot4(row r: Int, _ x: UnsafePointer<Float>, stride: Int) -> (Float, Float, Float, Float) {
        let p = data + r * rowBytes, bb = blockBytes
        let x0 = x, x1 = x + stride, x2 = x + 2 * stride, x3 = x + 3 * stride
        var a0 = SIMD8<Float>(), a1 = SIMD8<Float>(), b0 = SIMD8<Float>(), b1 = SIMD8<Float>()
        var c0 = SIMD8<Float>(), c1 = SIMD8<Float>(), d0 = SIMD8<Float>(), d1 = SIMD8<Float>()
        for b in 0 ..< cols / 32 {
            let w = expand(p + b * bb), i = 32 * b
            a0.addProduct(w.0, load8(x0, i)); a1.addProduct(w.1, load8(x0, i + 8))
            b0.addProduct(w.0, load8(x1, i)); b1.addProduct(w.1, load8(x1, i + 8))
            c0.addProduct(w.0, load8(x2, i)); c1.addProduct(w.1, load8(x2, i + 8))
            d0.addProduct(w.0, load8(x3, i)); d1.addProduct(w.1, load8(x3, i + 8))
            a0.addProduct(w.2, load8(x0, i + 16)); a1.addProduct(w.3, load8(x0, i + 24))
            b0.addProduct(w.2, load8(x1, i + 16)); b1.addProduct(w.3, load8(x1, i + 24))
            c0.addProduct(w.2, load8(x2, i + 16)); c1.addProduct(w.3, load8(x2, i + 24))
            d0.addProduct(w.2, load8(x3, i + 16)); d1.addProduct(w.3, load8(x3, i + 24))
        }
        return ((a0 + a1).sum(), (b0 + b1).sum(), (c0 + c1).sum(), (d0 + d1).sum())
    }
}
