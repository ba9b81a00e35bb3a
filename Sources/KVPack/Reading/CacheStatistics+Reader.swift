extension CacheStatistics {
    /// Statistics of the tokens of a file (or of its first `tokens`).
    public init(reader: KVPackReader, tokens: Int? = nil) throws {
        let n = min(tokens ?? reader.tokenCount, reader.tokenCount)
        try self.init(geometry: reader.geometry, tokens: n) { layer, head, kind in
            defer { if kind == .value, head == reader.geometry.kvHeadCount - 1 { reader.file.releasePages(0 ..< reader.fileSize) } }
            return try reader.decode(layer: layer, kvHead: head, kind: kind, tokens: 0 ..< n)
        }
    }
}
