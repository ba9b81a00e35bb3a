// Where a stream's rows are: segment tables (version 2), block offsets, verified block payloads,
// tail runs, and the chunks a token range splits into.

extension KVPackReader {
    // MARK: Segment tables (version 2)

    /// The table of a sealed segment (version 2), its header checked and its payload verified
    /// on first use (Spec/ 8.1).
    func segmentTable(_ segment: Int) throws -> SegmentTable {
        let offset = state.segmentTables[segment]
        guard file.isRemote else { return try verifiedSegmentTable(segment, at: offset) }
        return try readingFrame(at: offset, limit: state.commitOffset) { try verifiedSegmentTable(segment, at: offset) }
    }

    private func verifiedSegmentTable(_ segment: Int, at offset: UInt64) throws -> SegmentTable {
        let bytes = file.bytes
        let verified = tablesVerified.isSet(segment)
        // Verified before, at this same offset (the index is immutable): its header said what the
        // payload is, so it is not decoded again (attention reads a table per segment per head).
        let payloadSize = SegmentTable.payloadSize(streamCount: geometry.streamCount, tokenCount: segmentTokens)
        if verified, offset <= UInt64(bytes.count), Int(offset) + FrameHeader.size <= bytes.count - payloadSize {
            let start = Int(offset) + FrameHeader.size
            return SegmentTable(payload: UnsafeRawBufferPointer(rebasing: bytes[start ..< start + payloadSize]), frameOffset: offset,
                                streamCount: geometry.streamCount, tokenCount: segmentTokens)
        }
        let h = try FrameHeader.decode(bytes, at: offset, limit: state.commitOffset, salt: header.salt, field: "SEGT",
                                       verifyingChecksum: !verified)
        try SegmentTable.check(h, segment: segment, streamCount: geometry.streamCount, tokenCount: segmentTokens)
        if !verified {
            try h.verifyPayload(in: bytes, field: "SEGT")
            tablesVerified.set(segment)
        }
        return SegmentTable(payload: h.storedPayload(in: bytes), frameOffset: offset, streamCount: geometry.streamCount,
                            tokenCount: segmentTokens)
    }

    /// Where the block of (segment, stream) starts: from the version 1 index, or from the
    /// segment's table, whose entries are checked before anything is read at them.
    func blockOffset(segment: Int, stream: Int) throws -> UInt64 {
        if state.major == 1 { return state.blockOffsets[segment * geometry.streamCount + stream] }
        return try segmentTable(segment).blockOffset(stream: stream, manifestEnd: manifestEnd)
    }

    /// Token ids and positions of `range` (checked against the file's tokens).
    public func tokens(_ range: Range<Int>) throws -> (ids: [UInt32], positions: [UInt32]) {
        try checkTokens(range)
        if state.major == 1 { return (Array(state.tokenIDs[range]), Array(state.positions[range])) }
        var ids: [UInt32] = [], positions: [UInt32] = []
        ids.reserveCapacity(range.count)
        positions.reserveCapacity(range.count)
        if file.isRemote { prefetchTables(sealedSegments(range)) }
        try forEachChunk(range) { chunk in
            switch chunk {
            case let .block(segment, local):
                let table = try segmentTable(segment)
                for i in local {
                    ids.append(table.tokenID(i))
                    positions.append(table.position(i))
                }
            case let .tail(piece, local):
                let p = state.runs[piece]
                // Version 2 runs always have a token section (the loader set it).
                let at = p.tokenSection ?? 0, bytes = file.bytes
                for i in local {
                    ids.append(bytes.loadLE(at + 4 * i, as: UInt32.self))
                    positions.append(bytes.loadLE(at + 4 * (p.tokenCount + i), as: UInt32.self))
                }
            }
        }
        return (ids, positions)
    }


    // MARK: Block access

    /// Where the blocks of two streams of one segment start (a key stream and its value
    /// stream): one segment-table read for both.
    func blockOffsets(segment: Int, streams: (Int, Int)) throws -> (UInt64, UInt64) {
        if state.major == 1 {
            let base = segment * geometry.streamCount
            return (state.blockOffsets[base + streams.0], state.blockOffsets[base + streams.1])
        }
        let table = try segmentTable(segment)
        return (try table.blockOffset(stream: streams.0, manifestEnd: manifestEnd), try table.blockOffset(stream: streams.1, manifestEnd: manifestEnd))
    }

    /// The verified payload of a sealed block, decompressed into `workspace` when compressed.
    func blockPayload(segment: Int, stream: Int, workspace: AttentionWorkspace) throws -> UnsafeRawBufferPointer {
        try blockPayload(segment: segment, stream: stream, at: blockOffset(segment: segment, stream: stream), workspace: workspace)
    }

    /// The same for a block whose offset the caller looked up (`blockOffsets`).
    func blockPayload(segment: Int, stream: Int, at offset: UInt64, workspace: AttentionWorkspace) throws -> UnsafeRawBufferPointer {
        // Once per block per pass: a local file goes straight to the bytes.
        guard file.isRemote else { return try verifiedBlockPayload(segment: segment, stream: stream, at: offset, workspace: workspace) }
        return try readingFrame(at: offset, limit: state.commitOffset) {
            try verifiedBlockPayload(segment: segment, stream: stream, at: offset, workspace: workspace)
        }
    }

    private func verifiedBlockPayload(segment: Int, stream: Int, at offset: UInt64, workspace: AttentionWorkspace) throws -> UnsafeRawBufferPointer {
        let slot = segment * geometry.streamCount + stream
        let bytes = file.bytes
        let firstUse = !verified.isSet(slot)
        // An uncompressed block verified before, at this same offset (tables and the index are
        // immutable): its header was checked then, so its payload is where it was. Attention
        // reads two blocks per segment; decoding their headers again cost 4% of int:k2v2.
        if !firstUse, !streamCompressed[stream], offset <= UInt64(bytes.count) {
            let start = Int(offset) + FrameHeader.size, count = streamBlockBytes[stream]
            if start <= bytes.count - count { return UnsafeRawBufferPointer(rebasing: bytes[start ..< start + count]) }
        }
        let h = try FrameHeader.decode(bytes, at: offset, limit: state.commitOffset, salt: header.salt, field: "BLCK",
                                       verifyingChecksum: firstUse)
        let schemeIndex = manifest.scheme(forStream: stream)
        let expected = streamBlockBytes[stream]
        try BlockFrame.check(h, BlockFrame.Expectation(stream: stream, segment: segment, tokenCount: segmentTokens, schemeIndex: schemeIndex,
                                                       rawLength: expected, compressed: streamCompressed[stream]))
        if firstUse { try h.verifyPayload(in: bytes, field: "BLCK") }
        let payload = h.storedPayload(in: bytes)
        // The scheme (an existential: copying it out retains its storage) only where needed.
        if h.isCompressed || firstUse { return try decodedPayload(h, payload, slot: slot, stream: stream, firstUse: firstUse, workspace: workspace) }
        return payload
    }

    /// The rest of `verifiedBlockPayload` for a compressed block or a block's first use.
    private func decodedPayload(_ h: FrameHeader, _ stored: UnsafeRawBufferPointer, slot: Int, stream: Int, firstUse: Bool,
                                workspace: AttentionWorkspace) throws -> UnsafeRawBufferPointer {
        let scheme = streamSchemes[stream]
        let expected = streamBlockBytes[stream]
        var payload = stored
        if h.isCompressed {
            let out = workspace.decompressionBuffer(expected)
            try workspace.decompressor.decompress(payload, into: out, parts: scheme.compressedParts, offset: h.payloadOffset, field: "BLCK.payload")
            payload = UnsafeRawBufferPointer(out)
            if scheme.compressesReorderedBytes {
                let block = workspace.reorderBuffer(expected)
                scheme.blockFromDecompressed(payload, tokens: segmentTokens, into: block)
                payload = UnsafeRawBufferPointer(block)
            }
        }
        if firstUse {
            do {
                try scheme.validate(block: payload, tokens: segmentTokens)
            } catch var e as KVPackError {
                e.offset = e.offset ?? h.payloadOffset
                throw e
            }
            verified.set(slot)
        }
        return payload
    }

    /// One piece of a stream's token range: part of a sealed block or of a tail run.
    enum Chunk {
        case block(segment: Int, local: Range<Int>)
        case tail(piece: Int, local: Range<Int>)
    }

    /// The chunks covering `tokens`, in token order.
    func forEachChunk(_ tokens: Range<Int>, _ body: (Chunk) throws -> Void) rethrows {
        let c = segmentTokens
        let sealedEnd = min(tokens.upperBound, sealedTokenCount)
        // Sealed sink tokens come from the SINK run (runs[0]), not from segment 0's blocks.
        let sinkEnd = state.sink?.tokenCount ?? 0
        var t = tokens.lowerBound
        while t < sealedEnd {
            if t < sinkEnd {
                let end = min(sealedEnd, sinkEnd)
                try body(.tail(piece: 0, local: t ..< end))
                t = end
                continue
            }
            let segment = t / c
            let end = min(sealedEnd, (segment + 1) * c)
            try body(.block(segment: segment, local: (t - segment * c) ..< (end - segment * c)))
            t = end
        }
        let first = state.sink == nil ? 0 : 1
        for (i, piece) in state.tail.enumerated() {
            let lo = max(t, piece.tokenStart), hi = min(tokens.upperBound, piece.tokenStart + piece.tokenCount)
            if lo < hi { try body(.tail(piece: first + i, local: (lo - piece.tokenStart) ..< (hi - piece.tokenStart))) }
        }
    }

    /// Rows of `stream` in run `piece` of `state.runs` (a chunk's piece).
    func tailRows(piece: Int, stream: Int) -> UnsafeRawBufferPointer {
        tailRows(run: state.runs[piece], stream: stream)
    }

    /// Rows of `stream` in `p`, a tail run or the sink run.
    func tailRows(run p: TailRun, stream: Int) -> UnsafeRawBufferPointer {
        let start = p.streamOffsets[stream]
        let width = manifest.schemes[manifest.scheme(forStream: stream)].residualType.byteWidth
        return UnsafeRawBufferPointer(rebasing: file.bytes[start ..< start + p.tokenCount * geometry.headDim * width])
    }
}
