/// A `note` frame (ancillary, Spec 10.4): user metadata added after the file was created, such
/// as the sampler settings of each turn of a chat. The manifest is written once; notes follow
/// the conversation. Entries are encoded as the manifest's (Spec 6.2, item 4). A file's
/// metadata is the manifest's entries with the notes applied in file order, a later value
/// replacing an earlier one of the same key.
public struct MetadataNote: Sendable, Equatable {
    public var entries: [Manifest.MetadataEntry]

    public init(entries: [Manifest.MetadataEntry]) { self.entries = entries }

    static let tag = FrameTag("note")
    /// Entries a note may hold: far more than any tool writes, small enough that a claimed
    /// count is checked against the payload before anything is allocated.
    static let maxEntries = 1 << 16

    /// Type fields of the frame header (offsets 32..55): the entry count; the rest reserved.
    var typeFields: FrameHeader.TypeFields {
        var f = FrameHeader.FieldPacker()
        f.set(32, UInt32(entries.count))
        return f.words
    }

    func encodedPayload() -> [UInt8] {
        var w = ByteWriter()
        Manifest.encode(metadata: entries, into: &w)
        return w.bytes
    }

    /// Checks a note before it is written: the rules a reader applies.
    func validate() throws {
        guard !entries.isEmpty, entries.count <= Self.maxEntries else {
            throw KVPackError.argument("a note holds 1...\(Self.maxEntries) entries, not \(entries.count)")
        }
        guard Set(entries.map(\.key)).count == entries.count else { throw KVPackError.argument("a note's keys must be unique") }
        for e in entries where e.key.utf8.count > Int(UInt16.max) || e.value.utf8.count > Int(UInt32.max) {
            throw KVPackError.argument("note key \"\(e.key.prefix(40))\" or its value is too long")
        }
    }

    /// Parses and checks a `note` frame whose header has been verified.
    static func decode(header h: FrameHeader, file: UnsafeRawBufferPointer) throws -> MetadataNote {
        let at = h.offset
        guard h.tag == tag else { throw KVPackError.invalid(at, "note.tag", "expected a note frame, found \(h.tag)") }
        guard !h.isCompressed else { throw KVPackError.invalid(at + 4, "note.flags", "a note frame is never compressed") }
        guard h.rawLength == h.storedLength else {
            throw KVPackError.invalid(at + 16, "note.rawLength", "is \(h.rawLength); an uncompressed frame's must equal storedLength \(h.storedLength)")
        }
        let count = h.field32(32)
        guard count >= 1, Int(count) <= maxEntries else {
            throw KVPackError.invalid(at + 32, "note.entryCount", "is \(count); a note holds 1...\(maxEntries) entries")
        }
        try h.verifyPayload(in: file, field: "note")
        var c = ByteCursor(h.storedPayload(in: file), base: h.payloadOffset, structure: "note")
        let entries = try Manifest.decodeMetadata(&c, count: count, countAt: at + 32, field: "entries")
        guard c.remaining == 0 else {
            throw c.invalid("end", "\(c.remaining) bytes follow the last entry; the payload must end exactly there")
        }
        return MetadataNote(entries: entries)
    }
}
