#!/usr/bin/env python3
"""Independent reference for the Swift Llama runner: a direct numpy transcription of the
llama2.c forward pass (legacy checkpoint), greedy decoding from BOS. Run once to obtain the token
ids pinned in Tests/KVPackTests/LlamaRunnerTests.swift; they also match llama2.c's own run.c.

Usage: reference_llama2c.py [MODEL] [STEPS]   (default ../shared/models/stories260K.bin, 64)
"""
import sys
import numpy as np

path = sys.argv[1] if len(sys.argv) > 1 else "../shared/models/stories260K.bin"
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 64
raw = open(path, "rb").read()
dim, hidden, layers, heads, kv_heads, vocab, seq_len = np.frombuffer(raw[:28], dtype="<i4")
shared = vocab > 0
vocab = abs(vocab)
f = np.frombuffer(raw[28:], dtype="<f4")
hs = dim // heads
kv_dim = dim * kv_heads // heads
pos = 0


def take(*shape):
    global pos
    n = int(np.prod(shape))
    out = f[pos:pos + n].reshape(shape)
    pos += n
    return out


emb = take(vocab, dim)
rms_att = take(layers, dim)
wq = take(layers, dim, dim)
wk = take(layers, kv_dim, dim)
wv = take(layers, kv_dim, dim)
wo = take(layers, dim, dim)
rms_ffn = take(layers, dim)
w1 = take(layers, hidden, dim)
w2 = take(layers, dim, hidden)
w3 = take(layers, hidden, dim)
rms_final = take(dim)
take(seq_len * hs // 2)
take(seq_len * hs // 2)
wcls = emb if shared else take(vocab, dim)

kc = np.zeros((layers, seq_len, kv_dim), np.float64)
vc = np.zeros((layers, seq_len, kv_dim), np.float64)


def rmsnorm(x, w):
    return w * (x / np.sqrt(np.mean(x * x) + 1e-5))


def rope(vec, p):
    out = vec.copy()
    for i in range(0, vec.shape[0], 2):
        freq = 1.0 / (10000.0 ** ((i % hs) / hs))
        c, s = np.cos(p * freq), np.sin(p * freq)
        out[i], out[i + 1] = vec[i] * c - vec[i + 1] * s, vec[i] * s + vec[i + 1] * c
    return out


def forward(tok, p):
    x = emb[tok].astype(np.float64)
    for l in range(layers):
        xb = rmsnorm(x, rms_att[l])
        q, k, v = wq[l] @ xb, wk[l] @ xb, wv[l] @ xb
        q, k = rope(q, p), rope(k, p)
        kc[l, p], vc[l, p] = k, v
        out = np.zeros(dim)
        for h in range(heads):
            g = h // (heads // kv_heads)
            keys = kc[l, :p + 1, g * hs:(g + 1) * hs]
            scores = keys @ q[h * hs:(h + 1) * hs] / np.sqrt(hs)
            a = np.exp(scores - scores.max())
            a /= a.sum()
            out[h * hs:(h + 1) * hs] = a @ vc[l, :p + 1, g * hs:(g + 1) * hs]
        x = x + wo[l] @ out
        xb = rmsnorm(x, rms_ffn[l])
        hb = w1[l] @ xb
        x = x + w2[l] @ ((hb / (1 + np.exp(-hb))) * (w3[l] @ xb))
    return wcls @ rmsnorm(x, rms_final)


tok, ids = 1, []
for p in range(steps):
    logits = forward(tok, p)
    tok = int(np.argmax(logits))
    ids.append(tok)
print(",".join(map(str, ids)))
