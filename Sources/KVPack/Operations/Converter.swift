/// Rewrites a file in other schemes: `kvpack convert`.
///
/// Streaming: one output segment of every stream is decoded at a time and appended to a writer,
/// and the source pages already read are released, so memory stays bounded by a few segments
/// whatever the file size. The output is written under a temporary name and renamed when
/// complete. Written against `KVScheme` only: a new scheme converts without changes here.
public enum Converter {
    public struct Options: Sendable {
        /// Tokens per sealed block of the output (default: the spec's residual window, else the source's).
        public var segmentTokens: Int?
        public var overwrite = false
        public var durability: WriterOptions.Durability = .fsync
        /// Attention samples for the error report: (layer, KV head, random query) triples.
        public var attentionSamples = 64
        public var seed: UInt64 = 1
        /// Called with (tokens done, tokens in all) as the conversion streams.
        public var progress: (@Sendable (Int, Int) -> Void)?
        public var tool = "kvpack"
        /// The output's salt (random unless set; set it for reproducible bytes).
        public var salt: UInt64?
        /// Major format version of the output (2 by default; 1 for readers older than 2.0).
        public var formatVersion: UInt16 = FileHeader.currentMajor
        /// Renumbers the output's tokens 0, 1, 2, ... (a context shift, after a selection drops
        /// tokens): each key is rotated by its position change (`RoPEShift`), so attention over
        /// the output is attention over the kept tokens as if they had been encoded at their new
        /// positions. Needs keys stored after a known rotary embedding.
        public var repositioned = false
        /// User metadata added to the output's manifest (after the conversion record).
        public var metadata: [Manifest.MetadataEntry] = []
        /// Frames the output may hold later (a chat's `.notes`); the header records the version.
        public var features: FileFeatures = []
        /// The RoPE pair layout of the output's keys (nil: the source's). Keys are permuted per
        /// head when it differs (`RoPEPairing`); the manifest records the new layout.
        public var ropeLayout: RoPELayout?

        public init() {}
    }

    public struct Bits: Sendable, Codable {
        public var key: Double
        public var value: Double
        /// The whole file per cached K/V element.
        public var total: Double
    }

    public struct Report: Sendable, Codable {
        public var input: String
        public var output: String
        public var tokens: Int
        public var inputSchemes: [String]
        public var outputSchemes: [String]
        public var before: Bits
        public var after: Bits
        /// ||decoded(out) - decoded(in)|| / ||decoded(in)|| over every key (value) of the file.
        public var keyRelativeError: Double
        public var valueRelativeError: Double
        /// The same for attention outputs of `attentionSamples` random queries over all tokens.
        public var attentionRelativeError: Double
        public var attentionSamples: Int
        public var plan: [String]?
    }

    /// Converts `input` to `output`: `spec` for the layers in `layers` (all when nil); other
    /// layers keep the source's schemes (re-encoded). With a `selection` (`kvpack prune`), the
    /// output holds only the selected tokens of the source's first `selection.sourceTokenCount`,
    /// at their original positions, and records the selection (a `tsel` frame, format 1.4).
    /// `source`, when given, is `input` already open (a remote object's reader, say).
    public static func convert(input: String, source opened: KVPackReader? = nil, output: String, spec: SchemeSpec, layers: Set<Int>? = nil,
                               selection: TokenSelection? = nil, options: Options = Options()) throws -> Report {
        let replacement = try AtomicReplacement(destination: output, overwrite: options.overwrite, label: "converting")
        let source = try opened ?? KVPackReader(path: input)
        let m = source.manifest, g = m.geometry
        if let selection, selection.sourceTokenCount > source.tokenCount {
            throw KVPackError.argument("the selection chooses from \(selection.sourceTokenCount) tokens; \(input) has \(source.tokenCount)")
        }
        let tokens = selection?.kept ?? Array(0 ..< source.tokenCount)
        let (ids, positions) = try source.tokens(0 ..< source.tokenCount)
        let rewrite = try KeyRewrite(source: source, positions: options.repositioned ? positions : nil, tokens: tokens,
                                    layout: options.ropeLayout)
        if let layers, let bad = layers.first(where: { !(0 ..< g.layerCount).contains($0) }) {
            throw KVPackError.argument("layer \(bad) is outside the file's 0..<\(g.layerCount)")
        }
        guard spec.layers.count == g.layerCount else {
            throw KVPackError.argument("the scheme spec was built for \(spec.layers.count) layers, the file has \(g.layerCount)")
        }
        // Target setups: the spec's where asked, the source's own descriptors (and blobs) elsewhere.
        var setups: [(key: SchemeSetup, value: SchemeSetup)] = []
        for l in 0 ..< g.layerCount {
            if layers?.contains(l) ?? true {
                setups.append((spec.layers[l].key, spec.layers[l].value))
            } else {
                func own(_ kind: KVKind) -> SchemeSetup {
                    var d = m.schemes[m.schemeIndex(layer: l, kind: kind)]
                    let blobs = d.blobIDs.compactMap { id in source.blobs.first { $0.id == id } }
                    d.blobIDs = []
                    return SchemeSetup(descriptor: d, blobs: blobs)
                }
                setups.append((own(.key), own(.value)))
            }
        }
        let layerSetups = setups.map { LayerSetup(key: $0.key, value: $0.value) }
        var rope = m.rope
        if let layout = options.ropeLayout, layout != rope.layout {
            rope.layout = layout
            // A kept scheme with blobs fitted to the source's channel order (svdq's projections,
            // per-channel means) would encode the permuted keys against the wrong channels.
            // Universal codebooks and random signs do not depend on the order.
            for l in 0 ..< g.layerCount where !(layers?.contains(l) ?? true)
                && setups[l].key.blobs.contains(where: { $0.kind == .projection || $0.kind == .means }) {
                throw KVPackError.argument("layer \(l) keeps its key scheme, whose blobs were fitted to the source's \(m.rope.layout) channel order; moving keys to \(layout) pairs needs that layer re-planned (give it a scheme)")
            }
        }
        var file = NewFile(geometry: g, rope: rope,
                           schemes: SchemeSpec(text: spec.text, layers: layerSetups, segmentTokens: spec.segmentTokens, rationale: spec.rationale,
                                              fileOptions: spec.fileOptions),
                           producer: selection == nil ? "\(options.tool) convert" : options.tool)
        // Without a request, the source's segment size (unless the spec's window sets one).
        file.segmentTokens = options.segmentTokens
        file.defaultSegmentTokens = m.segmentTokens
        file.maxPositions = m.maxPositions
        file.modelFingerprint = m.modelFingerprint
        file.metadata = provenance(source: source, input: input, spec: layers?.isEmpty == true ? nil : spec, tool: options.tool) + options.metadata
        let segmentTokens = try file.resolvedSegmentTokens()
        do {
            var writerOptions = WriterOptions()
            writerOptions.durability = options.durability
            writerOptions.salt = options.salt
            writerOptions.majorVersion = options.formatVersion
            writerOptions.features = options.features
            if selection != nil { writerOptions.features.insert(.tokenSelection) }
            let writer = try KVPackWriter.create(path: replacement.temporaryPath, file: file, options: writerOptions)
            try stream(from: source, ids: ids, positions: positions, tokens: tokens, to: writer, chunk: segmentTokens, rewrite: rewrite,
                       progress: options.progress)
            if let selection { try writer.attach(selection: selection) }
            try writer.close()
            try replacement.commit()
        } catch {
            replacement.discard()
            throw error
        }
        source.file.releasePages(0 ..< source.fileSize)
        return try report(source: source, tokens: tokens, rewrite: rewrite, input: input, output: output, spec: spec, options: options)
    }

    /// What the output's keys are against the source's, per kept token: turned to new positions
    /// (repositioning: each token's position becomes its index in the output, its key turns by
    /// the difference), then moved to another RoPE pair layout, or both.
    struct KeyRewrite {
        var rotation: RoPEShift?
        /// New position minus source position, per output token (with `rotation`).
        var deltas: [Int] = []
        var pairing: RoPEPairing?

        /// `positions`: the source's, of all its tokens; nil when the tokens keep their positions.
        /// nil when keys are copied as they are.
        init?(source: KVPackReader, positions: [UInt32]?, tokens: [Int], layout: RoPELayout?) throws {
            let rope = source.manifest.rope
            if let positions {
                rotation = try RoPEShift(rope: rope, headDim: source.geometry.headDim)
                deltas = tokens.enumerated().map { $0.offset - Int(positions[$0.element]) }
            }
            if let layout, layout != rope.layout {
                pairing = try RoPEPairing(from: rope.layout, to: layout, headDim: source.geometry.headDim)
            }
            if rotation == nil && pairing == nil { return nil }
        }

        /// Rewrites `count` key rows that belong to output tokens `first ..< first + count`.
        mutating func apply(rows: UnsafeMutablePointer<Float>, first: Int, count: Int) {
            let d = rotation?.headDim ?? pairing!.headDim
            if rotation != nil {
                for i in 0 ..< count {
                    rotation!.set(delta: deltas[first + i])
                    rotation!.apply(rows + i * d)
                }
            }
            pairing?.apply(rows: rows, count: count)
        }
    }

    /// Decodes the rows of source tokens `indices` (ascending) into `out`, `indices.count x
    /// headDim` floats, one decode call per run of consecutive tokens.
    static func decodeRows(_ source: KVPackReader, layer: Int, kvHead: Int, kind: KVKind, indices: ArraySlice<Int>,
                           into out: UnsafeMutablePointer<Float>, workspace: AttentionWorkspace) throws {
        let d = source.geometry.headDim
        var i = indices.startIndex, written = 0
        while i < indices.endIndex {
            var j = i + 1
            while j < indices.endIndex, indices[j] == indices[j - 1] + 1 { j += 1 }
            try source.decode(layer: layer, kvHead: kvHead, kind: kind, tokens: indices[i] ..< indices[j - 1] + 1,
                              into: out + written * d, workspace: workspace)
            written += j - i
            i = j
        }
    }

    /// Decodes `chunk` of the source tokens `tokens` (ascending) of every stream at a time and
    /// appends them with their ids and positions (`ids`, `positions`: the source's, all of them).
    static func stream(from source: KVPackReader, ids: [UInt32], positions: [UInt32], tokens: [Int], to writer: KVPackWriter, chunk: Int,
                       rewrite: KeyRewrite?,
                       progress: (@Sendable (Int, Int) -> Void)?) throws {
        var rewrite = rewrite
        let g = source.geometry, d = g.headDim, n = tokens.count
        let per = g.layerCount * g.kvHeadCount * chunk * d
        var keys = [Float](repeating: 0, count: per), values = keys
        let workspace = AttentionWorkspace()
        var released = 0
        var start = 0
        while start < n {
            let t = min(chunk, n - start)
            let picked = tokens[start ..< start + t]
            try keys.withUnsafeMutableBufferPointer { kp in
                try values.withUnsafeMutableBufferPointer { vp in
                    for layer in 0 ..< g.layerCount {
                        for head in 0 ..< g.kvHeadCount {
                            let at = (layer * g.kvHeadCount + head) * t * d
                            try decodeRows(source, layer: layer, kvHead: head, kind: .key, indices: picked, into: kp.baseAddress! + at, workspace: workspace)
                            rewrite?.apply(rows: kp.baseAddress! + at, first: start, count: t)
                            try decodeRows(source, layer: layer, kvHead: head, kind: .value, indices: picked, into: vp.baseAddress! + at, workspace: workspace)
                        }
                    }
                }
            }
            try keys.withUnsafeBufferPointer { kp in
                try values.withUnsafeBufferPointer { vp in
                    try writer.append(tokenIDs: picked.map { ids[$0] },
                                      positions: rewrite?.rotation == nil ? picked.map { positions[$0] } : (start ..< start + t).map { UInt32($0) },
                                      keys: UnsafeBufferPointer(rebasing: kp[0 ..< g.layerCount * g.kvHeadCount * t * d]),
                                      values: UnsafeBufferPointer(rebasing: vp[0 ..< g.layerCount * g.kvHeadCount * t * d]),
                                      layout: .layerHeadToken(g, tokens: t))
                }
            }
            start += t
            while (released + 1) * source.segmentTokens <= picked.last! + 1 {
                source.releasePages(segment: released)
                released += 1
            }
            progress?(start, n)
        }
    }

    /// The source's metadata, with its scheme notes replaced and a `convert.N.*` record added.
    /// A nil `spec` (no layer re-planned) keeps the source's scheme notes.
    static func provenance(source: KVPackReader, input: String, spec: SchemeSpec?, tool: String) -> [Manifest.MetadataEntry] {
        let m = source.manifest
        // Notes fold into the new manifest (a damaged note is left behind, as a reader skips it).
        var entries = ((try? source.userMetadata()) ?? m.userMetadata).filter { spec == nil || ($0.key != "scheme.spec" && !$0.key.hasPrefix("scheme.plan.")) }
        let previous = entries.compactMap { e -> Int? in
            guard e.key.hasPrefix("convert.") else { return nil }
            return Int(e.key.dropFirst("convert.".count).prefix { $0.isNumber })
        }
        let n = (previous.max() ?? 0) + 1
        entries += [
            .init("convert.\(n).from", schemeSummary(source)),
            .init("convert.\(n).source", input),
            .init("convert.\(n).producer", m.producer),
            .init("convert.\(n).tool", tool),
        ]
        if let spec {
            entries.append(.init("scheme.spec", spec.text))
            entries += spec.rationale.enumerated().map { .init("scheme.plan.\($0.offset)", $0.element) }
        }
        return entries
    }

    /// "K raw:f16, V raw:f16" or, when layers differ, "layer 0 K ... V ...; layer 1 ...".
    static func schemeSummary(_ reader: KVPackReader) -> String {
        let m = reader.manifest
        let perLayer = (0 ..< m.geometry.layerCount).map { l in
            "K \(reader.schemes[m.layerSchemes[l].key].specString), V \(reader.schemes[m.layerSchemes[l].value].specString)"
        }
        return Set(perLayer).count == 1 ? perLayer[0] : perLayer.enumerated().map { "layer \($0.offset): \($0.element)" }.joined(separator: "; ")
    }

    static func bits(_ reader: KVPackReader) throws -> Bits {
        let s = try FileSummary(reader: reader)
        let elements = Double(reader.tokenCount * reader.geometry.headDim * reader.geometry.kvHeadCount * reader.geometry.layerCount)
        guard elements > 0 else { return Bits(key: 0, value: 0, total: 0) }
        return Bits(key: Double(s.layers.reduce(0) { $0 + $1.keyBytes } * 8) / elements,
                    value: Double(s.layers.reduce(0) { $0 + $1.valueBytes } * 8) / elements,
                    total: Double(s.fileSize * 8) / (2 * elements))
    }

    /// A second streaming pass: decoded output against decoded input, and sampled attention.
    /// With a token subset, output token i is compared with source token `tokens[i]`, and
    /// attention over the output with dense attention over those source rows.
    static func report(source: KVPackReader, tokens: [Int], rewrite: KeyRewrite?, input: String, output: String, spec: SchemeSpec,
                       options: Options) throws -> Report {
        let out = try KVPackReader(path: output)
        let g = source.geometry, d = g.headDim, n = tokens.count
        var rewrite = rewrite
        let subset = n != source.tokenCount || rewrite != nil
        var kErr = RelativeError(), vErr = RelativeError(), aErr = RelativeError()
        let workspace = AttentionWorkspace()
        let chunk = max(source.segmentTokens, 1)
        var a = [Float](repeating: 0, count: chunk * d), b = a
        var start = 0
        while start < n {
            let range = start ..< min(n, start + chunk)
            for layer in 0 ..< g.layerCount {
                for head in 0 ..< g.kvHeadCount {
                    for kind in KVKind.allCases {
                        try a.withUnsafeMutableBufferPointer { ap in
                            try b.withUnsafeMutableBufferPointer { bp in
                                try decodeRows(source, layer: layer, kvHead: head, kind: kind, indices: tokens[range], into: ap.baseAddress!, workspace: workspace)
                                if kind == .key { rewrite?.apply(rows: ap.baseAddress!, first: range.lowerBound, count: range.count) }
                                try out.decode(layer: layer, kvHead: head, kind: kind, tokens: range, into: bp.baseAddress!, workspace: workspace)
                                if kind == .key { kErr.add(bp.baseAddress!, ap.baseAddress!, range.count * d) } else { vErr.add(bp.baseAddress!, ap.baseAddress!, range.count * d) }
                            }
                        }
                    }
                }
            }
            if !subset { source.releasePages(segment: start / source.segmentTokens) }
            out.file.releasePages(0 ..< out.fileSize)
            start = range.upperBound
        }
        var rng = SplitMix64(seed: options.seed)
        let samples = n > 0 ? options.attentionSamples : 0
        for _ in 0 ..< samples {
            let layer = Int(rng.next() % UInt64(g.layerCount)), head = Int(rng.next() % UInt64(g.kvHeadCount))
            let q = (0 ..< g.groupSize * d).map { _ in Float(rng.nextGaussian()) }
            let want = subset ? try denseAttention(source, tokens: tokens, rewrite: &rewrite, layer: layer, kvHead: head, queries: q)
                : try source.attend(layer: layer, kvHead: head, queries: q)
            let got = try out.attend(layer: layer, kvHead: head, queries: q)
            aErr.add(got, want)
            source.file.releasePages(0 ..< source.fileSize)
            out.file.releasePages(0 ..< out.fileSize)
        }
        if subset { source.file.releasePages(0 ..< source.fileSize) }
        let summary = { (r: KVPackReader) in (0 ..< r.manifest.schemes.count).map { r.schemes[$0].specString } }
        return Report(input: input, output: output, tokens: n, inputSchemes: summary(source), outputSchemes: summary(out),
                      before: try bits(source), after: try bits(out),
                      keyRelativeError: kErr.relative, valueRelativeError: vErr.relative,
                      attentionRelativeError: aErr.relative, attentionSamples: samples,
                      plan: spec.rationale.isEmpty ? nil : spec.rationale)
    }

    /// Attention over the decoded rows of source tokens `tokens` (exact softmax, in double).
    /// With `rewrite`, the keys are first rewritten as the output holds them (positions, layout).
    static func denseAttention(_ source: KVPackReader, tokens: [Int], rewrite: inout KeyRewrite?, layer: Int, kvHead: Int,
                               queries: [Float]) throws -> [Float] {
        let d = source.geometry.headDim, workspace = AttentionWorkspace()
        var k = [Float](repeating: 0, count: tokens.count * d), v = k
        try k.withUnsafeMutableBufferPointer {
            try decodeRows(source, layer: layer, kvHead: kvHead, kind: .key, indices: tokens[...], into: $0.baseAddress!, workspace: workspace)
            rewrite?.apply(rows: $0.baseAddress!, first: 0, count: tokens.count)
        }
        try v.withUnsafeMutableBufferPointer { try decodeRows(source, layer: layer, kvHead: kvHead, kind: .value, indices: tokens[...], into: $0.baseAddress!, workspace: workspace) }
        return DenseAttention.reference(queries: queries, keys: k, values: v, groupSize: source.geometry.groupSize, headDim: d)
    }
}
