import Foundation
import Testing
@testable import KVPack
@testable import KVPackInterop

let kvSamplesDirectory = packageRoot + "/../shared/kv-samples/smollm2-chat"

struct NpyTests {
    @Test("arrays written by numpy read back with their dtype, shape and values; ours read in numpy")
    func numpyRoundTrip() throws {
        let dir = temporaryDirectory()
        let script = """
        import numpy as np, sys
        d = sys.argv[1]
        np.save(d + '/f2.npy', (np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 8 - 1).astype(np.float16))
        np.save(d + '/f4.npy', np.array([[1.5, -2.25e-3], [3e7, 0.0]], dtype=np.float32))
        np.save(d + '/i4.npy', np.array([7, -9, 2**31 - 1], dtype=np.int32))
        np.save(d + '/scalar.npy', np.float32(4.5))
        x = np.load(d + '/ours.npy'); assert x.dtype == np.float32 and x.shape == (2, 2, 3), (x.dtype, x.shape)
        assert (x.reshape(-1) == np.arange(12, dtype=np.float32) * 0.5).all()
        print('ok')
        """
        NpyArray(floats: (0 ..< 12).map { Float($0) * 0.5 }, shape: [2, 2, 3]).encoded().withUnsafeBytes {
            _ = FileManager.default.createFile(atPath: dir + "/ours.npy", contents: Data($0))
        }
        #expect(try runPython(["-c", script, dir]).contains("ok"))
        let f2 = try NpyArray(path: dir + "/f2.npy")
        #expect(f2.dtype == .float16 && f2.shape == [2, 3, 4])
        #expect(f2.floats() == (0 ..< 24).map { Float($0) / 8 - 1 })
        let f4 = try NpyArray(path: dir + "/f4.npy")
        #expect(f4.floats() == [1.5, -2.25e-3, 3e7, 0])
        #expect(try NpyArray(path: dir + "/i4.npy").floats() == [7, -9, Float(Int32.max)])
        let scalar = try NpyArray(path: dir + "/scalar.npy")
        #expect(scalar.shape == [] && scalar.floats() == [4.5])
    }

    @Test("damaged .npy files are errors")
    func damaged() throws {
        let good = NpyArray(floats: [1, 2, 3, 4], shape: [2, 2]).encoded()
        #expect(throws: NpyError.self) { try NpyArray(bytes: Array(good.dropLast(1))) }
        #expect(throws: NpyError.self) { try NpyArray(bytes: Array(good.prefix(9))) }
        var magic = good
        magic[1] = 0
        #expect(throws: NpyError.self) { try NpyArray(bytes: magic) }
        var header = good
        header[8] = 0xFF  // header length past the end
        header[9] = 0xFF
        #expect(throws: NpyError.self) { try NpyArray(bytes: header) }
        let text = String(decoding: good, as: UTF8.self)
        for (from, to) in [("(2, 2)", "(9, 9)"), ("<f4", "<c8"), ("False", "True "), ("(2, 2)", "(2,-1)")] {
            let bad = Array(text.replacingOccurrences(of: from, with: to).utf8)
            #expect(throws: NpyError.self, "\(from) -> \(to)") { try NpyArray(bytes: bad.count == good.count ? bad : good + [0]) }
        }
    }
}

struct TensorEvalTests {
    @Test("on real SmolLM2 tensors: f16 is exact, more bits mean less error, keys per channel beat keys per token")
    func smolLM2Samples() throws {
        let samples = try SampleTensors(directory: kvSamplesDirectory)
        #expect(samples.geometry == ModelGeometry(layerCount: 30, queryHeadCount: 9, kvHeadCount: 3, headDim: 64))
        let report = try TensorEval.run(samples: samples, schemes: ["raw:f16", "int:k8v8", "int:k4v2", "int:k2v4", "int:k4v2:kc64"],
                                        directory: temporaryDirectory(), positionStride: 16, layerLimit: 3)
        let r = Dictionary(uniqueKeysWithValues: report.results.map { ($0.spec, $0) })
        #expect(r["raw:f16"]!.keyRelativeError == 0 && r["raw:f16"]!.valueRelativeError == 0)
        #expect(r["raw:f16"]!.attentionRelativeError < 1e-5)
        #expect(r["int:k8v8"]!.attentionRelativeError < r["int:k4v2"]!.attentionRelativeError)
        // The paper's observation at an equal budget: K4V2 hurts attention less than K2V4.
        #expect(r["int:k4v2"]!.attentionRelativeError < r["int:k2v4"]!.attentionRelativeError)
        // KIVI's: keys have outlier channels, so per-channel key groups lose less.
        #expect(r["int:k4v2:kc64"]!.keyRelativeError < r["int:k4v2"]!.keyRelativeError / 2)
    }
}
