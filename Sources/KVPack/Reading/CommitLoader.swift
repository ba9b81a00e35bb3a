/// What a reader found besides the state it loaded.
public enum RecoveryNote: Sendable, Equatable, CustomStringConvertible {
    /// Bytes after the loaded commit: a writer died (or is still writing) before committing them.
    case uncommittedBytes(after: UInt64, count: UInt64)
    /// A commit frame whose header verified but whose state did not; an older commit was used.
    /// A crash cannot cause this when the writer syncs (it syncs the index before the commit),
    /// so it means corruption, or power loss under `Durability.flush`.
    case skippedCommit(offset: UInt64, reason: KVPackError)
    /// A frame tagged CMIT whose header checksum fails: a torn write of the commit frame itself
    /// (or damage to it); an older commit was used.
    case tornCommit(offset: UInt64, reason: KVPackError)

    public var description: String {
        switch self {
        case let .uncommittedBytes(after, count):
            "\(count) uncommitted bytes after the commit at \(after) were ignored (a writer stopped before committing them)"
        case let .skippedCommit(offset, reason):
            "the commit at \(offset) was skipped: \(reason)"
        case let .tornCommit(offset, reason):
            "the commit frame at \(offset) is torn or damaged and was skipped: \(reason)"
        }
    }
}

/// One run of unsealed rows of every stream, in a DLTA frame.
struct TailPiece: Sendable {
    var frameOffset: UInt64
    var tokenStart: Int
    var tokenCount: Int
    /// Absolute file offset of each stream's rows.
    var streamOffsets: [Int]
    /// Version 2: absolute file offset of the run's token ids (its positions follow them).
    var tokenSection: Int?
}

/// An index frame of the commit's chain, as the writer needs it to rewrite a FULL index.
struct IndexChainLink: Sendable {
    var offset: UInt64
    var isFull: Bool
    /// Absolute file byte ranges of the five sections (blocks, blobs, token ids, positions, extensions).
    var sections: [Range<UInt64>]
    var blockCount: Int
    var blobCount: Int
    var tokenCount: Int
    var extensionCount: Int
    var payloadSize: UInt64
}

/// The committed state of a file: everything a reader needs, validated against the bytes.
struct CommitState: Sendable {
    var major: UInt16
    var commitOffset: UInt64
    var commitSerial: UInt64
    var tokenCount: Int
    /// Version 1: block frame offsets, `[segment * streamCount + stream]`, checked at open.
    /// Empty in version 2, where segment tables list them and are checked on first use.
    var blockOffsets: [UInt64]
    /// Version 2: the segment table (`SEGT`) frame of each sealed segment. Empty in version 1.
    var segmentTables: [UInt64]
    var blobs: [UInt32: Blob]
    var blobFrames: [UInt32: UInt64]
    /// Version 1 only (version 2 reads them from segment tables and tail runs on demand).
    var tokenIDs: [UInt32]
    var positions: [UInt32]
    /// Ordered by tokenStart; tiles [sealedTokens, tokenCount).
    var tail: [TailPiece]
    /// Newest first, ending with the FULL frame.
    var chain: [IndexChainLink]
    /// The `tsel` frame the chain lists, if any (parsed on demand: it is ancillary).
    var selectionOffset: UInt64?
    var notes: [RecoveryNote]

    var commitEnd: UInt64 { commitOffset + UInt64(FrameHeader.size) }
}

/// Finds and loads the newest commit whose state verifies (Spec/: "Opening a file").
struct CommitLoader {
    let file: UnsafeRawBufferPointer
    let major: UInt16
    let salt: UInt64
    let manifest: Manifest
    let manifestEnd: UInt64

    var streamCount: Int { manifest.geometry.streamCount }

    /// Scans back from the end for commit frames; the first whose state loads wins.
    func loadNewest() throws -> CommitState {
        let align = UInt64(FileHeader.frameAlignment)
        let size = UInt64(file.count)
        var notes: [RecoveryNote] = []
        var firstFailure: KVPackError?
        guard size >= manifestEnd + UInt64(FrameHeader.size) else {
            throw KVPackError(.noValidCommit, offset: manifestEnd, field: "CMIT",
                              "the file ends at \(size), before any commit frame")
        }
        var p = (size - UInt64(FrameHeader.size)) / align * align
        let cmit = FrameTag.commit.rawValue
        while p >= manifestEnd {
            if file.loadLE(Int(p), as: UInt32.self) == cmit {
                let header: FrameHeader
                do {
                    header = try FrameHeader.decode(file, at: p, limit: size, salt: salt, field: "CMIT")
                } catch let e as KVPackError {
                    notes.append(.tornCommit(offset: p, reason: e))
                    if firstFailure == nil { firstFailure = e }
                    p -= align
                    continue
                }
                do {
                    var state = try load(commit: header)
                    let end = state.commitEnd
                    if end < size { notes.append(.uncommittedBytes(after: p, count: size - end)) }
                    state.notes = notes
                    return state
                } catch let e as KVPackError {
                    notes.append(.skippedCommit(offset: p, reason: e))
                    if firstFailure == nil { firstFailure = e }
                }
            }
            p -= align
        }
        if let firstFailure { throw firstFailure }
        throw KVPackError(.noValidCommit, offset: manifestEnd, field: "CMIT",
                          "no commit frame between \(manifestEnd) and the end of the file (\(size))")
    }

    func load(commit: FrameHeader) throws -> CommitState {
        let at = commit.offset
        guard commit.storedLength == 0, !commit.isCompressed else {
            throw KVPackError.invalid(at + 8, "CMIT.storedLength", "a commit has no payload, this one claims \(commit.storedLength) bytes")
        }
        let indexOffset = commit.field64(32)
        let tokenCount = Int(commit.field32(40))
        let serial = commit.field64(48)
        guard indexOffset >= manifestEnd, indexOffset < at else {
            throw KVPackError.invalid(at + 32, "CMIT.indexOffset", "\(indexOffset) is not between the manifest end \(manifestEnd) and the commit \(at)")
        }

        // Walk the index chain back to a FULL frame. Offsets strictly decrease and every frame
        // ends before its successor starts, so the walk ends and frames cannot overlap.
        var frames: [IndexFrame] = []
        var offset = indexOffset
        var limit = at
        while true {
            let frame = try IndexFrame.load(file, at: offset, limit: limit, salt: salt, major: major)
            guard frame.header.nextFrameOffset <= limit else {
                throw KVPackError.invalid(offset + 8, "INDX.storedLength", "frame runs past its successor at \(limit)")
            }
            frames.append(frame)
            if frame.isFull { break }
            let prev = frame.prevIndexOffset
            guard prev >= manifestEnd, prev < offset else {
                throw KVPackError.invalid(offset + 32, "INDX.prevIndexOffset",
                                          "\(prev) does not precede this frame (a non-FULL index must name an earlier index frame)")
            }
            limit = offset
            offset = prev
        }

        let segments = tokenCount / manifest.segmentTokens
        // Version 1: token ranges tile [0, tokenCount). Version 2: segment ranges tile
        // [0, segments). The newest frame ends at the end, each older one ends where its
        // successor begins, the FULL one begins at 0 (checked when it loaded).
        var end = major == 1 ? tokenCount : segments
        for f in frames {
            let count = major == 1 ? f.tokenCount : f.blockCount
            guard Int(f.firstToken) + count == end else {
                let first = IndexFrame.firstField(major: major)
                throw KVPackError.invalid(f.header.offset + 48, first.field,
                                          "covers \(first.unit)s \(f.firstToken)..<\(Int(f.firstToken) + count) but must end at \(end)")
            }
            end = Int(f.firstToken)
        }

        var tokenIDs: [UInt32] = []
        var positions: [UInt32] = []
        var blockOffsets: [UInt64] = []
        var segmentTables: [UInt64] = []
        if major == 1 {
            tokenIDs = [UInt32](repeating: 0, count: tokenCount)
            positions = [UInt32](repeating: 0, count: tokenCount)
            for f in frames {
                let first = Int(f.firstToken)
                for i in 0 ..< f.tokenCount {
                    tokenIDs[first + i] = f.tokenID(i)
                    positions[first + i] = f.position(i)
                }
            }
            blockOffsets = try loadBlockEntries(frames, segments: segments)
        } else {
            // Every block is its own frame of at least 64 bytes before the commit: a claim of more
            // blocks than that cannot be true, and would make a reader size its per-block state
            // from a number the bytes do not back.
            let (blocks, overflow) = segments.multipliedReportingOverflow(by: streamCount)
            guard !overflow, blocks <= Int(at / UInt64(FrameHeader.size)) else {
                throw KVPackError.invalid(at + 40, "CMIT.tokenCount",
                                          "\(segments) sealed segments x \(streamCount) streams need more block frames than the \(at) bytes before the commit can hold")
            }
            // The ranges tile [0, segments), so the chain lists exactly `segments` entries.
            segmentTables = [UInt64](repeating: 0, count: segments)
            for f in frames {
                for i in 0 ..< f.blockCount {
                    let e = f.block(i)
                    let entryAt = f.entryOffset(sectionStart: f.blocksStart, i)
                    let segment = Int(f.firstToken) + i
                    guard Int(e.segment) == segment else {
                        throw KVPackError.invalid(entryAt + 8, "INDX.segment.segment",
                                                  "is \(e.segment); entry \(i) of a frame starting at segment \(f.firstToken) names segment \(segment)")
                    }
                    try checkReference(e.frameOffset, before: f.header.offset, at: entryAt, field: "INDX.segment.frameOffset")
                    segmentTables[segment] = e.frameOffset
                }
            }
        }

        var blobs: [UInt32: Blob] = [:]
        var blobFrames: [UInt32: UInt64] = [:]
        var selectionOffset: UInt64?
        for f in frames {
            for i in 0 ..< f.blobCount {
                let e = f.blob(i)
                let entryAt = f.entryOffset(sectionStart: f.blobsStart, i)
                try checkReference(e.frameOffset, before: f.header.offset, at: entryAt, field: "INDX.blob.frameOffset")
                guard blobs[e.blobID] == nil else {
                    throw KVPackError.invalid(entryAt, "INDX.blob.blobID", "blob \(e.blobID) is listed twice")
                }
                let blob = try loadBlob(at: e.frameOffset, limit: f.header.offset)
                guard blob.id == e.blobID else {
                    throw KVPackError.invalid(e.frameOffset + 32, "BLOB.blobID", "is \(blob.id) but the index lists it as \(e.blobID)")
                }
                blobs[e.blobID] = blob
                blobFrames[e.blobID] = e.frameOffset
            }
            for i in 0 ..< f.extensionCount {
                let e = f.extensionEntry(i)
                let entryAt = f.entryOffset(sectionStart: f.extensionsStart, i)
                if e.tag == TokenSelection.tag {
                    try checkReference(e.frameOffset, before: f.header.offset, at: entryAt, field: "INDX.extension.frameOffset")
                    guard selectionOffset == nil else {
                        throw KVPackError.invalid(entryAt, "INDX.extension", "a second tsel frame is listed; a file holds at most one")
                    }
                    selectionOffset = e.frameOffset
                } else if e.tag.isCritical {
                    throw KVPackError(.unknownCriticalFrame, offset: entryAt, field: "INDX.extension.tag",
                                      "the index references a \(e.tag) frame, a critical kind this reader does not know")
                }
                // Other ancillary references are skipped: this reader knows no other ancillary frames.
            }
        }
        for (i, d) in manifest.schemes.enumerated() {
            for id in d.blobIDs where blobs[id] == nil {
                throw KVPackError.invalid(nil, "manifest.schemes[\(i)].blobIDs", "names blob \(id), which the index does not list")
            }
        }

        let tail = try loadTail(newest: frames[0], tokenCount: tokenCount, sealed: segments * manifest.segmentTokens)

        let links = frames.map { f in
            IndexChainLink(offset: f.header.offset, isFull: f.isFull,
                           sections: f.sections.map { f.header.payloadOffset + UInt64($0.lowerBound) ..< f.header.payloadOffset + UInt64($0.upperBound) },
                           blockCount: f.blockCount, blobCount: f.blobCount, tokenCount: f.tokenCount,
                           extensionCount: f.extensionCount, payloadSize: f.header.storedLength)
        }
        return CommitState(major: major, commitOffset: at, commitSerial: serial, tokenCount: tokenCount, blockOffsets: blockOffsets,
                           segmentTables: segmentTables, blobs: blobs, blobFrames: blobFrames, tokenIDs: tokenIDs, positions: positions,
                           tail: tail, chain: links, selectionOffset: selectionOffset, notes: [])
    }

    /// Version 1: the block entries of the whole chain name every (segment, stream) once.
    func loadBlockEntries(_ frames: [IndexFrame], segments: Int) throws -> [UInt64] {
        let (expectedBlocks, overflow) = segments.multipliedReportingOverflow(by: streamCount)
        let listedBlocks = frames.reduce(0) { $0 + $1.blockCount }
        guard !overflow, listedBlocks == expectedBlocks else {
            throw KVPackError.invalid(frames[0].header.payloadOffset, "INDX.blockCount",
                                      "the chain lists \(listedBlocks) blocks; \(segments) sealed segments x \(streamCount) streams need \(expectedBlocks)")
        }
        var blockOffsets = [UInt64](repeating: 0, count: expectedBlocks)
        for f in frames {
            for i in 0 ..< f.blockCount {
                let e = f.block(i)
                let entryAt = f.entryOffset(sectionStart: f.blocksStart, i)
                guard Int(e.segment) < segments, Int(e.stream) < streamCount else {
                    throw KVPackError.invalid(entryAt, "INDX.block.segment",
                                              "segment \(e.segment) stream \(e.stream) out of range (\(segments) sealed segments, \(streamCount) streams)")
                }
                try checkReference(e.frameOffset, before: f.header.offset, at: entryAt, field: "INDX.block.frameOffset")
                let slot = Int(e.segment) * streamCount + Int(e.stream)
                guard blockOffsets[slot] == 0 else {
                    throw KVPackError.invalid(entryAt, "INDX.block", "segment \(e.segment) stream \(e.stream) is listed twice")
                }
                blockOffsets[slot] = e.frameOffset
            }
        }
        return blockOffsets
    }

    /// A referenced frame starts on the grid, after the manifest, and its header ends before
    /// the frame that references it.
    func checkReference(_ offset: UInt64, before limit: UInt64, at entry: UInt64, field: String) throws {
        guard offset % UInt64(FileHeader.frameAlignment) == 0, offset >= manifestEnd,
              offset < limit, limit - offset >= UInt64(FrameHeader.size) else {
            throw KVPackError.invalid(entry, field, "\(offset) is not a frame offset between the manifest end \(manifestEnd) and the referencing frame at \(limit)")
        }
    }

    func loadBlob(at offset: UInt64, limit: UInt64) throws -> Blob {
        let h = try FrameHeader.decode(file, at: offset, limit: limit, salt: salt, field: "BLOB")
        guard h.tag == .blob else { throw KVPackError.invalid(offset, "BLOB.tag", "expected a BLOB frame, found \(h.tag)") }
        guard !h.isCompressed else { throw KVPackError.invalid(offset + 4, "BLOB.flags", "blobs are never compressed in version 1") }
        try h.verifyPayload(in: file, field: "BLOB")
        let kindRaw = h.field16(36)
        guard let kind = Blob.Kind(rawValue: kindRaw) else {
            throw KVPackError.invalid(offset + 36, "BLOB.kind", "is \(kindRaw), not a defined blob kind")
        }
        let typeRaw = h.field8(38)
        guard let type = ElementType(rawValue: typeRaw) else {
            throw KVPackError.invalid(offset + 38, "BLOB.elementType", "is \(typeRaw), not a defined element type")
        }
        let rank = Int(h.field8(39))
        guard (1 ... 4).contains(rank) else { throw KVPackError.invalid(offset + 39, "BLOB.rank", "is \(rank), must be 1...4") }
        var shape: [Int] = []
        var elements: UInt64 = 1
        for i in 0 ..< 4 {
            let dim = UInt64(h.field32(40 + 4 * i))
            if i < rank {
                guard dim >= 1 else { throw KVPackError.invalid(offset + UInt64(40 + 4 * i), "BLOB.shape[\(i)]", "is 0") }
                elements = elements.multipliedReportingOverflow(by: dim).partialValue
                guard elements <= h.storedLength else {
                    throw KVPackError.invalid(offset + UInt64(40 + 4 * i), "BLOB.shape", "describes more elements than the payload holds")
                }
                shape.append(Int(dim))
            } else if dim != 0 {
                throw KVPackError.invalid(offset + UInt64(40 + 4 * i), "BLOB.shape[\(i)]", "is \(dim) beyond rank \(rank); must be 0")
            }
        }
        guard elements * UInt64(type.byteWidth) == h.storedLength else {
            throw KVPackError.invalid(offset + 8, "BLOB.storedLength",
                                      "is \(h.storedLength), shape \(shape) of \(type) needs \(elements * UInt64(type.byteWidth))")
        }
        return Blob(id: h.field32(32), kind: kind, elementType: type, shape: shape, bytes: Array(h.storedPayload(in: file)))
    }

    /// Bytes of one stream's section of a DLTA payload, before padding.
    func sectionBytes(stream: Int, tokens: Int) -> Int {
        let scheme = manifest.schemes[manifest.scheme(forStream: stream)]
        return tokens * manifest.geometry.headDim * scheme.residualType.byteWidth
    }

    func loadTail(newest: IndexFrame, tokenCount: Int, sealed: Int) throws -> [TailPiece] {
        let tailAt = newest.header.offset + 40
        var offset = newest.tailOffset
        if tokenCount == sealed {
            guard offset == 0 else {
                throw KVPackError.invalid(tailAt, "INDX.tailOffset", "is \(offset) but every committed token is sealed; must be 0")
            }
            return []
        }
        var pieces: [TailPiece] = []
        var end = tokenCount
        var limit = newest.header.offset
        while true {
            try checkReference(offset, before: limit, at: tailAt, field: "INDX.tailOffset")
            let h = try FrameHeader.decode(file, at: offset, limit: limit, salt: salt, field: "DLTA")
            guard h.tag == .delta else { throw KVPackError.invalid(offset, "DLTA.tag", "expected a DLTA frame, found \(h.tag)") }
            guard !h.isCompressed else { throw KVPackError.invalid(offset + 4, "DLTA.flags", "tail rows are never compressed in version 1") }
            let start = Int(h.field32(32))
            let count = Int(h.field32(36))
            let prev = h.field64(40)
            let streams = Int(h.field32(48))
            guard count >= 1, start + count == end, start >= sealed else {
                throw KVPackError.invalid(offset + 32, "DLTA.tokenStart",
                                          "covers \(start)..<\(start + count); the tail needs a run ending at \(end) within \(sealed)..<\(tokenCount)")
            }
            guard streams == streamCount else {
                throw KVPackError.invalid(offset + 48, "DLTA.streamCount", "is \(streams), the manifest has \(streamCount) streams")
            }
            // Every section pads to at least 64 bytes: check the claim before allocating per stream.
            guard h.storedLength / UInt64(FileHeader.frameAlignment) >= UInt64(streamCount) else {
                throw KVPackError.invalid(offset + 8, "DLTA.storedLength",
                                          "\(h.storedLength) bytes cannot hold sections for \(streamCount) streams")
            }
            var streamOffsets: [Int] = []
            streamOffsets.reserveCapacity(streamCount)
            var cursor = Int(h.payloadOffset)
            // Version 2 runs start with their tokens: ids, then positions, padded to 64 bytes.
            let tokenSection = major == 1 ? nil : cursor
            if major != 1 { cursor += roundUp(8 * count, to: FileHeader.frameAlignment) }
            for s in 0 ..< streamCount {
                streamOffsets.append(cursor)
                cursor += roundUp(sectionBytes(stream: s, tokens: count), to: FileHeader.frameAlignment)
            }
            guard UInt64(cursor) - h.payloadOffset == h.storedLength else {
                throw KVPackError.invalid(offset + 8, "DLTA.storedLength",
                                          "is \(h.storedLength); \(count) rows of \(streamCount) streams need \(UInt64(cursor) - h.payloadOffset)")
            }
            try h.verifyPayload(in: file, field: "DLTA")
            pieces.append(TailPiece(frameOffset: offset, tokenStart: start, tokenCount: count, streamOffsets: streamOffsets,
                                    tokenSection: tokenSection))
            if start == sealed { break }
            end = start
            limit = offset
            offset = prev
        }
        return pieces.reversed()
    }
}
