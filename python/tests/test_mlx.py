"""kvpack's mlx-lm prompt caches against the real mlx-lm: files exported by `kvpack export
--format mlx` load with mlx-lm's own load_prompt_cache and hold the states of the files mlx-lm
wrote (Tests/Fixtures/mlx), for the current layout (mlx-lm 0.32.2) and mlx-lm 0.21.5's (its
cache.py, which imports only mlx, at MLX_LM_0215_CACHE). A file exported from a lossless cache as
a QuantizedKVCache dequantizes, in mlx, close to the original.

Skipped without mlx-lm (`make mlx-test` installs it into .venv-mlx) or the CLI (KVPACK_CLI).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="mlx is not installed (make mlx-test)")
cache_module = pytest.importorskip("mlx_lm.models.cache", reason="mlx-lm is not installed (make mlx-test)")

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "Tests/Fixtures/mlx"
CLI = Path(os.environ.get("KVPACK_CLI") or REPO / ".build/release/kvpack")
OLD = os.environ.get("MLX_LM_0215_CACHE")
if not CLI.exists():
    pytest.skip(f"{CLI} is missing (make build)", allow_module_level=True)


def kvpack(*args: str) -> str:
    done = subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def loader(name: str):
    if not name.endswith("v021"):
        return cache_module.load_prompt_cache
    if not OLD or not Path(OLD).exists():
        pytest.skip("mlx-lm 0.21.5's cache.py is not available (MLX_LM_0215_CACHE)")
    spec = importlib.util.spec_from_file_location("mlx_lm_0215_cache", OLD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load_prompt_cache


def leaves(x):
    if isinstance(x, (tuple, list)):
        return [y for item in x for y in leaves(item)]
    return [x]


@pytest.mark.parametrize("name", ["kv-f16", "kv-bf16", "q4-g64", "q8-g32", "q2-g64", "kv-f16-v021", "q4-g64-v021"])
def test_exported_files_load_in_mlx_lm_with_the_same_state(name, tmp_path):
    kvpack("import", str(FIXTURES / f"{name}.safetensors"), str(tmp_path / "c.kvpack"), "--query-heads", "9",
           "--rope-theta", "100000")
    kvpack("export", str(tmp_path / "c.kvpack"), str(tmp_path / "out.safetensors"), "--format", "mlx")
    load = loader(name)
    original, meta_a = load(str(FIXTURES / f"{name}.safetensors"), return_metadata=True)
    exported, meta_b = load(str(tmp_path / "out.safetensors"), return_metadata=True)
    assert meta_a == meta_b and [type(c).__name__ for c in original] == [type(c).__name__ for c in exported]
    for a, b in zip(original, exported):
        assert a.offset == b.offset == 77
        for x, y in zip(leaves(a.state), leaves(b.state)):
            if isinstance(x, mx.array):
                if x.ndim == 4:  # past the offset: allocation
                    x, y = x[..., :a.offset, :], y[..., :b.offset, :]
                assert x.dtype == y.dtype and x.shape == y.shape and bool(mx.array_equal(x, y))
            else:
                assert x == y


def test_a_lossless_cache_exports_as_a_quantized_cache_mlx_decodes(tmp_path):
    kvpack("import", str(FIXTURES / "kv-f16.safetensors"), str(tmp_path / "c.kvpack"))
    kvpack("export", str(tmp_path / "c.kvpack"), str(tmp_path / "q.safetensors"), "--format", "mlx", "--mlx-bits", "8",
           "--mlx-group-size", "64")
    [q0, _] = cache_module.load_prompt_cache(str(tmp_path / "q.safetensors"))
    [d0, _] = cache_module.load_prompt_cache(str(FIXTURES / "kv-f16.safetensors"))
    keys = np.array(mx.dequantize(*q0.state[0], group_size=64, bits=8).astype(mx.float32))[..., :77, :]
    reference = np.array(d0.state[0].astype(mx.float32))[..., :77, :]
    error = np.linalg.norm(keys - reference) / np.linalg.norm(reference)
    assert 0 < error < 0.01, error
