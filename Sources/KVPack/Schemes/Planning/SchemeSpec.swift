/// The key and value setups of one layer.
public struct LayerSetup: Sendable, Equatable {
    public var key: SchemeSetup
    public var value: SchemeSetup

    public init(key: SchemeSetup, value: SchemeSetup) {
        self.key = key
        self.value = value
    }
}

/// The scheme-spec syntax shared by the writer, `synth`, `generate`, `convert` and `eval`.
///
///     spec  := part ("+" part)*
///     part  := [("k:" | "v:")] name (":" argument)*
///
/// A part without a role prefix sets both keys and values; a later part overrides an earlier
/// one for its role. Examples: `raw:f16`, `raw:bf16:zstd`, `raw:f32+v:raw:f16:zstd=9`,
/// `int:k4v2`, `int:auto:3.0` (a planner chooses per layer from calibration statistics).
public struct SchemeSpec: Sendable, Equatable, CustomStringConvertible {
    public var text: String
    /// One entry per layer.
    public var layers: [LayerSetup]
    /// The file's segmentTokens the spec requires (a residual window), if it names one.
    public var segmentTokens: Int?
    /// How a planner chose per-layer settings (empty when none was involved).
    public var rationale: [String]

    /// The first layer's setups (all layers', unless a planner chose per layer).
    public var key: SchemeSetup { layers[0].key }
    public var value: SchemeSetup { layers[0].value }
    public var description: String { text }

    /// Parses `text` for a cache of `geometry`. A part that asks a planner (`int:auto:3.0`) needs
    /// `calibration`: statistics of a cache of the same model.
    public static func parse(_ text: String, geometry: ModelGeometry, calibration: CacheStatistics? = nil) throws -> SchemeSpec {
        var key: [SchemeSetup?] = Array(repeating: nil, count: geometry.layerCount)
        var value = key
        var rationale: [String] = []
        let parts = text.split(separator: "+", omittingEmptySubsequences: false).map(String.init)
        for part in parts {
            var roles: [KVKind] = [.key, .value]
            var body = Substring(part)
            if body.hasPrefix("k:") {
                roles = [.key]
                body = body.dropFirst(2)
            } else if body.hasPrefix("v:") {
                roles = [.value]
                body = body.dropFirst(2)
            }
            let fields = body.split(separator: ":", omittingEmptySubsequences: false).map(String.init)
            guard let name = fields.first, !name.isEmpty else {
                throw KVPackError.argument("scheme spec \"\(text)\": empty part \"\(part)\"")
            }
            guard let type = SchemeRegistry.type(named: name) else {
                throw KVPackError.argument("scheme spec \"\(text)\": unknown scheme \"\(name)\"; known schemes:\n\(SchemeSpec.help)")
            }
            let arguments = Array(fields.dropFirst())
            if let planned = try type.plan(arguments: arguments, geometry: geometry, calibration: calibration) {
                guard planned.layers.count == geometry.layerCount else {
                    throw KVPackError.argument("scheme spec \"\(text)\": the planner returned \(planned.layers.count) layers for \(geometry.layerCount)")
                }
                for (l, setup) in planned.layers.enumerated() {
                    if roles.contains(.key) { key[l] = setup.key }
                    if roles.contains(.value) { value[l] = setup.value }
                }
                rationale += planned.rationale
                continue
            }
            for role in roles {
                do {
                    let setup = try type.setup(arguments: arguments, role: role, geometry: geometry)
                    for l in 0 ..< geometry.layerCount {
                        if role == .key { key[l] = setup } else { value[l] = setup }
                    }
                } catch let e as KVPackError where roles.count == 2 && e.code == .invalidArgument {
                    // A both-roles part may name a scheme that supports one role only; a later
                    // "k:" or "v:" part must then supply the other.
                    for l in 0 ..< geometry.layerCount {
                        if role == .key { key[l] = nil } else { value[l] = nil }
                    }
                    if parts.count == 1 { throw e }
                }
            }
        }
        var layers: [LayerSetup] = []
        for l in 0 ..< geometry.layerCount {
            guard let k = key[l] else { throw KVPackError.argument("scheme spec \"\(text)\" sets no key scheme") }
            guard let v = value[l] else { throw KVPackError.argument("scheme spec \"\(text)\" sets no value scheme") }
            layers.append(LayerSetup(key: k, value: v))
        }
        let hints = Set(layers.flatMap { [$0.key.segmentTokens, $0.value.segmentTokens] }.compactMap { $0 })
        guard hints.count <= 1 else {
            throw KVPackError.argument("scheme spec \"\(text)\" asks for different residual windows \(hints.sorted()); one file has one segment size")
        }
        return SchemeSpec(text: text, layers: layers, segmentTokens: hints.first, rationale: rationale)
    }

    /// Parses `text`, calling `calibrate` only if a planner in it (`int:auto`) needs statistics.
    public static func parse(_ text: String, geometry: ModelGeometry, calibrate: () throws -> CacheStatistics) throws -> SchemeSpec {
        do {
            return try parse(text, geometry: geometry)
        } catch let e as KVPackError where e.code == .needsCalibration {
            return try parse(text, geometry: geometry, calibration: calibrate())
        }
    }

    /// The segmentTokens a file for this spec uses: the spec's residual window, else `requested`,
    /// else `fallback`. A conflict between the spec and an explicit request is an error.
    public func segmentTokens(requested: Int?, fallback: Int) throws -> Int {
        if let mine = segmentTokens, let requested, mine != requested {
            throw KVPackError.argument("scheme spec \"\(text)\" sets a residual window of \(mine) tokens, but \(requested) tokens per segment were asked for")
        }
        return segmentTokens ?? requested ?? fallback
    }

    public static var help: String {
        SchemeRegistry.all.map { "  \($0.name):\($0.specSyntax)\n      \($0.summary)" }.joined(separator: "\n")
    }
}

extension SchemeSetup: Equatable {
    public static func == (a: SchemeSetup, b: SchemeSetup) -> Bool {
        a.descriptor == b.descriptor && a.blobs == b.blobs && a.segmentTokens == b.segmentTokens
    }
}

/// The schemes of every layer, ready for a manifest: deduplicated descriptors and blobs with
/// ids assigned.
public struct SchemePlan: Sendable, Equatable {
    public var schemes: [SchemeDescriptor]
    public var layerSchemes: [LayerSchemes]
    public var blobs: [Blob]

    /// The spec's setups, layer by layer.
    public init(spec: SchemeSpec) {
        self.init(layers: spec.layers.map { ($0.key, $0.value) })
    }

    /// A (key, value) setup per layer; identical descriptors and blobs are stored once.
    public init(layers: [(key: SchemeSetup, value: SchemeSetup)]) {
        var schemes: [SchemeDescriptor] = []
        var blobs: [Blob] = []
        var layerSchemes: [LayerSchemes] = []
        func intern(_ setup: SchemeSetup) -> Int {
            var d = setup.descriptor
            d.blobIDs = setup.blobs.map { b -> UInt32 in
                if let existing = blobs.first(where: { $0.kind == b.kind && $0.elementType == b.elementType && $0.shape == b.shape && $0.bytes == b.bytes }) {
                    return existing.id
                }
                var copy = b
                copy.id = UInt32(blobs.count + 1)
                blobs.append(copy)
                return copy.id
            }
            if let i = schemes.firstIndex(of: d) { return i }
            schemes.append(d)
            return schemes.count - 1
        }
        for (k, v) in layers {
            layerSchemes.append(LayerSchemes(key: intern(k), value: intern(v)))
        }
        self.schemes = schemes
        self.layerSchemes = layerSchemes
        self.blobs = blobs
    }
}
