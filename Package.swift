// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "KVPack",
    products: [
        .library(name: "KVPack", targets: ["KVPack"]),
        .library(name: "KVPackModels", targets: ["KVPackModels"]),
        .library(name: "KVPackInterop", targets: ["KVPackInterop"]),
        .executable(name: "kvpack", targets: ["kvpack"]),
        // The C ABI (include/kvpack.h) as one shared library, for Python and other languages.
        .library(name: "KVPackC", type: .dynamic, targets: ["KVPackC"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        // HMAC-SHA256 and SHA-256 for S3 request signing (SigV4).
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
    ],
    targets: [
        .systemLibrary(name: "CZstd", path: "Sources/CZstd"),
        .systemLibrary(name: "CXXHash", path: "Sources/CXXHash"),
        // Hot loops in C with per-function target attributes and run-time dispatch (AVX2, FMA,
        // F16C where the CPU has them, portable C elsewhere); no flags beyond the defaults.
        .target(name: "CKVKernels", path: "Sources/CKVKernels"),
        // The runner's worker pool (pthreads; spins briefly, then sleeps).
        .target(name: "CKVWorkers", path: "Sources/CKVWorkers"),
        .target(
            name: "KVPack",
            dependencies: ["CZstd", "CXXHash", "CKVKernels"],
            path: "Sources/KVPack"
        ),
        .target(
            name: "KVPackModels",
            dependencies: ["KVPack", "CKVKernels", "CKVWorkers"],
            path: "Sources/KVPackModels"
        ),
        // Lab code: synthetic caches, model presets, the torture harness. Not a product: the
        // shipped library carries none of it; the CLI, the tests and the fuzzers use it.
        .target(
            name: "KVPackLab",
            dependencies: ["KVPack"],
            path: "Sources/KVPackLab"
        ),
        // Object storage: SigV4, an S3 client, push/pull of whole files.
        .target(
            name: "KVPackRemote",
            dependencies: ["KVPack", .product(name: "Crypto", package: "swift-crypto")],
            path: "Sources/KVPackRemote"
        ),
        .target(
            name: "KVPackInterop",
            dependencies: ["KVPack", "KVPackModels"],
            path: "Sources/KVPackInterop"
        ),
        // The C ABI: the header (include/kvpack.h, a link to Sources/CKVPackABI/include) as a C
        // target, so the Swift entry points take the very structs C callers see.
        .target(name: "CKVPackABI", path: "Sources/CKVPackABI"),
        .target(
            name: "KVPackC",
            dependencies: ["KVPack", "CKVPackABI"],
            path: "Sources/KVPackC"
        ),
        .executableTarget(
            name: "kvpack",
            dependencies: [
                "KVPack",
                "KVPackModels",
                "KVPackInterop",
                "KVPackLab",
                "KVPackRemote",
                "CKVKernels",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            path: "Sources/kvpack"
        ),
        .testTarget(
            name: "KVPackTests",
            dependencies: ["KVPack", "KVPackModels", "KVPackInterop", "KVPackLab", "KVPackRemote", "CKVKernels", "CKVWorkers", "kvpack"],
            path: "Tests/KVPackTests"
        ),
    ]
)
