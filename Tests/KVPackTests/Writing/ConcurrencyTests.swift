import Foundation
import Testing
@testable import KVPack
import KVPackLab

/// One writer at a time (a flock), and readers that see a consistent commit while it appends.
@Suite(.serialized)
struct ConcurrencyTests {
    static let g = ModelGeometry(layerCount: 2, queryHeadCount: 2, kvHeadCount: 1, headDim: 8)

    @Test("a second writer is refused with a clear error, in this process and in another; the lock goes with the first")
    func secondWriterRefused() throws {
        let dir = temporaryDirectory()
        let path = dir + "/w.kvpack"
        let (m, blobs) = try makeManifest(Self.g, segmentTokens: 4, spec: "raw:f32")
        let data = RandomKV(geometry: Self.g, tokens: 30, seed: 3)
        let first = try KVPackWriter.create(path: path, manifest: m, blobs: blobs, options: testOptions())
        try data.append(to: first, 0 ..< 10)
        try first.commit()
        do {
            _ = try KVPackWriter.resume(path: path, options: testOptions())
            Issue.record("a second writer in the same process was not refused")
        } catch let e as KVPackError {
            #expect(e.code == .locked && e.message.contains("another process"), "\(e)")
        }
        let (status, _, err) = try runKVPack(["synth", path, "--resume", "--tokens", "5"])
        #expect(status != 0 && err.contains("writer lock"), "\(err)")
        try data.append(to: first, 10 ..< 20)
        try first.close()
        // Released at close: the next writer appends.
        let second = try KVPackWriter.resume(path: path, options: testOptions())
        try data.append(to: second, 20 ..< 30)
        try second.close()
        #expect(try KVPackReader(path: path).tokenCount == 30)
    }

    @Test("a reader opened while a writer appends sees exactly the last commit it observed; reopening sees later ones")
    func readerDuringAppends() throws {
        let dir = temporaryDirectory()
        let path = dir + "/r.kvpack"
        let (m, blobs) = try makeManifest(Self.g, segmentTokens: 4, spec: "int:k4v2")
        let data = RandomKV(geometry: Self.g, tokens: 60, seed: 5)
        let writer = try KVPackWriter.create(path: path, manifest: m, blobs: blobs, options: testOptions())
        var committed = 0
        var readers: [(KVPackReader, Int, [Float])] = []
        for step in 0 ..< 20 {
            try data.append(to: writer, step * 3 ..< step * 3 + 3)
            // Between commits the uncommitted rows are invisible.
            let mid = try KVPackReader(path: path)
            #expect(mid.tokenCount == committed, "step \(step): saw \(mid.tokenCount) tokens, last commit \(committed)")
            if step % 2 == 1 {
                try writer.commit()
                committed = step * 3 + 3
            }
            let r = try KVPackReader(path: path)
            #expect(r.tokenCount == committed)
            readers.append((r, committed, try r.decode(layer: 1, kvHead: 0, kind: .key)))
        }
        try writer.close()
        // Old readers keep reading their own commit, unchanged by everything appended since.
        for (r, n, keys) in readers {
            #expect(r.tokenCount == n)
            #expect(try r.decode(layer: 1, kvHead: 0, kind: .key) == keys)
            #expect(Validator.validate(file: r.file, path: path).isValid)
        }
        #expect(try KVPackReader(path: path).tokenCount == 60)
    }

    @Test("readers in this process follow a writer in another process: each sees a whole commit, at or after the last one announced")
    func readerOfAnotherProcess() throws {
        let dir = temporaryDirectory()
        let path = dir + "/x.kvpack"
        let child = Process()
        child.executableURL = URL(fileURLWithPath: kvpackBinary)
        child.arguments = ["synth", path, "--model", "stories260k", "--layers", "2", "--tokens", "3000", "--segment-tokens", "16",
                           "--scheme", "raw:f32", "--batch", "5", "--commit-every", "7", "--seed", "4", "--print-commits"]
        let out = Pipe()
        child.standardOutput = out
        child.standardError = FileHandle.nullDevice
        try child.run()
        var announced = 0, checks = 0, grew = Set<Int>()
        var announcements = CommitAnnouncements(out.fileHandleForReading)
        while let n = announcements.next() {
            announced = n
            guard n % 70 == 0 || n == 3000 else { continue }
            let reader = try KVPackReader(path: path)
            let seen = reader.tokenCount
            #expect(seen >= announced && (seen % 7 == 0 || seen == 3000), "saw \(seen) tokens after commit \(announced) was announced")
            let gen = SyntheticKV(geometry: reader.geometry, rope: reader.manifest.rope, seed: 4)
            #expect(try gen.mismatches(in: reader, tokens: max(0, seen - 40) ..< seen) == 0)
            grew.insert(seen)
            checks += 1
        }
        child.waitUntilExit()
        #expect(child.terminationStatus == 0)
        // The writer may outrun the pipe; at least some readers must have caught it mid-file.
        #expect(checks >= 20 && grew.contains { $0 < 3000 }, "readers refreshed \(checks) times, saw \(grew.sorted())")
        #expect(try KVPackReader(path: path).tokenCount == 3000)
    }

    @Test("a reader mapping a file whose uncommitted bytes a resuming writer has just truncated opens at the commit instead of dying of SIGBUS (found while building the soak)")
    func readerAfterTruncation() throws {
        let dir = temporaryDirectory()
        let path = dir + "/t.kvpack", crashed = dir + "/crashed.kvpack"
        let g = ModelGeometry(layerCount: 2, queryHeadCount: 4, kvHeadCount: 2, headDim: 64)
        let (m, blobs) = try makeManifest(g, segmentTokens: 16, spec: "raw:f32")
        let data = RandomKV(geometry: g, tokens: 1000, seed: 8)
        let writer = try KVPackWriter.create(path: path, manifest: m, blobs: blobs, options: testOptions())
        try data.append(to: writer, 0 ..< 40)
        try writer.commit()
        // Sealed segments reach the file before any commit: a writer that dies here leaves
        // over 1 MB (hundreds of pages) of uncommitted bytes. Copy them as it would.
        try data.append(to: writer, 40 ..< 1000)
        writeBytes(fileBytes(path), to: crashed)
        try writer.close()
        // A reader maps the crashed file, then a writer resumes it and truncates the tail.
        let mapped = try MappedFile(path: crashed)
        #expect(mapped.bytes.count > 1_000_000)
        let resumed = try KVPackWriter.resume(path: crashed, options: testOptions())
        let reader = try KVPackReader(file: mapped, path: crashed)
        #expect(reader.tokenCount == 40)
        #expect(reader.recoveryNotes.contains { if case .uncommittedBytes = $0 { true } else { false } })
        #expect(try reader.decode(layer: 1, kvHead: 1, kind: .value) == data.stream(layer: 1, head: 1, kind: .value, tokens: 0 ..< 40))
        try resumed.close()
        // The copy pread makes of the mapped bytes: what is left, then nothing past the end.
        let size = (try FileManager.default.attributesOfItem(atPath: crashed)[.size] as! NSNumber).intValue
        var buffer = [UInt8](repeating: 0xEE, count: 256)
        let n = buffer.withUnsafeMutableBytes { mapped.copyBytes(at: size - 100, into: $0) }
        #expect(n == 100 && buffer[0 ..< 100] == fileBytes(crashed)[(size - 100)...])
        #expect(buffer.withUnsafeMutableBytes { mapped.copyBytes(at: size + 4096, into: $0) } == 0)
    }
}

