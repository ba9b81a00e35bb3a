// libFuzzer entry for the llama.cpp state-file importer (a state file is untrusted input): parse
// the session or sequence file, fit it to a model, and decode every key and value row the way
// `kvpack import` does (dequantize, unrotate, read transposed values). Built by
// `make fuzz-llama-cpp` from the KVPack, KVPackModels and Interop/LlamaCpp sources as one module;
// seeded with corpus/llama.cpp (scripts/make-llama-cpp-corpus.py).

@_cdecl("LLVMFuzzerTestOneInput")
public func llamaCppFuzzOneInput(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let file = MappedFile(copying: UnsafeRawBufferPointer(start: data, count: size))
    for cellExtension in [0, 8] {
        guard let state = try? LlamaCppState(file: file, cellExtensionBytes: cellExtension) else { continue }
        _ = try? state.onlyStream()
        // The model the rows claim (one KV head as wide as a row), SmolLM2's shape, and a model of
        // two heads: the importer must refuse every mismatch without reading out of bounds.
        guard let stream = state.streams.first(where: { !$0.cells.isEmpty }), let first = stream.layers.first else { continue }
        let width = first.keys.elements
        var shapes = [ModelGeometry(layerCount: 30, queryHeadCount: 9, kvHeadCount: 3, headDim: 64)]
        if (1 ... 4096).contains(width) {
            shapes.append(ModelGeometry(layerCount: stream.layers.count, queryHeadCount: 1, kvHeadCount: 1, headDim: width))
            if width % 2 == 0 { shapes.append(ModelGeometry(layerCount: stream.layers.count, queryHeadCount: 4, kvHeadCount: 2, headDim: width / 2)) }
        }
        for g in shapes {
            let model = LlamaCppModel(architecture: state.architecture ?? "llama", geometry: g, rope: .none)
            for rotation in LlamaCppCache.Rotation.allCases {
                guard let cache = try? LlamaCppCache(state: state, model: model, rotation: rotation) else { continue }
                var row = [Float](repeating: 0, count: g.kvHeadCount * g.headDim)
                row.withUnsafeMutableBufferPointer { out in
                    for layer in 0 ..< g.layerCount {
                        for t in 0 ..< cache.tokenCount {
                            cache.keys(layer: layer, token: t, into: out.baseAddress!)
                            cache.values(layer: layer, token: t, into: out.baseAddress!)
                        }
                    }
                }
                _ = cache.provenance(source: "fuzz")
            }
        }
    }
    return 0
}
