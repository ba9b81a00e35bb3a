// libFuzzer entry for the tensor files `kvpack import` reads (untrusted input like any file):
// safetensors (header JSON, tensor directory, data offsets, input_ids / position_ids) and .npy
// (magic, versions 1-3, the header dict literal, shape against the data). Each input is parsed
// as both; what parses as a KV cache (per-layer key/value tensors) is imported into a .kvpack
// file the way `kvpack import` does, when small. Built by `make fuzz-tensors` from the KVPack
// and KVPackInterop sources as one module.

#if canImport(Glibc)
import Glibc
#endif

let tensorsFuzzOutput = "/tmp/kvpack-fuzz-tensors-\(getpid()).kvpack"

@_cdecl("LLVMFuzzerTestOneInput")
public func tensorsFuzzOneInput(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let input = UnsafeRawBufferPointer(start: data, count: size)
    // safetensors: the file, then the cache view over it (both tensor layouts, two batch rows).
    let file = MappedFile(copying: input)
    if let tensors = try? SafetensorsFile(file: file, path: "fuzz") {
        for t in tensors.tensors.values.prefix(16) {
            _ = tensors.floats(t, from: 0, count: min(t.count, 64))
            if t.count <= 4096 { _ = tensors.integers(t) }
        }
        for batch in [0, 1] {
            if let cache = try? SafetensorsCache(file: tensors, batchIndex: batch) { importSmall(cache) }
        }
    }
    // .npy: the array as the keys and values of a one-layer directory cache.
    if let array = try? NpyArray(bytes: Array(input)) {
        _ = array.floats()
        if let cache = try? NpyDirectoryCache(directory: "fuzz", layers: [(array, array)], meta: nil) { importSmall(cache) }
    }
    return 0
}

/// What `kvpack import` does, for caches of at most 64K elements (work per input stays bounded).
func importSmall(_ cache: any ExternalCache) {
    let h = cache.geometryHint
    guard h.layers * h.kvHeads * h.tokens * h.headDim <= 1 << 16, h.headDim <= 256 else { return }
    var options = WriterOptions()
    options.durability = .flush
    options.overwrite = true
    _ = try? CacheInterop.importCache(cache, to: tensorsFuzzOutput, queryHeads: nil, rope: RoPEConfig(theta: 10000, layout: .interleaved),
                                      spec: "raw:f16", segmentTokens: 16, options: options, producer: "fuzz")
    unlink(tensorsFuzzOutput)
}
