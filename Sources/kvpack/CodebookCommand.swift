import ArgumentParser
import Foundation
import KVPack
import KVPackInterop

struct CodebookCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "codebook",
        abstract: "Fit NSNQuant's universal codebook (k-means on Gaussian samples) and measure nearest-entry search speed.",
        discussion: """
        The nsn scheme quantizes every 8 rotated dimensions with one 256-entry codebook fitted to N(0, 1) samples: 1 bit per element uses the entries as codewords; 2 bits store 8 signs and the index of the entry nearest to the absolute values (a codebook of magnitudes). The recipe is deterministic: 25 Lloyd iterations over --samples vectors drawn from SplitMix64(--seed) by Box-Muller, started at the first 256 samples. Files embed the codebook they were written with and its XXH3-64 hash; the default seed is what `--scheme nsn:B` uses.

        Prints the hash, the mean squared error per dimension on fresh Gaussian samples, and the encoder's nearest-entry search speed; --out writes the codebook as a 256 x 8 float32 .npy.
        """)

    @Option(help: "1 (codewords) or 2 (magnitudes for sign + magnitude codes).") var bits = 2
    @Option(help: "Dimensions per codeword (only 8 is defined by the format).") var dim = 8
    @Option(help: "Seed of the Gaussian samples.") var seed: UInt64 = NSNScheme.defaultCodebookSeed
    @Option(help: "Gaussian vectors to fit on.") var samples = 32768
    @Option(help: "Write the codebook as .npy here.") var out: String?

    func validate() throws {
        guard bits == 1 || bits == 2 else { throw ValidationError("--bits must be 1 or 2") }
        guard dim == NSNScheme.pieceDim else { throw ValidationError("--dim: the nsn scheme defines 8-dimensional codewords only") }
        guard samples >= NSNScheme.entries else { throw ValidationError("--samples must be at least 256") }
    }

    func run() throws {
        let t0 = Date()
        let book = NSNScheme.fitCodebook(bits: bits, seed: seed, samples: samples)
        let fitSeconds = Date().timeIntervalSince(t0)
        let blob = NSNScheme.codebookBlob(book)
        // Quality and speed on fresh samples (another seed).
        var rng = SplitMix64(seed: seed ^ 0xC0DE)
        let n = 65536
        let x = (0 ..< n * 8).map { _ -> Float in let g = Float(rng.nextGaussian()); return bits == 2 ? abs(g) : g }
        let search = NSNScheme.NearestSearch(codebook: book)
        var fast = [Int](repeating: 0, count: n), plain = fast
        let (searchSeconds, scanSeconds) = x.withUnsafeBufferPointer { xs in
            book.withUnsafeBufferPointer { b in
                let t1 = Date()
                for i in 0 ..< n { fast[i] = search.nearest(xs.baseAddress! + 8 * i) }
                let t2 = Date()
                for i in 0 ..< n { plain[i] = NSNScheme.nearest(xs.baseAddress! + 8 * i, b.baseAddress!) }
                return (t2.timeIntervalSince(t1), Date().timeIntervalSince(t2))
            }
        }
        var squared = 0.0
        for i in 0 ..< n {
            for j in 0 ..< 8 {
                let d = Double(x[8 * i + j] - book[fast[i] * 8 + j])
                squared += d * d
            }
        }
        let agree = zip(fast, plain).filter { $0 == $1 }.count
        print("codebook: \(bits == 1 ? "256 codewords" : "256 magnitude vectors (with 8 sign bits: 65,536 codewords)") of 8 dims, seed \(seed), \(samples) samples, fitted in \(String(format: "%.2f", fitSeconds)) s")
        print("XXH3-64 of its bytes: \(String(Checksum.xxh3(blob.bytes), radix: 16))")
        print(String(format: "mean squared error per dimension on %d fresh N(0,1) vectors: %.4f (%@)", n, squared / Double(n * 8),
                     bits == 1 ? "1 bit per dimension" : "2 bits per dimension: the signs are exact"))
        print(String(format: "nearest-entry search: %.1f M pieces/s (%.1f M dims/s, one core), against %.1f M pieces/s for a scan of 256 distances; same entry for %.3f%% of pieces (the rest are ties within rounding)",
                     Double(n) / searchSeconds / 1e6, Double(n * 8) / searchSeconds / 1e6, Double(n) / max(scanSeconds, 1e-9) / 1e6, 100 * Double(agree) / Double(n)))
        if let out {
            let npy = NpyArray(floats: book, shape: [256, 8])
            guard FileManager.default.createFile(atPath: out, contents: Data(npy.encoded())) else { throw CLIError("cannot write \(out)") }
            print("wrote \(out)")
        }
    }
}
