import Foundation

/// An object named by `s3://bucket/key`.
public struct S3Location: Sendable, Equatable, CustomStringConvertible {
    public var bucket: String
    public var key: String

    public init(bucket: String, key: String) {
        self.bucket = bucket
        self.key = key
    }

    /// Parses `s3://bucket/key`; nil for anything else (a local path).
    public init?(url: String) {
        guard url.hasPrefix("s3://") else { return nil }
        let rest = url.dropFirst(5)
        guard let slash = rest.firstIndex(of: "/"), slash != rest.startIndex, rest.index(after: slash) != rest.endIndex else { return nil }
        bucket = String(rest[..<slash])
        key = String(rest[rest.index(after: slash)...])
    }

    public var description: String { "s3://\(bucket)/\(key)" }
}

/// Where and as whom to reach S3, found the standard AWS way: the environment (AWS_ACCESS_KEY_ID,
/// AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION or AWS_DEFAULT_REGION,
/// AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, AWS_PROFILE), then the shared files
/// (AWS_SHARED_CREDENTIALS_FILE, default ~/.aws/credentials: aws_access_key_id,
/// aws_secret_access_key, aws_session_token of the profile; AWS_CONFIG_FILE, default
/// ~/.aws/config: region and endpoint_url of `[profile NAME]`, or `[default]`). Without an
/// endpoint, AWS itself: https://s3.REGION.amazonaws.com with virtual-hosted bucket names; with
/// one (an S3-compatible server), path-style addressing (http://host:port/bucket/key).
public struct S3Configuration: Sendable {
    public var accessKey: String
    public var secretKey: String
    public var sessionToken: String?
    public var region: String
    public var endpoint: URL
    public var pathStyle: Bool

    public init(accessKey: String, secretKey: String, sessionToken: String? = nil, region: String = "us-east-1", endpoint: URL? = nil) {
        self.accessKey = accessKey
        self.secretKey = secretKey
        self.sessionToken = sessionToken
        self.region = region
        self.endpoint = endpoint ?? URL(string: "https://s3.\(region).amazonaws.com")!
        pathStyle = endpoint != nil
    }

    public static func load(environment: [String: String] = ProcessInfo.processInfo.environment) throws -> S3Configuration {
        let home = environment["HOME"] ?? NSHomeDirectory()
        let profile = environment["AWS_PROFILE"] ?? "default"
        let credentialsFile = environment["AWS_SHARED_CREDENTIALS_FILE"] ?? home + "/.aws/credentials"
        let configFile = environment["AWS_CONFIG_FILE"] ?? home + "/.aws/config"
        let credentials = iniSection(path: credentialsFile, section: profile)
        let config = iniSection(path: configFile, section: profile == "default" ? "default" : "profile \(profile)")
        func nonEmpty(_ s: String?) -> String? { s.flatMap { $0.isEmpty ? nil : $0 } }
        guard let access = nonEmpty(environment["AWS_ACCESS_KEY_ID"]) ?? credentials["aws_access_key_id"],
              let secret = nonEmpty(environment["AWS_SECRET_ACCESS_KEY"]) ?? credentials["aws_secret_access_key"] else {
            throw RemoteError("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or give profile \(profile) aws_access_key_id and aws_secret_access_key in \(credentialsFile)")
        }
        let token = nonEmpty(environment["AWS_SESSION_TOKEN"]) ?? credentials["aws_session_token"]
        let region = nonEmpty(environment["AWS_REGION"]) ?? nonEmpty(environment["AWS_DEFAULT_REGION"]) ?? config["region"] ?? "us-east-1"
        var endpoint: URL?
        if let text = nonEmpty(environment["AWS_ENDPOINT_URL_S3"]) ?? nonEmpty(environment["AWS_ENDPOINT_URL"]) ?? config["endpoint_url"] {
            guard let url = URL(string: text), url.scheme == "http" || url.scheme == "https", url.host != nil else {
                throw RemoteError("the S3 endpoint \(text) is not an http(s) URL")
            }
            endpoint = url
        }
        return S3Configuration(accessKey: access, secretKey: secret, sessionToken: token, region: region, endpoint: endpoint)
    }

    /// `key = value` lines of `[section]` in an INI file; empty when the file or section is absent.
    static func iniSection(path: String, section: String) -> [String: String] {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return [:] }
        var current: String?, out: [String: String] = [:]
        for raw in text.split(whereSeparator: \.isNewline) {
            let line = raw.trimmingCharacters(in: .whitespaces)
            if line.isEmpty || line.hasPrefix("#") || line.hasPrefix(";") { continue }
            if line.hasPrefix("["), line.hasSuffix("]") {
                current = String(line.dropFirst().dropLast()).trimmingCharacters(in: .whitespaces)
                continue
            }
            guard current == section, let eq = line.firstIndex(of: "=") else { continue }
            out[line[..<eq].trimmingCharacters(in: .whitespaces).lowercased()] = line[line.index(after: eq)...].trimmingCharacters(in: .whitespaces)
        }
        return out
    }
}

/// A failure talking to object storage: what was asked, of which URL, and what came back.
public struct RemoteError: Error, CustomStringConvertible, Sendable {
    public var message: String
    /// The HTTP status, when a response arrived.
    public var status: Int?
    public init(_ message: String, status: Int? = nil) {
        self.message = message
        self.status = status
    }
    public var description: String { message }
}
