// libFuzzer entry for the KVPack reader and validator. Built by `make fuzz` together with the
// library sources as one module (SwiftPM renames `main` in executables, so it is linked by hand):
//   swiftc -sanitize=fuzzer,address -parse-as-library -D KVPACK_FUZZING ...
// Each input is run twice: as is, and with checksum comparisons off so mutations reach the
// manifest, index, tail and block parsers behind the checksums.

@_cdecl("LLVMFuzzerTestOneInput")
public func kvpackFuzzOneInput(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let file = MappedFile(copying: UnsafeRawBufferPointer(start: data, count: size))
    fuzzingIgnoresChecksums = false
    exercise(file)
    fuzzingIgnoresChecksums = true
    exercise(file)
    return 0
}

/// Open, validate (deep), decode and attend: everything a reader does with a file.
func exercise(_ file: MappedFile) {
    _ = Validator.validate(file: file, path: "fuzz", deep: true)
    guard let reader = try? KVPackReader(file: file) else { return }
    _ = try? FileSummary(reader: reader)
    _ = try? reader.tokenSelection()
    let g = reader.geometry
    let workspace = AttentionWorkspace()
    let queries = [Float](repeating: 0.25, count: g.groupSize * g.headDim)
    var output = [Float](repeating: 0, count: g.groupSize * g.headDim)
    // Bounded work per input: a few streams, whole range and a range that cuts blocks.
    let n = reader.tokenCount
    for layer in Set([0, g.layerCount - 1]) {
        for head in Set([0, g.kvHeadCount - 1]) {
            for range in [0 ..< n, n / 3 ..< n - n / 4] where !range.isEmpty {
                queries.withUnsafeBufferPointer { q in
                    output.withUnsafeMutableBufferPointer { o in
                        _ = try? reader.attend(layer: layer, kvHead: head, queries: q.baseAddress!, tokens: range,
                                               output: o.baseAddress!, workspace: workspace)
                    }
                }
                _ = try? reader.decode(layer: layer, kvHead: head, kind: .value, tokens: range)
            }
        }
    }
}
