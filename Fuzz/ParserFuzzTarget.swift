// libFuzzer entry for the KVPack reader's parsers only: the header, the manifest, the commit
// search and index chain, version 2 segment tables (each block offset resolved), tail runs,
// token ids and positions, the token selection and metadata notes. No decode, no attention, no
// validation pass: each input costs what opening a file costs, so this target runs thousands of
// inputs a second where the full one (FuzzTarget.swift) runs tens. Built by `make fuzz-parser`:
//   swiftc -sanitize=fuzzer,address -parse-as-library -D KVPACK_FUZZING ...
// Each input is parsed twice: as is, and with checksum comparisons off so mutations reach the
// parsers behind the checksums.

@_cdecl("LLVMFuzzerTestOneInput")
public func kvpackParserFuzzOneInput(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let file = MappedFile(copying: UnsafeRawBufferPointer(start: data, count: size))
    fuzzingIgnoresChecksums = false
    parse(file)
    fuzzingIgnoresChecksums = true
    parse(file)
    fuzzingIgnoresChecksums = false
    return 0
}

/// Everything opening and listing a file reads; bounded work per input.
func parse(_ file: MappedFile) {
    guard let reader = try? KVPackReader(file: file) else { return }
    _ = try? reader.tokenSelection()
    _ = try? reader.userMetadata()
    let n = reader.tokenCount
    _ = try? reader.tokens(0 ..< n)
    _ = try? reader.tokens(n / 2 ..< n)
    let streams = reader.geometry.streamCount
    for segment in 0 ..< min(n / max(reader.segmentTokens, 1), 64) {
        for stream in [0, streams / 2, streams - 1] where stream >= 0 {
            _ = try? reader.blockOffset(segment: segment, stream: stream)
        }
    }
}
