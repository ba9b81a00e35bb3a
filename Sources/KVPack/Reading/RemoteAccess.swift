// Reading a remote object's image: every frame is made readable (`ensure`) before it is parsed,
// and a frame whose checksum fails is fetched once more before the failure is believed. For a
// local file all of this is a branch on `isRemote`.

extension MappedFile {
    /// Makes the frame at `offset` readable: its 64-byte header, then, once that header
    /// verifies, its payload. A header that does not verify is left for the caller's own decode
    /// to report (with its field names), so a damaged length never makes this fetch a wild range.
    func ensureFrame(at offset: UInt64, limit: UInt64, salt: UInt64) throws {
        guard isRemote else { return }
        let start = Int(min(offset, UInt64(bytes.count)))
        try ensure(start ..< min(start + FrameHeader.size, bytes.count))
        guard let h = try? FrameHeader.decode(bytes, at: offset, limit: limit, salt: salt) else { return }
        try ensure(Int(h.payloadOffset) ..< Int(h.payloadOffset + h.storedLength))
    }

    /// The bytes of the frame at `offset` as far as its header tells (the header alone if it
    /// does not verify): what `refetch` replaces after a checksum failure.
    func frameRange(at offset: UInt64, limit: UInt64, salt: UInt64) -> Range<Int> {
        let start = Int(min(offset, UInt64(bytes.count)))
        guard let h = try? FrameHeader.decode(bytes, at: offset, limit: limit, salt: salt, verifyingChecksum: false) else {
            return start ..< min(start + FrameHeader.size, bytes.count)
        }
        return start ..< Int(h.payloadOffset + h.storedLength)
    }
}

extension KVPackReader {
    /// Runs `body`, which reads and verifies the frame at `offset`; if its bytes fail a checksum
    /// and they came from a remote object, fetches that frame again (the cached copy or the
    /// response may have been damaged) and runs `body` once more. A second failure is the
    /// object's own damage and is reported as such.
    func readingFrame<T>(at offset: UInt64, limit: UInt64, _ body: () throws -> T) throws -> T {
        do {
            try file.ensureFrame(at: offset, limit: limit, salt: header.salt)
            return try body()
        } catch let e as KVPackError where e.code == .checksumMismatch && file.isRemote {
            guard try file.refetch(file.frameRange(at: offset, limit: limit, salt: header.salt)) else { throw e }
            try file.ensureFrame(at: offset, limit: limit, salt: header.salt)
            do {
                return try body()
            } catch var again as KVPackError where again.code == .checksumMismatch {
                again.message += " (fetched twice from \(file.remoteName ?? "the object"): the object itself holds these bytes)"
                throw again
            }
        }
    }
}
