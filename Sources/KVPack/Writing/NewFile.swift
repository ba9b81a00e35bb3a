/// Everything a new file needs before its first token: the model it caches (geometry, RoPE,
/// context length, fingerprint), the planned schemes, the segment size, who made it and what it
/// records. `KVPackWriter.create(path:file:options:)` and `KVCacheSession.create(path:file:options:)`
/// take it: the one way to turn a scheme spec into a file (plan, manifest, blobs, segment size).
public struct NewFile: Sendable {
    public var geometry: ModelGeometry
    public var rope: RoPEConfig
    /// The schemes of every layer (a parsed and planned spec, `SchemeSpec.parse`).
    public var schemes: SchemeSpec
    /// Tokens per sealed segment asked for; nil: the spec's residual window, else
    /// `defaultSegmentTokens`. Asking for a size the spec's window contradicts is an error.
    public var segmentTokens: Int?
    public var defaultSegmentTokens = 64
    /// The model's context length (0: unknown).
    public var maxPositions: UInt32 = 0
    /// 16 bytes identifying the model (zeros: unknown).
    public var modelFingerprint: [UInt8] = Array(repeating: 0, count: 16)
    public var producer: String
    /// The manifest's user metadata, in order (`schemes.metadata` records the spec and any plan).
    public var metadata: [Manifest.MetadataEntry] = []

    public init(geometry: ModelGeometry, rope: RoPEConfig, schemes: SchemeSpec, producer: String) {
        self.geometry = geometry
        self.rope = rope
        self.schemes = schemes
        self.producer = producer
    }

    /// The segment size the file gets (see `segmentTokens`).
    public func resolvedSegmentTokens() throws -> Int {
        try schemes.segmentTokens(requested: segmentTokens, fallback: defaultSegmentTokens)
    }

    /// `options` with what the spec asks of the encoders (`fit:minmax`).
    public func writerOptions(_ options: WriterOptions) -> WriterOptions {
        var o = options
        o.keyRangeFit = schemes.fileOptions.keyFit
        o.valueRangeFit = schemes.fileOptions.valueFit
        return o
    }

    /// The manifest and the blobs to embed: identical descriptors and blobs stored once.
    public func manifest() throws -> (manifest: Manifest, blobs: [Blob]) {
        guard schemes.layers.count == geometry.layerCount else {
            throw KVPackError.argument("the scheme spec was planned for \(schemes.layers.count) layers, the model has \(geometry.layerCount)")
        }
        let plan = SchemePlan(spec: schemes)
        let segment = try resolvedSegmentTokens()
        var m = Manifest(geometry: geometry, segmentTokens: segment, rope: rope, maxPositions: maxPositions,
                         modelFingerprint: modelFingerprint, schemes: plan.schemes, layerSchemes: plan.layerSchemes,
                         producer: producer, userMetadata: metadata)
        m.windowTokens = schemes.fileOptions.windowTokens
        m.sinkTokens = schemes.fileOptions.sinkTokens
        guard m.sinkTokens <= segment else {
            throw KVPackError.argument("sinks:\(m.sinkTokens): sinks lie in the first segment, which holds \(segment) tokens")
        }
        return (m, plan.blobs)
    }
}
