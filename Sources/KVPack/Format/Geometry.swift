/// The shape of a model's KV cache.
public struct ModelGeometry: Sendable, Equatable, Codable, CustomStringConvertible {
    public var layerCount: Int
    public var queryHeadCount: Int
    public var kvHeadCount: Int
    public var headDim: Int

    public init(layerCount: Int, queryHeadCount: Int, kvHeadCount: Int, headDim: Int) {
        self.layerCount = layerCount
        self.queryHeadCount = queryHeadCount
        self.kvHeadCount = kvHeadCount
        self.headDim = headDim
    }

    /// Query heads that share one KV head (the GQA group).
    public var groupSize: Int { queryHeadCount / kvHeadCount }
    /// One stream per (layer, KV head, K or V).
    public var streamCount: Int { layerCount * kvHeadCount * 2 }

    public func stream(layer: Int, kvHead: Int, kind: KVKind) -> Int {
        (layer * kvHeadCount + kvHead) * 2 + Int(kind.rawValue)
    }

    public func streamID(_ stream: Int) -> StreamID {
        StreamID(layer: stream / (2 * kvHeadCount), kvHead: (stream / 2) % kvHeadCount,
                 kind: stream % 2 == 0 ? .key : .value)
    }

    public var description: String {
        "\(layerCount) layers, \(queryHeadCount) query heads, \(kvHeadCount) KV heads, head_dim \(headDim)"
    }
}

public enum KVKind: UInt8, Sendable, Codable, CaseIterable, CustomStringConvertible {
    case key = 0
    case value = 1
    public var description: String { self == .key ? "K" : "V" }
}

public struct StreamID: Hashable, Sendable, CustomStringConvertible {
    public var layer: Int
    public var kvHead: Int
    public var kind: KVKind
    public var description: String { "layer \(layer) head \(kvHead) \(kind)" }
}

public enum RoPELayout: UInt8, Sendable, Codable, CustomStringConvertible {
    /// No rotary embedding (or unknown).
    case none = 0
    /// Pairs (2i, 2i+1), as llama2.c and GGUF Llama models rotate them.
    case interleaved = 1
    /// Pairs (i, i + d/2), the Hugging Face "rotate_half" layout.
    case rotateHalf = 2

    public var description: String {
        switch self {
        case .none: "none"
        case .interleaved: "interleaved"
        case .rotateHalf: "rotate-half"
        }
    }

    /// The layout `description` names ("none", "interleaved", "rotate-half").
    public init?(name: String) {
        guard let layout = [RoPELayout.none, .interleaved, .rotateHalf].first(where: { $0.description == name }) else { return nil }
        self = layout
    }
}

public struct RoPEConfig: Sendable, Equatable, Codable {
    public var theta: Double
    public var layout: RoPELayout
    /// Whether stored keys already carry the rotation (the norm: attention never rotates keys).
    public var keysArePostRoPE: Bool

    public init(theta: Double, layout: RoPELayout, keysArePostRoPE: Bool = true) {
        self.theta = theta
        self.layout = layout
        self.keysArePostRoPE = keysArePostRoPE
    }

    public static let none = RoPEConfig(theta: 0, layout: .none, keysArePostRoPE: false)
}

/// Bounds a version-1 file must respect; checked before anything is allocated from them.
public enum Limits {
    public static let maxLayers = 4096
    public static let maxKVHeads = 4096
    public static let maxQueryHeads = 65536
    public static let maxHeadDim = 4096
    public static let maxSegmentTokens = 65536
    /// segmentTokens x headDim, so one decoded block (f32) is at most 64 MiB; also bounds
    /// (queryHeads / kvHeads) x segmentTokens and (queryHeads / kvHeads) x headDim, the score
    /// rows and queries of one attention call.
    public static let maxBlockElements = 1 << 24
    public static let maxSchemes = 1024
    public static let maxTokens = Int(UInt32.max)
}
