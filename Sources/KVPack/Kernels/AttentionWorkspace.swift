/// Scratch memory for decode and attention calls: score rows, prepared queries, the online-
/// softmax state, and the buffer compressed blocks are expanded into. Buffers only grow, so
/// steady-state calls allocate nothing. One workspace per thread; it is not shareable.
public final class AttentionWorkspace {
    private(set) var scores = GrowableFloats()
    private(set) var keyState = GrowableFloats()
    private(set) var tailState = GrowableFloats()
    private(set) var blockAcc = GrowableFloats()
    private(set) var tailAcc = GrowableFloats()
    private(set) var runMax = GrowableFloats()
    private(set) var runSum = GrowableFloats()
    private(set) var decompressed = GrowableBytes()
    private var reordered = GrowableBytes()
    private(set) var decodeRows = GrowableFloats()
    private var partials = GrowableFloats()
    private var zstd: Zstd.Decompressor?

    public init() {}

    var decompressor: Zstd.Decompressor {
        if let zstd { return zstd }
        let d = Zstd.Decompressor()
        zstd = d
        return d
    }

    func reserve(scores n: Int, keyState k: Int, tailState t: Int, acc a: Int, group g: Int) {
        scores.reserve(n)
        keyState.reserve(k)
        tailState.reserve(t)
        blockAcc.reserve(a)
        tailAcc.reserve(a)
        runMax.reserve(g)
        runSum.reserve(g)
    }

    /// Room for the online-softmax states of token ranges attended on several threads, merged
    /// afterwards (`KVPackReader.attendSplit`).
    func partialStates(_ floats: Int) -> UnsafeMutablePointer<Float> {
        partials.reserve(floats)
        return partials.pointer
    }

    func decompressionBuffer(_ bytes: Int) -> UnsafeMutableRawBufferPointer {
        decompressed.reserve(bytes)
        return UnsafeMutableRawBufferPointer(start: decompressed.pointer, count: bytes)
    }

    /// A decompressed block's bytes put back in order (raw's byte planes).
    func reorderBuffer(_ bytes: Int) -> UnsafeMutableRawBufferPointer {
        reordered.reserve(bytes)
        return UnsafeMutableRawBufferPointer(start: reordered.pointer, count: bytes)
    }

    func decodeBuffer(_ floats: Int) -> UnsafeMutablePointer<Float> {
        decodeRows.reserve(floats)
        return decodeRows.pointer
    }
}
