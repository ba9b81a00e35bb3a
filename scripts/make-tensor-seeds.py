#!/usr/bin/env python3
"""Writes Fuzz/tensors-seeds/: small safetensors and .npy files made by the real libraries
(safetensors' numpy API, numpy.save / numpy.lib.format), the seeds of `make fuzz-tensors`.
Reproducible: fixed seeds. Usage: python3 scripts/make-tensor-seeds.py [DIR]"""
import io
import os
import sys

import numpy as np
from safetensors.numpy import save

out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "Fuzz", "tensors-seeds")
os.makedirs(out, exist_ok=True)
rng = np.random.default_rng(2026)


def cache(layers, shape, dtype, ids=True, name="past_key_values.{layer}.{kv}"):
    t = {}
    for layer in range(layers):
        for kv in ("key", "value"):
            t[name.format(layer=layer, kv=kv)] = rng.standard_normal(shape).astype(dtype)
    if ids:
        n = shape[-2]
        batch = shape[0] if len(shape) == 4 else 1
        t["input_ids"] = rng.integers(0, 49152, (batch, n)).astype(np.int64)
        t["position_ids"] = np.tile(np.arange(n, dtype=np.int64), (batch, 1))
    return t


def write(name, data):
    with open(os.path.join(out, name), "wb") as f:
        f.write(data)


# Hugging Face's layout (DynamicCache saved per layer), [batch, kv_heads, tokens, head_dim].
write("hf-f32.safetensors", save(cache(2, (1, 2, 5, 8), np.float32), metadata={"format": "pt", "query_heads": "4"}))
write("hf-f16-batch2.safetensors", save(cache(1, (2, 1, 7, 4), np.float16)))
write("hf-3d-no-ids.safetensors", save(cache(3, (2, 3, 8), np.float32, ids=False)))
write("empty-tokens.safetensors", save(cache(1, (1, 1, 0, 8), np.float32)))
# ids as float and int32 (the reader converts), an unrelated tensor, bool and u8 dtypes.
odd = cache(1, (1, 1, 3, 4), np.float16, ids=False)
odd["input_ids"] = np.array([[1.5, np.nan, 3e9]], dtype=np.float32)
odd["position_ids"] = np.array([[0, 1, 2]], dtype=np.int32)
odd["mask"] = np.array([True, False, True])
odd["bytes"] = np.arange(5, dtype=np.uint8)
write("float-ids.safetensors", save(odd))
write("not-a-cache.safetensors", save({"weight": rng.standard_normal((3, 3)).astype(np.float64)}))
# bf16 has no numpy dtype: the same file with each F32 tensor's dtype renamed and its data halved
# is not possible through the library, so bf16 comes from the F16 file with the dtype string changed.
f16 = save(cache(1, (1, 2, 4, 8), np.float16))
write("hf-bf16.safetensors", f16.replace(b'"F16"', b'"BF16"'))

# .npy: the kv-samples layout [kv_heads, tokens, head_dim], f32 and f16, a batch of 1 in front,
# versions 1.0, 2.0 and 3.0 headers, Fortran order (refused), integer dtypes.
def npy(array, version=None):
    b = io.BytesIO()
    if version is None:
        np.save(b, array)
    else:
        np.lib.format.write_array(b, array, version=version)
    return b.getvalue()


write("k-f32.npy", npy(rng.standard_normal((2, 6, 8)).astype(np.float32)))
write("k-f16-batch.npy", npy(rng.standard_normal((1, 1, 5, 4)).astype(np.float16)))
write("k-v2.npy", npy(rng.standard_normal((1, 3, 4)).astype(np.float32), version=(2, 0)))
write("k-v3.npy", npy(rng.standard_normal((1, 3, 4)).astype(np.float32), version=(3, 0)))
write("fortran.npy", npy(np.asfortranarray(rng.standard_normal((2, 3, 4)).astype(np.float32))))
write("int64.npy", npy(np.arange(12, dtype=np.int64).reshape(1, 3, 4)))
write("uint8.npy", npy(np.arange(8, dtype=np.uint8).reshape(1, 2, 4)))
write("empty.npy", npy(np.zeros((1, 0, 4), dtype=np.float32)))
print(f"wrote {len(os.listdir(out))} files to {out}")
