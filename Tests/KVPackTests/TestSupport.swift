import Foundation
import Testing
@testable import KVPack

/// A fresh directory per test, removed at the end of the process.
func temporaryDirectory(_ name: String = #function) -> String {
    let safe = name.filter { $0.isLetter || $0.isNumber }
    let dir = NSTemporaryDirectory() + "kvpack-tests-\(getpid())/\(safe)-\(UInt32.random(in: 0 ... .max))"
    try! FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    return dir
}

/// Deterministic random K/V for `tokens` tokens, in the writer's layerTokenHead layout.
struct RandomKV {
    let geometry: ModelGeometry
    var keys: [Float]
    var values: [Float]
    let tokens: Int

    /// Keys span magnitudes 2^-4 ... 2^(maxExponent-5) so f16/bf16 rounding is exercised at
    /// many exponents.
    init(geometry: ModelGeometry, tokens: Int, seed: UInt64, maxExponent: UInt64 = 12) {
        self.geometry = geometry
        self.tokens = tokens
        var rng = SplitMix64(seed: seed)
        let n = geometry.layerCount * tokens * geometry.kvHeadCount * geometry.headDim
        keys = (0 ..< n).map { _ in Float(rng.nextGaussian()) * Float(pow(2.0, Double(rng.next() % maxExponent) - 4)) }
        values = (0 ..< n).map { _ in Float(rng.nextGaussian()) }
    }

    /// Row of (layer, token, head) in the layerTokenHead layout.
    func row(_ data: [Float], layer: Int, token: Int, head: Int) -> ArraySlice<Float> {
        let d = geometry.headDim
        let at = ((layer * tokens + token) * geometry.kvHeadCount + head) * d
        return data[at ..< at + d]
    }

    /// Tokens `range` of one stream, concatenated (what the reader's decode returns).
    func stream(layer: Int, head: Int, kind: KVKind, tokens range: Range<Int>) -> [Float] {
        range.flatMap { row(kind == .key ? keys : values, layer: layer, token: $0, head: head) }
    }

    /// Calibration statistics of every token (norms and per-channel moments; no queries).
    var statistics: CacheStatistics {
        CacheStatistics(geometry: geometry, tokens: tokens) { l, h, k in stream(layer: l, head: h, kind: k, tokens: 0 ..< tokens) }
    }

    /// Appends tokens `range` to `writer` (ids `id(t)`, positions default to the writer's).
    func append(to writer: KVPackWriter, _ range: Range<Int>, positions: [UInt32]? = nil,
                id: (Int) -> UInt32 = { UInt32($0) }) throws {
        try writer.append(tokenIDs: range.map(id), positions: positions,
                          keys: batch(keys, from: range.lowerBound, to: range.upperBound),
                          values: batch(values, from: range.lowerBound, to: range.upperBound),
                          layout: .layerTokenHead(geometry, tokens: range.count))
    }

    /// The floats of tokens [from, to) as a contiguous layerTokenHead batch.
    func batch(_ data: [Float], from: Int, to: Int) -> [Float] {
        var out: [Float] = []
        for layer in 0 ..< geometry.layerCount {
            for t in from ..< to {
                for h in 0 ..< geometry.kvHeadCount { out += row(data, layer: layer, token: t, head: h) }
            }
        }
        return out
    }
}

/// bf16 rounding computed independently of the library: pick the nearer of the two
/// neighbouring bf16 values in Double, ties to the even one.
func referenceBFloat16(_ x: Float) -> Float {
    if x.isNaN || x.isInfinite { return x }
    let bits = x.bitPattern
    let down = Float(bitPattern: bits & 0xFFFF_0000)
    let up = Float(bitPattern: (bits & 0xFFFF_0000) &+ 0x1_0000)
    let dd = abs(Double(x) - Double(down)), du = abs(Double(up) - Double(x))
    if dd < du { return down }
    if du < dd { return up }
    return (bits >> 16) & 1 == 0 ? down : up
}

func rounded(_ x: Float, to type: ElementType) -> Float {
    switch type {
    case .float16: Float(Float16(x))
    case .bfloat16: referenceBFloat16(x)
    default: x
    }
}

func makeManifest(_ g: ModelGeometry, segmentTokens: Int, spec: String, rope: RoPEConfig = .init(theta: 10000, layout: .interleaved),
                  calibration: CacheStatistics? = nil) throws -> (Manifest, [Blob]) {
    var file = NewFile(geometry: g, rope: rope, schemes: try SchemeSpec.parse(spec, geometry: g, calibration: calibration), producer: "kvpack tests")
    file.segmentTokens = segmentTokens
    return try file.manifest()
}

func testOptions(salt: UInt64? = nil, major: UInt16 = FileHeader.currentMajor) -> WriterOptions {
    var o = WriterOptions()
    o.durability = .flush
    o.salt = salt
    o.majorVersion = major
    return o
}

/// Writes `data` in uneven batches with commits at the given token counts; token t has id
/// 7t mod 501 and position `position(t)` (the writer's default, t, when nil).
@discardableResult
func writeFile(_ path: String, data: RandomKV, segmentTokens: Int, spec: String, batches: [Int], commitsAfter: Set<Int> = [],
               position: ((Int) -> UInt32)? = nil, options: WriterOptions = testOptions()) throws -> KVPackWriter {
    // A spec that asks a planner (int:k2.5v2:kc8) plans from the data's own statistics.
    let calibration = try ParsedSchemeSpec(spec, geometry: data.geometry).needsCalibration ? data.statistics : nil
    let (m, blobs) = try makeManifest(data.geometry, segmentTokens: segmentTokens, spec: spec, calibration: calibration)
    let w = try KVPackWriter.create(path: path, manifest: m, blobs: blobs, options: options)
    var t = 0
    var i = 0
    while t < data.tokens {
        let n = min(batches[i % batches.count], data.tokens - t)
        i += 1
        try data.append(to: w, t ..< t + n, positions: position.map { (t ..< t + n).map($0) }) { UInt32($0 * 7 % 501) }
        t += n
        if commitsAfter.contains(t) { try w.commit() }
    }
    try w.close()
    return w
}

/// The file every scheme's attention-over-codes test starts from: 150 random tokens in `spec`,
/// segments of 32, written in uneven batches with commits, so it has sealed blocks, an index
/// chain and a tail; checked to validate (deep) without a problem.
func writeSchemeTestFile(_ g: ModelGeometry, spec: String, seed: UInt64) throws -> (reader: KVPackReader, data: RandomKV) {
    let data = RandomKV(geometry: g, tokens: 150, seed: seed, maxExponent: 6)
    let path = temporaryDirectory() + "/scheme.kvpack"
    try writeFile(path, data: data, segmentTokens: 32, spec: spec, batches: [7, 40, 1], commitsAfter: [7, 47, 120])
    let reader = try KVPackReader(path: path)
    #expect(Validator.validate(file: reader.file, path: spec, deep: true).problems.isEmpty, "\(spec)")
    return (reader, data)
}

func fileBytes(_ path: String) -> [UInt8] { Array(FileManager.default.contents(atPath: path)!) }

func writeBytes(_ bytes: [UInt8], to path: String) {
    _ = FileManager.default.createFile(atPath: path, contents: Data(bytes))
}

/// Opens bytes in memory and returns the error code, or nil when they open.
func openError(_ bytes: [UInt8]) -> KVPackError? {
    do {
        _ = try KVPackReader(file: MappedFile(copying: bytes))
        return nil
    } catch let e as KVPackError {
        return e
    } catch {
        Issue.record("non-KVPack error \(error)")
        return nil
    }
}

/// The package root (for Spec/, corpus/ and the built kvpack binary).
let packageRoot: String = {
    var url = URL(fileURLWithPath: #filePath)
    while url.path != "/" {
        url.deleteLastPathComponent()
        if FileManager.default.fileExists(atPath: url.appendingPathComponent("Package.swift").path) { return url.path }
    }
    fatalError("Package.swift not found above \(#filePath)")
}()

/// The `kvpack` executable built next to this test bundle.
let kvpackBinary: String = {
    if let env = ProcessInfo.processInfo.environment["KVPACK_BIN"] { return env }
    var candidates: [String] = []
    if let exe = Bundle.main.executableURL { candidates.append(exe.deletingLastPathComponent().appendingPathComponent("kvpack").path) }
    let argv0 = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
    candidates.append(argv0.appendingPathComponent("kvpack").path)
    candidates.append(argv0.deletingLastPathComponent().appendingPathComponent("kvpack").path)
    for dir in ["debug", "release"] { candidates.append("\(packageRoot)/.build/\(dir)/kvpack") }
    return candidates.first { FileManager.default.isExecutableFile(atPath: $0) } ?? candidates.last!
}()

/// Runs kvpack with arguments; returns (status, stdout, stderr).
@discardableResult
func runKVPack(_ args: [String], environment: [String: String]? = nil) throws -> (Int32, String, String) {
    try runProcess(kvpackBinary, args, environment: environment)
}

/// Runs a program to completion; returns (status, stdout, stderr). `environment` is added to
/// this process's.
func runProcess(_ executable: String, _ args: [String], environment: [String: String]? = nil) throws -> (Int32, String, String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: executable)
    p.arguments = args
    if let environment { p.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    try p.run()
    let o = out.fileHandleForReading.readDataToEndOfFile()
    let e = err.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return (p.terminationStatus, String(decoding: o, as: UTF8.self), String(decoding: e, as: UTF8.self))
}

/// Runs python3 with arguments (a script, or -c and code), failing the test with its stderr;
/// returns stdout. `make pydeps` installs what the scripts import.
@discardableResult
func runPython(_ args: [String]) throws -> String {
    let (status, out, err) = try runProcess("/usr/bin/env", ["python3"] + args)
    try #require(status == 0, "python3 \(args.first ?? "") failed (make pydeps installs numpy, safetensors, gguf): \(err)")
    return out
}

/// Attention over a file's encoded blocks against dense attention over what the reader decodes,
/// for random queries, every (layer, KV head) of a 2-layer, 2-head file, over ranges that start,
/// end and lie inside blocks: what every scheme's kernels must agree on (to 1e-5).
func expectAttentionMatchesDecoded(_ reader: KVPackReader, label: String, seed: UInt64,
                                   ranges: [Range<Int>] = [0 ..< 150, 31 ..< 97, 64 ..< 96, 140 ..< 150, 5 ..< 6]) throws {
    let g = reader.geometry
    var rng = SplitMix64(seed: seed)
    for layer in 0 ..< g.layerCount {
        for head in 0 ..< g.kvHeadCount {
            for range in ranges {
                let q = (0 ..< g.groupSize * g.headDim).map { _ in Float(rng.nextGaussian()) * 2 }
                let got = try reader.attend(layer: layer, kvHead: head, queries: q, tokens: range)
                let want = DenseAttention.reference(queries: q, keys: try reader.decode(layer: layer, kvHead: head, kind: .key, tokens: range),
                                                    values: try reader.decode(layer: layer, kvHead: head, kind: .value, tokens: range),
                                                    groupSize: g.groupSize, headDim: g.headDim)
                let err = DenseAttention.maxRelativeError(got, want)
                #expect(err < 1e-5, "\(label) layer \(layer) head \(head) \(range): \(err)")
            }
        }
    }
}
