import Testing
@testable import KVPack

/// Every scheme prints, for each descriptor it is built from, a spec string that parses back to
/// the same descriptor (and the same blobs, given the same calibration): what `info`, convert's
/// report and `scheme.spec` metadata show can be pasted into `--scheme`.
struct SpecStringTests {
    static let geometry = ModelGeometry(layerCount: 3, queryHeadCount: 4, kvHeadCount: 2, headDim: 32)
    static let segmentTokens = 32

    /// Calibration statistics of random rows (planners: int:auto's norms, svdq's bases).
    static let calibration: CacheStatistics = {
        let data = RandomKV(geometry: geometry, tokens: 48, seed: 11, maxExponent: 6)
        return CacheStatistics(geometry: geometry, tokens: 48) { l, h, k in data.stream(layer: l, head: h, kind: k, tokens: 0 ..< 48) }
    }()

    @Test("a scheme's spec string parses back to its own descriptor and blobs", arguments: [
        "raw:f32", "raw:f16:zstd", "raw:bf16:zstd=9",
        "int:k4v2", "int:k3v1:kc16:vc8", "int:k8v4:g8", "int:k2v4:kt16:vt8", "int:k4v2:kc32:r64", "int:auto:3.0:kc16",
        "polar:r4a4+v:raw:f16", "k:polar:r2a3:g4:half+v:polar:r8a8:adjacent", "k:polar:r3a5:g32+v:int:k4v4",
        "svdq:2", "k:svdq:8-4-0-2:shared+v:svdq:1.25",
        "nsn:1", "k:nsn:2:seed9+v:nsn:1",
    ])
    func roundTrip(spec text: String) throws {
        let g = Self.geometry
        let spec = try SchemeSpec.parse(text, geometry: g, calibration: Self.calibration)
        for (layer, setups) in spec.layers.enumerated() {
            for (role, setup) in [(KVKind.key, setups.key), (.value, setups.value)] {
                var manifestRope = RoPEConfig(theta: 10000, layout: .interleaved)
                manifestRope.keysArePostRoPE = true
                let context = SchemeContext(geometry: g, segmentTokens: Self.segmentTokens, rope: manifestRope, role: role,
                                            blobs: setup.blobs)
                var descriptor = setup.descriptor
                descriptor.blobIDs = setup.blobs.indices.map { UInt32($0 + 1) }
                let printed = try SchemeRegistry.make(descriptor: descriptor, context: context).specString
                // The other role gets a scheme that takes any role, so the printed part stands alone.
                let whole = role == .key ? "k:\(printed)+v:raw:f16" : "k:raw:f16+v:\(printed)"
                let again = try SchemeSpec.parse(whole, geometry: g, calibration: Self.calibration).layers[layer]
                let back = role == .key ? again.key : again.value
                #expect(back.descriptor == setup.descriptor, "\(text): layer \(layer) \(role) printed \(printed)")
                #expect(back.blobs == setup.blobs, "\(text): layer \(layer) \(role) printed \(printed): blobs differ")
                var backDescriptor = back.descriptor
                backDescriptor.blobIDs = descriptor.blobIDs
                let reprinted = try SchemeRegistry.make(descriptor: backDescriptor, context: context).specString
                #expect(reprinted == printed, "\(text): \(printed) reprints as \(reprinted)")
            }
        }
    }

    @Test("the two steps: a planner is found at parse time and asks for calibration; a fixed spec never does")
    func twoSteps() throws {
        let g = Self.geometry
        let fixed = try ParsedSchemeSpec("int:k4v2+v:nsn:2", geometry: g)
        #expect(!fixed.needsCalibration)
        _ = try fixed.planned(calibration: nil)
        for text in ["int:auto:3.0", "svdq:2", "raw:f16+k:svdq:8-4"] {
            let parsed = try ParsedSchemeSpec(text, geometry: g)
            #expect(parsed.needsCalibration, "\(text)")
            #expect { try parsed.planned(calibration: nil) } throws: { ($0 as? KVPackError)?.code == .needsCalibration }
            _ = try parsed.planned(calibration: Self.calibration)
        }
        // A bad argument of a planner is reported at parse time, before anything is calibrated.
        #expect(throws: KVPackError.self) { try ParsedSchemeSpec("int:auto:3.0:zz", geometry: g) }
        #expect(throws: KVPackError.self) { try ParsedSchemeSpec("svdq:3-9", geometry: g) }
        // The calibrate closure runs only when asked.
        var calls = 0
        _ = try SchemeSpec.parse("raw:f16", geometry: g) { calls += 1; return Self.calibration }
        #expect(calls == 0)
        _ = try SchemeSpec.parse("int:auto:2.5", geometry: g) { calls += 1; return Self.calibration }
        #expect(calls == 1)
    }
}
