/// The key and value setups of one layer.
public struct LayerSetup: Sendable, Equatable {
    public var key: SchemeSetup
    public var value: SchemeSetup

    public init(key: SchemeSetup, value: SchemeSetup) {
        self.key = key
        self.value = value
    }
}

/// A scheme spec, step 1 of 2: the syntax and every part's arguments checked, setups built for
/// the parts that describe one, planners found (not run) for the parts that ask one. Step 2,
/// `planned(calibration:)`, runs the planners; `needsCalibration` says beforehand whether it
/// needs statistics, so a caller computes them only when asked (nothing is learnt by failing).
public struct ParsedSchemeSpec {
    public let text: String
    public let geometry: ModelGeometry

    /// One `+`-separated part: the roles it sets, and either its setups or its planner.
    enum Part {
        case setups(roles: [KVKind], key: SchemeSetup?, value: SchemeSetup?)
        case planner(roles: [KVKind], SchemePlanner)
    }

    let parts: [Part]
    /// File-wide parts (`window:N`, `sinks:N`, `fit:minmax`).
    public let fileOptions: SchemeSpec.FileOptions

    /// Whether a part asks a planner, which `planned(calibration:)` must then be given statistics for.
    public var needsCalibration: Bool {
        parts.contains { if case .planner = $0 { true } else { false } }
    }

    /// The probe of the first planner that needs measured per-layer sensitivity (the statistics'
    /// `sensitivity`, which only a tool running the model can measure), if one does.
    public var sensitivityProbe: LayerSetup? {
        for case let .planner(_, planner) in parts { if let probe = planner.sensitivityProbe { return probe } }
        return nil
    }

    /// Whether a planner would use the queries' per-channel RMS (`CacheStatistics.queryRMS`).
    public var needsQueryStatistics: Bool {
        parts.contains { if case let .planner(_, planner) = $0 { planner.usesQueryStatistics } else { false } }
    }

    public init(_ text: String, geometry: ModelGeometry) throws {
        self.text = text
        self.geometry = geometry
        var parts: [Part] = []
        var fileOptions = SchemeSpec.FileOptions()
        let pieces = text.split(separator: "+", omittingEmptySubsequences: false).map(String.init)
        for part in pieces {
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
            if try fileOptions.parse(fields, roles: roles, part: part) { continue }
            guard let name = fields.first, !name.isEmpty else {
                throw KVPackError.argument("scheme spec \"\(text)\": empty part \"\(part)\"")
            }
            guard let type = SchemeRegistry.type(named: name) else {
                throw KVPackError.argument("scheme spec \"\(text)\": unknown scheme \"\(name)\"; known schemes:\n\(SchemeSpec.help)")
            }
            let arguments = Array(fields.dropFirst())
            if let planner = try type.planner(arguments: arguments, geometry: geometry) {
                parts.append(.planner(roles: roles, planner))
                continue
            }
            var key: SchemeSetup?, value: SchemeSetup?
            for role in roles {
                do {
                    let setup = try type.setup(arguments: arguments, role: role, geometry: geometry)
                    if role == .key { key = setup } else { value = setup }
                } catch let e as KVPackError where roles.count == 2 && e.code == .invalidArgument {
                    // A both-roles part may name a scheme that supports one role only; a later
                    // "k:" or "v:" part must then supply the other (checked when planned).
                    if pieces.count == 1 { throw e }
                }
            }
            parts.append(.setups(roles: roles, key: key, value: value))
        }
        guard !parts.isEmpty else { throw KVPackError.argument("scheme spec \"\(text)\" names no scheme") }
        self.parts = parts
        self.fileOptions = fileOptions
    }

    /// Step 2: every layer's key and value setups. `calibration` is needed exactly when
    /// `needsCalibration`; parts apply in order, a later one overriding an earlier one's roles.
    public func planned(calibration: CacheStatistics?) throws -> SchemeSpec {
        let n = geometry.layerCount
        var key: [SchemeSetup?] = Array(repeating: nil, count: n)
        var value = key
        var rationale: [String] = []
        for part in parts {
            switch part {
            case let .setups(roles, k, v):
                for l in 0 ..< n {
                    if roles.contains(.key) { key[l] = k }
                    if roles.contains(.value) { value[l] = v }
                }
            case let .planner(roles, planner):
                guard let calibration else { throw KVPackError(.needsCalibration, planner.needs) }
                let planned = try planner.plan(calibration)
                guard planned.layers.count == n else {
                    throw KVPackError.argument("scheme spec \"\(text)\": the planner returned \(planned.layers.count) layers for \(n)")
                }
                for (l, setup) in planned.layers.enumerated() {
                    if roles.contains(.key) { key[l] = setup.key }
                    if roles.contains(.value) { value[l] = setup.value }
                }
                rationale += planned.rationale
            }
        }
        var layers: [LayerSetup] = []
        for l in 0 ..< n {
            guard let k = key[l] else { throw KVPackError.argument("scheme spec \"\(text)\" sets no key scheme") }
            guard let v = value[l] else { throw KVPackError.argument("scheme spec \"\(text)\" sets no value scheme") }
            layers.append(LayerSetup(key: k, value: v))
        }
        let hints = Set(layers.flatMap { [$0.key.segmentTokens, $0.value.segmentTokens] }.compactMap { $0 })
        guard hints.count <= 1 else {
            throw KVPackError.argument("scheme spec \"\(text)\" asks for different residual windows \(hints.sorted()); one file has one segment size")
        }
        return SchemeSpec(text: text, layers: layers, segmentTokens: hints.first, rationale: rationale, fileOptions: fileOptions)
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
    /// The spec's file-wide parts.
    public var fileOptions: FileOptions

    public init(text: String, layers: [LayerSetup], segmentTokens: Int?, rationale: [String], fileOptions: FileOptions = FileOptions()) {
        self.text = text
        self.layers = layers
        self.segmentTokens = segmentTokens
        self.rationale = rationale
        self.fileOptions = fileOptions
    }

    /// Parts of a spec that set something of the whole file rather than a scheme:
    /// `window:N` (the newest N tokens stay lossless: segments seal N tokens late), `sinks:N`
    /// (the first N tokens stay lossless: a `SINK` frame holds them) and
    /// `[k:|v:]fit:mse|minmax` (how encoders choose their ranges, for both roles or one).
    public struct FileOptions: Sendable, Equatable {
        public var windowTokens = 0
        public var sinkTokens = 0
        public var keyFit = defaultKeyFit
        public var valueFit = defaultValueFit

        /// Min/max for both, measured (BENCHMARKS.md, "Ranges chosen for error"): on SmolLM2,
        /// minimum-error ranges cut the values' squared error by a quarter and the sampled
        /// attention error too, yet raise the perplexity (int:k4v2:kc64 +2.08 against +1.91;
        /// keys as well: +2.18), since they clip the outliers (sink tokens' keys, massive value
        /// channels) the model leans on; on the bundled stories260K model they lower it a lot.
        public static let defaultKeyFit = RangeFit.minMax
        public static let defaultValueFit = RangeFit.minMax

        public init() {}

        static let names = ["window", "sinks", "fit"]

        /// Takes a part (its `:`-separated fields and the roles its prefix names) if it is a
        /// file-wide part; false if it is a scheme part.
        mutating func parse(_ fields: [String], roles: [KVKind], part: String) throws -> Bool {
            guard let name = fields.first, Self.names.contains(name) else { return false }
            guard name == "fit" || roles.count == 2 else {
                throw KVPackError.argument("scheme spec part \"\(part)\": \(name) is the whole file's, not one role's")
            }
            guard fields.count == 2 else {
                throw KVPackError.argument("scheme spec part \"\(part)\": \(name) takes one argument, as in window:128, sinks:4 or fit:minmax")
            }
            if name == "fit" {
                guard let fit = RangeFit(rawValue: fields[1]) else {
                    throw KVPackError.argument("fit:\(fields[1]): the range fits are \(RangeFit.allCases.map(\.rawValue).joined(separator: " and "))")
                }
                if roles.contains(.key) { keyFit = fit }
                if roles.contains(.value) { valueFit = fit }
                return true
            }
            guard let n = Int(fields[1]), (0 ... Manifest.maxWindowTokens).contains(n) else {
                throw KVPackError.argument("\(name):\(fields[1]): a token count in 0...\(Manifest.maxWindowTokens)")
            }
            if name == "window" { windowTokens = n } else { sinkTokens = n }
            return true
        }
    }

    /// The first layer's setups (all layers', unless a planner chose per layer).
    public var key: SchemeSetup { layers[0].key }
    public var value: SchemeSetup { layers[0].value }
    public var description: String { text }

    /// Parses `text` for a cache of `geometry` (step 1) and plans it (step 2). A part that asks
    /// a planner (`int:auto:3.0`, `svdq:2`) needs `calibration`: statistics of a cache of the
    /// same model; without them this throws `needsCalibration`, saying what the planner needs.
    public static func parse(_ text: String, geometry: ModelGeometry, calibration: CacheStatistics? = nil) throws -> SchemeSpec {
        try ParsedSchemeSpec(text, geometry: geometry).planned(calibration: calibration)
    }

    /// Parses `text`, calling `calibrate` only when a planner in it needs statistics.
    public static func parse(_ text: String, geometry: ModelGeometry, calibrate: () throws -> CacheStatistics) throws -> SchemeSpec {
        let parsed = try ParsedSchemeSpec(text, geometry: geometry)
        return try parsed.planned(calibration: parsed.needsCalibration ? calibrate() : nil)
    }

    /// The segmentTokens a file for this spec uses: the spec's residual window, else `requested`,
    /// else `fallback`. A conflict between the spec and an explicit request is an error.
    public func segmentTokens(requested: Int?, fallback: Int) throws -> Int {
        if let mine = segmentTokens, let requested, mine != requested {
            throw KVPackError.argument("scheme spec \"\(text)\" sets a residual window of \(mine) tokens, but \(requested) tokens per segment were asked for")
        }
        return segmentTokens ?? requested ?? fallback
    }

    /// What a file records of the spec: `scheme.spec`, and `scheme.plan.N` for each line of a
    /// planner's rationale.
    public var metadata: [Manifest.MetadataEntry] {
        [.init("scheme.spec", text)] + rationale.enumerated().map { .init("scheme.plan.\($0.offset)", $0.element) }
    }

    public static var help: String {
        SchemeRegistry.all.map { "  \($0.name):\($0.specSyntax)\n      \($0.summary)" }.joined(separator: "\n") + "\n" + fileOptionsHelp
    }

    /// The file-wide parts any spec may add.
    public static let fileOptionsHelp = """
          +window:N   the newest N tokens stay lossless (f16): segments seal N tokens late (format 2.3)
          +sinks:N    the first N tokens (at most a segment) stay lossless (format 2.3)
          +[k:|v:]fit:mse|minmax   how int codes (and polar radii) choose each range: least squared error, or
                      min/max (the default: clipping raised SmolLM2's perplexity, BENCHMARKS.md)
        """
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
