/// Every buffer the library fills in place: 64-byte aligned (payloads and SIMD rows are), owned
/// here and freed when the value goes away. ~Copyable, so a buffer has exactly one owner.

/// A grow-only float buffer, 64-byte aligned.
struct GrowableFloats: ~Copyable {
    private(set) var pointer: UnsafeMutablePointer<Float>
    private(set) var capacity: Int

    init() {
        capacity = 16
        pointer = UnsafeMutableRawPointer.allocate(byteCount: 64, alignment: 64).bindMemory(to: Float.self, capacity: 16)
    }

    mutating func reserve(_ count: Int) {
        guard count > capacity else { return }
        UnsafeMutableRawPointer(pointer).deallocate()
        capacity = max(count, capacity * 2)
        pointer = UnsafeMutableRawPointer.allocate(byteCount: 4 * capacity, alignment: 64)
            .bindMemory(to: Float.self, capacity: capacity)
    }

    deinit { UnsafeMutableRawPointer(pointer).deallocate() }
}

/// A grow-only byte buffer, 64-byte aligned.
struct GrowableBytes: ~Copyable {
    private(set) var pointer: UnsafeMutableRawPointer
    private(set) var capacity: Int

    init() {
        capacity = 64
        pointer = UnsafeMutableRawPointer.allocate(byteCount: 64, alignment: 64)
    }

    mutating func reserve(_ count: Int) {
        guard count > capacity else { return }
        pointer.deallocate()
        capacity = max(count, capacity * 2)
        pointer = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 64)
    }

    deinit { pointer.deallocate() }
}

/// A fixed-size float buffer, zero-filled, 64-byte aligned.
struct AlignedFloats: ~Copyable {
    let pointer: UnsafeMutablePointer<Float>
    let count: Int

    init(count: Int) {
        self.count = count
        pointer = UnsafeMutableRawPointer.allocate(byteCount: max(4 * count, 64), alignment: 64)
            .bindMemory(to: Float.self, capacity: max(count, 16))
        pointer.initialize(repeating: 0, count: max(count, 16))
    }

    deinit { UnsafeMutableRawPointer(pointer).deallocate() }
}

/// A fixed-size byte buffer, 64-byte aligned (contents undefined until written).
struct AlignedBytes: ~Copyable {
    let pointer: UnsafeMutableRawPointer
    let count: Int

    init(count: Int) {
        self.count = count
        pointer = UnsafeMutableRawPointer.allocate(byteCount: max(count, 64), alignment: 64)
    }

    var buffer: UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(start: pointer, count: count) }

    deinit { pointer.deallocate() }
}
