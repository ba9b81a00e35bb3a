/// A read-only view of a KVPack file at its newest verified commit.
///
/// Opening reads the header, the manifest, the commit's index chain and the tail, and checks
/// them; block payloads are not touched until a decode or attention call first reads them,
/// when their header and checksum are verified once. In a version 2 file the index lists one
/// segment table per sealed segment, and each table (block offsets, token ids, positions) is
/// also verified on first use, so opening costs the same at 4K tokens as at 128K. Safe to
/// share between threads; each thread passes its own `AttentionWorkspace`.
public final class KVPackReader: @unchecked Sendable {
    // @unchecked: every stored property is immutable after init except `verified`, which is atomic.
    public let file: MappedFile
    public let path: String?
    public let header: FileHeader
    public let manifest: Manifest
    let state: CommitState
    let schemes: [any KVScheme]
    /// The codec of each stream (`schemes[index].forKVHead(head)`).
    let streamSchemes: [any KVScheme]
    /// Each stream's block size (decoded) and whether its blocks are compressed: what every block
    /// read checks, kept apart so that the check copies no scheme out of `streamSchemes`.
    let streamBlockBytes: [Int]
    let streamCompressed: [Bool]
    /// Tail rows are attended with the raw kernels of each scheme's residual type.
    let tailKernels: [RawScheme]
    let verified: VerificationFlags
    /// Version 2: which segment tables have been verified.
    let tablesVerified: VerificationFlags
    /// Streams whose pages attention has asked the kernel for (`prefetchOnce`).
    let prefetched: VerificationFlags
    let manifestEnd: UInt64

    public var geometry: ModelGeometry { manifest.geometry }
    public var tokenCount: Int { state.tokenCount }
    public var segmentTokens: Int { manifest.segmentTokens }
    public var sealedTokenCount: Int { manifest.sealedTokens(of: tokenCount) }
    /// Every token id, in order. A version 2 file keeps them in its segment tables, which this
    /// reads (and verifies) on first use: O(tokens), unlike opening.
    public var tokenIDs: [UInt32] { get throws { try tokens(0 ..< tokenCount).ids } }
    /// The RoPE position each token was encoded at.
    public var positions: [UInt32] { get throws { try tokens(0 ..< tokenCount).positions } }
    public var blobs: [Blob] { state.blobs.values.sorted { $0.id < $1.id } }
    public var recoveryNotes: [RecoveryNote] { state.notes }
    public var commitOffset: UInt64 { state.commitOffset }
    public var commitSerial: UInt64 { state.commitSerial }
    public var fileSize: Int { file.bytes.count }

    /// Which arithmetic attention uses (`.fast` unless asked).
    public let arithmetic: AttentionArithmetic

    public convenience init(path: String, arithmetic: AttentionArithmetic = .fast) throws {
        try self.init(file: MappedFile(path: path), path: path, arithmetic: arithmetic)
    }

    /// Opens the bytes of `file` at their newest verified commit. An error names `path` (when
    /// given), the offset and the field that is wrong. `arithmetic` chooses how attention over
    /// codes computes (decode is the same either way).
    public init(file: MappedFile, path: String? = nil, arithmetic: AttentionArithmetic = .fast) throws {
        self.file = file
        self.path = path
        self.arithmetic = arithmetic
        let opened: Opened
        do {
            opened = try Self.open(file, arithmetic: arithmetic)
        } catch let e as KVPackError {
            throw e.about(path)
        }
        header = opened.header
        manifest = opened.manifest
        manifestEnd = opened.manifestEnd
        state = opened.state
        schemes = opened.schemes
        tailKernels = opened.tails
        let g = manifest.geometry, manifest = opened.manifest, schemes = opened.schemes
        streamSchemes = (0 ..< g.streamCount).map { schemes[manifest.scheme(forStream: $0)].forKVHead(g.streamID($0).kvHead) }
        streamBlockBytes = streamSchemes.map { $0.encodedBlockSize(tokens: manifest.segmentTokens) }
        streamCompressed = streamSchemes.map(\.compressesBlocks)
        // Bounded by the file size: the commit loader checked that the bytes can hold the blocks.
        verified = VerificationFlags(count: manifest.sealedTokens(of: state.tokenCount) / manifest.segmentTokens * g.streamCount)
        tablesVerified = VerificationFlags(count: state.segmentTables.count)
        prefetched = VerificationFlags(count: g.streamCount)
    }

    /// What opening reads and checks: header, manifest, the newest commit that loads, and the
    /// codec of every scheme.
    private struct Opened {
        var header: FileHeader
        var manifest: Manifest
        var manifestEnd: UInt64
        var state: CommitState
        var schemes: [any KVScheme]
        var tails: [RawScheme]
    }

    private static func open(_ file: MappedFile, arithmetic: AttentionArithmetic) throws -> Opened {
        let bytes = file.bytes
        let header = try FileHeader.decode(bytes)
        try file.ensureFrame(at: UInt64(FileHeader.size), limit: UInt64(bytes.count), salt: header.salt)
        let (manifest, m) = try Manifest.readFrame(bytes, salt: header.salt)
        // LOSSLESS_TOKENS is a 2.3 feature; version 1 defines no manifest flag but bit 0.
        guard header.major >= 2 || !manifest.keepsLosslessTokens else {
            throw KVPackError.invalid(m.payloadOffset + 20, "manifest.flags", "LOSSLESS_TOKENS (bit 1) is defined for version 2 files only; this is a version 1 file")
        }
        let loader = CommitLoader(source: file, major: header.major, salt: header.salt, manifest: manifest, manifestEnd: m.nextFrameOffset)
        let state = try loader.loadNewest()
        var schemes: [any KVScheme] = []
        var tails: [RawScheme] = []
        for (i, d) in manifest.schemes.enumerated() {
            // The commit loader checked that every blob a descriptor names is listed.
            let context = SchemeContext(manifest: manifest, scheme: i, blobs: d.blobIDs.map { state.blobs[$0]! }, arithmetic: arithmetic)
            do {
                schemes.append(try SchemeRegistry.make(descriptor: d, context: context))
            } catch var e as KVPackError {
                e.nest(under: "manifest.schemes[\(i)]")
                // A scheme reports a parameter by its index in the parameter bytes (`offset`).
                e.offset = m.payloadOffset + UInt64(manifest.parameterOffset(scheme: i)) + (e.offset ?? 0)
                throw e
            }
            tails.append(try RawScheme(descriptor: RawScheme.descriptor(elementType: d.residualType), context: context))
        }
        return Opened(header: header, manifest: manifest, manifestEnd: m.nextFrameOffset, state: state, schemes: schemes, tails: tails)
    }

    /// Bytes of heap the reader holds beyond the mapped file: the block index, token ids and
    /// positions, blobs and per-block verification flags (counted from the arrays; small
    /// objects ignored). Everything else a reader touches is the file's pages.
    public var heapBytes: Int {
        state.blockOffsets.count * 8 + state.segmentTables.count * 8 + state.tokenIDs.count * 4 + state.positions.count * 4
            + state.blobs.values.reduce(0) { $0 + $1.bytes.count } + state.tail.count * (32 + 8 * geometry.streamCount)
            + verified.byteCount + tablesVerified.byteCount + prefetched.byteCount
    }

    /// Bytes of the index frames opening read and verified (the commit's chain, headers
    /// included): every block and token in version 1, 16 bytes per segment in version 2.
    public var indexBytes: Int { state.chain.reduce(0) { $0 + FrameHeader.size + Int($1.payloadSize) } }

    /// Whether the commit lists a token selection (a pruned file).
    public var hasTokenSelection: Bool { state.selectionOffset != nil }

    /// The token selection this file's first tokens come from (`kvpack prune`), read and checked
    /// now: nil when the file lists none. Damage to it is an error here (and in `validate`) but
    /// never stops the tokens from being read, since attention does not depend on it.
    public func tokenSelection() throws -> TokenSelection? {
        guard let at = state.selectionOffset else { return nil }
        return try readingFrame(at: at, limit: state.commitOffset) {
            let h = try FrameHeader.decode(file.bytes, at: at, limit: state.commitOffset, salt: header.salt, field: "tsel")
            return try TokenSelection.decode(header: h, file: file.bytes, fileTokens: tokenCount)
        }
    }

    /// How many `note` frames (metadata added after creation) the commit lists.
    public var metadataNoteCount: Int { state.metadataNotes.count }

    /// The metadata notes, in the order they were written, each read and checked now. Like the
    /// token selection, damage to one is an error here (and in `validate`), never in reading tokens.
    public func metadataNotes() throws -> [MetadataNote] {
        try state.metadataNotes.map { at in
            try readingFrame(at: at, limit: state.commitOffset) {
                let h = try FrameHeader.decode(file.bytes, at: at, limit: state.commitOffset, salt: header.salt, field: "note")
                return try MetadataNote.decode(header: h, file: file.bytes)
            }
        }
    }

    /// The file's user metadata: the manifest's entries with the notes applied in order (a key
    /// written again takes its newer value, in its first place).
    public func userMetadata() throws -> [Manifest.MetadataEntry] {
        var entries = manifest.userMetadata
        for note in try metadataNotes() {
            for e in note.entries {
                if let i = entries.firstIndex(where: { $0.key == e.key }) { entries[i] = e } else { entries.append(e) }
            }
        }
        return entries
    }

    // MARK: Per-stream information

    public func scheme(layer: Int, kind: KVKind) -> any KVScheme {
        schemes[manifest.schemeIndex(layer: layer, kind: kind)]
    }

    func checkStream(layer: Int, kvHead: Int) throws {
        guard (0 ..< geometry.layerCount).contains(layer) else {
            throw KVPackError.argument("layer \(layer) out of range 0..<\(geometry.layerCount)")
        }
        guard (0 ..< geometry.kvHeadCount).contains(kvHead) else {
            throw KVPackError.argument("KV head \(kvHead) out of range 0..<\(geometry.kvHeadCount)")
        }
    }

    func checkTokens(_ tokens: Range<Int>) throws {
        guard tokens.lowerBound >= 0, tokens.upperBound <= tokenCount else {
            throw KVPackError.argument("token range \(tokens) outside the file's \(tokenCount) tokens")
        }
    }

}
