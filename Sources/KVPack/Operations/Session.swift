/// The KV cache of a model that is running: a file being written, attended as the model goes.
///
/// Tokens arrive in batches (a prefill, or one token at a time). For each batch the model stores
/// every layer's K/V rows (`store`), attends (`attend`), and ends the batch, which appends it to
/// the writer. Attention reads the committed file through a reader snapshot (mapped pages) and
/// the rest from an in-memory mirror whose rows are rounded to each stream's residual type, the
/// exact values the file will hold for them. When a segment seals, the session commits and
/// reopens its reader, so sealed (possibly quantized) blocks are attended from the file too.
/// The result: at every step the model sees what any later reader of the file will decode, so
/// a conversation resumed from the file continues exactly as an uninterrupted one would.
public final class KVCacheSession {
    public let path: String
    public let writer: KVPackWriter
    /// The committed file as of the last refresh; covers tokens [0, mirrorStart).
    public private(set) var reader: KVPackReader
    public var manifest: Manifest { writer.manifest }
    public var geometry: ModelGeometry { writer.manifest.geometry }

    private let dim: Int
    private let streamCount: Int
    private let residualTypes: [ElementType]
    /// streams x capacity x dim floats: rows of tokens [mirrorStart, tokenCount + staged).
    private var mirror: AlignedFloats
    private var capacity: Int
    private var mirrorStart: Int
    private var staged = 0
    private var stagedIDs: [UInt32] = []
    private var stagedPositions: [UInt32] = []
    private let roundTrip: AlignedBytes
    public let workspace = AttentionWorkspace()

    /// Tokens appended to the file (committed or not), not counting a batch in progress.
    public var tokenCount: Int { writer.tokenCount }
    /// Token ids of the whole conversation so far (file and batch in progress).
    public private(set) var tokenIDs: [UInt32]
    /// The position the next token takes: one past the last stored position.
    public private(set) var nextPosition: UInt32

    private init(path: String, writer: KVPackWriter, reader: KVPackReader) throws {
        self.path = path
        self.writer = writer
        self.reader = reader
        let g = writer.manifest.geometry
        dim = g.headDim
        streamCount = g.streamCount
        residualTypes = (0 ..< g.streamCount).map { writer.manifest.schemes[writer.manifest.scheme(forStream: $0)].residualType }
        capacity = writer.manifest.segmentTokens
        mirror = AlignedFloats(count: streamCount * capacity * dim)
        roundTrip = AlignedBytes(count: 4 * dim)
        mirrorStart = reader.tokenCount
        let tokens = try reader.tokens(0 ..< reader.tokenCount)
        tokenIDs = tokens.ids
        nextPosition = tokens.positions.last.map { $0 + 1 } ?? 0
    }

    /// Starts a new file for a model and its planned schemes (see `NewFile`).
    /// `arithmetic` is how attention over the file's sealed blocks computes (see
    /// `AttentionArithmetic`).
    public static func create(path: String, file: NewFile, options: WriterOptions = WriterOptions(),
                              arithmetic: AttentionArithmetic = .fast) throws -> KVCacheSession {
        let (manifest, blobs) = try file.manifest()
        return try create(path: path, manifest: manifest, blobs: blobs, options: file.writerOptions(options), arithmetic: arithmetic)
    }

    /// Starts a new file from a manifest you built.
    public static func create(path: String, manifest: Manifest, blobs: [Blob] = [], options: WriterOptions = WriterOptions(),
                              arithmetic: AttentionArithmetic = .fast) throws -> KVCacheSession {
        let writer = try KVPackWriter.create(path: path, manifest: manifest, blobs: blobs, options: options)
        return try KVCacheSession(path: path, writer: writer, reader: KVPackReader(path: path, arithmetic: arithmetic))
    }

    /// Continues a file: takes the writer lock, maps the file once, and attends its committed
    /// tokens through that mapping.
    public static func resume(path: String, options: WriterOptions = WriterOptions(),
                              arithmetic: AttentionArithmetic = .fast) throws -> KVCacheSession {
        let io = try FileAppender.open(path: path, create: false)
        let reader = try KVPackReader(path: path, arithmetic: arithmetic)
        let writer = try KVPackWriter.resume(io: io, reader: reader, options: options)
        return try KVCacheSession(path: path, writer: writer, reader: reader)
    }

    /// Continues the file `reader` has open (a caller that read the file first, to check its
    /// model, say): the writer resumes from that reader's commit and the session attends through
    /// the same mapping, so the file is mapped once. Throws `locked` if the file changed since
    /// the reader opened it.
    public static func resume(reader: KVPackReader, options: WriterOptions = WriterOptions()) throws -> KVCacheSession {
        let writer = try KVPackWriter.resume(reader: reader, options: options)
        return try KVCacheSession(path: writer.path, writer: writer, reader: reader)
    }

    private func row(stream: Int, index: Int) -> UnsafeMutablePointer<Float> {
        mirror.pointer + (stream * capacity + index) * dim
    }

    /// Begins a batch of tokens; positions default to consecutive ones after the last.
    public func beginBatch(tokenIDs ids: [UInt32], positions: [UInt32]? = nil) throws {
        guard staged == 0 else { throw KVPackError.argument("a batch is already in progress") }
        if let positions, positions.count != ids.count {
            throw KVPackError.argument("\(positions.count) positions for \(ids.count) tokens")
        }
        let needed = tokenCount - mirrorStart + ids.count
        if needed > capacity { grow(to: max(needed, 2 * capacity)) }
        staged = ids.count
        stagedIDs = ids
        stagedPositions = positions ?? (0 ..< ids.count).map { nextPosition + UInt32($0) }
    }

    /// Positions of the batch in progress.
    public var batchPositions: [UInt32] { stagedPositions }

    private func grow(to newCapacity: Int) {
        let bigger = AlignedFloats(count: streamCount * newCapacity * dim)
        let used = (tokenCount - mirrorStart) * dim
        for s in 0 ..< streamCount {
            (bigger.pointer + s * newCapacity * dim).update(from: mirror.pointer + s * capacity * dim, count: used)
        }
        mirror = bigger
        capacity = newCapacity
    }

    /// Stores the K/V rows of batch token `index` for one layer: kvHeads x headDim floats each.
    public func store(layer: Int, index: Int, keys: UnsafePointer<Float>, values: UnsafePointer<Float>) {
        precondition(index >= 0 && index < staged, "token \(index) is not in the batch")
        let r = tokenCount - mirrorStart + index
        for head in 0 ..< geometry.kvHeadCount {
            let k = geometry.stream(layer: layer, kvHead: head, kind: .key)
            roundToResidual(keys + head * dim, type: residualTypes[k], into: row(stream: k, index: r))
            roundToResidual(values + head * dim, type: residualTypes[k + 1], into: row(stream: k + 1, index: r))
        }
    }

    private func roundToResidual(_ src: UnsafePointer<Float>, type: ElementType, into dst: UnsafeMutablePointer<Float>) {
        if type == .float32 {
            dst.update(from: src, count: dim)
        } else {
            RowKernels.narrow(src, to: type, roundTrip.pointer, dim)
            RowKernels.widen(roundTrip.pointer, from: type, dst, dim)
        }
    }

    /// Attention of the query heads of `kvHead` over the first `count` tokens of the
    /// conversation (file and batch alike), e.g. `tokenCount + index + 1` for batch token `index`.
    public func attend(layer: Int, kvHead: Int, queries: UnsafePointer<Float>, count: Int, scale: Float? = nil,
                       output: UnsafeMutablePointer<Float>) throws {
        guard count >= 1, count <= tokenCount + staged else {
            throw KVPackError.argument("attention over \(count) tokens; the session holds \(tokenCount + staged)")
        }
        let fromFile = min(count, mirrorStart)
        let extra = count - fromFile
        let k = geometry.stream(layer: layer, kvHead: kvHead, kind: .key)
        let rows = extra > 0 ? AppendedRows(keys: row(stream: k, index: 0), values: row(stream: k + 1, index: 0), count: extra) : nil
        // Always through the reader, even before the file holds a token: its segment-by-segment
        // softmax is what makes a resumed session compute exactly what an uninterrupted one did.
        try reader.attend(layer: layer, kvHead: kvHead, queries: queries, tokens: 0 ..< fromFile, scale: scale,
                          appending: rows, output: output, workspace: workspace)
    }

    /// Appends the batch to the file. When a segment sealed, commits and rereads the file, so
    /// the sealed blocks are attended from it from now on.
    public func endBatch() throws {
        guard staged > 0 else { return }
        let first = tokenCount - mirrorStart
        let sealedBefore = writer.sealedTokenCount
        let g = geometry
        let layout = KVBatchLayout(layerStride: 2 * g.kvHeadCount * capacity * dim, tokenStride: dim, headStride: 2 * capacity * dim)
        let total = streamCount * capacity * dim
        let keys = UnsafeBufferPointer(start: row(stream: 0, index: first), count: total - first * dim)
        let values = UnsafeBufferPointer(start: row(stream: 1, index: first), count: total - (capacity + first) * dim)
        try writer.append(tokenIDs: stagedIDs, positions: stagedPositions, keys: keys, values: values, layout: layout)
        tokenIDs += stagedIDs
        nextPosition = (stagedPositions.last ?? nextPosition - 1) + 1
        staged = 0
        if writer.sealedTokenCount != sealedBefore { try commit(refresh: true) }
    }

    /// Makes everything appended durable (the writer's durability) and visible to readers.
    public func commit() throws { try commit(refresh: false) }

    private func commit(refresh: Bool) throws {
        guard staged == 0 else { throw KVPackError.argument("commit during a batch; end it first") }
        try writer.commit()
        if refresh {
            reader = try KVPackReader(path: path, arithmetic: reader.arithmetic)
            mirrorStart = reader.tokenCount
        }
    }

    /// Commits and releases the file.
    public func close() throws {
        guard staged == 0 else { throw KVPackError.argument("close during a batch; end it first") }
        try writer.close()
    }
}
