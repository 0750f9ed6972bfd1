import os
from pathlib import Path

import numpy as np
import pytest
from conftest import cell, png_bytes, write_competition, write_zip
from PIL import Image

from malaria import archive, cache
from malaria.archive import DataError


def test_decode_pads_to_square_on_black() -> None:
    image = np.full((10, 20, 3), 200, np.uint8)
    out = cache.decode(png_bytes(image), 20)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    assert out[0].max() == 0 and out[-1].max() == 0  # padding rows are black
    assert out[10, 10].tolist() == [200, 200, 200]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "LA"])
def test_every_png_mode_becomes_rgb(mode: str) -> None:
    rgb = Image.fromarray(cell(3, 16))
    if mode == "I;16":
        image = Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257))
    else:
        image = rgb.convert(mode)
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    out = cache.decode(buffer.getvalue(), 16)
    assert out.shape == (16, 16, 3)
    assert out.std() > 10  # content survived, not flattened to black or white


def test_transparent_pixels_become_black() -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 255  # white, but fully transparent
    out = cache.decode(png_bytes(rgba, "RGBA"), 8)
    assert out.max() == 0


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


def test_corrupt_png_is_named_and_no_cache_is_left(tmp_path: Path) -> None:
    folder = write_competition(tmp_path / "data", n=4)
    table = archive.load_train(folder)
    members = {m: png_bytes(cell(i)) for i, m in enumerate(table.members)}
    members[table.members[2]] = png_bytes(cell(2))[:40]
    write_zip(folder / "train_data.zip", members)
    with pytest.raises(DataError, match=table.ids[2]):
        cache.build(archive.load_train(folder), 16, tmp_path / "cache", "train", workers=1)
    assert list((tmp_path / "cache").iterdir()) == []
