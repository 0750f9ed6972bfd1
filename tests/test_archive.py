from pathlib import Path

import numpy as np
import pytest
from conftest import cell, png_bytes, write_competition, write_zip

from malaria import archive
from malaria.archive import DataError


def test_load_train_matches_ids_at_any_depth(tmp_path: Path) -> None:
    folder = write_competition(tmp_path, n=6, folder_in_zip="train_data/train/")
    table = archive.load_train(folder)
    assert len(table) == 6
    assert all(m.startswith("train_data/train/") and m.endswith(i) for i, m in zip(table.ids, table.members))
    assert table.labels.tolist() == [0, 1, 0, 1, 0, 1]


def test_accepts_id_header_bom_crlf_and_train_data_csv(tmp_path: Path) -> None:
    folder = write_competition(tmp_path, n=4)
    names = archive.load_train(folder).ids
    text = "\ufeffid,label\r\n" + "".join(f"{n},1\r\n" for n in names) + "\r\n"
    (folder / "train_labels.csv").unlink()
    (folder / "train_data.csv").write_text(text, newline="")
    table = archive.load_train(folder)
    assert table.ids == names and table.labels.tolist() == [1, 1, 1, 1]


def test_test_ids_follow_sample_submission_order(tmp_path: Path) -> None:
    folder = write_competition(tmp_path, n_test=4)
    ids = sorted(archive.list_images(folder / "test_data.zip"), reverse=True)
    (folder / "sample_submission.csv").write_text("img_name,label\n" + "".join(f"{i},0\n" for i in ids))
    assert archive.load_test(folder).ids == ids
    (folder / "sample_submission.csv").unlink()
    assert archive.load_test(folder).ids == sorted(ids)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("img_name,label\nmissing.png,1\n", "have no image"),
        ("img_name,label\n{0},1\n{0},0\n", "duplicate ids"),
        ("img_name,label\n{0},2\n", "line 2"),
        ("img_name,label\n{0},yes\n", "'yes'"),
        ("img_name,label\n{0},1.0\n", "'1.0'"),
        ("name,target\n{0},1\n", "expected a header"),
        ("img_name,label\n", "no rows"),
        ("", "not a readable CSV"),
    ],
)
def test_bad_label_csv_names_the_culprit(tmp_path: Path, rows: str, message: str) -> None:
    folder = write_competition(tmp_path, n=4)
    first = archive.load_train(folder).ids[0]
    csv = folder / "train_labels.csv"
    csv.write_text(rows.format(first))
    with pytest.raises(DataError, match=message) as err:
        archive.load_train(folder)
    assert str(csv) in str(err.value)


def test_images_without_labels_are_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = write_competition(tmp_path, n=4)
    csv = folder / "train_labels.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(lines[:-1]) + "\n")
    assert len(archive.load_train(folder)) == 3
    assert "not listed" in caplog.text


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"train/readme.txt": b"hi"}, "no PNG images"),
        ({"../evil.png": png_bytes(cell(0))}, "unsafe member paths"),
        ({"/abs.png": png_bytes(cell(0))}, "unsafe member paths"),
        ({"a/x.png": png_bytes(cell(0)), "b/x.png": png_bytes(cell(1))}, "several folders"),
    ],
)
def test_bad_archives(tmp_path: Path, members: dict, message: str) -> None:
    path = write_zip(tmp_path / "train_data.zip", members)
    with pytest.raises(DataError, match=message):
        archive.list_images(path)


def test_junk_members_are_ignored(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "x.zip", {
        "train/a.png": png_bytes(cell(0)),
        "__MACOSX/train/._a.png": b"junk",
        "train/.DS_Store": b"junk",
        "train/notes.txt": b"text",
    })
    assert archive.list_images(path) == {"a.png": "train/a.png"}


def test_truncated_zip_is_reported(tmp_path: Path) -> None:
    folder = write_competition(tmp_path)
    path = folder / "train_data.zip"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match="not a readable zip"):
        archive.load_train(folder)


def test_has_competition(tmp_path: Path) -> None:
    assert not archive.has_competition(tmp_path)
    assert archive.has_competition(write_competition(tmp_path))
    assert isinstance(archive.load_train(tmp_path).labels, np.ndarray)
