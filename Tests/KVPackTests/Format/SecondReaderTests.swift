import Foundation
import Testing
@testable import KVPack

/// Spec/reader/spec_reader.py is a reader written from Spec/ alone, in Python, sharing no code with
/// the library. It must decode every readable corpus file to the same tokens and the same bits
/// as the Swift reader: evidence that the Spec suffices to read the format.
struct SecondReaderTests {
    struct Decoded: Decodable {
        var tokens: Int
        var ids: [UInt32]
        var positions: [UInt32]
        var streams: [[UInt32]]
        var selection: Selection?
        var metadata: [String: String]
        var note_errors: [String]
    }

    /// Section 10.3 as the Python reader parses it.
    struct Selection: Decodable {
        var kept: Int
        var source_tokens: Int
        var signature_bits: Int
        var policy: UInt8
        var anchor: UInt8
        var anchor_seed: UInt64
        var budget, representatives, recent, sink, window: Int
        var source_index: [Int]
        var importance_bits: [UInt32]
        var reasons: [UInt8]
        var anchor_bits: [UInt8]
        var signatures: [UInt8]
    }

    static let files: [String] = CorpusTests.files.filter { $0.hasPrefix("valid") || $0.hasPrefix("warn") }.map { "corpus/" + $0 }
        + ["Spec/example.kvpack"]

    @Test("the Python reader written from the Spec agrees with the Swift reader", arguments: files)
    func agrees(file: String) throws {
        let data = Data(try runPython([packageRoot + "/Spec/reader/spec_reader.py", packageRoot + "/" + file]).utf8)
        let python = try JSONDecoder().decode(Decoded.self, from: data)
        let reader = try KVPackReader(path: packageRoot + "/" + file)
        #expect(python.tokens == reader.tokenCount)
        #expect(try python.ids == reader.tokenIDs)
        #expect(try python.positions == reader.positions)
        let selection = try reader.tokenSelection()
        #expect((python.selection == nil) == (selection == nil), "\(file): the readers disagree on whether there is a tsel frame")
        if let py = python.selection, let s = selection {
            let p = s.parameters
            #expect(py.kept == s.keptCount && py.source_tokens == s.sourceTokenCount && py.signature_bits == s.signatureBits)
            #expect(py.policy == p.policy.rawValue && py.anchor == p.anchor.rawValue && py.anchor_seed == p.anchorSeed)
            let pyParameters: [Int] = [py.budget, py.representatives, py.recent, py.sink, py.window]
            let swiftParameters: [Int] = [p.budget, p.representatives, p.recentWindow, p.sinkTokens, p.observationWindow]
            #expect(pyParameters == swiftParameters)
            #expect(py.source_index == s.kept && py.importance_bits == s.importance.map(\.bitPattern))
            #expect(py.reasons == s.reasons.map(\.rawValue) && py.anchor_bits == s.anchor && py.signatures == s.signatures)
        }
        // The manifest's metadata with the notes applied (10.4), as each reader computes it.
        let metadata = try reader.userMetadata()
        #expect(python.metadata == Dictionary(metadata.map { ($0.key, $0.value) }, uniquingKeysWith: { $1 }))
        #expect(python.note_errors.isEmpty)
        let g = reader.geometry
        #expect(python.streams.count == g.streamCount)
        for s in 0 ..< min(python.streams.count, g.streamCount) {
            let id = g.streamID(s)
            let swift = try reader.decode(layer: id.layer, kvHead: id.kvHead, kind: id.kind).map(\.bitPattern)
            let firstDifference = zip(python.streams[s], swift).enumerated().first { $0.element.0 != $0.element.1 }
            #expect(python.streams[s].count == swift.count, "\(file) stream \(s): lengths differ")
            #expect(firstDifference == nil, "\(file) stream \(s) element \(firstDifference?.offset ?? 0): Python \(firstDifference?.element.0 ?? 0), Swift \(firstDifference?.element.1 ?? 0)")
        }
    }

    @Test("a damaged note is an error of that note in both readers; the tokens stay readable")
    func damagedNote() throws {
        let file = "corpus/error-invalidField__v2.1-note-duplicate-key.kvpack"
        let data = Data(try runPython([packageRoot + "/Spec/reader/spec_reader.py", packageRoot + "/" + file]).utf8)
        let python = try JSONDecoder().decode(Decoded.self, from: data)
        let reader = try KVPackReader(path: packageRoot + "/" + file)
        #expect(python.tokens == reader.tokenCount && reader.tokenCount == 37)
        #expect(python.note_errors.count == 1 && python.metadata["a"] == nil)
        #expect(reader.metadataNoteCount == 1)
        #expect(throws: KVPackError.self) { try reader.metadataNotes() }
        do {
            _ = try reader.metadataNotes()
        } catch let e as KVPackError {
            #expect(e.field == "note.entries[1].key" && e.code == .invalidField)
        }
    }
}
