import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// The few S3 operations KVPack needs, signed with SigV4, over URLSession: HEAD, ranged GET, PUT,
/// multipart upload (create, part, complete, abort), bucket creation and object deletion.
/// Requests block the calling thread. Transient failures (connection refused or reset, timeouts,
/// 5xx, 429) are retried `retries` times with exponential backoff; anything else is an error
/// naming the method, URL, status and S3's error code and message. Every response is checked:
/// a ranged GET must answer 206 with the Content-Range asked for and exactly that many bytes.
public final class S3Client: @unchecked Sendable {
    // @unchecked: the configuration is immutable; URLSession is thread-safe.
    public let configuration: S3Configuration
    public let signer: SigV4Signer
    public var retries = 4
    public var backoff: TimeInterval = 0.1
    private let session: URLSession

    public init(configuration: S3Configuration, timeout: TimeInterval = 30) {
        self.configuration = configuration
        signer = SigV4Signer(accessKey: configuration.accessKey, secretKey: configuration.secretKey,
                             sessionToken: configuration.sessionToken, region: configuration.region)
        let c = URLSessionConfiguration.ephemeral
        c.timeoutIntervalForRequest = timeout
        c.httpMaximumConnectionsPerHost = 8
        session = URLSession(configuration: c)
    }

    public struct Response: Sendable {
        public var status: Int
        public var headers: [String: String]
        public var body: Data
        public func header(_ name: String) -> String? { headers[name.lowercased()] }
    }

    /// Sends one signed request (retrying transient failures) and returns any response whose
    /// status is in `expect`; other statuses are errors.
    public func request(_ method: String, _ location: S3Location?, bucket: String? = nil, query: [(String, String)] = [],
                        headers extra: [String: String] = [:], body: Data = Data(), expect: Set<Int> = [200]) throws -> Response {
        let bucketName = location?.bucket ?? bucket ?? ""
        let key = location.map { SigV4Signer.uriEncode($0.key, keepSlash: true) }
        let path = "/" + (configuration.pathStyle ? SigV4Signer.uriEncode(bucketName, keepSlash: false) + (key.map { "/" + $0 } ?? "") : key ?? "")
        var components = URLComponents()
        components.scheme = configuration.endpoint.scheme
        components.host = configuration.endpoint.host.map { configuration.pathStyle ? $0 : "\(bucketName).\($0)" }
        components.port = configuration.endpoint.port
        components.percentEncodedPath = path
        if !query.isEmpty { components.percentEncodedQuery = SigV4Signer.canonicalQuery(query) }
        guard let url = components.url, let urlHost = components.host else { throw RemoteError("cannot form a URL for \(method) \(path)") }
        // The Host header signed is the one the URL sends.
        let host = urlHost + (components.port.map { ":\($0)" } ?? "")
        let payloadHash = SigV4Signer.sha256Hex(body)
        var attempt = 0
        while true {
            var headers = extra
            headers["host"] = host
            headers["x-amz-content-sha256"] = payloadHash
            for (k, v) in signer.sign(method: method, path: path, query: query, headers: headers, payloadHash: payloadHash, date: Date()) {
                headers[k] = v
            }
            var r = URLRequest(url: url)
            r.httpMethod = method
            for (k, v) in headers where k != "host" { r.setValue(v, forHTTPHeaderField: k) }
            if !body.isEmpty || method == "PUT" || method == "POST" { r.httpBody = body }
            let outcome = send(r)
            let what = "\(method) \(url.absoluteString)"
            switch outcome {
            case let .failure(error):
                if attempt < retries, Self.transient(error) {
                    attempt += 1
                    Thread.sleep(forTimeInterval: backoff * pow(4, Double(attempt - 1)))
                    continue
                }
                throw RemoteError("\(what): \(error.localizedDescription)\(attempt > 0 ? " (after \(attempt + 1) attempts)" : "")")
            case let .success(response):
                if expect.contains(response.status) { return response }
                if attempt < retries, response.status >= 500 || response.status == 429 {
                    attempt += 1
                    Thread.sleep(forTimeInterval: backoff * pow(4, Double(attempt - 1)))
                    continue
                }
                let code = Self.xmlValue("Code", in: response.body), message = Self.xmlValue("Message", in: response.body)
                // A HEAD has no body to say why: name the usual reasons.
                let fallback: String? = response.status == 404 ? "no such object or bucket" : response.status == 403 ? "access denied" : nil
                let detail = [code, message].compactMap { $0 }.joined(separator: ": ").nonEmpty ?? fallback ?? ""
                throw RemoteError("\(what): HTTP \(response.status)\(detail.isEmpty ? "" : " (\(detail))")\(attempt > 0 ? " after \(attempt + 1) attempts" : "")",
                                  status: response.status)
            }
        }
    }

    /// Whether asking again may help: every transport failure (refused, reset, timed out, a body
    /// cut short, which libcurl reports under several codes) except a request that can never
    /// work as sent.
    static func transient(_ error: Error) -> Bool {
        guard let e = error as? URLError else { return true }
        return ![.badURL, .unsupportedURL, .cancelled, .userCancelledAuthentication, .userAuthenticationRequired,
                 .secureConnectionFailed, .serverCertificateUntrusted, .serverCertificateHasBadDate,
                 .serverCertificateNotYetValid, .serverCertificateHasUnknownRoot, .clientCertificateRejected].contains(e.code)
    }

    private final class Box: @unchecked Sendable {
        var result: Result<Response, Error> = .failure(RemoteError("no response"))
    }

    private func send(_ request: URLRequest) -> Result<Response, Error> {
        let done = DispatchSemaphore(value: 0), box = Box()
        let task = session.dataTask(with: request) { data, response, error in
            if let error {
                box.result = .failure(error)
            } else if let http = response as? HTTPURLResponse {
                var headers: [String: String] = [:]
                for (k, v) in http.allHeaderFields { headers["\(k)".lowercased()] = "\(v)" }
                box.result = .success(Response(status: http.statusCode, headers: headers, body: data ?? Data()))
            }
            done.signal()
        }
        task.resume()
        done.wait()
        return box.result
    }

    /// The text of the first `<name>...</name>` in an XML body.
    static func xmlValue(_ name: String, in body: Data) -> String? {
        guard let text = String(data: body, encoding: .utf8), let open = text.range(of: "<\(name)>"),
              let close = text.range(of: "</\(name)>", range: open.upperBound ..< text.endIndex) else { return nil }
        return String(text[open.upperBound ..< close.lowerBound])
    }

    // MARK: Operations

    /// The object's size and ETag.
    public func head(_ location: S3Location) throws -> (size: Int, etag: String?) {
        let r = try request("HEAD", location)
        guard let text = r.header("content-length"), let size = Int(text), size >= 0 else {
            throw RemoteError("HEAD \(location): no Content-Length in the response")
        }
        return (size, r.header("etag"))
    }

    /// Bytes [range] of the object, checked against what was asked. A response that is short or
    /// covers other bytes (a connection cut mid-body, a confused proxy) is asked again, like a
    /// 5xx, `retries` times; then it is an error saying what arrived.
    public func get(_ location: S3Location, range: Range<Int>) throws -> Data {
        guard !range.isEmpty else { return Data() }
        var attempt = 0
        while true {
            let r = try request("GET", location, headers: ["range": "bytes=\(range.lowerBound)-\(range.upperBound - 1)"], expect: [206, 200])
            let problem: String
            let expected = "bytes \(range.lowerBound)-\(range.upperBound - 1)/"
            if r.status == 200 {
                // A server that ignores Range sends everything: accept only if that is what was asked.
                if range.lowerBound == 0, r.body.count == range.count { return r.body }
                problem = "the server ignored the range (HTTP 200, \(r.body.count) bytes)"
            } else if let contentRange = r.header("content-range"), contentRange.hasPrefix(expected) {
                if r.body.count == range.count { return r.body }
                problem = "\(r.body.count) bytes arrived, \(range.count) expected (a truncated response)"
            } else {
                problem = "Content-Range is \(r.header("content-range") ?? "missing"), expected \(expected)*"
            }
            guard attempt < retries else {
                throw RemoteError("GET \(location) bytes \(range): \(problem)\(attempt > 0 ? " (after \(attempt + 1) attempts)" : "")")
            }
            attempt += 1
            Thread.sleep(forTimeInterval: backoff * pow(4, Double(attempt - 1)))
        }
    }

    public func put(_ location: S3Location, data: Data) throws {
        _ = try request("PUT", location, body: data)
    }

    public func delete(_ location: S3Location) throws {
        _ = try request("DELETE", location, expect: [200, 204, 404])
    }

    /// Creates a bucket; an existing one of ours is fine.
    public func createBucket(_ name: String) throws {
        _ = try request("PUT", nil, bucket: name, expect: [200, 409])
    }

    public func createMultipartUpload(_ location: S3Location) throws -> String {
        let r = try request("POST", location, query: [("uploads", "")])
        guard let id = Self.xmlValue("UploadId", in: r.body), !id.isEmpty else {
            throw RemoteError("POST \(location)?uploads: no UploadId in the response")
        }
        return id
    }

    /// Uploads part `number` (1-based); returns its ETag.
    public func uploadPart(_ location: S3Location, uploadID: String, number: Int, data: Data) throws -> String {
        let r = try request("PUT", location, query: [("partNumber", String(number)), ("uploadId", uploadID)], body: data)
        guard let etag = r.header("etag") else { throw RemoteError("PUT \(location) part \(number): no ETag in the response") }
        return etag
    }

    /// Makes part `number` of an upload from bytes `range` of another object, on the server
    /// (UploadPartCopy): nothing crosses the network. `ifMatch` refuses the copy (HTTP 412) if
    /// the source is no longer that version. Returns the part's ETag.
    public func uploadPartCopy(_ location: S3Location, uploadID: String, number: Int, source: S3Location, range: Range<Int>,
                               ifMatch: String? = nil) throws -> String {
        var headers = ["x-amz-copy-source": "/\(SigV4Signer.uriEncode(source.bucket, keepSlash: false))/\(SigV4Signer.uriEncode(source.key, keepSlash: true))",
                       "x-amz-copy-source-range": "bytes=\(range.lowerBound)-\(range.upperBound - 1)"]
        if let ifMatch { headers["x-amz-copy-source-if-match"] = ifMatch }
        let r = try request("PUT", location, query: [("partNumber", String(number)), ("uploadId", uploadID)], headers: headers)
        guard let etag = Self.xmlValue("ETag", in: r.body) else {
            throw RemoteError("PUT \(location) part \(number) (copy of \(source) bytes \(range)): no ETag in the response")
        }
        return etag.replacingOccurrences(of: "&quot;", with: "\"")
    }

    /// Completes an upload: the object appears whole, atomically.
    public func completeMultipartUpload(_ location: S3Location, uploadID: String, etags: [String]) throws {
        let parts = etags.enumerated().map { "<Part><PartNumber>\($0.offset + 1)</PartNumber><ETag>\($0.element)</ETag></Part>" }.joined()
        let xml = Data("<CompleteMultipartUpload>\(parts)</CompleteMultipartUpload>".utf8)
        let r = try request("POST", location, query: [("uploadId", uploadID)], body: xml)
        // S3 may answer 200 and put the failure in the body.
        if let code = Self.xmlValue("Code", in: r.body), Self.xmlValue("Error", in: r.body) != nil || r.body.starts(with: Data("<Error".utf8)) {
            throw RemoteError("POST \(location)?uploadId: \(code): \(Self.xmlValue("Message", in: r.body) ?? "")")
        }
    }

    public func abortMultipartUpload(_ location: S3Location, uploadID: String) {
        _ = try? request("DELETE", location, query: [("uploadId", uploadID)], expect: [200, 204, 404])
    }
}

extension String {
    var nonEmpty: String? { isEmpty ? nil : self }
}
