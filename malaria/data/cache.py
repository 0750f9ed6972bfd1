"""Decode every image once into a uint8 array on disk, shared by all later runs and workers.

PNG decoding costs far more than a training step on small images, so it happens once per
(input files, image size): the result is an `.npy` file of shape (N, size, size, 3) that
DataLoader workers memory-map. A cache is identified by a key over the zip's identity, the ids
and the size; it is written to a temporary file and renamed, and its metadata is written last,
so a crash leaves no half-written cache that looks complete. The metadata also holds a CRC-32
of the file, checked before every use (0.8 s for the full 1.35 GB set at 128 px): a cache
damaged on disk is rebuilt, never trusted. Temporary files of builds that were killed are removed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import warnings
import zipfile
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from rich.progress import track

from malaria.common import atomic
from malaria.data.archive import DataError, ImageTable

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHUNK = 512
READ_BLOCK = 1 << 24


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB on a black background, whatever the image's mode (grayscale, 16-bit, palette, alpha)."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        depth = 65535 if image.mode != "F" else 1.0
        scaled = np.asarray(image, dtype=np.float64) * (255.0 / depth)
        image = Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def square(image: Image.Image, size: int) -> np.ndarray:
    """Pad to a centred square with black (the crops' own background), then resize.

    Padding keeps the cell's shape; stretching would turn round cells into ellipses."""
    side = max(image.size)
    canvas = Image.new("RGB", (side, side))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return np.asarray(canvas.resize((size, size), Image.Resampling.BILINEAR))


def decode(data: bytes, size: int) -> np.ndarray:
    """One image file's bytes to a (size, size, 3) uint8 array.

    Images over PIL's decompression-bomb limit (89 megapixels) are refused, not decoded: a cell
    crop is about 150 px wide, and one such image would take gigabytes in every worker."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return square(to_rgb(image), size)


def cache_key(table: ImageTable, size: int) -> str:
    """Changes whenever the zip file, the ids or their order, or the size change."""
    stat = table.zip_path.stat()
    digest = hashlib.sha256()
    digest.update(f"{FORMAT_VERSION}|{size}|{table.zip_path.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    digest.update("\n".join(table.members).encode())
    return digest.hexdigest()[:16]


def _decode_chunk(zip_path: Path, members: list[str], start: int, out_path: Path, size: int) -> list[str]:
    """Decode members into rows start.. of the memory-mapped output; return the unreadable ones.

    Runs in a worker process, which opens its own ZipFile: an open one must never be shared."""
    out = np.load(out_path, mmap_mode="r+")
    bad = []
    with zipfile.ZipFile(zip_path) as archive:
        for offset, member in enumerate(members):
            try:
                out[start + offset] = decode(archive.read(member), size)
            # Whatever fails here (bad CRC, unknown compression, not an image, truncated, too large)
            # is this member's fault: collect them all and name them, instead of one traceback.
            except Exception as err:  # noqa: BLE001
                bad.append(f"{member} ({type(err).__name__}: {err})")
    out.flush()
    return bad


def _metadata_path(npy_path: Path) -> Path:
    return npy_path.with_suffix(".json")


def checksum(path: Path) -> int:
    """CRC-32 of a file's bytes, read in blocks: 0.8 s for the full set at 128 px (1.35 GB, page-cached)."""
    crc = 0
    with path.open("rb") as f:
        while block := f.read(READ_BLOCK):
            crc = zlib.crc32(block, crc)
    return crc


def is_valid(npy_path: Path, key: str, shape: tuple[int, ...]) -> bool:
    """True when a cache exists, is complete, was built from the same inputs and is undamaged."""
    meta_path = _metadata_path(npy_path)
    if not (npy_path.exists() and meta_path.exists()):
        return False
    try:
        meta = json.loads(meta_path.read_text())
        array = np.load(npy_path, mmap_mode="r")
    except (ValueError, OSError):
        log.warning("%s is unreadable; rebuilding it.", npy_path)
        return False
    if meta.get("key") != key or array.shape != shape or array.dtype != np.uint8:
        return False
    if meta.get("crc32") != checksum(npy_path):
        log.warning("%s does not match its checksum (damaged on disk?); rebuilding it.", npy_path)
        return False
    return True


def _remove_abandoned(npy_path: Path) -> None:
    """Delete temporary files that builds killed before finishing left behind (they can be GBs)."""
    for tmp in npy_path.parent.glob(f".{npy_path.stem}.*.tmp.npy"):
        pid = tmp.name[len(npy_path.stem) + 2 :].split(".")[0]
        if pid.isdigit() and not _is_running(int(pid)):
            tmp.unlink(missing_ok=True)


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        pass
    return True


def _allocate(tmp_path: Path, npy_path: Path, shape: tuple[int, ...]) -> None:
    """Create the cache file at its full size before decoding into it.

    A memory map over a sparse file on a full disk gets SIGBUS in the middle of decoding, in a
    worker; reserving the blocks first turns that into errors.WriteError before anything is decoded."""
    try:
        np.lib.format.open_memmap(tmp_path, mode="w+", dtype=np.uint8, shape=shape).flush()
        with tmp_path.open("r+b") as file:
            os.posix_fallocate(file.fileno(), 0, tmp_path.stat().st_size)
    except OSError as err:
        tmp_path.unlink(missing_ok=True)
        if err.errno not in atomic.WRITE_ERRNOS:
            raise
        raise atomic.cannot_write(npy_path, err, int(np.prod(shape))) from None


def build(table: ImageTable, size: int, cache_dir: Path, name: str, workers: int | None = None) -> Path:
    """Return the path of a valid cache for `table`, decoding the images only if needed."""
    key = cache_key(table, size)
    npy_path = cache_dir / f"{name}-{size}px-{key}.npy"
    shape = (len(table), size, size, 3)
    if is_valid(npy_path, key, shape):
        return npy_path

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise atomic.cannot_write(cache_dir, err) from None
    _remove_abandoned(npy_path)
    tmp_path = npy_path.with_name(f".{npy_path.stem}.{os.getpid()}.tmp.npy")
    _allocate(tmp_path, npy_path, shape)
    starts = range(0, len(table), CHUNK)
    workers = workers or min(len(starts), os.cpu_count() or 1)
    try:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [
                pool.submit(_decode_chunk, table.zip_path, table.members[s : s + CHUNK], s, tmp_path, size)
                for s in starts
            ]
            bad = [m for f in track(futures, description=f"Decoding {name} images once") for m in f.result()]
        if bad:
            raise DataError(f"{table.zip_path}: {len(bad)} images cannot be decoded: " + "; ".join(bad[:5]))
        crc = checksum(tmp_path)
        os.replace(tmp_path, npy_path)
    finally:
        tmp_path.unlink(missing_ok=True)
    meta_path = _metadata_path(npy_path)
    atomic.write_text(meta_path, json.dumps({"key": key, "shape": shape, "zip": str(table.zip_path), "crc32": crc}))
    return npy_path


def derive(source: Path, tag: str, transform: Callable[[np.ndarray, slice], np.ndarray], chunk: int = 4096) -> Path:
    """A cache made from another by `transform(images, rows)` chunk by chunk (per-slide colour
    standardisation, say), next to it as `<source>-<tag>.npy`; built once, atomically and
    checksummed as a decoded cache is. `tag` names the transform and everything it depends on."""
    pixels = np.load(source, mmap_mode="r")
    npy_path = source.with_name(f"{source.stem}-{tag}.npy")
    key = f"{json.loads(_metadata_path(source).read_text())['key']}-{tag}"
    if is_valid(npy_path, key, pixels.shape):
        return npy_path
    _remove_abandoned(npy_path)
    tmp_path = npy_path.with_name(f".{npy_path.stem}.{os.getpid()}.tmp.npy")
    _allocate(tmp_path, npy_path, pixels.shape)
    try:
        out = np.load(tmp_path, mmap_mode="r+")
        for start in range(0, len(pixels), chunk):
            rows = slice(start, start + chunk)
            out[rows] = transform(pixels[rows], rows)
        out.flush()
        del out
        crc = checksum(tmp_path)
        os.replace(tmp_path, npy_path)
    finally:
        tmp_path.unlink(missing_ok=True)
    atomic.write_text(_metadata_path(npy_path), json.dumps({"key": key, "shape": pixels.shape, "source": str(source),
                                                            "crc32": crc}))
    return npy_path
