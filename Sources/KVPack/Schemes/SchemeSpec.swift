/// The scheme-spec syntax shared by the writer, `synth`, `convert` and `eval`.
///
///     spec  := part ("+" part)*
///     part  := [("k:" | "v:")] name (":" argument)*
///
/// A part without a role prefix sets both keys and values; a later part overrides an earlier
/// one for its role. Examples: `raw:f16`, `raw:bf16:zstd`, `raw:f32+v:raw:f16:zstd=9`.
public struct SchemeSpec: Sendable, Equatable, CustomStringConvertible {
    public var text: String
    public var key: SchemeSetup
    public var value: SchemeSetup

    public var description: String { text }

    public static func parse(_ text: String, geometry: ModelGeometry) throws -> SchemeSpec {
        var key: SchemeSetup?
        var value: SchemeSetup?
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
            for role in roles {
                do {
                    let setup = try type.setup(arguments: Array(fields.dropFirst()), role: role, geometry: geometry)
                    if role == .key { key = setup } else { value = setup }
                } catch let e as KVPackError where roles.count == 2 && e.code == .invalidArgument {
                    // A both-roles part may name a scheme that supports one role only; a later
                    // "k:" or "v:" part must then supply the other.
                    if role == .key { key = nil } else { value = nil }
                    if parts.count == 1 { throw e }
                }
            }
        }
        guard let key else { throw KVPackError.argument("scheme spec \"\(text)\" sets no key scheme") }
        guard let value else { throw KVPackError.argument("scheme spec \"\(text)\" sets no value scheme") }
        return SchemeSpec(text: text, key: key, value: value)
    }

    public static var help: String {
        SchemeRegistry.all.map { "  \($0.name):\($0.specSyntax)\n      \($0.summary)" }.joined(separator: "\n")
    }
}

extension SchemeSetup: Equatable {
    public static func == (a: SchemeSetup, b: SchemeSetup) -> Bool {
        a.descriptor == b.descriptor && a.blobs == b.blobs
    }
}

/// The schemes of every layer, ready for a manifest: deduplicated descriptors and blobs with
/// ids assigned.
public struct SchemePlan: Sendable, Equatable {
    public var schemes: [SchemeDescriptor]
    public var layerSchemes: [LayerSchemes]
    public var blobs: [Blob]

    /// One spec for every layer.
    public init(spec: SchemeSpec, layerCount: Int) {
        self.init(layers: Array(repeating: (spec.key, spec.value), count: layerCount))
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
