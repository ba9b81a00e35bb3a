// Sealing a segment (its blocks and, in version 2, its table) and writing tail runs: the frames
// a writer emits as tokens arrive. Each frame's bytes are its Format/ file's; this file decides
// when they are written.

extension KVPackWriter {
    func sealSegment() throws {
        if sealedTokenCount == 0, manifest.sinkTokens > 0 {
            // The sink rows, lossless, before segment 0's blocks take them in encoded form; the
            // next index lists the frame (Spec 6.3).
            let offset = try writeRun(tokens: 0 ..< manifest.sinkTokens, tag: .sink, previous: 0)
            pending.extensions.append(ExtensionEntry(frameOffset: offset, tag: .sink))
            // Readers never read the sink rows of segment 0's blocks: encode copies of the first
            // other row there, so the sinks' outliers (attention sinks have the largest keys and
            // values) do not stretch the ranges the segment's other tokens are coded with.
            let k = manifest.sinkTokens
            if k < segmentTokens {
                for stream in 0 ..< streamCount {
                    let first = openRow(stream: stream, row: k)
                    for row in 0 ..< k { openRow(stream: stream, row: row).update(from: first, count: dim) }
                }
            }
        }
        try writeSegment { stream, raw in
            streamSchemes[stream].encode(rows: openRow(stream: stream, row: 0), tokens: segmentTokens, into: raw)
        }
    }

    /// Writes the open segment's blocks, each payload filled by `fill(stream, buffer)`, and its
    /// table; the segment is then sealed.
    private func writeSegment(_ fill: (Int, UnsafeMutableRawBufferPointer) throws -> Void) throws {
        let segment = sealedTokenCount / segmentTokens
        var blockOffsets: [UInt64] = []
        if majorVersion >= 2 { blockOffsets.reserveCapacity(streamCount) }
        for stream in 0 ..< streamCount {
            let scheme = streamSchemes[stream]
            let size = scheme.encodedBlockSize(tokens: segmentTokens)
            encodeBuffer.reserve(size)
            let raw = UnsafeMutableRawBufferPointer(start: encodeBuffer.pointer, count: size)
            try fill(stream, raw)
            let fields = BlockFrame(stream: stream, segment: segment, tokenCount: segmentTokens,
                                    schemeIndex: manifest.scheme(forStream: stream)).typeFields
            let offset: UInt64
            if scheme.compressesBlocks {
                let compressor = compressors[scheme.compressionLevel] ?? {
                    let c = Zstd.Compressor(level: scheme.compressionLevel)
                    compressors[scheme.compressionLevel] = c
                    return c
                }()
                if scheme.compressesReorderedBytes {
                    // Reordered (byte planes), then one zstd frame per equal part, concatenated.
                    planeBuffer.reserve(size)
                    let planes = UnsafeMutableRawBufferPointer(start: planeBuffer.pointer, count: size)
                    scheme.bytesToCompress(UnsafeRawBufferPointer(raw), tokens: segmentTokens, into: planes)
                    let parts = scheme.compressedParts, share = size / parts
                    framesBuffer.removeAll(keepingCapacity: true)
                    for i in 0 ..< parts {
                        framesBuffer += try compressor.compress(UnsafeRawBufferPointer(rebasing: planes[i * share ..< (i + 1) * share]))
                    }
                    offset = try framesBuffer.withUnsafeBytes {
                        try writeFrame(tag: .block, flags: FrameHeader.compressedFlag, fields: fields, payload: $0, rawLength: size)
                    }
                } else {
                    let packed = try compressor.compress(UnsafeRawBufferPointer(raw))
                    offset = try writeFrame(tag: .block, flags: FrameHeader.compressedFlag, fields: fields, payload: packed, rawLength: size)
                }
            } else {
                offset = try writeFrame(tag: .block, fields: fields, payload: UnsafeRawBufferPointer(raw), rawLength: size)
            }
            if majorVersion == 1 {
                pending.blocks.append(BlockEntry(frameOffset: offset, segment: UInt32(segment), stream: UInt32(stream)))
            } else {
                blockOffsets.append(offset)
            }
        }
        if majorVersion >= 2 {
            // The segment's table (Spec/ 8.1): where each stream's block is, and its tokens, so a
            // reader finds any of them without reading the index whole.
            let table = try writeFrame(tag: .segmentTable,
                                       fields: SegmentTable.typeFields(segment: segment, streamCount: streamCount, tokenCount: segmentTokens),
                                       payload: SegmentTable.encodePayload(blockOffsets: blockOffsets, tokenIDs: openTokenIDs[..<segmentTokens],
                                                                           positions: openPositions[..<segmentTokens]))
            pending.blocks.append(BlockEntry(frameOffset: table, segment: UInt32(segment), stream: 0))
            openTokenIDs.removeFirst(segmentTokens)
            openPositions.removeFirst(segmentTokens)
        }
        sealedTokenCount += segmentTokens
        if manifest.windowTokens == 0 {
            persistedTailEnd = sealedTokenCount
            deltaHead = 0
        } else {
            // The window's rows move to the front of the open rows; their tail runs stay valid
            // (runs never cross a segment boundary, so the newest run's chain reaches one that
            // starts exactly at the new sealed end).
            persistedTailEnd = max(persistedTailEnd, sealedTokenCount)
            let kept = tokenCount - sealedTokenCount
            for stream in 0 ..< streamCount {
                openRow(stream: stream, row: 0).update(from: openRow(stream: stream, row: segmentTokens), count: kept * dim)
            }
        }
        options.onSeal?(tokenCount)
    }

    /// Appends one whole segment of `segmentTokens` tokens whose blocks the caller encoded (codes
    /// copied from another format, such as an mlx cache's quantized rows, so nothing is
    /// requantized): `block(stream)` returns each stream's payload, exactly the scheme's block
    /// size. Every payload is checked (`validate`) before anything is written. The open segment
    /// must be empty (the token count a multiple of segmentTokens). Positions default to
    /// consecutive ones.
    public func appendEncodedSegment(tokenIDs: [UInt32], positions: [UInt32]? = nil, block: (Int) throws -> [UInt8]) throws {
        guard !closed else { throw KVPackError.argument("the writer is closed") }
        let c = segmentTokens
        guard !manifest.keepsLosslessTokens else {
            throw KVPackError.argument("encoded segments cannot be appended to a file that keeps a lossless window or sinks (those rows must stay unencoded)")
        }
        guard tokenCount == sealedTokenCount else {
            throw KVPackError.argument("encoded segments start at a segment boundary; \(tokenCount - sealedTokenCount) tokens are open")
        }
        guard tokenIDs.count == c, positions.map({ $0.count == c }) ?? true else {
            throw KVPackError.argument("an encoded segment holds \(c) tokens; \(tokenIDs.count) ids, \(positions?.count ?? c) positions given")
        }
        guard tokenCount + c <= Limits.maxTokens else { throw KVPackError.argument("a file holds at most \(Limits.maxTokens) tokens") }
        var payloads: [[UInt8]] = []
        payloads.reserveCapacity(streamCount)
        for stream in 0 ..< streamCount {
            let bytes = try block(stream)
            let scheme = streamSchemes[stream]
            let size = scheme.encodedBlockSize(tokens: c)
            guard bytes.count == size else {
                throw KVPackError.argument("stream \(stream): an encoded block of \(scheme.specString) is \(size) bytes, \(bytes.count) given")
            }
            try bytes.withUnsafeBytes { try scheme.validate(block: $0, tokens: c) }
            payloads.append(bytes)
        }
        for i in 0 ..< c { recordToken(tokenIDs[i], position: positions?[i] ?? UInt32(tokenCount + i)) }
        tokenCount += c
        try writeSegment { stream, raw in raw.copyBytes(from: payloads[stream]) }
        if pending.entryCount >= options.maxPendingIndexEntries { try writeIndex(tailOffset: 0) }
    }

    /// Writes the open rows not yet in any tail run: tokens [persistedTailEnd, tokenCount), one
    /// run per segment they touch (a run never crosses a segment boundary: with a lossless window
    /// the tail spans segments, and a reader's walk back from the newest run must stop at a run
    /// that starts exactly where the sealed tokens end).
    func writeDelta() throws {
        while persistedTailEnd < tokenCount {
            let end = min(tokenCount, (persistedTailEnd / segmentTokens + 1) * segmentTokens)
            deltaHead = try writeRun(tokens: persistedTailEnd ..< end, tag: .delta, previous: deltaHead)
            persistedTailEnd = end
        }
    }

    /// Writes open rows `tokens` as a run (`DLTA`, or the same layout tagged `SINK`); returns its offset.
    private func writeRun(tokens: Range<Int>, tag: FrameTag, previous: UInt64) throws -> UInt64 {
        let first = tokens.lowerBound - sealedTokenCount
        let count = tokens.count
        let layout = TailRun.Layout(manifest: manifest, major: majorVersion, tokenCount: count)
        tailBuffer.reserve(layout.payloadSize)
        let base = tailBuffer.pointer
        base.initializeMemory(as: UInt8.self, repeating: 0, count: layout.payloadSize)
        if layout.tokenBytes > 0 {
            TailRun.writeTokenSection(into: base, ids: openTokenIDs[first ..< first + count], positions: openPositions[first ..< first + count])
        }
        for stream in 0 ..< streamCount {
            let type = manifest.schemes[manifest.scheme(forStream: stream)].residualType
            RowKernels.narrow(openRow(stream: stream, row: first), to: type, base + layout.streamOffsets[stream], count * dim)
        }
        let fields = TailRun.typeFields(tokenStart: tokens.lowerBound, tokenCount: count, prevDeltaOffset: previous, streamCount: streamCount)
        return try writeFrame(tag: tag, fields: fields, payload: UnsafeRawBufferPointer(start: base, count: layout.payloadSize),
                              rawLength: layout.payloadSize)
    }
}
