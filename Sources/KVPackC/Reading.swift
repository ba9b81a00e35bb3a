import CKVPackABI
import KVPack

// kvpack_open ... kvpack_rows_at: reading a file through a handle (see include/kvpack.h).

@_cdecl("kvpack_abi_version")
public func kvpack_abi_version() -> UInt32 { UInt32(KVPACK_ABI_VERSION) }

@_cdecl("kvpack_format_major")
public func kvpack_format_major() -> UInt32 { UInt32(FileHeader.currentMajor) }

@_cdecl("kvpack_open")
public func kvpack_open(_ path: UnsafePointer<CChar>?, _ flags: UInt32, _ out: UnsafeMutablePointer<OpaquePointer?>?,
                        _ err: UnsafeMutablePointer<kvpack_error>?) -> Int32 {
    withStatus(err) {
        guard let out else { throw ABIError("reader (the output pointer) is NULL") }
        out.pointee = nil
        let p = try string(path, "path")
        guard flags & ~UInt32(KVPACK_OPEN_EXACT) == 0 else { throw ABIError("unknown flags 0x\(String(flags, radix: 16))") }
        let arithmetic: AttentionArithmetic = flags & UInt32(KVPACK_OPEN_EXACT) != 0 ? .exact : .fast
        let handle = ReaderHandle(reader: try KVPackReader(path: p, arithmetic: arithmetic))
        out.pointee = OpaquePointer(Unmanaged.passRetained(handle).toOpaque())
    }
}

@_cdecl("kvpack_close")
public func kvpack_close(_ reader: OpaquePointer?) {
    guard let reader else { return }
    Unmanaged<ReaderHandle>.fromOpaque(UnsafeRawPointer(reader)).release()
}

@_cdecl("kvpack_geometry_of")
public func kvpack_geometry_of(_ reader: OpaquePointer?, _ out: UnsafeMutablePointer<kvpack_geometry>?,
                               _ err: UnsafeMutablePointer<kvpack_error>?) -> Int32 {
    withStatus(err) {
        let r = try ReaderHandle.from(reader).reader
        guard let out else { throw ABIError("geometry is NULL") }
        let g = r.geometry, m = r.manifest
        out.pointee = kvpack_geometry(layers: UInt32(g.layerCount), query_heads: UInt32(g.queryHeadCount),
                                      kv_heads: UInt32(g.kvHeadCount), head_dim: UInt32(g.headDim),
                                      segment_tokens: UInt32(m.segmentTokens), rope_layout: UInt32(m.rope.layout.rawValue),
                                      rope_theta: m.rope.theta, keys_post_rope: m.rope.keysArePostRoPE ? 1 : 0,
                                      max_positions: m.maxPositions)
    }
}

@_cdecl("kvpack_token_count")
public func kvpack_token_count(_ reader: OpaquePointer?) -> UInt64 {
    guard let r = try? ReaderHandle.from(reader).reader else { return 0 }
    return UInt64(r.tokenCount)
}

/// tokens [start, start + count) of `r`, with KVPACK_ALL_TOKENS meaning "to the end".
private func tokenRange(_ r: KVPackReader, _ start: UInt64, _ count: UInt64) throws -> Range<Int> {
    let n = UInt64(r.tokenCount)
    guard start <= n else { throw ABIError("start token \(start) is past the file's \(n) tokens") }
    let c = count == UInt64.max /* KVPACK_ALL_TOKENS */ ? n - start : count
    guard c <= n - start else { throw ABIError("tokens \(start)..<\(start) + \(count) run past the file's \(n) tokens") }
    return Int(start) ..< Int(start + c)
}

@_cdecl("kvpack_tokens")
public func kvpack_tokens(_ reader: OpaquePointer?, _ start: UInt64, _ count: UInt64, _ ids: UnsafeMutablePointer<UInt32>?,
                          _ positions: UnsafeMutablePointer<UInt32>?, _ err: UnsafeMutablePointer<kvpack_error>?) -> Int32 {
    withStatus(err) {
        let r = try ReaderHandle.from(reader).reader
        let range = try tokenRange(r, start, count)
        let t = try r.tokens(range)
        ids?.update(from: t.ids, count: t.ids.count)
        positions?.update(from: t.positions, count: t.positions.count)
    }
}

@_cdecl("kvpack_info_json")
public func kvpack_info_json(_ reader: OpaquePointer?, _ buffer: UnsafeMutablePointer<CChar>?, _ capacity: Int,
                             _ length: UnsafeMutablePointer<Int>?, _ err: UnsafeMutablePointer<kvpack_error>?) -> Int32 {
    withStatus(err) {
        let r = try ReaderHandle.from(reader).reader
        try deliver(try json(FileSummary(reader: r)), buffer: buffer, capacity: capacity, length: length)
    }
}

@_cdecl("kvpack_decode")
public func kvpack_decode(_ reader: OpaquePointer?, _ layer: UInt32, _ kvHead: Int32, _ kindValue: UInt32, _ start: UInt64,
                          _ count: UInt64, _ dtype: UInt32, _ out: UnsafeMutableRawPointer?, _ outBytes: UInt64,
                          _ err: UnsafeMutablePointer<kvpack_error>?) -> Int32 {
    withStatus(err) {
        let handle = try ReaderHandle.from(reader)
        let r = handle.reader, g = r.geometry
        let k = try kind(kindValue)
        let range = try tokenRange(r, start, count)
        guard layer < g.layerCount else { throw ABIError("layer \(layer) is outside the file's 0..<\(g.layerCount)") }
        guard kvHead >= -1, kvHead < g.kvHeadCount else {
            throw ABIError("kv_head \(kvHead) is neither -1 (all) nor one of the file's 0..<\(g.kvHeadCount)")
        }
        let heads = kvHead == -1 ? Array(0 ..< g.kvHeadCount) : [Int(kvHead)]
        let width: Int
        switch Int(dtype) {
        case KVPACK_F32: width = 4
        case KVPACK_F16: width = 2
        default: throw ABIError("dtype \(dtype) is neither KVPACK_F32 (1) nor KVPACK_F16 (2)")
        }
        let per = range.count * g.headDim
        let need = heads.count * per * width
        guard UInt64(need) <= outBytes else { throw ABIError("the output needs \(need) bytes, out_bytes is \(outBytes)") }
        guard need > 0 else { return }
        guard let out else { throw ABIError("out is NULL") }
        try handle.withWorkspaces(1) { ws in
            if width == 4 {
                let floats = out.bindMemory(to: Float.self, capacity: heads.count * per)
                for (i, h) in heads.enumerated() {
                    try r.decode(layer: Int(layer), kvHead: h, kind: k, tokens: range, into: floats + i * per, workspace: ws[0])
                }
            } else {
                let halves = out.bindMemory(to: Float16.self, capacity: heads.count * per)
                var scratch = [Float](repeating: 0, count: per)
                for (i, h) in heads.enumerated() {
                    try scratch.withUnsafeMutableBufferPointer { s in
                        try r.decode(layer: Int(layer), kvHead: h, kind: k, tokens: range, into: s.baseAddress!, workspace: ws[0])
                        for j in 0 ..< per { halves[i * per + j] = Float16(s[j]) }
                    }
                }
            }
        }
    }
}

@_cdecl("kvpack_attend")
public func kvpack_attend(_ reader: OpaquePointer?, _ layer: UInt32, _ queries: UnsafePointer<Float>?, _ start: UInt64,
                          _ count: UInt64, _ scale: Float, _ threads: UInt32, _ output: UnsafeMutablePointer<Float>?,
                          _ err: UnsafeMutablePointer<kvpack_error>?) -> Int32 {
    withStatus(err) {
        let handle = try ReaderHandle.from(reader)
        let r = handle.reader, g = r.geometry
        let range = try tokenRange(r, start, count)
        guard layer < g.layerCount else { throw ABIError("layer \(layer) is outside the file's 0..<\(g.layerCount)") }
        guard !range.isEmpty else { throw ABIError("attention over no tokens (start \(start), count \(count))") }
        guard scale.isFinite, scale >= 0 else { throw ABIError("scale \(scale) is not a finite number >= 0") }
        guard let queries, let output else { throw ABIError("queries or output is NULL") }
        let n = max(1, min(Int(threads), g.kvHeadCount, 256))
        try handle.withWorkspaces(n) { ws in
            try r.attendLayer(Int(layer), queries: queries, tokens: range, scale: scale == 0 ? nil : scale, output: output, workspaces: ws)
        }
    }
}

@_cdecl("kvpack_rows_at")
public func kvpack_rows_at(_ reader: OpaquePointer?, _ layer: UInt32, _ kvHead: UInt32, _ kindValue: UInt32, _ token: UInt64,
                           _ rows: UnsafeMutablePointer<kvpack_rows>?, _ err: UnsafeMutablePointer<kvpack_error>?) -> Int32 {
    withStatus(err) {
        let r = try ReaderHandle.from(reader).reader, g = r.geometry
        let k = try kind(kindValue)
        guard let rows else { throw ABIError("rows is NULL") }
        rows.pointee = kvpack_rows(data: nil, token_start: 0, token_count: 0, dtype: 0, row_bytes: 0)
        guard layer < g.layerCount, kvHead < g.kvHeadCount else {
            throw ABIError("layer \(layer), KV head \(kvHead) is outside the file's \(g.layerCount) x \(g.kvHeadCount)")
        }
        guard token < UInt64(r.tokenCount) else { throw ABIError("token \(token) is past the file's \(r.tokenCount) tokens") }
        guard let m = try r.mappedRows(layer: Int(layer), kvHead: Int(kvHead), kind: k, token: Int(token)) else { return }
        rows.pointee = kvpack_rows(data: m.base, token_start: UInt64(m.tokens.lowerBound), token_count: UInt64(m.tokens.count),
                                   dtype: UInt32(m.elementType.rawValue), row_bytes: UInt32(m.rowBytes))
    }
}
