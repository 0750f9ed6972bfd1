"""Reading the competition files. What bad files do is tabled in tests/data/test_reliability.py."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import write_competition

from malaria.common import errors
from malaria.data import archive


def test_load_train_matches_ids_at_any_depth(tmp_path: Path) -> None:
    folder = write_competition(tmp_path, n=6, folder_in_zip="train_data/train/")
    table = archive.load_train(folder)
    assert len(table) == 6
    assert all(m.startswith("train_data/train/") and m.endswith(i) for i, m in zip(table.ids, table.members))
    assert table.labels.tolist() == [0, 1, 0, 1, 0, 1]


def test_accepts_train_data_csv_for_the_labels(tmp_path: Path) -> None:
    folder = write_competition(tmp_path, n=4)
    names = archive.load_train(folder).ids
    (folder / "train_labels.csv").rename(folder / "train_data.csv")
    assert archive.load_train(folder).ids == names


def test_test_ids_follow_sample_submission_order(tmp_path: Path) -> None:
    folder = write_competition(tmp_path, n_test=4)
    ids = sorted(archive.list_images(folder / "test_data.zip"), reverse=True)
    (folder / "sample_submission.csv").write_text("img_name,label\n" + "".join(f"{i},0\n" for i in ids))
    assert archive.load_test(folder).ids == ids
    (folder / "sample_submission.csv").unlink()
    assert archive.load_test(folder).ids == sorted(ids)


def test_has_competition(tmp_path: Path) -> None:
    assert not archive.has_competition(tmp_path)
    assert archive.has_competition(write_competition(tmp_path, n=6))
    table = archive.load_train(tmp_path)
    assert table.labels.tolist() == [0, 1, 0, 1, 0, 1]  # as write_competition labels them, in CSV order
    assert table.members == [f"train/{name}" for name in table.ids]


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ids.csv"
    path.write_text(text)
    return path


def test_an_input_csv_is_read_as_people_write_it_and_a_submission_exactly(tmp_path: Path) -> None:
    loose = _csv(tmp_path, "id , label\n a.png , 1 \n\nb.png,0\n")
    table = archive.read_id_csv(loose, with_labels=True)
    assert table["img_name"].tolist() == ["a.png", "b.png"] and table["label"].tolist() == [1, 0]
    with pytest.raises(archive.DataError, match="expected a header with img_name,label, found 'id , label'"):
        archive.read_id_csv(loose, with_labels=True, exact=True)
    spaced = _csv(tmp_path, "img_name,label\na.png, 1\n")
    with pytest.raises(archive.DataError, match=r"line 2 \(a\.png\) has label ' 1'"):
        archive.read_id_csv(spaced, with_labels=True, exact=True)


def test_a_third_field_on_the_first_row_is_an_error_not_an_index_column(tmp_path: Path) -> None:
    """pandas reading a header takes the first column of such a file as its index, shifting every
    value one column to the left: the labels would be read as the ids, the third field as labels."""
    with pytest.raises(archive.DataError, match="Expected 2 fields in line 2, saw 3"):
        archive.read_id_csv(_csv(tmp_path, "img_name,label\na.png,1,7\nb.png,0,7\n"), with_labels=True)


def test_ids_read_alone_ignore_other_columns_quietly_and_labels_warn(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _csv(tmp_path, "img_name,label,rank\na.png,1,1\nb.png,0,2\n")
    assert archive.read_id_csv(path, with_labels=False)["img_name"].tolist() == ["a.png", "b.png"]
    assert not caplog.records
    archive.read_id_csv(path, with_labels=True)
    assert "ignoring columns 'rank'" in caplog.text


@pytest.mark.parametrize(("labels", "match"), [
    (["0", "1", "0"], r"line 3 repeats id 'a\.png' from line 1"),  # every check, whatever the error class
    (["0", "x", "1"], r"line 2 \(b\.png\) has label 'x'.*lines with another label: 1"),
])
def test_rows_are_checked_by_line_with_the_callers_error(labels: list[str], match: str) -> None:
    class Refused(errors.UserError):
        pass

    rows = pd.DataFrame({"img_name": ["a.png", "b.png", "a.png"], "label": labels}, index=[1, 2, 3])
    with pytest.raises(Refused, match=match):
        archive.check_rows(rows, Path("x.csv"), error=Refused)
