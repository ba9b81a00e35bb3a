extension KVPackReader {
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
