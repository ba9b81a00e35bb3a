"""Writes Tests/Fixtures/mlx/*.safetensors with the real mlx-lm package (save_prompt_cache), from
the real SmolLM2 K/V of ../shared/kv-samples (its first 2 layers, first 77 tokens: a
segment and a part, so tails are exercised), keys moved to mlx-lm's rotate-half layout (mlx-lm's
Llama uses nn.RoPE(traditional=False)).

    python3 -m venv /tmp/mlxenv && /tmp/mlxenv/bin/pip install "mlx[cpu]" mlx-lm   # mlx-lm 0.32.2, mlx 0.32.4
    /tmp/mlxenv/bin/pip download --no-deps mlx-lm==0.21.5 -d /tmp/oldmlx      # the older file layout
    (cd /tmp/oldmlx && unzip -o -q mlx_lm-0.21.5-py3-none-any.whl 'mlx_lm/models/cache.py')
    /tmp/mlxenv/bin/python scripts/mlx-fixtures.py ../shared/kv-samples/smollm2-chat Tests/Fixtures/mlx \
        /tmp/oldmlx/mlx_lm/models/cache.py Fuzz/tensors-seeds

Files: kv-f16.safetensors (KVCache, f16), kv-bf16.safetensors (KVCache, bf16),
q4-g64.safetensors (QuantizedKVCache, 4 bits, groups of 64), q8-g32.safetensors (8 bits, groups
of 32), q2-g64.safetensors (2 bits), each with user metadata; expected-<file>-<layer><k|v>.npy
beside them: what mlx decodes (mx.dequantize, f16 [kv_heads, tokens, head_dim]) for layer 0's
keys and layer 1's values of each quantized file. With the third
argument (mlx-lm 0.21.5's cache.py, which imports only mlx), also kv-f16-v021.safetensors and
q4-g64-v021.safetensors in that version's layout (meta states in "0.*", user metadata in "1.*",
classes in "2.*", tensors trimmed to the offset). With a fourth argument (a directory, e.g.
Fuzz/tensors-seeds), also small seeds for the tensors fuzz target (under its 16 KiB max_len): one
layer, one head, a few tokens, in both layouts, dense and quantized.
"""
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, save_prompt_cache, load_prompt_cache

samples, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
LAYERS, TOKENS = 2, 77


def rotate_half(k):
    d = k.shape[-1]
    return np.concatenate([k[..., 0::2], k[..., 1::2]], axis=-1)


def caches(dtype):
    result = []
    for layer in range(LAYERS):
        k = rotate_half(np.load(samples / f"k_layer{layer:02d}.npy")[:, :TOKENS].astype(np.float32))
        v = np.load(samples / f"v_layer{layer:02d}.npy")[:, :TOKENS].astype(np.float32)
        c = KVCache()
        c.update_and_fetch(mx.array(k[None]).astype(dtype), mx.array(v[None]).astype(dtype))
        result.append(c)
    return result


meta = {"model": "SmolLM2-135M-Instruct", "source": "kv-samples smollm2-chat, layers 0-1, tokens 0-76"}
save_prompt_cache(str(out / "kv-f16.safetensors"), caches(mx.float16), meta)
save_prompt_cache(str(out / "kv-bf16.safetensors"), caches(mx.bfloat16), meta)
for name, bits, group in [("q4-g64", 4, 64), ("q8-g32", 8, 32), ("q2-g64", 2, 64)]:
    quantized = [c.to_quantized(group_size=group, bits=bits) for c in caches(mx.float16)]
    save_prompt_cache(str(out / f"{name}.safetensors"), quantized, meta)
    loaded = load_prompt_cache(str(out / f"{name}.safetensors"))
    for layer, r, tag in [(0, 0, "0k"), (1, 1, "1v")]:
        q = loaded[layer].state[r]
        decoded = mx.dequantize(*q, group_size=group, bits=bits)  # f16, as the scales
        np.save(out / f"expected-{name}-{tag}.npy", np.array(decoded)[0, :, :TOKENS])
if len(sys.argv) > 3:
    import importlib.util
    spec = importlib.util.spec_from_file_location("old_mlx_lm_cache", sys.argv[3])
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)

    def old_caches():
        result = []
        for c in caches(mx.float16):
            o = old.KVCache()
            o.update_and_fetch(c.keys[..., :TOKENS, :], c.values[..., :TOKENS, :])
            result.append(o)
        return result

    old.save_prompt_cache(str(out / "kv-f16-v021.safetensors"), old_caches(), meta)
    old.save_prompt_cache(str(out / "q4-g64-v021.safetensors"), [c.to_quantized(group_size=64, bits=4) for c in old_caches()], meta)
for f in sorted(out.glob("*.safetensors")):
    print(f.name, f.stat().st_size)

if len(sys.argv) > 4:
    seeds = Path(sys.argv[4])
    rng = np.random.default_rng(7)

    def small(cls, dim, tokens):
        c = cls()
        k = rng.standard_normal((1, 1, tokens, dim)).astype(np.float32)
        c.update_and_fetch(mx.array(k).astype(mx.float16), mx.array(k[..., ::-1].copy()).astype(mx.float16))
        return c

    save_prompt_cache(str(seeds / "mlx-kv-current.safetensors"), [small(KVCache, 8, 5)], {"seed": "1"})
    save_prompt_cache(str(seeds / "mlx-q4-current.safetensors"), [small(KVCache, 32, 3).to_quantized(group_size=32, bits=4)])
    old.save_prompt_cache(str(seeds / "mlx-kv-v021.safetensors"), [small(old.KVCache, 32, 6)], {"seed": "2"})
    old.save_prompt_cache(str(seeds / "mlx-q2-v021.safetensors"),
                          [small(old.KVCache, 64, 9).to_quantized(group_size=64, bits=2), small(old.KVCache, 64, 9).to_quantized(group_size=64, bits=2)])
    for f in sorted(seeds.glob("mlx-*.safetensors")):
        print(f.name, f.stat().st_size)
