#if canImport(Glibc)
import Glibc
#endif

/// A read-only view of a KVPack file at its newest verified commit.
///
/// Opening reads the header, the manifest, the commit's index chain and the tail, and checks
/// them; block payloads are not touched until a decode or attention call first reads them,
/// when their header and checksum are verified once. In a version 2 file the index lists one
/// segment table per sealed segment, and each table (block offsets, token ids, positions) is
/// also verified on first use, so opening costs the same at 4K tokens as at 128K. Safe to
/// share between threads; each thread passes its own `AttentionWorkspace`.
public final class KVPackReader: @unchecked Sendable {
    // @unchecked: every stored property is immutable after init except `verified`, which is atomic.
    public let file: MappedFile
    public let path: String?
    public let header: FileHeader
    public let manifest: Manifest
    let state: CommitState
    let schemes: [any KVScheme]
    /// The codec of each stream (`schemes[index].forKVHead(head)`).
    let streamSchemes: [any KVScheme]
    /// Tail rows are attended with the raw kernels of each scheme's residual type.
    let tailKernels: [RawScheme]
    let verified: VerificationFlags
    /// Version 2: which segment tables have been verified.
    let tablesVerified: VerificationFlags
    /// Streams whose pages attention has asked the kernel for (`prefetchOnce`).
    let prefetched: VerificationFlags
    let manifestEnd: UInt64

    public var geometry: ModelGeometry { manifest.geometry }
    public var tokenCount: Int { state.tokenCount }
    public var segmentTokens: Int { manifest.segmentTokens }
    public var sealedTokenCount: Int { tokenCount / segmentTokens * segmentTokens }
    /// Every token id, in order. A version 2 file keeps them in its segment tables, which this
    /// reads (and verifies) on first use: O(tokens), unlike opening.
    public var tokenIDs: [UInt32] { get throws { try tokens(0 ..< tokenCount).ids } }
    /// The RoPE position each token was encoded at.
    public var positions: [UInt32] { get throws { try tokens(0 ..< tokenCount).positions } }
    public var blobs: [Blob] { state.blobs.values.sorted { $0.id < $1.id } }
    public var recoveryNotes: [RecoveryNote] { state.notes }
    public var commitOffset: UInt64 { state.commitOffset }
    public var commitSerial: UInt64 { state.commitSerial }
    public var fileSize: Int { file.bytes.count }

    public convenience init(path: String) throws {
        try self.init(file: MappedFile(path: path), path: path)
    }

    public init(file: MappedFile, path: String? = nil) throws {
        self.file = file
        self.path = path
        let bytes = file.bytes
        header = try FileHeader.decode(bytes)
        let m = try FrameHeader.decode(bytes, at: UInt64(FileHeader.size), limit: UInt64(bytes.count),
                                       salt: header.salt, field: "MANI")
        guard m.tag == .manifest else {
            throw KVPackError.invalid(m.offset, "MANI.tag", "the first frame must be the manifest, found \(m.tag)")
        }
        guard !m.isCompressed else { throw KVPackError.invalid(m.offset + 4, "MANI.flags", "the manifest is never compressed") }
        try m.verifyPayload(in: bytes, field: "MANI")
        manifest = try Manifest.decode(m.storedPayload(in: bytes), base: m.payloadOffset)
        manifestEnd = m.nextFrameOffset
        let loader = CommitLoader(file: bytes, major: header.major, salt: header.salt, manifest: manifest, manifestEnd: manifestEnd)
        let state = try loader.loadNewest()
        self.state = state
        var schemes: [any KVScheme] = []
        var tails: [RawScheme] = []
        for (i, d) in manifest.schemes.enumerated() {
            // The commit loader checked that every blob a descriptor names is listed.
            let context = self.manifest.schemeContext(i, blobs: d.blobIDs.map { state.blobs[$0]! })
            do {
                schemes.append(try SchemeRegistry.make(descriptor: d, context: context))
            } catch var e as KVPackError {
                e.field = e.field.map { "manifest.schemes[\(i)].\($0)" } ?? "manifest.schemes[\(i)]"
                e.offset = e.offset ?? m.payloadOffset
                throw e
            }
            tails.append(try RawScheme(descriptor: RawScheme.descriptor(elementType: d.residualType), context: context))
        }
        self.schemes = schemes
        let manifest = self.manifest, g = manifest.geometry
        streamSchemes = (0 ..< g.streamCount).map { schemes[manifest.scheme(forStream: $0)].forKVHead(g.streamID($0).kvHead) }
        self.tailKernels = tails
        // Bounded by the file size: the commit loader checked that the bytes can hold the blocks.
        verified = VerificationFlags(count: state.tokenCount / manifest.segmentTokens * g.streamCount)
        tablesVerified = VerificationFlags(count: state.segmentTables.count)
        prefetched = VerificationFlags(count: g.streamCount)
    }

    /// Bytes of heap the reader holds beyond the mapped file: the block index, token ids and
    /// positions, blobs and per-block verification flags (counted from the arrays; small
    /// objects ignored). Everything else a reader touches is the file's pages.
    public var heapBytes: Int {
        state.blockOffsets.count * 8 + state.segmentTables.count * 8 + state.tokenIDs.count * 4 + state.positions.count * 4
            + state.blobs.values.reduce(0) { $0 + $1.bytes.count } + state.tail.count * (32 + 8 * geometry.streamCount)
            + verified.byteCount + tablesVerified.byteCount + prefetched.byteCount
    }

    /// Bytes of the index frames opening read and verified (the commit's chain, headers
    /// included): every block and token in version 1, 16 bytes per segment in version 2.
    public var indexBytes: Int { state.chain.reduce(0) { $0 + FrameHeader.size + Int($1.payloadSize) } }

    /// Whether the commit lists a token selection (a pruned file).
    public var hasTokenSelection: Bool { state.selectionOffset != nil }

    /// The token selection this file's first tokens come from (`kvpack prune`), read and checked
    /// now: nil when the file lists none. Damage to it is an error here (and in `validate`) but
    /// never stops the tokens from being read, since attention does not depend on it.
    public func tokenSelection() throws -> TokenSelection? {
        guard let at = state.selectionOffset else { return nil }
        let h = try FrameHeader.decode(file.bytes, at: at, limit: state.commitOffset, salt: header.salt, field: "tsel")
        return try TokenSelection.decode(header: h, file: file.bytes, fileTokens: tokenCount)
    }

    // MARK: Per-stream information

    public func scheme(layer: Int, kind: KVKind) -> any KVScheme {
        schemes[manifest.schemeIndex(layer: layer, kind: kind)]
    }

    func checkStream(layer: Int, kvHead: Int) throws {
        guard (0 ..< geometry.layerCount).contains(layer) else {
            throw KVPackError.argument("layer \(layer) out of range 0..<\(geometry.layerCount)")
        }
        guard (0 ..< geometry.kvHeadCount).contains(kvHead) else {
            throw KVPackError.argument("KV head \(kvHead) out of range 0..<\(geometry.kvHeadCount)")
        }
    }

    func checkTokens(_ tokens: Range<Int>) throws {
        guard tokens.lowerBound >= 0, tokens.upperBound <= tokenCount else {
            throw KVPackError.argument("token range \(tokens) outside the file's \(tokenCount) tokens")
        }
    }

    // MARK: Segment tables (version 2)

    /// The verified payload of a sealed segment's table: `streamCount` u64 block offsets, then
    /// `segmentTokens` u32 token ids and as many u32 positions (Spec/ 8.1).
    func segmentTable(_ segment: Int) throws -> UnsafeRawBufferPointer {
        let offset = state.segmentTables[segment]
        let bytes = file.bytes
        let h = try FrameHeader.decode(bytes, at: offset, limit: state.commitOffset, salt: header.salt, field: "SEGT")
        guard h.tag == .segmentTable else { throw KVPackError.invalid(offset, "SEGT.tag", "expected a SEGT frame, found \(h.tag)") }
        guard !h.isCompressed else { throw KVPackError.invalid(offset + 4, "SEGT.flags", "segment tables are never compressed") }
        guard h.field32(32) == UInt32(segment) else {
            throw KVPackError.invalid(offset + 32, "SEGT.segment", "is \(h.field32(32)); the index lists this frame as segment \(segment)")
        }
        let streams = geometry.streamCount, c = segmentTokens
        guard Int(h.field32(36)) == streams else {
            throw KVPackError.invalid(offset + 36, "SEGT.streamCount", "is \(h.field32(36)), the manifest has \(streams) streams")
        }
        guard Int(h.field32(40)) == c else {
            throw KVPackError.invalid(offset + 40, "SEGT.tokenCount", "is \(h.field32(40)), a sealed segment holds segmentTokens = \(c)")
        }
        let expected = UInt64(8 * streams + 8 * c)
        guard h.storedLength == expected else {
            throw KVPackError.invalid(offset + 8, "SEGT.storedLength", "is \(h.storedLength); \(streams) block offsets and \(c) tokens take \(expected)")
        }
        if !tablesVerified.isSet(segment) {
            try h.verifyPayload(in: bytes, field: "SEGT")
            tablesVerified.set(segment)
        }
        return h.storedPayload(in: bytes)
    }

    /// Where the block of (segment, stream) starts: from the version 1 index, or from the
    /// segment's table, whose entries are checked here, before anything is read at them.
    func blockOffset(segment: Int, stream: Int) throws -> UInt64 {
        if state.major == 1 { return state.blockOffsets[segment * geometry.streamCount + stream] }
        let table = try segmentTable(segment)
        let offset = table.loadLE(8 * stream, as: UInt64.self)
        let tableOffset = state.segmentTables[segment]
        guard offset % UInt64(FileHeader.frameAlignment) == 0, offset >= manifestEnd, offset < tableOffset,
              tableOffset - offset >= UInt64(FrameHeader.size) else {
            throw KVPackError.invalid(tableOffset + UInt64(FrameHeader.size + 8 * stream), "SEGT.blockOffset[\(stream)]",
                                      "\(offset) is not a frame offset between the manifest end \(manifestEnd) and the table at \(tableOffset)")
        }
        return offset
    }

    /// Token ids and positions of `range` (checked against the file's tokens).
    public func tokens(_ range: Range<Int>) throws -> (ids: [UInt32], positions: [UInt32]) {
        try checkTokens(range)
        if state.major == 1 { return (Array(state.tokenIDs[range]), Array(state.positions[range])) }
        var ids: [UInt32] = [], positions: [UInt32] = []
        ids.reserveCapacity(range.count)
        positions.reserveCapacity(range.count)
        let c = segmentTokens
        func take(_ bytes: UnsafeRawBufferPointer, ids at: Int, positions pat: Int, _ local: Range<Int>) {
            for i in local {
                ids.append(bytes.loadLE(at + 4 * i, as: UInt32.self))
                positions.append(bytes.loadLE(pat + 4 * i, as: UInt32.self))
            }
        }
        try forEachChunk(range) { chunk in
            switch chunk {
            case let .block(segment, local):
                let table = try segmentTable(segment)
                let streams = geometry.streamCount
                take(table, ids: 8 * streams, positions: 8 * streams + 4 * c, local)
            case let .tail(piece, local):
                let p = state.tail[piece]
                // Version 2 runs always have a token section (the loader set it).
                let at = p.tokenSection ?? 0
                take(file.bytes, ids: at, positions: at + 4 * p.tokenCount, local)
            }
        }
        return (ids, positions)
    }

    // MARK: Prefetch

    /// The first time attention reaches `streams` (a freshly opened, probably cold file), asks
    /// the kernel for every page the pass will read over `segments`: segment tables first
    /// (version 2), then the blocks, one request per segment when the streams' blocks lie
    /// together (they do: a segment's blocks are written in stream order). Without it each of
    /// thousands of small blocks is a page fault waiting on its own read and pulling in
    /// read-around pages of other streams. Once per stream per reader: later passes are warm.
    /// On a warm file the requests cost little next to the pass itself (measured: the first
    /// decode step at 128K tokens, 3.7 s with them and without); a residency check (`mincore`
    /// on sample blocks) was tried and dropped: in a cold file the sampled blocks already read
    /// as resident (most likely read-around from reading the segment tables), so it skipped
    /// the prefetch exactly when it was needed (cold open + first attention back to 1.2-1.6 s).
    func prefetchOnce(streams: Range<Int>, segments: Range<Int>) {
        // Runs for heap copies too (willNeed is then a no-op), so tests and the fuzzer exercise it.
        guard !segments.isEmpty, !streams.isEmpty, !prefetched.isSet(streams.lowerBound) else { return }
        for stream in streams { prefetched.set(stream) }
        if state.major != 1 {
            let tableBytes = FrameHeader.size + 8 * geometry.streamCount + 8 * segmentTokens
            for s in segments where !tablesVerified.isSet(s) {
                let at = Int(state.segmentTables[s])
                file.willNeed(at ..< at + tableBytes)
            }
        }
        // A compressed block is at most about its raw size: a bound for the request, not a promise.
        func frameBytes(_ stream: Int) -> Int {
            FrameHeader.size + roundUp(streamSchemes[stream].encodedBlockSize(tokens: segmentTokens), to: FileHeader.frameAlignment)
        }
        let first = streams.lowerBound, last = streams.upperBound - 1
        let span = streams.reduce(0) { $0 + frameBytes($1) }
        for s in segments {
            guard let lo = try? blockOffset(segment: s, stream: first), let hi = try? blockOffset(segment: s, stream: last) else { return }
            if hi >= lo, Int(hi - lo) < 2 * span {
                file.willNeed(Int(lo) ..< Int(hi) + frameBytes(last))
            } else {
                for stream in streams {
                    guard let at = try? blockOffset(segment: s, stream: stream) else { return }
                    file.willNeed(Int(at) ..< Int(at) + frameBytes(stream))
                }
            }
        }
    }

    // MARK: Block access

    /// The verified payload of a sealed block, decompressed into `workspace` when compressed.
    func blockPayload(segment: Int, stream: Int, workspace: AttentionWorkspace) throws -> UnsafeRawBufferPointer {
        let slot = segment * geometry.streamCount + stream
        let offset = try blockOffset(segment: segment, stream: stream)
        let bytes = file.bytes
        let h = try FrameHeader.decode(bytes, at: offset, limit: state.commitOffset, salt: header.salt, field: "BLCK")
        let schemeIndex = manifest.scheme(forStream: stream)
        let scheme = schemes[schemeIndex]
        guard h.tag == .block else { throw KVPackError.invalid(offset, "BLCK.tag", "expected a BLCK frame, found \(h.tag)") }
        guard h.field32(32) == UInt32(stream), h.field32(36) == UInt32(segment) else {
            throw KVPackError.invalid(offset + 32, "BLCK.stream",
                                      "frame holds stream \(h.field32(32)) segment \(h.field32(36)); the index lists it as stream \(stream) segment \(segment)")
        }
        guard Int(h.field32(40)) == segmentTokens else {
            throw KVPackError.invalid(offset + 40, "BLCK.tokenCount", "is \(h.field32(40)), sealed blocks hold segmentTokens = \(segmentTokens)")
        }
        guard Int(h.field16(44)) == schemeIndex else {
            throw KVPackError.invalid(offset + 44, "BLCK.schemeIndex", "is \(h.field16(44)), the manifest assigns scheme \(schemeIndex) to this stream")
        }
        let expected = scheme.encodedBlockSize(tokens: segmentTokens)
        guard h.rawLength == UInt64(expected) else {
            throw KVPackError.invalid(offset + 16, "BLCK.rawLength", "is \(h.rawLength), \(segmentTokens) tokens of this scheme take \(expected) bytes")
        }
        guard h.isCompressed == scheme.compressesBlocks else {
            throw KVPackError.invalid(offset + 4, "BLCK.flags",
                                      h.isCompressed ? "block is compressed but its scheme stores uncompressed blocks" : "block is uncompressed but its scheme compresses blocks")
        }
        let firstUse = !verified.isSet(slot)
        if firstUse { try h.verifyPayload(in: bytes, field: "BLCK") }
        var payload = h.storedPayload(in: bytes)
        if h.isCompressed {
            let out = workspace.decompressionBuffer(expected)
            try workspace.decompressor.decompress(payload, into: out, offset: h.payloadOffset, field: "BLCK.payload")
            payload = UnsafeRawBufferPointer(out)
        }
        if firstUse {
            do {
                try scheme.validate(block: payload, tokens: segmentTokens)
            } catch var e as KVPackError {
                e.offset = e.offset ?? h.payloadOffset
                throw e
            }
            verified.set(slot)
        }
        return payload
    }

    /// One piece of a stream's token range: part of a sealed block or of a tail run.
    enum Chunk {
        case block(segment: Int, local: Range<Int>)
        case tail(piece: Int, local: Range<Int>)
    }

    /// The chunks covering `tokens`, in token order.
    func forEachChunk(_ tokens: Range<Int>, _ body: (Chunk) throws -> Void) rethrows {
        let c = segmentTokens
        let sealedEnd = min(tokens.upperBound, sealedTokenCount)
        var t = tokens.lowerBound
        while t < sealedEnd {
            let segment = t / c
            let end = min(sealedEnd, (segment + 1) * c)
            try body(.block(segment: segment, local: (t - segment * c) ..< (end - segment * c)))
            t = end
        }
        for (i, piece) in state.tail.enumerated() {
            let lo = max(t, piece.tokenStart), hi = min(tokens.upperBound, piece.tokenStart + piece.tokenCount)
            if lo < hi { try body(.tail(piece: i, local: (lo - piece.tokenStart) ..< (hi - piece.tokenStart))) }
        }
    }

    func tailRows(piece: Int, stream: Int) -> UnsafeRawBufferPointer {
        let p = state.tail[piece]
        let start = p.streamOffsets[stream]
        let width = manifest.schemes[manifest.scheme(forStream: stream)].residualType.byteWidth
        return UnsafeRawBufferPointer(rebasing: file.bytes[start ..< start + p.tokenCount * geometry.headDim * width])
    }

    // MARK: Decode

    /// Decodes `tokens` of one stream into `out` (tokens.count x headDim floats).
    public func decode(layer: Int, kvHead: Int, kind: KVKind, tokens: Range<Int>,
                       into out: UnsafeMutablePointer<Float>, workspace: AttentionWorkspace) throws {
        try checkStream(layer: layer, kvHead: kvHead)
        try checkTokens(tokens)
        let stream = geometry.stream(layer: layer, kvHead: kvHead, kind: kind)
        let schemeIndex = manifest.scheme(forStream: stream)
        let d = geometry.headDim
        var row = 0
        try forEachChunk(tokens) { chunk in
            switch chunk {
            case let .block(segment, local):
                let payload = try blockPayload(segment: segment, stream: stream, workspace: workspace)
                streamSchemes[stream].decode(block: payload, tokens: local, into: out + row * d)
                row += local.count
            case let .tail(piece, local):
                tailKernels[schemeIndex].decode(block: tailRows(piece: piece, stream: stream), tokens: local, into: out + row * d)
                row += local.count
            }
        }
    }

    public func decode(layer: Int, kvHead: Int, kind: KVKind, tokens: Range<Int>? = nil) throws -> [Float] {
        let range = tokens ?? 0 ..< tokenCount
        let workspace = AttentionWorkspace()
        return try [Float](unsafeUninitializedCapacity: range.count * geometry.headDim) { buf, n in
            try decode(layer: layer, kvHead: kvHead, kind: kind, tokens: range, into: buf.baseAddress!, workspace: workspace)
            n = range.count * geometry.headDim
        }
    }

    // MARK: Attention

    /// Softmax attention of the `groupSize` query heads sharing `kvHead` over `tokens`:
    /// output[g] = sum_t softmax_t(scale * q_g . k_t) v_t, streamed with an online softmax,
    /// reading codes straight from the mapped pages.
    ///
    /// `queries` and `output` are groupSize x headDim floats, row-major. `scale` defaults to
    /// 1/sqrt(headDim). `appending` adds in-memory f32 rows right after `tokens` (a live
    /// session's tokens that are not in the file yet); `tokens` may then be empty.
    ///
    /// The softmax advances one segment at a time, whatever holds the segment's rows (a sealed
    /// block, tail runs, appended rows, or a mix): the same tokens give the same floating-point
    /// operations whether they were read back from the file or are still in memory, so a resumed
    /// session computes exactly what an uninterrupted one did.
    public func attend(layer: Int, kvHead: Int, queries: UnsafePointer<Float>, tokens: Range<Int>? = nil,
                       scale: Float? = nil, appending rows: AppendedRows? = nil,
                       output: UnsafeMutablePointer<Float>, workspace: AttentionWorkspace) throws {
        try checkStream(layer: layer, kvHead: kvHead)
        let range = tokens ?? 0 ..< tokenCount
        try checkTokens(range)
        let extra = rows?.count ?? 0
        guard !range.isEmpty || extra > 0 else { throw KVPackError.argument("attention over an empty token range") }
        let g = geometry.groupSize, d = geometry.headDim, c = segmentTokens
        let kStream = geometry.stream(layer: layer, kvHead: kvHead, kind: .key)
        let vStream = kStream + 1
        let kIndex = manifest.scheme(forStream: kStream), vIndex = manifest.scheme(forStream: vStream)
        let kScheme = streamSchemes[kStream], vScheme = streamSchemes[vStream]
        let kTail = tailKernels[kIndex], vTail = tailKernels[vIndex]
        let s = scale ?? 1 / Float(d).squareRoot()
        prefetchOnce(streams: kStream ..< vStream + 1, segments: sealedSegments(range))

        workspace.reserve(scores: g * c, keyState: kScheme.queryStateSize(groupSize: g), tailState: g * d, acc: g * d, group: g)
        let scores = workspace.scores.pointer
        let blockAcc = workspace.blockAcc.pointer, tailAcc = workspace.tailAcc.pointer
        let softmax = OnlineSoftmax(groupSize: g, dim: d, runMax: workspace.runMax.pointer, runSum: workspace.runSum.pointer,
                                    blockAcc: blockAcc, tailAcc: tailAcc)
        // Tail rows and appended rows are plain rows: their query state is the scaled query.
        let rowState = workspace.tailState.pointer
        RowKernels.scaled(queries, by: s, into: rowState, count: g * d)
        var preparedKey = false
        let end = range.upperBound + extra   // appended row i is token range.upperBound + i
        var t = range.lowerBound
        while t < end {
            let segment = t / c
            let chunkEnd = min(end, (segment + 1) * c)
            // Past the file's range (appended rows spanning later segments) the file part is empty.
            let fileEnd = max(t, min(chunkEnd, range.upperBound))
            // A chunk is the part of one segment in [t, chunkEnd): block rows, then tail runs,
            // then appended rows, in token order. Scores land at (token - t). Enumerated, not
            // stored, so a chunk allocates nothing.
            // `throws`, never `rethrows`: Swift 6.3.1 miscompiles a local rethrows function whose
            // body passes through another rethrows call (swiftlang/swift#77809): the error is lost
            // at -Onone and a crash at -O. The fuzzer found it (corpus/error-checksumMismatch__
            // v1-fuzz-attend-lost-error.kvpack); no local function in this project uses rethrows.
            let chunkStart = t
            func forEachSource(_ body: (ChunkSource) throws -> Void) throws {
                try forEachChunk(chunkStart ..< fileEnd) { chunk in
                    switch chunk {
                    case let .block(segment, local):
                        try body(.block(segment: segment, local: local, at: segment * c + local.lowerBound - chunkStart))
                    case let .tail(piece, local):
                        try body(.tail(piece: piece, local: local, at: state.tail[piece].tokenStart + local.lowerBound - chunkStart))
                    }
                }
                if chunkEnd > range.upperBound, let rows {
                    let first = max(chunkStart, range.upperBound)
                    try body(.appended(rows: rows, local: first - range.upperBound ..< chunkEnd - range.upperBound, at: first - chunkStart))
                }
            }
            try forEachSource { source in
                switch source {
                case let .block(segment, local, at):
                    if !preparedKey {
                        kScheme.prepare(queries: queries, groupSize: g, scale: s, into: workspace.keyState.pointer)
                        preparedKey = true
                    }
                    let payload = try blockPayload(segment: segment, stream: kStream, workspace: workspace)
                    kScheme.scores(block: payload, tokens: local, state: workspace.keyState.pointer, groupSize: g, into: scores + at, stride: c)
                case let .tail(piece, local, at):
                    kTail.scores(block: tailRows(piece: piece, stream: kStream), tokens: local, state: rowState, groupSize: g,
                                 into: scores + at, stride: c)
                case let .appended(rows, local, at):
                    RowKernels.scores(rows: UnsafeRawPointer(rows.keys), type: .float32, dim: d, tokens: local, queries: rowState,
                                      groupSize: g, into: scores + at, stride: c)
                }
            }
            softmax.absorb(scores: scores, stride: c, count: chunkEnd - t)
            try forEachSource { source in
                switch source {
                case let .block(segment, local, at):
                    let payload = try blockPayload(segment: segment, stream: vStream, workspace: workspace)
                    vScheme.accumulate(block: payload, tokens: local, weights: scores + at, stride: c, groupSize: g, into: blockAcc)
                case let .tail(piece, local, at):
                    vTail.accumulate(block: tailRows(piece: piece, stream: vStream), tokens: local, weights: scores + at, stride: c,
                                     groupSize: g, into: tailAcc)
                case let .appended(rows, local, at):
                    RowKernels.accumulate(rows: UnsafeRawPointer(rows.values), type: .float32, dim: d, tokens: local,
                                          weights: scores + at, stride: c, groupSize: g, into: tailAcc)
                }
            }
            t = chunkEnd
        }
        if preparedKey { vScheme.finishAccumulation(blockAcc, groupSize: g) }
        softmax.finish(into: output)
    }

    /// The sealed segments `tokens` touches.
    func sealedSegments(_ tokens: Range<Int>) -> Range<Int> {
        let c = segmentTokens, end = min(tokens.upperBound, sealedTokenCount)
        return end > tokens.lowerBound ? tokens.lowerBound / c ..< (end + c - 1) / c : 0 ..< 0
    }

    /// Where the rows of part of a chunk come from; `at` is their offset in the chunk's scores.
    private enum ChunkSource {
        case block(segment: Int, local: Range<Int>, at: Int)
        case tail(piece: Int, local: Range<Int>, at: Int)
        case appended(rows: AppendedRows, local: Range<Int>, at: Int)
    }

    public func attend(layer: Int, kvHead: Int, queries: [Float], tokens: Range<Int>? = nil, scale: Float? = nil) throws -> [Float] {
        let n = geometry.groupSize * geometry.headDim
        guard queries.count == n else {
            throw KVPackError.argument("expected \(geometry.groupSize) x \(geometry.headDim) = \(n) query floats, got \(queries.count)")
        }
        let workspace = AttentionWorkspace()
        return try [Float](unsafeUninitializedCapacity: n) { out, count in
            try queries.withUnsafeBufferPointer { q in
                try attend(layer: layer, kvHead: kvHead, queries: q.baseAddress!, tokens: tokens, scale: scale,
                           output: out.baseAddress!, workspace: workspace)
            }
            count = n
        }
    }

    /// Releases the mapped pages of a sealed segment's blocks (a streaming pass is done with them).
    public func releasePages(segment: Int) {
        guard segment >= 0, segment < tokenCount / segmentTokens,
              let offsets = try? (0 ..< geometry.streamCount).map({ try blockOffset(segment: segment, stream: $0) }) else { return }
        // A version 2 segment's table follows its blocks.
        let table = state.major == 1 ? [] : [state.segmentTables[segment]]
        guard let lo = offsets.min(), let hi = (offsets + table).max(),
              let last = try? FrameHeader.decode(file.bytes, at: hi, limit: state.commitOffset, salt: header.salt) else { return }
        file.releasePages(Int(lo) ..< Int(last.nextFrameOffset))
    }

    // MARK: Sizes

    /// Stored bytes of every stream: its sealed block frames (headers and payloads) and its share
    /// of the tail rows. Reads each block's header (a segment at a time, releasing the pages, so
    /// a summary of a large file does not leave it resident).
    public func streamBytes() throws -> [Int] {
        let streams = geometry.streamCount
        var total = [Int](repeating: 0, count: streams)
        for segment in 0 ..< tokenCount / segmentTokens {
            for stream in 0 ..< streams {
                let offset = try blockOffset(segment: segment, stream: stream)
                let h = try FrameHeader.decode(file.bytes, at: offset, limit: state.commitOffset, salt: header.salt, field: "BLCK")
                total[stream] += FrameHeader.size + Int(h.storedLength)
            }
            releasePages(segment: segment)
        }
        for piece in state.tail.indices {
            for stream in 0 ..< streams { total[stream] += tailRows(piece: piece, stream: stream).count }
        }
        return total
    }

    public var blobBytes: Int { state.blobs.values.reduce(0) { $0 + $1.bytes.count + FrameHeader.size } }
}

// MARK: A whole layer

import Dispatch

extension KVPackReader {
    /// Attention for every KV head of `layer`: `queries` and `output` hold kvHeads x groupSize x
    /// headDim floats (query head h at h * headDim). With more than one workspace, KV heads are
    /// split across that many threads (one workspace each; heads are independent, and the reader
    /// is safe to share). The result does not depend on the thread count.
    public func attendLayer(_ layer: Int, queries: UnsafePointer<Float>, tokens: Range<Int>? = nil, scale: Float? = nil,
                            output: UnsafeMutablePointer<Float>, workspaces: [AttentionWorkspace]) throws {
        guard !workspaces.isEmpty else { throw KVPackError.argument("attendLayer needs at least one workspace") }
        let g = geometry, per = g.groupSize * g.headDim, heads = g.kvHeadCount
        let threads = min(workspaces.count, heads)
        try checkStream(layer: layer, kvHead: 0)
        // All the layer's blocks of a segment lie together: one prefetch request per segment.
        let range = tokens ?? 0 ..< tokenCount
        if range.lowerBound >= 0, range.upperBound <= tokenCount {
            let first = g.stream(layer: layer, kvHead: 0, kind: .key)
            prefetchOnce(streams: first ..< first + 2 * heads, segments: sealedSegments(range))
        }
        if threads == 1 {
            for h in 0 ..< heads {
                try attend(layer: layer, kvHead: h, queries: queries + h * per, tokens: tokens, scale: scale,
                           output: output + h * per, workspace: workspaces[0])
            }
            return
        }
        // Each thread takes a contiguous run of heads and writes only its own output rows.
        let failures = LayerFailures(count: threads)
        let q = UnsafeSendablePointer(queries), o = UnsafeSendableMutablePointer(output)
        let spaces = WorkspaceHandoff(workspaces)
        DispatchQueue.concurrentPerform(iterations: threads) { worker in
            let first = worker * heads / threads, last = (worker + 1) * heads / threads
            do {
                for h in first ..< last {
                    try attend(layer: layer, kvHead: h, queries: q.pointer + h * per, tokens: tokens, scale: scale,
                               output: o.pointer + h * per, workspace: spaces.workspaces[worker])
                }
            } catch {
                failures.record(error, worker: worker)
            }
        }
        if let error = failures.first { throw error }
    }
}

/// Raw pointers handed to worker threads that touch disjoint rows.
private struct UnsafeSendablePointer: @unchecked Sendable {
    let pointer: UnsafePointer<Float>
    init(_ p: UnsafePointer<Float>) { pointer = p }
}

private struct UnsafeSendableMutablePointer: @unchecked Sendable {
    let pointer: UnsafeMutablePointer<Float>
    init(_ p: UnsafeMutablePointer<Float>) { pointer = p }
}

/// Workspaces handed to workers: worker i uses only workspaces[i].
private struct WorkspaceHandoff: @unchecked Sendable {
    let workspaces: [AttentionWorkspace]
    init(_ w: [AttentionWorkspace]) { workspaces = w }
}

/// One error slot per worker; the first worker's error (in worker order) is reported.
private final class LayerFailures: @unchecked Sendable {
    // @unchecked: each worker writes only its own slot; read after concurrentPerform returns.
    private let errors: UnsafeMutablePointer<Error?>
    private let count: Int
    init(count: Int) {
        self.count = count
        errors = .allocate(capacity: count)
        errors.initialize(repeating: nil, count: count)
    }
    deinit {
        errors.deinitialize(count: count)
        errors.deallocate()
    }
    func record(_ error: Error, worker: Int) { errors[worker] = error }
    var first: Error? { (0 ..< count).lazy.compactMap { self.errors[$0] }.first }
}
