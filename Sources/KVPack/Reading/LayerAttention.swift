extension KVPackReader {
    /// Attention for every KV head of `layer`: `queries` and `output` hold kvHeads x groupSize x
    /// headDim floats (query head h at h * headDim). With more than one workspace, KV heads are
    /// split across that many threads (one workspace each; heads are independent, and the reader
    /// is safe to share). The result does not depend on the thread count.
    ///
    /// `splittingTokens`: where the workspaces do not divide the KV heads evenly (3 heads on 2
    /// threads, 1 head on 4), each head's tokens are also split, into threads / gcd(heads,
    /// threads) pieces whose softmax states are merged, so every thread gets the same share of
    /// tokens. The output then equals the unsplit one to float rounding, not bit for bit (the
    /// same for a given workspace count); where the workspaces divide the heads it is the same call.
    public func attendLayer(_ layer: Int, queries: UnsafePointer<Float>, tokens: Range<Int>? = nil, scale: Float? = nil,
                            output: UnsafeMutablePointer<Float>, workspaces: [AttentionWorkspace], splittingTokens: Bool = false) throws {
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
        let pieces = splittingTokens ? Self.tokenPieces(heads: heads, threads: workspaces.count) : 1
        if pieces > 1 {
            return try attendSplit(layer: layer, heads: 0 ..< heads, pieces: pieces, queries: queries, tokens: tokens, scale: scale,
                                   output: output, workspaces: workspaces)
        }
        // Each worker takes a contiguous run of heads and writes only its own output rows.
        try Parallel.run(workers: threads) { worker in
            let first = worker * heads / threads, last = (worker + 1) * heads / threads
            for h in first ..< last {
                try attend(layer: layer, kvHead: h, queries: queries + h * per, tokens: tokens, scale: scale,
                           output: output + h * per, workspace: workspaces[worker])
            }
        }
    }
}
