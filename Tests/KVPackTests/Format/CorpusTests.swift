import Foundation
import Testing
@testable import KVPack

/// Every file in corpus/ meets the expectation its name states (see scripts/make-corpus.sh):
/// the reader keeps accepting every version it ever wrote, and every regression stays fixed.
struct CorpusTests {
    static let files: [String] = {
        let dir = packageRoot + "/corpus"
        return ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).filter { $0.hasSuffix(".kvpack") }.sorted()
    }()

    @Test("the corpus has seeds of every raw scheme and every damage kind")
    func present() {
        #expect(Self.files.count >= 14)
        for s in ["f32", "f16", "bf16"] {
            #expect(Self.files.contains("valid__v1-raw-\(s).kvpack"))
            #expect(Self.files.contains("valid__v1-raw-\(s)-zstd.kvpack"))
        }
    }

    @Test("each corpus file validates as its name says", arguments: files)
    func expectation(name: String) throws {
        let path = packageRoot + "/corpus/" + name
        let expect = String(name.prefix { $0 != "_" })
        let report = Validator.validate(file: try MappedFile(path: path), path: path, deep: true)
        switch expect {
        case "valid":
            #expect(report.problems.isEmpty, "\(report.problems)")
        case "warn":
            #expect(report.isValid, "\(report.problems)")
            #expect(!report.problems.isEmpty)
        default:
            let code = String(expect.dropFirst("error-".count))
            #expect(expect.hasPrefix("error-"))
            #expect(report.problems.contains { $0.severity == .error && $0.code == code }, "\(report.problems)")
        }
        // Every file that opens is attended over, on every KV head of the first and last layer:
        // damaged ones must fail with a KVPackError, never trap (fuzz regressions live here).
        guard let r = try? KVPackReader(path: path), r.tokenCount > 0 else { return }
        let g = r.geometry
        for layer in Set([0, g.layerCount - 1]) {
            for head in 0 ..< g.kvHeadCount {
                let q = [Float](repeating: 0.3, count: g.groupSize * g.headDim)
                do {
                    let out = try r.attend(layer: layer, kvHead: head, queries: q)
                    #expect(out.allSatisfy { $0.isFinite })
                } catch {
                    #expect(error is KVPackError)
                    #expect(!report.isValid, "a valid file failed attention: \(error)")
                }
            }
        }
    }
}
