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
