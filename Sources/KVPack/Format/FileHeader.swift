/// The 64 bytes at offset 0 (Spec/: "File header").
public struct FileHeader: Sendable, Equatable {
    public static let size = 64
    /// `\x89 K V P \r \n \x1a \n`: the high byte catches 7-bit transports, CR LF and LF catch
    /// newline conversion, 0x1A stops DOS `type` (the PNG signature's reasoning).
    public static let magic: [UInt8] = [0x89, 0x4B, 0x56, 0x50, 0x0D, 0x0A, 0x1A, 0x0A]
    /// The major version new files are written in (Spec/ 15: 2.0 made opening constant-time).
    public static let currentMajor: UInt16 = 2
    /// Every major version this library reads (and can append to). Each file records the lowest
    /// minor version of its major that it needs (1.0 to 1.5; 2.0 or 2.1).
    public static let supportedMajors: ClosedRange<UInt16> = 1 ... 2
    /// Frames start on multiples of this, so payloads (64 bytes after a frame start) are
    /// 64-byte aligned in a mapping of the file.
    public static let frameAlignment = 64

    public var major: UInt16
    public var minor: UInt16
    /// Random per file. Seeds every frame-header checksum together with the frame's offset, so
    /// a frame copied to another offset or another file does not verify.
    public var salt: UInt64

    public init(major: UInt16 = FileHeader.currentMajor, minor: UInt16, salt: UInt64) {
        self.major = major
        self.minor = minor
        self.salt = salt
    }

    public func encoded() -> [UInt8] {
        var w = ByteWriter(capacity: Self.size)
        w.write(bytes: Self.magic)
        w.write(major)
        w.write(minor)
        w.write(UInt32(Self.size))
        w.write(UInt32(Self.frameAlignment))
        w.write(UInt32(0))          // fileFlags
        w.write(salt)
        w.write(zeros: 24)          // reserved
        let sum = w.bytes.withUnsafeBytes { Checksum.xxh3(UnsafeRawBufferPointer(rebasing: $0[0 ..< 56])) }
        w.write(sum)
        return w.bytes
    }

    /// Validation order matters: magic first (is this KVPack at all?), then the major version
    /// (a future major may lay the header out differently), then the checksum, then the rest.
    public static func decode(_ bytes: UnsafeRawBufferPointer) throws -> FileHeader {
        guard bytes.count >= 8 else {
            throw KVPackError.truncated(0, "header.magic", need: UInt64(size), have: UInt64(bytes.count))
        }
        guard bytes.prefix(8).elementsEqual(magic) else {
            throw KVPackError(.badMagic, offset: 0, field: "header.magic",
                              "not a KVPack file (first bytes \(hex(bytes.prefix(8))))")
        }
        guard bytes.count >= size else {
            throw KVPackError.truncated(0, "header", need: UInt64(size), have: UInt64(bytes.count))
        }
        let major = bytes.loadLE(8, as: UInt16.self)
        let minor = bytes.loadLE(10, as: UInt16.self)
        guard supportedMajors.contains(major) else {
            throw KVPackError(.unsupportedVersion, offset: 8, field: "header.major",
                              "file is KVPack \(major).\(minor); this reader implements major versions \(supportedMajors.lowerBound) to \(supportedMajors.upperBound)")
        }
        let stored = bytes.loadLE(56, as: UInt64.self)
        let actual = Checksum.xxh3(UnsafeRawBufferPointer(rebasing: bytes[0 ..< 56]))
        guard Checksum.matches(stored, actual) else {
            throw KVPackError(.checksumMismatch, offset: 56, field: "header.checksum",
                              "stored \(hex64(stored)), computed \(hex64(actual))")
        }
        let headerSize = bytes.loadLE(12, as: UInt32.self)
        guard headerSize == size else {
            throw KVPackError.invalid(12, "header.headerSize", "is \(headerSize), must be 64")
        }
        let alignment = bytes.loadLE(16, as: UInt32.self)
        guard alignment == frameAlignment else {
            throw KVPackError.invalid(16, "header.frameAlignment", "is \(alignment), must be 64")
        }
        let flags = bytes.loadLE(20, as: UInt32.self)
        guard flags == 0 else {
            throw KVPackError.invalid(20, "header.fileFlags",
                                      "has unknown bits \(hex64(UInt64(flags))); no file flags are defined")
        }
        return FileHeader(major: major, minor: minor, salt: bytes.loadLE(24, as: UInt64.self))
    }
}

func hex(_ bytes: some Sequence<UInt8>) -> String {
    bytes.map { String($0, radix: 16).leftPadded(to: 2) }.joined(separator: " ")
}

func hex64(_ v: UInt64) -> String { "0x" + String(v, radix: 16).leftPadded(to: 16) }

extension String {
    func leftPadded(to width: Int, with pad: Character = "0") -> String {
        count >= width ? self : String(repeating: pad, count: width - count) + self
    }
}
