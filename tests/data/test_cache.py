"""The decode cache: built once, reused, rebuilt when stale or damaged (bad images: test_reliability.py)."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import png_bytes, write_competition

from malaria.data import archive
from malaria.data import cache


def test_decode_pads_to_square_on_black() -> None:
    image = np.full((10, 20, 3), 200, np.uint8)
    out = cache.decode(png_bytes(image), 20)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    assert out[0].max() == 0 and out[-1].max() == 0  # padding rows are black
    assert out[10, 10].tolist() == [200, 200, 200]


def test_cache_is_built_once_and_reused(tmp_path: Path) -> None:
    table = archive.load_train(write_competition(tmp_path / "data", n=8))
    path = cache.build(table, 16, tmp_path / "cache", "train", workers=1)
    images = np.load(path)
    assert images.shape == (8, 16, 16, 3)
    assert len({images[i].tobytes() for i in range(8)}) == 8
    mtime = path.stat().st_mtime_ns
    assert cache.build(table, 16, tmp_path / "cache", "train", workers=1) == path
    assert path.stat().st_mtime_ns == mtime
    assert cache.build(table, 24, tmp_path / "cache", "train", workers=1) != path  # size is part of the key


def test_truncated_cache_is_rebuilt(tmp_path: Path) -> None:
    table = archive.load_train(write_competition(tmp_path / "data", n=8))
    path = cache.build(table, 16, tmp_path / "cache", "train", workers=1)
    good = np.load(path).copy()
    path.write_bytes(path.read_bytes()[:200])
    rebuilt = cache.build(table, 16, tmp_path / "cache", "train", workers=1)
    np.testing.assert_array_equal(np.load(rebuilt), good)


def test_changed_zip_gets_a_new_cache(tmp_path: Path) -> None:
    folder = write_competition(tmp_path / "data", n=8)
    first = cache.build(archive.load_train(folder), 16, tmp_path / "cache", "train", workers=1)
    zip_path = folder / "train_data.zip"
    os.utime(zip_path, ns=(0, zip_path.stat().st_mtime_ns + 10**9))
    assert cache.build(archive.load_train(folder), 16, tmp_path / "cache", "train", workers=1) != first


def _built(tmp_path: Path) -> tuple[archive.ImageTable, Path]:
    table = archive.load_train(write_competition(tmp_path / "data", n=8))
    return table, cache.build(table, 16, tmp_path / "cache", "train", workers=1)


def test_damaged_cache_is_detected_and_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    table, path = _built(tmp_path)
    good = path.read_bytes()
    damaged = bytearray(good)
    damaged[-100] ^= 0xFF  # same size, same header: only the checksum can tell
    path.write_bytes(bytes(damaged))
    assert not cache.is_valid(path, cache.cache_key(table, 16), (8, 16, 16, 3))
    assert "does not match its checksum" in caplog.text
    assert cache.build(table, 16, tmp_path / "cache", "train", workers=1) == path
    assert path.read_bytes() == good


def test_cache_without_checksum_is_rebuilt(tmp_path: Path) -> None:
    table, path = _built(tmp_path)
    meta = path.with_suffix(".json")
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "crc32"}))
    assert not cache.is_valid(path, cache.cache_key(table, 16), (8, 16, 16, 3))
    cache.build(table, 16, tmp_path / "cache", "train", workers=1)
    assert "crc32" in json.loads(meta.read_text())


def test_killed_builds_leave_no_temporary_files_behind(tmp_path: Path) -> None:
    table = archive.load_train(write_competition(tmp_path / "data", n=8))
    stem = f"train-16px-{cache.cache_key(table, 16)}"
    (tmp_path / "cache").mkdir()
    dead = _finished_pid()
    abandoned = tmp_path / "cache" / f".{stem}.{dead}.tmp.npy"
    in_progress = tmp_path / "cache" / f".{stem}.{os.getppid()}.tmp.npy"
    abandoned.write_bytes(b"half a cache")
    in_progress.write_bytes(b"another process is still writing this")
    cache.build(table, 16, tmp_path / "cache", "train", workers=1)
    assert not abandoned.exists() and in_progress.exists()


def _finished_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid
