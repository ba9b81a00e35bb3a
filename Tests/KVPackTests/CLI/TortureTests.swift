import Foundation
import Testing
@testable import KVPack

/// The CI-sized runs of `kvpack torture` (`make torture` runs the long ones): writers killed at
/// random points (raw f32 with and without zstd, bf16, int:k4v2; f32 content checked bit for
/// bit against the generator), and a file cut at every byte offset.
@Suite(.serialized)
struct TortureTests {
    struct KillResult: Decodable { var points, passed, killedWhileWriting, lostCommits, notACommitPoint, invalid, wrongContent, appendFailed: Int }
    struct TornResult: Decodable { var cuts, openedAtCommit, refused, failures: Int; var commitsSeen: [Int] }
    struct SoakResult: Decodable {
        var kills, commitsAcknowledged, tokensWritten, tokensLost, errors, readerOpens, readerAttends, readerValidations, readerCommitsObserved, readerCrashes: Int
        var samples: [String]
    }

    @Test("60 writers SIGKILLed at random points: every file opens at a commit at or after the last acknowledged, validates, holds what was written, and accepts appends")
    func killAnywhere() throws {
        let (status, out, err) = try runKVPack(["torture", "kill", "--points", "60", "--seed", "7", "--json"])
        #expect(status == 0, "\(err)")
        let r = try JSONDecoder().decode(KillResult.self, from: Data(out.utf8))
        #expect(r.points == 60 && r.passed == 60, "\(out) \(err)")
        #expect(r.killedWhileWriting == 60, "each writer must still have been running when killed")
    }

    @Test("a file cut at every byte offset opens at one of its commits with that commit's content, or is refused")
    func tornAtEveryByte() throws {
        let (status, out, err) = try runKVPack(["torture", "torn", "--scheme", "int:k4v2", "--json"])
        #expect(status == 0, "\(err)")
        let r = try JSONDecoder().decode(TornResult.self, from: Data(out.utf8))
        #expect(r.failures == 0 && r.cuts == r.openedAtCommit + r.refused)
        #expect(r.commitsSeen == Array(stride(from: 0, through: 40, by: 5)), "every commit is reached by some cut")
    }

    @Test("soak: a writer killed and resumed for 12 s while 2 reader processes open, check, attend and validate: no error, no lost token")
    func soak() throws {
        let (status, out, err) = try runKVPack(["torture", "soak", "--seconds", "12", "--readers", "2", "--tokens-per-file", "8000", "--seed", "5", "--json"])
        #expect(status == 0, "\(out) \(err)")
        let r = try JSONDecoder().decode(SoakResult.self, from: Data(out.utf8))
        #expect(r.errors == 0 && r.tokensLost == 0 && r.readerCrashes == 0, "\(r.samples)")
        #expect(r.kills >= 10 && r.commitsAcknowledged > 100 && r.tokensWritten > 1000, "\(out)")
        #expect(r.readerOpens > 10 && r.readerAttends > 10 && r.readerValidations > 2 && r.readerCommitsObserved > 5, "\(out)")
    }
}

