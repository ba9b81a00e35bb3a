/// Appends tokens to a KVPack file as a model produces them.
///
/// Rows collect in one open block per stream; when a segment fills, every stream's block is
/// encoded and written. `commit()` writes the rows not yet in a block (a DLTA frame), an index
/// frame and a commit frame: a reader, or a writer reopening the file after a crash, sees
/// exactly the tokens of the last commit. Memory: the open blocks plus the index entries since
/// the last index frame (bounded by `maxPendingIndexEntries`), never the file.
public final class KVPackWriter {
    public let path: String
    public let manifest: Manifest
    let options: WriterOptions
    let salt: UInt64
    /// The codec of each scheme index, for key streams and for value streams (built with each
    /// role's range fit; the same instances when the fits agree).
    let schemes: (key: [any KVScheme], value: [any KVScheme])
    /// The codec of each stream (`schemes[index].forKVHead(head)`).
    let streamSchemes: [any KVScheme]
    let io: FileAppender
    /// The version in the file header.
    let majorVersion: UInt16
    let minorVersion: UInt16

    let streamCount: Int
    let dim: Int
    let segmentTokens: Int
    /// Rows kept open per stream: a segment plus the lossless window (Spec 6.1).
    let openCapacity: Int
    /// streams x openCapacity x dim floats: every stream's rows not sealed yet.
    let openRows: AlignedFloats
    var encodeBuffer = GrowableBytes()
    /// A block's bytes reordered for compression (raw's byte planes).
    var planeBuffer = GrowableBytes()
    var framesBuffer: [UInt8] = []
    var tailBuffer = GrowableBytes()
    var compressors: [Int32: Zstd.Compressor] = [:]

    public internal(set) var tokenCount = 0
    public internal(set) var committedTokenCount = 0
    public internal(set) var sealedTokenCount = 0
    /// Tail rows of the current segment already written in DLTA frames end here.
    var persistedTailEnd = 0
    var deltaHead: UInt64 = 0
    var commitSerial: UInt64 = 0
    var pending = PendingIndex()
    /// Version 2: ids and positions of the tokens of the open segment (they go to its segment
    /// table when it seals, and to tail runs before that).
    var openTokenIDs: [UInt32] = []
    var openPositions: [UInt32] = []
    /// Index frames since (and including) the last FULL one, newest first.
    var chain: [IndexChainLink] = []
    var closed = false
    var hasSelection = false

    public var isDirty: Bool { tokenCount != committedTokenCount || !pending.isEmpty }

    private init(path: String, manifest: Manifest, options: WriterOptions, salt: UInt64, majorVersion: UInt16, minorVersion: UInt16,
                 schemes: (key: [any KVScheme], value: [any KVScheme]), io: FileAppender) {
        self.path = path
        self.majorVersion = majorVersion
        self.minorVersion = minorVersion
        self.manifest = manifest
        self.options = options
        self.salt = salt
        self.schemes = schemes
        let g = manifest.geometry
        streamSchemes = (0 ..< g.streamCount).map { stream in
            let id = g.streamID(stream)
            return (id.kind == .key ? schemes.key : schemes.value)[manifest.scheme(forStream: stream)].forKVHead(id.kvHead)
        }
        self.io = io
        streamCount = manifest.geometry.streamCount
        dim = manifest.geometry.headDim
        segmentTokens = manifest.segmentTokens
        openCapacity = manifest.segmentTokens + manifest.windowTokens
        openRows = AlignedFloats(count: streamCount * openCapacity * dim)
        if majorVersion >= 2 {
            openTokenIDs.reserveCapacity(openCapacity)
            openPositions.reserveCapacity(openCapacity)
        }
    }

    // MARK: Create and resume

    /// Creates a file from a manifest you built, embedding `blobs` (every blob its schemes name).
    /// It is written under a temporary name and renamed into place once its first, empty commit
    /// is durable. To create a file from a scheme spec, use `create(path:file:options:)`.
    public static func create(path: String, manifest: Manifest, blobs: [Blob] = [], options: WriterOptions = WriterOptions()) throws -> KVPackWriter {
        try manifest.validateForWriting()
        guard FileHeader.supportedMajors.contains(options.majorVersion) else {
            throw KVPackError.argument("format version \(options.majorVersion) is not one this library writes (\(FileHeader.supportedMajors))")
        }
        let schemes = try makeSchemes(manifest: manifest, blobs: blobs, options: options)
        let replacement = try AtomicReplacement(destination: path, overwrite: options.overwrite, label: "tmp")
        let io = try FileAppender.open(path: replacement.temporaryPath, create: true)
        let salt = options.salt ?? UInt64.random(in: 1 ... .max)
        let major = options.majorVersion
        if major == 1, manifest.keepsLosslessTokens {
            throw KVPackError.argument("a lossless window or sinks (window:N, sinks:N) need format 2.3; version 1 cannot hold them")
        }
        if major == 1, manifest.requiredMinorVersion2 > 0 {
            throw KVPackError.argument("int codes with signed scales (copied from an mlx cache) and raw byte planes need format 2.\(manifest.requiredMinorVersion2); version 1 cannot hold them")
        }
        let minor = max(major == 1 ? manifest.requiredMinorVersion : manifest.requiredMinorVersion2, options.features.requiredMinor(major: major))
        let writer = KVPackWriter(path: path, manifest: manifest, options: options, salt: salt, majorVersion: major, minorVersion: minor,
                                  schemes: schemes, io: io)
        do {
            try io.append(FileHeader(major: major, minor: minor, salt: salt).encoded())
            try writer.writeFrame(tag: .manifest, payload: manifest.encoded())
            for blob in blobs {
                let offset = try writer.writeBlob(blob)
                writer.pending.blobs.append(BlobEntry(frameOffset: offset, blobID: blob.id))
            }
            try writer.commit(force: true)
            try io.sync()
            try replacement.commit()
        } catch {
            replacement.discard()
            throw error
        }
        return writer
    }

    /// Creates a file for `file`'s model and planned schemes: its manifest and blobs, its
    /// segment size (the spec's residual window, else the one asked for). The one way the tools
    /// turn a scheme spec into a file.
    public static func create(path: String, file: NewFile, options: WriterOptions = WriterOptions()) throws -> KVPackWriter {
        let (manifest, blobs) = try file.manifest()
        return try create(path: path, manifest: manifest, blobs: blobs, options: file.writerOptions(options))
    }

    /// Encoders for key and value streams, with the options' range fit for each role.
    static func makeSchemes(manifest: Manifest, blobs: [Blob], options: WriterOptions,
                            reusing decoders: [any KVScheme]? = nil) throws -> (key: [any KVScheme], value: [any KVScheme]) {
        func make(_ fit: RangeFit) throws -> [any KVScheme] {
            if fit == .minMax, let decoders { return decoders }   // a reader's instances have the default fit
            return try makeSchemes(manifest: manifest, blobs: blobs, rangeFit: fit)
        }
        let key = try make(options.keyRangeFit)
        return (key, options.valueRangeFit == options.keyRangeFit ? key : try make(options.valueRangeFit))
    }

    static func makeSchemes(manifest: Manifest, blobs: [Blob], rangeFit: RangeFit) throws -> [any KVScheme] {
        var byID: [UInt32: Blob] = [:]
        for b in blobs {
            guard byID.updateValue(b, forKey: b.id) == nil else { throw KVPackError.argument("blob id \(b.id) is used twice") }
        }
        return try manifest.schemes.enumerated().map { i, d in
            let named = try d.blobIDs.map { id in
                guard let b = byID[id] else { throw KVPackError.argument("scheme \(i) names blob \(id), which was not supplied") }
                return b
            }
            do {
                return try SchemeRegistry.make(descriptor: d, context: SchemeContext(manifest: manifest, scheme: i, blobs: named, rangeFit: rangeFit))
            } catch var e as KVPackError {
                // No file yet: a parameter's index (the error's offset) names no byte of one.
                e.message += e.offset.map { " (parameter byte \($0))" } ?? ""
                e.offset = nil
                e.nest(under: "manifest.schemes[\(i)]")
                throw e
            }
        }
    }

    /// Reopens a file to keep appending: takes the writer lock, then reads the committed state.
    /// Bytes after the last commit (a crashed writer's) are truncated away; the tail rows are
    /// reloaded into the open blocks.
    public static func resume(path: String, options: WriterOptions = WriterOptions()) throws -> KVPackWriter {
        let io = try FileAppender.open(path: path, create: false)
        return try resume(io: io, reader: KVPackReader(path: path), options: options)
    }

    /// Keeps appending to the file `reader` has open, from the commit it loaded, without mapping
    /// the file again (a resumed session attends through the same reader). The reader was opened
    /// before this writer held the lock: if the file changed since (another writer appended), this
    /// throws `locked`; open it again.
    public static func resume(reader: KVPackReader, options: WriterOptions = WriterOptions()) throws -> KVPackWriter {
        guard let path = reader.path else { throw KVPackError.argument("the reader holds a copy in memory; resuming needs its file") }
        let io = try FileAppender.open(path: path, create: false)
        guard io.end == UInt64(reader.fileSize), let mapped = reader.file.identity, try io.identity() == mapped else {
            throw KVPackError(.locked, "\(path) changed after it was opened (another writer appended to it or replaced it); open it again to resume")
        }
        return try resume(io: io, reader: reader, options: options)
    }

    /// Resumes from `reader`'s commit on a file this process holds the lock of.
    static func resume(io: FileAppender, reader: KVPackReader, options: WriterOptions) throws -> KVPackWriter {
        for note in reader.recoveryNotes {
            if case let .skippedCommit(offset, reason) = note, !options.discardDamagedCommits {
                throw KVPackError(.invalidField, offset: offset, field: "CMIT",
                                  "the newest commit is damaged (\(reason)); resuming would discard it. Validate the file to see the damage; resume with discardDamagedCommits to fall back to the commit at \(reader.commitOffset)")
            }
        }
        // The reader's schemes decode; the writer's encode with the options' range fits.
        let schemes = try makeSchemes(manifest: reader.manifest, blobs: Array(reader.state.blobs.values), options: options,
                                      reusing: reader.schemes)
        let writer = KVPackWriter(path: io.path, manifest: reader.manifest, options: options, salt: reader.header.salt,
                                  majorVersion: reader.header.major, minorVersion: reader.header.minor, schemes: schemes, io: io)
        try writer.restore(from: reader)
        // Drop the uncommitted bytes. The reader's mapping may still cover them; it never reads
        // past the commit it loaded, so the truncated pages are never touched.
        let commitEnd = reader.state.commitEnd
        if io.end > commitEnd { try io.truncate(to: commitEnd) }
        return writer
    }

    private func restore(from reader: KVPackReader) throws {
        let s = reader.state
        tokenCount = s.tokenCount
        committedTokenCount = s.tokenCount
        sealedTokenCount = reader.sealedTokenCount
        persistedTailEnd = s.tokenCount
        deltaHead = s.tail.last?.frameOffset ?? 0
        commitSerial = s.commitSerial + 1
        chain = s.chain
        hasSelection = s.selectionOffset != nil
        if majorVersion >= 2 {
            let open = try reader.tokens(sealedTokenCount ..< tokenCount)
            openTokenIDs = open.ids
            openPositions = open.positions
        }
        for p in s.tail {
            for stream in 0 ..< streamCount {
                let kernel = reader.tailKernels[manifest.scheme(forStream: stream)]
                let row = p.tokenStart - sealedTokenCount
                kernel.decode(block: reader.tailRows(run: p, stream: stream), tokens: 0 ..< p.tokenCount,
                              into: openRow(stream: stream, row: row))
            }
        }
    }

    // MARK: Append

    @inline(__always)
    func openRow(stream: Int, row: Int) -> UnsafeMutablePointer<Float> {
        openRows.pointer + (stream * openCapacity + row) * dim
    }

    /// Appends `tokenIDs.count` tokens: their keys and values for every layer and KV head, laid
    /// out as `layout` says. Positions default to the token indices.
    public func append(tokenIDs: [UInt32], positions: [UInt32]? = nil, keys: UnsafeBufferPointer<Float>,
                       values: UnsafeBufferPointer<Float>, layout: KVBatchLayout) throws {
        guard !closed else { throw KVPackError.argument("the writer is closed") }
        let t = tokenIDs.count
        let g = manifest.geometry
        if let positions, positions.count != t {
            throw KVPackError.argument("\(positions.count) positions for \(t) tokens")
        }
        guard tokenCount + t <= Limits.maxTokens else { throw KVPackError.argument("a file holds at most \(Limits.maxTokens) tokens") }
        let need = layout.requiredCount(g, tokens: t)
        guard keys.count >= need, values.count >= need else {
            throw KVPackError.argument("the layout addresses \(need) floats; keys has \(keys.count), values \(values.count)")
        }
        guard let kBase = keys.baseAddress, let vBase = values.baseAddress else { return }
        for i in 0 ..< t {
            let row = tokenCount - sealedTokenCount
            for layer in 0 ..< g.layerCount {
                for head in 0 ..< g.kvHeadCount {
                    let src = layer * layout.layerStride + i * layout.tokenStride + head * layout.headStride
                    let stream = g.stream(layer: layer, kvHead: head, kind: .key)
                    openRow(stream: stream, row: row).update(from: kBase + src, count: dim)
                    openRow(stream: stream + 1, row: row).update(from: vBase + src, count: dim)
                }
            }
            recordToken(tokenIDs[i], position: positions?[i] ?? UInt32(tokenCount))
            tokenCount += 1
            if tokenCount - sealedTokenCount == openCapacity { try sealSegment() }
        }
        if pending.entryCount >= options.maxPendingIndexEntries { try writeIndex(tailOffset: 0) }
    }

    /// Where a new token's id and position go until its segment seals: the next index (version 1)
    /// or the open segment's table (version 2).
    func recordToken(_ id: UInt32, position: UInt32) {
        if majorVersion == 1 {
            pending.tokenIDs.append(id)
            pending.positions.append(position)
        } else {
            openTokenIDs.append(id)
            openPositions.append(position)
        }
    }

    public func append(tokenIDs: [UInt32], positions: [UInt32]? = nil, keys: [Float], values: [Float], layout: KVBatchLayout) throws {
        try keys.withUnsafeBufferPointer { k in
            try values.withUnsafeBufferPointer { v in
                try append(tokenIDs: tokenIDs, positions: positions, keys: k, values: v, layout: layout)
            }
        }
    }

    /// Records which tokens of a longer sequence this file's first `selection.keptCount` tokens
    /// are (a `tsel` frame, listed by the next index). Those tokens must have been appended; the
    /// next commit makes the record visible. A file holds at most one; it needs format 1.4, so
    /// a version 1 file must have been created with the `.tokenSelection` feature.
    public func attach(selection: TokenSelection) throws {
        guard !closed else { throw KVPackError.argument("the writer is closed") }
        guard minorVersion >= FileFeatures.tokenSelection.requiredMinor(major: majorVersion) else {
            throw KVPackError.argument("a token selection needs format 1.4; this file records 1.\(minorVersion) (create it with WriterOptions.features .tokenSelection)")
        }
        guard !hasSelection else { throw KVPackError.argument("the file already holds a token selection") }
        try selection.validate(fileTokens: tokenCount)
        let offset = try writeFrame(tag: TokenSelection.tag, fields: selection.typeFields, payload: selection.encodedPayload())
        pending.extensions.append(ExtensionEntry(frameOffset: offset, tag: TokenSelection.tag))
        hasSelection = true
    }

    /// Adds metadata to the file after its creation (a `note` frame, listed by the next index;
    /// the next commit makes it visible). Readers apply notes over the manifest's metadata in
    /// file order, so a key written again takes its newer value. Needs format 2.1 (1.5): the
    /// file must have been created with the `.notes` feature (`acceptsNotes` says whether it was).
    public func attach(note: MetadataNote) throws {
        guard !closed else { throw KVPackError.argument("the writer is closed") }
        guard acceptsNotes else {
            throw KVPackError.argument("metadata notes need format \(majorVersion).\(FileFeatures.notes.requiredMinor(major: majorVersion)); this file records \(majorVersion).\(minorVersion) (create it with WriterOptions.features .notes)")
        }
        try note.validate()
        let offset = try writeFrame(tag: MetadataNote.tag, fields: note.typeFields, payload: note.encodedPayload())
        pending.extensions.append(ExtensionEntry(frameOffset: offset, tag: MetadataNote.tag))
    }

    /// Whether the file's version defines `note` frames (`attach(note:)`).
    public var acceptsNotes: Bool { minorVersion >= FileFeatures.notes.requiredMinor(major: majorVersion) }

    // MARK: Commit

    /// Makes every token appended so far durable and visible to readers.
    public func commit() throws {
        guard !closed else { throw KVPackError.argument("the writer is closed") }
        try commit(force: false)
    }

    func commit(force: Bool) throws {
        guard force || isDirty else { return }
        if tokenCount > persistedTailEnd { try writeDelta() }
        let tail = tokenCount > sealedTokenCount ? deltaHead : 0
        let index = try writeIndex(tailOffset: tail)
        try barrier()
        let frame = CommitFrame(indexOffset: index, tokenCount: tokenCount, serial: commitSerial)
        _ = try writeFrame(tag: .commit, fields: frame.typeFields, payload: UnsafeRawBufferPointer(start: nil, count: 0), rawLength: 0)
        try barrier()
        commitSerial += 1
        committedTokenCount = tokenCount
    }

    func barrier() throws {
        switch options.durability {
        case .fsync: try io.sync()
        case .flush: try io.flush()
        }
    }

    /// Commits what was appended and releases the file (and its writer lock).
    public func close() throws {
        guard !closed else { return }
        try commit(force: false)
        try io.close()
        closed = true
    }
}
