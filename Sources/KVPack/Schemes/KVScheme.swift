/// What a scheme needs to know about the file it lives in.
public struct SchemeContext: Sendable {
    public var geometry: ModelGeometry
    public var segmentTokens: Int
    public var rope: RoPEConfig
    /// Whether this instance encodes keys or values (a scheme may support only one).
    public var role: KVKind
    /// The blobs the descriptor names, in the descriptor's order.
    public var blobs: [Blob]
    /// Which arithmetic attention over codes uses (readers choose; decoding is the same).
    public var arithmetic: AttentionArithmetic
    /// How an encoder that fits a range per group chooses it (writers choose; the bytes' meaning
    /// is the same either way).
    public var rangeFit: RangeFit

    public var headDim: Int { geometry.headDim }

    public init(geometry: ModelGeometry, segmentTokens: Int, rope: RoPEConfig, role: KVKind, blobs: [Blob] = [],
                arithmetic: AttentionArithmetic = .fast, rangeFit: RangeFit = .minMax) {
        self.geometry = geometry
        self.segmentTokens = segmentTokens
        self.rope = rope
        self.role = role
        self.blobs = blobs
        self.arithmetic = arithmetic
        self.rangeFit = rangeFit
    }

    /// What scheme `index` of `manifest` is built with: the file's geometry, segment size and
    /// RoPE, the role its streams play (keys if any layer uses it for keys), and the blobs it
    /// names, in order.
    public init(manifest: Manifest, scheme index: Int, blobs: [Blob], arithmetic: AttentionArithmetic = .fast,
                rangeFit: RangeFit = .minMax) {
        let role: KVKind = manifest.layerSchemes.contains { $0.key == index } ? .key : .value
        self.init(geometry: manifest.geometry, segmentTokens: manifest.segmentTokens, rope: manifest.rope, role: role, blobs: blobs,
                  arithmetic: arithmetic, rangeFit: rangeFit)
    }
}

/// How an encoder chooses the range a group of codes covers (the int scheme's scale and offset).
/// Decoding does not depend on it.
public enum RangeFit: String, Sendable, Equatable, CaseIterable {
    /// The range with the smallest squared error found by a search over clipped ranges, each
    /// refitted by least squares (values beyond it are clipped): on near-Gaussian data 2-bit
    /// groups of 64 lose about half the squared error of `minMax`. Not the default: clipping
    /// outliers raised SmolLM2's perplexity (`SchemeSpec.FileOptions.defaultValueFit`).
    case minimumError = "mse"
    /// The group's minimum and maximum: every element decodes within half a step. The default.
    case minMax = "minmax"
}

/// What a scheme's spec arguments turn into: the descriptor for one role, plus blobs the file
/// must embed for it (their ids are assigned when the plan is built).
public struct SchemeSetup: Sendable {
    public var descriptor: SchemeDescriptor
    public var blobs: [Blob]
    /// The file's segmentTokens this setup needs (a scheme's residual window, `int:...:r128`).
    public var segmentTokens: Int?

    public init(descriptor: SchemeDescriptor, blobs: [Blob] = [], segmentTokens: Int? = nil) {
        self.descriptor = descriptor
        self.blobs = blobs
        self.segmentTokens = segmentTokens
    }
}

/// A planner's answer for a spec like `int:auto:3.0`: the key and value setups of every layer,
/// and why.
public struct PlannedSchemes: Sendable {
    public var layers: [LayerSetup]
    public var rationale: [String]

    public init(layers: [LayerSetup], rationale: [String]) {
        self.layers = layers
        self.rationale = rationale
    }
}

/// A spec part that asks a planner (`int:auto:3.0`, `svdq:2`), its arguments already checked:
/// what remains is to run it on calibration statistics (SchemeSpec's second step).
public struct SchemePlanner {
    /// What the planner needs the statistics for, said when none are supplied.
    public var needs: String
    /// Set when the planner needs `CacheStatistics.sensitivity`: the per-layer setups to probe
    /// each layer with (one layer's keys, or values, coded so; everything else lossless).
    public var sensitivityProbe: LayerSetup?
    /// Whether the planner uses the statistics' `queryRMS` when a tool that runs the model can
    /// record them (it plans without them otherwise).
    public var usesQueryStatistics: Bool
    let plan: (CacheStatistics) throws -> PlannedSchemes

    public init(needs: String, sensitivityProbe: LayerSetup? = nil, usesQueryStatistics: Bool = false,
                plan: @escaping (CacheStatistics) throws -> PlannedSchemes) {
        self.needs = needs
        self.sensitivityProbe = sensitivityProbe
        self.usesQueryStatistics = usesQueryStatistics
        self.plan = plan
    }
}

/// One encoding of a stream's sealed blocks. A scheme is one file: it parses its spec
/// arguments, validates its (untrusted) descriptor, encodes rows into a block payload and
/// decodes and attends over that payload in place.
///
/// Kernels take raw pointers into mapped pages. A block holds `segmentTokens` rows; `tokens`
/// ranges are block-local. The reader has already checked the payload's size
/// (`encodedBlockSize`) and checksum, and called `validate(block:)` once, before any kernel
/// sees it, so kernels do not re-check.
public protocol KVScheme: Sendable {
    static var kind: SchemeKind { get }
    /// The name used in scheme specs ("raw"); by default the kind's name in Spec 7.2's registry.
    static var name: String { get }
    /// Syntax of the spec arguments, for `--help`.
    static var specSyntax: String { get }
    /// One line on what the scheme stores, for `--help`.
    static var summary: String { get }
    /// Builds the descriptor for `role` from the spec's arguments (the parts after "name:").
    static func setup(arguments: [String], role: KVKind, geometry: ModelGeometry) throws -> SchemeSetup
    /// For arguments that ask a planner (`auto:...`), the planner (arguments checked now, run on
    /// calibration statistics later); nil for arguments that describe one setup (`setup`).
    static func planner(arguments: [String], geometry: ModelGeometry) throws -> SchemePlanner?

    /// Validates a descriptor read from a file and prepares the codec. An invalid parameter is an
    /// error whose `offset` is the parameter byte's index (nil: the parameters as a whole); the
    /// reader adds where the descriptor's parameters lie in the file.
    init(descriptor: SchemeDescriptor, context: SchemeContext) throws

    var descriptor: SchemeDescriptor { get }
    /// The spec that builds this descriptor (`raw:f16:zstd=3`), for `info` and reports.
    var specString: String { get }
    /// Whether sealed blocks are zstd-compressed (the frame flag must agree).
    var compressesBlocks: Bool { get }
    var compressionLevel: Int32 { get }
    /// Bytes of one (uncompressed) block of `tokens` rows.
    func encodedBlockSize(tokens: Int) -> Int
    /// Whether compressed blocks hold the block's bytes reordered (raw's byte planes): writers
    /// compress `bytesToCompress`, readers undo it with `blockFromDecompressed`.
    var compressesReorderedBytes: Bool { get }
    /// Zstd frames per compressed block (each an equal share of the block's bytes): 1, or one per
    /// byte plane.
    var compressedParts: Int { get }
    func bytesToCompress(_ block: UnsafeRawBufferPointer, tokens: Int, into out: UnsafeMutableRawBufferPointer)
    func blockFromDecompressed(_ bytes: UnsafeRawBufferPointer, tokens: Int, into out: UnsafeMutableRawBufferPointer)

    func encode(rows: UnsafePointer<Float>, tokens: Int, into block: UnsafeMutableRawBufferPointer)
    /// Content checks that a checksum cannot make (code values in range, ...).
    func validate(block: UnsafeRawBufferPointer, tokens: Int) throws
    func decode(block: UnsafeRawBufferPointer, tokens: Range<Int>, into out: UnsafeMutablePointer<Float>)

    /// Floats of per-query state `prepare` builds once per attention call.
    func queryStateSize(groupSize: Int) -> Int
    /// Turns `groupSize` queries (row-major, headDim each) into the scheme's query state,
    /// folding in the softmax scale (rotations, projections, lookup tables go here).
    func prepare(queries: UnsafePointer<Float>, groupSize: Int, scale: Float, into state: UnsafeMutablePointer<Float>)
    /// The same, told how many tokens the call will attend over: a scheme may build tables that
    /// pay off only over long spans (nsn's codeword lookup table). Attention calls this one; by
    /// default it is `prepare` above.
    func prepare(queries: UnsafePointer<Float>, groupSize: Int, scale: Float, tokenCount: Int, into state: UnsafeMutablePointer<Float>)
    /// scores[g * stride + (t - tokens.lowerBound)] = scaled q_g . k_t for every t in `tokens`.
    func scores(block: UnsafeRawBufferPointer, tokens: Range<Int>, state: UnsafePointer<Float>, groupSize: Int,
                into scores: UnsafeMutablePointer<Float>, stride: Int)
    /// acc[g * headDim ...] += sum over t of weights[g * stride + (t - lower)] * v_t, in the
    /// scheme's accumulator space (see `finishAccumulation`).
    func accumulate(block: UnsafeRawBufferPointer, tokens: Range<Int>, weights: UnsafePointer<Float>, stride: Int,
                    groupSize: Int, into acc: UnsafeMutablePointer<Float>)
    /// Maps the accumulator back to value space (e.g. an inverse rotation), once per call.
    func finishAccumulation(_ acc: UnsafeMutablePointer<Float>, groupSize: Int)
    /// The codec for one KV head's stream: schemes with per-head metadata (SVDq's per-head
    /// bases) return an instance bound to that head's; others return themselves. Readers and
    /// writers call it once per stream when they open a file.
    func forKVHead(_ head: Int) -> any KVScheme
}

extension KVScheme {
    /// The name used in scheme specs ("raw"): the kind's name in Spec 7.2's registry.
    public static var name: String { kind.name ?? kind.description }
    public static func planner(arguments: [String], geometry: ModelGeometry) throws -> SchemePlanner? { nil }
    public var compressionLevel: Int32 { 0 }
    public var compressesReorderedBytes: Bool { false }
    public var compressedParts: Int { 1 }
    public func bytesToCompress(_ block: UnsafeRawBufferPointer, tokens: Int, into out: UnsafeMutableRawBufferPointer) {}
    public func blockFromDecompressed(_ bytes: UnsafeRawBufferPointer, tokens: Int, into out: UnsafeMutableRawBufferPointer) {}
    public func validate(block: UnsafeRawBufferPointer, tokens: Int) throws {}
    public func finishAccumulation(_ acc: UnsafeMutablePointer<Float>, groupSize: Int) {}
    public func prepare(queries: UnsafePointer<Float>, groupSize: Int, scale: Float, tokenCount: Int, into state: UnsafeMutablePointer<Float>) {
        prepare(queries: queries, groupSize: groupSize, scale: scale, into: state)
    }
    public func forKVHead(_ head: Int) -> any KVScheme { self }
}

/// Every scheme this build implements. Adding a scheme: one file, one line here.
public enum SchemeRegistry {
    public static let all: [any KVScheme.Type] = [
        RawScheme.self,
        IntScheme.self,
        PolarScheme.self,
        SVDqScheme.self,
        NSNScheme.self,
    ]

    public static func type(for kind: SchemeKind) -> (any KVScheme.Type)? {
        all.first { $0.kind == kind }
    }

    public static func type(named name: String) -> (any KVScheme.Type)? {
        all.first { $0.name == name }
    }

    public static func make(descriptor: SchemeDescriptor, context: SchemeContext) throws -> any KVScheme {
        guard let t = type(for: descriptor.kind) else {
            throw KVPackError(.unknownScheme, field: "manifest.schemes.kind",
                              "scheme kind \(descriptor.kind.rawValue) is not implemented by this reader (known: \(all.map { "\($0.kind.rawValue) \($0.name)" }.joined(separator: ", ")))")
        }
        return try t.init(descriptor: descriptor, context: context)
    }
}
