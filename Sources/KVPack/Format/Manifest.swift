/// Registry numbers of the encodings a stream may use (Spec/: "Scheme kinds").
public struct SchemeKind: RawRepresentable, Hashable, Sendable, Codable, CustomStringConvertible {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }

    public static let raw = SchemeKind(rawValue: 1)
    public static let int = SchemeKind(rawValue: 2)
    public static let polar = SchemeKind(rawValue: 3)
    public static let svdq = SchemeKind(rawValue: 4)
    public static let nsn = SchemeKind(rawValue: 5)

    /// The name specs use for the kind (Spec 7.2's registry), nil for a number not registered.
    public var name: String? {
        switch self {
        case .raw: "raw"
        case .int: "int"
        case .polar: "polar"
        case .svdq: "svdq"
        case .nsn: "nsn"
        default: nil
        }
    }

    public var description: String { name ?? "scheme#\(rawValue)" }

    /// The minor format version that defined this kind (Spec/ 7.2, 15).
    public var introducedInMinor: UInt16 {
        switch self {
        case .raw: 0
        case .int: 1
        case .polar, .svdq: 2
        default: 3
        }
    }
}

/// How one stream (a layer's keys or values) is encoded: the scheme's kind, its parameters
/// (bytes whose layout the scheme's section of Spec/ defines), the blobs it needs, and the
/// element type of the stream's unsealed tail rows.
public struct SchemeDescriptor: Hashable, Sendable {
    public var kind: SchemeKind
    public var residualType: ElementType
    public var parameters: [UInt8]
    public var blobIDs: [UInt32]

    public init(kind: SchemeKind, residualType: ElementType, parameters: [UInt8], blobIDs: [UInt32] = []) {
        self.kind = kind
        self.residualType = residualType
        self.parameters = parameters
        self.blobIDs = blobIDs
    }
}

/// The scheme indices (into `Manifest.schemes`) of one layer's keys and values.
public struct LayerSchemes: Hashable, Sendable {
    public var key: Int
    public var value: Int
    public init(key: Int, value: Int) {
        self.key = key
        self.value = value
    }
}

/// The first frame of every file (Spec/: "Manifest"). Immutable once written.
public struct Manifest: Sendable, Equatable {
    public var geometry: ModelGeometry
    /// Tokens per sealed block; every stream seals at the same multiples of it.
    public var segmentTokens: Int
    public var rope: RoPEConfig
    /// The model's context length, 0 when unknown.
    public var maxPositions: UInt32
    /// 16 opaque bytes identifying the model (geometry + weights hash); zeros when unknown.
    public var modelFingerprint: [UInt8]
    public var schemes: [SchemeDescriptor]
    public var layerSchemes: [LayerSchemes]
    public var producer: String
    public var userMetadata: [MetadataEntry]
    /// The newest tokens kept lossless (Spec 6.1, since 2.3): a segment seals only once
    /// `windowTokens` newer tokens follow it, so at least that many stay in tail runs.
    public var windowTokens: Int = 0
    /// The first tokens kept lossless (since 2.3), at most `segmentTokens`: once segment 0
    /// seals, a `SINK` frame holds their rows and readers take rows `[0, sinkTokens)` from it
    /// instead of from segment 0's blocks (attention sinks: the first tokens draw much of every
    /// query's attention, so their keys' error costs the most).
    public var sinkTokens: Int = 0

    /// Whether the file keeps a lossless window or sinks (manifest flag bit 1
    /// `LOSSLESS_TOKENS`, format 2.3).
    public var keepsLosslessTokens: Bool { windowTokens > 0 || sinkTokens > 0 }
    /// Bound on `windowTokens`.
    public static let maxWindowTokens = 65536

    public struct MetadataEntry: Hashable, Sendable, Codable {
        public var key: String
        public var value: String
        public init(_ key: String, _ value: String) {
            self.key = key
            self.value = value
        }
    }

    public init(geometry: ModelGeometry, segmentTokens: Int, rope: RoPEConfig, maxPositions: UInt32 = 0,
                modelFingerprint: [UInt8] = Array(repeating: 0, count: 16), schemes: [SchemeDescriptor],
                layerSchemes: [LayerSchemes], producer: String, userMetadata: [MetadataEntry] = []) {
        self.geometry = geometry
        self.segmentTokens = segmentTokens
        self.rope = rope
        self.maxPositions = maxPositions
        self.modelFingerprint = modelFingerprint
        self.schemes = schemes
        self.layerSchemes = layerSchemes
        self.producer = producer
        self.userMetadata = userMetadata
    }

    /// The user metadata value of `key` (keys are unique), nil when the file does not record it.
    public func metadata(_ key: String) -> String? {
        userMetadata.first { $0.key == key }?.value
    }

    /// A fingerprint as 32 hex digits.
    public static func fingerprintText(_ bytes: [UInt8]) -> String {
        bytes.map { String($0, radix: 16).leftPadded(to: 2) }.joined()
    }

    /// The lowest minor version whose readers know every feature this manifest uses.
    public var requiredMinorVersion: UInt16 { schemes.map(\.kind.introducedInMinor).max() ?? 0 }

    /// The lowest 2.x minor that defines every scheme parameter the manifest uses: 4 when an int
    /// descriptor has per-channel widths (Spec/ 7.2, scheme 2, parameter byte 4, bit 1); 3 with
    /// lossless tokens or raw byte planes; 2 when an int descriptor sets its signed-scales flag
    /// (bit 0).
    public var requiredMinorVersion2: UInt16 {
        if schemes.contains(where: { $0.kind == .int && $0.parameters.count > 8 && $0.parameters[4] & 2 != 0 }) { return 4 }
        if keepsLosslessTokens { return 3 }
        if schemes.contains(where: { $0.kind == .raw && $0.parameters.count == 4 && $0.parameters[1] == 2 }) { return 3 }
        return schemes.contains { $0.kind == .int && $0.parameters.count == 8 && $0.parameters[4] & 1 != 0 } ? 2 : 0
    }

    /// Tokens of `tokenCount` committed ones that sit in sealed segments: every full segment with
    /// at least `windowTokens` tokens after it.
    public func sealedTokens(of tokenCount: Int) -> Int {
        tokenCount > windowTokens ? (tokenCount - windowTokens) / segmentTokens * segmentTokens : 0
    }

    public func schemeIndex(layer: Int, kind: KVKind) -> Int {
        kind == .key ? layerSchemes[layer].key : layerSchemes[layer].value
    }

    public func scheme(forStream stream: Int) -> Int {
        let id = geometry.streamID(stream)
        return schemeIndex(layer: id.layer, kind: id.kind)
    }

    /// Where scheme `index`'s parameter bytes begin, counted from the manifest payload's start
    /// (6.2: the fixed part, the layer schemes, then each descriptor's 8-byte head, parameters
    /// and blob ids), so an invalid parameter is reported at its own offset.
    public func parameterOffset(scheme index: Int) -> Int {
        var at = Self.fixedSize + 4 * layerSchemes.count
        for s in schemes.prefix(index) { at += 8 + s.parameters.count + 4 * s.blobIDs.count }
        return at + 8
    }

    static let fixedSize = 64
    static let keysPostRoPEFlag: UInt32 = 1
    static let losslessTokensFlag: UInt32 = 2

    public func encoded() -> [UInt8] {
        var w = ByteWriter(capacity: 256)
        w.write(UInt32(geometry.layerCount))
        w.write(UInt32(geometry.queryHeadCount))
        w.write(UInt32(geometry.kvHeadCount))
        w.write(UInt32(geometry.headDim))
        w.write(UInt32(segmentTokens))
        w.write((rope.keysArePostRoPE ? Self.keysPostRoPEFlag : 0) | (keepsLosslessTokens ? Self.losslessTokensFlag : 0))
        w.write(rope.theta)
        w.write(rope.layout.rawValue)
        w.write(UInt8(0))
        w.write(UInt16(schemes.count))
        w.write(maxPositions)
        w.write(bytes: modelFingerprint)
        w.write(UInt32(windowTokens))
        w.write(UInt32(sinkTokens))
        for l in layerSchemes {
            w.write(UInt16(l.key))
            w.write(UInt16(l.value))
        }
        for s in schemes {
            w.write(s.kind.rawValue)
            w.write(s.residualType.rawValue)
            w.write(UInt8(0))
            w.write(UInt16(s.parameters.count))
            w.write(UInt16(s.blobIDs.count))
            w.write(bytes: s.parameters)
            for id in s.blobIDs { w.write(id) }
        }
        let producerBytes = Array(producer.utf8.prefix(Int(UInt16.max)))
        w.write(UInt16(producerBytes.count))
        w.write(bytes: producerBytes)
        w.write(UInt32(userMetadata.count))
        Self.encode(metadata: userMetadata, into: &w)
        return w.bytes
    }

    /// Metadata entries as the manifest and `note` frames store them: `u16 keyLength, key,
    /// u32 valueLength, value` each (Spec 6.2).
    static func encode(metadata: [MetadataEntry], into w: inout ByteWriter) {
        for e in metadata {
            let k = Array(e.key.utf8), v = Array(e.value.utf8)
            w.write(UInt16(k.count))
            w.write(bytes: k)
            w.write(UInt32(v.count))
            w.write(bytes: v)
        }
    }

    /// Reads `count` metadata entries (the count already read at `countAt`): the count is
    /// checked against the bytes left (each entry takes at least 6), keys must be unique.
    static func decodeMetadata(_ c: inout ByteCursor, count: UInt32, countAt: UInt64, field: String = "metadata") throws -> [MetadataEntry] {
        guard Int(count) <= c.remaining / 6 else {
            throw c.invalid("\(field)Count", at: countAt, "claims \(count) entries but only \(c.remaining) bytes remain")
        }
        var metadata: [MetadataEntry] = []
        var seen = Set<String>()
        for i in 0 ..< Int(count) {
            let at = c.absolutePosition
            let k = try c.readUTF8(Int(try c.read(UInt16.self, "\(field)[\(i)].keyLength")), "\(field)[\(i)].key")
            let v = try c.readUTF8(Int(try c.read(UInt32.self, "\(field)[\(i)].valueLength")), "\(field)[\(i)].value")
            guard seen.insert(k).inserted else { throw c.invalid("\(field)[\(i)].key", at: at, "duplicate key \"\(k)\"") }
            metadata.append(MetadataEntry(k, v))
        }
        return metadata
    }

    /// Checks a manifest built by a caller before it is written (the writer's entry check).
    public func validateForWriting() throws {
        let copy = try encoded().withUnsafeBytes { try Manifest.decode($0, base: 0) }
        guard copy == self else { throw KVPackError.argument("manifest does not survive encoding (a field is out of range)") }
    }

    /// Reads the manifest frame, which must be the first frame of the file: header and payload
    /// checksums, tag, then the payload. Returns the frame's header too (where it ends is where
    /// the other frames may start).
    static func readFrame(_ file: UnsafeRawBufferPointer, salt: UInt64) throws -> (manifest: Manifest, frame: FrameHeader) {
        let m = try FrameHeader.decode(file, at: UInt64(FileHeader.size), limit: UInt64(file.count), salt: salt, field: "MANI")
        guard m.tag == .manifest else {
            throw KVPackError.invalid(m.offset, "MANI.tag", "the first frame must be the manifest, found \(m.tag)")
        }
        guard !m.isCompressed else { throw KVPackError.invalid(m.offset + 4, "MANI.flags", "the manifest is never compressed") }
        try m.verifyPayload(in: file, field: "MANI")
        return (try decode(m.storedPayload(in: file), base: m.payloadOffset), m)
    }

    /// Parses an untrusted manifest payload. `base` is the payload's file offset.
    public static func decode(_ bytes: UnsafeRawBufferPointer, base: UInt64) throws -> Manifest {
        var c = ByteCursor(bytes, base: base, structure: "manifest")
        func bounded(_ field: String, _ value: UInt32, _ range: ClosedRange<Int>) throws -> Int {
            guard range.contains(Int(value)) else {
                throw c.invalid(field, at: c.absolutePosition - 4, "is \(value), must be in \(range.lowerBound)...\(range.upperBound)")
            }
            return Int(value)
        }
        let layers = try bounded("layerCount", try c.read(UInt32.self, "layerCount"), 1 ... Limits.maxLayers)
        let qHeads = try bounded("queryHeadCount", try c.read(UInt32.self, "queryHeadCount"), 1 ... Limits.maxQueryHeads)
        let kvHeads = try bounded("kvHeadCount", try c.read(UInt32.self, "kvHeadCount"), 1 ... Limits.maxKVHeads)
        guard qHeads % kvHeads == 0 else {
            throw c.invalid("queryHeadCount", at: base + 4, "\(qHeads) is not a multiple of kvHeadCount \(kvHeads)")
        }
        let headDim = try bounded("headDim", try c.read(UInt32.self, "headDim"), 1 ... Limits.maxHeadDim)
        let segment = try bounded("segmentTokens", try c.read(UInt32.self, "segmentTokens"), 1 ... Limits.maxSegmentTokens)
        guard segment * headDim <= Limits.maxBlockElements else {
            throw c.invalid("segmentTokens", at: base + 16,
                            "segmentTokens x headDim = \(segment * headDim) exceeds \(Limits.maxBlockElements)")
        }
        // Attention keeps a score row per query of a GQA group for a whole segment, and the
        // group's queries: both are bounded like a decoded block, so no claim sizes memory past it.
        let group = qHeads / kvHeads
        guard group * segment <= Limits.maxBlockElements, group * headDim <= Limits.maxBlockElements else {
            throw c.invalid("queryHeadCount", at: base + 4,
                            "a GQA group of \(group) query heads x max(segmentTokens \(segment), headDim \(headDim)) exceeds \(Limits.maxBlockElements)")
        }
        let flags = try c.read(UInt32.self, "flags")
        let known = keysPostRoPEFlag | losslessTokensFlag
        guard flags & ~known == 0 else {
            throw c.invalid("flags", at: base + 20, "unknown bits \(hex64(UInt64(flags & ~known)))")
        }
        let theta = try c.readFloat64("ropeTheta")
        guard theta.isFinite, theta >= 0 else { throw c.invalid("ropeTheta", at: base + 24, "is \(theta), must be finite and >= 0") }
        let layoutByte = try c.read(UInt8.self, "ropeLayout")
        guard let layout = RoPELayout(rawValue: layoutByte) else {
            throw c.invalid("ropeLayout", at: base + 32, "is \(layoutByte), must be 0 (none), 1 (interleaved) or 2 (rotate-half)")
        }
        if layout != .none, headDim % 2 != 0 {
            throw c.invalid("ropeLayout", at: base + 32, "rotary pairs need an even headDim, got \(headDim)")
        }
        _ = try c.read(UInt8.self, "reserved")
        let schemeCount = Int(try c.read(UInt16.self, "schemeCount"))
        guard (1 ... Limits.maxSchemes).contains(schemeCount) else {
            throw c.invalid("schemeCount", at: base + 34, "is \(schemeCount), must be in 1...\(Limits.maxSchemes)")
        }
        let maxPositions = try c.read(UInt32.self, "maxPositions")
        let fingerprint = Array(try c.readBytes(16, "modelFingerprint"))
        // Reserved (ignored) unless the LOSSLESS_TOKENS flag says they hold the window and sinks.
        let window = try c.read(UInt32.self, "windowTokens"), sinks = try c.read(UInt32.self, "sinkTokens")
        var windowTokens = 0, sinkTokens = 0
        if flags & losslessTokensFlag != 0 {
            guard window <= maxWindowTokens else {
                throw c.invalid("windowTokens", at: base + 56, "is \(window), must be in 0...\(maxWindowTokens)")
            }
            guard sinks <= segment else {
                throw c.invalid("sinkTokens", at: base + 60, "is \(sinks), must be in 0...segmentTokens (\(segment))")
            }
            guard window + sinks > 0 else {
                throw c.invalid("flags", at: base + 20, "LOSSLESS_TOKENS is set but windowTokens and sinkTokens are both 0")
            }
            windowTokens = Int(window)
            sinkTokens = Int(sinks)
        }

        // layers x 2 x u16 is at most 16 KiB: the bound on layerCount makes this allocation safe.
        var layerSchemes: [LayerSchemes] = []
        layerSchemes.reserveCapacity(layers)
        for layer in 0 ..< layers {
            let at = c.absolutePosition
            let k = Int(try c.read(UInt16.self, "layerSchemes[\(layer)].key"))
            let v = Int(try c.read(UInt16.self, "layerSchemes[\(layer)].value"))
            guard k < schemeCount, v < schemeCount else {
                throw c.invalid("layerSchemes[\(layer)]", at: at, "scheme index (\(k), \(v)) out of range 0..<\(schemeCount)")
            }
            layerSchemes.append(LayerSchemes(key: k, value: v))
        }
        var schemes: [SchemeDescriptor] = []
        for i in 0 ..< schemeCount {
            let at = c.absolutePosition
            let kind = SchemeKind(rawValue: try c.read(UInt16.self, "schemes[\(i)].kind"))
            let residualByte = try c.read(UInt8.self, "schemes[\(i)].residualType")
            guard let residual = ElementType(rawValue: residualByte), residual.isFloatingPoint else {
                throw c.invalid("schemes[\(i)].residualType", at: at + 2, "is \(residualByte), must be 1 (f32), 2 (f16) or 3 (bf16)")
            }
            _ = try c.read(UInt8.self, "schemes[\(i)].reserved")
            let paramLength = Int(try c.read(UInt16.self, "schemes[\(i)].parameterLength"))
            let blobCount = Int(try c.read(UInt16.self, "schemes[\(i)].blobCount"))
            let params = Array(try c.readBytes(paramLength, "schemes[\(i)].parameters"))
            try c.need(blobCount * 4, "schemes[\(i)].blobIDs")
            var blobs: [UInt32] = []
            for b in 0 ..< blobCount { blobs.append(try c.read(UInt32.self, "schemes[\(i)].blobIDs[\(b)]")) }
            schemes.append(SchemeDescriptor(kind: kind, residualType: residual, parameters: params, blobIDs: blobs))
        }
        let producerLength = Int(try c.read(UInt16.self, "producerLength"))
        let producer = try c.readUTF8(producerLength, "producer")
        let metadataCount = try c.read(UInt32.self, "metadataCount")
        let metadata = try decodeMetadata(&c, count: metadataCount, countAt: c.absolutePosition - 4)
        guard c.remaining == 0 else {
            throw c.invalid("end", "\(c.remaining) bytes follow the last field; the manifest must end exactly there")
        }
        var m = Manifest(
            geometry: ModelGeometry(layerCount: layers, queryHeadCount: qHeads, kvHeadCount: kvHeads, headDim: headDim),
            segmentTokens: segment,
            rope: RoPEConfig(theta: theta, layout: layout, keysArePostRoPE: flags & keysPostRoPEFlag != 0),
            maxPositions: maxPositions, modelFingerprint: fingerprint, schemes: schemes,
            layerSchemes: layerSchemes, producer: producer, userMetadata: metadata)
        m.windowTokens = windowTokens
        m.sinkTokens = sinkTokens
        return m
    }
}
