/// Lossless rows: f32, f16 or bf16, each block optionally one zstd frame.
///
/// Parameters (4 bytes, Spec/ "Scheme 1: raw"): elementType u8 (1 f32, 2 f16, 3 bf16),
/// codec u8 (0 none, 1 zstd, 2 zstd over byte planes: `BytePlanes`, since format 2.3),
/// zstdLevel i8 (what the writer used; readers ignore it),
/// reserved u8 = 0. Residual rows use the same element type, so a tail row and a sealed row
/// decode to the same floats. Block payload: tokens x headDim elements, token-major.
public struct RawScheme: KVScheme {
    public static let kind = SchemeKind.raw
    public static let specSyntax = "{f32|f16|bf16}[:zstd[=LEVEL][:planes]]"
    public static let summary = "lossless rows, optionally one zstd frame per block (level 3 by default); :planes compresses byte planes (format 2.3)"

    public let descriptor: SchemeDescriptor
    public let elementType: ElementType
    public let compressesBlocks: Bool
    public let compressionLevel: Int32
    /// Codec 2: blocks are compressed as byte planes (`BytePlanes`), not rows.
    public let compressesBytePlanes: Bool
    let headDim: Int

    /// The codec byte: 0 none, 1 zstd over rows, 2 zstd over byte planes.
    public static let bytePlanesCodec: UInt8 = 2

    public static func descriptor(elementType: ElementType, zstdLevel: Int32? = nil, bytePlanes: Bool = false) -> SchemeDescriptor {
        let level = Int8(clamping: zstdLevel ?? 0)
        let codec: UInt8 = zstdLevel == nil ? 0 : bytePlanes ? bytePlanesCodec : 1
        return SchemeDescriptor(kind: kind, residualType: elementType,
                                parameters: [elementType.rawValue, codec, UInt8(bitPattern: level), 0])
    }

    public static func setup(arguments: [String], role: KVKind, geometry: ModelGeometry) throws -> SchemeSetup {
        guard let first = arguments.first, let type = ElementType(name: first), type.isFloatingPoint else {
            throw KVPackError.argument("raw needs an element type: raw:f32, raw:f16 or raw:bf16 (got \"raw:\(arguments.joined(separator: ":"))\")")
        }
        var level: Int32?
        var planes = false
        for arg in arguments.dropFirst() {
            if arg == "zstd" {
                level = 3
            } else if arg.hasPrefix("zstd="), let l = Int32(arg.dropFirst(5)), (1 ... 22).contains(l) {
                level = l
            } else if arg == "planes" {
                planes = true
            } else {
                throw KVPackError.argument("raw: unknown argument \"\(arg)\" (expected zstd, zstd=1...22 or planes)")
            }
        }
        if planes, level == nil { level = 3 }   // planes exist to be compressed
        return SchemeSetup(descriptor: descriptor(elementType: type, zstdLevel: level, bytePlanes: planes))
    }

    public init(descriptor: SchemeDescriptor, context: SchemeContext) throws {
        let p = descriptor.parameters
        guard p.count == 4 else {
            throw KVPackError.invalid(nil, "manifest.schemes.parameters", "raw takes 4 parameter bytes, found \(p.count)")
        }
        guard let type = ElementType(rawValue: p[0]), type.isFloatingPoint else {
            throw KVPackError.invalid(nil, "raw.elementType", "is \(p[0]), must be 1 (f32), 2 (f16) or 3 (bf16)")
        }
        guard p[1] <= Self.bytePlanesCodec else {
            throw KVPackError.invalid(nil, "raw.codec", "is \(p[1]), must be 0 (none), 1 (zstd) or 2 (zstd over byte planes)")
        }
        guard descriptor.residualType == type else {
            throw KVPackError.invalid(nil, "manifest.schemes.residualType",
                                      "raw \(type) needs residual rows of the same type, found \(descriptor.residualType)")
        }
        guard descriptor.blobIDs.isEmpty else {
            throw KVPackError.invalid(nil, "manifest.schemes.blobIDs", "raw uses no blobs, found \(descriptor.blobIDs.count)")
        }
        self.descriptor = descriptor
        self.elementType = type
        self.compressesBlocks = p[1] >= 1
        self.compressesBytePlanes = p[1] == Self.bytePlanesCodec
        self.compressionLevel = Int32(Int8(bitPattern: p[2]))
        self.headDim = context.headDim
    }

    public var specString: String {
        "raw:\(elementType)" + (compressesBlocks ? ":zstd=\(compressionLevel)" : "") + (compressesBytePlanes ? ":planes" : "")
    }

    public func encodedBlockSize(tokens: Int) -> Int { tokens * headDim * elementType.byteWidth }

    public func encode(rows: UnsafePointer<Float>, tokens: Int, into block: UnsafeMutableRawBufferPointer) {
        RowKernels.narrow(rows, to: elementType, block.baseAddress!, tokens * headDim)
    }

    /// Codec 2: the block's bytes go to zstd as planes, and come back from them.
    public var compressesReorderedBytes: Bool { compressesBytePlanes }
    /// One zstd frame per plane: a frame's literals share one Huffman table, and the planes'
    /// byte statistics differ (measured: one frame over both f16 planes gained nothing).
    public var compressedParts: Int { compressesBytePlanes ? elementType.byteWidth : 1 }

    public func bytesToCompress(_ block: UnsafeRawBufferPointer, tokens: Int, into out: UnsafeMutableRawBufferPointer) {
        BytePlanes.split(block.baseAddress!, into: out.baseAddress!, tokens: tokens, dim: headDim, width: elementType.byteWidth)
    }

    public func blockFromDecompressed(_ bytes: UnsafeRawBufferPointer, tokens: Int, into out: UnsafeMutableRawBufferPointer) {
        BytePlanes.join(bytes.baseAddress!, into: out.baseAddress!, tokens: tokens, dim: headDim, width: elementType.byteWidth)
    }

    public func decode(block: UnsafeRawBufferPointer, tokens: Range<Int>, into out: UnsafeMutablePointer<Float>) {
        let rowBytes = headDim * elementType.byteWidth
        RowKernels.widen(block.baseAddress! + tokens.lowerBound * rowBytes, from: elementType, out, tokens.count * headDim)
    }

    public func queryStateSize(groupSize: Int) -> Int { groupSize * headDim }

    public func prepare(queries: UnsafePointer<Float>, groupSize: Int, scale: Float, into state: UnsafeMutablePointer<Float>) {
        RowKernels.scaled(queries, by: scale, into: state, count: groupSize * headDim)
    }

    public func scores(block: UnsafeRawBufferPointer, tokens: Range<Int>, state: UnsafePointer<Float>, groupSize: Int,
                       into scores: UnsafeMutablePointer<Float>, stride: Int) {
        RowKernels.scores(rows: block.baseAddress!, type: elementType, dim: headDim, tokens: tokens,
                          queries: state, groupSize: groupSize, into: scores, stride: stride)
    }

    public func accumulate(block: UnsafeRawBufferPointer, tokens: Range<Int>, weights: UnsafePointer<Float>, stride: Int,
                           groupSize: Int, into acc: UnsafeMutablePointer<Float>) {
        RowKernels.accumulate(rows: block.baseAddress!, type: elementType, dim: headDim, tokens: tokens,
                              weights: weights, stride: stride, groupSize: groupSize, into: acc)
    }
}
