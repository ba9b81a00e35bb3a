// libFuzzer entry for the KVPack reader's decode and attention paths over files: open, deep
// validate, summary, token selection, metadata, decode and attention (whole range and a range
// that cuts blocks) of the first and last layer and KV head, attention over a whole layer; for
// files that validate, attention over codes against attention over the decoded rows
// (Exercise.swift). Seeds: corpus/ (every file version the reader accepts, damaged files).
// Built by `make fuzz-decode`:
//   swiftc -sanitize=fuzzer,address -parse-as-library -D KVPACK_FUZZING ...
// Each input is run twice: as is, and with checksum comparisons off so mutations reach the
// manifest, index, tail and block parsers behind the checksums.

@_cdecl("LLVMFuzzerTestOneInput")
public func kvpackDecodeFuzzOneInput(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let file = MappedFile(copying: UnsafeRawBufferPointer(start: data, count: size))
    fuzzingIgnoresChecksums = false
    if exercise(file) { checkAttentionAgainstDecode(file, seed: UInt64(size)) }
    fuzzingIgnoresChecksums = true
    exercise(file)
    fuzzingIgnoresChecksums = false
    return 0
}
