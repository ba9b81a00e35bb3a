import Foundation
import Testing
@testable import KVPack

/// Resuming from a reader the caller already opened: the file is mapped once (the session
/// attends through that reader), and a reader the file has moved past is refused.
struct ResumeFromReaderTests {
    static let g = ModelGeometry(layerCount: 2, queryHeadCount: 4, kvHeadCount: 2, headDim: 8)

    @Test("a writer resumes from an open reader as from the path, and the session keeps that reader")
    func resumeFromReader() throws {
        let dir = temporaryDirectory()
        let data = RandomKV(geometry: Self.g, tokens: 90, seed: 3)
        let a = dir + "/a.kvpack", b = dir + "/b.kvpack"
        for path in [a, b] {
            try writeFile(path, data: data, segmentTokens: 16, spec: "raw:f32", batches: [7, 30], commitsAfter: [37], options: testOptions(salt: 42))
        }
        // Uncommitted bytes after the last commit, as a crashed writer leaves them.
        for path in [a, b] {
            let h = try #require(FileHandle(forWritingAtPath: path))
            try h.seekToEnd()
            try h.write(contentsOf: Data(repeating: 7, count: 100))
            try h.close()
        }

        try KVPackWriter.resume(path: a, options: testOptions()).close()
        let reader = try KVPackReader(path: b)
        let session = try KVCacheSession.resume(reader: reader, options: testOptions())
        #expect(session.reader === reader, "the session attends through the caller's reader, not a second mapping")
        #expect(session.tokenCount == 90)
        #expect(try session.tokenIDs == reader.tokenIDs)
        try session.close()
        // Both truncated the uncommitted bytes and committed nothing new: the same bytes.
        #expect(try KVPackReader(path: b).recoveryNotes.isEmpty, "the uncommitted bytes were truncated away")
        let same = fileBytes(a) == fileBytes(b)
        #expect(same, "resume(path:) and resume(reader:) left different bytes")
    }

    @Test("a reader opened before another writer appended is refused (locked): resuming from it would lose that commit")
    func staleReaderRefused() throws {
        let dir = temporaryDirectory()
        let path = dir + "/s.kvpack"
        let data = RandomKV(geometry: Self.g, tokens: 40, seed: 4)
        try writeFile(path, data: data, segmentTokens: 16, spec: "raw:f16", batches: [20])
        let stale = try KVPackReader(path: path)
        let other = try KVPackWriter.resume(path: path, options: testOptions())
        try RandomKV(geometry: Self.g, tokens: 45, seed: 4).append(to: other, 40 ..< 45)
        try other.close()
        #expect { try KVPackWriter.resume(reader: stale, options: testOptions()) } throws: {
            ($0 as? KVPackError)?.code == .locked && "\($0)".contains("changed after it was opened")
        }
        #expect(try KVPackReader(path: path).tokenCount == 45, "the refused resume left the other writer's commit in place")
        // A reader of bytes in memory has no file to resume.
        let copy = try KVPackReader(file: MappedFile(copying: fileBytes(path)))
        #expect { try KVPackWriter.resume(reader: copy) } throws: { ($0 as? KVPackError)?.code == .invalidArgument }
    }
}
