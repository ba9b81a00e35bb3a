import KVPack

/// Where a forward pass keeps and attends its keys and values. A batch of tokens is begun,
/// each layer stores its rows and attends, and the batch is ended.
public protocol KVCache: AnyObject {
    var geometry: ModelGeometry { get }
    /// Tokens stored before the batch in progress.
    var tokenCount: Int { get }
    func beginBatch(tokenIDs: [UInt32], positions: [UInt32]?) throws
    /// RoPE positions of the batch in progress.
    var batchPositions: [UInt32] { get }
    /// The position a token appended next would take.
    var nextPosition: UInt32 { get }
    /// Rows of batch token `index` for `layer`: kvHeads x headDim floats each.
    func store(layer: Int, index: Int, keys: UnsafePointer<Float>, values: UnsafePointer<Float>)
    /// Attention of `kvHead`'s query group over the first `count` tokens (stored and batch).
    func attend(layer: Int, kvHead: Int, queries: UnsafePointer<Float>, count: Int, scale: Float?,
                output: UnsafeMutablePointer<Float>) throws
    func endBatch() throws
}

extension KVCacheSession: KVCache {}

/// An in-memory f32 cache, as llama2.c keeps it: the reference the file-backed session is
/// compared with, and the fast path for generating evaluation text.
public final class DenseKVCache: KVCache {
    public let geometry: ModelGeometry
    /// [layer][kvHead][token][headDim], grown by doubling.
    private var keys: [[Float]]
    private var values: [[Float]]
    private var capacity = 0
    public private(set) var tokenCount = 0
    private var staged = 0
    public private(set) var batchPositions: [UInt32] = []
    public private(set) var nextPosition: UInt32 = 0
    private let workspace = AttentionWorkspace()

    public init(geometry: ModelGeometry) {
        self.geometry = geometry
        keys = Array(repeating: [], count: geometry.layerCount * geometry.kvHeadCount)
        values = keys
    }

    public func beginBatch(tokenIDs: [UInt32], positions: [UInt32]?) throws {
        staged = tokenIDs.count
        batchPositions = positions ?? (0 ..< staged).map { nextPosition + UInt32($0) }
        let need = tokenCount + staged
        if need > capacity {
            let newCapacity = max(need, 2 * capacity, 64)
            let d = geometry.headDim
            for i in keys.indices {
                keys[i] += [Float](repeating: 0, count: (newCapacity - capacity) * d)
                values[i] += [Float](repeating: 0, count: (newCapacity - capacity) * d)
            }
            capacity = newCapacity
        }
    }

    public func store(layer: Int, index: Int, keys k: UnsafePointer<Float>, values v: UnsafePointer<Float>) {
        let d = geometry.headDim
        for h in 0 ..< geometry.kvHeadCount {
            let i = layer * geometry.kvHeadCount + h
            let at = (tokenCount + index) * d
            keys[i].withUnsafeMutableBufferPointer { $0.baseAddress!.advanced(by: at).update(from: k + h * d, count: d) }
            values[i].withUnsafeMutableBufferPointer { $0.baseAddress!.advanced(by: at).update(from: v + h * d, count: d) }
        }
    }

    /// When set, every query that attends is added to it (the calibration that per-channel
    /// widths, `int:k2.5v2:kc64`, weight key channels with).
    public var querySums: QueryChannelSums?

    public func attend(layer: Int, kvHead: Int, queries: UnsafePointer<Float>, count: Int, scale: Float?,
                       output: UnsafeMutablePointer<Float>) throws {
        let i = layer * geometry.kvHeadCount + kvHead
        querySums?.add(layer: layer, kvHead: kvHead, queries: queries, count: geometry.groupSize)
        keys[i].withUnsafeBufferPointer { k in
            values[i].withUnsafeBufferPointer { v in
                workspace.attend(rows: AppendedRows(keys: k.baseAddress!, values: v.baseAddress!, count: count), queries: queries,
                                 groupSize: geometry.groupSize, headDim: geometry.headDim, scale: scale, output: output)
            }
        }
    }

    public func endBatch() throws {
        tokenCount += staged
        nextPosition = (batchPositions.last ?? nextPosition &- 1) &+ 1
        staged = 0
    }

    /// Stored rows of one stream, tokens x headDim.
    public func rows(layer: Int, kvHead: Int, kind: KVKind) -> ArraySlice<Float> {
        let i = layer * geometry.kvHeadCount + kvHead
        return (kind == .key ? keys[i] : values[i])[0 ..< tokenCount * geometry.headDim]
    }
}
