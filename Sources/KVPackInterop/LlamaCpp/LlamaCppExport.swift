import Foundation
import KVPack

/// Writes a .kvpack file's cache as a llama.cpp state file that llama.cpp loads: a session file
/// (`llama_state_load_file`, llama-cli `--prompt-cache`) or a sequence file
/// (`llama_state_seq_load_file`, a llama-server slot), in the cache types, value layout and
/// rotation of the llama.cpp context that will load it (it refuses any other).
public enum LlamaCppExport {
    public struct Options: Sendable {
        public var kind: LlamaCppState.Kind = .session
        /// Session 10 or 9, sequence 3 or 2 (nil: the newest). Version 9 sessions are written in
        /// the layout of llama.cpp before PR #18862 (an empty output section before the memory);
        /// sequence files 2 and 3 differ only in the number for a plain KV cache.
        public var version: UInt32?
        public var keyType: GGMLType = .f16
        public var valueType: GGMLType = .f16
        /// V element-major (llama.cpp without flash attention) rather than by rows.
        public var valuesTransposed = false
        /// Rotate quantized rows as llama.cpp does since #21038 (`auto`), or not (`off`: a context
        /// run with LLAMA_ATTN_ROT_DISABLE=1).
        public var rotation: LlamaCppCache.Rotation = .auto
        /// The model architecture a session file records (`llm_arch_name`, e.g. "llama").
        public var architecture = "llama"
        public var sequenceID: Int32 = 0
        public var overwrite = false

        public init() {}

        /// The options that reproduce the llama.cpp file an imported .kvpack file came from (the
        /// `llama.cpp.*` metadata of its manifest), with any setting given here overriding the
        /// recorded one. Nothing recorded: f16 keys and values by rows, the newest version, rotation auto.
        public init(kind: LlamaCppState.Kind, recordedIn manifest: Manifest, keyType: GGMLType? = nil, valueType: GGMLType? = nil,
                    valuesTransposed: Bool? = nil, version: UInt32? = nil, rotation: LlamaCppCache.Rotation? = nil) {
            func recorded(_ key: String) -> String? { manifest.metadata("llama.cpp." + key) }
            self.kind = kind
            let sameKind = recorded("kind") == kind.rawValue
            self.version = version ?? (sameKind ? recorded("version").flatMap { UInt32($0) } : nil)
            let recordedK = recorded("type_k").flatMap { GGMLType(name: $0) }
            let recordedV = recorded("type_v").flatMap { GGMLType(name: $0) }
            self.keyType = keyType ?? recordedK.flatMap { $0.canQuantize ? $0 : nil } ?? .f16
            self.valueType = valueType ?? recordedV.flatMap { $0.canQuantize ? $0 : nil } ?? .f16
            self.valuesTransposed = valuesTransposed ?? (recorded("v_trans") == "1")
            // Unrotated only when the file came from an unrotated quantized cache of the same types
            // (a file that was never rotated because its types were not quantized says nothing).
            let recordedUnrotated = recorded("rotation_k") == "none" && recorded("rotation_v") == "none"
                && (recordedK?.isQuantized ?? false || recordedV?.isQuantized ?? false)
            self.rotation = rotation ?? (recordedUnrotated && self.keyType == recordedK && self.valueType == recordedV ? .off : .auto)
            if let arch = recorded("architecture") { architecture = arch }
        }
    }

    public struct Report: Sendable, Codable {
        public var tokens: Int
        public var bytes: Int
        public var kind: String
        public var version: UInt32
        public var keyType: String
        public var valueType: String
        public var valuesTransposed: Bool
        public var keyRotation: Int?
        public var valueRotation: Int?
    }

    public static func export(_ reader: KVPackReader, to path: String, options o: Options) throws -> Report {
        let g = reader.geometry, d = g.headDim, n = reader.tokenCount, width = g.kvHeadCount * d
        let version = o.version ?? (o.kind == .session ? 10 : 3)
        let known = o.kind == .session ? LlamaCppState.sessionVersions : LlamaCppState.sequenceVersions
        guard known.contains(version) else {
            throw KVPackError.argument("\(o.kind) files are version \(known.sorted().map(String.init).joined(separator: " or ")), not \(version)")
        }
        for (type, what) in [(o.keyType, "key"), (o.valueType, "value")] {
            guard type.canQuantize else { throw KVPackError.argument("\(type) is read, not written: choose another \(what) type") }
            guard type.rowBytes(width) != nil else {
                throw KVPackError.argument("\(type) needs rows of whole 32-value blocks; a row here holds \(g.kvHeadCount) x \(d) = \(width) values")
            }
        }
        if o.valuesTransposed, o.valueType.isQuantized {
            throw KVPackError.argument("transposed values (llama.cpp without flash attention) are f32, f16 or bf16; \(o.valueType) values need flash attention (v_trans 0)")
        }
        guard n <= Int(Int32.max) else { throw KVPackError.argument("\(n) tokens do not fit a llama.cpp state file") }
        let keyRotation = o.rotation == .auto ? LlamaCppModel.keyRotation(headDim: d, type: o.keyType) : nil
        let valueRotation = o.rotation == .auto ? LlamaCppModel.valueRotation(headDim: d, type: o.valueType) : nil
        let (ids, positions) = try reader.tokens(0 ..< n)

        return try AtomicReplacement.write(to: path, overwrite: o.overwrite, label: "exporting") { temp in
            guard FileManager.default.createFile(atPath: temp, contents: nil), let handle = FileHandle(forWritingAtPath: temp) else {
                throw KVPackError.argument("cannot create \(temp)")
            }
            defer { try? handle.close() }
            var out = Output(handle: handle)
            out.u32(o.kind == .session ? LlamaCppState.sessionMagic : LlamaCppState.sequenceMagic)
            out.u32(version)
            out.u32(UInt32(n))
            for id in ids { out.u32(id) }
            if o.kind == .session {
                let arch = Array(o.architecture.utf8)
                out.u32(UInt32(arch.count))
                out.bytes(arch)
                if version == 9 {
                    out.u32(0)   // n_outputs
                    out.u64(0)   // logits
                    out.u64(0)   // embeddings
                }
            }
            out.u32(1)              // one stream
            out.u32(UInt32(n))      // its cells
            if n > 0 {
                for p in positions {
                    out.u32(p)
                    out.u32(1)
                    out.u32(UInt32(bitPattern: o.sequenceID))
                }
                out.u32(o.valuesTransposed ? 1 : 0)
                out.u32(UInt32(g.layerCount))
                let workspace = AttentionWorkspace()
                // Keys in the other pair layout (a Hugging Face cache) move to llama.cpp's.
                let fileLayout = reader.manifest.rope.layout, llamaLayout = LlamaCppModel.ropeLayout(architecture: o.architecture)
                let pairing = fileLayout != .none && llamaLayout != .none && fileLayout != llamaLayout
                    ? try RoPEPairing(from: fileLayout, to: llamaLayout, headDim: d) : nil
                for layer in 0 ..< g.layerCount {
                    try writeRows(reader, layer: layer, kind: .key, type: o.keyType, rotation: keyRotation, pairing: pairing, into: &out,
                                  workspace: workspace)
                    try out.flushIfLarge()
                }
                for layer in 0 ..< g.layerCount {
                    if o.valuesTransposed {
                        out.u32(UInt32(bitPattern: o.valueType.rawValue))
                        out.u32(UInt32(o.valueType.blockBytes))
                        out.u32(UInt32(width))
                        // Element-major: element j of every token, a column of the head at a time.
                        var head = [Float](repeating: 0, count: n * d), column = [Float](repeating: 0, count: n)
                        var encoded = [UInt8](repeating: 0, count: n * o.valueType.blockBytes)
                        for h in 0 ..< g.kvHeadCount {
                            try head.withUnsafeMutableBufferPointer {
                                try reader.decode(layer: layer, kvHead: h, kind: .value, tokens: 0 ..< n, into: $0.baseAddress!, workspace: workspace)
                            }
                            for j in 0 ..< d {
                                for t in 0 ..< n { column[t] = head[t * d + j] }
                                column.withUnsafeBufferPointer { src in
                                    encoded.withUnsafeMutableBytes { o.valueType.quantize(src.baseAddress!, count: n, into: $0.baseAddress!) }
                                }
                                out.bytes(encoded)
                                try out.flushIfLarge()
                            }
                        }
                    } else {
                        try writeRows(reader, layer: layer, kind: .value, type: o.valueType, rotation: valueRotation, into: &out, workspace: workspace)
                    }
                    try out.flushIfLarge()
                }
            }
            try out.flush()
            try handle.synchronize()
            return Report(tokens: n, bytes: out.written, kind: o.kind.rawValue, version: version, keyType: o.keyType.description,
                          valueType: o.valueType.description, valuesTransposed: o.valuesTransposed,
                          keyRotation: keyRotation, valueRotation: valueRotation)
        }
    }

    /// One layer's keys or values, one row per token (every KV head), as llama.cpp stores them.
    static func writeRows(_ reader: KVPackReader, layer: Int, kind: KVKind, type: GGMLType, rotation: Int?,
                          pairing: RoPEPairing? = nil, into out: inout Output, workspace: AttentionWorkspace) throws {
        let g = reader.geometry, d = g.headDim, n = reader.tokenCount, width = g.kvHeadCount * d
        let rowBytes = type.rowBytes(width)!
        out.u32(UInt32(bitPattern: type.rawValue))
        out.u64(UInt64(rowBytes))
        let chunk = max(1, min(n, 4096))
        var heads = [Float](repeating: 0, count: g.kvHeadCount * chunk * d)
        var row = [Float](repeating: 0, count: width)
        var encoded = [UInt8](repeating: 0, count: rowBytes)
        var start = 0
        while start < n {
            let count = min(chunk, n - start)
            try heads.withUnsafeMutableBufferPointer { buf in
                for h in 0 ..< g.kvHeadCount {
                    try reader.decode(layer: layer, kvHead: h, kind: kind, tokens: start ..< start + count,
                                      into: buf.baseAddress! + h * count * d, workspace: workspace)
                }
                pairing?.apply(rows: buf.baseAddress!, count: g.kvHeadCount * count)
            }
            for t in 0 ..< count {
                for h in 0 ..< g.kvHeadCount {
                    for j in 0 ..< d { row[h * d + j] = heads[(h * count + t) * d + j] }
                }
                row.withUnsafeMutableBufferPointer { r in
                    if let rotation { Hadamard.apply(r.baseAddress!, count: width, chunk: rotation) }
                    encoded.withUnsafeMutableBytes { type.quantize(r.baseAddress!, count: width, into: $0.baseAddress!) }
                }
                out.bytes(encoded)
            }
            try out.flushIfLarge()
            start += count
        }
    }

    /// Little-endian output through a buffer.
    struct Output {
        let handle: FileHandle
        var buffer: [UInt8] = []
        var written = 0

        init(handle: FileHandle) {
            self.handle = handle
            buffer.reserveCapacity(1 << 22)
        }

        mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { buffer += $0 } }
        mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { buffer += $0 } }
        mutating func bytes(_ b: [UInt8]) { buffer += b }

        mutating func flushIfLarge() throws { if buffer.count >= 1 << 22 { try flush() } }

        mutating func flush() throws {
            guard !buffer.isEmpty else { return }
            try handle.write(contentsOf: buffer)
            written += buffer.count
            buffer.removeAll(keepingCapacity: true)
        }
    }
}
