#if canImport(Glibc)
import Glibc
#endif

public struct WriterOptions: Sendable {
    public enum Durability: Sendable {
        /// `fsync` before and after each commit frame: a commit survives power loss.
        case fsync
        /// Hand bytes to the kernel at each commit: a commit survives the process dying
        /// (SIGKILL, crash) but not the machine losing power.
        case flush
    }

    public var durability: Durability = .fsync
    /// Per-file salt seeding header checksums; random unless set (set it for reproducible bytes).
    public var salt: UInt64?
    /// Replace an existing file at the path (atomically, once the new file's first commit is durable).
    public var overwrite = false
    /// A commit rewrites the index as one FULL frame when this many index frames follow the last
    /// FULL one, bounding the chain a reader walks at open.
    public var maxIndexChain = 64
    /// Pending index entries that make the writer emit an index frame before the next commit, so
    /// its memory stays bounded however long it appends without committing.
    public var maxPendingIndexEntries = 1 << 16
    /// On resume, accept a file whose newest commit is damaged by falling back to an older one
    /// (the damaged commit's bytes are then truncated away).
    public var discardDamagedCommits = false
    /// The major format version of a created file: 2 (the default) keeps opening constant-time
    /// with segment tables; 1 writes files that readers of version 1 can open. A resumed file
    /// keeps its own version.
    public var majorVersion: UInt16 = FileHeader.currentMajor
    /// Version 1 files: the header records at least this minor version (a file that will hold a
    /// `tsel` frame, which needs 1.4, is created with 4). Version 2 defines everything at 2.0.
    public var minimumMinorVersion: UInt16 = 0
    /// Called after each sealed segment with the tokens appended so far (progress display).
    public var onSeal: (@Sendable (Int) -> Void)?

    public init() {}
}

/// How the caller lays out the K (or V) floats of a batch of tokens: `headDim` contiguous
/// floats per (layer, token, KV head), at the given strides (in floats).
public struct KVBatchLayout: Sendable, Equatable {
    public var layerStride: Int
    public var tokenStride: Int
    public var headStride: Int

    public init(layerStride: Int, tokenStride: Int, headStride: Int) {
        self.layerStride = layerStride
        self.tokenStride = tokenStride
        self.headStride = headStride
    }

    /// [layers][tokens][kvHeads][headDim], what a model's forward pass produces.
    public static func layerTokenHead(_ g: ModelGeometry, tokens: Int) -> KVBatchLayout {
        KVBatchLayout(layerStride: tokens * g.kvHeadCount * g.headDim, tokenStride: g.kvHeadCount * g.headDim, headStride: g.headDim)
    }

    /// [layers][kvHeads][tokens][headDim], Hugging Face `past_key_values` (batch 1) stacked by layer.
    public static func layerHeadToken(_ g: ModelGeometry, tokens: Int) -> KVBatchLayout {
        KVBatchLayout(layerStride: g.kvHeadCount * tokens * g.headDim, tokenStride: g.headDim, headStride: tokens * g.headDim)
    }

    func requiredCount(_ g: ModelGeometry, tokens: Int) -> Int {
        guard tokens > 0 else { return 0 }
        return (g.layerCount - 1) * layerStride + (tokens - 1) * tokenStride + (g.kvHeadCount - 1) * headStride + g.headDim
    }
}

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
    let schemes: [any KVScheme]
    /// The codec of each stream (`schemes[index].forKVHead(head)`).
    let streamSchemes: [any KVScheme]
    private let io: FileAppender
    /// The version in the file header.
    let majorVersion: UInt16
    let minorVersion: UInt16

    private let streamCount: Int
    private let dim: Int
    private let segmentTokens: Int
    /// streams x segmentTokens x dim floats: the open block of every stream.
    private let openRows: UnsafeMutablePointer<Float>
    private var encodeBuffer = GrowableBytes()
    private var tailBuffer = GrowableBytes()
    private var compressors: [Int32: Zstd.Compressor] = [:]

    public private(set) var tokenCount = 0
    public private(set) var committedTokenCount = 0
    public private(set) var sealedTokenCount = 0
    /// Tail rows of the current segment already written in DLTA frames end here.
    private var persistedTailEnd = 0
    private var deltaHead: UInt64 = 0
    private var commitSerial: UInt64 = 0
    private var pending = PendingIndex()
    /// Version 2: ids and positions of the tokens of the open segment (they go to its segment
    /// table when it seals, and to tail runs before that).
    private var openTokenIDs: [UInt32] = []
    private var openPositions: [UInt32] = []
    /// Index frames since (and including) the last FULL one, newest first.
    private var chain: [IndexChainLink] = []
    private var closed = false
    private var hasSelection = false

    public var isDirty: Bool { tokenCount != committedTokenCount || !pending.isEmpty }

    private init(path: String, manifest: Manifest, options: WriterOptions, salt: UInt64, majorVersion: UInt16, minorVersion: UInt16,
                 schemes: [any KVScheme], io: FileAppender) {
        self.path = path
        self.majorVersion = majorVersion
        self.minorVersion = minorVersion
        self.manifest = manifest
        self.options = options
        self.salt = salt
        self.schemes = schemes
        let g = manifest.geometry
        streamSchemes = (0 ..< g.streamCount).map { schemes[manifest.scheme(forStream: $0)].forKVHead(g.streamID($0).kvHead) }
        self.io = io
        streamCount = manifest.geometry.streamCount
        dim = manifest.geometry.headDim
        segmentTokens = manifest.segmentTokens
        let count = streamCount * segmentTokens * dim
        openRows = UnsafeMutableRawPointer.allocate(byteCount: max(4 * count, 64), alignment: 64)
            .bindMemory(to: Float.self, capacity: count)
        openRows.initialize(repeating: 0, count: count)
        if majorVersion >= 2 {
            openTokenIDs.reserveCapacity(segmentTokens)
            openPositions.reserveCapacity(segmentTokens)
        }
    }

    deinit {
        openRows.deallocate()
    }

    // MARK: Create and resume

    /// Creates a file (under a temporary name, renamed into place once its first, empty commit is
    /// durable) for `manifest`, embedding `blobs` (every blob the schemes name).
    public static func create(path: String, manifest: Manifest, blobs: [Blob] = [], options: WriterOptions = WriterOptions()) throws -> KVPackWriter {
        try manifest.validateForWriting()
        guard FileHeader.supportedMajors.contains(options.majorVersion) else {
            throw KVPackError.argument("format version \(options.majorVersion) is not one this library writes (\(FileHeader.supportedMajors))")
        }
        let schemes = try makeSchemes(manifest: manifest, blobs: blobs)
        if !options.overwrite, access(path, F_OK) == 0 {
            throw KVPackError.argument("\(path) already exists (pass overwrite to replace it)")
        }
        let temp = "\(path).tmp-\(getpid())-\(UInt32.random(in: 0 ... .max))"
        let io = try FileAppender.open(path: temp, create: true)
        let salt = options.salt ?? UInt64.random(in: 1 ... .max)
        let major = options.majorVersion
        let minor = major == 1 ? max(manifest.requiredMinorVersion, options.minimumMinorVersion) : 0
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
            guard rename(temp, path) == 0 else { throw KVPackError.ioError("rename to \(path)", path: temp) }
            syncDirectory(of: path)
        } catch {
            unlink(temp)
            throw error
        }
        return writer
    }

    static func makeSchemes(manifest: Manifest, blobs: [Blob]) throws -> [any KVScheme] {
        var byID: [UInt32: Blob] = [:]
        for b in blobs {
            guard byID.updateValue(b, forKey: b.id) == nil else { throw KVPackError.argument("blob id \(b.id) is used twice") }
        }
        return try manifest.schemes.enumerated().map { i, d in
            let named = try d.blobIDs.map { id in
                guard let b = byID[id] else { throw KVPackError.argument("scheme \(i) names blob \(id), which was not supplied") }
                return b
            }
            return try SchemeRegistry.make(descriptor: d, context: manifest.schemeContext(i, blobs: named))
        }
    }

    /// Reopens a file to keep appending. Bytes after the last commit (a crashed writer's) are
    /// truncated away; the tail rows are reloaded into the open blocks.
    public static func resume(path: String, options: WriterOptions = WriterOptions()) throws -> KVPackWriter {
        let io = try FileAppender.open(path: path, create: false)
        let writer: KVPackWriter
        let commitEnd: UInt64
        do {
            let reader = try KVPackReader(path: path)
            for note in reader.recoveryNotes {
                if case let .skippedCommit(offset, reason) = note, !options.discardDamagedCommits {
                    throw KVPackError(.invalidField, offset: offset, field: "CMIT",
                                      "the newest commit is damaged (\(reason)); resuming would discard it. Run `kvpack validate`; pass discardDamagedCommits to fall back to the commit at \(reader.commitOffset)")
                }
            }
            writer = KVPackWriter(path: path, manifest: reader.manifest, options: options, salt: reader.header.salt,
                                  majorVersion: reader.header.major, minorVersion: reader.header.minor, schemes: reader.schemes, io: io)
            try writer.restore(from: reader)
            commitEnd = reader.state.commitEnd
        }
        // The reader's mapping is gone; drop the uncommitted bytes.
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
        for piece in s.tail.indices {
            let p = s.tail[piece]
            for stream in 0 ..< streamCount {
                let kernel = reader.tailKernels[manifest.scheme(forStream: stream)]
                let row = p.tokenStart - sealedTokenCount
                kernel.decode(block: reader.tailRows(piece: piece, stream: stream), tokens: 0 ..< p.tokenCount,
                              into: openRow(stream: stream, row: row))
            }
        }
    }

    // MARK: Append

    @inline(__always)
    private func openRow(stream: Int, row: Int) -> UnsafeMutablePointer<Float> {
        openRows + (stream * segmentTokens + row) * dim
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
            let position = positions?[i] ?? UInt32(tokenCount)
            if majorVersion == 1 {
                pending.tokenIDs.append(tokenIDs[i])
                pending.positions.append(position)
            } else {
                openTokenIDs.append(tokenIDs[i])
                openPositions.append(position)
            }
            tokenCount += 1
            if tokenCount - sealedTokenCount == segmentTokens { try sealSegment() }
        }
        if pending.entryCount >= options.maxPendingIndexEntries { try writeIndex(tailOffset: 0) }
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
    /// the file must have been created with `minimumMinorVersion` 4 or more.
    public func attach(selection: TokenSelection) throws {
        guard !closed else { throw KVPackError.argument("the writer is closed") }
        guard majorVersion >= 2 || minorVersion >= 4 else {
            throw KVPackError.argument("a token selection needs format 1.4; this file records 1.\(minorVersion) (create it with minimumMinorVersion 4)")
        }
        guard !hasSelection else { throw KVPackError.argument("the file already holds a token selection") }
        try selection.validate(fileTokens: tokenCount)
        let offset = try writeFrame(tag: TokenSelection.tag, fields: selection.headerFields, payload: selection.encodedPayload())
        pending.extensions.append(ExtensionEntry(frameOffset: offset, tag: TokenSelection.tag))
        hasSelection = true
    }

    private func sealSegment() throws {
        let segment = UInt32(sealedTokenCount / segmentTokens)
        var blockOffsets: [UInt64] = []
        if majorVersion >= 2 { blockOffsets.reserveCapacity(streamCount) }
        for stream in 0 ..< streamCount {
            let scheme = streamSchemes[stream]
            let size = scheme.encodedBlockSize(tokens: segmentTokens)
            encodeBuffer.reserve(size)
            let raw = UnsafeMutableRawBufferPointer(start: encodeBuffer.pointer, count: size)
            scheme.encode(rows: openRow(stream: stream, row: 0), tokens: segmentTokens, into: raw)
            var fields = FrameHeader.FieldPacker()
            fields.set(32, UInt32(stream))
            fields.set(36, segment)
            fields.set(40, UInt32(segmentTokens))
            fields.set(44, UInt16(manifest.scheme(forStream: stream)))
            let offset: UInt64
            if scheme.compressesBlocks {
                let compressor = compressors[scheme.compressionLevel] ?? {
                    let c = Zstd.Compressor(level: scheme.compressionLevel)
                    compressors[scheme.compressionLevel] = c
                    return c
                }()
                let packed = try compressor.compress(UnsafeRawBufferPointer(raw))
                offset = try writeFrame(tag: .block, flags: FrameHeader.compressedFlag, fields: fields.words,
                                        payload: packed, rawLength: size)
            } else {
                offset = try writeFrame(tag: .block, fields: fields.words, payload: UnsafeRawBufferPointer(raw), rawLength: size)
            }
            if majorVersion == 1 {
                pending.blocks.append(BlockEntry(frameOffset: offset, segment: segment, stream: UInt32(stream)))
            } else {
                blockOffsets.append(offset)
            }
        }
        if majorVersion >= 2 {
            let table = try writeSegmentTable(segment: segment, blockOffsets: blockOffsets)
            pending.blocks.append(BlockEntry(frameOffset: table, segment: segment, stream: 0))
            openTokenIDs.removeAll(keepingCapacity: true)
            openPositions.removeAll(keepingCapacity: true)
        }
        sealedTokenCount += segmentTokens
        persistedTailEnd = sealedTokenCount
        deltaHead = 0
        options.onSeal?(tokenCount)
    }

    /// A version 2 segment table (Spec/ 8.1): where each stream's block is, and the segment's
    /// token ids and positions, so a reader finds any of them without reading the index whole.
    private func writeSegmentTable(segment: UInt32, blockOffsets: [UInt64]) throws -> UInt64 {
        var w = ByteWriter(capacity: 8 * streamCount + 8 * segmentTokens)
        for offset in blockOffsets { w.write(offset) }
        for id in openTokenIDs { w.write(id) }
        for position in openPositions { w.write(position) }
        var fields = FrameHeader.FieldPacker()
        fields.set(32, segment)
        fields.set(36, UInt32(streamCount))
        fields.set(40, UInt32(segmentTokens))
        return try writeFrame(tag: .segmentTable, fields: fields.words, payload: w.bytes)
    }

    // MARK: Commit

    /// Makes every token appended so far durable and visible to readers.
    public func commit() throws {
        guard !closed else { throw KVPackError.argument("the writer is closed") }
        try commit(force: false)
    }

    private func commit(force: Bool) throws {
        guard force || isDirty else { return }
        if tokenCount > persistedTailEnd { try writeDelta() }
        let tail = tokenCount > sealedTokenCount ? deltaHead : 0
        let index = try writeIndex(tailOffset: tail)
        try barrier()
        var fields = FrameHeader.FieldPacker()
        fields.set(32, index)
        fields.set(40, UInt32(tokenCount))
        fields.set(48, commitSerial)
        _ = try writeFrame(tag: .commit, fields: fields.words, payload: UnsafeRawBufferPointer(start: nil, count: 0), rawLength: 0)
        try barrier()
        commitSerial += 1
        committedTokenCount = tokenCount
    }

    private func barrier() throws {
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

    /// Writes the open rows not yet in any DLTA frame: tokens [persistedTailEnd, tokenCount).
    private func writeDelta() throws {
        let first = persistedTailEnd - sealedTokenCount
        let count = tokenCount - persistedTailEnd
        var sizes: [Int] = []
        sizes.reserveCapacity(streamCount)
        // Version 2 runs start with their tokens' ids and positions.
        let tokenBytes = majorVersion >= 2 ? roundUp(8 * count, to: FileHeader.frameAlignment) : 0
        var total = tokenBytes
        for stream in 0 ..< streamCount {
            let type = schemes[manifest.scheme(forStream: stream)].descriptor.residualType
            let n = roundUp(count * dim * type.byteWidth, to: FileHeader.frameAlignment)
            sizes.append(n)
            total += n
        }
        tailBuffer.reserve(total)
        let base = tailBuffer.pointer
        base.initializeMemory(as: UInt8.self, repeating: 0, count: total)
        for i in 0 ..< (tokenBytes > 0 ? count : 0) {
            (base + 4 * i).storeBytes(of: openTokenIDs[first + i].littleEndian, as: UInt32.self)
            (base + 4 * (count + i)).storeBytes(of: openPositions[first + i].littleEndian, as: UInt32.self)
        }
        var at = tokenBytes
        for stream in 0 ..< streamCount {
            let type = schemes[manifest.scheme(forStream: stream)].descriptor.residualType
            RowKernels.narrow(openRow(stream: stream, row: first), to: type, base + at, count * dim)
            at += sizes[stream]
        }
        var fields = FrameHeader.FieldPacker()
        fields.set(32, UInt32(persistedTailEnd))
        fields.set(36, UInt32(count))
        fields.set(40, deltaHead)
        fields.set(48, UInt32(streamCount))
        deltaHead = try writeFrame(tag: .delta, fields: fields.words, payload: UnsafeRawBufferPointer(start: base, count: total), rawLength: total)
        persistedTailEnd = tokenCount
    }

    /// Writes an index frame with the pending entries (FULL when the chain is long or its
    /// incremental frames outweigh the last FULL one) and returns its offset.
    @discardableResult
    private func writeIndex(tailOffset: UInt64) throws -> UInt64 {
        let incremental = chain.filter { !$0.isFull }.reduce(UInt64(0)) { $0 + $1.payloadSize }
        let fullSize = chain.last?.payloadSize ?? 0
        let full = chain.isEmpty || chain.count >= options.maxIndexChain || incremental + pending.payloadSize > fullSize
        // Version 1 frames start at a token, version 2 frames at a segment.
        let firstToken = majorVersion == 1 ? tokenCount - pending.tokenIDs.count : sealedTokenCount / segmentTokens - pending.blocks.count
        let parts = pending.sectionBytes()
        var fields = FrameHeader.FieldPacker()
        fields.set(40, tailOffset)
        let link: IndexChainLink
        if full {
            fields.set(48, UInt32(0))
            fields.set(52, IndexFrame.fullFlag)
            let sources = Array(chain.reversed())
            let blocks = sources.reduce(pending.blocks.count) { $0 + $1.blockCount }
            let blobs = sources.reduce(pending.blobs.count) { $0 + $1.blobCount }
            let tokens = sources.reduce(pending.tokenIDs.count) { $0 + $1.tokenCount }
            let extensions = sources.reduce(pending.extensions.count) { $0 + $1.extensionCount }
            link = try writeStreamedIndex(fields: fields, prelude: indexPrelude(blocks: blocks, blobs: blobs, tokens: tokens, extensions: extensions),
                                          sources: sources, pendingSections: parts, counts: (blocks, blobs, tokens, extensions))
            chain = [link]
        } else {
            fields.set(32, chain[0].offset)
            fields.set(48, UInt32(firstToken))
            var payload = indexPrelude(blocks: pending.blocks.count, blobs: pending.blobs.count, tokens: pending.tokenIDs.count,
                                       extensions: pending.extensions.count)
            for p in parts { payload += p }
            let offset = try writeFrame(tag: .index, fields: fields.words, payload: payload)
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
    private func writeStreamedIndex(fields: FrameHeader.FieldPacker, prelude: [UInt8], sources: [IndexChainLink],
                                    pendingSections: [[UInt8]], counts: (Int, Int, Int, Int)) throws -> IndexChainLink {
        try io.padToAlignment()
        let offset = io.end
        try io.appendZeros(FrameHeader.size)
        let hasher = Checksum.Streaming()
        prelude.withUnsafeBytes { hasher.update($0) }
        try io.append(prelude)
        var sections: [Range<UInt64>] = []
        let chunk = 1 << 16
        let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 64)
        defer { scratch.deallocate() }
        for s in 0 ..< 5 {
            let start = io.end
            for link in sources {
                var r = link.sections[s]
                while !r.isEmpty {
                    let n = Int(min(UInt64(chunk), UInt64(r.count)))
                    let piece = UnsafeMutableRawBufferPointer(rebasing: scratch[0 ..< n])
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
                                 payloadChecksum: hasher.digest, fields: fields.words)
        try io.patch(at: offset, header.encoded(salt: salt))
        return IndexChainLink(offset: offset, isFull: true, sections: sections, blockCount: counts.0, blobCount: counts.1,
                              tokenCount: counts.2, extensionCount: counts.3, payloadSize: length)
    }

    // MARK: Frames

    @discardableResult
    private func writeFrame(tag: FrameTag, flags: UInt32 = 0, fields: (UInt64, UInt64, UInt64) = (0, 0, 0),
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
    private func writeFrame(tag: FrameTag, fields: (UInt64, UInt64, UInt64) = (0, 0, 0), payload: [UInt8]) throws -> UInt64 {
        try payload.withUnsafeBytes { try writeFrame(tag: tag, fields: fields, payload: $0, rawLength: $0.count) }
    }

    private func writeBlob(_ blob: Blob) throws -> UInt64 {
        guard (1 ... 4).contains(blob.shape.count), blob.shape.allSatisfy({ $0 >= 1 && $0 <= Int(UInt32.max) }),
              blob.elementCount * blob.elementType.byteWidth == blob.bytes.count else {
            throw KVPackError.argument("blob \(blob.id): shape \(blob.shape) of \(blob.elementType) does not match its \(blob.bytes.count) bytes")
        }
        var fields = FrameHeader.FieldPacker()
        fields.set(32, blob.id)
        fields.set(36, blob.kind.rawValue)
        fields.set(38, blob.elementType.rawValue)
        fields.set(39, UInt8(blob.shape.count))
        for (i, dim) in blob.shape.enumerated() { fields.set(40 + 4 * i, UInt32(dim)) }
        return try writeFrame(tag: .blob, fields: fields.words, payload: blob.bytes)
    }
}
