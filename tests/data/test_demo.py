"""The synthetic demo competition: real file layout, determinism, safe writes, learnable images."""

from __future__ import annotations

import csv
import io
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from malaria.common import errors
from malaria.data import archive
from malaria.data.demo import DEMO_FILES, MARKER, MARKER_HEADING, main, make_demo_competition

N_TRAIN, N_TEST = 60, 20
# The slide (patient) of an NIH file name, as the real data's README defines it.
SLIDE = re.compile(r"^(C\d+[AB]?)(?:N?_?)(P\d+)?")


def _rows(path: Path) -> list[tuple[str, int]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == ["img_name", "label"]
        return [(name, int(label)) for name, label in reader]


def _pngs(zip_path: Path) -> dict[str, np.ndarray]:
    """Decoded images by member name (folder included)."""
    with zipfile.ZipFile(zip_path) as archive:
        return {name: np.asarray(Image.open(io.BytesIO(archive.read(name)))) for name in archive.namelist()}


def _slide(name: str) -> str:
    match = SLIDE.match(name)
    assert match, name
    return match.group(1) + (match.group(2) or "")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_competition(tmp_path_factory.mktemp("demo") / "data", N_TRAIN, N_TEST, seed=3)


@pytest.fixture(scope="module")
def train_images(demo: Path) -> dict[str, np.ndarray]:
    return _pngs(demo / "train_data.zip")


def test_writes_the_competition_files_and_marker(demo: Path) -> None:
    assert sorted(p.name for p in demo.iterdir()) == sorted([*DEMO_FILES, MARKER])
    marker = (demo / MARKER).read_text(encoding="utf-8")
    assert "SYNTHETIC DEMO DATA" in marker and "malaria.data.demo" in marker
    assert f"n_train={N_TRAIN}" in marker.splitlines()
    for name in DEMO_FILES:
        if name.endswith(".csv"):
            assert b"\r" not in (demo / name).read_bytes(), name


@pytest.mark.parametrize(
    ("split", "labels_csv", "n"),
    [("train", "train_labels.csv", N_TRAIN), ("test", "test_labels.csv", N_TEST)],
)
def test_csv_ids_match_zip_members_with_balanced_labels(
    demo: Path, split: str, labels_csv: str, n: int
) -> None:
    rows = _rows(demo / labels_csv)
    with zipfile.ZipFile(demo / f"{split}_data.zip") as archive:
        members = archive.namelist()
    assert len(rows) == len(members) == n
    assert all(member.startswith(f"{split}/") and member.endswith(".png") for member in members)
    assert sorted(f"{split}/{name}" for name, _ in rows) == sorted(members)
    labels = [label for _, label in rows]
    assert set(labels) == {0, 1} and sum(labels) == n // 2


def test_sample_submission_lists_the_test_ids_in_order_all_zero(demo: Path) -> None:
    sample = _rows(demo / "sample_submission.csv")
    answers = _rows(demo / "test_labels.csv")
    assert [name for name, _ in sample] == [name for name, _ in answers]
    assert {label for _, label in sample} == {0}


def test_zips_are_stored_sorted_with_fixed_timestamps(demo: Path) -> None:
    with zipfile.ZipFile(demo / "train_data.zip") as archive:
        infos = archive.infolist()
    assert [i.filename for i in infos] == sorted(i.filename for i in infos)
    assert {i.compress_type for i in infos} == {zipfile.ZIP_STORED}
    assert {i.date_time for i in infos} == {(2018, 4, 1, 0, 0, 0)}


def test_same_seed_same_bytes_other_seed_differs(demo: Path, tmp_path: Path) -> None:
    again = make_demo_competition(tmp_path / "again", N_TRAIN, N_TEST, seed=3)
    other = make_demo_competition(tmp_path / "other", N_TRAIN, N_TEST, seed=4)
    for name in [*DEMO_FILES, MARKER]:
        assert (again / name).read_bytes() == (demo / name).read_bytes(), name
    assert (other / "train_data.zip").read_bytes() != (demo / "train_data.zip").read_bytes()
    assert (other / "test_data.zip").read_bytes() != (demo / "test_data.zip").read_bytes()


def test_images_are_rgb_cells_of_varying_size_on_black(train_images: dict[str, np.ndarray]) -> None:
    shapes = {image.shape for image in train_images.values()}
    assert all(len(s) == 3 and s[2] == 3 and 90 <= min(s[:2]) and max(s[:2]) <= 180 for s in shapes)
    assert len(shapes) > 20 and any(h != w for h, w, _ in shapes)
    for name, image in train_images.items():
        assert image.dtype == np.uint8, name
        corners = image[[0, 0, -1, -1], [0, -1, 0, -1]]
        assert not corners.any(), f"{name}: corners should be black background"
        cell_fraction = image.any(axis=2).mean()
        assert 0.6 < cell_fraction < 0.95, f"{name}: the cell should fill most of the crop"


def test_slides_follow_nih_naming_and_splits_are_disjoint(demo: Path) -> None:
    train = _rows(demo / "train_labels.csv")
    test = _rows(demo / "test_labels.csv")
    train_slides = {_slide(name) for name, _ in train}
    test_slides = {_slide(name) for name, _ in test}
    assert len(train_slides) >= 6 and len(test_slides) >= 2
    assert not train_slides & test_slides
    assert all("_IMG_" in name and re.search(r"_cell_\d+\.png$", name) for name, _ in train + test)
    for name, label in train + test:
        if "P" not in _slide(name):  # a healthy patient's slide holds uninfected cells only
            assert label == 0, name
    labels_by_slide: dict[str, set[int]] = {}
    for name, label in train:
        labels_by_slide.setdefault(_slide(name), set()).add(label)
    assert any(labels == {0, 1} for labels in labels_by_slide.values())


def test_dark_purple_pixels_separate_the_classes(demo: Path, train_images: dict[str, np.ndarray]) -> None:
    """Parasites are the only dark purple stain: a one-number feature already beats chance by far."""
    def purple_fraction(image: np.ndarray) -> float:
        r, g, b = (image[..., c].astype(int) for c in range(3))
        return float(((b - g > 45) & (g < 110) & (r > g + 40)).mean())

    rows = _rows(demo / "train_labels.csv")
    feature = np.array([purple_fraction(train_images[f"train/{name}"]) for name, _ in rows])
    labels = np.array([label for _, label in rows])
    accuracy = max(((feature > t) == labels).mean() for t in np.unique(feature))
    assert accuracy >= 0.85
    # Not a trivial whole-image cue: the mean colour alone does not give the label away.
    mean_blue = np.array([train_images[f"train/{name}"][..., 2].mean() for name, _ in rows])
    assert max(((mean_blue > t) == labels).mean() for t in np.unique(mean_blue)) < 0.85


def test_second_call_reuses_the_demo_untouched(tmp_path: Path) -> None:
    out = make_demo_competition(tmp_path / "d", 8, 4, seed=0)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert make_demo_competition(out, 8, 4, seed=0) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"], "no temporary folder may be left behind"


def test_other_arguments_replace_the_demo_files_only(tmp_path: Path) -> None:
    out = make_demo_competition(tmp_path / "d", 8, 4, seed=0)
    (out / ".cache").mkdir()
    (out / ".cache" / "train-64px.npy").write_bytes(b"cache")
    make_demo_competition(out, 10, 4, seed=0)
    assert len(_rows(out / "train_labels.csv")) == 10
    assert "n_train=10" in (out / MARKER).read_text(encoding="utf-8").splitlines()
    assert (out / ".cache" / "train-64px.npy").read_bytes() == b"cache"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_an_unfinished_demo_is_rebuilt(tmp_path: Path) -> None:
    out = make_demo_competition(tmp_path / "d", 8, 4, seed=0)
    expected = (out / "test_data.zip").read_bytes()
    (out / "test_data.zip").unlink()
    make_demo_competition(out, 8, 4, seed=0)
    assert (out / "test_data.zip").read_bytes() == expected
    # An update cut short leaves our heading without arguments: rebuilt, not refused.
    (out / MARKER).write_text(MARKER_HEADING + "\n", encoding="utf-8")
    make_demo_competition(out, 8, 4, seed=0)
    assert "seed=0" in (out / MARKER).read_text(encoding="utf-8").splitlines()


def test_refuses_a_folder_with_user_files(tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "train_labels.csv").write_text("mine\n")
    with pytest.raises(errors.ExistsError, match="no malaria.data.demo DEMO.txt"):
        make_demo_competition(out, 8, 4)
    (out / MARKER).write_text("not ours\n")
    with pytest.raises(errors.ExistsError, match="no malaria.data.demo DEMO.txt"):
        make_demo_competition(out, 8, 4)
    assert (out / "train_labels.csv").read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_fills_an_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    out = make_demo_competition(tmp_path / "d", 8, 4, seed=0)
    assert sorted(p.name for p in out.iterdir()) == sorted([*DEMO_FILES, MARKER])
    train, test = archive.load_train(out), archive.load_test(out)  # a competition the pipeline reads
    assert len(train) == 8 and set(train.labels.tolist()) == {0, 1}
    assert len(test) == 4


def test_rejects_too_few_images(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 2"):
        make_demo_competition(tmp_path / "d", n_train=1)
    assert not (tmp_path / "d").exists()


def test_cli_writes_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["--out", str(tmp_path / "demo"), "--n_train", "12", "--n_test", "6", "--seed", "2"])
    printed = capsys.readouterr().out
    assert "SYNTHETIC" in printed
    assert "train_data.zip: 12 PNGs" in printed and "test_labels.csv: 6 rows, 3 labelled 1" in printed
    main(["--out", str(tmp_path / "demo"), "--n_train", "12", "--n_test", "6", "--seed", "2"])
    assert "kept the existing" in capsys.readouterr().out
