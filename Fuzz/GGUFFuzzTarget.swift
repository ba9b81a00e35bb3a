// libFuzzer entry for the GGUF model reader (a model file is untrusted input too): parse the
// header, metadata and tensor directory, build the Llama weights and tokenizer, and when they
// load, run one token through the model and round-trip a string through the tokenizer.
// Built by `make fuzz-gguf` from the KVPack and KVPackModels sources as one module.

@_cdecl("LLVMFuzzerTestOneInput")
public func ggufFuzzOneInput(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let file = MappedFile(copying: UnsafeRawBufferPointer(start: data, count: size))
    guard let gguf = try? GGUFFile(file: file, path: "fuzz"), let weights = try? LlamaWeights(gguf: gguf) else { return 0 }
    let model = LlamaModel(weights: weights)
    // Bounded work: small models only (the seeds are tiny; a mutation cannot grow a tensor
    // beyond the input's size, which the reader checks).
    if model.config.dim * model.config.layerCount <= 1 << 14 {
        _ = try? model.forward(tokens: [0], cache: DenseKVCache(geometry: model.config.geometry))
    }
    if let t = model.tokenizer { _ = t.decode(t.encode("Hello, world! 123 日本", parseSpecial: true)) }
    return 0
}
