#!/usr/bin/env python3
"""A second reader of llama.cpp state files, written from llama.cpp's source
(src/llama-context.cpp state_save_file / state_seq_save_file / state_write_data,
src/llama-kv-cache.cpp state_write / state_write_meta / state_write_data) and sharing no code with
KVPack's Swift importer: the test oracle for `kvpack import`.

    python3 llama_cpp_state.py FILE --kv-heads 3 --head-dim 64 --out DIR [--no-rotation]

Writes DIR/k_layerNN.npy and DIR/v_layerNN.npy ([kv_heads, tokens, head_dim], float32, tokens in
position order) and DIR/meta.json (tokens, positions, types, v_trans). Rows are dequantized with
gguf-py (an independent numpy implementation of ggml's formats) and, for quantized types whose
head size is a multiple of 64, unrotated with Sylvester's Hadamard matrix scaled by 1/sqrt(n)
(llama.cpp #21038: keys in chunks of the largest power of two from 64 dividing the head size,
values in chunks of 64), in float64.
"""
import argparse
import json
import os
import struct

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

BLOCK = {T.F32: (1, 4), T.F16: (1, 2), T.BF16: (1, 2), T.Q8_0: (32, 34), T.Q4_0: (32, 18), T.Q4_1: (32, 20),
         T.Q5_0: (32, 22), T.Q5_1: (32, 24), T.IQ4_NL: (32, 18)}
QUANTIZED = {T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.IQ4_NL}


class Reader:
    def __init__(self, data):
        self.data, self.at = data, 0

    def take(self, fmt):
        v = struct.unpack_from("<" + fmt, self.data, self.at)
        self.at += struct.calcsize("<" + fmt)
        return v if len(v) > 1 else v[0]

    def raw(self, n):
        b = self.data[self.at:self.at + n]
        assert len(b) == n, "truncated"
        self.at += n
        return b


def hadamard(n):
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def unrotate(rows, chunk):
    """rows: [cells, elements] float64, rotated per contiguous chunk."""
    h = hadamard(chunk)
    shape = rows.shape
    return (rows.reshape(-1, chunk) @ h.T).reshape(shape)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("file")
    p.add_argument("--kv-heads", type=int, required=True)
    p.add_argument("--head-dim", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--no-rotation", action="store_true")
    a = p.parse_args()
    r = Reader(open(a.file, "rb").read())
    magic, version = r.take("I"), r.take("I")
    session = magic == 0x6767736E
    assert session or magic == 0x67677371, "not a state file"
    tokens = list(r.take("%di" % r.take("I"))) if True else []
    if isinstance(tokens, int):
        tokens = [tokens]
    if session:
        r.raw(r.take("I"))  # architecture
    assert r.take("I") == 1, "one stream"
    cells = r.take("I")
    positions = []
    for _ in range(cells):
        pos, n_seq = r.take("iI")
        r.raw(4 * n_seq)
        positions.append(pos)
    v_trans, n_layer = r.take("II")
    width = a.kv_heads * a.head_dim
    order = np.argsort(positions, kind="stable")

    def rows(kind_is_key):
        out = []
        for _ in range(n_layer):
            t = T(r.take("i"))
            if kind_is_key or not v_trans:
                row_bytes = r.take("Q")
                raw = np.frombuffer(r.raw(cells * row_bytes), dtype=np.uint8).reshape(cells, row_bytes)
                x = dequantize(raw, t).astype(np.float64).reshape(cells, width)
            else:
                el, embd = r.take("II")
                raw = np.frombuffer(r.raw(cells * embd * el), dtype=np.uint8).reshape(embd, cells * el)
                x = dequantize(raw, t).astype(np.float64).reshape(embd, cells).T
            if t in QUANTIZED and a.head_dim % 64 == 0 and not a.no_rotation:
                chunk = 64
                if kind_is_key:
                    while a.head_dim % (2 * chunk) == 0:
                        chunk *= 2
                x = unrotate(x, chunk)
            out.append((t, x[order].reshape(cells, a.kv_heads, a.head_dim).transpose(1, 0, 2).astype(np.float32)))
        return out

    keys = rows(True)
    values = rows(False)
    assert r.at == len(r.data), "trailing bytes"
    os.makedirs(a.out, exist_ok=True)
    for l, ((_, k), (_, v)) in enumerate(zip(keys, values)):
        np.save(os.path.join(a.out, "k_layer%02d.npy" % l), k)
        np.save(os.path.join(a.out, "v_layer%02d.npy" % l), v)
    json.dump({"tokens": [tokens[i] for i in range(len(tokens))], "positions": [positions[i] for i in order],
               "type_k": keys[0][0].name, "type_v": values[0][0].name, "v_trans": v_trans, "layers": n_layer},
              open(os.path.join(a.out, "meta.json"), "w"))


if __name__ == "__main__":
    main()
