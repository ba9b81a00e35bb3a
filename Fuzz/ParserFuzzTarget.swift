// libFuzzer entry for the KVPack reader's parsers only: the header, the manifest, the commit
// search and index chain, version 2 segment tables (each block offset resolved), tail runs,
// token ids and positions, the token selection and metadata notes. No decode, no attention, no
// validation pass: each input costs what opening a file costs, so this target runs thousands of
// inputs a second where the full one (FuzzTarget.swift) runs tens. Built by `make fuzz-parser`:
//   swiftc -sanitize=fuzzer,address -parse-as-library -D KVPACK_FUZZING ...
// Each input is parsed twice: as is, and with checksum comparisons off so mutations reach the
// parsers behind the checksums. Then once more as a remote object (the reader's bytes fetched
// page by page through `RemoteObject`, as from S3), which must open and list exactly what the
// local copy does: a difference is reported as a crash.

@_cdecl("LLVMFuzzerTestOneInput")
public func kvpackParserFuzzOneInput(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let input = UnsafeRawBufferPointer(start: data, count: size)
    let file = MappedFile(copying: input)
    fuzzingIgnoresChecksums = false
    parse(file)
    fuzzingIgnoresChecksums = true
    parse(file)
    fuzzingIgnoresChecksums = false
    compareRemote(file, Array(input))
    return 0
}

/// The input as an object fetched by range.
struct FuzzObject: RemoteObject {
    let bytes: [UInt8]
    var name: String { "fuzz://input" }
    var size: Int { bytes.count }
    var version: String { "1" }
    func fetch(_ ranges: [Range<Int>], deliver: @escaping @Sendable (Int, UnsafeRawBufferPointer) throws -> Void) throws {
        for (i, r) in ranges.enumerated() { try bytes[r].withUnsafeBytes { try deliver(i, $0) } }
    }
}

/// What a reader says about a file, for comparing two readers of the same bytes.
func listing(_ file: MappedFile) -> String {
    do {
        let r = try KVPackReader(file: file)
        let n = r.tokenCount
        var out = "\(n) \(r.commitOffset) \(r.commitSerial) \(r.recoveryNotes.count)"
        out += " \(String(describing: Result { try r.tokens(0 ..< n) }))"
        out += " \(String(describing: Result { try r.userMetadata().map(\.value) }))"
        for segment in 0 ..< min(n / max(r.segmentTokens, 1), 16) {
            out += " \(String(describing: Result { try r.blockOffset(segment: segment, stream: r.geometry.streamCount - 1) }))"
        }
        return out
    } catch {
        return "refused: \(error)"
    }
}

func compareRemote(_ local: MappedFile, _ bytes: [UInt8]) {
    guard let remote = try? MappedFile(remote: FuzzObject(bytes: bytes), cache: RemoteCache(directory: nil, coalesceGap: 0)) else { return }
    // A remote reader fetches a frame that fails its checksum once more and then says so.
    let a = listing(local), b = listing(remote).replacing(" (fetched twice from fuzz://input: the object itself holds these bytes)", with: "")
    if a != b { fatalError("a remote reader disagrees with the local one:\n local: \(a.prefix(500))\nremote: \(b.prefix(500))") }
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
