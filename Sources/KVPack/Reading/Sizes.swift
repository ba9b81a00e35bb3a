extension KVPackReader {
    // MARK: Sizes

    /// Stored bytes of every stream: its sealed block frames (headers and payloads) and its share
    /// of the tail rows. A block of a scheme without zstd has the size its scheme gives (a reader
    /// refuses any other when it reads the block); a compressed block's size is read from its
    /// 64-byte header, a segment at a time, releasing the pages, so a summary of a large file does
    /// not leave it resident.
    public func streamBytes() throws -> [Int] {
        let streams = geometry.streamCount, segments = sealedTokenCount / segmentTokens
        var total = [Int](repeating: 0, count: streams)
        let compressed = (0 ..< streams).filter { streamCompressed[$0] }
        for stream in 0 ..< streams where !streamCompressed[stream] {
            total[stream] = segments * (FrameHeader.size + streamBlockBytes[stream])
        }
        if !compressed.isEmpty {
            prefetchTables(0 ..< segments)
            for segment in 0 ..< segments {
                let offsets = try compressed.map { try blockOffset(segment: segment, stream: $0) }
                try file.ensure(offsets.map { Int($0) ..< Int($0) + FrameHeader.size })
                for (stream, offset) in zip(compressed, offsets) {
                    let h = try FrameHeader.decode(file.bytes, at: offset, limit: state.commitOffset, salt: header.salt, field: "BLCK")
                    total[stream] += FrameHeader.size + Int(h.storedLength)
                }
                releasePages(segment: segment)
            }
        }
        for run in state.runs {
            for stream in 0 ..< streams { total[stream] += tailRows(run: run, stream: stream).count }
        }
        return total
    }

    public var blobBytes: Int { state.blobs.values.reduce(0) { $0 + $1.bytes.count + FrameHeader.size } }
}
