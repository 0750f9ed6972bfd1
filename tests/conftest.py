"""Shared fixtures: tiny generated competitions, and the real NIH sample when it is present."""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

# Tests never touch the network: no hub weights, no W&B uploads, no update checks.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")

import numpy as np
import pytest
from PIL import Image

import postgres
from malaria.data.demo import make_demo_competition

REPO = Path(__file__).resolve().parents[1]
REALDATA = REPO.parent / "shared" / "realdata" / "dev"

# configs/default.yaml shrunk to seconds on the demo data, for every test that trains (`from conftest import
# TINY`), in any working directory; a test appends what it varies, and later flags win.
TINY = [
    "--config", str(REPO / "configs" / "default.yaml"),
    "--trainer.max_epochs", "1",
    "--trainer.enable_model_summary", "false",
    "--data.image_size", "32",
    "--data.batch_size", "16",
    "--data.num_workers", "0",
    "--model.model_kwargs", '{"widths": [8, 16, 32]}',
    "--wandb.mode", "disabled",
]


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic competition in the real layout (train/test zips, CSVs)."""
    return make_demo_competition(tmp_path_factory.mktemp("demo") / "data", n_train=240, n_test=40, seed=1)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server of this session's own (tests/postgres.py): skipped where none can start, a
    failure instead where the environment requires one (CI sets MALARIA_REQUIRE_POSTGRES)."""
    try:
        server = postgres.Server()
    except postgres.Unavailable as why:
        if os.environ.get(postgres.REQUIRED):
            pytest.fail(f"{postgres.REQUIRED} is set, and no PostgreSQL server could start: {why}")
        pytest.skip(f"no PostgreSQL server: {why}")
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def realdata() -> Path:
    if not (REALDATA / "train_data.zip").exists():
        pytest.skip(f"{REALDATA} is absent (real NIH sample lives beside the repo in ../shared)")
    return REALDATA


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def cell(seed: int, size: int = 24) -> np.ndarray:
    """A random RGB image, different per seed."""
    return np.random.default_rng(seed).integers(0, 256, (size, size + seed % 5, 3), dtype=np.uint8)


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def write_competition(folder: Path, n: int = 12, labels_csv: str | None = None, folder_in_zip: str = "train/",
                      n_test: int = 4) -> Path:
    """A tiny competition: n train PNGs named like NIH slides, and n_test test PNGs."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"C{10 + i % 4}P{i % 4}ThinF_IMG_20150101_000000_cell_{i}.png" for i in range(n)]
    write_zip(folder / "train_data.zip", {folder_in_zip + name: png_bytes(cell(i)) for i, name in enumerate(names)})
    if labels_csv is None:
        labels_csv = "img_name,label\n" + "".join(f"{name},{i % 2}\n" for i, name in enumerate(names))
    (folder / "train_labels.csv").write_text(labels_csv)
    test_names = [f"C99ThinF_IMG_20150101_000000_cell_{i}.png" for i in range(n_test)]
    write_zip(folder / "test_data.zip", {"test/" + name: png_bytes(cell(100 + i)) for i, name in enumerate(test_names)})
    return folder


@pytest.fixture
def no_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No API key anywhere: not in the environment, not in ~/.netrc; wandb's own folders in tmp."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))


def read_wandb_log(path: Path) -> list:
    """The records of an offline run's transaction log: LevelDB-log framing (32 KiB blocks of
    7-byte-headed chunks, after W&B's 7-byte file header) around protobuf `Record`s."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records
