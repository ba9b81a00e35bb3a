import ArgumentParser
import Foundation
import KVPack
import KVPackLab
import CKVKernels

struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Measure decode-step attention over encoded files against dense baselines and the machine's floors, writer throughput, and resume latency.",
        discussion: """
        One run, side by side:

        1. The machine: single-core streaming read bandwidth (a 256 MiB buffer) and peak f32 multiply-add rate.

        2. For each --tokens count: one layer of --model's geometry (llama-3-8b: 8 KV heads, head_dim 128, GQA group 4) of synthetic RoPE'd keys and values, written in every --scheme (writer throughput, MB/s of f16 input). Then one decode step of attention for every KV head of the layer (all query heads of each GQA group, every token) over each file, mapped and in the page cache. Files are measured round-robin, --repeat rounds, so a slow moment of a shared machine hits all of them; the best round is reported (and the median). Baselines: dense f16 and f32 rows in memory (a heap copy of a raw file) read by the same SIMD kernels. Each scheme's floor is the larger of (bytes of its codes and metadata) / bandwidth and its arithmetic at the machine's peak rates: group x head_dim multiply-adds per token for keys and as many for values, at the f32 rate, or at the integer rate (u8 x s8 products) where the int scheme's integer kernels run (twice for 4-bit codes, which take a second, residual pass); such schemes are also timed with exact f32 arithmetic, in rows marked (exact). With --threads N > 1 the layer is also timed with its KV heads split across N threads, and where N does not divide the heads (smollm2-135m: 3 heads) each head's tokens split too (`attendLayer(splittingTokens:)`: pieces merged by their softmax states).

        3. Resume latency: a 32-layer file of --resume-scheme at each --resume-tokens count, in format 1.x and 2.x: the index bytes opening reads, time to open it and produce the first attention output (layer 0, KV head 0, all tokens), cold (page cache dropped, when this process may) and warm, against a full decode step (every layer and head; the first after opening also verifies every block's checksum) and against reading every byte of the file; and the heap the reader holds (its index arrays, blobs and flags), which is all it holds beyond the file's pages.

        Columns of the attention table: bytes per token and KV head (K+V), attention time per KV head (best round; median in brackets), effective bandwidth, floor, time / floor, dense f16 time / time, writer MB/s. --write FILE replaces the section between the `kvpack bench` markers of FILE (BENCHMARKS.md) with this output. Timing is never a test.

        Profiling one scheme: KVPACK_BENCH_ONLY_SCHEMES=1 leaves the dense baselines out (their ratio columns then read nan), =fast also the (exact) rows, e.g. `KVPACK_BENCH_ONLY_SCHEMES=1 perf record kvpack bench --tokens 32768 --scheme int:k2v2:kc64 --repeat 60 --resume-tokens 0`.
        """)

    @Option(help: "Geometry preset (llama-3-8b, smollm2-135m, stories260k, ...).") var model = "llama-3-8b"
    @Option(name: .customLong("tokens"), help: "Cache lengths; repeat (default 4096, 32768 and 131072).") var tokenCounts: [Int] = []
    @Option(name: .customLong("scheme"), help: "Schemes to measure; repeat (default: one of each).") var schemes: [String] = []
    @Option(name: .customLong("repeat"), help: "Timed rounds per measurement.") var repetitions = 9
    @Option(help: "Also time the layer split across this many threads: its KV heads, and their tokens where the threads do not divide the heads (1: only single-threaded).") var threads = 1
    @Option(name: .customLong("resume-tokens"), help: "Token counts of the 32-layer resume-latency files; repeat (default 4096 and 131072; 0 skips).")
    var resumeTokens: [Int] = []
    @Option(name: .customLong("resume-scheme"), help: "Scheme of the resume-latency files.") var resumeScheme = "int:k4v2:kc64"
    @Option(help: "Replace the `kvpack bench` section of this Markdown file with the results.") var write: String?
    @Option(name: .customLong("segment-tokens"), help: "Tokens per sealed block (segment) of the files written.") var segmentTokens = 64
    @Option(help: "Keep the files in this directory (default: a temporary one, removed).") var keep: String?
    /// Tests: nominal floors instead of two seconds of measuring (ratios are then meaningless).
    @Flag(help: .hidden) var skipMachineMeasurement = false

    static let defaultSchemes = ["raw:f16", "raw:bf16", "raw:f16:zstd:planes", "int:k8v8:kc64", "int:k4v4:kc64", "int:k4v2:kc64", "int:k2v2:kc64",
                                 "polar:r4a4+v:raw:f16", "svdq:2:shared+v:raw:f16", "nsn:2", "nsn:1"]

    /// Everything printed, for --write.
    final class Report {
        var lines: [String] = []
        func say(_ s: String = "") {
            print(s)
            fflush(nil)   // every stream: progress shows when piped to tee
            lines.append(s)
        }
    }

    func run() throws {
        guard let preset = ModelPreset.named(model) else { throw CLIError("unknown model preset \(model)") }
        guard repetitions >= 1, threads >= 1 else { throw CLIError("--repeat and --threads must be at least 1") }
        var g = preset.geometry
        g.layerCount = 1
        let counts = tokenCounts.isEmpty ? [4096, 32768, 131_072] : tokenCounts
        let specs = schemes.isEmpty ? Self.defaultSchemes : schemes
        let resumeCounts = resumeTokens.isEmpty ? [4096, 131_072] : resumeTokens.filter { $0 > 0 }
        let report = Report()
        let measured = skipMachineMeasurement ? (bandwidth: 1e10, flops: 1e11, products: 4e11, probes: "nominal, not measured") : Self.measureMachine()
        let machine = Machine(bandwidth: measured.bandwidth, flops: measured.flops, products: measured.products)
        report.say(String(format: "machine: %@, %d cores, single-core read bandwidth %.2f GB/s (%@), peak multiply-add %.1f GFLOP/s (f32, one core)",
                          Self.cpuName(), ProcessInfo.processInfo.activeProcessorCount, machine.bandwidth / 1e9, measured.probes, machine.flops / 1e9))
        report.say("geometry: one layer of \(preset.name): \(g.kvHeadCount) KV heads, head_dim \(g.headDim), GQA group \(g.groupSize); a decode step attends every KV head over every token; times are per KV head")
        try withWorkDirectory(keep: keep, prefix: "kvpack-bench") { dir in
            for n in counts {
                try attentionTable(dir: dir, preset: preset, geometry: g, tokens: n, specs: specs, machine: machine, report: report)
            }
            if !resumeCounts.isEmpty {
                try resumeTable(dir: dir, preset: preset, tokens: resumeCounts, report: report)
            }
        }
        if let write { try Self.replaceSection(of: write, with: report.lines, command: CommandLine.arguments) }
    }

    // MARK: Attention

    /// What the floors are computed from: read bandwidth, f32 multiply-add rate (flops), and the
    /// rate of u8 x s8 products summed into 32-bit lanes (integer kernels).
    struct Machine {
        var bandwidth: Double
        var flops: Double
        var products: Double
    }

    final class Entry {
        let label: String
        /// Per token and query head: multiply-adds in f32, and byte products in integer kernels
        /// (keys and values; two-level ones count twice). Dense rows: 2 f32 multiply-adds per
        /// channel (key and value).
        var floatMACs = 2.0, integerProducts = 0.0
        /// One decode step over every KV head of the layer: (queries, output, workspaces).
        let attend: (UnsafePointer<Float>, UnsafeMutablePointer<Float>, [AttentionWorkspace]) throws -> Void
        let threadable: Bool
        let bytesPerToken: Int
        let streamBytes: Int
        let writerMBps: Double?
        var times: [Double] = []
        var threadedTimes: [Double] = []
        init(label: String, reader: KVPackReader, streamBytes: Int, tokens: Int, writerMBps: Double?) {
            self.label = label
            // Tokens split too where the threads do not divide the KV heads (smollm2-135m: 3 heads).
            attend = { q, o, w in try reader.attendLayer(0, queries: q, output: o, workspaces: w, splittingTokens: true) }
            threadable = true
            self.streamBytes = streamBytes
            self.bytesPerToken = streamBytes / (tokens * reader.geometry.kvHeadCount)
            self.writerMBps = writerMBps
            // Which halves of attention run on integer kernels (layer 0 is the one timed).
            if reader.arithmetic == .fast {
                for kind in KVKind.allCases {
                    guard let int = reader.scheme(layer: 0, kind: kind) as? IntScheme,
                          kind == .key ? int.fastScores : int.fastAccumulate else { continue }
                    floatMACs -= 1
                    integerProducts += int.bits >= 4 ? 2 : 1
                }
            }
        }

        /// The C dense f16 baseline (`kvk_dense_f16_attention`): rows [kvHead][token][dim] in memory,
        /// one KV head after another; single-threaded only.
        init(cBaselineOver rows: F16Rows, geometry g: ModelGeometry) {
            label = "dense f16 (C, memory)"
            let per = g.groupSize * g.headDim, scale = 1 / Float(g.headDim).squareRoot()
            attend = { q, o, _ in
                for h in 0 ..< g.kvHeadCount {
                    let status = kvk_dense_f16_attention(q + h * per, Int32(g.groupSize), Int32(g.headDim), rows.keys + h * rows.headStride,
                                                         rows.values + h * rows.headStride, rows.tokens, scale, o + h * per)
                    guard status == 0 else { throw CLIError("the C baseline does not take group \(g.groupSize), head_dim \(g.headDim)") }
                }
            }
            threadable = false
            streamBytes = 2 * 2 * rows.tokens * g.headDim * g.kvHeadCount
            bytesPerToken = 2 * 2 * g.headDim
            writerMBps = nil
        }
    }

    /// Keys and values of one layer as IEEE half floats, [kvHead][token][dim], for the C baseline.
    final class F16Rows: @unchecked Sendable {
        // @unchecked: written once in init, read-only after.
        let keys: UnsafeMutablePointer<UInt16>, values: UnsafeMutablePointer<UInt16>
        let tokens: Int, headStride: Int

        /// `data` is [token][kvHead][dim] (as `generate` makes it).
        init(_ data: (keys: [Float], values: [Float]), geometry g: ModelGeometry, tokens n: Int) {
            tokens = n
            headStride = n * g.headDim
            let count = g.kvHeadCount * headStride
            keys = .allocate(capacity: count)
            values = .allocate(capacity: count)
            for h in 0 ..< g.kvHeadCount {
                for t in 0 ..< n {
                    for i in 0 ..< g.headDim {
                        let from = (t * g.kvHeadCount + h) * g.headDim + i, to = h * headStride + t * g.headDim + i
                        keys[to] = Float16(data.keys[from]).bitPattern
                        values[to] = Float16(data.values[from]).bitPattern
                    }
                }
            }
        }

        deinit {
            keys.deallocate()
            values.deallocate()
        }
    }

    func attentionTable(dir: String, preset: ModelPreset, geometry g: ModelGeometry, tokens n: Int, specs: [String],
                        machine: Machine, report: Report) throws {
        let data = Self.generate(geometry: g, rope: preset.rope, tokens: n)
        var entries: [Entry] = []
        // KVPACK_BENCH_ONLY_SCHEMES=1 leaves the baselines out (for profiling one scheme); =fast
        // also the (exact) rows, so a profile holds only the fast path.
        let onlySchemes = ProcessInfo.processInfo.environment["KVPACK_BENCH_ONLY_SCHEMES"]
        let baselines = onlySchemes == nil
            ? [("dense f16 (memory)", "raw:f16"), ("dense f32 (memory)", "raw:f32")] : []
        for (label, spec) in baselines {
            let path = "\(dir)/dense-\(n).kvpack"
            _ = try Self.write(path: path, spec: spec, geometry: g, rope: preset.rope, data: data, tokens: n, segmentTokens: segmentTokens)
            let mapped = try MappedFile(path: path)
            let file = withExtendedLifetime(mapped) { MappedFile(copying: mapped.bytes) }
            let reader = try KVPackReader(file: file, path: path)
            entries.append(Entry(label: label, reader: reader, streamBytes: try reader.streamBytes().reduce(0, +), tokens: n, writerMBps: nil))
            try? FileManager.default.removeItem(atPath: path)
        }
        // The C baseline: the same rows, the same queries, a kernel written with the same care in C.
        let cRows = baselines.isEmpty ? nil : F16Rows(data, geometry: g, tokens: n)
        if let cRows { entries.append(Entry(cBaselineOver: cRows, geometry: g)) }
        let inputMB = Double(n * g.kvHeadCount * g.headDim * 2 * 2) / 1e6
        for spec in specs {
            printError("bench: writing \(spec), \(n) tokens")
            let path = "\(dir)/bench-\(n)-\(spec.map { $0.isLetter || $0.isNumber ? $0 : "_" }.map(String.init).joined()).kvpack"
            let seconds = try Self.write(path: path, spec: spec, geometry: g, rope: preset.rope, data: data, tokens: n, segmentTokens: segmentTokens)
            let reader = try KVPackReader(path: path)
            let entry = Entry(label: spec, reader: reader, streamBytes: try reader.streamBytes().reduce(0, +), tokens: n,
                              writerMBps: inputMB / seconds)
            entries.append(entry)
            // Where integer kernels run, the same file with exact (f32) arithmetic beside it.
            if entry.integerProducts > 0, onlySchemes != "fast" {
                let exact = try KVPackReader(path: path, arithmetic: .exact)
                entries.append(Entry(label: spec + " (exact)", reader: exact, streamBytes: entry.streamBytes, tokens: n, writerMBps: nil))
            }
            // Unlinked now, mapped until the reader goes: the space returns when the table is done.
            try? FileManager.default.removeItem(atPath: path)
        }
        // One set of queries for every file: kvHeads x group x headDim.
        var rng = SplitMix64(seed: 5)
        let q = (0 ..< g.kvHeadCount * g.groupSize * g.headDim).map { _ in Float(rng.nextGaussian()) }
        var out = [Float](repeating: 0, count: q.count)
        printError("bench: timing \(entries.count) files x \(repetitions) rounds at \(n) tokens")
        let single = [AttentionWorkspace()]
        let pool = (0 ..< threads).map { _ in AttentionWorkspace() }
        try q.withUnsafeBufferPointer { qp in
            try out.withUnsafeMutableBufferPointer { op in
                // A first pass checks every block's checksum and warms the caches.
                for e in entries { try e.attend(qp.baseAddress!, op.baseAddress!, single) }
                for _ in 0 ..< repetitions {
                    for e in entries {
                        e.times.append(try Self.seconds { try e.attend(qp.baseAddress!, op.baseAddress!, single) } / Double(g.kvHeadCount))
                        if threads > 1, e.threadable {
                            e.threadedTimes.append(try Self.seconds { try e.attend(qp.baseAddress!, op.baseAddress!, pool) } / Double(g.kvHeadCount))
                        }
                    }
                }
            }
        }
        // Multiply-adds per KV head and decode step: group x head_dim per token, for keys and values.
        let perHalf = Double(g.groupSize * g.headDim * n)
        // The yardstick: the faster of the two dense f16 kernels (Swift, C).
        let dense = baselines.isEmpty ? Double.nan : entries.filter { $0.label.hasPrefix("dense f16") }.map { $0.times.min()! }.min()!
        var header = ["scheme", "tokens", "B/token/head", "attention (median)", "GB/s", "floor", "x floor", "vs f16"]
        if threads > 1 { header.append("\(threads) threads") }
        header.append("writer MB/s")
        var rows = [header]
        for e in entries {
            let best = e.times.min()!, median = e.times.sorted()[e.times.count / 2]
            let perHeadBytes = Double(e.streamBytes) / Double(g.kvHeadCount)
            let compute = perHalf * (2 * e.floatMACs / machine.flops + e.integerProducts / machine.products)
            let floor = max(perHeadBytes / machine.bandwidth, compute)
            var row = [e.label, "\(n)", "\(e.bytesPerToken)", "\(Self.time(best)) (\(Self.time(median)))",
                       String(format: "%.2f", perHeadBytes / best / 1e9), Self.time(floor),
                       String(format: "%.2f", best / floor), String(format: "%.2f", dense / best)]
            if threads > 1 { row.append(e.threadedTimes.isEmpty ? "-" : String(format: "%.2fx", best / e.threadedTimes.min()!)) }
            row.append(e.writerMBps.map { String(format: "%.0f", $0) } ?? "-")
            rows.append(row)
        }
        report.say("")
        report.say(formatTable(rows))
    }

    // MARK: Resume latency

    func resumeTable(dir: String, preset: ModelPreset, tokens counts: [Int], report: Report) throws {
        var g = preset.geometry
        g.layerCount = 32
        let canDrop = FileManager.default.isWritableFile(atPath: "/proc/sys/vm/drop_caches")
        var rows = [["tokens", "format", "file", "index read at open", "open cold", "open+1st attn cold", "open warm", "1st attn warm",
                     "1st decode step", "next decode step", "read whole file", "reader heap", "page cache mapped"]]
        for n in counts {
            var one = g
            one.layerCount = 1
            let data = Self.generate(geometry: one, rope: preset.rope, tokens: n)
            // Version 1 (whole index verified at open) beside version 2 (segment tables on first use).
            for major in FileHeader.supportedMajors {
                let path = "\(dir)/resume-\(n)-v\(major).kvpack"
                printError("bench: writing a \(g.layerCount)-layer \(resumeScheme) file of \(n) tokens, format \(major)")
                // Every layer gets the same rows: encoding cost and file size are those of real layers.
                _ = try Self.write(path: path, spec: resumeScheme, geometry: g, rope: preset.rope, data: data, tokens: n, layerStride: 0,
                                   segmentTokens: segmentTokens, formatVersion: major)
                rows.append(["\(n)", "\(major).x"] + (try resumeRow(path: path, geometry: g, canDrop: canDrop)))
                try? FileManager.default.removeItem(atPath: path)
            }
        }
        report.say("")
        report.say("resume latency: \(g.layerCount) layers of \(preset.name), \(resumeScheme); cold = page cache dropped first" + (canDrop ? "" : " (not permitted here: '-')"))
        report.say("")
        report.say(formatTable(rows))
    }

    /// One file's resume-latency cells, from "file" on.
    func resumeRow(path: String, geometry g: ModelGeometry, canDrop: Bool) throws -> [String] {
        let size = (try FileManager.default.attributesOfItem(atPath: path)[.size] as? Int) ?? 0
        var rng = SplitMix64(seed: 9)
        let q = (0 ..< g.kvHeadCount * g.groupSize * g.headDim).map { _ in Float(rng.nextGaussian()) }
        var out = [Float](repeating: 0, count: q.count)
        let workspace = AttentionWorkspace()
        var cold: (open: Double, first: Double)?
        var warmOpen = Double.infinity, warmFirst = Double.infinity, firstStep = Double.infinity, step = Double.infinity
        var readAll = Double.infinity
        var heap = 0, mapped = 0, index = 0
        try q.withUnsafeBufferPointer { qp in
            try out.withUnsafeMutableBufferPointer { op in
                func openAndAttend() throws -> (Double, Double, KVPackReader) {
                    let t0 = DispatchTime.now().uptimeNanoseconds
                    let reader = try KVPackReader(path: path)
                    let t1 = DispatchTime.now().uptimeNanoseconds
                    try reader.attend(layer: 0, kvHead: 0, queries: qp.baseAddress!, output: op.baseAddress!, workspace: workspace)
                    let t2 = DispatchTime.now().uptimeNanoseconds
                    return (Double(t1 - t0) * 1e-9, Double(t2 - t0) * 1e-9, reader)
                }
                if canDrop, Self.dropPageCache() {
                    let (o, f, _) = try openAndAttend()
                    cold = (o, f)
                }
                for _ in 0 ..< max(3, repetitions / 3) {
                    let (o, f, reader) = try openAndAttend()
                    warmOpen = min(warmOpen, o)
                    warmFirst = min(warmFirst, f - o)
                    let workspaces = [workspace]
                    func decodeStep() throws -> Double {
                        try Self.seconds {
                            for layer in 0 ..< g.layerCount {
                                try reader.attendLayer(layer, queries: qp.baseAddress!, output: op.baseAddress!, workspaces: workspaces)
                            }
                        }
                    }
                    // The first step after opening also verifies every block's checksum.
                    firstStep = min(firstStep, try decodeStep())
                    step = min(step, try decodeStep())
                    heap = reader.heapBytes
                    index = reader.indexBytes
                    mapped = max(mapped, Self.memoryStatus("RssFile"))
                    readAll = min(readAll, try Self.seconds { try Self.readEveryByte(path) })
                }
            }
        }
        return [Self.bytes(size), Self.bytes(index), cold.map { Self.time($0.open) } ?? "-", cold.map { Self.time($0.first) } ?? "-",
                Self.time(warmOpen), Self.time(warmFirst), Self.time(firstStep), Self.time(step), Self.time(readAll), Self.bytes(heap), Self.bytes(mapped)]
    }

    /// Sums every 8-byte word of a mapped file: the cost of reading it all (it is in the page
    /// cache after the first pass).
    static func readEveryByte(_ path: String) throws {
        let file = try MappedFile(path: path)
        let bytes = file.bytes
        let base = bytes.baseAddress!
        var acc = SIMD4<UInt64>()
        var i = 0
        while i + 32 <= bytes.count {
            acc &+= base.loadUnaligned(fromByteOffset: i, as: SIMD4<UInt64>.self)
            i += 32
        }
        if acc == SIMD4(repeating: 0x1234_5678) { print("") }   // keeps the loop
    }

    static func dropPageCache() -> Bool {
        sync()
        return FileManager.default.createFile(atPath: "/proc/sys/vm/drop_caches", contents: Data("3\n".utf8))
            || (try? "3\n".write(toFile: "/proc/sys/vm/drop_caches", atomically: false, encoding: .utf8)) != nil
    }

    /// A field of /proc/self/status in bytes (0 where unavailable).
    static func memoryStatus(_ field: String) -> Int {
        guard let text = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8),
              let line = text.split(separator: "\n").first(where: { $0.hasPrefix(field + ":") }),
              let kb = line.split(separator: " ").compactMap({ Int($0) }).first else { return 0 }
        return kb * 1024
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

    /// Writes the cache in `spec` (planners calibrate on the first 512 tokens); every layer reads
    /// `data` at `layerStride` (0: the same rows). Returns seconds.
    static func write(path: String, spec text: String, geometry g: ModelGeometry, rope: RoPEConfig,
                      data: (keys: [Float], values: [Float]), tokens n: Int, layerStride: Int = 0, segmentTokens requested: Int,
                      formatVersion: UInt16 = FileHeader.currentMajor) throws -> Double {
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
        var file = NewFile(geometry: g, rope: rope, schemes: spec, producer: "\(KVPackVersion.producer) bench")
        file.defaultSegmentTokens = requested   // the spec's residual window wins
        var options = WriterOptions()
        options.durability = .flush
        options.overwrite = true
        options.majorVersion = formatVersion
        let start = DispatchTime.now().uptimeNanoseconds
        let writer = try KVPackWriter.create(path: path, file: file, options: options)
        let batch = 1024
        var t = 0
        try data.keys.withUnsafeBufferPointer { kp in
            try data.values.withUnsafeBufferPointer { vp in
                while t < n {
                    let m = min(batch, n - t)
                    try writer.append(tokenIDs: [UInt32](repeating: 1, count: m),
                                      keys: UnsafeBufferPointer(rebasing: kp[t * per ..< (t + m) * per]),
                                      values: UnsafeBufferPointer(rebasing: vp[t * per ..< (t + m) * per]),
                                      layout: KVBatchLayout(layerStride: layerStride, tokenStride: per, headStride: g.headDim))
                    t += m
                }
            }
        }
        try writer.close()
        return Double(DispatchTime.now().uptimeNanoseconds - start) * 1e-9
    }

    // MARK: Machine

    /// Streaming read of a 256 MiB buffer (best of 5) by a Swift loop and by the C probe
    /// (`kvk_stream_read`: eight 32-byte loads per iteration; the bandwidth is the faster of the
    /// two, so no floor is too high because a probe was slow), and a multiply-add loop with 8
    /// independent 8-wide accumulators (best of 5), on one core.
    static func measureMachine() -> (bandwidth: Double, flops: Double, products: Double, probes: String) {
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
        let swiftBandwidth = Double(count * 4) / best
        let bestC = (0 ..< 5).map { _ in Self.seconds { sink += kvk_stream_read(buffer, count * 4) } }.min()!
        let cBandwidth = Double(count * 4) / bestC
        let bandwidth = max(swiftBandwidth, cBandwidth)
        let probes = String(format: "C probe %.2f GB/s with %@, Swift probe %.2f GB/s", cBandwidth / 1e9, String(cString: kvk_isa_name()),
                            swiftBandwidth / 1e9)
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
        // Integer multiply-adds (u8 x s8 into 32-bit lanes): the compute floor of kernels that
        // score codes with integer dot products.
        var products: UInt64 = 0, intSink: Int32 = 0
        let bestInt = (0 ..< 5).map { _ -> Double in
            let seconds = Self.seconds { products = kvk_int8_madd_probe(20_000_000, &intSink) }
            return Double(products) / seconds
        }.max()!
        let intProbe = String(format: "; integer multiply-add %.0f G/s (u8 x s8, %@)", bestInt / 1e9, String(cString: kvk_int8_isa_name()))
        return (bandwidth, Double(iterations * 8 * 8 * 2) / bestFlops, bestInt, probes + intProbe)
    }

    static func cpuName() -> String {
        guard let text = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8),
              let line = text.split(separator: "\n").first(where: { $0.hasPrefix("model name") }) else { return "unknown CPU" }
        return line.split(separator: ":", maxSplits: 1).last.map { $0.trimmingCharacters(in: .whitespaces) } ?? "unknown CPU"
    }

    static func seconds(_ body: () throws -> Void) rethrows -> Double {
        let t0 = DispatchTime.now().uptimeNanoseconds
        try body()
        return Double(DispatchTime.now().uptimeNanoseconds - t0) * 1e-9
    }

    static func time(_ s: Double) -> String {
        s >= 1 ? String(format: "%.2f s", s) : s >= 1e-3 ? String(format: "%.2f ms", s * 1e3) : String(format: "%.1f us", s * 1e6)
    }

    static func bytes(_ n: Int) -> String {
        n >= 1 << 30 ? String(format: "%.2f GiB", Double(n) / 1_073_741_824)
            : n >= 1 << 20 ? String(format: "%.1f MiB", Double(n) / 1_048_576) : String(format: "%.0f KiB", Double(n) / 1024)
    }

    // MARK: Report

    static let beginMarker = "<!-- kvpack bench: begin (generated by `kvpack bench --write`; edits inside are replaced) -->"
    static let endMarker = "<!-- kvpack bench: end -->"

    /// Replaces the text between the markers (appending both when absent) with the command line,
    /// the date and the output in a code block.
    static func replaceSection(of path: String, with lines: [String], command: [String], markers: (begin: String, end: String) = (beginMarker, endMarker)) throws {
        let (beginMarker, endMarker) = markers
        let existing = (try? String(contentsOfFile: path, encoding: .utf8)) ?? ""
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withFullDate]
        let args = command.dropFirst().map { $0.contains(" ") ? "'\($0)'" : $0 }.joined(separator: " ")
        let body = [beginMarker, "", "    kvpack \(args)", "", "Run on \(formatter.string(from: Date())).", "", "```"] + lines + ["```", endMarker]
        var text: String
        if let b = existing.range(of: beginMarker), let e = existing.range(of: endMarker), b.upperBound <= e.lowerBound {
            text = existing.replacingCharacters(in: b.lowerBound ..< e.upperBound, with: body.joined(separator: "\n"))
        } else {
            text = existing + (existing.hasSuffix("\n") || existing.isEmpty ? "" : "\n") + "\n" + body.joined(separator: "\n") + "\n"
        }
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        print("wrote the results into \(path)")
    }
}
