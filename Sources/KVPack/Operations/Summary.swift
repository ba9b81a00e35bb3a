/// A description of a file for `kvpack info` (and its `--json`).
public struct FileSummary: Sendable, Codable {
    public struct Scheme: Sendable, Codable {
        public var index: Int
        public var spec: String
        public var kind: UInt16
        public var residualType: String
        public var blobIDs: [UInt32]
    }

    public struct Layer: Sendable, Codable {
        public var layer: Int
        public var keyScheme: Int
        public var valueScheme: Int
        /// Blocks, tail rows and a share of the metadata blobs the layer's key descriptor uses.
        public var keyBytes: Int
        public var valueBytes: Int
        public var keyBitsPerElement: Double
        public var valueBitsPerElement: Double
    }

    public var path: String
    public var version: String
    public var fileSize: Int
    public var geometry: ModelGeometry
    public var rope: RoPEConfig
    public var segmentTokens: Int
    /// Lossless window and sinks (Spec 6.3; 0 when the file keeps none).
    public var windowTokens: Int
    public var sinkTokens: Int
    public var maxPositions: UInt32
    public var modelFingerprint: String
    public var producer: String
    /// The manifest's metadata with the file's notes applied (`KVPackReader.userMetadata`).
    public var userMetadata: [Manifest.MetadataEntry]
    /// `note` frames the commit lists, and why they could not be read (nil when they could).
    public var metadataNoteCount: Int
    public var metadataNotesError: String?
    public var tokenCount: Int
    public var sealedTokens: Int
    public var tailTokens: Int
    public var firstTokenIDs: [UInt32]
    public var positionsAreIndices: Bool
    public var commitSerial: UInt64
    public var commitOffset: UInt64
    public var recoveryNotes: [String]
    public var schemes: [Scheme]
    public var layers: [Layer]
    public var blobCount: Int
    public var blobBytes: Int
    /// What a pruned file's `tsel` frame says (or why it cannot be read); nil when there is none.
    public var tokenSelection: String?
    /// Key+value payload bits per cached element (block headers and tail rows included).
    public var cacheBitsPerElement: Double
    /// The whole file's bits per cached element (manifest, index, blobs, superseded frames too).
    public var fileBitsPerElement: Double

    public init(reader: KVPackReader) throws {
        let g = reader.geometry
        let m = reader.manifest
        path = reader.path ?? "-"
        version = "\(reader.header.major).\(reader.header.minor)"
        fileSize = reader.fileSize
        geometry = g
        rope = m.rope
        segmentTokens = m.segmentTokens
        windowTokens = m.windowTokens
        sinkTokens = m.sinkTokens
        maxPositions = m.maxPositions
        modelFingerprint = Manifest.fingerprintText(m.modelFingerprint)
        producer = m.producer
        metadataNoteCount = reader.metadataNoteCount
        do {
            userMetadata = try reader.userMetadata()
        } catch {
            userMetadata = m.userMetadata
            metadataNotesError = "\(error)"
        }
        tokenCount = reader.tokenCount
        sealedTokens = reader.sealedTokenCount
        tailTokens = reader.tokenCount - reader.sealedTokenCount
        firstTokenIDs = try reader.tokens(0 ..< min(16, reader.tokenCount)).ids
        positionsAreIndices = try reader.positions.enumerated().allSatisfy { UInt32($0.offset) == $0.element }
        commitSerial = reader.commitSerial
        commitOffset = reader.commitOffset
        recoveryNotes = reader.recoveryNotes.map(\.description)
        schemes = m.schemes.enumerated().map { i, d in
            Scheme(index: i, spec: reader.schemes[i].specString, kind: d.kind.rawValue,
                   residualType: d.residualType.description, blobIDs: d.blobIDs)
        }
        let elements = Double(reader.tokenCount * g.headDim)
        var layers: [Layer] = []
        var cacheBytes = 0
        let bytes = try reader.streamBytes()
        // Metadata blobs (SVDq's projections, ...) count toward the K or V bytes of the layers
        // whose descriptors use them, split evenly between users.
        var uses: [UInt32: Int] = [:]
        for l in m.layerSchemes { for i in [l.key, l.value] { for id in m.schemes[i].blobIDs { uses[id, default: 0] += 1 } } }
        let blobSizes = Dictionary(reader.blobs.map { ($0.id, $0.bytes.count + FrameHeader.size) }, uniquingKeysWith: { a, _ in a })
        func blobShare(_ index: Int) -> Int {
            m.schemes[index].blobIDs.reduce(0) { $0 + (blobSizes[$1] ?? 0) / max(uses[$1] ?? 1, 1) }
        }
        for l in 0 ..< g.layerCount {
            var kb = blobShare(m.layerSchemes[l].key), vb = blobShare(m.layerSchemes[l].value)
            for h in 0 ..< g.kvHeadCount {
                kb += bytes[g.stream(layer: l, kvHead: h, kind: .key)]
                vb += bytes[g.stream(layer: l, kvHead: h, kind: .value)]
            }
            cacheBytes += kb + vb
            let perHead = elements * Double(g.kvHeadCount)
            layers.append(Layer(layer: l, keyScheme: m.layerSchemes[l].key, valueScheme: m.layerSchemes[l].value,
                                keyBytes: kb, valueBytes: vb,
                                keyBitsPerElement: perHead > 0 ? Double(kb * 8) / perHead : 0,
                                valueBitsPerElement: perHead > 0 ? Double(vb * 8) / perHead : 0))
        }
        self.layers = layers
        blobCount = reader.blobs.count
        blobBytes = reader.blobBytes
        do { tokenSelection = try reader.tokenSelection()?.summary } catch { tokenSelection = "unreadable: \(error)" }
        let all = elements * Double(g.streamCount)
        cacheBitsPerElement = all > 0 ? Double(cacheBytes * 8) / all : 0
        fileBitsPerElement = all > 0 ? Double(fileSize * 8) / all : 0
    }
}
