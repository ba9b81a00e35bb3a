/// Rows of one stream as they lie in the mapped file: consecutive rows of `elementType`,
/// `rowBytes` apart, for tokens `tokens`. Valid as long as the reader (its mapping) lives.
public struct MappedRows {
    public let base: UnsafeRawPointer
    public let tokens: Range<Int>
    public let elementType: ElementType
    public let rowBytes: Int
}

extension KVPackReader {
    /// The stored rows around `token` when they are plain rows in the file: a sealed block of a
    /// raw scheme without zstd, or an unsealed tail run (any scheme: tail rows are the residual
    /// type). nil when the block around `token` is encoded or compressed. The block is verified
    /// (its checksum) before its address is handed out, as for decode.
    public func mappedRows(layer: Int, kvHead: Int, kind: KVKind, token: Int) throws -> MappedRows? {
        try checkStream(layer: layer, kvHead: kvHead)
        try checkTokens(token ..< token + 1)
        let stream = geometry.stream(layer: layer, kvHead: kvHead, kind: kind)
        let d = geometry.headDim
        var found: MappedRows?
        try forEachChunk(token ..< token + 1) { chunk in
            switch chunk {
            case let .block(segment, _):
                guard let raw = schemes[manifest.scheme(forStream: stream)] as? RawScheme, !raw.compressesBlocks else { return }
                let payload = try blockPayload(segment: segment, stream: stream, workspace: AttentionWorkspace())
                let width = raw.elementType.byteWidth
                found = MappedRows(base: payload.baseAddress!, tokens: segment * segmentTokens ..< (segment + 1) * segmentTokens,
                                   elementType: raw.elementType, rowBytes: d * width)
            case let .tail(piece, _):
                let p = state.runs[piece]
                let type = manifest.schemes[manifest.scheme(forStream: stream)].residualType
                let rows = tailRows(piece: piece, stream: stream)
                found = MappedRows(base: rows.baseAddress!, tokens: p.tokenStart ..< p.tokenStart + p.tokenCount,
                                   elementType: type, rowBytes: d * type.byteWidth)
            }
        }
        return found
    }
}

extension KVPackReader {
    /// The scheme of a stream, as the manifest describes it (for callers that copy its codes).
    public func schemeDescriptor(layer: Int, kvHead: Int, kind: KVKind) throws -> SchemeDescriptor {
        try checkStream(layer: layer, kvHead: kvHead)
        return manifest.schemes[manifest.scheme(forStream: geometry.stream(layer: layer, kvHead: kvHead, kind: kind))]
    }

    /// A copy of the verified (and, if compressed, decompressed) payload of the sealed block of
    /// `segment` for one stream: what an exporter that copies codes instead of decoding reads.
    public func blockBytes(layer: Int, kvHead: Int, kind: KVKind, segment: Int) throws -> [UInt8] {
        try checkStream(layer: layer, kvHead: kvHead)
        guard segment >= 0, segment < sealedTokenCount / segmentTokens else {
            throw KVPackError.argument("segment \(segment) is not sealed (the file has \(sealedTokenCount / segmentTokens) sealed segments)")
        }
        let stream = geometry.stream(layer: layer, kvHead: kvHead, kind: kind)
        return Array(try blockPayload(segment: segment, stream: stream, workspace: AttentionWorkspace()))
    }
}
