import Foundation
import Testing
@testable import KVPack
@testable import KVPackModels

/// `kvpack prune` and `kvpack eval --prune` on the bundled model, in separate processes.
@Suite(.serialized)
struct PruneCommandTests {
    @Test("prune a real cache, resume the pruned file where the source ended, and the observer sees real attention")
    func pruneAndResume() throws {
        let dir = temporaryDirectory()
        let (s1, _, e1) = try runKVPack(["generate", "--model", bundledModelPath, "--save", dir + "/a.kvpack", "--steps", "150", "--no-fsync"])
        #expect(s1 == 0, "\(e1)")
        let (s2, out, e2) = try runKVPack(["prune", dir + "/a.kvpack", dir + "/b.kvpack", "--scheme", "crush:25%+int:k4v2", "--no-fsync"])
        #expect(s2 == 0, "\(e2)")
        #expect(out.contains("kept 38 of 151 tokens") && out.contains("representative"), "\(out)")
        let a = try KVPackReader(path: dir + "/a.kvpack"), b = try KVPackReader(path: dir + "/b.kvpack")
        let selection = try #require(try b.tokenSelection())
        #expect(selection.sourceTokenCount == 151 && selection.keptCount == 38 && selection.signatureBits == 5 * 8)
        let aPositions = try a.positions
        #expect(try b.positions == selection.kept.map { aPositions[$0] })
        #expect(try b.positions.last == 150)
        // Importance is cumulative attention: the 32 observed queries x 40 heads each spread a weight of 1.
        let observation = try AttentionObserver.observe(model: LlamaModel(path: bundledModelPath), reader: a, tokens: 151, window: 32)
        #expect(abs(observation.importance().reduce(0, +) - 32 * 40) < 0.01)
        let (s3, o3, e3) = try runKVPack(["generate", "--resume", dir + "/b.kvpack", "--steps", "10"])
        #expect(s3 == 0, "\(e3)")
        let grown = try KVPackReader(path: dir + "/b.kvpack")
        #expect(try grown.tokenCount == 48 && grown.positions.last == 160, "new tokens continue at the source's positions")
        #expect(try grown.tokenSelection() == selection)
        _ = o3
        // Re-applied in place at this commit: half of the 48 tokens, chosen from all of them.
        let (s5, _, e5) = try runKVPack(["prune", dir + "/b.kvpack", dir + "/b.kvpack", "--budget", "0.5", "--overwrite", "--no-fsync"])
        #expect(s5 == 0, "\(e5)")
        let again = try KVPackReader(path: dir + "/b.kvpack")
        #expect(try again.tokenCount == 24 && again.positions.last == 160)
        #expect(try again.tokenSelection()?.sourceTokenCount == 48)
        #expect(Validator.validate(file: again.file, path: "b", deep: true).problems.isEmpty)
        // A budget outside (0, 1] or a bad policy is refused before anything is written.
        let (s4, _, e4) = try runKVPack(["prune", dir + "/a.kvpack", dir + "/c.kvpack", "--budget", "1.5"])
        #expect(s4 != 0 && e4.contains("budget"), "\(e4)")
        #expect(access(dir + "/c.kvpack", F_OK) != 0)
    }

    @Test("eval --prune: keeping everything is exact; pruning costs perplexity, reported per policy")
    func evalPrune() throws {
        let (s, out, e) = try runKVPack(["eval", "--model", bundledModelPath, "--prune", "1.0,0.25", "--tokens", "300", "--json"])
        #expect(s == 0, "\(e)")
        let report = try JSONDecoder().decode(PruneEval.Report.self, from: Data(out.utf8))
        #expect(report.results.count == 6 && report.points == [150])
        for r in report.results {
            if r.budget == 1.0 {
                // Same cache, other batching (one batch vs segment-aligned): equal to float rounding.
                #expect(abs(r.perplexityDelta) < 1e-3 * r.baselinePerplexity && r.greedyAgreement > 0.99, "\(r.policy): \(r.perplexityDelta)")
            } else {
                #expect(r.perplexityDelta > 0.01 && abs(r.keptFraction - 0.25) < 0.02, "\(r.policy): \(r.perplexityDelta)")
            }
        }
    }
}
