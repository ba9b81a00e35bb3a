import CKVPackABI
import KVPack

// kvpack_create ... kvpack_writer_close: writing a file through a handle (see include/kvpack.h).

private func durability(_ value: UInt32) throws -> WriterOptions.Durability {
    switch Int(value) {
    case KVPACK_DURABLE_FSYNC: .fsync
    case KVPACK_DURABLE_FLUSH: .flush
    default: throw ABIError("durability \(value) is neither KVPACK_DURABLE_FSYNC (0) nor KVPACK_DURABLE_FLUSH (1)")
    }
}

/// The geometry and RoPE of a kvpack_geometry, refusing what the format cannot hold.
private func geometry(_ c: kvpack_geometry) throws -> (ModelGeometry, RoPEConfig) {
    func within(_ v: UInt32, _ name: String, _ limit: Int) throws -> Int {
        guard v >= 1, v <= limit else { throw ABIError("geometry.\(name) is \(v), must be 1...\(limit)") }
        return Int(v)
    }
    let g = ModelGeometry(layerCount: try within(c.layers, "layers", Limits.maxLayers),
                          queryHeadCount: try within(c.query_heads, "query_heads", Limits.maxQueryHeads),
                          kvHeadCount: try within(c.kv_heads, "kv_heads", Limits.maxKVHeads),
                          headDim: try within(c.head_dim, "head_dim", Limits.maxHeadDim))
    guard g.queryHeadCount % g.kvHeadCount == 0 else {
        throw ABIError("geometry.query_heads (\(g.queryHeadCount)) is not a multiple of geometry.kv_heads (\(g.kvHeadCount))")
    }
    guard c.rope_layout <= UInt8.max, let layout = RoPELayout(rawValue: UInt8(c.rope_layout)) else {
        throw ABIError("geometry.rope_layout is \(c.rope_layout), must be KVPACK_ROPE_NONE, _INTERLEAVED or _ROTATE_HALF (0-2)")
    }
    guard c.rope_theta.isFinite, c.rope_theta >= 0 else { throw ABIError("geometry.rope_theta \(c.rope_theta) is not finite and >= 0") }
    guard c.keys_post_rope <= 1 else { throw ABIError("geometry.keys_post_rope is \(c.keys_post_rope), must be 0 or 1") }
    return (g, RoPEConfig(theta: c.rope_theta, layout: layout, keysArePostRoPE: c.keys_post_rope == 1))
}

@_cdecl("kvpack_create")
public func kvpack_create(_ path: UnsafePointer<CChar>?, _ options: UnsafePointer<kvpack_create_options>?,
                          _ out: UnsafeMutablePointer<OpaquePointer?>?, _ err: UnsafeMutablePointer<kvpack_error>?) -> Int32 {
    withStatus(err) {
        guard let out else { throw ABIError("writer (the output pointer) is NULL") }
        out.pointee = nil
        let p = try string(path, "path")
        guard let o = options?.pointee else { throw ABIError("options is NULL") }
        let (g, rope) = try geometry(o.geometry)
        let text = o.scheme.map { String(cString: $0) } ?? "raw:f16"
        let spec = try SchemeSpec.parse(text, geometry: g)
        var file = NewFile(geometry: g, rope: rope, schemes: spec, producer: o.producer.map { String(cString: $0) } ?? "libkvpack")
        if o.geometry.segment_tokens != 0 {
            guard o.geometry.segment_tokens <= Limits.maxSegmentTokens else {
                throw ABIError("geometry.segment_tokens \(o.geometry.segment_tokens) is above \(Limits.maxSegmentTokens)")
            }
            file.segmentTokens = Int(o.geometry.segment_tokens)
        }
        file.maxPositions = o.geometry.max_positions
        file.modelFingerprint = withUnsafeBytes(of: o.model_fingerprint) { Array($0) }
        if o.metadata_count > 0 {
            guard let keys = o.metadata_keys, let values = o.metadata_values else {
                throw ABIError("metadata_count is \(o.metadata_count) but metadata_keys or metadata_values is NULL")
            }
            for i in 0 ..< Int(o.metadata_count) {
                file.metadata.append(Manifest.MetadataEntry(try string(keys[i], "metadata_keys[\(i)]"),
                                                            try string(values[i], "metadata_values[\(i)]")))
            }
        }
        var w = WriterOptions()
        w.overwrite = o.overwrite != 0
        w.durability = try durability(o.durability)
        let writer = try KVPackWriter.create(path: p, file: file, options: w)
        out.pointee = OpaquePointer(Unmanaged.passRetained(WriterHandle(writer: writer)).toOpaque())
    }
}

@_cdecl("kvpack_resume")
public func kvpack_resume(_ path: UnsafePointer<CChar>?, _ durabilityValue: UInt32, _ out: UnsafeMutablePointer<OpaquePointer?>?,
                          _ err: UnsafeMutablePointer<kvpack_error>?) -> Int32 {
    withStatus(err) {
        guard let out else { throw ABIError("writer (the output pointer) is NULL") }
        out.pointee = nil
        var w = WriterOptions()
        w.durability = try durability(durabilityValue)
        let writer = try KVPackWriter.resume(path: try string(path, "path"), options: w)
        out.pointee = OpaquePointer(Unmanaged.passRetained(WriterHandle(writer: writer)).toOpaque())
    }
}

@_cdecl("kvpack_append")
public func kvpack_append(_ writer: OpaquePointer?, _ tokens: UInt64, _ ids: UnsafePointer<UInt32>?, _ positions: UnsafePointer<UInt32>?,
                          _ keys: UnsafePointer<Float>?, _ values: UnsafePointer<Float>?, _ strides: UnsafePointer<Int64>?,
                          _ floats: UInt64, _ err: UnsafeMutablePointer<kvpack_error>?) -> Int32 {
    withStatus(err) {
        let w = try WriterHandle.from(writer).writer, g = w.manifest.geometry
        guard tokens > 0 else { return }
        guard tokens <= UInt64(Limits.maxTokens) else { throw ABIError("\(tokens) tokens in one append; a file holds at most \(Limits.maxTokens)") }
        let t = Int(tokens)
        guard let ids else { throw ABIError("token_ids is NULL") }
        guard let keys, let values else { throw ABIError("keys or values is NULL") }
        guard let strides else { throw ABIError("strides is NULL") }
        let s = (strides[0], strides[1], strides[2])
        guard s.0 >= 0, s.1 >= 0, s.2 >= 0 else { throw ABIError("strides \(s) must be >= 0") }
        // The last float the strides address, computed without overflow, against `floats`.
        let limit = UInt64(Int.max)
        var last = UInt64(g.headDim - 1)
        for (stride, n) in [(s.0, g.layerCount), (s.1, t), (s.2, g.kvHeadCount)] {
            let (m, o1) = UInt64(stride).multipliedReportingOverflow(by: UInt64(n - 1))
            let (sum, o2) = last.addingReportingOverflow(m)
            guard !o1, !o2, sum < limit else { throw ABIError("strides \(s) address beyond any buffer") }
            last = sum
        }
        guard last < floats else {
            throw ABIError("strides \(s) for \(t) tokens address float \(last); keys and values hold \(floats) (floats)")
        }
        let layout = KVBatchLayout(layerStride: Int(s.0), tokenStride: Int(s.1), headStride: Int(s.2))
        let n = Int(last) + 1
        try w.append(tokenIDs: Array(UnsafeBufferPointer(start: ids, count: t)),
                     positions: positions.map { Array(UnsafeBufferPointer(start: $0, count: t)) },
                     keys: UnsafeBufferPointer(start: keys, count: n), values: UnsafeBufferPointer(start: values, count: n),
                     layout: layout)
    }
}

@_cdecl("kvpack_commit")
public func kvpack_commit(_ writer: OpaquePointer?, _ err: UnsafeMutablePointer<kvpack_error>?) -> Int32 {
    withStatus(err) { try WriterHandle.from(writer).writer.commit() }
}

@_cdecl("kvpack_writer_token_count")
public func kvpack_writer_token_count(_ writer: OpaquePointer?) -> UInt64 {
    guard let w = try? WriterHandle.from(writer).writer else { return 0 }
    return UInt64(w.tokenCount)
}

@_cdecl("kvpack_writer_close")
public func kvpack_writer_close(_ writer: OpaquePointer?, _ err: UnsafeMutablePointer<kvpack_error>?) -> Int32 {
    guard let writer else { return withStatus(err) {} }
    let handle = Unmanaged<WriterHandle>.fromOpaque(UnsafeRawPointer(writer))
    defer { handle.release() }
    return withStatus(err) { try handle.takeUnretainedValue().writer.close() }
}
