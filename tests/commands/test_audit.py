"""The label audit: confident learning finds flipped labels, spares clean ones, and its suspects
leave training through data.exclude."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import TINY

from malaria.commands import audit
from malaria.commands import cv
from malaria.common import errors
from malaria.data.datamodule import MalariaDataModule


def oof_table(n: int, flipped: np.ndarray, seed: int = 0) -> pd.DataFrame:
    """Out-of-fold probabilities of a good but imperfect model, against labels with `flipped` wrong."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, n)
    probs = np.clip(np.where(truth == 1, rng.beta(8, 2, n), rng.beta(2, 8, n)), 0, 1)
    labels = truth.copy()
    labels[flipped] = 1 - labels[flipped]
    names = [f"C{40 + i % 9}P{i % 9}thinF_IMG_20150101_000000_cell_{i}.png" for i in range(n)]
    return pd.DataFrame({"img_name": names, "label": labels, "prob": probs})


def test_flipped_labels_are_found_near_the_top() -> None:
    flipped = np.random.default_rng(1).choice(1000, 40, replace=False)
    issues = audit.label_issues(oof_table(1000, flipped))
    flipped_names = set(oof_table(1000, flipped)["img_name"].iloc[flipped])
    top = set(issues["img_name"].head(60))
    assert len(top & flipped_names) >= 30  # most of the 40, within the first 60
    assert issues["rank"].tolist() == list(range(1, len(issues) + 1))
    assert issues["prob_given"].is_monotonic_increasing  # most suspect first
    assert issues["slide"].str.match(r"C\d+P\d+").all()


def test_clean_labels_raise_few_suspects() -> None:
    issues = audit.label_issues(oof_table(1000, np.array([], dtype=int)))
    assert len(issues) < 30  # the model's own errors on clean labels, under 3%


@pytest.fixture(scope="module")
def cv_run(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs_dir = tmp_path_factory.mktemp("runs")
    cv.main(["--k", "2", "--name", "a", "--runs_dir", str(runs_dir), "--data.data_dir", str(demo_dir), *TINY,
             "--data.batch_size", "32", "--model.model_kwargs", '{"widths": [8, 16]}'])
    return runs_dir / "a"


def test_audit_of_a_cv_run_writes_its_files_and_never_overwrites(cv_run: Path) -> None:
    out = audit.main(["--run", str(cv_run)])
    issues = pd.read_csv(out / "label_issues.csv")
    assert list(issues.columns) == audit.COLUMNS
    oof = pd.read_csv(cv_run.with_name("a-oof.csv")).set_index("img_name")
    assert (issues["label"].to_numpy() == oof.loc[issues["img_name"], "label"].to_numpy()).all()
    text = (out / "audit.md").read_text()
    assert f"{len(issues)} suspects" in text and "--data.exclude" in text
    assert (out / "gallery.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(errors.ExistsError, match="never overwritten"):
        audit.main(["--run", str(cv_run)])


def test_audit_of_a_cv_on_demo_data_reads_the_demo_folder(cv_run: Path, demo_dir: Path, tmp_path: Path) -> None:
    """`make audit` on a fresh clone: the CV's data_dir is data/, its images are in data/demo."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "demo").symlink_to(demo_dir)
    runs_dir = tmp_path / "runs"
    (runs_dir / "b-fold0").mkdir(parents=True)
    shutil.copy(cv_run.with_name("a-oof.csv"), runs_dir / "b-oof.csv")
    config = yaml.safe_load((cv_run.with_name("a-fold0") / "config.yaml").read_text())
    config["data"]["data_dir"] = str(tmp_path / "data")
    (runs_dir / "b-fold0" / "config.yaml").write_text(yaml.safe_dump(config))
    out = audit.main(["--run", str(runs_dir / "b")])
    gallery = np.asarray(Image.open(out / "gallery.png").convert("RGB"))
    assert len(np.unique(gallery.reshape(-1, 3), axis=0)) > 1000  # cells drawn, not an empty page
    assert f"make train DATA_DIR={tmp_path / 'data' / 'demo'} " in (out / "audit.md").read_text()


def test_excluded_cells_leave_training_but_not_the_holdout(demo_dir: Path, tmp_path: Path) -> None:
    whole = MalariaDataModule(data_dir=str(demo_dir), image_size=32, num_workers=0)
    whole.prepare_data()
    whole.setup("fit")
    names = [whole.train_table.ids[r] for r in (*whole.train_rows[:5], *whole.val_rows[:2])]
    pd.DataFrame({"img_name": names, "label": 0}).to_csv(tmp_path / "issues.csv", index=False)
    part = MalariaDataModule(data_dir=str(demo_dir), image_size=32, num_workers=0,
                             exclude=str(tmp_path / "issues.csv"))
    part.setup("fit")
    assert set(part.train_rows) == set(whole.train_rows[5:])
    assert np.array_equal(part.val_rows, whole.val_rows)
    pd.DataFrame({"img_name": ["nobody.png"]}).to_csv(tmp_path / "bad.csv", index=False)
    bad = MalariaDataModule(data_dir=str(demo_dir), image_size=32, num_workers=0, exclude=str(tmp_path / "bad.csv"))
    with pytest.raises(errors.UserError, match="bad.csv: 1 ids are not training cells .* 'nobody.png'"):
        bad.setup("fit")
