/// KV-AdaQuant ("More for Keys, Less for Values", Hariri et al. 2025): asymmetric uniform integer
/// codes with an f16 scale and f16 offset per group, keys and values with separate bit widths,
/// optionally chosen per layer by a planner from a bit budget.
///
/// Parameters (8 bytes, Spec/ "Scheme 2: int"): bits u8 (1, 2, 3, 4, 8); grouping u8 (0: per
/// token along head_dim, as the authors' code; 1: per channel over a run of tokens, as KIVI
/// does for keys); groupSize u16 (head_dim elements, or tokens); flags u8 (bit 0: scales may be
/// negative, as mlx's affine codes have them; since format 2.2; bit 1: per-channel widths, since
/// 2.4); 3 reserved bytes; with per-channel widths, `kvHeadCount * headDim` width bytes follow.
///
/// Block payload: codes, then scales, then offsets.
/// - codes: segmentTokens rows of headDim * bits / 8 bytes; code i of a row occupies bits
///   [i*bits, (i+1)*bits) counted from the least significant bit of the row's first byte, so
///   every 8 codes fill exactly `bits` bytes.
/// - scales, offsets: one f16 each per group, groups ordered (token, group along head_dim) or
///   (token run, channel). An element decodes to scale * code + offset.
/// The encoder rounds the offset down and the scale up to f16, so every value of a group lies in
/// [offset, offset + scale * (2^bits - 1)] and decodes within scale / 2.
///
/// Per-channel widths (`int:k2.5v2:kc64`, per-channel groups only): each KV head's channels get
/// widths from a calibrated importance, in runs of 8 channels; a block is then one ordinary
/// per-channel payload per width, over that width's channels (`WidthClass`). Attention works in
/// the order the classes put the channels in (queries permuted once per call).
public struct IntScheme: KVScheme {
    public static let kind = SchemeKind.int
    public static let specSyntax = "k<B>v<B>[:g<N>][:kc<T>|kt<N>][:vc<T>|vt<N>][:r<T>][:signed]   or   int:auto:<BUDGET>[:spectral|:measured][options]"
    public static let summary = "KV-AdaQuant: 1/2/3/4/8-bit codes, f16 scale+offset per group (gN: N head_dim elements per token; kcT/vcT: per channel over T tokens); rT: T-token f16 window; auto:BUDGET plans K/V bits per layer (from norms, or :measured from the model's loss per layer); a fractional width with kcT/vcT (k2.5v2:kc64) gives each channel its own width, calibrated (format 2.4)"

    public static let supportedBits = [1, 2, 3, 4, 8]

    enum Grouping: UInt8 {
        case token = 0
        case channel = 1
    }

    public let descriptor: SchemeDescriptor
    public let compressesBlocks = false
    public let bits: Int
    /// Scales may be negative (`signedScalesFlag`).
    public let signedScales: Bool
    let grouping: Grouping
    let groupSize: Int
    let headDim: Int
    let segmentTokens: Int
    let rowBytes: Int
    let groupCount: Int
    let levels: Float
    let shifts: SIMD8<UInt64>
    let mask: SIMD8<UInt64>
    let shifts32: SIMD8<UInt32>
    let mask32: SIMD8<UInt32>
    /// Whether rows decode through `decodeTile` (every layout the writer makes: per-token groups
    /// of whole 8-channel chunks, or per-channel groups).
    let tiled: Bool
    /// Attention with integer dot products (`IntegerCodeKernels`): key scores for per-channel
    /// groups, value accumulation for per-token groups, where the layout and the CPU allow.
    public let fastScores: Bool
    public let fastAccumulate: Bool
    /// With `fastAccumulate`, the channel of each accumulator slot (`finishAccumulation`).
    let slotChannels: [Int32]
    /// How `encode` chooses each group's scale and offset.
    let rangeFit: RangeFit
    /// Per-channel widths (flag bit 1): `kvHeadCount * headDim` entries, head-major; empty when
    /// every channel has `bits`.
    public let channelWidths: [UInt8]
    /// With per-channel widths, the width classes of every KV head, and those of the head this
    /// instance is bound to (`forKVHead`; head 0 until then).
    let headClasses: [[WidthClass]]
    private(set) var classes: [WidthClass]
    /// With per-channel widths, the channel at each position of the class order (the order the
    /// classes' sub-blocks hold them), as the query and accumulator permutations need it.
    private(set) var channelOfColumn: [Int32]

    /// The channels of one width in a block with per-channel widths: an ordinary per-channel int
    /// payload over `channels` (ascending), at `payloadOffset` in the block; its channels sit
    /// at `column ..< column + channels.count` of the class order.
    struct WidthClass: Sendable {
        let codec: IntScheme
        let channels: [Int]
        let payloadOffset: Int
        let column: Int
    }

    /// Flag bit 0 of parameter byte 4: scales may be negative (mlx-lm's `mx.quantize` gives about
    /// half its groups a negative scale, the group's maximum as offset; codes copied from an mlx
    /// cache keep them so). Decoding is the same; only the validity rule and the integer value
    /// kernel (which needs weight x scale >= 0) differ.
    public static let signedScalesFlag: UInt8 = 1
    /// Flag bit 1 (since 2.4): per-channel widths follow the 8 parameter bytes, one u8 per
    /// channel of every KV head; `bits` is then 0 and the grouping per channel.
    public static let channelWidthsFlag: UInt8 = 2

    public static func descriptor(bits: Int, perChannelTokens: Int? = nil, groupSize: Int = 64, residual: ElementType = .float16,
                                  signedScales: Bool = false) -> SchemeDescriptor {
        let grouping: Grouping = perChannelTokens == nil ? .token : .channel
        let size = perChannelTokens ?? groupSize
        return SchemeDescriptor(kind: kind, residualType: residual,
                                parameters: [UInt8(bits), grouping.rawValue, UInt8(size & 0xFF), UInt8(size >> 8),
                                             signedScales ? signedScalesFlag : 0, 0, 0, 0])
    }

    /// Per-channel groups of `perChannelTokens` tokens with a width per channel: `widths` holds
    /// `kvHeadCount * headDim` entries, head-major (Spec 7.2, scheme 2, since 2.4).
    public static func descriptor(channelWidths widths: [UInt8], perChannelTokens size: Int, residual: ElementType = .float16,
                                  signedScales: Bool = false) -> SchemeDescriptor {
        SchemeDescriptor(kind: kind, residualType: residual,
                         parameters: [0, Grouping.channel.rawValue, UInt8(size & 0xFF), UInt8(size >> 8),
                                      (signedScales ? signedScalesFlag : 0) | channelWidthsFlag, 0, 0, 0] + widths)
    }


    // MARK: Spec

    /// Options shared by `k4v2...` and `auto:...` specs.
    struct Options {
        var tokenGroup: Int?
        var keyGrouping: (channel: Bool, size: Int)?
        var valueGrouping: (channel: Bool, size: Int)?
        var window: Int?
        var signedScales = false

        init(_ arguments: ArraySlice<String>) throws {
            for arg in arguments {
                if arg == "signed" { signedScales = true; continue }
                func number(_ prefix: String) -> Int? { arg.hasPrefix(prefix) ? Int(arg.dropFirst(prefix.count)) : nil }
                if let n = number("kc") { keyGrouping = (true, n) } else if let n = number("vc") { valueGrouping = (true, n) }
                else if let n = number("kt") { keyGrouping = (false, n) } else if let n = number("vt") { valueGrouping = (false, n) }
                else if let n = number("g") { tokenGroup = n } else if let n = number("r") { window = n }
                else { throw KVPackError.argument("int: unknown argument \"\(arg)\" (expected gN, kcN, ktN, vcN, vtN, rN or signed)") }
            }
            for n in [tokenGroup, keyGrouping?.size, valueGrouping?.size, window].compactMap({ $0 }) where !(1 ... 65535).contains(n) {
                throw KVPackError.argument("int: group sizes and windows must be 1...65535, got \(n)")
            }
        }

        func setup(bits: Int, role: KVKind, geometry: ModelGeometry) throws -> SchemeSetup {
            guard IntScheme.supportedBits.contains(bits) else {
                throw KVPackError.argument("int: \(bits) bits is not supported (1, 2, 3, 4 or 8)")
            }
            guard geometry.headDim % 8 == 0 else {
                throw KVPackError.argument("int packs 8 codes at a time and needs head_dim to be a multiple of 8, got \(geometry.headDim)")
            }
            let grouping = role == .key ? keyGrouping : valueGrouping
            let descriptor: SchemeDescriptor
            if let grouping, grouping.channel {
                descriptor = IntScheme.descriptor(bits: bits, perChannelTokens: grouping.size, signedScales: signedScales)
            } else {
                // Groups along head_dim hold at most head_dim elements (64 by default, as the authors').
                let size = min(grouping?.size ?? tokenGroup ?? 64, geometry.headDim)
                guard geometry.headDim % size == 0 else {
                    throw KVPackError.argument("int: a group of \(size) elements does not divide head_dim \(geometry.headDim)")
                }
                descriptor = IntScheme.descriptor(bits: bits, groupSize: size, signedScales: signedScales)
            }
            return SchemeSetup(descriptor: descriptor, segmentTokens: window)
        }
    }

    public static func setup(arguments: [String], role: KVKind, geometry: ModelGeometry) throws -> SchemeSetup {
        guard let first = arguments.first, first.hasPrefix("k"), let v = first.firstIndex(of: "v"),
              let kb = Int(first[first.index(after: first.startIndex) ..< v]), let vb = Int(first[first.index(after: v)...]) else {
            throw KVPackError.argument("int needs bit widths first, as in int:k4v2 (or int:auto:3.0 with calibration), got \"int:\(arguments.joined(separator: ":"))\"")
        }
        return try Options(arguments.dropFirst()).setup(bits: role == .key ? kb : vb, role: role, geometry: geometry)
    }

    /// `auto:BUDGET[:spectral|:frobenius][options]`: KV-AdaQuant's planner. Each layer's key and
    /// value matrices get a bit width from {1, 2, 3, 4, 8} so that the widths average BUDGET and
    /// the modelled error sum(norm^2 * 2^(-2 bits)) is smallest: greedily, as the authors' code,
    /// starting every matrix at 1 bit and repeatedly upgrading the one with the largest error
    /// reduction per added bit. Norms are per-token Frobenius norms (default, as the authors) or
    /// spectral norms of a calibration cache of the same model.
    public static func planner(arguments: [String], geometry: ModelGeometry) throws -> SchemePlanner? {
        if let first = arguments.first, let (kb, vb) = fractionalWidths(first) {
            return try channelWidthPlanner(first, key: kb, value: vb, options: Options(arguments.dropFirst()), geometry: geometry)
        }
        guard arguments.first == "auto" else { return nil }
        guard arguments.count >= 2, let budget = Double(arguments[1]), budget >= 1, budget <= 8 else {
            throw KVPackError.argument("int:auto needs an average bit budget in 1...8, as in int:auto:3.0")
        }
        var rest = arguments.dropFirst(2)
        var spectral = false, measured = false
        if let m = rest.first, m == "spectral" || m == "frobenius" || m == "measured" {
            spectral = m == "spectral"
            measured = m == "measured"
            rest = rest.dropFirst()
        }
        let options = try Options(rest)
        // Checked now, so a bad option is reported before any calibration runs.
        _ = try options.setup(bits: 1, role: .key, geometry: geometry)
        _ = try options.setup(bits: 1, role: .value, geometry: geometry)
        if measured { return try measuredPlanner(budget: budget, options: options, geometry: geometry) }
        let needs = "int:auto plans each layer's bit widths from calibration statistics (the norms of a cache of the same model), and none were given"
        return SchemePlanner(needs: needs) { calibration in
            guard calibration.layers.count == geometry.layerCount else {
                throw KVPackError.argument("int:auto: calibration has \(calibration.layers.count) layers, the model \(geometry.layerCount)")
            }
            var sensitivities: [Double] = []
            for l in calibration.layers {
                sensitivities += spectral ? [l.keySpectralNorm, l.valueSpectralNorm] : [l.keyNorm, l.valueNorm]
            }
            let widths = allocateBits(sensitivities: sensitivities, total: budget * Double(sensitivities.count), widths: supportedBits)
            var layers: [LayerSetup] = []
            let metric = spectral ? "spectral norm" : "norm"
            var rationale = ["int:auto:\(budget): \(metric)s per token of a \(calibration.tokens)-token calibration cache; error modelled as \(metric)^2 * 2^(-2 bits); greedy allocation from 1 bit, widths {1,2,3,4,8}"]
            for (i, l) in calibration.layers.enumerated() {
                let kb = widths[2 * i], vb = widths[2 * i + 1]
                layers.append(LayerSetup(key: try options.setup(bits: kb, role: .key, geometry: geometry),
                                         value: try options.setup(bits: vb, role: .value, geometry: geometry)))
                let (k, v) = spectral ? (l.keySpectralNorm, l.valueSpectralNorm) : (l.keyNorm, l.valueNorm)
                rationale.append("layer \(i): key \(metric) \(format(k)), value \(metric) \(format(v)) (ratio \(format(k / max(v, 1e-30)))) -> K\(kb) V\(vb)")
            }
            let mean = Double(widths.reduce(0, +)) / Double(widths.count)
            rationale.append("average \(format(mean)) bits per element of codes (budget \(budget)); group scales and offsets add 32 bits per group")
            return PlannedSchemes(layers: layers, rationale: rationale)
        }
    }

    /// `auto:BUDGET:measured`: widths from {2, 3, 4, 8} per layer and role from what the model
    /// itself loses when that layer's keys (or values) alone are 2-bit codes (the statistics'
    /// `sensitivity`, measured by running the model on a calibration text; the norms of plain
    /// `auto` do not see which layers' errors the model tolerates). Loss modelled as
    /// delta(b) = delta(p) * 4^(p - b) for the probe's width p (2), allocated greedily as `auto` does.
    static func measuredPlanner(budget: Double, options: Options, geometry: ModelGeometry) throws -> SchemePlanner {
        guard budget >= 2 else { throw KVPackError.argument("int:auto:\(budget):measured: widths start at 2 bits; give a budget of at least 2") }
        let probe = LayerSetup(key: try options.setup(bits: 2, role: .key, geometry: geometry),
                               value: try options.setup(bits: 2, role: .value, geometry: geometry))
        let needs = "int:auto:\(budget):measured plans from each layer's measured sensitivity (the model's loss with one layer's keys or values as 2-bit codes), which only a command that runs the model measures: kvpack eval, generate or chat"
        return SchemePlanner(needs: needs, sensitivityProbe: probe) { calibration in
            let n = geometry.layerCount
            guard let s = calibration.sensitivity, s.key.count == n, s.value.count == n, (1 ... 8).contains(s.probeBits) else {
                throw KVPackError(.needsCalibration, needs)
            }
            var sensitivities: [Double] = []
            // allocateBits models error s^2 * 2^(-2b); loss(p) * 4^(p - b) is that with s = 2^p sqrt(loss(p)).
            let scale = Double(1 << s.probeBits)
            for l in 0 ..< n { sensitivities += [scale * max(s.key[l], 1e-9).squareRoot(), scale * max(s.value[l], 1e-9).squareRoot()] }
            let widths = allocateBits(sensitivities: sensitivities, total: budget * Double(2 * n), widths: [2, 3, 4, 8])
            var layers: [LayerSetup] = []
            var rationale = ["int:auto:\(budget):measured: per layer, the loss increase (nats/token over \(s.tokens) tokens) with only its keys or values as \(s.probe); modelled as that * 4^(\(s.probeBits) - bits); greedy allocation from 2 bits, widths {2,3,4,8}"]
            for l in 0 ..< n {
                let kb = widths[2 * l], vb = widths[2 * l + 1]
                layers.append(LayerSetup(key: try options.setup(bits: kb, role: .key, geometry: geometry),
                                         value: try options.setup(bits: vb, role: .value, geometry: geometry)))
                rationale.append("layer \(l): key loss \(format(s.key[l] * 1000))e-3, value loss \(format(s.value[l] * 1000))e-3 -> K\(kb) V\(vb)")
            }
            let mean = Double(widths.reduce(0, +)) / Double(widths.count)
            rationale.append("average \(format(mean)) bits per element of codes (budget \(budget)); group scales and offsets add 32 bits per group")
            return PlannedSchemes(layers: layers, rationale: rationale)
        }
    }

    /// `k2.5v2` and the like: the widths when one of them is not a whole number (nil otherwise,
    /// and for anything that is not `k<B>v<B>`).
    static func fractionalWidths(_ text: String) -> (key: Double, value: Double)? {
        guard text.hasPrefix("k"), let v = text.firstIndex(of: "v"),
              let kb = Double(text[text.index(after: text.startIndex) ..< v]), let vb = Double(text[text.index(after: v)...]),
              kb.rounded() != kb || vb.rounded() != vb else { return nil }
        return (kb, vb)
    }

    /// `int:kBvB` with a fractional width (`int:k2.5v2:kc64`): per-channel widths for that role,
    /// averaging B, chosen per layer and KV head from calibration statistics (`channelWidths`).
    /// A whole width for the other role is an ordinary setup.
    static func channelWidthPlanner(_ widths: String, key kb: Double, value vb: Double, options: Options,
                                    geometry: ModelGeometry) throws -> SchemePlanner {
        let d = geometry.headDim
        for (role, b) in [(KVKind.key, kb), (.value, vb)] where b.rounded() != b {
            let name = role == .key ? "k" : "v"
            guard (role == .key ? options.keyGrouping : options.valueGrouping)?.channel == true else {
                throw KVPackError.argument("int:\(name)\(b): a fractional width gives each channel its own width, which needs per-channel groups (add \(name)c64, for example)")
            }
            guard b > 1, b < 4 else { throw KVPackError.argument("int:\(name)\(b): per-channel widths average between 1 and 4 bits") }
            guard d >= 16, d % 8 == 0 else {
                throw KVPackError.argument("int:\(name)\(b): widths change in runs of 8 channels, so head_dim \(d) has room for one width only; give a whole number")
            }
            guard (b * Double(d)).truncatingRemainder(dividingBy: 8) == 0 else {
                throw KVPackError.argument("int:\(name)\(b): widths change in runs of 8 channels, so on head_dim \(d) the average must be a multiple of \(8 / Double(d)) bits")
            }
        }
        _ = try options.setup(bits: 1, role: .key, geometry: geometry)
        let needs = "int:\(widths): per-channel widths are chosen from calibration statistics (each channel's RMS in a cache of the same model, weighted by the RMS of the queries that read it when the tool runs the model)"
        return SchemePlanner(needs: needs, usesQueryStatistics: kb.rounded() != kb) { calibration in
            guard calibration.layers.count == geometry.layerCount, calibration.grams.count == geometry.streamCount else {
                throw KVPackError(.needsCalibration, needs + "; the statistics given hold no per-channel moments")
            }
            let heads = geometry.kvHeadCount
            let withQueries = calibration.queryRMS.count == geometry.layerCount * heads && calibration.queryRMS.allSatisfy { $0.count == d }
            var rationale = ["int:\(widths): per KV head, channels ranked by " + (withQueries ? "key RMS x query RMS" : "RMS")
                             + " over \(calibration.tokens) calibration tokens, in runs of 8; each run starts at the floor of the average and gains a bit where rms^2 * (step(b)^2 - step(b+1)^2) is largest, step(b) = 1/(2^b - 1), up to 4 bits; widths listed per head as width:channels"]
            var layers: [LayerSetup] = []
            for l in 0 ..< geometry.layerCount {
                func setup(_ role: KVKind, _ b: Double) throws -> SchemeSetup {
                    guard b.rounded() != b else { return try options.setup(bits: Int(b), role: role, geometry: geometry) }
                    var table: [UInt8] = []
                    var lines: [String] = []
                    for h in 0 ..< heads {
                        let gram = calibration.gram(layer: l, kvHead: h, kind: role, geometry: geometry)
                        var importance = (0 ..< d).map { (gram[$0 * d + $0] / Double(max(calibration.tokens, 1))).squareRoot() }
                        if withQueries, role == .key { importance = zip(importance, calibration.queryRMS[l * heads + h]).map { $0 * $1 } }
                        let widths = channelWidths(importance: importance, average: b)
                        table += widths
                        lines.append("head \(h) " + Set(widths).sorted(by: >).map { w in
                            "\(w):" + widths.indices.filter { widths[$0] == w }.map(String.init).joined(separator: ",")
                        }.joined(separator: " "))
                    }
                    rationale.append("layer \(l) \(role == .key ? "keys" : "values"): " + lines.joined(separator: "; "))
                    let grouping = role == .key ? options.keyGrouping! : options.valueGrouping!
                    return SchemeSetup(descriptor: descriptor(channelWidths: table, perChannelTokens: grouping.size, signedScales: options.signedScales),
                                       segmentTokens: options.window)
                }
                layers.append(LayerSetup(key: try setup(.key, kb), value: try setup(.value, vb)))
            }
            return PlannedSchemes(layers: layers, rationale: rationale)
        }
    }

    /// Widths for channels of the given importance, averaging `average` bits (a multiple of 8 /
    /// count): channels ranked by importance in runs of 8 (a run's importance is its members'
    /// RMS), every run starting at floor(average), then one bit at a time to the run where
    /// importance^2 * (step(b)^2 - step(b + 1)^2) is largest (step(b) = 1 / (2^b - 1): the
    /// squared quantization step of a b-bit code over the channel's range), at most 4 bits,
    /// until the budget is spent exactly.
    static func channelWidths(importance: [Double], average: Double) -> [UInt8] {
        let order = importance.indices.sorted { importance[$0] > importance[$1] || (importance[$0] == importance[$1] && $0 < $1) }
        let runs = order.count / 8
        let runImportance = (0 ..< runs).map { r in
            (order[8 * r ..< 8 * r + 8].reduce(0.0) { $0 + importance[$1] * importance[$1] } / 8).squareRoot()
        }
        let base = Int(average.rounded(.down))
        var widths = Array(repeating: base, count: runs)
        var spare = Int((average - Double(base)) * Double(runs) + 0.5)
        func step(_ b: Int) -> Double { let s = 1 / Double((1 << b) - 1); return s * s }
        while spare > 0 {
            var best: (gain: Double, run: Int)?
            for r in 0 ..< runs where widths[r] < 4 {
                let gain = runImportance[r] * runImportance[r] * (step(widths[r]) - step(widths[r] + 1))
                if best == nil || gain > best!.gain { best = (gain, r) }
            }
            guard let choice = best else { break }
            widths[choice.run] += 1
            spare -= 1
        }
        var out = [UInt8](repeating: 0, count: importance.count)
        for r in 0 ..< runs { for c in order[8 * r ..< 8 * r + 8] { out[c] = UInt8(widths[r]) } }
        return out
    }

    /// Greedy rate-distortion allocation: error_i(b) = s_i^2 * 2^(-2b).
    static func allocateBits(sensitivities: [Double], total: Double, widths: [Int]) -> [Int] {
        let sorted = widths.sorted()
        var bits = Array(repeating: sorted[0], count: sensitivities.count)
        var used = Double(sorted[0] * sensitivities.count)
        while true {
            var best: (gain: Double, index: Int, next: Int)?
            for (i, s) in sensitivities.enumerated() {
                guard let next = sorted.first(where: { $0 > bits[i] }) else { continue }
                let delta = Double(next - bits[i])
                guard used + delta <= total + 1e-9 else { continue }
                let gain = s * s * (pow2(-2 * bits[i]) - pow2(-2 * next)) / delta
                if best == nil || gain > best!.gain * (1 + 1e-12) { best = (gain, i, next) }
            }
            guard let choice = best else { return bits }
            used += Double(choice.next - bits[choice.index])
            bits[choice.index] = choice.next
        }
    }

    private static func pow2(_ e: Int) -> Double { e >= 0 ? Double(1 << e) : 1 / Double(1 << -e) }
    private static func format(_ x: Double) -> String {
        let r = (x * 1000).rounded() / 1000
        return "\(r)"
    }

    // MARK: Codec

    public init(descriptor: SchemeDescriptor, context: SchemeContext) throws {
        let p = descriptor.parameters
        guard p.count >= 8 else {
            throw KVPackError.invalid(nil, "parameters", "int takes 8 parameter bytes, found \(p.count)")
        }
        guard p[4] & ~(Self.signedScalesFlag | Self.channelWidthsFlag) == 0 else {
            throw KVPackError.invalid(4, "int.flags", "is 0x\(String(p[4], radix: 16)); only bits 0 (signed scales) and 1 (per-channel widths) are defined")
        }
        let perChannelWidths = p[4] & Self.channelWidthsFlag != 0
        let d = context.headDim, c = context.segmentTokens, heads = context.geometry.kvHeadCount
        let expected = 8 + (perChannelWidths ? heads * d : 0)
        guard p.count == expected else {
            throw KVPackError.invalid(nil, "parameters", perChannelWidths
                ? "int with per-channel widths takes 8 + kvHeadCount x headDim = \(expected) parameter bytes, found \(p.count)"
                : "int takes 8 parameter bytes, found \(p.count)")
        }
        let bits = Int(p[0])
        if perChannelWidths {
            guard bits == 0 else { throw KVPackError.invalid(0, "int.bits", "is \(bits); with per-channel widths it must be 0") }
        } else {
            guard Self.supportedBits.contains(bits) else { throw KVPackError.invalid(0, "int.bits", "is \(bits), must be 1, 2, 3, 4 or 8") }
        }
        guard let grouping = Grouping(rawValue: p[1]) else { throw KVPackError.invalid(1, "int.grouping", "is \(p[1]), must be 0 (token) or 1 (channel)") }
        let size = Int(p[2]) | Int(p[3]) << 8
        signedScales = p[4] & Self.signedScalesFlag != 0
        guard d % 8 == 0 else { throw KVPackError.invalid(nil, "int.bits", "int needs head_dim to be a multiple of 8, the file has \(d)") }
        switch grouping {
        case .token:
            guard size >= 1, d % size == 0 else {
                throw KVPackError.invalid(2, "int.groupSize", "is \(size); per-token groups must divide head_dim \(d)")
            }
            guard !perChannelWidths else {
                throw KVPackError.invalid(1, "int.grouping", "is 0 (per token); per-channel widths need per-channel groups (1)")
            }
        case .channel:
            guard size >= 1, c % size == 0 else {
                throw KVPackError.invalid(2, "int.groupSize", "is \(size); per-channel groups of tokens must divide segmentTokens \(c)")
            }
        }
        guard descriptor.blobIDs.isEmpty else {
            throw KVPackError.invalid(nil, "blobIDs", "int uses no blobs, found \(descriptor.blobIDs.count)")
        }
        self.descriptor = descriptor
        self.bits = bits
        self.grouping = grouping
        self.groupSize = size
        headDim = d
        segmentTokens = c
        groupCount = grouping == .token ? c * (d / size) : (c / size) * d
        levels = Float((1 << bits) - 1)
        var s = SIMD8<UInt64>()
        for i in 0 ..< 8 { s[i] = UInt64(i * bits) }
        shifts = s
        mask = SIMD8<UInt64>(repeating: (1 << UInt64(bits)) - 1)
        shifts32 = SIMD8<UInt32>(truncatingIfNeeded: s)
        mask32 = SIMD8<UInt32>(repeating: (1 << UInt32(bits)) - 1)
        tiled = grouping == .channel || size % 8 == 0
        rangeFit = context.rangeFit
        if perChannelWidths {
            let widths = Array(p[8...])
            headClasses = try Self.widthClasses(widths, heads: heads, context: context, groupTokens: size, signedScales: signedScales)
            channelWidths = widths
            classes = headClasses[0]
            channelOfColumn = Self.columnOrder(classes)
            rowBytes = widths[0 ..< d].reduce(0) { $0 + Int($1) } / 8
            // The integer kernels take one width per call (per-class calls: not yet).
            fastScores = false
            fastAccumulate = false
            slotChannels = []
            return
        }
        channelWidths = []
        headClasses = []
        classes = []
        channelOfColumn = []
        rowBytes = d * bits / 8
        let fast = context.arithmetic == .fast
        fastScores = fast && grouping == .channel && !signedScales && IntegerCodeKernels.channelScoresSupported(bits: bits, dim: d)
        // The value kernel quantizes weight x scale to u8: it needs scales >= 0.
        fastAccumulate = fast && grouping == .token && !signedScales
            && IntegerCodeKernels.tokenAccumulateSupported(bits: bits, dim: d, groupSize: size)
        slotChannels = fastAccumulate ? IntegerCodeKernels.tokenLayout(bits: bits, dim: d) : []
    }

    /// Checks a per-channel width table (Spec 7.2, scheme 2: widths 1, 2, 3, 4 or 8; per head,
    /// each width's channel count a multiple of 8; the same total width in every head, so every
    /// block has one size) and lays out each head's classes, narrowest first.
    static func widthClasses(_ widths: [UInt8], heads: Int, context: SchemeContext, groupTokens: Int,
                             signedScales: Bool) throws -> [[WidthClass]] {
        let d = context.headDim, c = context.segmentTokens
        var all: [[WidthClass]] = []
        var total: Int?
        for h in 0 ..< heads {
            let row = widths[h * d ..< (h + 1) * d]
            // Errors carry the parameter byte's index as their offset; the reader adds where the
            // parameters begin.
            if let bad = row.firstIndex(where: { !supportedBits.contains(Int($0)) }) {
                throw KVPackError.invalid(UInt64(8 + bad), "int.channelWidths", "head \(h), channel \(bad - h * d): width \(widths[bad]), must be 1, 2, 3, 4 or 8")
            }
            let sum = row.reduce(0) { $0 + Int($1) }
            if let total, total != sum {
                throw KVPackError.invalid(UInt64(8 + h * d), "int.channelWidths", "head \(h)'s widths sum to \(sum) bits, head 0's to \(total); every head must have the same total")
            }
            total = sum
            var classes: [WidthClass] = []
            var offset = 0, column = 0
            for w in supportedBits {
                let channels = row.indices.filter { row[$0] == w }.map { $0 - h * d }
                guard !channels.isEmpty else { continue }
                guard channels.count % 8 == 0 else {
                    throw KVPackError.invalid(UInt64(8 + h * d), "int.channelWidths", "head \(h) has \(channels.count) channels of width \(w); each width's count must be a multiple of 8")
                }
                var sub = context
                sub.geometry = ModelGeometry(layerCount: 1, queryHeadCount: 1, kvHeadCount: 1, headDim: channels.count)
                sub.arithmetic = .exact
                let codec = try IntScheme(descriptor: descriptor(bits: w, perChannelTokens: groupTokens, signedScales: signedScales), context: sub)
                classes.append(WidthClass(codec: codec, channels: channels, payloadOffset: offset, column: column))
                offset += codec.encodedBlockSize(tokens: c)
                column += channels.count
            }
            all.append(classes)
        }
        return all
    }

    /// The channel at each column of the class order: the classes' channels one after another.
    static func columnOrder(_ classes: [WidthClass]) -> [Int32] {
        classes.flatMap { $0.channels.map { Int32($0) } }
    }

    public func forKVHead(_ head: Int) -> any KVScheme {
        guard headClasses.indices.contains(head) else { return self }
        var bound = self
        bound.classes = headClasses[head]
        bound.channelOfColumn = Self.columnOrder(bound.classes)
        return bound
    }

    /// `int:kBvB:gN` (per-token groups of N) or `int:kBvB:kcT:vcT` (per-channel over T tokens):
    /// the same width for both roles, so the spec builds this descriptor whichever role it is for.
    /// With per-channel widths, the average width stands for `bits` (`int:k2.5v2.5:kc64:vc64`;
    /// as a spec it asks the planner again, which needs calibration).
    public var specString: String {
        let group = grouping == .token ? "g\(groupSize)" : "kc\(groupSize):vc\(groupSize)"
        let width = channelWidths.isEmpty ? "\(bits)" : "\(Double(rowBytes * 8) / Double(headDim))"
        return "int:k\(width)v\(width):\(group)" + (signedScales ? ":signed" : "")
    }

    public func encodedBlockSize(tokens: Int) -> Int { tokens * rowBytes + 4 * groupCount }

    var scalesOffset: Int { segmentTokens * rowBytes }
    var offsetsOffset: Int { segmentTokens * rowBytes + 2 * groupCount }

    /// The group of element (t, c) and the span of a group's members (for encoding).
    @inline(__always)
    func group(token t: Int, channel c: Int) -> Int {
        grouping == .token ? t * (headDim / groupSize) + c / groupSize : (t / groupSize) * headDim + c
    }

    @inline(__always)
    func scale(_ block: UnsafeRawPointer, _ g: Int) -> Float {
        Float(Float16(bitPattern: block.loadUnaligned(fromByteOffset: scalesOffset + 2 * g, as: UInt16.self)))
    }

    @inline(__always)
    func offset(_ block: UnsafeRawPointer, _ g: Int) -> Float {
        Float(Float16(bitPattern: block.loadUnaligned(fromByteOffset: offsetsOffset + 2 * g, as: UInt16.self)))
    }

    public func encode(rows: UnsafePointer<Float>, tokens: Int, into block: UnsafeMutableRawBufferPointer) {
        if !classes.isEmpty { return encodeClasses(rows: rows, tokens: tokens, into: block) }
        let out = block.baseAddress!
        out.initializeMemory(as: UInt8.self, repeating: 0, count: block.count)
        let d = headDim
        // Members of group g: per token, a run of head_dim; per channel, a column over a token
        // run. Walked as (first element, step) so encoding allocates nothing.
        let per = d / groupSize
        for g in 0 ..< groupCount {
            let first: Int, step: Int
            if grouping == .token {
                first = (g / per) * d + (g % per) * groupSize
                step = 1
            } else {
                first = (g / d) * groupSize * d + g % d
                step = d
            }
            let (scale16, offset16) = fitRange(Group(first: rows + first, step: step, count: groupSize))
            let offset = Float(offset16), scale = Float(scale16)
            out.storeBytes(of: scale16.bitPattern, toByteOffset: scalesOffset + 2 * g, as: UInt16.self)
            out.storeBytes(of: offset16.bitPattern, toByteOffset: offsetsOffset + 2 * g, as: UInt16.self)
            guard scale > 0, !tiled else { continue }  // scale 0: every member equals the offset, codes stay 0
            for i in 0 ..< groupSize {
                let element = first + i * step
                let t = element / d, c = element % d
                let q = ((Self.representable(rows[element]) - offset) / scale).rounded(.toNearestOrEven)
                let code = UInt32(min(max(q, 0), levels))
                let bit = c * bits
                // A code may straddle a byte boundary (3 bits): write it through a 16-bit window.
                let at = t * rowBytes + bit / 8
                let shifted = code << UInt32(bit % 8)
                out.storeBytes(of: out.load(fromByteOffset: at, as: UInt8.self) | UInt8(truncatingIfNeeded: shifted), toByteOffset: at, as: UInt8.self)
                if shifted > 0xFF {
                    out.storeBytes(of: out.load(fromByteOffset: at + 1, as: UInt8.self) | UInt8(truncatingIfNeeded: shifted >> 8),
                                   toByteOffset: at + 1, as: UInt8.self)
                }
            }
        }
        if tiled { encodeCodes(rows, out) }
    }

    /// One group's members where the rows lie (a run of a token's channels, or a channel's column
    /// over a run of tokens), read as `encodeCodes` reads them: NaN as 0, magnitudes within f16.
    struct Group {
        let first: UnsafePointer<Float>
        let step: Int
        let count: Int

        @inline(__always)
        subscript(i: Int) -> Float { IntScheme.representable(first[i * step]) }
    }

    /// A group's f16 scale and offset, as `RangeFitter` chooses them for this scheme's width.
    func fitRange(_ x: Group) -> (scale: Float16, offset: Float16) {
        RangeFitter(levels: levels, fit: rangeFit).range(of: x)
    }

    /// Chooses a group's f16 scale and offset for `levels + 1` codes (the int scheme's groups;
    /// polar's radius ranges use it too).
    struct RangeFitter {
        let levels: Float
        let fit: RangeFit

        /// `minMax`: the offset is the minimum rounded down, the scale covers the maximum (rounded
        /// up), so every member decodes within half a step. `minimumError` (`fit:mse`): that range
        /// and 21 clipped ones are tried, as llama.cpp's k-quants search theirs
        /// (`make_qkx2_quants`): codes assigned with a step of (max - min) / (levels - 1 ...
        /// levels + 1), then scale and offset refitted to those codes by least squares and rounded
        /// to f16; the candidate whose codes (assigned as `encodeCodes` assigns them) give the
        /// smallest squared error wins. Members beyond the chosen range clip to the end codes.
        func range(of x: Group) -> (scale: Float16, offset: Float16) {
            var lo = Float.infinity, hi = -Float.infinity
            for i in 0 ..< x.count {
                lo = min(lo, x[i])
                hi = max(hi, x[i])
            }
            let offset16 = IntScheme.f16(lo, roundingUp: false)
            let scale16 = IntScheme.f16((hi - Float(offset16)) / levels, roundingUp: true)
            guard fit == .minimumError, hi > lo, scale16 > 0 else { return (scale16, offset16) }
            var best = (scale: scale16, offset: offset16, error: squaredError(x, scale: Float(scale16), offset: Float(offset16)))
            func consider(_ s: Double, _ o: Double) {
                let s16 = Float16(Float(s)), o16 = Float16(Float(o))
                guard s16 > 0, s16.isFinite, o16.isFinite else { return }
                let e = squaredError(x, scale: Float(s16), offset: Float(o16))
                if e < best.error { best = (s16, o16, e) }
            }
            let range = Double(hi - lo)
            for k in 0 ... 20 {
                let inverse = (Double(levels) - 1 + 0.1 * Double(k)) / range
                guard inverse > 0, let (s, o) = leastSquares(x, codes: { v in
                    min(max((inverse * Double(v - lo)).rounded(.toNearestOrEven), 0), Double(self.levels))
                }) else { continue }
                consider(s, o)
            }
            // One more refit to the winner's own codes (each refit can only lower the error before
            // f16 rounding).
            let (s0, o0) = (Float(best.scale), Float(best.offset))
            if let (s, o) = leastSquares(x, codes: { v in Double(self.code(v, scale: s0, offset: o0)) }) { consider(s, o) }
            return (best.scale, best.offset)
        }

        /// The code `encodeCodes` gives `x` (already representable) for a positive scale.
        @inline(__always)
        func code(_ x: Float, scale: Float, offset: Float) -> Float {
            min(max(((x - offset) / scale).rounded(.toNearestOrEven), 0), levels)
        }

        func squaredError(_ x: Group, scale: Float, offset: Float) -> Double {
            var e: Double = 0
            for i in 0 ..< x.count {
                let r = Double(scale * code(x[i], scale: scale, offset: offset) + offset - x[i])
                e += r * r
            }
            return e
        }

        /// The scale and offset that minimise sum (scale * code_i + offset - x_i)^2 for fixed
        /// codes; nil when the codes are all equal (no scale is determined).
        func leastSquares(_ x: Group, codes: (Float) -> Double) -> (scale: Double, offset: Double)? {
            var sl = 0.0, sll = 0.0, sx = 0.0, sxl = 0.0
            for i in 0 ..< x.count {
                let l = codes(x[i]), v = Double(x[i])
                sl += l
                sll += l * l
                sx += v
                sxl += v * l
            }
            let count = Double(x.count), det = count * sll - sl * sl
            guard det > 0 else { return nil }
            let s = (count * sxl - sx * sl) / det
            return s > 0 ? (s, (sx - s * sl) / count) : nil
        }
    }

    /// Codes of every row once the scales and offsets are stored: 8 elements per vector step,
    /// with the same operations as the scalar path (so the same codes): NaN to 0, magnitudes
    /// clamped to f16's range, (x - offset) / scale rounded to nearest even, clamped to
    /// [0, levels], 0 where the scale is 0. Integer vector ops stand in for float clamps (which
    /// compile to calls).
    func encodeCodes(_ rows: UnsafePointer<Float>, _ out: UnsafeMutableRawPointer) {
        let d = headDim, per = d / groupSize
        let magnitude = SIMD8<Int32>(repeating: 0x7FFF_FFFF), largest = SIMD8<Int32>(repeating: 0x477F_E000)   // 65504
        let infinity = SIMD8<Int32>(repeating: 0x7F80_0000), top = unsafeBitCast(SIMD8<Float>(repeating: levels), to: SIMD8<Int32>.self)
        let source = UnsafeRawPointer(rows)
        for t in 0 ..< segmentTokens {
            for j in 0 ..< d / 8 {
                var ix = unsafeBitCast(source.loadUnaligned(fromByteOffset: 4 * (t * d + 8 * j), as: SIMD8<Float>.self), to: SIMD8<Int32>.self)
                ix &= ~((infinity &- (ix & magnitude)) &>> 31)                       // NaN -> +0
                let ax = ix & magnitude, big = (largest &- ax) &>> 31
                ix = (ax & ~big) | (largest & big) | (ix & ~magnitude)               // |x| <= 65504
                let sc: SIMD8<Float>, of: SIMD8<Float>
                if grouping == .channel {
                    let g = (t / groupSize) * d + 8 * j
                    sc = SIMD8<Float>(out.loadUnaligned(fromByteOffset: scalesOffset + 2 * g, as: SIMD8<Float16>.self))
                    of = SIMD8<Float>(out.loadUnaligned(fromByteOffset: offsetsOffset + 2 * g, as: SIMD8<Float16>.self))
                } else {
                    let g = t * per + (8 * j) / groupSize
                    sc = SIMD8(repeating: scale(UnsafeRawPointer(out), g))
                    of = SIMD8(repeating: offset(UnsafeRawPointer(out), g))
                }
                let q = ((unsafeBitCast(ix, to: SIMD8<Float>.self) - of) / sc).rounded(.toNearestOrEven)
                var iq = unsafeBitCast(q, to: SIMD8<Int32>.self)
                iq &= ~(iq &>> 31)                                                   // < 0 (and -0) -> 0
                let over = (top &- iq) &>> 31
                iq = (iq & ~over) | (top & over)                                     // > levels -> levels
                let live = unsafeBitCast((SIMD8<Int32>() &- unsafeBitCast(sc, to: SIMD8<Int32>.self)) &>> 31, to: SIMD8<UInt32>.self)
                let codes = unsafeBitCast(unsafeBitCast(iq, to: SIMD8<Float>.self) + SIMD8(repeating: 8_388_608), to: SIMD8<UInt32>.self)
                    & SIMD8(repeating: 0x7F_FFFF) & live
                let at = t * rowBytes + j * bits
                if bits == 8 {
                    out.storeBytes(of: SIMD8<UInt8>(truncatingIfNeeded: codes), toByteOffset: at, as: SIMD8<UInt8>.self)
                } else {
                    let word = (codes &<< shifts32).wrappedSum()
                    for b in 0 ..< bits { out.storeBytes(of: UInt8(truncatingIfNeeded: word >> UInt32(8 * b)), toByteOffset: at + b, as: UInt8.self) }
                }
            }
        }
    }
    /// NaN encodes as 0 and magnitudes beyond f16's range saturate at +-65504 (scales and offsets
    /// are f16).
    static func representable(_ x: Float) -> Float { x.isNaN ? 0 : min(max(x, -65504), 65504) }

    /// x rounded to f16 toward +infinity (`roundingUp`) or -infinity, within the finite range.
    static func f16(_ x: Float, roundingUp: Bool) -> Float16 {
        var h = Float16(min(max(x, -65504), 65504))
        if roundingUp, Float(h) < x { h = h.nextUp }
        if !roundingUp, Float(h) > x { h = h.nextDown }
        return h.isFinite ? h : (h > 0 ? Float16.greatestFiniteMagnitude : -Float16.greatestFiniteMagnitude)
    }

    public func validate(block: UnsafeRawBufferPointer, tokens: Int) throws {
        for k in classes { try k.codec.validate(block: subBlock(block, k), tokens: tokens) }
        guard classes.isEmpty else { return }
        let p = block.baseAddress!
        for g in 0 ..< groupCount {
            let s = scale(p, g), o = offset(p, g)
            guard s.isFinite, s >= 0 || signedScales, o.isFinite else {
                throw KVPackError(.corruptPayload, field: "BLCK.int.scales",
                                  "group \(g): scale \(s), offset \(o); scales must be finite and >= 0 (any sign with the signed-scales flag), offsets finite")
            }
        }
    }

    /// Codes of row `t` as floats. Each 8 codes are `bits` bytes, read as one little-endian word
    /// (bytes past the payload are never read).
    @inline(__always)
    func unpack(_ block: UnsafeRawBufferPointer, row t: Int, into out: UnsafeMutablePointer<Float>) {
        let base = block.baseAddress! + t * rowBytes
        let available = block.count - t * rowBytes
        let rawOut = UnsafeMutableRawPointer(out)
        for chunk in 0 ..< headDim / 8 {
            let at = chunk * bits
            var word: UInt64 = 0
            if at + 8 <= available {
                word = UInt64(littleEndian: base.loadUnaligned(fromByteOffset: at, as: UInt64.self))
            } else {
                for i in 0 ..< bits { word |= UInt64(base.load(fromByteOffset: at + i, as: UInt8.self)) << UInt64(8 * i) }
            }
            let codes = (SIMD8<UInt64>(repeating: word) &>> shifts) & mask
            rawOut.storeBytes(of: SIMD8<Float>(SIMD8<Int32>(truncatingIfNeeded: codes)), toByteOffset: 32 * chunk, as: SIMD8<Float>.self)
        }
    }

    public func decode(block: UnsafeRawBufferPointer, tokens: Range<Int>, into out: UnsafeMutablePointer<Float>) {
        let d = headDim, p = block.baseAddress!
        if !classes.isEmpty {
            decodeClasses(p, from: tokens.lowerBound, count: tokens.count, into: out)
            IntegerCodeKernels.unpermute(out, rows: tokens.count, dim: d, channelOfSlot: channelOfColumn)
            return
        }
        if tiled {
            decodeTile(p, from: tokens.lowerBound, count: tokens.count, into: out)
            return
        }
        for (row, t) in tokens.enumerated() {
            let o = out + row * d
            unpack(block, row: t, into: o)
            for c in 0 ..< d {
                let g = group(token: t, channel: c)
                o[c] = scale(p, g) * o[c] + offset(p, g)
            }
        }
    }

    /// Rows [t0, t0 + n) of a sealed block, decoded into `tile` (n x headDim f32), 8 codes per
    /// step in vector registers.
    /// `stride`: floats from one tile row to the next (headDim unless a width class decodes
    /// into its columns of a wider tile).
    @inline(__always)
    func decodeTile(_ p: UnsafeRawPointer, from t0: Int, count n: Int, into tile: UnsafeMutablePointer<Float>, stride: Int? = nil) {
        // In C where the integer kernels run: the same bits (and the speed of a build without
        // -target-cpu, where this Swift loop's SIMD types compile to calls).
        if IntegerCodeKernels.decode(p, blockBytes: encodedBlockSize(tokens: segmentTokens), bits: bits, dim: headDim,
                                     channelGrouping: grouping == .channel, groupSize: groupSize, scalesOffset: scalesOffset,
                                     offsetsOffset: offsetsOffset, tokens: t0 ..< t0 + n, into: tile, rowStride: stride ?? headDim) {
            return
        }
        decodeTileInSwift(p, from: t0, count: n, into: tile, stride: stride)
    }

    func decodeTileInSwift(_ p: UnsafeRawPointer, from t0: Int, count n: Int, into tile: UnsafeMutablePointer<Float>, stride: Int? = nil) {
        let d = headDim, rowStride = stride ?? headDim
        if grouping == .channel {
            // Scales and offsets of a token run are converted to f32 once, then shared by its rows.
            withUnsafeTemporaryAllocation(of: SIMD8<Float>.self, capacity: d / 4) { buffer in
                let sc = buffer.baseAddress!, of = sc + d / 8
                var t = t0
                while t < t0 + n {
                    let run = t / groupSize
                    let end = min(t0 + n, (run + 1) * groupSize)
                    for j in 0 ..< d / 8 {
                        let g = run &* d &+ 8 &* j
                        sc[j] = SIMD8<Float>(p.loadUnaligned(fromByteOffset: scalesOffset &+ 2 &* g, as: SIMD8<Float16>.self))
                        of[j] = SIMD8<Float>(p.loadUnaligned(fromByteOffset: offsetsOffset &+ 2 &* g, as: SIMD8<Float16>.self))
                    }
                    for row in t ..< end {
                        let codes = p + row &* rowBytes
                        let o = UnsafeMutableRawPointer(tile + (row - t0) &* rowStride)
                        for j in 0 ..< d / 8 {
                            o.storeBytes(of: of[j].addingProduct(codeValues(codes, chunk: j), sc[j]), toByteOffset: 32 &* j, as: SIMD8<Float>.self)
                        }
                    }
                    t = end
                }
            }
            return
        }
        let perToken = d / groupSize, chunksPerGroup = groupSize / 8
        for row in 0 ..< n {
            let t = t0 + row
            let codes = p + t &* rowBytes
            let o = UnsafeMutableRawPointer(tile + row &* rowStride)
            var j = 0
            for grp in 0 ..< perToken {
                let g = t &* perToken &+ grp
                let sc = SIMD8<Float>(repeating: scale(p, g)), of = SIMD8<Float>(repeating: offset(p, g))
                for _ in 0 ..< chunksPerGroup {
                    o.storeBytes(of: of.addingProduct(codeValues(codes, chunk: j), sc), toByteOffset: 32 &* j, as: SIMD8<Float>.self)
                    j &+= 1
                }
            }
        }
    }

    /// Codes 8j ..< 8j+8 of a row as floats: one little-endian load of the `bits` bytes holding
    /// them, per-lane shifts, and the exponent trick for the int-to-float conversion (Swift's
    /// SIMD conversions compile to calls). A load may read up to 3 bytes past a row's codes: the
    /// scales and offsets (4 bytes per group, at least one group) follow the codes in every
    /// block, so it stays inside the payload.
    @inline(__always)
    func codeValues(_ codes: UnsafeRawPointer, chunk j: Int) -> SIMD8<Float> {
        let word: SIMD8<UInt32>
        if bits == 8 {
            word = SIMD8<UInt32>(truncatingIfNeeded: codes.loadUnaligned(fromByteOffset: 8 &* j, as: SIMD8<UInt8>.self))
        } else {
            word = (SIMD8<UInt32>(repeating: codes.loadUnaligned(fromByteOffset: j &* bits, as: UInt32.self)) &>> shifts32) & mask32
        }
        return unsafeBitCast(word | SIMD8(repeating: 0x4B00_0000), to: SIMD8<Float>.self) - SIMD8(repeating: 8_388_608)
    }

    // MARK: Attention over codes

    /// The scaled queries, then (per-token grouping without a tile path) each query's sum over
    /// each group.
    public func queryStateSize(groupSize g: Int) -> Int {
        g * headDim + (tiled ? 0 : g * (headDim / self.groupSize))
    }

    public func prepare(queries: UnsafePointer<Float>, groupSize g: Int, scale: Float, into state: UnsafeMutablePointer<Float>) {
        if !classes.isEmpty {
            // Queries in class order, so a tile decoded class by class lines up with them.
            for q in 0 ..< g {
                for (column, channel) in channelOfColumn.enumerated() {
                    state[q * headDim + column] = scale * queries[q * headDim + Int(channel)]
                }
            }
            return
        }
        RowKernels.scaled(queries, by: scale, into: state, count: g * headDim)
        guard !tiled else { return }
        let per = headDim / groupSize
        let sums = state + g * headDim
        for q in 0 ..< g {
            for grp in 0 ..< per {
                var s: Float = 0
                for i in 0 ..< groupSize { s += state[q * headDim + grp * groupSize + i] }
                sums[q * per + grp] = s
            }
        }
    }

    public func scores(block: UnsafeRawBufferPointer, tokens: Range<Int>, state: UnsafePointer<Float>, groupSize g: Int,
                       into scores: UnsafeMutablePointer<Float>, stride: Int) {
        let d = headDim, p = block.baseAddress!, lo = tokens.lowerBound
        if fastScores {
            return IntegerCodeKernels.channelScores(codes: p, scales: p + scalesOffset, offsets: p + offsetsOffset, bits: bits, dim: d,
                                                    runTokens: groupSize, tokens: tokens, queries: state, groupSize: g, into: scores, stride: stride)
        }
        if !classes.isEmpty {
            return TileKernels.scores(decodedBy: { decodeClasses(p, from: $0.lowerBound, count: $0.count, into: $1) }, dim: d, tokens: tokens,
                                      queries: state, groupSize: g, into: scores, stride: stride)
        }
        if tiled {
            return TileKernels.scores(decodedBy: { decodeTile(p, from: $0.lowerBound, count: $0.count, into: $1) }, dim: d, tokens: tokens,
                                      queries: state, groupSize: g, into: scores, stride: stride)
        }
        // Per-token groups narrower than 8 channels (no writer default makes them).
        let per = d / groupSize
        let sums = state + g * d
        withUnsafeTemporaryAllocation(of: Float.self, capacity: d) { tmp in
            let codes = tmp.baseAddress!
            for t in tokens {
                unpack(block, row: t, into: codes)
                for q in 0 ..< g {
                    var total: Float = 0
                    for grp in 0 ..< per {
                        let gi = t * per + grp
                        let dot = RowKernels.dot(state + q * d + grp * groupSize, codes + grp * groupSize, groupSize)
                        total += scale(p, gi) * dot + offset(p, gi) * sums[q * per + grp]
                    }
                    scores[q * stride + (t - lo)] = total
                }
            }
        }
    }

    public func accumulate(block: UnsafeRawBufferPointer, tokens: Range<Int>, weights: UnsafePointer<Float>, stride: Int,
                           groupSize g: Int, into acc: UnsafeMutablePointer<Float>) {
        if fastAccumulate {
            let p = block.baseAddress!
            return IntegerCodeKernels.tokenAccumulate(codes: p, scales: p + scalesOffset, offsets: p + offsetsOffset, bits: bits, dim: headDim,
                                                      groupSize: groupSize, tokens: tokens, weights: weights, stride: stride, queryCount: g,
                                                      into: acc)
        }
        if !classes.isEmpty {
            // Accumulated in class order; `finishAccumulation` puts the channels back.
            let p = block.baseAddress!
            return TileKernels.accumulate(decodedBy: { decodeClasses(p, from: $0.lowerBound, count: $0.count, into: $1) }, dim: headDim,
                                          tokens: tokens, weights: weights, stride: stride, groupSize: g, into: acc)
        }
        TileKernels.accumulate(decodedBy: { decode(block: block, tokens: $0, into: $1) }, dim: headDim, tokens: tokens,
                               weights: weights, stride: stride, groupSize: g, into: acc)
    }

    /// The fast accumulator holds channels in slot order; one permutation per attention call.
    public func finishAccumulation(_ acc: UnsafeMutablePointer<Float>, groupSize g: Int) {
        if !classes.isEmpty { return IntegerCodeKernels.unpermute(acc, rows: g, dim: headDim, channelOfSlot: channelOfColumn) }
        guard fastAccumulate else { return }
        IntegerCodeKernels.unpermute(acc, rows: g, dim: headDim, channelOfSlot: slotChannels)
    }

    // MARK: Per-channel widths

    /// Width class `k`'s sub-block of a block.
    @inline(__always)
    func subBlock(_ block: UnsafeRawBufferPointer, _ k: WidthClass) -> UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(rebasing: block[k.payloadOffset ..< k.payloadOffset + k.codec.encodedBlockSize(tokens: segmentTokens)])
    }

    /// Each class encodes its channels' columns, gathered into a stack buffer.
    func encodeClasses(rows: UnsafePointer<Float>, tokens: Int, into block: UnsafeMutableRawBufferPointer) {
        let d = headDim
        for k in classes {
            let n = k.channels.count
            withUnsafeTemporaryAllocation(of: Float.self, capacity: tokens * n) { buffer in
                let columns = buffer.baseAddress!
                for t in 0 ..< tokens {
                    for (i, c) in k.channels.enumerated() { columns[t * n + i] = rows[t * d + c] }
                }
                let size = k.codec.encodedBlockSize(tokens: segmentTokens)
                k.codec.encode(rows: columns, tokens: tokens, into: UnsafeMutableRawBufferPointer(rebasing: block[k.payloadOffset ..< k.payloadOffset + size]))
            }
        }
    }

    /// Rows [t0, t0 + n) with the channels in class order (`channelOfColumn`): each class
    /// decodes into its columns of the tile.
    @inline(__always)
    func decodeClasses(_ p: UnsafeRawPointer, from t0: Int, count n: Int, into tile: UnsafeMutablePointer<Float>) {
        for k in classes {
            k.codec.decodeTile(p + k.payloadOffset, from: t0, count: n, into: tile + k.column, stride: headDim)
        }
    }
}
