#!/usr/bin/env python3
"""Writes corpus/llama.cpp/: small llama.cpp state files, the seeds of `make fuzz-llama-cpp` and
the cases of the corpus test (Tests/KVPackTests/Format/CorpusTests.swift), named like corpus/:

  valid__NAME.bin         every layout the importer reads (session v9 with and without the output
                          section, v10; sequence v2, v3; every ggml cache type; values by rows and
                          transposed; an empty stream before the used one; two used streams, which
                          parse and are refused at import), a few hundred bytes each;
  error-CODE__NAME.bin    one lie each, refused by the parser with that KVPackError code.

The layout is llama.cpp's (src/llama-context.cpp state_write_data, src/llama-kv-cache.cpp
state_write), written here independently of KVPack's Swift code; row bytes are random, which
every type accepts. Deterministic (fixed seed).

    python3 scripts/make-llama-cpp-corpus.py [DIR]
"""
import os
import random
import struct
import sys

# ggml type: (id, block elements, block bytes)
TYPES = {"f32": (0, 1, 4), "f16": (1, 1, 2), "q4_0": (2, 32, 18), "q4_1": (3, 32, 20), "q5_0": (6, 32, 22),
         "q5_1": (7, 32, 24), "q8_0": (8, 32, 34), "iq4_nl": (20, 32, 18), "bf16": (30, 1, 2)}


def u32(v): return struct.pack("<I", v)
def i32(v): return struct.pack("<i", v)
def u64(v): return struct.pack("<Q", v)


def row_bytes(t, width):
    _, n, b = TYPES[t]
    return width // n * b


def stream(rng, cells, layers, width, kt, vt, vtrans, seq=0):
    out = u32(cells)
    for c in range(cells):
        out += i32(c) + u32(1) + i32(seq)
    out += u32(vtrans) + u32(layers)
    for _ in range(layers):
        rb = row_bytes(kt, width)
        out += i32(TYPES[kt][0]) + u64(rb) + rng.randbytes(rb * cells)
    for _ in range(layers):
        if vtrans:
            size = TYPES[vt][2]
            out += i32(TYPES[vt][0]) + u32(size) + u32(width) + rng.randbytes(size * width * cells)
        else:
            rb = row_bytes(vt, width)
            out += i32(TYPES[vt][0]) + u64(rb) + rng.randbytes(rb * cells)
    return out


def session(version, tokens, memory, outputs=None):
    out = u32(0x6767736E) + u32(version) + u32(len(tokens)) + b"".join(i32(t) for t in tokens)
    out += u32(5) + b"llama"
    if outputs is not None:
        n, logits = outputs
        out += i32(n) + b"".join(i32(i) for i in range(n)) + u64(logits) + b"\0" * 4 * logits + u64(0)
    return out + memory


def sequence(version, tokens, memory):
    return u32(0x67677371) + u32(version) + u32(len(tokens)) + b"".join(i32(t) for t in tokens) + memory


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "corpus", "llama.cpp")
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(7)
    seeds = {
        "seq-v3-q8_0.bin": sequence(3, [1, 2], u32(1) + stream(rng, 2, 2, 64, "q8_0", "q8_0", 0)),
        "seq-v2-q4_0-q5_1.bin": sequence(2, [5, 6, 7], u32(1) + stream(rng, 3, 1, 32, "q4_0", "q5_1", 0)),
        "seq-v3-q4_1-q5_0.bin": sequence(3, [9], u32(1) + stream(rng, 1, 2, 32, "q4_1", "q5_0", 0)),
        "seq-v3-bf16-iq4_nl.bin": sequence(3, [1, 2], u32(1) + stream(rng, 2, 1, 32, "bf16", "iq4_nl", 0)),
        "session-v10-f16-vtrans.bin": session(10, [1, 2, 3], u32(1) + stream(rng, 3, 1, 8, "f16", "f16", 1)),
        "session-v10-q8_0-f32-vtrans.bin": session(10, [4, 5], u32(1) + stream(rng, 2, 1, 32, "q8_0", "f32", 1)),
        "session-v9-outputs-f32.bin": session(9, [1, 2], u32(1) + stream(rng, 2, 2, 8, "f32", "f32", 0), outputs=(1, 3)),
        "session-v9-bare-f16.bin": session(9, [1], u32(1) + stream(rng, 1, 1, 4, "f16", "bf16", 0)),
        "seq-v3-empty-stream-first.bin": sequence(3, [3, 4], u32(2) + u32(0) + stream(rng, 2, 1, 16, "f16", "f16", 0)),
        "session-v10-two-streams.bin": session(10, [1, 2], u32(2) + stream(rng, 1, 1, 8, "f16", "f16", 0)
                                               + stream(rng, 1, 1, 8, "f16", "f16", 0, seq=1)),
        "session-v10-empty.bin": session(10, [], u32(1) + u32(0)),
    }
    seeds = {"valid__" + k: v for k, v in seeds.items()}
    base = seeds["valid__seq-v3-q8_0.bin"]   # n_stream 20, cell_count 24, cells 28, v_trans 52, n_layer 56, K type 60, row bytes 64

    def patched(at, word, data=base):
        return data[:at] + word + data[at + len(word):]
    seeds.update({
        "error-badMagic__gguf.bin": b"GGUF" + base[4:],
        "error-unsupportedVersion__seq-v4.bin": patched(4, u32(4)),
        "error-truncated__token-count-lies.bin": patched(8, u32(0x40000000)),
        "error-truncated__cell-count-lies.bin": patched(24, u32(0x7FFFFFFF)),
        "error-invalidField__v-trans-2.bin": patched(52, u32(2)),
        "error-invalidField__no-layers.bin": patched(56, u32(0)),
        "error-invalidField__unknown-type.bin": patched(60, i32(12)),
        "error-invalidField__row-bytes-not-blocks.bin": patched(64, u64(67)),
        "error-invalidField__row-bytes-4-gib.bin": patched(64, u64(1 << 32)),
        "error-truncated__cut-in-rows.bin": base[:300],
        "error-invalidField__trailing-bytes.bin": base + b"\0",
        "error-invalidField__stream-count-0.bin": patched(20, u32(0)),
        "error-invalidField__seq-count-lies.bin": patched(32, u32(1 << 20)),
    })
    for name, data in seeds.items():
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(data)
    print(f"make-llama-cpp-corpus: {len(seeds)} files in {os.path.normpath(out_dir)}")


if __name__ == "__main__":
    main()
