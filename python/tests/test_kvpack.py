"""The kvpack Python package over libKVPackC: round trips, attention, zero-copy rows, convert,
validate, and bad files and arguments that must raise, never crash. numpy and pytest only.
Run by `make python-test` (part of `make test`)."""
from __future__ import annotations

import ctypes
import gc
import threading
from pathlib import Path

import numpy as np
import pytest

import kvpack
from kvpack import _abi

L, QH, KVH, D, SEG = 3, 6, 2, 32, 16


def cache(tokens: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((L, KVH, tokens, D)).astype(np.float32) * np.linspace(0.5, 3, D, dtype=np.float32)
    v = rng.standard_normal((L, KVH, tokens, D)).astype(np.float32)
    return k, v


def write(path: Path, k: np.ndarray, v: np.ndarray, scheme: str = "raw:f32", **options) -> None:
    with kvpack.create(path, layers=L, query_heads=QH, kv_heads=KVH, head_dim=D, scheme=scheme, segment_tokens=SEG,
                       rope_layout="rotate-half", rope_theta=10000.0, max_positions=4096, durable=False,
                       **options) as w:
        w.append(k, v, np.arange(k.shape[2]) + 1000)


def reference_attention(k: np.ndarray, v: np.ndarray, q: np.ndarray) -> np.ndarray:
    """softmax(q k^T / sqrt(d)) v per query head, in float64; k, v: [kv_heads, T, D]."""
    out = np.empty(q.shape, dtype=np.float64)
    group = q.shape[0] // k.shape[0]
    for h in range(q.shape[0]):
        s = k[h // group].astype(np.float64) @ q[h].astype(np.float64) / np.sqrt(q.shape[1])
        w = np.exp(s - s.max())
        out[h] = (w / w.sum()) @ v[h // group].astype(np.float64)
    return out


def test_struct_layouts_match_the_header():
    # The sizes Sources/CKVPackABI/abi_checks.c asserts in C.
    assert ctypes.sizeof(_abi.Error) == 1104
    assert ctypes.sizeof(_abi.Geometry) == 40
    assert ctypes.sizeof(_abi.Rows) == 32
    assert ctypes.sizeof(_abi.CreateOptions) == 104
    assert kvpack.abi_version() == _abi.ABI_VERSION
    assert kvpack.format_major() >= 2


def test_round_trip_is_exact_and_keeps_everything(tmp_path):
    k, v = cache(50)
    path = tmp_path / "a.kvpack"
    with kvpack.create(path, layers=L, query_heads=QH, kv_heads=KVH, head_dim=D, scheme="raw:f32", segment_tokens=SEG,
                       rope_layout="rotate-half", rope_theta=10000.0, metadata={"model": "test", "ü": "ß"},
                       model_fingerprint=bytes(range(16)), durable=False) as w:
        # Three batches, three input forms: lhtd float32, lthd float32, lhtd float64 non-contiguous.
        w.append(k[:, :, :20], v[:, :, :20], np.arange(20))
        w.append(np.ascontiguousarray(k[:, :, 20:35].transpose(0, 2, 1, 3)),
                 np.ascontiguousarray(v[:, :, 20:35].transpose(0, 2, 1, 3)), np.arange(20, 35), layout="lthd")
        w.commit()
        w.append(k[:, :, 35:].astype(np.float64), v[:, :, 35:].astype(np.float64), np.arange(35, 50),
                 positions=np.arange(35, 50) + 7)
        assert w.tokens == 50
    with kvpack.open(path) as f:
        assert len(f) == 50
        g = f.geometry
        assert (g.layers, g.query_heads, g.kv_heads, g.head_dim, g.segment_tokens) == (L, QH, KVH, D, SEG)
        assert g.rope_layout == "rotate-half" and g.rope_theta == 10000.0 and g.group_size == QH // KVH
        for layer in range(L):
            np.testing.assert_array_equal(f.keys(layer), k[layer])
            np.testing.assert_array_equal(f.values(layer), v[layer])
            np.testing.assert_array_equal(f.keys(layer, 10, 40, head=1), k[layer, 1, 10:40])
        half = f.values(2, dtype=np.float16)
        assert half.dtype == np.float16
        np.testing.assert_array_equal(half, v[2].astype(np.float16))
        np.testing.assert_array_equal(f.token_ids(), np.arange(50))
        np.testing.assert_array_equal(f.positions()[35:], np.arange(35, 50) + 7)
        assert f.metadata == {"model": "test", "ü": "ß"}
        assert f.schemes == [("raw:f32", "raw:f32")] * L
        assert f.info()["modelFingerprint"] == bytes(range(16)).hex()


def test_attention_matches_a_float64_reference(tmp_path):
    k, v = cache(70, seed=1)
    write(tmp_path / "a.kvpack", k, v)
    q = np.random.default_rng(2).standard_normal((4, QH, D)).astype(np.float32)
    with kvpack.open(tmp_path / "a.kvpack") as f:
        out = f.attend(1, q)
        assert out.shape == q.shape
        for i in range(4):
            np.testing.assert_allclose(out[i], reference_attention(k[1], v[1], q[i]), atol=2e-5)
        np.testing.assert_allclose(f.attend(1, q[0], start=10, stop=30),
                                   reference_attention(k[1, :, 10:30], v[1, :, 10:30], q[0]), atol=2e-5)
        np.testing.assert_array_equal(f.attend(1, q, threads=2), out)
        np.testing.assert_allclose(f.attend(1, q[0], scale=0.5), reference_attention(k[1] * 0.5 * np.sqrt(D), v[1], q[0]),
                                   atol=2e-5)


def test_threads_share_one_reader(tmp_path):
    k, v = cache(200, seed=3)
    write(tmp_path / "a.kvpack", k, v, scheme="int:k4v2")
    q = np.random.default_rng(4).standard_normal((QH, D)).astype(np.float32)
    with kvpack.open(tmp_path / "a.kvpack") as f:
        expected = [f.attend(layer, q) for layer in range(L)]
        results: list[list[np.ndarray]] = [[] for _ in range(8)]

        def work(i: int) -> None:
            for _ in range(20):
                results[i].append(f.attend(i % L, q))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(8):
            for r in results[i]:
                np.testing.assert_array_equal(r, expected[i % L])


def test_zero_copy_rows(tmp_path):
    k, v = cache(45, seed=5)
    write(tmp_path / "a.kvpack", k, v)
    f = kvpack.open(tmp_path / "a.kvpack")
    runs = list(f.mapped(2, 1, "values"))
    assert [first for first, _ in runs] == [0, 16, 32]  # two sealed blocks, then the unsealed tail
    joined = np.concatenate([view for _, view in runs])
    np.testing.assert_array_equal(joined, v[2, 1])
    view = runs[0][1]
    assert not view.flags.writeable and not view.flags.owndata
    with pytest.raises(ValueError):
        view[0, 0] = 1
    # The view keeps the mapping alive after the reader is closed and gone.
    f.close()
    del f, runs
    gc.collect()
    np.testing.assert_array_equal(view, v[2, 1, :16])


def test_quantized_scheme_reads_and_attends(tmp_path):
    k, v = cache(100, seed=6)
    write(tmp_path / "q.kvpack", k, v, scheme="int:k4v2")
    q = np.random.default_rng(7).standard_normal((QH, D)).astype(np.float32)
    with kvpack.open(tmp_path / "q.kvpack") as fast, kvpack.open(tmp_path / "q.kvpack", exact=True) as exact:
        assert fast.schemes[0] == ("int:k4v4:g32", "int:k2v2:g32")  # int:k4v2: per-token groups of 32
        keys = exact.keys(0)
        error = np.linalg.norm(keys - k[0]) / np.linalg.norm(k[0])
        assert 0 < error < 0.15, error  # 4-bit keys: lossy, not garbage
        # The unsealed tail is kept as rows of the scheme's residual type (f16 for int).
        np.testing.assert_array_equal(keys[:, 96:], k[0, :, 96:].astype(np.float16))
        assert fast.rows(0, 0, "keys", 5) is None  # sealed blocks are encoded: no plain rows
        first, tail = fast.rows(0, 0, "keys", 97)
        assert first == 96 and tail.dtype == np.float16
        np.testing.assert_allclose(exact.attend(0, q), reference_attention(exact.keys(0), exact.values(0), q),
                                   atol=2e-5)
        approx = fast.attend(0, q)
        assert np.abs(approx - exact.attend(0, q)).max() < 0.05


def test_resume_continues_the_file(tmp_path):
    k, v = cache(40, seed=8)
    path = tmp_path / "a.kvpack"
    write(path, k[:, :, :25], v[:, :, :25])
    with kvpack.resume(path, durable=False) as w:
        assert w.tokens == 25
        with pytest.raises(kvpack.KVPackError) as locked:
            kvpack.resume(path)
        assert locked.value.code == "locked"
        w.append(k[:, :, 25:], v[:, :, 25:], np.arange(25, 40) + 1000)
    with kvpack.open(path) as f:
        np.testing.assert_array_equal(f.keys(1), k[1])
        np.testing.assert_array_equal(f.positions(), np.arange(40))


def test_convert_and_validate(tmp_path):
    k, v = cache(64, seed=9)
    write(tmp_path / "a.kvpack", k, v)
    report = kvpack.convert(tmp_path / "a.kvpack", tmp_path / "b.kvpack", "nsn:2")
    assert report["tokens"] == 64 and report["after"]["total"] < report["before"]["total"]
    assert 0 < report["keyRelativeError"] < 1
    checked = kvpack.validate(tmp_path / "b.kvpack", deep=True)
    assert checked.valid and not [p for p in checked.problems if p["severity"] == "error"]
    with pytest.raises(kvpack.KVPackError) as exists:
        kvpack.convert(tmp_path / "a.kvpack", tmp_path / "b.kvpack", "nsn:2")
    assert "exists" in str(exists.value)
    with pytest.raises(kvpack.KVPackError) as bad:
        kvpack.convert(tmp_path / "a.kvpack", tmp_path / "c.kvpack", "nosuch:3")
    assert bad.value.code == "invalidArgument" and not (tmp_path / "c.kvpack").exists()


def test_bad_files_raise_with_offset_and_field(tmp_path):
    with pytest.raises(kvpack.KVPackError) as missing:
        kvpack.open(tmp_path / "missing.kvpack")
    assert missing.value.code == "io" and "missing.kvpack" in str(missing.value)
    (tmp_path / "text.kvpack").write_bytes(b"this is not a kvpack file, it is text " * 4)
    with pytest.raises(kvpack.KVPackError) as foreign:
        kvpack.open(tmp_path / "text.kvpack")
    assert foreign.value.code == "badMagic" and foreign.value.offset == 0
    report = kvpack.validate(tmp_path / "text.kvpack")
    assert not report.valid and report.problems


def test_damaged_copies_never_crash(tmp_path):
    k, v = cache(20, seed=10)
    write(tmp_path / "a.kvpack", k, v, scheme="int:k2v2")
    good = (tmp_path / "a.kvpack").read_bytes()
    q = np.ones((QH, D), dtype=np.float32)
    outcomes = {"opened": 0, "refused": 0, "read errors": 0}
    damaged = tmp_path / "d.kvpack"
    # Every 3rd byte flipped, and truncations: each gives data or a KVPackError, nothing else.
    cases = [good[:n] for n in range(0, len(good), 97)]
    cases += [good[:i] + bytes([good[i] ^ 0x10]) + good[i + 1:] for i in range(0, len(good), 3)]
    for data in cases:
        damaged.write_bytes(data)
        try:
            f = kvpack.open(damaged)
        except kvpack.KVPackError as e:
            assert str(e) and e.code in _abi.STATUS_NAMES.values()
            outcomes["refused"] += 1
            continue
        outcomes["opened"] += 1
        try:
            if f.tokens:
                for layer in range(f.geometry.layers):
                    f.keys(layer)
                    f.values(layer)
                    if f.geometry.query_heads == QH and f.geometry.head_dim == D:
                        f.attend(layer, q)
        except kvpack.KVPackError as e:
            assert str(e)
            outcomes["read errors"] += 1
        f.close()
    assert outcomes["refused"] > 0 and outcomes["read errors"] > 0, outcomes


def test_bad_arguments_raise(tmp_path):
    k, v = cache(10)
    write(tmp_path / "a.kvpack", k, v)
    with kvpack.open(tmp_path / "a.kvpack") as f:
        with pytest.raises(IndexError):
            f.keys(L)
        with pytest.raises(IndexError):
            f.keys(0, 5, 11)
        with pytest.raises(TypeError):
            f.keys(0, dtype=np.int8)
        with pytest.raises(ValueError):
            f.attend(0, np.zeros((QH, D + 1), dtype=np.float32))
        with pytest.raises(kvpack.KVPackError) as e:
            f.attend(0, np.zeros((QH, D), dtype=np.float32), start=3, stop=3)
        assert e.value.code == "invalidArgument"
    with pytest.raises(ValueError):
        f.keys(0)  # closed
    with pytest.raises(kvpack.KVPackError) as e:
        kvpack.create(tmp_path / "b.kvpack", layers=1, query_heads=3, kv_heads=2, head_dim=8)
    assert "multiple" in str(e.value)
    with pytest.raises(kvpack.KVPackError) as e:
        kvpack.create(tmp_path / "a.kvpack", layers=L, query_heads=QH, kv_heads=KVH, head_dim=D)
    assert "exists" in str(e.value)
    with pytest.raises(kvpack.KVPackError) as e:
        kvpack.create(tmp_path / "c.kvpack", layers=L, query_heads=QH, kv_heads=KVH, head_dim=D, scheme="int:auto:3")
    assert e.value.code in ("needsCalibration", "invalidArgument")
    with kvpack.create(tmp_path / "d.kvpack", layers=L, query_heads=QH, kv_heads=KVH, head_dim=D) as w:
        with pytest.raises(ValueError):
            w.append(k[:, :, :2], v[:, :, :3], [1, 2])
        with pytest.raises(ValueError):
            w.append(k[:, :, :2], v[:, :, :2], [1, 2], positions=[1])
