"""ctypes declarations of include/kvpack.h (ABI version 1) and the loading of libKVPackC.

Struct layouts here must match the header; Sources/CKVPackABI/abi_checks.c pins their sizes in C
and tests/test_kvpack.py checks the same sizes here.
"""
from __future__ import annotations

import ctypes
import os
from ctypes import (POINTER, Structure, c_char, c_char_p, c_double, c_float, c_int32, c_int64, c_size_t,
                    c_uint8, c_uint32, c_uint64, c_void_p)
from pathlib import Path

ABI_VERSION = 1
ALL_TOKENS = 2**64 - 1

STATUS_NAMES = {
    0: "ok", 1: "truncated", 2: "badMagic", 3: "unsupportedVersion", 4: "checksumMismatch", 5: "invalidField",
    6: "unknownCriticalFrame", 7: "unknownScheme", 8: "corruptPayload", 9: "noValidCommit", 10: "io",
    11: "invalidArgument", 12: "locked", 13: "needsCalibration", 14: "bufferTooSmall", 15: "internal",
}
BUFFER_TOO_SMALL = 14


class Error(Structure):
    _fields_ = [("code", c_int32), ("has_offset", c_uint32), ("offset", c_uint64),
                ("field", c_char * 64), ("message", c_char * 1024)]


class Geometry(Structure):
    _fields_ = [("layers", c_uint32), ("query_heads", c_uint32), ("kv_heads", c_uint32), ("head_dim", c_uint32),
                ("segment_tokens", c_uint32), ("rope_layout", c_uint32), ("rope_theta", c_double),
                ("keys_post_rope", c_uint32), ("max_positions", c_uint32)]


class Rows(Structure):
    _fields_ = [("data", c_void_p), ("token_start", c_uint64), ("token_count", c_uint64), ("dtype", c_uint32),
                ("row_bytes", c_uint32)]


class CreateOptions(Structure):
    _fields_ = [("geometry", Geometry), ("scheme", c_char_p), ("producer", c_char_p), ("overwrite", c_uint32),
                ("durability", c_uint32), ("metadata_keys", POINTER(c_char_p)), ("metadata_values", POINTER(c_char_p)),
                ("metadata_count", c_uint32), ("model_fingerprint", c_uint8 * 16)]


def _library_path() -> str:
    explicit = os.environ.get("KVPACK_LIBRARY")
    if explicit:
        return explicit
    here = Path(__file__).resolve().parent / "libKVPackC.so"
    if here.exists():
        return str(here)
    raise OSError(
        "libKVPackC.so not found: build it with `make python` in the KVPack repository (it is copied next to this "
        "module), or set KVPACK_LIBRARY to its path")


def _declare(lib: ctypes.CDLL) -> None:
    reader, writer, err = c_void_p, c_void_p, POINTER(Error)
    signatures = {
        "kvpack_abi_version": (c_uint32, []),
        "kvpack_format_major": (c_uint32, []),
        "kvpack_open": (c_int32, [c_char_p, c_uint32, POINTER(c_void_p), err]),
        "kvpack_close": (None, [reader]),
        "kvpack_geometry_of": (c_int32, [reader, POINTER(Geometry), err]),
        "kvpack_token_count": (c_uint64, [reader]),
        "kvpack_tokens": (c_int32, [reader, c_uint64, c_uint64, c_void_p, c_void_p, err]),
        "kvpack_info_json": (c_int32, [reader, c_void_p, c_size_t, POINTER(c_size_t), err]),
        "kvpack_decode": (c_int32, [reader, c_uint32, c_int32, c_uint32, c_uint64, c_uint64, c_uint32, c_void_p,
                                    c_uint64, err]),
        "kvpack_attend": (c_int32, [reader, c_uint32, c_void_p, c_uint64, c_uint64, c_float, c_uint32, c_void_p, err]),
        "kvpack_rows_at": (c_int32, [reader, c_uint32, c_uint32, c_uint32, c_uint64, POINTER(Rows), err]),
        "kvpack_create": (c_int32, [c_char_p, POINTER(CreateOptions), POINTER(c_void_p), err]),
        "kvpack_resume": (c_int32, [c_char_p, c_uint32, POINTER(c_void_p), err]),
        "kvpack_append": (c_int32, [writer, c_uint64, c_void_p, c_void_p, c_void_p, c_void_p, POINTER(c_int64),
                                    c_uint64, err]),
        "kvpack_commit": (c_int32, [writer, err]),
        "kvpack_writer_token_count": (c_uint64, [writer]),
        "kvpack_writer_close": (c_int32, [writer, err]),
        "kvpack_convert": (c_int32, [c_char_p, c_char_p, c_char_p, c_int32, c_uint32, c_void_p, c_size_t,
                                     POINTER(c_size_t), err]),
        "kvpack_model_fingerprint": (c_int32, [c_char_p, c_void_p, err]),
        "kvpack_validate": (c_int32, [c_char_p, c_uint32, POINTER(c_uint32), c_void_p, c_size_t, POINTER(c_size_t),
                                      err]),
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes


_lib: ctypes.CDLL | None = None


def lib() -> ctypes.CDLL:
    """The loaded library (loaded once; its ABI version checked against this module's)."""
    global _lib
    if _lib is None:
        loaded = ctypes.CDLL(_library_path())
        _declare(loaded)
        version = loaded.kvpack_abi_version()
        if version != ABI_VERSION:
            raise OSError(f"libKVPackC has ABI version {version}; this kvpack package speaks {ABI_VERSION}")
        _lib = loaded
    return _lib
