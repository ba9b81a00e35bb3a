import Crypto
import Foundation
import Testing
@testable import KVPack
@testable import KVPackModels
@testable import KVPackRemote

// The commands over s3:// against the real server (OpenStack Swift, scripts/s3-server.sh):
// part of S3ServerTests, so they run one at a time, each with its own server.
extension S3ServerTests {
    /// What a kvpack process needs to reach the test server, and a cache of its own.
    static func environment(_ dir: String, port: Int = port) -> [String: String] {
        ["AWS_ACCESS_KEY_ID": "test:tester", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_ENDPOINT_URL": "http://127.0.0.1:\(port)",
         "AWS_SHARED_CREDENTIALS_FILE": dir + "/none", "AWS_CONFIG_FILE": dir + "/none", "KVPACK_CACHE_DIR": dir + "/cache"]
    }

    /// A JSON report without the fields that name where the file was (path), as sorted JSON text.
    static func withoutPath(_ json: String) throws -> String {
        var object = try JSONSerialization.jsonObject(with: Data(json.utf8)) as! [String: Any]
        object["path"] = nil
        return String(decoding: try JSONSerialization.data(withJSONObject: object, options: .sortedKeys), as: UTF8.self)
    }

    static func startOrSkip(_ test: String) -> Bool {
        let (started, log) = server("start")
        if started != 0 { print("\(test): SKIPPED: the S3 test server did not start (scripts/s3-server.sh install, then start): \(log)") }
        return started == 0
    }

    @Test("info, validate --deep, attend and export over s3:// say what they say about the local file (raw and int), fetching only what they read")
    func commandsOverS3() throws {
        guard Self.startOrSkip("commandsOverS3") else { return }
        defer { _ = Self.server("stop"); try? FileManager.default.removeItem(atPath: Self.dir) }
        let dir = temporaryDirectory()
        let raw = try Self.file(dir)
        let int = dir + "/int.kvpack"
        let (cs, _, ce) = try runKVPack(["convert", raw, int, "--scheme", "int:k2v2:kc64"])
        try #require(cs == 0, "\(ce)")
        let client = try Self.client()
        try client.createBucket("kvpack-test")
        let env = Self.environment(dir)
        for (local, key) in [(raw, "raw.kvpack"), (int, "dir/int.kvpack")] {
            _ = try ObjectTransfer.push(file: local, to: S3Location(bucket: "kvpack-test", key: key), client: client)
            let url = "s3://kvpack-test/\(key)"
            func both(_ args: [String]) throws -> (local: String, remote: String, stderr: String) {
                let (ls, lo, le) = try runKVPack(args.map { $0 == "FILE" ? local : $0 })
                let (rs, ro, re) = try runKVPack(args.map { $0 == "FILE" ? url : $0 }, environment: env)
                #expect(ls == 0 && rs == 0, "\(args): \(le) \(re)")
                return (lo, ro, re)
            }
            let info = try both(["info", "FILE", "--json"])
            #expect(try Self.withoutPath(info.local) == Self.withoutPath(info.remote))
            #expect(info.stderr.contains("\(url): ") && info.stderr.contains("fetched"), "\(info.stderr)")
            let validate = try both(["validate", "FILE", "--deep", "--json"])
            #expect(try Self.withoutPath(validate.local) == Self.withoutPath(validate.remote))
            let attend = try both(["attend", "FILE", "--layer", "2", "--head", "5", "--tokens", "17..<470", "--check", "--json"])
            #expect(attend.local == attend.remote && attend.local.contains("maxRelativeError"))
            for format in ["npy", "safetensors"] {
                let a = dir + "/\(key.hashValue)-local.\(format)", b = dir + "/\(key.hashValue)-remote.\(format)"
                let l = try runKVPack(["export", local, a, "--format", format]), r = try runKVPack(["export", url, b, "--format", format], environment: env)
                #expect(l.0 == 0 && r.0 == 0, "\(l.2) \(r.2)")
                if format == "npy" {
                    for name in try FileManager.default.contentsOfDirectory(atPath: a) where name.hasSuffix(".npy") {
                        #expect(fileBytes(a + "/" + name) == fileBytes(b + "/" + name), "\(name)")
                    }
                } else {
                    #expect(fileBytes(a) == fileBytes(b))
                }
            }
        }
        // One layer's attention on a cold cache fetches that layer's pages, not the object.
        let cold = Self.environment(dir + "/cold")
        let (s, _, err) = try runKVPack(["attend", "s3://kvpack-test/raw.kvpack", "--layer", "1"], environment: cold)
        // (What it fetched is measured in-process below.)
        #expect(s == 0)
        #expect(err.contains("fetched"), "\(err)")
        let size = fileBytes(raw).count
        let remote = try RemoteFiles.reader(S3Location(bucket: "kvpack-test", key: "raw.kvpack"), client: client,
                                            cache: RemoteCache(directory: nil))
        _ = try remote.attend(layer: 1, kvHead: 0, queries: [Float](repeating: 0.01, count: remote.geometry.groupSize * remote.geometry.headDim))
        let stats = remote.file.remoteStatistics!
        #expect(stats.bytes < size / 2, "\(stats.bytes) of \(size) bytes for one head of one layer")
    }

    @Test("chat --resume s3:// continues a SmolLM2 conversation exactly as a local resume does and publishes each turn (server-side copy + new bytes); another machine continues it; a stale writer never overwrites")
    func chatOverS3() throws {
        guard !smolLM2Missing else { print("chatOverS3: \(smolLM2SkipNote)"); return }
        guard Self.startOrSkip("chatOverS3") else { return }
        defer { _ = Self.server("stop"); try? FileManager.default.removeItem(atPath: Self.dir) }
        let dir = temporaryDirectory()
        let client = try Self.client()
        try client.createBucket("kvpack-test")
        // raw:f32 so that a short chat is over the 5 MiB a copied part needs.
        let start = dir + "/start.kvpack"
        let (s0, _, e0) = try runKVPack(["chat", "--save", start, "--scheme", "raw:f32", "--temperature", "0", "--max-tokens", "90",
                                         "--message", "Name three rivers in Europe and say one thing about each."])
        try #require(s0 == 0, "\(e0)")
        try #require(fileBytes(start).count > ObjectTransfer.minimumPartSize)
        let location = S3Location(bucket: "kvpack-test", key: "chats/rivers.kvpack")
        _ = try ObjectTransfer.push(file: start, to: location, client: client)

        let turn = ["--temperature", "0", "--max-tokens", "24", "--message", "Which one is the longest?"]
        let copy = dir + "/copy.kvpack"
        try FileManager.default.copyItem(atPath: start, toPath: copy)
        let (ls, lo, le) = try runKVPack(["chat", "--resume", copy] + turn)
        #expect(ls == 0, "\(le)")
        let machineA = Self.environment(dir + "/a")
        let (rs, ro, re) = try runKVPack(["chat", "--resume", location.description] + turn, environment: machineA)
        #expect(rs == 0, "\(re)")
        #expect(lo == ro && !ro.isEmpty, "local reply \(lo) vs remote \(ro)")
        #expect(re.contains("downloaded") && re.contains("published to \(location)") && re.contains("copied on the server"), "\(re)")
        let object = try RemoteFiles.reader(location, client: client, cache: RemoteCache(directory: nil))
        let local = try KVPackReader(path: copy)
        #expect(try object.tokenIDs == local.tokenIDs && object.recoveryNotes.isEmpty)
        #expect(Validator.validate(file: object.file, path: location.description, deep: true).isValid)

        // Machine B continues the object; machine A, resuming again, sees B's turn (its copy is
        // stale: downloaded again) and adds its own. A reader opened before B published keeps
        // reading its own commit from the new object (it starts with the old one's bytes).
        let before = try RemoteFiles.reader(location, client: client, cache: RemoteCache(directory: nil, coalesceGap: 0))
        let machineB = Self.environment(dir + "/b")
        let (bs, _, be) = try runKVPack(["chat", "--resume", location.description, "--temperature", "0", "--max-tokens", "8",
                                         "--message", "Thanks!"], environment: machineB)
        #expect(bs == 0 && be.contains("downloaded"), "\(be)")
        #expect(try before.tokenIDs == local.tokenIDs)
        for layer in [3, 29] {
            #expect(try before.decode(layer: layer, kvHead: 2, kind: .value) == local.decode(layer: layer, kvHead: 2, kind: .value))
        }
        #expect(before.recoveryNotes.isEmpty && (before.file.remoteStatistics?.requests ?? 0) > 2)
        let (as2, _, ae2) = try runKVPack(["chat", "--resume", location.description, "--temperature", "0", "--max-tokens", "8",
                                           "--message", "Bye."], environment: machineA)
        #expect(as2 == 0 && ae2.contains("downloaded") && ae2.contains("published"), "\(ae2)")
        let (is0, transcript, _) = try runKVPack(["info", location.description, "--text"], environment: machineB)
        #expect(is0 == 0 && transcript.contains("Thanks!") && transcript.contains("Bye."))
        // Unchanged since A last published: A resumes without a download.
        let (as3, _, ae3) = try runKVPack(["generate", "--resume", location.description, "--steps", "2"], environment: machineA)
        #expect(as3 == 0 && ae3.contains("no download") && ae3.contains("published"), "\(ae3)")

        // Two writers from the same version: the second to publish is refused, the object keeps
        // the first one's turn, and the second's turn stays in its local file.
        let one = try RemoteConversation(location, client: client, directory: dir + "/one")
        let two = try RemoteConversation(location, client: client, directory: dir + "/two")
        for (c, id) in [(one, 11), (two, 22)] {
            let w = try KVPackWriter.resume(path: c.path)
            let g = w.manifest.geometry
            try w.append(tokenIDs: [UInt32(id)], keys: [Float](repeating: 0.5, count: g.streamCount / 2 * g.headDim),
                         values: [Float](repeating: 0.25, count: g.streamCount / 2 * g.headDim), layout: .layerTokenHead(g, tokens: 1))
            try w.close()
        }
        #expect(try one.publish() != nil)
        #expect { try two.publish() } throws: { "\($0)".contains("another writer published") && "\($0)".contains(two.path) }
        let after = try RemoteFiles.reader(location, client: client, cache: RemoteCache(directory: nil))
        #expect(try after.tokenIDs.last == 11)
        #expect(try KVPackReader(path: two.path).tokenIDs.last == 22)
        // Resuming again where the refused turn is: the object's version is fetched, and the
        // unpublished file is kept beside it, not overwritten.
        let again = try RemoteConversation(location, client: client, directory: dir + "/two")
        #expect(try KVPackReader(path: again.path).tokenIDs.last == 11)
        let aside = try #require(again.unpublished)
        #expect(try KVPackReader(path: aside).tokenIDs.last == 22)
    }
}

extension S3ServerTests {
    /// Starts scripts/s3-fault-proxy.py in front of the test server; returns its port, or nil.
    static func startProxy(pidFile: String) -> Int? {
        let proxyPort = port + 1
        let status = system("python3 '\(packageRoot)/scripts/s3-fault-proxy.py' \(proxyPort) \(port) '\(pidFile)' > /dev/null 2>&1 < /dev/null &")
        guard status == 0 else { return nil }
        for _ in 0 ..< 100 {
            if (try? Data(contentsOf: URL(string: "http://127.0.0.1:\(proxyPort)/__faults__/none/0")!)) != nil { return proxyPort }
            usleep(50_000)
        }
        return nil
    }

    /// The next `count` GETs through the proxy fail as `kind` says (503, truncate, cut, none).
    static func inject(_ kind: String, _ count: Int, proxyPort: Int) throws {
        _ = try Data(contentsOf: URL(string: "http://127.0.0.1:\(proxyPort)/__faults__/\(kind)/\(count)")!)
    }

    @Test("publishing copies a previous version larger than a copy part in several parts; the object is then the file, byte for byte")
    func publishInCopyParts() throws {
        guard Self.startOrSkip("publishInCopyParts") else { return }
        defer { _ = Self.server("stop"); try? FileManager.default.removeItem(atPath: Self.dir) }
        let dir = temporaryDirectory()
        let path = dir + "/big.kvpack"
        let (s, _, e) = try runKVPack(["synth", path, "--model", "llama-3-8b", "--layers", "3", "--tokens", "1100"])
        try #require(s == 0, "\(e)")
        let client = try Self.client()
        try client.createBucket("kvpack-test")
        let location = S3Location(bucket: "kvpack-test", key: "big.kvpack")
        _ = try ObjectTransfer.push(file: path, to: location, client: client)
        let before = try RemoteConversation.sizeAndHash(path)
        #expect(before.size > 2 * ObjectTransfer.minimumPartSize)
        let previous = PublishedVersion(etag: try client.head(location).etag ?? "", size: before.size, hash: before.hash)
        let (a, _, ae) = try runKVPack(["synth", path, "--model", "llama-3-8b", "--layers", "3", "--tokens", "40", "--resume"])
        try #require(a == 0, "\(ae)")
        let (report, version) = try ObjectTransfer.publish(file: path, to: location, client: client, previous: previous,
                                                           copyPartSize: before.size / 2 + 1)
        #expect(report.parts == 3 && report.copiedBytes == before.size && report.uploadedBytes == fileBytes(path).count - before.size)
        #expect(version.size == fileBytes(path).count)
        #expect(try client.get(location, range: 0 ..< version.size) == Data(fileBytes(path)))
    }

    @Test("a published part whose MD5 ETag does not match the bytes sent is an error; ETags that are not MD5s are not judged")
    func partChecks() throws {
        let bytes: [UInt8] = Array("the new turn".utf8)
        let location = S3Location(bucket: "b", key: "k")
        try bytes.withUnsafeBytes { part in
            let md5 = Insecure.MD5.hash(data: part).map { String(format: "%02x", $0) }.joined()
            try ObjectTransfer.checkPart("\"\(md5)\"", part, at: 0, location: location, file: "f")
            try ObjectTransfer.checkPart("\"not-an-md5-etag\"", part, at: 0, location: location, file: "f")
            #expect { try ObjectTransfer.checkPart("\"00000000000000000000000000000000\"", part, at: 40, location: location, file: "f") } throws: {
                "\($0)".contains("bytes 40..<52") && "\($0)".contains("damaged on the way")
            }
        }
    }

    @Test("faults: 503s and cut or short bodies are retried, then reported; the server stopped mid-read is an error naming the object and reading goes on when it is back; flipped bytes in the object are an error, never data")
    func faultsOverS3() throws {
        guard Self.startOrSkip("faultsOverS3") else { return }
        let dir = temporaryDirectory()
        let pidFile = dir + "/proxy.pid"
        defer {
            if let pid = try? String(contentsOfFile: pidFile, encoding: .utf8), let p = Int32(pid) { kill(p, SIGKILL) }
            _ = Self.server("stop")
            try? FileManager.default.removeItem(atPath: Self.dir)
        }
        let path = try Self.file(dir)
        let local = try KVPackReader(path: path)
        let bytes = fileBytes(path)
        let client = try Self.client()
        try client.createBucket("kvpack-test")
        let location = S3Location(bucket: "kvpack-test", key: "f.kvpack")
        _ = try ObjectTransfer.push(file: path, to: location, client: client)
        let g = local.geometry
        let queries = (0 ..< g.groupSize * g.headDim).map { Float($0 % 7) * 0.03 }

        guard let proxyPort = Self.startProxy(pidFile: pidFile) else {
            Issue.record("the fault proxy (scripts/s3-fault-proxy.py) did not start")
            return
        }
        let proxied = S3Client(configuration: S3Configuration(accessKey: "test:tester", secretKey: "testing",
                                                              endpoint: URL(string: "http://127.0.0.1:\(proxyPort)")!), timeout: 10)
        proxied.retries = 2
        proxied.backoff = 0.02
        let first = Data(bytes[0 ..< 5000])
        for kind in ["503", "truncate", "cut"] {
            try Self.inject(kind, 2, proxyPort: proxyPort)
            #expect(try proxied.get(location, range: 0 ..< 5000) == first, "\(kind) twice, then the right bytes")
        }
        try Self.inject("503", 10, proxyPort: proxyPort)
        #expect { try proxied.get(location, range: 0 ..< 5000) } throws: { "\($0)".contains("HTTP 503") && "\($0)".contains("3 attempts") }
        try Self.inject("truncate", 10, proxyPort: proxyPort)
        #expect { try proxied.get(location, range: 0 ..< 5000) } throws: { "\($0)".contains("truncated response") && "\($0)".contains("3 attempts") }
        try Self.inject("none", 0, proxyPort: proxyPort)

        // Through a reader: faults inside its batches of requests are retried and the answers
        // stay exact; a fault that persists is an error naming the object; then it goes on.
        let reader = try RemoteFiles.reader(location, client: proxied, cache: RemoteCache(directory: nil, coalesceGap: 0))
        for (layer, kind) in [(2, "503"), (1, "cut"), (0, "truncate")] {
            try Self.inject(kind, 2, proxyPort: proxyPort)
            #expect(try reader.attend(layer: layer, kvHead: 1, queries: queries) == local.attend(layer: layer, kvHead: 1, queries: queries), "\(kind)")
        }
        try Self.inject("503", 1000, proxyPort: proxyPort)
        #expect { try reader.attend(layer: 0, kvHead: 6, queries: queries) } throws: {
            let e = $0 as? KVPackError
            return e?.code == .io && "\($0)".contains("s3://kvpack-test/f.kvpack") && "\($0)".contains("HTTP 503")
        }
        try Self.inject("none", 0, proxyPort: proxyPort)
        #expect(try reader.attend(layer: 0, kvHead: 6, queries: queries) == local.attend(layer: 0, kvHead: 6, queries: queries))

        // Flipped bytes in the object: an error naming the checksum, from attend and validate.
        var damaged = bytes
        let stream = g.stream(layer: 2, kvHead: 5, kind: .value)
        let block = Int(try local.blockOffset(segment: 1, stream: stream)) + FrameHeader.size + 99
        damaged[block] ^= 0x04
        try client.put(S3Location(bucket: "kvpack-test", key: "bad.kvpack"), data: Data(damaged))
        let env = Self.environment(dir)
        let (as0, _, ae) = try runKVPack(["attend", "s3://kvpack-test/bad.kvpack", "--layer", "2", "--head", "5"], environment: env)
        #expect(as0 != 0 && ae.contains("checksumMismatch") && ae.contains("fetched twice"), "\(ae)")
        let (vs, vo, _) = try runKVPack(["validate", "s3://kvpack-test/bad.kvpack", "--deep"], environment: env)
        #expect(vs == 1 && vo.contains("INVALID") && vo.contains("BLCK.payloadChecksum"), "\(vo)")

        // The server stops between two reads: bounded retries, an error naming the object; when
        // it is back the same reader reads on.
        let direct = try Self.client(retries: 1)
        let open = try RemoteFiles.reader(location, client: direct, cache: RemoteCache(directory: nil))
        #expect(try open.attend(layer: 0, kvHead: 0, queries: queries) == local.attend(layer: 0, kvHead: 0, queries: queries))
        _ = Self.server("stop")
        let stopped = Date()
        #expect { try open.attend(layer: 1, kvHead: 2, queries: queries) } throws: { "\($0)".contains("s3://kvpack-test/f.kvpack") }
        #expect(Date().timeIntervalSince(stopped) < 20)
        try #require(Self.server("start").0 == 0)
        // A server just started may answer 503 for a moment while its backends warm up: the
        // retries a real client keeps are what carry the reader over that.
        direct.retries = 4
        #expect(try open.attend(layer: 1, kvHead: 2, queries: queries) == local.attend(layer: 1, kvHead: 2, queries: queries))
    }
}
