// What the kvpack fuzz targets do with a file (shared by DecodeFuzzTarget.swift and
// GeneratedFuzzTarget.swift, each compiled with the library sources as one module):
// open, validate, summarise, decode and attend, and the differential check of attention over
// codes (in one pass, and split across threads) against dense attention over the decoded rows.

#if canImport(Glibc)
import Glibc
#endif

/// Open, validate (deep), decode and attend: everything a reader does with a file. True when
/// the file validated with no problem at all.
@discardableResult
func exercise(_ file: MappedFile) -> Bool {
    let clean = Validator.validate(file: file, path: "fuzz", deep: true).problems.isEmpty
    guard let reader = try? KVPackReader(file: file) else { return clean }
    _ = try? FileSummary(reader: reader)
    _ = try? reader.tokenSelection()
    _ = try? reader.userMetadata()
    let n = reader.tokenCount
    _ = try? reader.tokens(0 ..< n)
    _ = try? reader.tokens(n / 2 ..< n)
    let g = reader.geometry
    let workspace = AttentionWorkspace()
    let queries = [Float](repeating: 0.25, count: g.groupSize * g.headDim)
    var output = [Float](repeating: 0, count: g.groupSize * g.headDim)
    // Bounded work per input: a few streams, whole range and a range that cuts blocks.
    for layer in Set([0, g.layerCount - 1]) {
        for head in Set([0, g.kvHeadCount - 1]) {
            for range in [0 ..< n, n / 3 ..< n - n / 4] where !range.isEmpty {
                queries.withUnsafeBufferPointer { q in
                    output.withUnsafeMutableBufferPointer { o in
                        _ = try? reader.attend(layer: layer, kvHead: head, queries: q.baseAddress!, tokens: range,
                                               output: o.baseAddress!, workspace: workspace)
                    }
                }
                _ = try? reader.decode(layer: layer, kvHead: head, kind: .value, tokens: range)
            }
        }
    }
    // One head's tokens split across two threads (the merge of softmax states), on any file.
    let pair = [workspace, AttentionWorkspace()]
    queries.withUnsafeBufferPointer { q in
        output.withUnsafeMutableBufferPointer { o in
            _ = try? reader.attend(layer: g.layerCount - 1, kvHead: 0, queries: q.baseAddress!, output: o.baseAddress!, workspaces: pair)
        }
    }
    // Every KV head of the last layer at once (its own prefetch path), then a layer out of range.
    let all = [Float](repeating: 0.25, count: g.kvHeadCount * g.groupSize * g.headDim)
    var out = all
    all.withUnsafeBufferPointer { q in
        out.withUnsafeMutableBufferPointer { o in
            for layer in [g.layerCount - 1, g.layerCount] where n > 0 {
                _ = try? reader.attendLayer(layer, queries: q.baseAddress!, output: o.baseAddress!, workspaces: [workspace])
            }
        }
    }
    return clean
}

/// The differential check: attention over the encoded blocks (the kernels each scheme owns)
/// against textbook attention (Double, `DenseAttention.reference`) over the rows the reader
/// decodes, for random queries, two random (layer, KV head) pairs and two ranges (the whole
/// file, a random one that cuts blocks and tails). Only on files that validated with no problem
/// (a damaged file's values can be anything: its logits can overflow either computation
/// differently). A disagreement beyond rounding is a finding: it aborts, and libFuzzer keeps
/// the input.
func checkAttentionAgainstDecode(_ file: MappedFile, seed: UInt64) {
    guard let reader = try? KVPackReader(file: file, arithmetic: .exact), reader.tokenCount > 0,
          let fast = try? KVPackReader(file: file) else { return }
    let g = reader.geometry, n = reader.tokenCount
    let threeWorkspaces = (0 ..< 3).map { _ in AttentionWorkspace() }
    var rng = SplitMix64(seed: seed)
    for _ in 0 ..< 2 {
        let layer = Int(rng.next() % UInt64(g.layerCount)), head = Int(rng.next() % UInt64(g.kvHeadCount))
        let a = Int(rng.next() % UInt64(n)), b = Int(rng.next() % UInt64(n))
        for range in [0 ..< n, min(a, b) ..< max(a, b) + 1] {
            let q = (0 ..< g.groupSize * g.headDim).map { _ in Float(rng.nextGaussian()) }
            guard let got = try? reader.attend(layer: layer, kvHead: head, queries: q, tokens: range),
                  let quick = try? fast.attend(layer: layer, kvHead: head, queries: q, tokens: range),
                  let keys = try? reader.decode(layer: layer, kvHead: head, kind: .key, tokens: range),
                  let values = try? reader.decode(layer: layer, kvHead: head, kind: .value, tokens: range) else {
                fatalError("differential: a file that validates failed to attend or decode layer \(layer) head \(head) \(range)")
            }
            let want = DenseAttention.reference(queries: q, keys: keys, values: values, groupSize: g.groupSize, headDim: g.headDim)
            guard want.allSatisfy(\.isFinite), keys.allSatisfy(\.isFinite) else { continue }
            let err = DenseAttention.maxRelativeError(got, want)
            if !(err < 1e-4) {
                fatalError("differential: attention over codes differs from attention over decoded rows by \(err) (layer \(layer), head \(head), tokens \(range) of \(n), schemes \(reader.manifest.schemes.map(\.kind)))")
            }
            checkFastAttention(quick, values: values, headDim: g.headDim, groupSize: g.groupSize,
                               context: "layer \(layer), head \(head), tokens \(range) of \(n), schemes \(reader.manifest.schemes.map(\.kind))")
            // The same tokens split across three threads and merged by softmax state.
            var split = [Float](repeating: 0, count: q.count)
            do {
                try reader.attend(layer: layer, kvHead: head, queries: q, tokens: range, output: &split, workspaces: threeWorkspaces)
            } catch {
                fatalError("differential: split attention failed where one pass did (layer \(layer), head \(head), tokens \(range)): \(error)")
            }
            let splitErr = DenseAttention.maxRelativeError(split, want)
            if !(splitErr < 1e-4) {
                fatalError("differential: attention split across threads differs from attention over decoded rows by \(splitErr) (layer \(layer), head \(head), tokens \(range) of \(n))")
            }
        }
    }
}

/// Integer arithmetic (`AttentionArithmetic.fast`) has no tight bound on arbitrary data (its
/// score errors are exponentiated), but its output is still a softmax-weighted mean of the
/// value rows up to the weights' quantization (at most 1/510 of a 64-token block's largest
/// weight per token, so less than 13% of the largest value magnitude in all): finite, and
/// inside the values' range per channel widened by that much. Anything else is a finding.
func checkFastAttention(_ out: [Float], values: [Float], headDim d: Int, groupSize: Int, context: String) {
    let magnitude = values.reduce(Float(0)) { max($0, abs($1)) }
    let margin = 0.13 * 2 * magnitude + 1e-6
    for c in 0 ..< d {
        var lo = Float.infinity, hi = -Float.infinity
        for t in 0 ..< values.count / d {
            lo = min(lo, values[t * d + c])
            hi = max(hi, values[t * d + c])
        }
        for q in 0 ..< groupSize {
            let x = out[q * d + c]
            if !(x >= lo - margin && x <= hi + margin) {
                fatalError("differential: fast attention output \(x) of channel \(c) lies outside the values' range \(lo)...\(hi) (\(context))")
            }
        }
    }
}
