// libFuzzer entry for the tensor files `kvpack import` reads (untrusted input like any file):
// safetensors (header JSON, tensor directory, data offsets, input_ids / position_ids) and .npy
// (magic, versions 1-3, the header dict literal, shape against the data), and mlx-lm prompt
// caches (class names and scalars in the metadata, quantized codes/scales/biases). Each input is
// parsed as all three; what parses as a KV cache (per-layer key/value tensors) is imported into a .kvpack
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
            // mlx-lm prompt caches: dequantized rows, then both imports (codes copied into int
            // blocks, and re-encoded from floats).
            if let mlx = try? MlxPromptCache(file: tensors, batchIndex: batch) {
                let h = mlx.geometryHint
                if h.layers * h.kvHeads * h.tokens * h.headDim <= 1 << 16 {
                    for layer in 0 ..< h.layers { _ = try? mlx.rows(layer: layer, kvHead: 0, kind: .value, tokens: 0 ..< h.tokens) }
                    importSmallMlx(mlx)
                }
            }
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

func importSmallMlx(_ cache: MlxPromptCache) {
    var options = WriterOptions()
    options.durability = .flush
    options.overwrite = true
    let rope = RoPEConfig(theta: 10000, layout: .rotateHalf)
    for spec in [nil, "raw:f16"] as [String?] {
        if (try? MlxInterop.importCache(cache, to: tensorsFuzzOutput, queryHeads: nil, rope: rope, spec: spec, segmentTokens: nil,
                                        options: options, producer: "fuzz")) != nil,
           let reader = try? KVPackReader(path: tensorsFuzzOutput) {
            // What was written reads back: decode every stream (a copied block was validated).
            for s in 0 ..< reader.geometry.streamCount {
                let id = reader.geometry.streamID(s)
                _ = try? reader.decode(layer: id.layer, kvHead: id.kvHead, kind: id.kind)
            }
        }
        unlink(tensorsFuzzOutput)
    }
}
