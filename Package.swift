// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "KVPack",
    products: [
        .library(name: "KVPack", targets: ["KVPack"]),
        .library(name: "KVPackModels", targets: ["KVPackModels"]),
        .library(name: "KVPackInterop", targets: ["KVPackInterop"]),
        .executable(name: "kvpack", targets: ["kvpack"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        .systemLibrary(name: "CZstd", path: "Sources/CZstd"),
        .systemLibrary(name: "CXXHash", path: "Sources/CXXHash"),
        .target(
            name: "KVPack",
            dependencies: ["CZstd", "CXXHash"],
            path: "Sources/KVPack"
        ),
        .target(
            name: "KVPackModels",
            dependencies: ["KVPack"],
            path: "Sources/KVPackModels"
        ),
        .target(
            name: "KVPackInterop",
            dependencies: ["KVPack"],
            path: "Sources/KVPackInterop"
        ),
        .executableTarget(
            name: "kvpack",
            dependencies: [
                "KVPack",
                "KVPackModels",
                "KVPackInterop",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            path: "Sources/kvpack"
        ),
        .testTarget(
            name: "KVPackTests",
            dependencies: ["KVPack", "KVPackModels", "KVPackInterop", "kvpack"],
            path: "Tests/KVPackTests"
        ),
    ]
)
