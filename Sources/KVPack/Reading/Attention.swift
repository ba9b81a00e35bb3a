extension KVPackReader {
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
        try attend(layer: layer, kvHead: kvHead, queries: queries, tokens: tokens, scale: scale, appending: rows,
                   result: .output(output), workspace: workspace)
    }

    /// What one head's pass leaves: the normalised output, or its online-softmax state for a
    /// merge with other token ranges' (`SplitAttention.swift`).
    enum AttentionResult {
        case output(UnsafeMutablePointer<Float>)
        /// groupSize x (headDim + 2) floats: per query head, the unnormalised output (the block
        /// accumulator finished into plain space, plus the tail one), then the running max and sum.
        case partial(UnsafeMutablePointer<Float>)
    }

    func attend(layer: Int, kvHead: Int, queries: UnsafePointer<Float>, tokens: Range<Int>?, scale: Float?,
                appending rows: AppendedRows?, result: AttentionResult, workspace: AttentionWorkspace) throws {
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
        var offsetsAhead = OffsetsAhead()
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
            // The value block's offset, found with the key block's (a chunk holds at most one block).
            var valueBlock: UInt64?
            func forEachSource(_ body: (ChunkSource) throws -> Void) throws {
                try forEachChunk(chunkStart ..< fileEnd) { chunk in
                    switch chunk {
                    case let .block(segment, local):
                        try body(.block(segment: segment, local: local, at: segment * c + local.lowerBound - chunkStart))
                    case let .tail(piece, local):
                        try body(.tail(piece: piece, local: local, at: state.runs[piece].tokenStart + local.lowerBound - chunkStart))
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
                        kScheme.prepare(queries: queries, groupSize: g, scale: s, tokenCount: end - range.lowerBound,
                                        into: workspace.keyState.pointer)
                        preparedKey = true
                    }
                    if let found = prefetchBlocks(segment: segment + Self.blocksAhead, streams: kStream ... vStream) {
                        offsetsAhead.put(segment + Self.blocksAhead, found)
                    }
                    let (kOffset, vOffset) = try offsetsAhead.take(segment) ?? blockOffsets(segment: segment, streams: (kStream, vStream))
                    valueBlock = vOffset
                    let payload = try blockPayload(segment: segment, stream: kStream, at: kOffset, workspace: workspace)
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
                    let payload = try valueBlock.map { try blockPayload(segment: segment, stream: vStream, at: $0, workspace: workspace) }
                        ?? blockPayload(segment: segment, stream: vStream, workspace: workspace)
                    vScheme.accumulate(block: payload, tokens: local, weights: scores + at, stride: c, groupSize: g, into: blockAcc)
                case let .tail(piece, local, at):
                    vTail.accumulate(block: tailRows(piece: piece, stream: vStream), tokens: local, weights: scores + at, stride: c,
                                     groupSize: g, into: tailAcc)
                case let .appended(rows, local, at):
                    RowKernels.accumulate(rows: UnsafeRawPointer(rows.values), type: .float32, dim: d, tokens: local,
                                          weights: scores + at, stride: c, groupSize: g, into: tailAcc)
                }
            }
            // Whatever of the blocks ahead the kernels did not prefetch as they went.
            CacheHints.finishPrefetch()
            t = chunkEnd
        }
        if preparedKey { vScheme.finishAccumulation(blockAcc, groupSize: g) }
        switch result {
        case let .output(output): softmax.finish(into: output)
        case let .partial(state): softmax.leave(into: state)
        }
    }

    /// How many segments ahead attention asks the core for blocks.
    static let blocksAhead = 2

    /// The sealed segments `tokens` touches.
    func sealedSegments(_ tokens: Range<Int>) -> Range<Int> {
        let c = segmentTokens, end = min(tokens.upperBound, sealedTokenCount)
        return end > tokens.lowerBound ? tokens.lowerBound / c ..< (end + c - 1) / c : 0 ..< 0
    }

    /// The block offsets `prefetchBlocks` found for the segments ahead (a few slots, by segment).
    private struct OffsetsAhead {
        private var slots: ((Int, UInt64, UInt64), (Int, UInt64, UInt64), (Int, UInt64, UInt64), (Int, UInt64, UInt64)) =
            ((-1, 0, 0), (-1, 0, 0), (-1, 0, 0), (-1, 0, 0))

        mutating func put(_ segment: Int, _ offsets: (UInt64, UInt64)) {
            let entry = (segment, offsets.0, offsets.1)
            switch segment & 3 {
            case 0: slots.0 = entry
            case 1: slots.1 = entry
            case 2: slots.2 = entry
            default: slots.3 = entry
            }
        }

        func take(_ segment: Int) -> (UInt64, UInt64)? {
            let entry: (Int, UInt64, UInt64)
            switch segment & 3 {
            case 0: entry = slots.0
            case 1: entry = slots.1
            case 2: entry = slots.2
            default: entry = slots.3
            }
            return entry.0 == segment ? (entry.1, entry.2) : nil
        }
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
}
