"""Submission CSVs: writing without ever overwriting, and validation with line-precise errors."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from malaria.common import errors
from malaria.prediction import submission
from malaria.prediction.submission import (
    SubmissionError,
    default_submission_path,
    read_sample_submission,
    sidecar_path,
    validate_submission,
    write_submission,
)

IDS = ["a.png", "b.png", "c.png"]


def _csv(tmp_path: Path, text: str, name: str = "sub.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


def test_default_path_is_timestamped_and_safe(tmp_path: Path) -> None:
    path = default_submission_path("resnet/18 final", tmp_path)
    assert path.parent == tmp_path
    assert re.fullmatch(r"resnet-18-final-\d{8}-\d{6}\.csv", path.name)


def test_write_then_validate_round_trip(tmp_path: Path) -> None:
    path = write_submission(IDS, np.array([1, 0, 1]), tmp_path / "out" / "run.csv")
    assert path.read_bytes() == b"img_name,label\na.png,1\nb.png,0\nc.png,1\n"
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not the owner-only mode of temp files
    table = validate_submission(path, IDS)
    assert table["img_name"].tolist() == IDS
    assert table["label"].tolist() == [1, 0, 1]
    assert not sidecar_path(path).exists()


def test_write_sidecar_holds_metadata(tmp_path: Path) -> None:
    meta = {"runs": ["r1"], "val_acc": np.float32(0.5), "config": Path("configs/a.yaml"), "tta": True}
    path = write_submission(IDS, [True, False, True], tmp_path / "run.csv", metadata=meta)
    assert json.loads(sidecar_path(path).read_text()) == {
        "runs": ["r1"],
        "val_acc": 0.5,
        "config": "configs/a.yaml",
        "tta": True,
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.csv", "run.csv.json"]


@pytest.mark.parametrize("existing", ["run.csv", "run.csv.json"])
def test_write_refuses_to_overwrite(tmp_path: Path, existing: str) -> None:
    (tmp_path / existing).write_text("keep me")
    with pytest.raises(errors.ExistsError, match="refusing to overwrite"):  # a user error: one `error:` line
        write_submission(IDS, [0, 0, 0], tmp_path / "run.csv", metadata={"runs": ["r"]})
    assert (tmp_path / existing).read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == [existing]


def test_failed_publish_leaves_neither_file_nor_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_link = submission.os.link

    def link_fails_for_csv(src: str, dst: Path) -> None:
        if Path(dst).suffix == ".csv":
            raise OSError("disk full")
        real_link(src, dst)

    monkeypatch.setattr(submission.os, "link", link_fails_for_csv)
    with pytest.raises(OSError, match="disk full"):
        write_submission(IDS, [0, 1, 0], tmp_path / "run.csv", metadata={"runs": ["r"]})
    assert list(tmp_path.iterdir()) == []


def test_unserialisable_metadata_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="not JSON serialisable"):
        write_submission(IDS, [0, 1, 0], tmp_path / "run.csv", metadata={"model": object()})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("ids", "labels", "match"),
    [
        (IDS, np.array([0.0, 1.0, 1.0]), "dtype float64"),
        (IDS, [0, 2, 1], r"line 3 \(b\.png\) has label '2'"),  # the line it would be written on
        (IDS, [0, 1], "3 ids but labels of shape"),
        (["a.png", "b.png", "a.png"], [0, 1, 0], "duplicate ids 'a.png'"),
        (["a.png", "", "c.png"], [0, 1, 0], "empty img_name on line 3"),
        (["a.png", None, "c.png"], [0, 1, 0], "id number 2 is None, not a string"),
    ],
)
def test_write_rejects_bad_input(tmp_path: Path, ids: list[str], labels: object, match: str) -> None:
    with pytest.raises(SubmissionError, match=match):
        write_submission(ids, labels, tmp_path / "run.csv")
    assert list(tmp_path.iterdir()) == []


def test_bom_and_crlf_are_tolerated(tmp_path: Path) -> None:
    path = _csv(tmp_path, "\ufeffimg_name,label\r\na.png,1\r\nb.png,0\r\nc.png,0\r\n")
    assert validate_submission(path, IDS)["label"].tolist() == [1, 0, 0]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "the file is empty"),
        ("id,label\na.png,1\n", "expected a header with img_name,label, found 'id,label'"),
        ("img_name,label,extra\na.png,1,0\n", "found 'img_name,label,extra'"),
        (" img_name,label\na.png,1\n", "found ' img_name,label'"),
        ("img_name,label\n", "header but no rows"),
        ("img_name,label\na.png,1\nb.png,1,7\n", "not a readable CSV (Error tokenizing data"),
        ("img_name,label\na.png,1,7\n", "Expected 2 fields in line 2, saw 3"),
        ("img_name,label\na.png,0\nb.png,1.0\nc.png,1\n", "line 3 (b.png) has label '1.0'"),
        ("img_name,label\na.png,0\nb.png, 1\nc.png,1\n", "line 3 (b.png) has label ' 1'"),
        ("img_name,label\na.png,yes\nb.png,1\nc.png,1\n", "line 2 (a.png) has label 'yes'"),
        ("img_name,label\na.png,0\nb.png,1\nc.png,2\n", "line 4 (c.png) has label '2'"),
        ("img_name,label\na.png,0\nb.png,\nc.png,1\n", "line 3 (b.png) has label ''"),
        ("img_name,label\na.png,0\n\nc.png,1\n", "empty img_name on line 3"),  # no blank line skipped
        ("img_name,label\na.png,0\nb.png,1\na.png,1\n", "line 4 repeats id 'a.png' from line 2"),
    ],
)
def test_validation_names_first_bad_line(tmp_path: Path, text: str, match: str) -> None:
    path = _csv(tmp_path, text)
    with pytest.raises(SubmissionError, match=re.escape(str(path)) + ".*" + re.escape(match)):
        validate_submission(path)


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        (["a.png", "b.png"], "2 rows but 3 expected ids; missing 1 ids: 'c.png'"),
        (["a.png", "b.png", "c.png", "d.png"], "4 rows but 3 expected ids; 1 unexpected ids, first on line 5"),
        (["a.png", "b.png", "x.png"], "missing 1 ids: 'c.png'; 1 unexpected ids, first on line 4: 'x.png'"),
        (["a.png", "c.png", "b.png"], "line 3 has id 'c.png' but 'b.png' is expected"),
    ],
)
def test_validation_against_expected_ids(tmp_path: Path, rows: list[str], match: str) -> None:
    path = _csv(tmp_path, "img_name,label\n" + "".join(f"{r},0\n" for r in rows))
    with pytest.raises(SubmissionError, match=re.escape(match)):
        validate_submission(path, IDS)


def test_missing_file_is_a_submission_error(tmp_path: Path) -> None:
    with pytest.raises(SubmissionError, match="file not found"):
        validate_submission(tmp_path / "nope.csv")


def test_read_sample_submission(tmp_path: Path) -> None:
    assert read_sample_submission(tmp_path) is None
    _csv(tmp_path, "img_name,label\nc.png,0\na.png,0\n", name="sample_submission.csv")
    assert read_sample_submission(tmp_path) == ["c.png", "a.png"]
