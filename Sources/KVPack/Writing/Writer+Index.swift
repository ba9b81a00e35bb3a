// Index frames (incremental, or a FULL rewrite streamed from the file) and the frame writer
// every other frame goes through.

extension KVPackWriter {
    /// Writes an index frame with the pending entries (FULL when the chain is long or its
    /// incremental frames outweigh the last FULL one) and returns its offset.
    @discardableResult
    func writeIndex(tailOffset: UInt64) throws -> UInt64 {
        let incremental = chain.filter { !$0.isFull }.reduce(UInt64(0)) { $0 + $1.payloadSize }
        let fullSize = chain.last?.payloadSize ?? 0
        let full = chain.isEmpty || chain.count >= options.maxIndexChain || incremental + pending.payloadSize > fullSize
        // Version 1 frames start at a token, version 2 frames at a segment.
        let first = majorVersion == 1 ? tokenCount - pending.tokenIDs.count : sealedTokenCount / segmentTokens - pending.blocks.count
        let parts = pending.sectionBytes()
        let link: IndexChainLink
        if full {
            let fields = IndexFrame.typeFields(prevIndexOffset: 0, tailOffset: tailOffset, first: 0, isFull: true)
            let sources = Array(chain.reversed())
            let blocks = sources.reduce(pending.blocks.count) { $0 + $1.blockCount }
            let blobs = sources.reduce(pending.blobs.count) { $0 + $1.blobCount }
            let tokens = sources.reduce(pending.tokenIDs.count) { $0 + $1.tokenCount }
            let extensions = sources.reduce(pending.extensions.count) { $0 + $1.extensionCount }
            link = try writeStreamedIndex(fields: fields, prelude: indexPrelude(blocks: blocks, blobs: blobs, tokens: tokens, extensions: extensions),
                                          sources: sources, pendingSections: parts, counts: (blocks, blobs, tokens, extensions))
            chain = [link]
        } else {
            let fields = IndexFrame.typeFields(prevIndexOffset: chain[0].offset, tailOffset: tailOffset, first: first, isFull: false)
            var payload = indexPrelude(blocks: pending.blocks.count, blobs: pending.blobs.count, tokens: pending.tokenIDs.count,
                                       extensions: pending.extensions.count)
            for p in parts { payload += p }
            let offset = try writeFrame(tag: .index, fields: fields, payload: payload)
            link = IndexChainLink(offset: offset, isFull: false, sections: sectionRanges(offset: offset, parts: parts),
                                  blockCount: pending.blocks.count, blobCount: pending.blobs.count,
                                  tokenCount: pending.tokenIDs.count, extensionCount: pending.extensions.count, payloadSize: UInt64(payload.count))
            chain.insert(link, at: 0)
        }
        pending.removeAll()
        return link.offset
    }

    private func sectionRanges(offset: UInt64, parts: [[UInt8]]) -> [Range<UInt64>] {
        var at = offset + UInt64(FrameHeader.size + IndexFrame.preludeSize)
        return parts.map { p in
            defer { at += UInt64(p.count) }
            return at ..< at + UInt64(p.count)
        }
    }

    /// A FULL index: each section is the concatenation of that section of every chain frame
    /// (oldest first), read back from the file, then the pending entries. Streamed through a
    /// small buffer, so rewriting the index never holds it in memory.
    private func writeStreamedIndex(fields: FrameHeader.TypeFields, prelude: [UInt8], sources: [IndexChainLink],
                                    pendingSections: [[UInt8]], counts: (Int, Int, Int, Int)) throws -> IndexChainLink {
        try io.padToAlignment()
        let offset = io.end
        try io.appendZeros(FrameHeader.size)
        let hasher = Checksum.Streaming()
        prelude.withUnsafeBytes { hasher.update($0) }
        try io.append(prelude)
        var sections: [Range<UInt64>] = []
        let chunk = 1 << 16
        let scratch = AlignedBytes(count: chunk)
        for s in 0 ..< 5 {
            let start = io.end
            for link in sources {
                var r = link.sections[s]
                while !r.isEmpty {
                    let n = Int(min(UInt64(chunk), UInt64(r.count)))
                    let piece = UnsafeMutableRawBufferPointer(rebasing: scratch.buffer[0 ..< n])
                    try io.read(at: r.lowerBound, into: piece)
                    hasher.update(UnsafeRawBufferPointer(piece))
                    try io.append(UnsafeRawBufferPointer(piece))
                    r = r.lowerBound + UInt64(n) ..< r.upperBound
                }
            }
            pendingSections[s].withUnsafeBytes { hasher.update($0) }
            try io.append(pendingSections[s])
            sections.append(start ..< io.end)
        }
        let length = io.end - offset - UInt64(FrameHeader.size)
        try io.padToAlignment()
        let header = FrameHeader(offset: offset, tag: .index, storedLength: length, rawLength: length,
                                 payloadChecksum: hasher.digest, fields: fields)
        try io.patch(at: offset, header.encoded(salt: salt))
        return IndexChainLink(offset: offset, isFull: true, sections: sections, blockCount: counts.0, blobCount: counts.1,
                              tokenCount: counts.2, extensionCount: counts.3, payloadSize: length)
    }

    // MARK: Frames

    /// Appends one frame (header, payload, padding to the frame grid) and returns its offset.
    @discardableResult
    func writeFrame(tag: FrameTag, flags: UInt32 = 0, fields: FrameHeader.TypeFields = (0, 0, 0),
                    payload: UnsafeRawBufferPointer, rawLength: Int) throws -> UInt64 {
        try io.padToAlignment()
        let offset = io.end
        let header = FrameHeader(offset: offset, tag: tag, flags: flags, storedLength: UInt64(payload.count),
                                 rawLength: UInt64(rawLength), payloadChecksum: Checksum.xxh3(payload), fields: fields)
        try io.append(header.encoded(salt: salt))
        try io.append(payload)
        try io.padToAlignment()
        return offset
    }

    @discardableResult
    func writeFrame(tag: FrameTag, fields: FrameHeader.TypeFields = (0, 0, 0), payload: [UInt8]) throws -> UInt64 {
        try payload.withUnsafeBytes { try writeFrame(tag: tag, fields: fields, payload: $0, rawLength: $0.count) }
    }

    func writeBlob(_ blob: Blob) throws -> UInt64 {
        try blob.validateForWriting()
        return try writeFrame(tag: .blob, fields: blob.typeFields, payload: blob.bytes)
    }
}
