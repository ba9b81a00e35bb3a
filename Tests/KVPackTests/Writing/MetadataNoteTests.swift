import Foundation
import Testing
@testable import KVPack

struct MetadataNoteTests {
    static let geometry = ModelGeometry(layerCount: 2, queryHeadCount: 2, kvHeadCount: 1, headDim: 8)

    func create(_ path: String, major: UInt16, notes: Bool) throws -> (KVPackWriter, RandomKV) {
        let data = RandomKV(geometry: Self.geometry, tokens: 40, seed: 5, maxExponent: 4)
        var (m, _) = try makeManifest(Self.geometry, segmentTokens: 8, spec: "raw:f16")
        m.userMetadata = [.init("title", "first"), .init("keep", "yes")]
        var o = testOptions(major: major)
        if notes { o.features.insert(.notes) }
        return (try KVPackWriter.create(path: path, manifest: m, options: o), data)
    }

    @Test("notes add and replace metadata after creation, commit by commit, across resume; the header records 2.1 / 1.5",
          arguments: [UInt16(1), 2])
    func notesAccumulate(major: UInt16) throws {
        let dir = temporaryDirectory()
        let path = dir + "/notes.kvpack"
        let (w, data) = try create(path, major: major, notes: true)
        try data.append(to: w, 0 ..< 10)
        try w.attach(note: MetadataNote(entries: [.init("chat.turn.1.sampling", "greedy")]))
        try w.commit()
        try data.append(to: w, 10 ..< 20)
        try w.attach(note: MetadataNote(entries: [.init("title", "renamed"), .init("chat.turn.2.sampling", "temperature 0.7")]))
        // Attached but not committed: invisible to a reader until the commit.
        #expect(try KVPackReader(path: path).metadataNoteCount == 1)
        try w.close()
        let r = try KVPackReader(path: path)
        #expect(r.header.minor == (major == 1 ? 5 : 1))
        #expect(r.metadataNoteCount == 2)
        #expect(try r.userMetadata() == [.init("title", "renamed"), .init("keep", "yes"), .init("chat.turn.1.sampling", "greedy"),
                                         .init("chat.turn.2.sampling", "temperature 0.7")])
        #expect(r.manifest.metadata("title") == "first", "the manifest itself never changes")
        let resumed = try KVPackWriter.resume(path: path, options: testOptions())
        try data.append(to: resumed, 20 ..< 40)
        try resumed.attach(note: MetadataNote(entries: [.init("title", "third")]))
        try resumed.close()
        let r2 = try KVPackReader(path: path)
        #expect(r2.metadataNoteCount == 3 && r2.tokenCount == 40)
        #expect(try r2.userMetadata().first == .init("title", "third"))
        #expect(Validator.validate(file: r2.file, path: path, deep: true).problems.isEmpty)
        let summary = try FileSummary(reader: r2)
        #expect(summary.version == "\(major).\(major == 1 ? 5 : 1)" && summary.userMetadata.first?.value == "third")
        // A conversion folds the notes into the new manifest.
        var o = Converter.Options()
        o.durability = .flush
        _ = try Converter.convert(input: path, output: dir + "/converted.kvpack", spec: SchemeSpec.parse("raw:f32", geometry: Self.geometry),
                                  layers: [], options: o)
        let c = try KVPackReader(path: dir + "/converted.kvpack")
        #expect(c.metadataNoteCount == 0 && c.manifest.metadata("title") == "third" && c.manifest.metadata("chat.turn.2.sampling") == "temperature 0.7")
    }

    @Test("a file created without the notes feature refuses a note (its version does not define them), and invalid notes are refused")
    func refusals() throws {
        let dir = temporaryDirectory()
        let (w, data) = try create(dir + "/plain.kvpack", major: 2, notes: false)
        try data.append(to: w, 0 ..< 4)
        #expect(!w.acceptsNotes)
        #expect(throws: KVPackError.self) { try w.attach(note: MetadataNote(entries: [.init("a", "b")])) }
        try w.close()
        #expect(try KVPackReader(path: dir + "/plain.kvpack").header.minor == 0)
        let (w2, _) = try create(dir + "/notes.kvpack", major: 2, notes: true)
        #expect(throws: KVPackError.self) { try w2.attach(note: MetadataNote(entries: [])) }
        #expect(throws: KVPackError.self) { try w2.attach(note: MetadataNote(entries: [.init("a", "1"), .init("a", "2")])) }
        try w2.close()
    }
}
