#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Where temporary files go: `$TMPDIR` when set and not empty, else /tmp.
public enum TemporaryDirectory {
    public static var path: String {
        guard let t = getenv("TMPDIR"), t.pointee != 0 else { return "/tmp" }
        return String(cString: t)
    }
}
