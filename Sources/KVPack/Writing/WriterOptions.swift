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
    /// Frames a created file will hold that a later minor version defines: the header records
    /// the lowest minor that defines them (Spec 3: `tsel` needs 1.4; `note` needs 1.5 or 2.1).
    public var features: FileFeatures = []
    /// How encoders choose each group's range (the int scheme's scale and offset), for key and
    /// for value streams: the least squared error or min/max (every element within half a step).
    /// Not recorded in the file; a scheme spec's `fit:` parts set them for files created from
    /// the spec.
    public var keyRangeFit: RangeFit = SchemeSpec.FileOptions.defaultKeyFit
    public var valueRangeFit: RangeFit = SchemeSpec.FileOptions.defaultValueFit
    /// Called after each sealed segment with the tokens appended so far (progress display).
    public var onSeal: (@Sendable (Int) -> Void)?

    public init() {}
}

/// Ancillary frames that need a later minor version than the file's schemes do.
public struct FileFeatures: OptionSet, Sendable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    /// A `tsel` frame (token selection): 1.4; every 2.x.
    public static let tokenSelection = FileFeatures(rawValue: 1)
    /// `note` frames (metadata added after creation): 1.5, 2.1.
    public static let notes = FileFeatures(rawValue: 2)

    /// The lowest minor of `major` that defines these features.
    public func requiredMinor(major: UInt16) -> UInt16 {
        if major == 1 { return contains(.notes) ? 5 : contains(.tokenSelection) ? 4 : 0 }
        return contains(.notes) ? 1 : 0
    }
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
