import CXXHash

#if KVPACK_FUZZING
/// Fuzz builds only: run each input a second time with checksum comparisons off, so mutations
/// get past the checksums to the parsers behind them.
nonisolated(unsafe) var fuzzingIgnoresChecksums = false
#endif

/// XXH3-64, the checksum of every KVPack header and payload (Spec/: "Checksums").
public enum Checksum {
    /// Whether a stored checksum matches (always, in a fuzz build's checksum-blind pass).
    @inline(__always)
    static func matches(_ stored: UInt64, _ actual: UInt64) -> Bool {
        #if KVPACK_FUZZING
        if fuzzingIgnoresChecksums { return true }
        #endif
        return stored == actual
    }

    public static func xxh3(_ bytes: UnsafeRawBufferPointer, seed: UInt64 = 0) -> UInt64 {
        // libxxhash reads nothing for a zero length, but wants a non-null pointer.
        guard let base = bytes.baseAddress, bytes.count > 0 else {
            return withUnsafeBytes(of: UInt8(0)) { XXH3_64bits_withSeed($0.baseAddress, 0, seed) }
        }
        return XXH3_64bits_withSeed(base, bytes.count, seed)
    }

    /// XXH3-128 as 16 bytes (low 64 bits, then high, each little-endian): model fingerprints.
    public static func xxh3_128(_ bytes: UnsafeRawBufferPointer) -> [UInt8] {
        let h = bytes.withMemoryRebound(to: UInt8.self) { b -> XXH128_hash_t in
            guard let base = b.baseAddress, b.count > 0 else { return withUnsafeBytes(of: UInt8(0)) { XXH3_128bits($0.baseAddress, 0) } }
            return XXH3_128bits(base, b.count)
        }
        var out: [UInt8] = []
        withUnsafeBytes(of: h.low64.littleEndian) { out += $0 }
        withUnsafeBytes(of: h.high64.littleEndian) { out += $0 }
        return out
    }

    public static func xxh3(_ bytes: [UInt8], seed: UInt64 = 0) -> UInt64 {
        bytes.withUnsafeBytes { xxh3($0, seed: seed) }
    }

    /// Incremental XXH3-64 for payloads written in pieces (the full index is streamed).
    final class Streaming {
        private let state: OpaquePointer

        init(seed: UInt64 = 0) {
            state = XXH3_createState()
            XXH3_64bits_reset_withSeed(state, seed)
        }

        deinit { XXH3_freeState(state) }

        func update(_ bytes: UnsafeRawBufferPointer) {
            guard let base = bytes.baseAddress, bytes.count > 0 else { return }
            XXH3_64bits_update(state, base, bytes.count)
        }

        var digest: UInt64 { XXH3_64bits_digest(state) }
    }
}
