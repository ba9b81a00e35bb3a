"""Hugging Face transformers caches to and from .kvpack files.

    from kvpack import transformers as kvt

    out = model(input_ids, use_cache=True)
    kvt.save(out.cache, "chat.kvpack", model=model, input_ids=input_ids, scheme="int:k4v2:kc64")
    cache = kvt.load("chat.kvpack", model)          # a DynamicCache, ready for model.generate

RoPE layout: Hugging Face keeps keys in the rotate-half layout (pairs j, j + d/2); llama.cpp and
`kvpack chat` keep the keys of Llama models in the interleaved layout (pairs 2j, 2j+1). The two
are one fixed permutation of each head's dimensions apart (values are not permuted). A file
records its layout; `save` writes either (rotate-half by default, interleaved for a file that
`kvpack chat --resume` continues), and `load` always hands Hugging Face rotate-half keys.

Needs torch and transformers (5.x: `cache.layers[i].keys/.values`); imported lazily so that
`import kvpack` works without them.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from . import KVPackError, create, model_fingerprint, open as open_file, convert

__all__ = ["save", "load", "to_interleaved", "to_rotate_half", "geometry_of"]


def to_interleaved(keys: np.ndarray) -> np.ndarray:
    """Rotate-half keys (last axis = head_dim) to interleaved: out[2j] = in[j], out[2j+1] = in[j + d/2]."""
    d = keys.shape[-1]
    out = np.empty_like(keys)
    out[..., 0::2] = keys[..., : d // 2]
    out[..., 1::2] = keys[..., d // 2:]
    return out


def to_rotate_half(keys: np.ndarray) -> np.ndarray:
    """Interleaved keys to rotate-half: the inverse of `to_interleaved`."""
    d = keys.shape[-1]
    out = np.empty_like(keys)
    out[..., : d // 2] = keys[..., 0::2]
    out[..., d // 2:] = keys[..., 1::2]
    return out


def _config(model: Any = None, config: Any = None) -> Any:
    c = config if config is not None else getattr(model, "config", None)
    if c is None:
        raise ValueError("pass model= (a transformers model) or config= (its config)")
    return c.get_text_config(decoder=True) if hasattr(c, "get_text_config") else c


def geometry_of(model: Any = None, config: Any = None) -> dict[str, Any]:
    """Layers, heads, head_dim, RoPE theta and context length of a transformers model config."""
    c = _config(model, config)
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    rope = getattr(c, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, Mapping) else None
    theta = theta or getattr(c, "rope_theta", None) or 10000.0
    return {"layers": c.num_hidden_layers, "query_heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "rope_theta": float(theta), "max_positions": int(getattr(c, "max_position_embeddings", 0) or 0)}


def _layers(cache: Any) -> list[tuple[Any, Any]]:
    """(keys, values) per layer from a transformers Cache (5.x) or a legacy tuple of pairs."""
    if hasattr(cache, "layers"):
        pairs = []
        for i, layer in enumerate(cache.layers):
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            if keys is None or values is None:
                raise ValueError(f"cache layer {i} ({type(layer).__name__}) holds no keys/values tensors (an empty or "
                                 f"non-attention layer); only full-attention caches can be saved")
            pairs.append((keys, values))
        return pairs
    return [(k, v) for k, v in cache]


def _numpy(t: Any) -> np.ndarray:
    return t.detach().to("cpu").float().numpy()


def save(cache: Any, path: str | os.PathLike[str], *, input_ids: Any, model: Any = None, config: Any = None,
         scheme: str = "raw:f16", rope_layout: str = "rotate-half", positions: Sequence[int] | None = None,
         gguf_file: str | os.PathLike[str] | None = None, metadata: Mapping[str, str] | None = None,
         batch_index: int = 0, segment_tokens: int = 0, overwrite: bool = False, durable: bool = True,
         chunk_tokens: int = 512) -> int:
    """Writes a transformers KV cache to a .kvpack file; returns the token count.

    cache: the model's cache (`out.cache`, formerly `past_key_values`: a DynamicCache, or a
    tuple of (keys, values) per layer), tensors
    [batch, kv_heads, tokens, head_dim]; one sequence of the batch is saved (`batch_index`).
    input_ids: the tokens the cache holds (a tensor [batch, tokens] or [tokens], or a list).
    scheme: as `kvpack convert --scheme`; planners that calibrate (int:auto) calibrate on the
    cache itself. rope_layout: "rotate-half" keeps Hugging Face's keys as they are; "interleaved"
    stores them as llama.cpp and `kvpack chat` do (needed for `kvpack chat --resume`).
    gguf_file: the GGUF the model was loaded from: its fingerprint and path are recorded, so
    `kvpack chat --resume` accepts the file for that model."""
    if rope_layout not in ("rotate-half", "interleaved"):
        raise ValueError(f"rope_layout must be 'rotate-half' or 'interleaved', got {rope_layout!r}")
    g = geometry_of(model, config)
    pairs = _layers(cache)
    if len(pairs) != g["layers"]:
        raise ValueError(f"the cache has {len(pairs)} layers, the model {g['layers']}")
    ids = np.asarray(input_ids.detach().cpu() if hasattr(input_ids, "detach") else input_ids).astype(np.int64)
    if ids.ndim == 2:
        ids = ids[batch_index]
    k0 = pairs[0][0]
    tokens = int(k0.shape[-2])
    if ids.shape != (tokens,):
        raise ValueError(f"input_ids has {ids.shape[-1]} tokens, the cache {tokens}")
    if tuple(k0.shape[-3:]) != (g["kv_heads"], tokens, g["head_dim"]):
        raise ValueError(f"cache keys are {list(k0.shape)}, expected [batch, {g['kv_heads']}, tokens, {g['head_dim']}]")
    entries = {"source": "transformers", "transformers.model_type": str(getattr(_config(model, config), "model_type", ""))}
    fingerprint = b""
    if gguf_file is not None:
        fingerprint = model_fingerprint(gguf_file)
        entries["model.path"] = str(Path(gguf_file).resolve())
        entries["model.format"] = "gguf"
    entries.update(metadata or {})
    options = dict(layers=g["layers"], query_heads=g["query_heads"], kv_heads=g["kv_heads"], head_dim=g["head_dim"],
                   segment_tokens=segment_tokens, rope_layout=rope_layout, rope_theta=g["rope_theta"],
                   max_positions=g["max_positions"], producer="kvpack.transformers", metadata=entries,
                   model_fingerprint=fingerprint, overwrite=overwrite, durable=durable)

    def write(target: str | os.PathLike[str], scheme_text: str) -> None:
        with create(target, scheme=scheme_text, **options) as w:
            for start in range(0, tokens, chunk_tokens):
                stop = min(tokens, start + chunk_tokens)
                k = np.stack([_numpy(k[batch_index, :, start:stop]) for k, _ in pairs])
                v = np.stack([_numpy(v[batch_index, :, start:stop]) for _, v in pairs])
                if rope_layout == "interleaved":
                    k = to_interleaved(k)
                w.append(k, v, ids[start:stop], positions=None if positions is None else positions[start:stop])

    try:
        write(path, scheme)
    except KVPackError as e:
        if e.code != "needsCalibration":
            raise
        # A planner needs statistics of a cache: this one, written losslessly first.
        with tempfile.TemporaryDirectory(dir=Path(path).resolve().parent) as tmp:
            raw = Path(tmp) / "raw.kvpack"
            options_overwrite = options["overwrite"]
            options["overwrite"] = True
            write(raw, "raw:f32")
            options["overwrite"] = options_overwrite
            convert(raw, path, scheme, overwrite=overwrite)
    return tokens


def load(path: str | os.PathLike[str], model: Any = None, config: Any = None, *, start: int = 0,
         stop: int | None = None, dtype: Any = None, device: Any = None, return_ids: bool = False) -> Any:
    """Reads tokens [start, stop) of a .kvpack file into a transformers DynamicCache (batch 1,
    rotate-half keys, decoded from whatever scheme the file holds); a negative stop counts from
    the end. With return_ids, returns (cache, input_ids [1, tokens] of those tokens).

    To continue a conversation, give generate the whole token sequence and a cache of all but
    its last token(s): generate computes logits only for tokens the cache does not hold.

        cache, _ = load(path, model, stop=-1)
        ids = torch.from_numpy(kvpack.open(path).token_ids().astype("int64"))[None]
        model.generate(torch.cat([ids, new_turn], -1), cache=cache, do_sample=False)

    The file's positions must be start, start + 1, ... (a transformers cache continues at its
    length)."""
    import torch
    from transformers import DynamicCache

    g = geometry_of(model, config)
    with open_file(path) as f:
        fg = f.geometry
        if (fg.layers, fg.kv_heads, fg.head_dim) != (g["layers"], g["kv_heads"], g["head_dim"]):
            raise ValueError(f"{path} holds {fg.layers} layers x {fg.kv_heads} KV heads x {fg.head_dim}; the model has "
                             f"{g['layers']} x {g['kv_heads']} x {g['head_dim']}")
        stop = f.tokens if stop is None else (stop if stop >= 0 else f.tokens + stop)
        positions = f.positions(start, stop)
        if not np.array_equal(positions, np.arange(start, stop)):
            raise ValueError(f"{path}: tokens {start}:{stop} are not at positions {start}, {start + 1}, ...; a "
                             f"transformers cache continues at its length")
        if fg.rope_layout == "none":
            raise ValueError(f"{path} does not record its keys' RoPE layout; transformers needs rotate-half keys")
        torch_dtype = dtype or torch.float32
        data = []
        for layer in range(fg.layers):
            k = f.keys(layer, start, stop)
            if fg.rope_layout == "interleaved":
                k = to_rotate_half(k)
            v = f.values(layer, start, stop)
            data.append((torch.from_numpy(k)[None].to(device=device, dtype=torch_dtype),
                         torch.from_numpy(v)[None].to(device=device, dtype=torch_dtype)))
        ids = f.token_ids(start, stop)
    cache = DynamicCache(ddp_cache_data=data, config=_config(model, config))
    if return_ids:
        return cache, torch.from_numpy(ids.astype(np.int64))[None]
    return cache
