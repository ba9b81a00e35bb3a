// Asking the kernel for pages before attention faults them in, and giving them back after a
// streaming pass.

extension KVPackReader {
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
        // Every stream of a remote version 2 file (a whole decode step): a segment's blocks lie
        // between the previous segment's table and its own, so the span from one table to the
        // last is what the pass reads (plus the few index and tail frames between), asked for as
        // one range that goes out in a few large requests, tables included.
        if file.isRemote, state.major != 1, streams.count == geometry.streamCount {
            let lo = segments.lowerBound == 0 ? Int(manifestEnd) : Int(state.segmentTables[segments.lowerBound - 1]) + segmentTableFrameBytes
            let hi = Int(state.segmentTables[segments.upperBound - 1]) + segmentTableFrameBytes
            if lo < hi { file.willNeed([lo ..< hi]) }
        }
        // Gathered and asked for together: a remote file fetches each list in one batch of
        // coalesced requests (the tables first, since they say where the blocks are).
        prefetchTables(segments)
        // A compressed block is at most about its raw size: a bound for the request, not a promise.
        func frameBytes(_ stream: Int) -> Int {
            FrameHeader.size + roundUp(streamBlockBytes[stream], to: FileHeader.frameAlignment)
        }
        let first = streams.lowerBound, last = streams.upperBound - 1
        let span = streams.reduce(0) { $0 + frameBytes($1) }
        var ranges: [Range<Int>] = []
        defer { file.willNeed(ranges) }
        for s in segments {
            guard let lo = try? blockOffset(segment: s, stream: first), let hi = try? blockOffset(segment: s, stream: last) else { return }
            if hi >= lo, Int(hi - lo) < 2 * span {
                ranges.append(Int(lo) ..< Int(hi) + frameBytes(last))
            } else {
                for stream in streams {
                    guard let at = try? blockOffset(segment: s, stream: stream) else { return }
                    ranges.append(Int(at) ..< Int(at) + frameBytes(stream))
                }
            }
        }
    }

    /// Asks now for everything attention over `layers` (every KV head) and `tokens` (default all)
    /// will read: a whole decode step declared at once. For a local file these are the kernel
    /// read-ahead requests attention would make layer by layer; for a remote object, one batch
    /// in which each segment's blocks of all those layers lie together, so they go out as a few
    /// large requests instead of one per segment and layer.
    public func prefetch(layers: Range<Int>, tokens: Range<Int>? = nil) throws {
        guard !layers.isEmpty else { return }
        try checkStream(layer: layers.lowerBound, kvHead: 0)
        try checkStream(layer: layers.upperBound - 1, kvHead: 0)
        let range = tokens ?? 0 ..< tokenCount
        try checkTokens(range)
        let first = geometry.stream(layer: layers.lowerBound, kvHead: 0, kind: .key)
        let last = geometry.stream(layer: layers.upperBound - 1, kvHead: geometry.kvHeadCount - 1, kind: .value)
        prefetchOnce(streams: first ..< last + 1, segments: sealedSegments(range))
    }

    /// Asks for the segment tables of `segments` not yet verified, in one batch (version 2).
    func prefetchTables(_ segments: Range<Int>) {
        guard state.major != 1 else { return }
        file.willNeed(segments.filter { !tablesVerified.isSet($0) }.map { s -> Range<Int> in
            let at = Int(state.segmentTables[s])
            return at ..< at + segmentTableFrameBytes
        })
    }

    /// Bytes of one `SEGT` frame, header included (Spec 8.1).
    var segmentTableFrameBytes: Int {
        FrameHeader.size + SegmentTable.payloadSize(streamCount: geometry.streamCount, tokenCount: segmentTokens)
    }

    /// Asks the core for the blocks of `streams` in sealed segment `segment` (attention calls it
    /// a couple of segments ahead): a stream's blocks lie a whole segment of other streams apart,
    /// too far for the hardware prefetchers, so each block would otherwise start with a wait on
    /// memory. Only blocks that lie together, as the writer puts them; a hint, never an error.
    /// The bytes become the thread's prefetch plan: the C kernels that read this segment's
    /// blocks prefetch them as they go, and `CacheHints.finishPrefetch` asks for the rest.
    /// Returns the two blocks' offsets where it found them (checked as `blockOffsets` checks them),
    /// so attention need not look them up again two segments later.
    @discardableResult
    func prefetchBlocks(segment: Int, streams: ClosedRange<Int>) -> (UInt64, UInt64)? {
        prefetchTableHead(segment: segment + Self.tablesAheadOfBlocks, stream: streams.upperBound)
        guard segment < sealedTokenCount / segmentTokens,
              let (lo, hi) = try? blockOffsets(segment: segment, streams: (streams.lowerBound, streams.upperBound)) else { return nil }
        let end = Int(hi) + FrameHeader.size + streamBlockBytes[streams.upperBound]
        if hi >= lo, end <= file.bytes.count, end - Int(lo) <= 1 << 20, let base = file.bytes.baseAddress {
            CacheHints.planPrefetch(base + Int(lo), bytes: end - Int(lo))
        }
        return (lo, hi)
    }

    /// How many segments beyond the blocks it prefetches `prefetchBlocks` asks for a version 2
    /// segment table: finding the blocks reads the table first, and a table lies after its
    /// segment's blocks, so nothing else brings it in (perf put most of a block's bookkeeping
    /// on that one miss).
    static let tablesAheadOfBlocks = 2

    /// The segment table's header and the block offsets up to `stream`'s, from the offset the
    /// index gave (nothing is read; a hint).
    func prefetchTableHead(segment: Int, stream: Int) {
        guard state.major != 1, !file.isRemote, segment < state.segmentTables.count, let base = file.bytes.baseAddress else { return }
        let offset = Int(state.segmentTables[segment]), bytes = FrameHeader.size + 8 * (stream + 1)
        guard offset <= file.bytes.count - bytes else { return }
        CacheHints.prefetch(base + offset, bytes: bytes)
    }

    public func releasePages(segment: Int) {
        guard segment >= 0, segment < sealedTokenCount / segmentTokens,
              let offsets = try? (0 ..< geometry.streamCount).map({ try blockOffset(segment: segment, stream: $0) }) else { return }
        // A version 2 segment's table follows its blocks.
        let table = state.major == 1 ? [] : [state.segmentTables[segment]]
        guard let lo = offsets.min(), let hi = (offsets + table).max(),
              let last = try? FrameHeader.decode(file.bytes, at: hi, limit: state.commitOffset, salt: header.salt) else { return }
        file.releasePages(Int(lo) ..< Int(last.nextFrameOffset))
    }
}
