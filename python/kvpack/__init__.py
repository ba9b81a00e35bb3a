"""KVPack from Python: read, write, attend over, convert and validate .kvpack KV-cache files.

A thin layer over the C ABI of libKVPackC (include/kvpack.h in the KVPack repository): numpy in,
numpy out, errors as :class:`KVPackError`. Example::

    import numpy as np, kvpack

    with kvpack.create("chat.kvpack", layers=30, query_heads=9, kv_heads=3, head_dim=64,
                       scheme="int:k4v2:kc64") as w:
        w.append(keys, values, token_ids)       # keys, values: [layers, kv_heads, tokens, head_dim]
    with kvpack.open("chat.kvpack") as f:
        k = f.keys(0)                            # [kv_heads, tokens, head_dim] float32
        out = f.attend(0, queries)               # queries: [query_heads, head_dim]
"""
from __future__ import annotations

import ctypes
import json
import os
from ctypes import byref, c_size_t, c_uint32, c_void_p
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from . import _abi

__all__ = ["KVPackError", "Geometry", "Reader", "Writer", "open", "create", "resume", "convert", "validate",
           "model_fingerprint", "abi_version", "format_major"]

KEYS, VALUES = 0, 1
_ROPE_LAYOUTS = {"none": 0, "interleaved": 1, "rotate-half": 2}
_ROPE_NAMES = {v: k for k, v in _ROPE_LAYOUTS.items()}


class KVPackError(Exception):
    """A failure the library reported: `code` names it ("checksumMismatch", "invalidArgument", ...),
    `offset` and `field` say where in the file when the problem is in the file's bytes."""

    def __init__(self, status: int, message: str, offset: int | None = None, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = _abi.STATUS_NAMES.get(status, f"status {status}")
        self.offset = offset
        self.field = field


def _raise(status: int, err: _abi.Error) -> None:
    if status != 0:
        raise KVPackError(status, err.message.decode("utf-8", "replace"),
                          err.offset if err.has_offset else None, err.field.decode("utf-8", "replace") or None)


def _call(name: str, *args: Any) -> None:
    err = _abi.Error()
    _raise(getattr(_abi.lib(), name)(*args, byref(err)), err)


def _text(name: str, *args: Any) -> str:
    """Calls a (buffer, capacity, length) function, growing the buffer when the library asks."""
    capacity = 1 << 16
    while True:
        buffer = ctypes.create_string_buffer(capacity)
        length = c_size_t(0)
        err = _abi.Error()
        status = getattr(_abi.lib(), name)(*args, buffer, capacity, byref(length), byref(err))
        if status == _abi.BUFFER_TOO_SMALL and length.value + 1 > capacity:
            capacity = length.value + 1
            continue
        _raise(status, err)
        return buffer.raw[:length.value].decode("utf-8")


def _path(path: str | os.PathLike[str]) -> bytes:
    return os.fsencode(path)


def abi_version() -> int:
    """The C ABI version of the loaded library."""
    return int(_abi.lib().kvpack_abi_version())


def format_major() -> int:
    """The .kvpack format major version the library writes."""
    return int(_abi.lib().kvpack_format_major())


@dataclass(frozen=True)
class Geometry:
    """The shape of a file's cache and how its keys are rotated."""
    layers: int
    query_heads: int
    kv_heads: int
    head_dim: int
    segment_tokens: int
    rope_layout: str
    rope_theta: float
    keys_post_rope: bool
    max_positions: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.query_heads // self.kv_heads


class _Handle:
    """Owns one kvpack_reader; closed when the last Reader or mapped view that uses it goes away."""

    def __init__(self, pointer: int):
        self.pointer: int | None = pointer

    def release(self) -> None:
        if self.pointer is not None:
            _abi.lib().kvpack_close(self.pointer)
            self.pointer = None

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # interpreter shutdown: the library may be gone already
            pass


class Reader:
    """An open .kvpack file (its newest commit), mapped read-only. Safe to share between threads;
    the library releases the GIL while it decodes or attends."""

    def __init__(self, path: str | os.PathLike[str], exact: bool = False):
        pointer = c_void_p()
        _call("kvpack_open", _path(path), 1 if exact else 0, byref(pointer))
        self.path = os.fspath(path)
        self._handle: _Handle | None = _Handle(pointer.value)
        g = _abi.Geometry()
        _call("kvpack_geometry_of", self._ptr, byref(g))
        self.geometry = Geometry(g.layers, g.query_heads, g.kv_heads, g.head_dim, g.segment_tokens,
                                 _ROPE_NAMES.get(g.rope_layout, str(g.rope_layout)), g.rope_theta,
                                 bool(g.keys_post_rope), g.max_positions)
        self.tokens: int = int(_abi.lib().kvpack_token_count(self._ptr))

    @property
    def _ptr(self) -> int:
        if self._handle is None or self._handle.pointer is None:
            raise ValueError("the reader is closed")
        return self._handle.pointer

    def close(self) -> None:
        """Releases the file. Mapped views (`rows`) keep the mapping alive until they are gone."""
        self._handle = None

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.tokens

    def __repr__(self) -> str:
        g = self.geometry
        return (f"<kvpack.Reader {self.path!r}: {self.tokens} tokens, {g.layers} layers x {g.kv_heads} KV heads x "
                f"{g.head_dim}>")

    def _range(self, start: int, stop: int | None) -> tuple[int, int]:
        stop = self.tokens if stop is None else stop
        if not 0 <= start <= stop <= self.tokens:
            raise IndexError(f"tokens {start}:{stop} outside the file's {self.tokens}")
        return start, stop - start

    def token_ids(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Token ids of tokens [start, stop) as uint32."""
        s, n = self._range(start, stop)
        ids = np.empty(n, dtype=np.uint32)
        _call("kvpack_tokens", self._ptr, s, n, ids.ctypes.data, None)
        return ids

    def positions(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """RoPE positions of tokens [start, stop) as uint32."""
        s, n = self._range(start, stop)
        positions = np.empty(n, dtype=np.uint32)
        _call("kvpack_tokens", self._ptr, s, n, None, positions.ctypes.data)
        return positions

    def info(self) -> dict[str, Any]:
        """Everything `kvpack info --json` prints: schemes per layer, bits per element, metadata."""
        return json.loads(_text("kvpack_info_json", self._ptr))

    @property
    def metadata(self) -> dict[str, str]:
        """The file's user metadata (key -> value)."""
        return {e["key"]: e["value"] for e in self.info()["userMetadata"]}

    @property
    def schemes(self) -> list[tuple[str, str]]:
        """(key scheme, value scheme) spec strings per layer."""
        info = self.info()
        spec = {s["index"]: s["spec"] for s in info["schemes"]}
        return [(spec[l["keyScheme"]], spec[l["valueScheme"]]) for l in info["layers"]]

    def _decode(self, kind: int, layer: int, start: int, stop: int | None, head: int | None,
                dtype: Any) -> np.ndarray:
        g = self.geometry
        if not 0 <= layer < g.layers:
            raise IndexError(f"layer {layer} outside the file's {g.layers}")
        if head is not None and not 0 <= head < g.kv_heads:
            raise IndexError(f"KV head {head} outside the file's {g.kv_heads}")
        s, n = self._range(start, stop)
        dt = np.dtype(dtype)
        code = {np.dtype(np.float32): 1, np.dtype(np.float16): 2}.get(dt)
        if code is None:
            raise TypeError(f"dtype {dt} is not float32 or float16")
        shape = (n, g.head_dim) if head is not None else (g.kv_heads, n, g.head_dim)
        out = np.empty(shape, dtype=dt)
        _call("kvpack_decode", self._ptr, layer, -1 if head is None else head, kind, s, n, code, out.ctypes.data,
              out.nbytes)
        return out

    def keys(self, layer: int, start: int = 0, stop: int | None = None, head: int | None = None,
             dtype: Any = np.float32) -> np.ndarray:
        """Decoded keys of `layer`, tokens [start, stop): [kv_heads, tokens, head_dim], or
        [tokens, head_dim] for one `head`. float32 or float16."""
        return self._decode(KEYS, layer, start, stop, head, dtype)

    def values(self, layer: int, start: int = 0, stop: int | None = None, head: int | None = None,
               dtype: Any = np.float32) -> np.ndarray:
        """Decoded values, as `keys`."""
        return self._decode(VALUES, layer, start, stop, head, dtype)

    def attend(self, layer: int, queries: np.ndarray, start: int = 0, stop: int | None = None,
               scale: float | None = None, threads: int = 1) -> np.ndarray:
        """Softmax attention of one decode step over the stored (possibly quantized) cache of
        `layer`, read in place. queries: [query_heads, head_dim], or [n, query_heads, head_dim]
        for n independent steps over the same tokens. scale defaults to 1/sqrt(head_dim)."""
        g = self.geometry
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.shape[-2:] != (g.query_heads, g.head_dim) or q.ndim not in (2, 3):
            raise ValueError(f"queries must be [{g.query_heads}, {g.head_dim}] or [n, {g.query_heads}, "
                             f"{g.head_dim}], got {list(q.shape)}")
        s, n = self._range(start, stop)
        out = np.empty_like(q)
        steps = q.reshape(-1, g.query_heads * g.head_dim)
        flat = out.reshape(steps.shape)
        for i in range(steps.shape[0]):
            _call("kvpack_attend", self._ptr, layer, steps[i].ctypes.data, s, n, 0.0 if scale is None else scale,
                  threads, flat[i].ctypes.data)
        return out

    def rows(self, layer: int, head: int, kind: str, token: int) -> tuple[int, np.ndarray] | None:
        """Zero-copy: (first token, read-only view [tokens, head_dim]) of the stored rows around
        `token` when the file keeps them as plain rows (raw schemes without zstd, and the
        unsealed tail of any scheme); None when they are encoded. kind is "keys" or "values".
        bf16 rows come as uint16 (numpy has no bfloat16). The view keeps the file mapped."""
        k = {"keys": KEYS, "values": VALUES}.get(kind)
        if k is None:
            raise ValueError(f"kind must be 'keys' or 'values', got {kind!r}")
        rows = _abi.Rows()
        _call("kvpack_rows_at", self._ptr, layer, head, k, token, byref(rows))
        if not rows.data:
            return None
        dtype = {1: np.float32, 2: np.float16, 3: np.uint16}[rows.dtype]
        nbytes = rows.token_count * rows.row_bytes
        buffer = (ctypes.c_char * nbytes).from_address(rows.data)
        buffer._kvpack_handle = self._handle  # the mapping lives as long as the view
        view = np.frombuffer(buffer, dtype=dtype).reshape(rows.token_count, self.geometry.head_dim)
        view.flags.writeable = False
        return int(rows.token_start), view

    def mapped(self, layer: int, head: int, kind: str) -> Iterator[tuple[int, np.ndarray]]:
        """Every run of plain rows of one stream, in token order, as `rows` gives them (zero-copy);
        raises ValueError at the first encoded block (use `keys`/`values` for those)."""
        token = 0
        while token < self.tokens:
            found = self.rows(layer, head, kind, token)
            if found is None:
                raise ValueError(f"token {token} of layer {layer} head {head} {kind} is encoded, not plain rows")
            first, view = found
            yield first, view[token - first:]
            token = first + view.shape[0]


class Writer:
    """A file being written: append token batches, commit to make them visible. One thread at a
    time; the file is locked against other writers until `close`."""

    def __init__(self, pointer: int, path: str, geometry: Geometry | None):
        self._pointer: int | None = pointer
        self.path = path
        self._geometry = geometry

    @property
    def geometry(self) -> Geometry:
        if self._geometry is None:
            with Reader(self.path) as r:
                self._geometry = r.geometry
        return self._geometry

    @property
    def tokens(self) -> int:
        """Tokens appended so far (committed or not)."""
        return int(_abi.lib().kvpack_writer_token_count(self._ptr))

    @property
    def _ptr(self) -> int:
        if self._pointer is None:
            raise ValueError("the writer is closed")
        return self._pointer

    def append(self, keys: np.ndarray, values: np.ndarray, token_ids: Sequence[int] | np.ndarray,
               positions: Sequence[int] | np.ndarray | None = None, layout: str = "lhtd") -> None:
        """Appends a batch of tokens. keys and values: layout "lhtd" = [layers, kv_heads, tokens,
        head_dim] (Hugging Face's per-layer [batch=1, heads, tokens, dim] stacked), or "lthd" =
        [layers, tokens, kv_heads, head_dim]. Any float dtype; float32 arrays with contiguous
        rows are passed without a copy. positions default to consecutive ones after the last."""
        g = self.geometry
        ids = np.ascontiguousarray(token_ids, dtype=np.uint32)
        t = ids.shape[0]
        if layout not in ("lhtd", "lthd"):
            raise ValueError(f"layout must be 'lhtd' or 'lthd', got {layout!r}")
        expected = (g.layers, g.kv_heads, t, g.head_dim) if layout == "lhtd" else (g.layers, t, g.kv_heads, g.head_dim)
        arrays = []
        for name, a in (("keys", keys), ("values", values)):
            a = np.asarray(a)
            if a.shape != expected:
                raise ValueError(f"{name} must be {list(expected)} ({layout}) for {t} tokens, got {list(a.shape)}")
            if a.dtype != np.float32 or a.strides[-1] != 4 or any(s < 0 or s % 4 for s in a.strides):
                a = np.ascontiguousarray(a, dtype=np.float32)
            arrays.append(a)
        k, v = arrays
        if k.strides != v.strides:
            k, v = np.ascontiguousarray(k), np.ascontiguousarray(v)
        l_s, a_s, b_s = (s // 4 for s in k.strides[:3])
        strides = (ctypes.c_int64 * 3)(l_s, b_s, a_s) if layout == "lhtd" else (ctypes.c_int64 * 3)(l_s, a_s, b_s)
        # Floats each array spans from its first element (the library checks the strides against it).
        span = 1 + sum((n - 1) * s // 4 for n, s in zip(k.shape, k.strides)) if t else 0
        pos = None
        if positions is not None:
            pos = np.ascontiguousarray(positions, dtype=np.uint32)
            if pos.shape != (t,):
                raise ValueError(f"{pos.shape[0]} positions for {t} tokens")
        _call("kvpack_append", self._ptr, t, ids.ctypes.data, None if pos is None else pos.ctypes.data,
              k.ctypes.data, v.ctypes.data, strides, span)

    def commit(self) -> None:
        """Makes everything appended durable and visible to readers."""
        _call("kvpack_commit", self._ptr)

    def close(self) -> None:
        """Commits and releases the file."""
        if self._pointer is not None:
            pointer, self._pointer = self._pointer, None
            _call("kvpack_writer_close", pointer)

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def open(path: str | os.PathLike[str], exact: bool = False) -> Reader:  # noqa: A001 (mirrors builtins.open)
    """Opens a .kvpack file for reading. exact=True attends in f32 over decoded codes instead of
    the integer kernels (slower; what the tests compare against)."""
    return Reader(path, exact=exact)


def create(path: str | os.PathLike[str], *, layers: int, query_heads: int, kv_heads: int, head_dim: int,
           scheme: str = "raw:f16", segment_tokens: int = 0, rope_layout: str = "none", rope_theta: float = 0.0,
           keys_post_rope: bool = True, max_positions: int = 0, producer: str = "kvpack-python",
           metadata: Mapping[str, str] | None = None, model_fingerprint: bytes = b"", overwrite: bool = False,
           durable: bool = True) -> Writer:
    """Creates a new .kvpack file and returns its writer. scheme: a spec as `kvpack convert
    --scheme` takes it ("raw:f16", "raw:f32:zstd", "int:k4v2:kc64", "nsn:2", ...); planners that
    need calibration (int:auto) are refused: write raw, then `convert`. rope_layout: "none",
    "interleaved" (llama.cpp / GGUF Llama keys) or "rotate-half" (Hugging Face keys). durable:
    fsync every commit (else flush only)."""
    if rope_layout not in _ROPE_LAYOUTS:
        raise ValueError(f"rope_layout must be one of {sorted(_ROPE_LAYOUTS)}, got {rope_layout!r}")
    if len(model_fingerprint) not in (0, 16):
        raise ValueError("model_fingerprint must be 16 bytes")
    geometry = Geometry(layers, query_heads, kv_heads, head_dim, segment_tokens, rope_layout, rope_theta,
                        keys_post_rope, max_positions)
    o = _abi.CreateOptions()
    for name in ("layers", "query_heads", "kv_heads", "head_dim", "segment_tokens", "max_positions"):
        value = getattr(geometry, name)
        if not 0 <= value < 2**32:
            raise ValueError(f"{name} {value} is out of range")
        setattr(o.geometry, name, value)
    o.geometry.rope_layout = _ROPE_LAYOUTS[rope_layout]
    o.geometry.rope_theta = rope_theta
    o.geometry.keys_post_rope = 1 if keys_post_rope else 0
    o.scheme = scheme.encode()
    o.producer = producer.encode()
    o.overwrite = 1 if overwrite else 0
    o.durability = 0 if durable else 1
    entries = list((metadata or {}).items())
    keys = (ctypes.c_char_p * max(1, len(entries)))(*[k.encode() for k, _ in entries])
    values = (ctypes.c_char_p * max(1, len(entries)))(*[v.encode() for _, v in entries])
    o.metadata_keys, o.metadata_values, o.metadata_count = keys, values, len(entries)
    if model_fingerprint:
        o.model_fingerprint[:] = list(model_fingerprint)
    pointer = c_void_p()
    _call("kvpack_create", _path(path), byref(o), byref(pointer))
    return Writer(pointer.value, os.fspath(path), geometry)


def resume(path: str | os.PathLike[str], durable: bool = True) -> Writer:
    """Continues an existing file after its newest commit."""
    pointer = c_void_p()
    _call("kvpack_resume", _path(path), 0 if durable else 1, byref(pointer))
    return Writer(pointer.value, os.fspath(path), None)


def convert(input: str | os.PathLike[str], output: str | os.PathLike[str], scheme: str | None = None,
            rope_layout: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Re-encodes a file with `scheme` (as `kvpack convert`; None keeps each layer's scheme);
    rope_layout "interleaved" or "rotate-half" moves the keys to that RoPE pair layout. Returns
    the report (bits per element before and after, key/value/attention errors measured)."""
    if rope_layout is not None and rope_layout not in ("interleaved", "rotate-half"):
        raise ValueError(f"rope_layout must be 'interleaved' or 'rotate-half', got {rope_layout!r}")
    layout = -1 if rope_layout is None else _ROPE_LAYOUTS[rope_layout]
    # Not through _text: asking again would convert again. Reports are a few KiB.
    capacity = 1 << 22
    buffer = ctypes.create_string_buffer(capacity)
    length = c_size_t(0)
    _call("kvpack_convert", _path(input), _path(output), None if scheme is None else scheme.encode(), layout,
          1 if overwrite else 0, buffer, capacity, byref(length))
    return json.loads(buffer.raw[:length.value].decode("utf-8"))


def model_fingerprint(model_path: str | os.PathLike[str]) -> bytes:
    """The 16-byte fingerprint `kvpack chat` records for a model file (GGUF or llama2.c) and
    checks on resume: XXH3-128 of its bytes."""
    out = (ctypes.c_uint8 * 16)()
    _call("kvpack_model_fingerprint", _path(model_path), out)
    return bytes(out)


@dataclass(frozen=True)
class ValidationReport:
    valid: bool
    problems: list[dict[str, Any]]
    report: dict[str, Any]


def validate(path: str | os.PathLike[str], deep: bool = False) -> ValidationReport:
    """Checks a file (deep: every block and value too). Problems carry severity, code, offset,
    field and message; `valid` is False when any is an error."""
    valid = c_uint32(0)
    report = json.loads(_text("kvpack_validate", _path(path), 1 if deep else 0, byref(valid)))
    return ValidationReport(bool(valid.value), report.get("problems", []), report)
