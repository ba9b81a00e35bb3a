extension KVPackReader {
    // MARK: Decode

    /// Decodes `tokens` of one stream into `out` (tokens.count x headDim floats).
    public func decode(layer: Int, kvHead: Int, kind: KVKind, tokens: Range<Int>,
                       into out: UnsafeMutablePointer<Float>, workspace: AttentionWorkspace) throws {
        try checkStream(layer: layer, kvHead: kvHead)
        try checkTokens(tokens)
        let stream = geometry.stream(layer: layer, kvHead: kvHead, kind: kind)
        let schemeIndex = manifest.scheme(forStream: stream)
        let d = geometry.headDim
        // A remote file: one batch of requests for the stream's blocks, not one per block.
        if file.isRemote { prefetchOnce(streams: stream ..< stream + 1, segments: sealedSegments(tokens)) }
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
}
