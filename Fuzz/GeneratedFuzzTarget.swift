// libFuzzer entry for generated files (structure-aware): every input is a recipe, not a file.
// Built by `make fuzz-generated`:
//   swiftc -sanitize=fuzzer,address -parse-as-library -D KVPACK_FUZZING ...
// Seeds: Fuzz/gen-seeds (one recipe per scheme family, pruned files, notes, both majors).

#if canImport(Glibc)
import Glibc
#endif

@_cdecl("LLVMFuzzerTestOneInput")
public func kvpackGeneratedFuzzOneInput(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let input = UnsafeRawBufferPointer(start: data, count: size)
    if size >= GeneratedFile.headerBytes { GeneratedFile.run(input) }
    return 0
}

/// A recipe (the first byte, `marker` in the seeds, is not read). Its first
/// bytes choose a geometry, a scheme (every kind, with varied parameters), a token count, commit
/// points and a seed; the writer produces that well-formed file (with a token selection when
/// asked), then the rest of the input is a list of (offset, xor) byte edits applied to it. The
/// intact file and the edited one are exercised like any input, so mutations reach the deep
/// decoding code of every scheme instead of stopping at the first checksum or size check.
enum GeneratedFile {
    static let marker: UInt8 = 0xA5
    static let headerBytes = 16
    static let specs = [
        "raw:f32", "raw:f16:zstd", "raw:bf16", "int:k4v2", "int:k1v3:kc8:vc4", "int:k8v2:g8:r4", "int:auto:3.0:kc8",
        "polar:r4a4+v:int:k4v2", "k:polar:r2a3:g4:half+v:polar:r8a8:adjacent", "svdq:2", "k:svdq:8-4-0-2:shared+v:svdq:1.25",
        "nsn:1", "k:nsn:2:seed9+v:nsn:1", "k:int:k4v4:kc8+v:nsn:2",
        // Format 2.3: byte planes, a lossless window, sinks (version 1 recipes fail to write: skipped).
        "raw:f16:planes", "raw:f32:zstd=5:planes+window:3", "int:k4v2:kc8+window:6+sinks:2", "nsn:1+sinks:1",
        // Format 2.4: int with per-channel widths (head_dim 8 and 24 cannot hold these averages: skipped).
        "int:k2.5v2:kc8", "int:k3.25v2.5:kc4:vc8+sinks:1",
    ]
    static let headDims = [8, 16, 24, 32, 64]
    static let path = "/tmp/kvpack-fuzz-generated-\(getpid()).kvpack"

    static func run(_ input: UnsafeRawBufferPointer) {
        let layers = 1 + Int(input[1] % 3), kvHeads = 1 + Int(input[2] % 3), group = 1 + Int(input[3] % 4)
        let headDim = headDims[Int(input[4]) % headDims.count]
        let g = ModelGeometry(layerCount: layers, queryHeadCount: kvHeads * group, kvHeadCount: kvHeads, headDim: headDim)
        let segment = 1 + Int(input[5] % 32)
        let tokens = Int(input[6]) + Int(input[7] % 2) * 256
        let spec = specs[Int(input[8]) % specs.count]
        let commitEvery = Int(input[9] % 16)
        let prune = input[10] & 1 == 1
        let seed = input.loadUnaligned(fromByteOffset: 11, as: UInt32.self)
        let rope = RoPEConfig(theta: 10000, layout: input[15] & 1 == 0 ? .interleaved : .rotateHalf)
        // Bit 1 of byte 10 picks format 1.x instead of 2.x: both index layouts get mutated.
        let major: UInt16 = input[10] & 2 == 0 ? 2 : 1
        // Bit 1 of byte 15: a metadata note at every commit (format 2.1 / 1.5).
        let notes = input[15] & 2 != 0
        guard let bytes = try? write(g, segment: segment, tokens: tokens, spec: spec, commitEvery: commitEvery, rope: rope,
                                     seed: UInt64(seed), prune: prune, major: major, notes: notes) else { return }
        var edited = bytes
        var at = headerBytes
        while at + 5 <= input.count, !edited.isEmpty {
            let offset = Int(input.loadUnaligned(fromByteOffset: at, as: UInt32.self)) % edited.count
            edited[offset] ^= input[at + 4] == 0 ? 1 : input[at + 4]
            at += 5
        }
        // The intact file: the differential check (every scheme's kernels against its decode).
        checkAttentionAgainstDecode(MappedFile(copying: bytes), seed: UInt64(seed))
        for file in [bytes, edited] {
            let mapped = MappedFile(copying: file)
            fuzzingIgnoresChecksums = false
            exercise(mapped)
            fuzzingIgnoresChecksums = true
            exercise(mapped)
        }
        fuzzingIgnoresChecksums = false
    }

    /// The file the recipe describes, written by the real writer (and pruned by the converter).
    static func write(_ g: ModelGeometry, segment: Int, tokens: Int, spec text: String, commitEvery: Int, rope: RoPEConfig,
                      seed: UInt64, prune: Bool, major: UInt16, notes: Bool = false) throws -> [UInt8] {
        let gen = SyntheticKV(geometry: g, rope: rope, seed: seed)
        let per = g.layerCount * g.kvHeadCount * g.headDim
        var keys = [Float](repeating: 0, count: per * tokens), values = keys
        keys.withUnsafeMutableBufferPointer { k in
            values.withUnsafeMutableBufferPointer { v in
                for t in 0 ..< tokens { gen.token(t, position: t, keys: k.baseAddress! + t * per, values: v.baseAddress! + t * per) }
            }
        }
        let spec = try SchemeSpec.parse(text, geometry: g) {
            CacheStatistics(geometry: g, tokens: max(tokens, 1)) { layer, head, kind in
                let src: [Float] = kind == .key ? keys : values
                guard tokens > 0 else { return [Float](repeating: 1, count: g.headDim) }
                var rows: [Float] = []
                for t in 0 ..< tokens {
                    let at: Int = t * per + (layer * g.kvHeadCount + head) * g.headDim
                    rows += src[at ..< at + g.headDim]
                }
                return rows
            }
        }
        var file = NewFile(geometry: g, rope: rope, schemes: spec, producer: "fuzz")
        file.segmentTokens = segment
        var options = WriterOptions()
        options.durability = .flush
        options.overwrite = true
        options.salt = seed | 1
        options.majorVersion = major
        if notes { options.features.insert(.notes) }
        let writer = try KVPackWriter.create(path: path, file: file, options: options)
        for t in 0 ..< tokens {
            let row: Range<Int> = t * per ..< (t + 1) * per
            let k: [Float] = Array(keys[row]), v: [Float] = Array(values[row])
            try writer.append(tokenIDs: [gen.tokenID(t)], keys: k, values: v, layout: .layerTokenHead(g, tokens: 1))
            if commitEvery > 0, t % commitEvery == 0 {
                if notes { try writer.attach(note: MetadataNote(entries: [.init("turn.\(t % 3)", "\(t)"), .init("seed", "\(seed)")])) }
                try writer.commit()
            }
        }
        try writer.close()
        if prune, tokens > 1 {
            var rng = SplitMix64(seed: seed)
            let heads = g.layerCount * g.queryHeadCount
            let observation = AttentionObservation(heads: heads, tokens: tokens, queries: 1,
                                                   weights: (0 ..< heads * tokens).map { _ in Float(rng.nextUniform()) })
            var p = TokenSelection.Parameters()
            p.budget = 1 + tokens / 3
            p.representatives = p.budget / 4
            p.recentWindow = 3
            let selection = KVCrush.select(observation, parameters: p)
            var o = Converter.Options()
            o.durability = .flush
            o.overwrite = true
            o.attentionSamples = 0
            o.salt = seed | 1
            o.formatVersion = major
            _ = try Converter.convert(input: path, output: path + ".pruned", spec: spec, selection: selection, options: o)
            defer { unlink(path + ".pruned") }
            return try contents(path + ".pruned")
        }
        return try contents(path)
    }

    /// A copy of a file's bytes (the mapping must outlive the copy, hence not `MappedFile(...).bytes`).
    static func contents(_ path: String) throws -> [UInt8] {
        let file = try MappedFile(path: path)
        return withExtendedLifetime(file) { Array(file.bytes) }
    }
}
