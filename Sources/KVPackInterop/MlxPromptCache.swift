import Foundation
import KVPack

/// mlx-lm prompt-cache files (`mlx_lm.models.cache.save_prompt_cache`): one safetensors file
/// with every layer's cache state. Two layouts exist; both are read, the current one is written
/// unless asked otherwise.
///
/// - Current (checked: mlx-lm 0.32.2). `KVCache` layer i: tensors `"{i}.0"` keys and `"{i}.1"`
///   values `[B, H, T', D]`, allocated in steps of 256 tokens (T' >= T, zeros past T), `"{i}.2"`
///   the offset T (an I32 scalar). `QuantizedKVCache`: `"{i}.0.0"` codes (U32 `[B, H, T',
///   D * bits / 32]`, code j of a row at bits `[j*bits, (j+1)*bits)` of the row's words),
///   `"{i}.0.1"` scales and `"{i}.0.2"` biases (`[B, H, T', D / group]`; an element is
///   `scale * code + bias`, and mlx gives about half the groups a negative scale) for keys,
///   `"{i}.1.*"` for values, `"{i}.2"` offset, `"{i}.3"` group size, `"{i}.4"` bits. Metadata:
///   `"0.<key>"` user metadata, `"1.{i}"` class names, `"2.0"` = "" and `"2.{j}.0"`/`"2.{j}.1"`
///   the name and type ("scalar") of each scalar tensor.
/// - Meta states (checked: mlx-lm 0.21.5). Tensors trimmed to T, no scalar tensors; metadata
///   `"0.{i}..."` each layer's meta state (a QuantizedKVCache's: step, offset, group size, bits),
///   `"1.<key>"` user metadata, `"2.{i}"` class names.
///
/// Only `KVCache` and `QuantizedKVCache` layers (the caches of full-attention models) are read;
/// codes of 2, 4 and 8 bits (mlx packs 3, 5 and 6 across words).
public struct MlxPromptCache: ExternalCache {
    public enum Layout: String, Sendable {
        case current
        case metaStates = "meta-states"
    }

    public struct Quantized {
        public var codes: SafetensorsFile.Tensor
        public var scales: SafetensorsFile.Tensor
        public var biases: SafetensorsFile.Tensor
    }

    public enum LayerState {
        case dense(keys: SafetensorsFile.Tensor, values: SafetensorsFile.Tensor)
        case quantized(keys: Quantized, values: Quantized)
    }

    public let file: SafetensorsFile
    public let layout: Layout
    public let layers: [LayerState]
    /// Tokens the cache holds (the offset), and the token rows its tensors allocate.
    public let tokens: Int
    public let allocated: Int
    public let batch: Int
    public let batchIndex: Int
    public let kvHeads: Int
    public let headDim: Int
    /// Quantized caches: group size and bits.
    public let quantization: (groupSize: Int, bits: Int)?
    /// The element type of dense tensors, or of a quantized cache's scales and biases.
    public let dtype: SafetensorsFile.DType
    public let userMetadata: [String: String]

    public static let supportedBits = [2, 4, 8]

    public init(path: String, batchIndex: Int = 0) throws {
        try self.init(file: SafetensorsFile(path: path), batchIndex: batchIndex)
    }

    public init(file: SafetensorsFile, batchIndex: Int = 0) throws {
        let path = file.path, meta = file.metadata
        func fail(_ message: String) -> SafetensorsError { SafetensorsError("\(path): mlx prompt cache: \(message)") }
        func isClass(_ s: String?) -> Bool { s.map { $0.hasSuffix("Cache") } ?? false }
        // Class names: "1.{i}" (current) or "2.{i}" (meta states).
        let layout: Layout
        if isClass(meta["2.0"]) {
            layout = .metaStates
        } else if isClass(meta["1.0"]) {
            layout = .current
        } else {
            throw fail("no cache class names in the metadata (\"1.0\" or \"2.0\"); not a file of save_prompt_cache")
        }
        let classPrefix = layout == .current ? "1." : "2.", userPrefix = layout == .current ? "0." : "1."
        var classes: [String] = []
        while let c = meta[classPrefix + String(classes.count)], classes.count <= Limits.maxLayers { classes.append(c) }
        guard classes.count <= Limits.maxLayers else { throw fail("more than \(Limits.maxLayers) layers") }
        var user: [String: String] = [:]
        for (k, v) in meta where k.hasPrefix(userPrefix) { user[String(k.dropFirst(userPrefix.count))] = v }
        func tensor(_ name: String) throws -> SafetensorsFile.Tensor {
            guard let t = file.tensors[name] else { throw fail("tensor \(name) is missing") }
            return t
        }
        func scalar(_ name: String) throws -> Int {
            let t = try tensor(name)
            guard t.count == 1, [.i32, .i64, .u32, .i16, .i8, .u8].contains(t.dtype) else {
                throw fail("\(name) should be one integer, is \(t.dtype.rawValue) \(t.shape)")
            }
            return file.integers(t)[0]
        }
        func metaState(_ layer: Int, _ j: Int) throws -> Int {
            guard let s = meta["0.\(layer).\(j)"], let v = Int(s) else { throw fail("meta state 0.\(layer).\(j) is missing or not an integer") }
            return v
        }
        var states: [LayerState] = []
        var shape: [Int]?
        var tokens: Int?
        var quantization: (Int, Int)?
        var dtype: SafetensorsFile.DType?
        for (i, c) in classes.enumerated() {
            let state: LayerState, first: SafetensorsFile.Tensor, offset: Int
            switch c {
            case "KVCache":
                let k = try tensor("\(i).0"), v = try tensor("\(i).1")
                guard [.f16, .bf16, .f32].contains(k.dtype), v.dtype == k.dtype, v.shape == k.shape else {
                    throw fail("layer \(i): keys \(k.dtype.rawValue) \(k.shape), values \(v.dtype.rawValue) \(v.shape); F16, BF16 or F32 of one shape expected")
                }
                guard dtype == nil || dtype == k.dtype else { throw fail("layer \(i) is \(k.dtype.rawValue), layer 0 \(dtype!.rawValue)") }
                dtype = k.dtype
                state = .dense(keys: k, values: v)
                first = k
                offset = layout == .current ? try scalar("\(i).2") : (k.shape.count == 4 ? k.shape[2] : -1)
            case "QuantizedKVCache":
                let parts = try (0 ..< 2).map { r in
                    Quantized(codes: try tensor("\(i).\(r).0"), scales: try tensor("\(i).\(r).1"), biases: try tensor("\(i).\(r).2"))
                }
                let group = layout == .current ? try scalar("\(i).3") : try metaState(i, 2)
                let bits = layout == .current ? try scalar("\(i).4") : try metaState(i, 3)
                guard Self.supportedBits.contains(bits) else {
                    throw fail("layer \(i): \(bits)-bit codes; 2, 4 and 8 bits are read (mlx packs 3, 5 and 6 bits across words)")
                }
                guard quantization == nil || quantization! == (group, bits) else {
                    throw fail("layer \(i) has group size \(group) and \(bits) bits, layer 0 \(quantization!.0) and \(quantization!.1)")
                }
                quantization = (group, bits)
                for (r, p) in parts.enumerated() {
                    let s = p.codes.shape
                    guard p.codes.dtype == .u32, s.count == 4, s[3] > 0 else {
                        throw fail("layer \(i).\(r) codes are \(p.codes.dtype.rawValue) \(s); U32 [B, H, T, D*bits/32] expected")
                    }
                    let d = s[3] * 32 / bits
                    guard group > 0, d % group == 0, p.scales.shape == [s[0], s[1], s[2], d / group], p.biases.shape == p.scales.shape,
                          [.f16, .bf16, .f32].contains(p.scales.dtype), p.biases.dtype == p.scales.dtype else {
                        throw fail("layer \(i).\(r): codes \(s), scales \(p.scales.dtype.rawValue) \(p.scales.shape), biases \(p.biases.dtype.rawValue) \(p.biases.shape) do not fit group size \(group)")
                    }
                    guard dtype == nil || dtype == p.scales.dtype else { throw fail("layer \(i) scales are \(p.scales.dtype.rawValue), layer 0's \(dtype!.rawValue)") }
                    dtype = p.scales.dtype
                }
                guard parts[0].codes.shape == parts[1].codes.shape else {
                    throw fail("layer \(i): key codes \(parts[0].codes.shape), value codes \(parts[1].codes.shape)")
                }
                state = .quantized(keys: parts[0], values: parts[1])
                first = parts[0].codes
                offset = layout == .current ? try scalar("\(i).2") : try metaState(i, 1)
            default:
                throw fail("layer \(i) is a \(c); KVCache and QuantizedKVCache layers (full attention) are read")
            }
            // One geometry for every layer: [B, H, T', D] (D from the codes for quantized ones).
            var s = first.shape
            guard s.count == 4 else { throw fail("layer \(i): tensors of shape \(s); [batch, kv_heads, tokens, head_dim] expected") }
            if let (_, bits) = quantization, case .quantized = state { s[3] = s[3] * 32 / bits }
            guard shape == nil || shape! == s else { throw fail("layer \(i) has shape \(s), layer 0 \(shape!)") }
            guard offset >= 0, offset <= s[2], tokens == nil || tokens! == offset else {
                throw fail("layer \(i): offset \(offset) (layer 0: \(tokens.map(String.init) ?? "-")) outside its \(s[2]) allocated tokens")
            }
            shape = s
            tokens = offset
            states.append(state)
        }
        guard let shape, let tokens, let dtype else { throw fail("no layers") }
        guard shape[0] > 0, shape[1] > 0, shape[3] > 0, shape[1] <= Limits.maxKVHeads, shape[3] <= Limits.maxHeadDim else {
            throw fail("shape \(shape): batch, KV heads and head_dim must be positive (at most \(Limits.maxKVHeads) heads, head_dim \(Limits.maxHeadDim))")
        }
        guard batchIndex >= 0, batchIndex < shape[0] else { throw fail("batch index \(batchIndex) outside 0..<\(shape[0])") }
        self.file = file
        self.layout = layout
        self.layers = states
        self.tokens = tokens
        allocated = shape[2]
        batch = shape[0]
        self.batchIndex = batchIndex
        kvHeads = shape[1]
        headDim = shape[3]
        self.quantization = quantization.map { (groupSize: $0.0, bits: $0.1) }
        self.dtype = dtype
        userMetadata = user
    }

    // MARK: ExternalCache

    public var geometryHint: (layers: Int, kvHeads: Int, tokens: Int, headDim: Int) { (layers.count, kvHeads, tokens, headDim) }
    /// mlx prompt caches do not hold token ids.
    public var tokenIDs: [UInt32] { Array(repeating: 0, count: tokens) }
    public var positions: [UInt32]? { nil }

    /// Index of the first element of (kvHead, token) in a [B, H, T', n] tensor.
    func row(_ kvHead: Int, _ token: Int, width: Int) -> Int { ((batchIndex * kvHeads + kvHead) * allocated + token) * width }

    /// Rows as floats: dense ones widened, quantized ones decoded as mlx does (scale * code + bias,
    /// here in f32).
    public func rows(layer: Int, kvHead: Int, kind: KVKind, tokens range: Range<Int>) throws -> [Float] {
        let d = headDim
        switch layers[layer] {
        case let .dense(keys, values):
            return file.floats(kind == .key ? keys : values, from: row(kvHead, range.lowerBound, width: d), count: range.count * d)
        case let .quantized(keys, values):
            let q = kind == .key ? keys : values, (group, bits) = quantization!
            let words = d * bits / 32, groups = d / group, perWord = 32 / bits, mask = UInt32((1 << bits) - 1)
            let codes = UnsafeRawBufferPointer(rebasing: file.file.bytes[q.codes.range])
            let scales = file.floats(q.scales, from: row(kvHead, range.lowerBound, width: groups), count: range.count * groups)
            let biases = file.floats(q.biases, from: row(kvHead, range.lowerBound, width: groups), count: range.count * groups)
            var out = [Float](repeating: 0, count: range.count * d)
            for t in 0 ..< range.count {
                let base = row(kvHead, range.lowerBound + t, width: words) * 4
                for j in 0 ..< d {
                    let word = codes.loadUnaligned(fromByteOffset: base + 4 * (j / perWord), as: UInt32.self).littleEndian
                    let code = Float((word >> UInt32((j % perWord) * bits)) & mask)
                    let g = t * groups + j / group
                    out[t * d + j] = scales[g] * code + biases[g]
                }
            }
            return out
        }
    }

    /// One stream's int-scheme block for tokens `range` (Spec/ scheme 2, per-token groups): the
    /// codes bytes as mlx packs them (little-endian words are the int scheme's LSB-first bytes),
    /// then the scales and the biases as f16. nil when a scale or bias is not exactly an f16.
    func intBlock(layer: Int, kvHead: Int, kind: KVKind, tokens range: Range<Int>) -> [UInt8]? {
        guard case let .quantized(keys, values) = layers[layer], let (group, bits) = quantization else { return nil }
        let q = kind == .key ? keys : values, d = headDim, groups = d / group, rowBytes = d * bits / 8
        let bytes = file.file.bytes
        var out = [UInt8]()
        out.reserveCapacity(range.count * (rowBytes + 4 * groups))
        for t in range {
            let at = q.codes.range.lowerBound + row(kvHead, t, width: d * bits / 32) * 4
            out += bytes[at ..< at + rowBytes]
        }
        for tensor in [q.scales, q.biases] {
            if tensor.dtype == .f16 {
                let at = tensor.range.lowerBound + row(kvHead, range.lowerBound, width: groups) * 2
                out += bytes[at ..< at + 2 * range.count * groups]
                continue
            }
            for x in file.floats(tensor, from: row(kvHead, range.lowerBound, width: groups), count: range.count * groups) {
                let h = Float16(x)
                guard Float(h) == x else { return nil }
                withUnsafeBytes(of: h.bitPattern.littleEndian) { out += $0 }
            }
        }
        return out
    }
}

/// Import and export of mlx-lm prompt caches (`kvpack import/export --format mlx`).
public enum MlxInterop {
    public struct ImportReport: Sendable, Codable {
        public var tokens: Int
        public var layout: String
        public var cacheClass: String
        /// Whether codes were copied as they are (quantized caches into the int scheme).
        public var copiedCodes: Bool
        public var scheme: String
        public var segmentTokens: Int
    }

    /// Writes `cache` into a new .kvpack file. Quantized caches without a `spec`: their codes,
    /// scales and biases are copied into int blocks (per-token groups of the same size and bits,
    /// signed scales, format 2.2); nothing is requantized. So that every token lies in a sealed
    /// block, the segment is the whole cache unless `segmentTokens` says otherwise (tokens past
    /// the last whole segment are decoded into the f16 tail). Dense caches without a spec are
    /// stored raw in their own element type (bit-exact). With a spec, the rows are decoded and
    /// encoded in it.
    public static func importCache(_ cache: MlxPromptCache, to path: String, queryHeads: Int?, rope: RoPEConfig, spec text: String?,
                                   segmentTokens: Int?, options: WriterOptions, producer: String) throws -> ImportReport {
        let g = try geometry(cache, queryHeads: queryHeads)
        let cacheClass = cache.quantization == nil ? "KVCache" : "QuantizedKVCache"
        var metadata: [Manifest.MetadataEntry] = [
            .init("mlx.layout", cache.layout.rawValue),
            .init("mlx.class", cacheClass),
            .init("mlx.dtype", cache.dtype.rawValue),
        ]
        if let q = cache.quantization { metadata += [.init("mlx.group_size", String(q.groupSize)), .init("mlx.bits", String(q.bits))] }
        metadata += cache.userMetadata.sorted { $0.key < $1.key }.map { .init("mlx.meta." + $0.key, $0.value) }
        let copy = text == nil && cache.quantization != nil
        let schemeText: String
        if let text {
            schemeText = text
        } else if let q = cache.quantization {
            schemeText = "int:k\(q.bits)v\(q.bits):g\(q.groupSize):signed"
        } else {
            schemeText = "raw:" + (cache.dtype == .f32 ? "f32" : cache.dtype == .bf16 ? "bf16" : "f16")
        }
        if !copy {
            let n = try CacheInterop.importCache(cache, to: path, queryHeads: g.queryHeadCount, rope: rope, spec: schemeText,
                                                 segmentTokens: segmentTokens, options: options, producer: producer, metadata: metadata)
            return ImportReport(tokens: n, layout: cache.layout.rawValue, cacheClass: cacheClass, copiedCodes: false, scheme: schemeText,
                                segmentTokens: try KVPackReader(path: path).segmentTokens)
        }
        let spec = try SchemeSpec.parse(schemeText, geometry: g)
        let c = segmentTokens ?? min(max(cache.tokens, 1), Limits.maxSegmentTokens)
        var file = NewFile(geometry: g, rope: rope, schemes: spec, producer: producer)
        file.segmentTokens = c
        file.metadata = spec.metadata + metadata
        let writer = try KVPackWriter.create(path: path, file: file, options: options)
        var start = 0
        while start + c <= cache.tokens {
            let range = start ..< start + c
            try writer.appendEncodedSegment(tokenIDs: Array(repeating: 0, count: c)) { stream in
                let id = g.streamID(stream)
                guard let block = cache.intBlock(layer: id.layer, kvHead: id.kvHead, kind: id.kind, tokens: range) else {
                    throw KVPackError.argument("\(cache.file.path): layer \(id.layer) has \(cache.dtype.rawValue) scales or biases that are not exactly f16; give --scheme to re-encode the cache")
                }
                return block
            }
            start += c
        }
        if start < cache.tokens {
            let range = start ..< cache.tokens
            var keys: [Float] = [], values: [Float] = []
            for layer in 0 ..< g.layerCount {
                for head in 0 ..< g.kvHeadCount {
                    keys += try cache.rows(layer: layer, kvHead: head, kind: .key, tokens: range)
                    values += try cache.rows(layer: layer, kvHead: head, kind: .value, tokens: range)
                }
            }
            try writer.append(tokenIDs: Array(repeating: 0, count: range.count), keys: keys, values: values,
                              layout: .layerHeadToken(g, tokens: range.count))
        }
        try writer.close()
        return ImportReport(tokens: cache.tokens, layout: cache.layout.rawValue, cacheClass: cacheClass, copiedCodes: true,
                            scheme: schemeText, segmentTokens: c)
    }

    static func geometry(_ cache: MlxPromptCache, queryHeads: Int?) throws -> ModelGeometry {
        let q = queryHeads ?? cache.kvHeads
        guard q >= cache.kvHeads, q % cache.kvHeads == 0, q <= Limits.maxQueryHeads else {
            throw KVPackError.argument("\(q) query heads is not a multiple of the cache's \(cache.kvHeads) KV heads")
        }
        return ModelGeometry(layerCount: cache.layers.count, queryHeadCount: q, kvHeadCount: cache.kvHeads, headDim: cache.headDim)
    }

    public struct ExportOptions: Sendable {
        /// QuantizedKVCache with these (else KVCache).
        public var quantization: (groupSize: Int, bits: Int)?
        /// KVCache element type.
        public var dtype: ElementType = .float16
        public var layout: MlxPromptCache.Layout = .current
        /// RoPE pair layout of the exported keys (nil: the file's).
        public var ropeLayout: RoPELayout?
        public init() {}

        /// What an imported file recorded (class, dtype, grouping, layout), else f16 KVCache.
        public init(recordedIn m: Manifest) {
            if m.metadata("mlx.class") == "QuantizedKVCache", let g = m.metadata("mlx.group_size").flatMap(Int.init),
               let b = m.metadata("mlx.bits").flatMap(Int.init) {
                quantization = (g, b)
            }
            switch m.metadata("mlx.dtype") {
            case "F32": dtype = .float32
            case "BF16": dtype = .bfloat16
            default: dtype = .float16
            }
            layout = m.metadata("mlx.layout").flatMap(MlxPromptCache.Layout.init(rawValue:)) ?? .current
        }
    }

    public struct ExportReport: Sendable, Codable {
        public var tokens: Int
        public var cacheClass: String
        public var layout: String
        /// Streams whose codes were copied from int blocks (the rest were quantized here).
        public var copiedBlocks: Int
        public var quantizedRuns: Int
    }

    /// Writes `reader`'s cache as an mlx-lm prompt cache (batch 1). QuantizedKVCache: where a
    /// stream's sealed blocks are int codes of the same bits and per-token groups, they are
    /// copied; other rows are quantized here (affine, the int scheme's encoder: scale >= 0, the
    /// group minimum as bias). Tensors are allocated in mlx's steps of 256 tokens, zeros past the
    /// offset, as mlx-lm saves them (current layout); trimmed in the meta-states layout. User
    /// metadata recorded by an import (`mlx.meta.*`) is restored.
    public static func export(_ reader: KVPackReader, to path: String, options o: ExportOptions) throws -> ExportReport {
        let g = reader.geometry, n = reader.tokenCount, d = g.headDim, m = reader.manifest
        let pairing = try CacheInterop.keyPairing(reader, to: o.ropeLayout).1
        let step = 256
        let allocated = o.layout == .current ? max(step, (n + step - 1) / step * step) : n
        var entries: [SafetensorsWriter.Entry] = []
        var producers: [() throws -> [UInt8]] = []
        var metadata: [String: String] = [:]
        var scalars: [(String, String)] = []
        let user = m.userMetadata.filter { $0.key.hasPrefix("mlx.meta.") }.map { (String($0.key.dropFirst("mlx.meta.".count)), $0.value) }
        let userPrefix = o.layout == .current ? "0." : "1.", classPrefix = o.layout == .current ? "1." : "2."
        for (k, v) in user { metadata[userPrefix + k] = v }
        var copied = 0, quantizedRuns = 0
        func scalar(_ name: String, _ value: Int) {
            entries.append(.init(name: name, dtype: .i32, shape: []))
            producers.append { withUnsafeBytes(of: Int32(value).littleEndian) { Array($0) } }
            scalars.append((name, "scalar"))
        }
        for layer in 0 ..< g.layerCount {
            if let (group, bits) = o.quantization {
                guard MlxPromptCache.supportedBits.contains(bits), group > 0, d % group == 0, d * bits % 32 == 0 else {
                    throw KVPackError.argument("mlx QuantizedKVCache: \(bits) bits (2, 4 or 8) in groups of \(group) (dividing head_dim \(d))")
                }
                metadata[classPrefix + String(layer)] = "QuantizedKVCache"
                for kind in KVKind.allCases {
                    let r = kind == .key ? 0 : 1
                    // One pass over the stream makes all three tensors (codes, scales, biases).
                    var parts: [[UInt8]]?
                    let make: () throws -> [[UInt8]] = {
                        if let parts { return parts }
                        let (made, wasCopied, runs) = try quantizedStream(reader, layer: layer, kind: kind, group: group, bits: bits,
                                                                          allocated: allocated, pairing: pairing)
                        copied += wasCopied
                        quantizedRuns += runs
                        parts = made
                        return made
                    }
                    entries.append(.init(name: "\(layer).\(r).0", dtype: .u32, shape: [1, g.kvHeadCount, allocated, d * bits / 32]))
                    producers.append { try make()[0] }
                    entries.append(.init(name: "\(layer).\(r).1", dtype: .f16, shape: [1, g.kvHeadCount, allocated, d / group]))
                    producers.append { try make()[1] }
                    entries.append(.init(name: "\(layer).\(r).2", dtype: .f16, shape: [1, g.kvHeadCount, allocated, d / group]))
                    producers.append { try make()[2] }
                }
                if o.layout == .current {
                    scalar("\(layer).2", n)
                    scalar("\(layer).3", group)
                    scalar("\(layer).4", bits)
                } else {
                    for (j, v) in [step, n, group, bits].enumerated() { metadata["0.\(layer).\(j)"] = String(v) }
                }
            } else {
                metadata[classPrefix + String(layer)] = "KVCache"
                let type = o.dtype
                let dtype: SafetensorsFile.DType = type == .float32 ? .f32 : type == .bfloat16 ? .bf16 : .f16
                for kind in KVKind.allCases {
                    entries.append(.init(name: "\(layer).\(kind == .key ? 0 : 1)", dtype: dtype, shape: [1, g.kvHeadCount, allocated, d]))
                    producers.append {
                        var out: [UInt8] = []
                        for head in 0 ..< g.kvHeadCount {
                            var rows = try reader.decode(layer: layer, kvHead: head, kind: kind)
                            if kind == .key { pairing?.apply(&rows) }
                            rows += [Float](repeating: 0, count: (allocated - n) * d)
                            out += type.encode(rows)
                        }
                        reader.file.releasePages(0 ..< reader.fileSize)
                        return out
                    }
                }
                if o.layout == .current { scalar("\(layer).2", n) } else { metadata["0.\(layer)"] = "" }
            }
        }
        if o.layout == .current {
            metadata["2.0"] = ""
            for (j, s) in scalars.enumerated() {
                metadata["2.\(j + 1).0"] = s.0
                metadata["2.\(j + 1).1"] = s.1
            }
        }
        try SafetensorsWriter.write(path: path, entries: entries, metadata: metadata) { try producers[$0]() }
        return ExportReport(tokens: n, cacheClass: o.quantization == nil ? "KVCache" : "QuantizedKVCache", layout: o.layout.rawValue,
                            copiedBlocks: copied, quantizedRuns: quantizedRuns)
    }

    /// Codes (U32 words), scales and biases (f16) of every KV head of one stream, [H, allocated,
    /// ...], zeros past the last token. Sealed int blocks of the same layout are copied (unless
    /// keys move to another RoPE layout); every other run of rows is quantized with the int
    /// scheme's encoder for a block of those rows.
    static func quantizedStream(_ reader: KVPackReader, layer: Int, kind: KVKind, group: Int, bits: Int, allocated: Int,
                                pairing: RoPEPairing?) throws -> ([[UInt8]], copied: Int, runs: Int) {
        let g = reader.geometry, d = g.headDim, n = reader.tokenCount, c = reader.segmentTokens
        let rowBytes = d * bits / 8, groups = d / group
        var codes = [UInt8](repeating: 0, count: g.kvHeadCount * allocated * rowBytes)
        var scales = [UInt8](repeating: 0, count: g.kvHeadCount * allocated * groups * 2), biases = scales
        var copied = 0, runs = 0
        let target = IntScheme.descriptor(bits: bits, groupSize: group)
        func place(_ block: [UInt8], head: Int, at first: Int, count: Int, blockTokens: Int) {
            let codeBytes = blockTokens * rowBytes, groupBytes = blockTokens * groups * 2
            codes.replaceSubrange((head * allocated + first) * rowBytes ..< (head * allocated + first + count) * rowBytes,
                                  with: block[0 ..< count * rowBytes])
            scales.replaceSubrange((head * allocated + first) * groups * 2 ..< (head * allocated + first + count) * groups * 2,
                                   with: block[codeBytes ..< codeBytes + count * groups * 2])
            biases.replaceSubrange((head * allocated + first) * groups * 2 ..< (head * allocated + first + count) * groups * 2,
                                   with: block[codeBytes + groupBytes ..< codeBytes + groupBytes + count * groups * 2])
        }
        for head in 0 ..< g.kvHeadCount {
            let descriptor = try reader.schemeDescriptor(layer: layer, kvHead: head, kind: kind)
            var p = descriptor.parameters
            if p.count == 8 { p[4] = 0 }
            let sameCodes = descriptor.kind == .int && p == target.parameters && (kind == .value || pairing == nil)
            var t = 0
            if sameCodes {
                while t + c <= reader.sealedTokenCount {
                    place(try reader.blockBytes(layer: layer, kvHead: head, kind: kind, segment: t / c), head: head, at: t, count: c, blockTokens: c)
                    t += c
                    copied += 1
                }
            }
            guard t < n else { continue }
            // The rest: decoded, then encoded as one block of int codes.
            var rows = try reader.decode(layer: layer, kvHead: head, kind: kind, tokens: t ..< n)
            if kind == .key { pairing?.apply(&rows) }
            let context = SchemeContext(geometry: g, segmentTokens: n - t, rope: reader.manifest.rope, role: kind)
            let scheme = try IntScheme(descriptor: target, context: context)
            var block = [UInt8](repeating: 0, count: scheme.encodedBlockSize(tokens: n - t))
            rows.withUnsafeBufferPointer { r in
                block.withUnsafeMutableBytes { scheme.encode(rows: r.baseAddress!, tokens: n - t, into: $0) }
            }
            place(block, head: head, at: t, count: n - t, blockTokens: n - t)
            runs += 1
        }
        reader.file.releasePages(0 ..< reader.fileSize)
        return ([codes, scales, biases], copied, runs)
    }
}
