import KVPack

/// A llama.cpp state file, read from untrusted bytes: a session file (`ggsn`, written by
/// `llama_state_save_file`, llama-cli's prompt cache) or a sequence file (`ggsq`,
/// `llama_state_seq_save_file`, llama-server's slot files), holding the memory state of a plain
/// KV cache (llama.cpp `src/llama-context.cpp` `state_save_file`, `state_seq_save_file`,
/// `state_write_data`; `src/llama-kv-cache.cpp` `state_write`, `state_write_meta`,
/// `state_write_data`).
///
///     u32 magic ('ggsn' 0x6767736e | 'ggsq' 0x67677371), u32 version (session 9, 10; sequence 2, 3)
///     u32 n_token, i32 token[n_token]
///     session only: u32 length + bytes of the architecture name;
///                   version 9 before llama.cpp PR #18862 (2026-02): i32 n_outputs,
///                   i32 output_pos[n_outputs], u64 n_logits, f32 logits[n_logits],
///                   u64 n_embd, f32 embd[n_embd]
///     u32 n_stream; per stream: u32 cell_count, and when it is not 0:
///       per cell: i32 pos, u32 n_seq_id, (M-RoPE models: a cell extension), i32 seq_id[n_seq_id]
///       u32 v_trans, u32 n_layer
///       per layer: i32 K type, u64 K row bytes, cell_count K rows
///       v_trans 0, per layer: i32 V type, u64 V row bytes, cell_count V rows
///       v_trans 1, per layer: i32 V type, u32 element bytes, u32 n_embd_v_gqa,
///                  n_embd_v_gqa x cell_count elements (element-major)
///
/// All little-endian. Nothing in the file says how a row splits into heads, the RoPE layout,
/// or whether quantized rows were Hadamard-rotated (llama.cpp #21038): those come from the
/// model (`LlamaCppImport`). Every count is checked against the bytes that remain before it is
/// used, so a lying header is an error naming its offset and field, never an allocation or a
/// read out of bounds.
public struct LlamaCppState: Sendable {
    public enum Kind: String, Sendable, Codable {
        case session
        case sequence
    }

    public static let sessionMagic: UInt32 = 0x6767_736E
    public static let sequenceMagic: UInt32 = 0x6767_7371
    public static let sessionVersions: Set<UInt32> = [9, 10]
    public static let sequenceVersions: Set<UInt32> = [2, 3]
    /// llama.cpp's `LLAMA_MAX_SEQ`: no cell can belong to more sequences.
    public static let maxSequences = 256

    public struct Cell: Sendable, Equatable {
        public var position: Int32
        public var sequences: [Int32]
    }

    /// `count` rows of `rowBytes` bytes starting at `offset` (absolute, in the file).
    public struct Rows: Sendable, Equatable {
        public var type: GGMLType
        public var rowBytes: Int
        public var offset: Int
        /// Values per row (`rowBytes` in the type's blocks).
        public var elements: Int { rowBytes / type.blockBytes * type.blockElements }
    }

    public enum Values: Sendable, Equatable {
        /// One row per cell, like the keys (v_trans 0).
        case rows(Rows)
        /// Element-major (v_trans 1): element j of cell c at `offset + (j * cells + c) * elementBytes`.
        case transposed(type: GGMLType, elements: Int, offset: Int)

        public var type: GGMLType {
            switch self {
            case let .rows(r): r.type
            case let .transposed(type, _, _): type
            }
        }

        public var elements: Int {
            switch self {
            case let .rows(r): r.elements
            case let .transposed(_, elements, _): elements
            }
        }
    }

    public struct Layer: Sendable, Equatable {
        public var keys: Rows
        public var values: Values
    }

    /// One stream of the cache (llama.cpp keeps one per sequence unless the cache is unified).
    public struct Stream: Sendable, Equatable {
        public var cells: [Cell]
        public var valuesTransposed: Bool
        public var layers: [Layer]
    }

    /// A version 9 session file's output section (before llama.cpp #18862): its sizes. The
    /// logits and embeddings are skipped: a resumed conversation recomputes the last logits.
    public struct OutputSection: Sendable, Equatable {
        public var outputs: Int
        public var logits: Int
        public var embeddings: Int
    }

    /// The file's bytes (kept mapped while the state is used: rows are read in place).
    public let file: MappedFile
    public var bytes: UnsafeRawBufferPointer { file.bytes }
    public let kind: Kind
    public let version: UInt32
    public let tokens: [Int32]
    /// Session files: the model architecture llama.cpp recorded (`llm_arch_name`).
    public let architecture: String?
    public let outputSection: OutputSection?
    /// Every stream, in file order (streams without cells included, with no cells).
    public let streams: [Stream]

    /// The one stream that holds cells (what an import reads), or an error saying how many do.
    public func onlyStream() throws -> Stream {
        let used = streams.filter { !$0.cells.isEmpty }
        guard used.count == 1 else {
            throw KVPackError(.invalidArgument, field: "memory.streams",
                              "the state holds \(used.count) streams with cells; import one sequence (save it with llama_state_seq_save_file, or a llama-server slot)")
        }
        return used[0]
    }

    // MARK: Reading

    /// Parses a mapped file. `cellExtensionBytes` is the per-cell extension of M-RoPE models (0
    /// for every other model, which is all this reader has been proven on).
    public init(file: MappedFile, cellExtensionBytes: Int = 0) throws {
        self.file = file
        var c = StateCursor(file.bytes)
        let magic = try c.u32("magic")
        switch magic {
        case Self.sessionMagic: kind = .session
        case Self.sequenceMagic: kind = .sequence
        default:
            throw KVPackError(.badMagic, offset: 0, field: "magic",
                              "not a llama.cpp state file: magic \(hex(magic)), expected 0x6767736e ('ggsn', session) or 0x67677371 ('ggsq', sequence)")
        }
        let name = kind == .session ? "ggsn" : "ggsq"
        version = try c.u32("\(name).version")
        let known = kind == .session ? Self.sessionVersions : Self.sequenceVersions
        guard known.contains(version) else {
            throw KVPackError(.unsupportedVersion, offset: 4, field: "\(name).version",
                              "\(name) version \(version); this reader knows versions \(known.sorted().map(String.init).joined(separator: " and "))")
        }
        let n = Int(try c.u32("\(name).tokenCount"))
        try c.need(n, of: 4, "\(name).tokens")
        var tokens: [Int32] = []
        tokens.reserveCapacity(n)
        for _ in 0 ..< n { tokens.append(try c.i32("\(name).tokens")) }
        self.tokens = tokens
        if kind == .session {
            let length = Int(try c.u32("ggsn.architecture.length"))
            guard length <= 1024 else {
                throw KVPackError(.invalidField, offset: UInt64(c.at - 4), field: "ggsn.architecture.length", "is \(length); an architecture name is a short word")
            }
            let raw = try c.take(length, "ggsn.architecture")
            guard let arch = String(validating: raw, as: UTF8.self) else {
                throw KVPackError(.invalidField, offset: UInt64(c.at - length), field: "ggsn.architecture", "is not valid UTF-8")
            }
            architecture = arch
        } else {
            architecture = nil
        }
        // A version 9 session file has an output section or not, depending on the llama.cpp
        // that wrote it (PR #18862 removed it without a version bump): the layout that accounts
        // for every byte of the file is the one it has.
        let memoryStart = c
        if kind == .session, version == 9 {
            var withOutputs = memoryStart
            if let section = try? Self.outputSection(&withOutputs),
               let streams = try? Self.memory(&withOutputs, cellExtensionBytes: cellExtensionBytes), withOutputs.remaining == 0 {
                outputSection = section
                self.streams = streams
                return
            }
        }
        outputSection = nil
        streams = try Self.memory(&c, cellExtensionBytes: cellExtensionBytes)
        guard c.remaining == 0 else {
            throw KVPackError(.invalidField, offset: UInt64(c.at), field: "end",
                              "\(c.remaining) bytes follow the memory state; the file must end there")
        }
    }

    static func outputSection(_ c: inout StateCursor) throws -> OutputSection {
        let outputs = Int(try c.i32("ggsn.outputs"))
        guard outputs >= 0 else { throw KVPackError(.invalidField, offset: UInt64(c.at - 4), field: "ggsn.outputs", "is negative") }
        try c.skip(outputs, of: 4, "ggsn.outputPositions")
        let logits = Int(clamping: try c.u64("ggsn.logitCount"))
        try c.skip(logits, of: 4, "ggsn.logits")
        let embeddings = Int(clamping: try c.u64("ggsn.embeddingCount"))
        try c.skip(embeddings, of: 4, "ggsn.embeddings")
        return OutputSection(outputs: outputs, logits: logits, embeddings: embeddings)
    }

    static func memory(_ c: inout StateCursor, cellExtensionBytes: Int) throws -> [Stream] {
        let streamCount = Int(try c.u32("memory.streamCount"))
        guard (1 ... maxSequences).contains(streamCount) else {
            throw KVPackError(.invalidField, offset: UInt64(c.at - 4), field: "memory.streamCount",
                              "is \(streamCount); a llama.cpp KV cache has 1 to \(maxSequences) streams")
        }
        var streams: [Stream] = []
        for s in 0 ..< streamCount {
            let field = "memory.stream[\(s)]"
            let cellCount = Int(try c.u32("\(field).cellCount"))
            guard cellCount > 0 else {
                streams.append(Stream(cells: [], valuesTransposed: false, layers: []))
                continue
            }
            // Each cell takes at least 8 bytes: checked before anything is sized from the count.
            try c.need(cellCount, of: 8 + cellExtensionBytes, "\(field).cells")
            var cells: [Cell] = []
            cells.reserveCapacity(cellCount)
            for i in 0 ..< cellCount {
                let position = try c.i32("\(field).cell[\(i)].pos")
                let ids = Int(try c.u32("\(field).cell[\(i)].seqCount"))
                guard ids <= maxSequences else {
                    throw KVPackError(.invalidField, offset: UInt64(c.at - 4), field: "\(field).cell[\(i)].seqCount",
                                      "is \(ids); a cell belongs to at most \(maxSequences) sequences")
                }
                try c.skip(cellExtensionBytes, of: 1, "\(field).cell[\(i)].extension")
                try c.need(ids, of: 4, "\(field).cell[\(i)].seqIDs")
                var seqs: [Int32] = []
                for _ in 0 ..< ids { seqs.append(try c.i32("\(field).cell[\(i)].seqID")) }
                cells.append(Cell(position: position, sequences: seqs))
            }
            let vTrans = try c.u32("\(field).vTrans")
            guard vTrans <= 1 else { throw KVPackError(.invalidField, offset: UInt64(c.at - 4), field: "\(field).vTrans", "is \(vTrans), must be 0 or 1") }
            let layerCount = Int(try c.u32("\(field).layerCount"))
            guard (1 ... 4096).contains(layerCount) else {
                throw KVPackError(.invalidField, offset: UInt64(c.at - 4), field: "\(field).layerCount", "is \(layerCount), must be 1...4096")
            }
            var keys: [Rows] = []
            for l in 0 ..< layerCount {
                keys.append(try rows(&c, cells: cellCount, field: "\(field).layer[\(l)].K"))
            }
            var values: [Values] = []
            for l in 0 ..< layerCount {
                let vField = "\(field).layer[\(l)].V"
                if vTrans == 0 {
                    values.append(.rows(try rows(&c, cells: cellCount, field: vField)))
                    continue
                }
                let type = try ggmlType(&c, field: "\(vField).type")
                let elementBytes = Int(try c.u32("\(vField).elementBytes"))
                guard !type.isQuantized, elementBytes == type.blockBytes else {
                    throw KVPackError(.invalidField, offset: UInt64(c.at - 4), field: "\(vField).elementBytes",
                                      "is \(elementBytes) for \(type); transposed values are f32, f16 or bf16 with their own element size")
                }
                let elements = Int(try c.u32("\(vField).elementCount"))
                guard elements >= 1, elements <= 1 << 20 else {
                    throw KVPackError(.invalidField, offset: UInt64(c.at - 4), field: "\(vField).elementCount", "is \(elements), must be 1...\(1 << 20)")
                }
                let offset = c.at
                let (perCell, o1) = elements.multipliedReportingOverflow(by: elementBytes)
                guard !o1 else { throw KVPackError(.invalidField, offset: UInt64(offset), field: "\(vField).elementCount", "overflows") }
                try c.skip(cellCount, of: perCell, "\(vField).data")
                values.append(.transposed(type: type, elements: elements, offset: offset))
            }
            streams.append(Stream(cells: cells, valuesTransposed: vTrans == 1,
                                  layers: zip(keys, values).map { Layer(keys: $0, values: $1) }))
        }
        return streams
    }

    static func ggmlType(_ c: inout StateCursor, field: String) throws -> GGMLType {
        let raw = try c.i32(field)
        guard let type = GGMLType(rawValue: raw) else {
            throw KVPackError(.invalidField, offset: UInt64(c.at - 4), field: field,
                              "is ggml type \(raw); supported: \(GGMLType.allCases.map { "\($0.rawValue) \($0)" }.joined(separator: ", "))")
        }
        return type
    }

    static func rows(_ c: inout StateCursor, cells: Int, field: String) throws -> Rows {
        let type = try ggmlType(&c, field: "\(field).type")
        let rowBytes = try c.u64("\(field).rowBytes")
        guard rowBytes >= 1, rowBytes <= 1 << 24, Int(rowBytes) % type.blockBytes == 0 else {
            throw KVPackError(.invalidField, offset: UInt64(c.at - 8), field: "\(field).rowBytes",
                              "is \(rowBytes); a row of \(type) is a whole number of \(type.blockBytes)-byte blocks, at most 16 MiB")
        }
        let offset = c.at
        try c.skip(cells, of: Int(rowBytes), "\(field).rows")
        return Rows(type: type, rowBytes: Int(rowBytes), offset: offset)
    }
}

/// Little-endian reads over untrusted bytes; every read names its field and, when the bytes
/// run out, says at which offset and how many were needed.
struct StateCursor {
    let bytes: UnsafeRawBufferPointer
    private(set) var at = 0

    init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

    var remaining: Int { bytes.count - at }

    /// `count` items of `size` bytes must remain (overflow-checked).
    func need(_ count: Int, of size: Int, _ field: String) throws {
        let (total, overflow) = count.multipliedReportingOverflow(by: size)
        guard count >= 0, !overflow, total <= remaining else {
            throw KVPackError(.truncated, offset: UInt64(at), field: field,
                              "needs \(overflow ? "more than 2^63" : String(total)) bytes (\(count) x \(size)), only \(remaining) remain")
        }
    }

    mutating func skip(_ count: Int, of size: Int, _ field: String) throws {
        try need(count, of: size, field)
        at += count * size
    }

    mutating func take(_ count: Int, _ field: String) throws -> UnsafeRawBufferPointer {
        try need(count, of: 1, field)
        defer { at += count }
        return UnsafeRawBufferPointer(rebasing: bytes[at ..< at + count])
    }

    mutating func u32(_ field: String) throws -> UInt32 {
        try need(1, of: 4, field)
        defer { at += 4 }
        return UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: at, as: UInt32.self))
    }

    mutating func i32(_ field: String) throws -> Int32 { Int32(bitPattern: try u32(field)) }

    mutating func u64(_ field: String) throws -> UInt64 {
        try need(1, of: 8, field)
        defer { at += 8 }
        return UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: at, as: UInt64.self))
    }
}

func hex(_ v: UInt32) -> String { "0x" + String(v, radix: 16) }
