import CZstd

/// libzstd, one frame per compressed block (Spec/: "Compressed payloads").
enum Zstd {
    final class Compressor {
        private let cctx: OpaquePointer
        let level: Int32
        private(set) var output: UnsafeMutableRawPointer
        private var capacity: Int

        init(level: Int32) {
            cctx = ZSTD_createCCtx()
            self.level = level
            capacity = 1 << 16
            output = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 64)
        }

        deinit {
            ZSTD_freeCCtx(cctx)
            output.deallocate()
        }

        /// Compresses into the internal buffer; the result is valid until the next call.
        func compress(_ src: UnsafeRawBufferPointer) throws -> UnsafeRawBufferPointer {
            let bound = ZSTD_compressBound(src.count)
            if bound > capacity {
                output.deallocate()
                capacity = bound
                output = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 64)
            }
            let n = ZSTD_compressCCtx(cctx, output, capacity, src.baseAddress, src.count, level)
            guard ZSTD_isError(n) == 0 else {
                throw KVPackError(.io, "zstd compression failed: \(String(cString: ZSTD_getErrorName(n)))")
            }
            return UnsafeRawBufferPointer(start: output, count: n)
        }
    }

    final class Decompressor {
        private let dctx: OpaquePointer

        init() { dctx = ZSTD_createDCtx() }
        deinit { ZSTD_freeDCtx(dctx) }

        /// Decompresses `parts` consecutive frames (one, unless a scheme compresses byte planes
        /// separately), frame i expanding to exactly part i of `out` (`out.count / parts` bytes
        /// each); nothing may follow the last frame.
        func decompress(_ src: UnsafeRawBufferPointer, into out: UnsafeMutableRawBufferPointer, parts: Int = 1,
                        offset: UInt64, field: String) throws {
            guard parts > 1 else { return try decompressFrame(src, into: out, offset: offset, field: field) }
            let size = out.count / parts
            var at = 0
            for i in 0 ..< parts {
                let rest = UnsafeRawBufferPointer(rebasing: src[at...])
                let frameSize = ZSTD_findFrameCompressedSize(rest.baseAddress, rest.count)
                guard ZSTD_isError(frameSize) == 0, frameSize <= rest.count, i < parts - 1 || frameSize == rest.count else {
                    throw KVPackError(.corruptPayload, offset: offset + UInt64(at), field: field,
                                      "payload is not exactly \(parts) zstd frames (frame \(i) \(ZSTD_isError(frameSize) == 0 ? "leaves bytes after the last" : "is damaged"))")
                }
                try decompressFrame(UnsafeRawBufferPointer(rebasing: rest[..<frameSize]),
                                    into: UnsafeMutableRawBufferPointer(rebasing: out[i * size ..< (i + 1) * size]),
                                    offset: offset + UInt64(at), field: field)
                at += frameSize
            }
        }

        /// Decompresses exactly one frame that must expand to exactly `out.count` bytes.
        private func decompressFrame(_ src: UnsafeRawBufferPointer, into out: UnsafeMutableRawBufferPointer,
                                     offset: UInt64, field: String) throws {
            let frameSize = ZSTD_findFrameCompressedSize(src.baseAddress, src.count)
            guard ZSTD_isError(frameSize) == 0, frameSize == src.count else {
                throw KVPackError(.corruptPayload, offset: offset, field: field,
                                  "payload is not exactly one zstd frame")
            }
            let declared = ZSTD_getFrameContentSize(src.baseAddress, src.count)
            // ZSTD_CONTENTSIZE_UNKNOWN / _ERROR are the two largest UInt64 values.
            if declared < UInt64.max - 1, declared != UInt64(out.count) {
                throw KVPackError(.corruptPayload, offset: offset, field: field,
                                  "zstd frame declares \(declared) bytes, the block needs \(out.count)")
            }
            let n = ZSTD_decompressDCtx(dctx, out.baseAddress, out.count, src.baseAddress, src.count)
            guard ZSTD_isError(n) == 0 else {
                throw KVPackError(.corruptPayload, offset: offset, field: field,
                                  "zstd: \(String(cString: ZSTD_getErrorName(n)))")
            }
            guard n == out.count else {
                throw KVPackError(.corruptPayload, offset: offset, field: field,
                                  "zstd frame expands to \(n) bytes, the block needs \(out.count)")
            }
        }
    }
}
