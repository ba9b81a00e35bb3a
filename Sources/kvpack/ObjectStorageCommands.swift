import ArgumentParser
import Foundation
import KVPack
import KVPackRemote

/// Where the S3 settings come from, for --help.
let s3Discussion = """
Credentials, region and endpoint come the standard AWS way: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION (or AWS_DEFAULT_REGION), AWS_ENDPOINT_URL_S3 (or AWS_ENDPOINT_URL) and AWS_PROFILE, else the profile's entries in ~/.aws/credentials and ~/.aws/config (region, endpoint_url). With an endpoint (an S3-compatible server such as the test one, scripts/s3-server.sh), buckets are addressed path-style. Requests are signed with SigV4; transient failures (connection refused, timeouts, 5xx) are retried 4 times with backoff.
"""

func s3Location(_ text: String, _ what: String) throws -> S3Location {
    guard let l = S3Location(url: text) else { throw ValidationError("\(what) must be s3://bucket/key, got \(text)") }
    return l
}

struct PushCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "push",
        abstract: "Upload a .kvpack file to object storage (S3 API), atomically, and check what arrived.",
        discussion: """
        The file is opened first (only a file that loads is published). Up to --part-size it goes in one PUT; larger files in a multipart upload that the server assembles when it completes, so no reader ever sees a partial object (a failed upload is aborted and leaves the previous object, if any). Then the object is read back in ranges and compared with the file byte for byte (--no-verify skips that).

        \(s3Discussion)
        """)

    @Argument(help: "The .kvpack file.") var file: String
    @Argument(help: "Where: s3://bucket/key.") var destination: String
    @Option(help: "Part size in MiB for multipart uploads (AWS needs at least 5).") var partSize: Double = 8
    @Flag(help: "Create the bucket if it does not exist.") var createBucket = false
    @Flag(inversion: .prefixedNo, help: "Read the object back and compare it with the file.") var verify = true
    @Flag(help: "Publish a file that opens only by recovery (bytes after its last commit): its last good commit is what readers get.") var acceptRecovered = false
    @Flag(help: "Print the report as JSON.") var json = false

    func run() throws {
        let location = try s3Location(destination, "DESTINATION")
        let client = S3Client(configuration: try S3Configuration.load())
        if createBucket { try client.createBucket(location.bucket) }
        let size = (try? FileManager.default.attributesOfItem(atPath: file)[.size] as? Int) ?? 0
        let progress = Progress(label: "push \(location)", total: size)
        let report = try ObjectTransfer.push(file: file, to: location, client: client, partSize: Int(partSize * 1_048_576), verify: verify,
                                             acceptRecovered: acceptRecovered) {
            done, _ in progress.update(done)
        }
        progress.finish()
        if json { return try printJSON(report) }
        let rate = Double(report.bytes) / max(report.seconds, 1e-9) / 1e6
        print("\(location): \(report.bytes) bytes from \(file) in \(report.parts) part\(report.parts == 1 ? "" : "s"), \(String(format: "%.2f", report.seconds)) s (\(String(format: "%.1f", rate)) MB/s)"
            + (report.verified ? "; read back and equal (\(String(format: "%.2f", report.verifySeconds)) s)" : "; not verified"))
    }
}

struct PullCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pull",
        abstract: "Download a .kvpack file from object storage (S3 API) and check it before it appears.",
        discussion: """
        Ranged GETs of --chunk MiB, 8 at a time, each checked (status 206, the Content-Range asked for, every byte). The download is written beside FILE and renamed over it only once it opens as a .kvpack file (header, manifest and commit checksums) and, with --deep, validates block by block; a damaged or partial object leaves nothing.

        \(s3Discussion)
        """)

    @Argument(help: "Where: s3://bucket/key.") var source: String
    @Argument(help: "The .kvpack file to write.") var file: String
    @Option(help: "Bytes per ranged GET, in MiB.") var chunk: Double = 8
    @Flag(help: "Replace FILE if it exists.") var overwrite = false
    @Flag(help: "Validate every block before keeping the file (as validate --deep).") var deep = false
    @Flag(help: "Keep an object that opens only by recovery (a torn or uncommitted end): its last good commit.") var acceptRecovered = false
    @Flag(help: "Print the report as JSON.") var json = false

    func run() throws {
        let location = try s3Location(source, "SOURCE")
        let client = S3Client(configuration: try S3Configuration.load())
        // In percent: the size is known only once the object's HEAD answers.
        let progress = Progress(label: "pull \(location) (%)", total: 100)
        let report = try ObjectTransfer.pull(location, to: file, client: client, chunk: max(1024, Int(chunk * 1_048_576)), overwrite: overwrite,
                                             deep: deep, acceptRecovered: acceptRecovered) { done, total in progress.update(done * 100 / max(total, 1)) }
        progress.finish()
        if json { return try printJSON(report) }
        let rate = Double(report.bytes) / max(report.seconds, 1e-9) / 1e6
        print("\(file): \(report.tokens) tokens, \(report.bytes) bytes from \(location) in \(report.requests) requests, \(String(format: "%.2f", report.seconds)) s (\(String(format: "%.1f", rate)) MB/s)\(deep ? ", validated" : "")")
    }
}
