"""Reading the competition files. What bad files do is tabled in test_reliability.py."""

from pathlib import Path

import numpy as np
from conftest import write_competition

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
