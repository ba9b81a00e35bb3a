/// Result of `Validator.validate`: every problem found, with file offset and field.
public struct ValidationReport: Sendable, Codable {
    public enum Severity: String, Sendable, Codable {
        /// The file breaks the format: exit status 1.
        case error
        /// The committed state is intact but something needs attention (uncommitted bytes).
        case warning
    }

    public struct Problem: Sendable, Codable, CustomStringConvertible {
        public var severity: Severity
        public var code: String
        public var offset: UInt64?
        public var field: String?
        public var message: String

        init(_ severity: Severity, _ error: KVPackError) {
            self.severity = severity
            code = error.code.rawValue
            offset = error.offset
            field = error.field
            message = error.message
        }

        public var description: String {
            var s = "\(severity): "
            if let offset { s += "offset \(offset) (0x\(String(offset, radix: 16))) " }
            if let field { s += "\(field): " }
            return s + message + " [\(code)]"
        }
    }

    public var path: String
    public var deep: Bool
    public var fileSize: Int
    public var version: String?
    public var tokenCount: Int?
    public var framesWalked = 0
    public var blocksChecked = 0
    public var tailRowsChecked = 0
    public var valuesChecked = 0
    /// Bytes of superseded frames (older index frames, tail rows now sealed) in the committed region.
    public var supersededBytes = 0
    public var problems: [Problem] = []

    public var isValid: Bool { !problems.contains { $0.severity == .error } }

    /// Records a problem once (the frame walk and the block check can meet the same bad bytes).
    mutating func add(_ severity: Severity, _ error: KVPackError) {
        let p = Problem(severity, error)
        if !problems.contains(where: { $0.code == p.code && $0.offset == p.offset && $0.field == p.field }) {
            problems.append(p)
        }
    }
}

/// Checks a file against Spec/: structure, bounds, alignment, checksums, version, index
/// consistency, scheme parameters; with `deep`, decodes every block and tail row and checks for
/// NaN/Inf. Never traps, whatever the bytes.
public enum Validator {
    public static func validate(file: MappedFile, path: String, deep: Bool = false) -> ValidationReport {
        var report = ValidationReport(path: path, deep: deep, fileSize: file.bytes.count)
        let bytes = file.bytes
        let header: FileHeader
        do {
            header = try FileHeader.decode(bytes)
            report.version = "\(header.major).\(header.minor)"
        } catch let e as KVPackError {
            report.add(.error, e)
            return report
        } catch {
            return report
        }

        let reader: KVPackReader?
        do {
            let r = try KVPackReader(file: file, path: path)
            reader = r
            report.tokenCount = r.tokenCount
            for note in r.recoveryNotes {
                switch note {
                case let .uncommittedBytes(after, count):
                    report.add(.warning, KVPackError(.truncated, offset: after + UInt64(FrameHeader.size), field: "CMIT",
                                                     "\(count) bytes after the last commit are not committed (an interrupted writer's torn tail); readers ignore them and a resuming writer truncates them"))
                case let .skippedCommit(offset, reason):
                    var e = reason
                    e.message = "newer commit at \(offset) is damaged and was skipped: " + e.message
                    report.add(.error, e)
                case let .tornCommit(offset, reason):
                    var e = reason
                    e.message = "commit frame at \(offset) is torn or damaged and was skipped (a crash while writing it, or corruption): " + e.message
                    report.add(.warning, e)
                }
            }
        } catch let e as KVPackError {
            report.add(.error, e)
            reader = nil
        } catch {
            reader = nil
        }

        let walkEnd = reader.map { $0.state.commitEnd } ?? UInt64(bytes.count)
        // The walk reads every byte: a remote object is fetched whole first, in large requests.
        do {
            try file.ensure(0 ..< Int(walkEnd))
        } catch let e as KVPackError {
            report.add(.error, e)
            return report
        } catch {}
        let frames = walkFrames(file, salt: header.salt, end: walkEnd, report: &report)
        guard let reader else { return report }
        checkReferences(reader, frames: frames, report: &report)
        checkBlocks(reader, deep: deep, report: &report)
        do { _ = try reader.tokenSelection() } catch let e as KVPackError { report.add(.error, e) } catch {}
        do { _ = try reader.metadataNotes() } catch let e as KVPackError { report.add(.error, e) } catch {}
        return report
    }

    /// Walks every frame from the manifest to `end`, verifying headers and payload checksums.
    /// After a damaged header it resynchronises on the next 64-byte boundary whose header
    /// verifies (the offset-seeded checksum makes false matches negligible).
    static func walkFrames(_ file: MappedFile, salt: UInt64, end: UInt64,
                           report: inout ValidationReport) -> [UInt64: (tag: FrameTag, size: Int)] {
        let bytes = file.bytes
        var frames: [UInt64: (tag: FrameTag, size: Int)] = [:]
        var offset = UInt64(FileHeader.size)
        let align = UInt64(FileHeader.frameAlignment)
        var released = 0
        while offset + UInt64(FrameHeader.size) <= end {
            // Pages behind the walk are done with; keep a large file from staying resident.
            if Int(offset) - released > 16 << 20 {
                file.releasePages(released ..< Int(offset))
                released = Int(offset)
            }
            do {
                let h = try FrameHeader.decode(bytes, at: offset, limit: end, salt: salt, field: "frame")
                report.framesWalked += 1
                frames[offset] = (h.tag, Int(h.nextFrameOffset - offset))
                if !FrameTag.known.contains(h.tag) {
                    if h.tag.isCritical {
                        report.add(.error, KVPackError(.unknownCriticalFrame, offset: offset, field: "frame.tag",
                                                       "critical frame kind \(h.tag) is unknown to this reader"))
                    }
                }
                do { try h.verifyPayload(in: bytes, field: "\(h.tag)") } catch let e as KVPackError { report.add(.error, e) }
                offset = h.nextFrameOffset
            } catch let e as KVPackError {
                report.add(.error, e)
                offset += align
                while offset + UInt64(FrameHeader.size) <= end,
                      (try? FrameHeader.decode(bytes, at: offset, limit: end, salt: salt)) == nil {
                    offset += align
                }
            } catch {
                return frames
            }
        }
        return frames
    }

    /// Every frame the commit references must start where the linear walk found a frame of the
    /// expected kind (an index entry may not point into another frame's payload).
    static func checkReferences(_ reader: KVPackReader, frames: [UInt64: (tag: FrameTag, size: Int)], report: inout ValidationReport) {
        let s = reader.state
        var referenced: Set<UInt64> = [UInt64(FileHeader.size), s.commitOffset]
        func expect(_ offset: UInt64, _ tag: FrameTag, _ what: String) {
            referenced.insert(offset)
            if frames[offset]?.tag != tag {
                report.add(.error, KVPackError.invalid(offset, "\(tag)", "\(what) at \(offset) is not a \(tag) frame found by the linear walk"))
            }
        }
        for link in s.chain { expect(link.offset, .index, "index frame") }
        for p in s.tail { expect(p.frameOffset, .delta, "tail run") }
        if let sink = s.sink { expect(sink.frameOffset, .sink, "sink run") }
        for (id, offset) in s.blobFrames { expect(offset, .blob, "blob \(id)") }
        for offset in s.blockOffsets { expect(offset, .block, "block") }
        for (segment, table) in s.segmentTables.enumerated() {
            expect(table, .segmentTable, "segment table \(segment)")
            for stream in 0 ..< reader.geometry.streamCount {
                do {
                    expect(try reader.blockOffset(segment: segment, stream: stream), .block, "block")
                } catch let e as KVPackError {
                    report.add(.error, e)
                    break
                } catch { break }
            }
        }
        if let offset = s.selectionOffset { expect(offset, TokenSelection.tag, "token selection") }
        for offset in s.metadataNotes { expect(offset, MetadataNote.tag, "metadata note") }
        report.supersededBytes = frames.filter { !referenced.contains($0.key) }.reduce(0) { $0 + $1.value.size }
    }

    static func checkBlocks(_ reader: KVPackReader, deep: Bool, report: inout ValidationReport) {
        let g = reader.geometry
        let workspace = AttentionWorkspace()
        let c = reader.segmentTokens
        let rows = workspace.decodeBuffer(c * g.headDim)
        for segment in 0 ..< reader.sealedTokenCount / c {
            for stream in 0 ..< g.streamCount {
                do {
                    let payload = try reader.blockPayload(segment: segment, stream: stream, workspace: workspace)
                    report.blocksChecked += 1
                    if deep {
                        let scheme = reader.streamSchemes[stream]
                        scheme.decode(block: payload, tokens: 0 ..< c, into: rows)
                        checkFinite(rows, c * g.headDim, first: segment * c, stream: stream, reader: reader,
                                    at: (try? reader.blockOffset(segment: segment, stream: stream)) ?? 0, report: &report)
                    }
                } catch let e as KVPackError {
                    report.add(.error, e)
                } catch {}
            }
            reader.releasePages(segment: segment)
        }
        guard deep else { return }
        for p in reader.state.runs {
            for stream in 0 ..< g.streamCount {
                let kernel = reader.tailKernels[reader.manifest.scheme(forStream: stream)]
                kernel.decode(block: reader.tailRows(run: p, stream: stream), tokens: 0 ..< p.tokenCount, into: rows)
                checkFinite(rows, p.tokenCount * g.headDim, first: p.tokenStart, stream: stream, reader: reader,
                            at: p.frameOffset, report: &report)
                report.tailRowsChecked += p.tokenCount
            }
        }
    }

    static func checkFinite(_ rows: UnsafePointer<Float>, _ count: Int, first: Int, stream: Int, reader: KVPackReader,
                            at offset: UInt64, report: inout ValidationReport) {
        report.valuesChecked += count
        for i in 0 ..< count where !rows[i].isFinite {
            let token = first + i / reader.geometry.headDim
            report.add(.error, KVPackError(.corruptPayload, offset: offset, field: "payload",
                                           "\(reader.geometry.streamID(stream)) token \(token) channel \(i % reader.geometry.headDim) decodes to \(rows[i])"))
            return
        }
    }
}
