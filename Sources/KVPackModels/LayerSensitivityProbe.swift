#if canImport(Glibc)
import Glibc
#endif
import KVPack

/// Measures what coding one layer's keys (or values) alone costs the model, for
/// `int:auto:B:measured` (`CacheStatistics.LayerSensitivity`): the model reads a calibration
/// text by teacher forcing through a file-backed cache that is lossless (f32) except for that
/// one layer and role, coded with the planner's probe (2-bit int codes), and the increase of its
/// mean negative log-likelihood over the all-lossless run is that layer's sensitivity. One run
/// per layer and role plus the reference: 2 x layers + 1 passes over the text.
public enum LayerSensitivityProbe {
    /// `fileOptions`: the spec's window and sinks, which every probe file keeps too (a sink
    /// changes which layers' errors matter).
    public static func measure(model: LlamaModel, tokens: [Int], probe: LayerSetup, fileOptions: SchemeSpec.FileOptions = .init(),
                               segmentTokens: Int = 64, directory: String,
                               progress: (String) -> Void = { _ in }) throws -> CacheStatistics.LayerSensitivity {
        let g = model.config.geometry
        guard tokens.count >= 2 else {
            throw KVPackError(.needsCalibration, "measuring layer sensitivity needs a calibration text of at least 2 tokens, got \(tokens.count)")
        }
        let lossless = try SchemeSpec.parse("raw:f32", geometry: g).layers[0]
        func spec(_ layer: Int?, _ kind: KVKind) -> SchemeSpec {
            var layers = Array(repeating: lossless, count: g.layerCount)
            if let layer {
                if kind == .key { layers[layer].key = probe.key } else { layers[layer].value = probe.value }
            }
            return SchemeSpec(text: "sensitivity probe", layers: layers, segmentTokens: nil, rationale: [], fileOptions: fileOptions)
        }
        let path = directory + "/sensitivity-probe-\(getpid()).kvpack"
        defer { unlink(path) }
        let reference = try meanLoss(model: model, tokens: tokens, spec: spec(nil, .key), segmentTokens: segmentTokens, path: path)
        var key: [Double] = [], value: [Double] = []
        for layer in 0 ..< g.layerCount {
            key.append(try meanLoss(model: model, tokens: tokens, spec: spec(layer, .key), segmentTokens: segmentTokens, path: path) - reference)
            value.append(try meanLoss(model: model, tokens: tokens, spec: spec(layer, .value), segmentTokens: segmentTokens, path: path) - reference)
            func nats(_ x: Double) -> String { let r = (x * 10000).rounded() / 10000; return r >= 0 ? "+\(r)" : "\(r)" }
            progress("sensitivity: layer \(layer + 1) of \(g.layerCount) (loss \(nats(key[layer])) with its keys, \(nats(value[layer])) with its values, nats/token)")
        }
        let kept = [fileOptions.windowTokens > 0 ? "window \(fileOptions.windowTokens)" : nil,
                    fileOptions.sinkTokens > 0 ? "\(fileOptions.sinkTokens) sinks" : nil].compactMap { $0 }
        return CacheStatistics.LayerSensitivity(probeBits: 2, probe: "2-bit int codes" + (kept.isEmpty ? "" : " (\(kept.joined(separator: ", ")) lossless)"),
                                                tokens: tokens.count, key: key, value: value)
    }

    /// Mean negative log-likelihood (nats per predicted token) of `tokens` read by teacher forcing
    /// through a file-backed cache of `spec`, as `eval` reads.
    static func meanLoss(model: LlamaModel, tokens: [Int], spec: SchemeSpec, segmentTokens: Int, path: String) throws -> Double {
        let file = Conversation.newFile(for: model, spec: spec, segmentTokens: segmentTokens, producer: "kvpack sensitivity probe")
        var options = WriterOptions()
        options.durability = .flush
        options.overwrite = true
        let session = try KVCacheSession.create(path: path, file: file, options: options)
        defer { try? session.close() }
        var loss = 0.0, count = 0
        try QualityEval.teacherForce(model: model, text: tokens, cache: session, segmentTokens: segmentTokens,
                                     windowTokens: spec.fileOptions.windowTokens) { logits, target in
            loss -= QualityEval.Run.score(logits: logits, target: target).logProb
            count += 1
        }
        return loss / Double(max(count, 1))
    }
}
