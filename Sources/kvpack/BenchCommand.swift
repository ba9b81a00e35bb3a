import ArgumentParser
import Foundation
import KVPack

struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Measure decode-step attention over encoded files against dense baselines and the machine's floors, and writer throughput.",
        discussion: """
        One run, side by side: the machine's single-core streaming read bandwidth and peak multiply-add rate; then, for each --tokens count, a synthetic cache of one layer of --model's geometry (llama-3-8b: 8 KV heads, head_dim 128, GQA group 4) written in every --scheme (writer throughput in MB/s of f16 input), and the time of one decode step of attention for KV head 0 (all query heads of its group, every token) over the mapped file in the page cache (median of --repeat). Baselines: dense f16 and f32 rows in memory (a heap copy of a raw file, read by the same SIMD row kernels). Each scheme's floor is the larger of (bytes of its codes and metadata read) / bandwidth and (4 * group * head_dim flops per token) / peak rate.

        Columns: bytes per token and head (K+V), attention time, effective bandwidth, floor, time / floor, dense f16 time / time (speed-up), writer MB/s. Timing is never a test; this command is how figures in BENCHMARKS.md are made (`make bench`).
        """)

    @Option(help: "Geometry preset (llama-3-8b, smollm2-135m, stories260k, ...).") var model = "llama-3-8b"
    @Option(name: .customLong("tokens"), help: "Cache lengths; repeat (default 4096 and 32768).") var tokenCounts: [Int] = []
    @Option(name: .customLong("scheme"), help: "Schemes to measure; repeat (default: one of each).") var schemes: [String] = []
    @Option(name: .customLong("repeat"), help: "Timed repetitions per measurement (the median is reported).") var repetitions = 7
    @Option(help: "Keep the files in this directory (default: a temporary one, removed).") var keep: String?

    static let defaultSchemes = ["raw:f16", "raw:bf16", "int:k8v8:kc64", "int:k4v4:kc64", "int:k4v2:kc64", "int:k2v2:kc64",
                                 "polar:r4a4+v:raw:f16", "svdq:2:shared+v:raw:f16", "nsn:2", "nsn:1"]

    func run() throws {
        guard let preset = ModelPreset.named(model) else { throw CLIError("unknown model preset \(model)") }
        var g = preset.geometry
        g.layerCount = 1
        let counts = tokenCounts.isEmpty ? [4096, 32768] : tokenCounts
        let specs = schemes.isEmpty ? Self.defaultSchemes : schemes
        let machine = Self.measureMachine()
        print(String(format: "machine: %@, single-core read bandwidth %.2f GB/s, peak multiply-add %.1f GFLOP/s (f32, one core)",
                     Self.cpuName(), machine.bandwidth / 1e9, machine.flops / 1e9))
        print("geometry: one layer of \(preset.name): \(g.kvHeadCount) KV heads, head_dim \(g.headDim), GQA group \(g.groupSize); attention for KV head 0 over every token\n")
        try withWorkDirectory(keep: keep, prefix: "kvpack-bench") { dir in
            for n in counts {
                var rows = [["scheme", "tokens", "B/token/head", "attention", "GB/s", "floor", "x floor", "vs f16", "writer MB/s"]]
                let data = Self.generate(geometry: g, rope: preset.rope, tokens: n)
                var denseF16: Double = 0
                // Dense baselines: raw rows in memory.
                for (label, spec) in [("dense f16 (memory)", "raw:f16"), ("dense f32 (memory)", "raw:f32")] {
                    let path = "\(dir)/dense-\(n).kvpack"
                    _ = try Self.write(path: path, spec: spec, geometry: g, rope: preset.rope, data: data, tokens: n)
                    let mapped = try MappedFile(path: path)
                    let file = withExtendedLifetime(mapped) { MappedFile(copying: mapped.bytes) }
                    let reader = try KVPackReader(file: file, path: path)
                    let r = try measure(reader, n: n, machine: machine)
                    if spec == "raw:f16" { denseF16 = r.seconds }
                    rows.append([label, "\(n)", "\(r.bytesPerToken)", Self.time(r.seconds), String(format: "%.2f", r.gbps),
                                 Self.time(r.floor), String(format: "%.2f", r.seconds / r.floor), String(format: "%.2f", denseF16 / r.seconds), "-"])
                    try? FileManager.default.removeItem(atPath: path)
                }
                for spec in specs {
                    let path = "\(dir)/bench-\(n)-\(spec.map { $0.isLetter || $0.isNumber ? $0 : "_" }.map(String.init).joined()).kvpack"
                    let writeSeconds = try Self.write(path: path, spec: spec, geometry: g, rope: preset.rope, data: data, tokens: n)
                    let reader = try KVPackReader(path: path)
                    let r = try measure(reader, n: n, machine: machine)
                    let inputMB = Double(n * g.kvHeadCount * g.headDim * 2 * 2) / 1e6
                    rows.append([spec, "\(n)", "\(r.bytesPerToken)", Self.time(r.seconds), String(format: "%.2f", r.gbps),
                                 Self.time(r.floor), String(format: "%.2f", r.seconds / r.floor), String(format: "%.2f", denseF16 / r.seconds),
                                 String(format: "%.0f", inputMB / writeSeconds)])
                    try? FileManager.default.removeItem(atPath: path)
                }
                print(formatTable(rows))
                print("")
            }
        }
    }

    struct Result {
        var seconds: Double
        var bytesPerToken: Int
        var gbps: Double
        var floor: Double
    }

    func measure(_ reader: KVPackReader, n: Int, machine: (bandwidth: Double, flops: Double)) throws -> Result {
        let g = reader.geometry
        let bytes = try reader.streamBytes()
        let streamBytes = bytes[g.stream(layer: 0, kvHead: 0, kind: .key)] + bytes[g.stream(layer: 0, kvHead: 0, kind: .value)]
        var rng = SplitMix64(seed: 5)
        let q = (0 ..< g.groupSize * g.headDim).map { _ in Float(rng.nextGaussian()) }
        var out = [Float](repeating: 0, count: q.count)
        let workspace = AttentionWorkspace()
        var times: [Double] = []
        try q.withUnsafeBufferPointer { qp in
            try out.withUnsafeMutableBufferPointer { op in
                for i in 0 ..< repetitions + 1 {
                    let t0 = DispatchTime.now().uptimeNanoseconds
                    try reader.attend(layer: 0, kvHead: 0, queries: qp.baseAddress!, tokens: 0 ..< n, output: op.baseAddress!, workspace: workspace)
                    let t1 = DispatchTime.now().uptimeNanoseconds
                    if i > 0 { times.append(Double(t1 - t0) * 1e-9) }   // the first run warms caches and checks blocks
                }
            }
        }
        let median = times.sorted()[times.count / 2]
        let flops = Double(4 * g.groupSize * g.headDim * n)
        let floor = max(Double(streamBytes) / machine.bandwidth, flops / machine.flops)
        return Result(seconds: median, bytesPerToken: streamBytes / n, gbps: Double(streamBytes) / median / 1e9, floor: floor)
    }

    // MARK: Data and files

    /// [token][kvHead][dim] keys then values of one layer.
    static func generate(geometry g: ModelGeometry, rope: RoPEConfig, tokens n: Int) -> (keys: [Float], values: [Float]) {
        let gen = SyntheticKV(geometry: g, rope: rope, seed: 11)
        let per = g.kvHeadCount * g.headDim
        var k = [Float](repeating: 0, count: n * per), v = k
        k.withUnsafeMutableBufferPointer { kp in
            v.withUnsafeMutableBufferPointer { vp in
                for t in 0 ..< n { gen.token(t, position: t, keys: kp.baseAddress! + t * per, values: vp.baseAddress! + t * per) }
            }
        }
        return (k, v)
    }

    /// Writes the cache in `spec` (planners calibrate on the first 512 tokens); returns seconds.
    static func write(path: String, spec text: String, geometry g: ModelGeometry, rope: RoPEConfig,
                      data: (keys: [Float], values: [Float]), tokens n: Int) throws -> Double {
        let per = g.kvHeadCount * g.headDim
        let calibration = min(n, 512)
        let spec = try SchemeSpec.parse(text, geometry: g) {
            CacheStatistics(geometry: g, tokens: calibration) { (_: Int, head: Int, kind: KVKind) -> [Float] in
                let src = kind == .key ? data.keys : data.values
                var rows: [Float] = []
                rows.reserveCapacity(calibration * g.headDim)
                for t in 0 ..< calibration {
                    let at = t * per + head * g.headDim
                    rows += src[at ..< at + g.headDim]
                }
                return rows
            }
        }
        let plan = SchemePlan(spec: spec)
        let segmentTokens = try spec.segmentTokens(requested: nil, fallback: 64)
        let manifest = Manifest(geometry: g, segmentTokens: segmentTokens, rope: rope,
                                schemes: plan.schemes, layerSchemes: plan.layerSchemes, producer: "\(KVPackVersion.producer) bench")
        var options = WriterOptions()
        options.durability = .flush
        options.overwrite = true
        let start = DispatchTime.now().uptimeNanoseconds
        let writer = try KVPackWriter.create(path: path, manifest: manifest, blobs: plan.blobs, options: options)
        let batch = 1024
        var t = 0
        while t < n {
            let m = min(batch, n - t)
            try writer.append(tokenIDs: [UInt32](repeating: 1, count: m), keys: Array(data.keys[t * per ..< (t + m) * per]),
                              values: Array(data.values[t * per ..< (t + m) * per]),
                              layout: KVBatchLayout(layerStride: per, tokenStride: per, headStride: g.headDim))
            t += m
        }
        try writer.close()
        return Double(DispatchTime.now().uptimeNanoseconds - start) * 1e-9
    }

    // MARK: Machine

    /// Streaming read of a 256 MiB buffer (best of 5) and a multiply-add loop with 8 independent
    /// 8-wide accumulators (best of 5), on one core.
    static func measureMachine() -> (bandwidth: Double, flops: Double) {
        let count = 64 << 20
        let buffer = UnsafeMutablePointer<Float>.allocate(capacity: count)
        defer { buffer.deallocate() }
        buffer.initialize(repeating: 1, count: count)
        var best = Double.infinity
        var sink: Float = 0
        for _ in 0 ..< 5 {
            let t0 = DispatchTime.now().uptimeNanoseconds
            let raw = UnsafeRawPointer(buffer)
            var a0 = SIMD8<Float>(), a1 = a0, a2 = a0, a3 = a0
            var i = 0
            while i < count {
                a0 += raw.load(fromByteOffset: 4 * i, as: SIMD8<Float>.self)
                a1 += raw.load(fromByteOffset: 4 * i + 32, as: SIMD8<Float>.self)
                a2 += raw.load(fromByteOffset: 4 * i + 64, as: SIMD8<Float>.self)
                a3 += raw.load(fromByteOffset: 4 * i + 96, as: SIMD8<Float>.self)
                i += 32
            }
            sink += (a0 + a1 + a2 + a3).sum()
            best = min(best, Double(DispatchTime.now().uptimeNanoseconds - t0) * 1e-9)
        }
        let bandwidth = Double(count * 4) / best
        var bestFlops = Double.infinity
        let iterations = 20_000_000
        for _ in 0 ..< 5 {
            var acc = (0 ..< 8).map { SIMD8<Float>(repeating: Float($0) * 1e-3) }
            let m = SIMD8<Float>(repeating: 0.999_999), c = SIMD8<Float>(repeating: 1e-7)
            let t0 = DispatchTime.now().uptimeNanoseconds
            var a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3], a4 = acc[4], a5 = acc[5], a6 = acc[6], a7 = acc[7]
            for _ in 0 ..< iterations {
                a0 = c.addingProduct(a0, m); a1 = c.addingProduct(a1, m)
                a2 = c.addingProduct(a2, m); a3 = c.addingProduct(a3, m)
                a4 = c.addingProduct(a4, m); a5 = c.addingProduct(a5, m)
                a6 = c.addingProduct(a6, m); a7 = c.addingProduct(a7, m)
            }
            acc = [a0, a1, a2, a3, a4, a5, a6, a7]
            sink += acc.reduce(SIMD8<Float>(), +).sum()
            bestFlops = min(bestFlops, Double(DispatchTime.now().uptimeNanoseconds - t0) * 1e-9)
        }
        if sink == .infinity { print("") }   // keeps the loops from being optimized away
        // Each iteration: 8 independent fused multiply-adds of 8 lanes (2 flops each).
        return (bandwidth, Double(iterations * 8 * 8 * 2) / bestFlops)
    }

    static func cpuName() -> String {
        guard let text = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8),
              let line = text.split(separator: "\n").first(where: { $0.hasPrefix("model name") }) else { return "unknown CPU" }
        return line.split(separator: ":", maxSplits: 1).last.map { $0.trimmingCharacters(in: .whitespaces) } ?? "unknown CPU"
    }

    static func time(_ s: Double) -> String {
        s >= 1e-3 ? String(format: "%.2f ms", s * 1e3) : String(format: "%.1f us", s * 1e6)
    }
}
