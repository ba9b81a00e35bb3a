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
    var tail: [TailRun]
    /// The `SINK` frame: rows of tokens [0, sinkTokens), once segment 0 is sealed (Spec 6.3).
    var sink: TailRun?
    /// The runs chunks name (`Chunk.tail(piece:)`): the sink run, if any, then the tail.
    var runs: [TailRun]
    /// Newest first, ending with the FULL frame.
    var chain: [IndexChainLink]
    /// The `tsel` frame the chain lists, if any (parsed on demand: it is ancillary).
    var selectionOffset: UInt64?
    /// The `note` frames the chain lists, in file order (parsed on demand: they are ancillary).
    var metadataNotes: [UInt64]
    var notes: [RecoveryNote]

    var commitEnd: UInt64 { commitOffset + UInt64(FrameHeader.size) }
}

/// Finds and loads the newest commit whose state verifies (Spec/: "Opening a file").
struct CommitLoader {
    /// The file; its mapping is `file`, read only at and before a commit that verified.
    let source: MappedFile
    var file: UnsafeRawBufferPointer { source.bytes }
    let major: UInt16
    let salt: UInt64
    let manifest: Manifest
    let manifestEnd: UInt64

    var streamCount: Int { manifest.geometry.streamCount }

    /// Scans back from the end for commit frames; the first whose state loads wins.
    ///
    /// The scan reads tags and commit headers through `source.copyBytes` (`pread`), not the
    /// mapping: bytes after the newest commit are uncommitted, and a writer resuming the file
    /// truncates them (Spec 13.3) at any moment, which would make a mapped page wholly past the
    /// new end raise SIGBUS. A commit frame whose header verifies is committed and is never
    /// truncated, so the state it names (all before it) is read from the mapping.
    func loadNewest() throws -> CommitState {
        let align = UInt64(FileHeader.frameAlignment)
        let size = UInt64(file.count)
        let headerSize = UInt64(FrameHeader.size)
        var notes: [RecoveryNote] = []
        var firstFailure: KVPackError?
        guard size >= manifestEnd + headerSize else {
            throw KVPackError(.noValidCommit, offset: manifestEnd, field: "CMIT",
                              "the file ends at \(size), before any commit frame")
        }
        // A window of copied bytes, [windowStart, windowStart + windowCount), refilled downwards.
        var window = [UInt8](repeating: 0, count: 64 * 1024)
        var windowStart = UInt64.max, windowCount: UInt64 = 0
        var p = (size - headerSize) / align * align
        let cmit = FrameTag.commit.rawValue
        while p >= manifestEnd {
            defer { p -= align }
            if p < windowStart {
                let start = max(manifestEnd, p + headerSize > UInt64(window.count) ? p + headerSize - UInt64(window.count) : 0)
                try source.ensure(Int(start) ..< Int(p + headerSize))
                windowCount = UInt64(window.withUnsafeMutableBytes {
                    source.copyBytes(at: Int(start), into: UnsafeMutableRawBufferPointer(rebasing: $0[0 ..< Int(p + headerSize - start)]))
                })
                windowStart = start
            }
            // Past the end of a file a resuming writer has just truncated: nothing to find there.
            guard p + headerSize <= windowStart + windowCount else { continue }
            let at = Int(p - windowStart)
            let decoded: FrameHeader?
            do {
                decoded = try window.withUnsafeBytes { w -> FrameHeader? in
                    let h = UnsafeRawBufferPointer(rebasing: w[at ..< at + FrameHeader.size])
                    guard h.loadLE(0, as: UInt32.self) == cmit else { return nil }
                    return try FrameHeader.decode(header: h, at: p, end: size, salt: salt, field: "CMIT")
                }
            } catch let e as KVPackError {
                notes.append(.tornCommit(offset: p, reason: e))
                if firstFailure == nil { firstFailure = e }
                continue
            }
            guard let header = decoded else { continue }
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
        if let firstFailure { throw firstFailure }
        throw KVPackError(.noValidCommit, offset: manifestEnd, field: "CMIT",
                          "no commit frame between \(manifestEnd) and the end of the file (\(size))")
    }

    /// The state a commit names, every reference and count checked against the bytes. Each
    /// step below throws the error of the first rule the file breaks (offset and field).
    func load(commit: FrameHeader) throws -> CommitState {
        let at = commit.offset
        let frame = try CommitFrame.decode(commit, manifestEnd: manifestEnd)
        let tokenCount = frame.tokenCount
        let frames = try indexChain(newest: frame.indexOffset, commit: at)
        let segments = manifest.sealedTokens(of: tokenCount) / manifest.segmentTokens
        try checkTiling(frames, tokenCount: tokenCount, segments: segments)

        var tokenIDs: [UInt32] = [], positions: [UInt32] = []
        var blockOffsets: [UInt64] = [], segmentTables: [UInt64] = []
        if major == 1 {
            (tokenIDs, positions) = tokens(frames, tokenCount: tokenCount)
            blockOffsets = try loadBlockEntries(frames, segments: segments)
        } else {
            segmentTables = try loadSegmentEntries(frames, segments: segments, commit: at)
        }
        let (blobs, blobFrames, selectionOffset, metadataNotes, sinkEntry) = try loadBlobsAndExtensions(frames)
        let tail = try loadTail(newest: frames[0], tokenCount: tokenCount, sealed: segments * manifest.segmentTokens)
        let sink = try loadSink(sinkEntry, segments: segments, tokenCount: tokenCount, commit: at)
        return CommitState(major: major, commitOffset: at, commitSerial: frame.serial, tokenCount: tokenCount, blockOffsets: blockOffsets,
                           segmentTables: segmentTables, blobs: blobs, blobFrames: blobFrames, tokenIDs: tokenIDs, positions: positions,
                           tail: tail, sink: sink, runs: (sink.map { [$0] } ?? []) + tail,
                           chain: frames.map(IndexChainLink.init(frame:)), selectionOffset: selectionOffset, metadataNotes: metadataNotes, notes: [])
    }

    /// The index chain from the commit's index back to a FULL frame, newest first. Offsets
    /// strictly decrease and every frame ends before its successor starts, so the walk ends and
    /// frames cannot overlap.
    func indexChain(newest: UInt64, commit: UInt64) throws -> [IndexFrame] {
        var frames: [IndexFrame] = []
        var offset = newest
        var limit = commit
        while true {
            try source.ensureFrame(at: offset, limit: limit, salt: salt)
            let frame = try IndexFrame.load(file, at: offset, limit: limit, salt: salt, major: major)
            guard frame.header.nextFrameOffset <= limit else {
                throw KVPackError.invalid(offset + 8, "INDX.storedLength", "frame runs past its successor at \(limit)")
            }
            frames.append(frame)
            if frame.isFull { return frames }
            let prev = frame.prevIndexOffset
            guard prev >= manifestEnd, prev < offset else {
                throw KVPackError.invalid(offset + 32, "INDX.prevIndexOffset",
                                          "\(prev) does not precede this frame (a non-FULL index must name an earlier index frame)")
            }
            limit = offset
            offset = prev
        }
    }

    /// Version 1: token ranges tile [0, tokenCount). Version 2: segment ranges tile
    /// [0, segments). The newest frame ends at the end, each older one ends where its successor
    /// begins, the FULL one begins at 0 (checked when it loaded).
    func checkTiling(_ frames: [IndexFrame], tokenCount: Int, segments: Int) throws {
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
    }

    /// Version 1: every token's id and position, from the chain (which tiles them).
    func tokens(_ frames: [IndexFrame], tokenCount: Int) -> (ids: [UInt32], positions: [UInt32]) {
        var ids = [UInt32](repeating: 0, count: tokenCount)
        var positions = [UInt32](repeating: 0, count: tokenCount)
        for f in frames {
            let first = Int(f.firstToken)
            for i in 0 ..< f.tokenCount {
                ids[first + i] = f.tokenID(i)
                positions[first + i] = f.position(i)
            }
        }
        return (ids, positions)
    }

    /// Version 2: the segment table of each sealed segment (the chain tiles [0, segments), so it
    /// lists exactly one per segment, in order).
    func loadSegmentEntries(_ frames: [IndexFrame], segments: Int, commit at: UInt64) throws -> [UInt64] {
        // Every block is its own frame of at least 64 bytes before the commit: a claim of more
        // blocks than that cannot be true, and would make a reader size its per-block state
        // from a number the bytes do not back.
        let (blocks, overflow) = segments.multipliedReportingOverflow(by: streamCount)
        guard !overflow, blocks <= Int(at / UInt64(FrameHeader.size)) else {
            throw KVPackError.invalid(at + 40, "CMIT.tokenCount",
                                      "\(segments) sealed segments x \(streamCount) streams need more block frames than the \(at) bytes before the commit can hold")
        }
        var segmentTables = [UInt64](repeating: 0, count: segments)
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
        return segmentTables
    }

    /// The blobs the chain lists (each read and checked now: schemes need them to open), and
    /// the token selection and metadata notes it references; an unknown critical extension is
    /// an error.
    func loadBlobsAndExtensions(_ frames: [IndexFrame]) throws -> (blobs: [UInt32: Blob], frames: [UInt32: UInt64], selection: UInt64?,
                                                                    notes: [UInt64], sink: (offset: UInt64, entryAt: UInt64)?) {
        var blobs: [UInt32: Blob] = [:]
        var blobFrames: [UInt32: UInt64] = [:]
        var selectionOffset: UInt64?
        var sink: (offset: UInt64, entryAt: UInt64)?
        var notes: Set<UInt64> = []
        for f in frames {
            for i in 0 ..< f.blobCount {
                let e = f.blob(i)
                let entryAt = f.entryOffset(sectionStart: f.blobsStart, i)
                try checkReference(e.frameOffset, before: f.header.offset, at: entryAt, field: "INDX.blob.frameOffset")
                guard blobs[e.blobID] == nil else {
                    throw KVPackError.invalid(entryAt, "INDX.blob.blobID", "blob \(e.blobID) is listed twice")
                }
                try source.ensureFrame(at: e.frameOffset, limit: f.header.offset, salt: salt)
                let blob = try Blob.decode(file, at: e.frameOffset, limit: f.header.offset, salt: salt)
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
                } else if e.tag == MetadataNote.tag {
                    try checkReference(e.frameOffset, before: f.header.offset, at: entryAt, field: "INDX.extension.frameOffset")
                    guard notes.insert(e.frameOffset).inserted else {
                        throw KVPackError.invalid(entryAt, "INDX.extension", "the note frame at \(e.frameOffset) is listed twice")
                    }
                } else if e.tag == .sink {
                    try checkReference(e.frameOffset, before: f.header.offset, at: entryAt, field: "INDX.extension.frameOffset")
                    guard sink == nil else {
                        throw KVPackError.invalid(entryAt, "INDX.extension", "a second SINK frame is listed; a file holds at most one")
                    }
                    sink = (e.frameOffset, entryAt)
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
        return (blobs, blobFrames, selectionOffset, notes.sorted(), sink)
    }

    /// The `SINK` frame (Spec 6.3): listed exactly when the manifest keeps sinks and segment 0
    /// is sealed; a run of tokens [0, sinkTokens).
    func loadSink(_ entry: (offset: UInt64, entryAt: UInt64)?, segments: Int, tokenCount: Int, commit: UInt64) throws -> TailRun? {
        let expected = manifest.sinkTokens > 0 && segments > 0
        guard let entry else {
            if expected {
                throw KVPackError.invalid(nil, "INDX.extension",
                                          "the manifest keeps \(manifest.sinkTokens) sink tokens and segment 0 is sealed, but no SINK frame is listed")
            }
            return nil
        }
        guard expected else {
            throw KVPackError.invalid(entry.entryAt, "INDX.extension",
                                      "a SINK frame is listed, but the manifest keeps \(manifest.sinkTokens) sink tokens and \(segments) segments are sealed")
        }
        try source.ensureFrame(at: entry.offset, limit: commit, salt: salt)
        let h = try FrameHeader.decode(file, at: entry.offset, limit: commit, salt: salt, field: "SINK")
        return try TailRun.decode(h, in: file, manifest: manifest, major: major, end: manifest.sinkTokens, sealed: 0,
                                  committed: tokenCount, tag: .sink)
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

    func loadTail(newest: IndexFrame, tokenCount: Int, sealed: Int) throws -> [TailRun] {
        let tailAt = newest.header.offset + 40
        var offset = newest.tailOffset
        if tokenCount == sealed {
            guard offset == 0 else {
                throw KVPackError.invalid(tailAt, "INDX.tailOffset", "is \(offset) but every committed token is sealed; must be 0")
            }
            return []
        }
        var pieces: [TailRun] = []
        var end = tokenCount
        var limit = newest.header.offset
        while true {
            try checkReference(offset, before: limit, at: tailAt, field: "INDX.tailOffset")
            try source.ensureFrame(at: offset, limit: limit, salt: salt)
            let h = try FrameHeader.decode(file, at: offset, limit: limit, salt: salt, field: "DLTA")
            let run = try TailRun.decode(h, in: file, manifest: manifest, major: major, end: end, sealed: sealed, committed: tokenCount)
            pieces.append(run)
            let start = run.tokenStart, prev = run.prevDeltaOffset
            if start == sealed { break }
            end = start
            limit = offset
            offset = prev
        }
        return pieces.reversed()
    }
}
