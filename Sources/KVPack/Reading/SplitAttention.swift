extension KVPackReader {
    /// One KV head's attention with its tokens split across threads: one piece of whole segments
    /// per workspace, each attended on its own thread to its online-softmax state (per query head
    /// the unnormalised output, the running max and sum), the states then merged in token order.
    /// For a long context over few KV heads (one head, or fewer heads than cores), where
    /// `attendLayer`'s split by head leaves threads idle.
    ///
    /// The output equals `attend(layer:kvHead:...workspace:)` over the same tokens to float
    /// rounding (the merge rescales each piece's sums once more), not bit for bit; for a given
    /// workspace count it is the same on every call. One workspace is exactly `attend`.
    public func attend(layer: Int, kvHead: Int, queries: UnsafePointer<Float>, tokens: Range<Int>? = nil, scale: Float? = nil,
                       output: UnsafeMutablePointer<Float>, workspaces: [AttentionWorkspace]) throws {
        guard !workspaces.isEmpty else { throw KVPackError.argument("attention needs at least one workspace") }
        try checkStream(layer: layer, kvHead: kvHead)
        if workspaces.count == 1 {
            return try attend(layer: layer, kvHead: kvHead, queries: queries, tokens: tokens, scale: scale, output: output,
                              workspace: workspaces[0])
        }
        try attendSplit(layer: layer, heads: kvHead ..< kvHead + 1, pieces: workspaces.count, queries: queries, tokens: tokens,
                        scale: scale, output: output, workspaces: workspaces)
    }

    /// Pieces per KV head that give every one of `threads` threads the same share of `heads`
    /// heads' tokens: threads / gcd(heads, threads) (1 when the threads divide the heads).
    static func tokenPieces(heads: Int, threads: Int) -> Int {
        var a = heads, b = threads
        while b != 0 { (a, b) = (b, a % b) }
        return threads / max(a, 1)
    }

    /// Attention for KV heads `heads` (queries and output rows from the first), each head's
    /// tokens in `pieces` (at least 2) runs of whole segments; the heads x pieces items go to the
    /// workspaces' threads in contiguous, equal shares.
    func attendSplit(layer: Int, heads: Range<Int>, pieces: Int, queries: UnsafePointer<Float>, tokens: Range<Int>?, scale: Float?,
                     output: UnsafeMutablePointer<Float>, workspaces: [AttentionWorkspace]) throws {
        let g = geometry.groupSize, d = geometry.headDim, per = g * d, stateFloats = g * (d + 2)
        let range = tokens ?? 0 ..< tokenCount
        try checkTokens(range)
        guard !range.isEmpty else { throw KVPackError.argument("attention over an empty token range") }
        // The whole range's blocks, asked for here: `prefetchOnce` acts once per stream, so the
        // first piece to attend would otherwise ask only for its own segments, and the others'
        // (a remote file's above all) would come in one fault at a time.
        let first = geometry.stream(layer: layer, kvHead: heads.lowerBound, kind: .key)
        prefetchOnce(streams: first ..< first + 2 * heads.count, segments: sealedSegments(range))
        // Piece boundaries at segment boundaries nearest the equal split (a piece may be empty).
        let c = segmentTokens
        let bounds = (0 ... pieces).map { k -> Int in
            if k == 0 { return range.lowerBound }
            if k == pieces { return range.upperBound }
            let x = range.lowerBound + range.count * k / pieces
            return min(max((x + c / 2) / c * c, range.lowerBound), range.upperBound)
        }
        let items = heads.count * pieces, threads = min(workspaces.count, items)
        let states = workspaces[0].partialStates(items * stateFloats)
        try Parallel.run(workers: threads) { worker in
            for item in worker * items / threads ..< (worker + 1) * items / threads {
                let h = heads.lowerBound + item / pieces, k = item % pieces
                let state = states + item * stateFloats
                let piece = bounds[k] ..< bounds[k + 1]
                guard !piece.isEmpty else {
                    for q in 0 ..< g {
                        (state + q * (d + 2)).update(repeating: 0, count: d)
                        state[q * (d + 2) + d] = -.infinity
                        state[q * (d + 2) + d + 1] = 0
                    }
                    continue
                }
                try attend(layer: layer, kvHead: h, queries: queries + (h - heads.lowerBound) * per, tokens: piece, scale: scale,
                           appending: nil, result: .partial(state), workspace: workspaces[worker])
            }
        }
        for h in 0 ..< heads.count {
            OnlineSoftmax.merge(states + h * pieces * stateFloats, count: pieces, groupSize: g, dim: d, into: output + h * per)
        }
    }
}
