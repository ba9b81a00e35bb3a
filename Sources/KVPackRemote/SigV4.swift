import Crypto
import Foundation

/// AWS Signature Version 4 for S3 requests (header-based authentication), as specified in
/// "Authenticating Requests: Using the Authorization Header" of the S3 API reference: a canonical
/// request (method, URI-encoded path, sorted query, lower-cased sorted headers, payload hash), a
/// string to sign, a key derived from the secret by four HMAC-SHA256 steps (date, region,
/// service, "aws4_request"), and the Authorization header. S3 encodes the path once (other
/// services twice); tested against the published examples.
public struct SigV4Signer: Sendable {
    public var accessKey: String
    public var secretKey: String
    public var sessionToken: String?
    public var region: String
    public var service: String

    public init(accessKey: String, secretKey: String, sessionToken: String? = nil, region: String, service: String = "s3") {
        self.accessKey = accessKey
        self.secretKey = secretKey
        self.sessionToken = sessionToken
        self.region = region
        self.service = service
    }

    /// The SHA-256 of an empty payload, hex.
    public static let emptyPayloadHash = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

    /// Headers to add to a request: `authorization`, `x-amz-date` and, with a session token,
    /// `x-amz-security-token`. `path` is the canonical URI, already encoded (`uriEncode` with
    /// slashes kept); `query` the decoded parameters; `headers` every header to sign (`host` and,
    /// for S3, `x-amz-content-sha256` included; `x-amz-date` is added).
    public func sign(method: String, path: String, query: [(String, String)], headers: [String: String], payloadHash: String,
                     date: Date) -> [String: String] {
        let (amzDate, day) = Self.timestamps(date)
        var all = Dictionary(headers.map { ($0.key.lowercased(), $0.value) }, uniquingKeysWith: { a, _ in a })
        all["x-amz-date"] = amzDate
        if let sessionToken { all["x-amz-security-token"] = sessionToken }
        let names = all.keys.sorted()
        let canonicalHeaders = names.map { "\($0):\(Self.trim(all[$0]!))\n" }.joined()
        let signedHeaders = names.joined(separator: ";")
        let canonicalRequest = [method, path, Self.canonicalQuery(query), canonicalHeaders, signedHeaders, payloadHash]
            .joined(separator: "\n")
        let scope = "\(day)/\(region)/\(service)/aws4_request"
        let stringToSign = ["AWS4-HMAC-SHA256", amzDate, scope, Self.sha256Hex(Array(canonicalRequest.utf8))].joined(separator: "\n")
        var key = SymmetricKey(data: Array("AWS4\(secretKey)".utf8))
        for part in [day, region, service, "aws4_request"] {
            key = SymmetricKey(data: Data(HMAC<SHA256>.authenticationCode(for: Array(part.utf8), using: key)))
        }
        let signature = Self.hex(Array(HMAC<SHA256>.authenticationCode(for: Array(stringToSign.utf8), using: key)))
        var out = ["authorization": "AWS4-HMAC-SHA256 Credential=\(accessKey)/\(scope), SignedHeaders=\(signedHeaders), Signature=\(signature)",
                   "x-amz-date": amzDate]
        if let sessionToken { out["x-amz-security-token"] = sessionToken }
        return out
    }

    /// "20130524T000000Z" and "20130524" (UTC).
    static func timestamps(_ date: Date) -> (String, String) {
        var calendar = Calendar(identifier: .gregorian)
        calendar.timeZone = TimeZone(identifier: "UTC")!
        let c = calendar.dateComponents([.year, .month, .day, .hour, .minute, .second], from: date)
        func pad(_ v: Int?, _ n: Int) -> String { let s = String(v ?? 0); return String(repeating: "0", count: max(0, n - s.count)) + s }
        let day = pad(c.year, 4) + pad(c.month, 2) + pad(c.day, 2)
        return (day + "T" + pad(c.hour, 2) + pad(c.minute, 2) + pad(c.second, 2) + "Z", day)
    }

    /// RFC 3986 encoding as SigV4 wants it: unreserved characters (A-Z a-z 0-9 - . _ ~) as they
    /// are, every other byte of the UTF-8 as %XX (upper-case hex); `/` kept when `keepSlash`.
    public static func uriEncode(_ s: String, keepSlash: Bool) -> String {
        var out = ""
        for b in s.utf8 {
            switch b {
            case UInt8(ascii: "A") ... UInt8(ascii: "Z"), UInt8(ascii: "a") ... UInt8(ascii: "z"), UInt8(ascii: "0") ... UInt8(ascii: "9"),
                 UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"):
                out.unicodeScalars.append(Unicode.Scalar(b))
            case UInt8(ascii: "/") where keepSlash:
                out += "/"
            default:
                out += String(format: "%%%02X", b)
            }
        }
        return out
    }

    /// Parameters encoded and sorted by name, then value; `name=value` joined by `&`.
    public static func canonicalQuery(_ query: [(String, String)]) -> String {
        query.map { (uriEncode($0.0, keepSlash: false), uriEncode($0.1, keepSlash: false)) }
            .sorted { $0.0 != $1.0 ? $0.0 < $1.0 : $0.1 < $1.1 }
            .map { "\($0.0)=\($0.1)" }.joined(separator: "&")
    }

    /// Leading and trailing spaces removed, inner runs of spaces collapsed to one.
    static func trim(_ value: String) -> String {
        value.split(separator: " ", omittingEmptySubsequences: true).joined(separator: " ")
    }

    public static func sha256Hex(_ bytes: some DataProtocol) -> String { hex(Array(SHA256.hash(data: bytes))) }

    static func hex(_ bytes: [UInt8]) -> String { bytes.map { String(format: "%02x", $0) }.joined() }
}
