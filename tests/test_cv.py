import json
from pathlib import Path

import numpy as np
import pandas as pd

from malaria import cv, splits

TINY = ["--trainer.max_epochs", "1", "--data.image_size", "32", "--data.batch_size", "32",
        "--data.num_workers", "0", "--model.model_kwargs", '{"widths": [8, 16]}', "--model.tta", "false",
        "--trainer.enable_model_summary", "false"]


def test_cross_validation_covers_every_image_once_without_slide_leaks(demo_dir: Path, tmp_path: Path) -> None:
    per_fold = cv.main(["--k", "2", "--name", "t", "--runs-dir", str(tmp_path),
                        "--data.data_dir", str(demo_dir), *TINY])
    assert per_fold["fold"].tolist() == [0, 1]
    assert ((per_fold["acc"] >= 0) & (per_fold["acc"] <= 1)).all()
    oof = pd.read_csv(tmp_path / "t-oof.csv")
    labels = pd.read_csv(demo_dir / "train_labels.csv")
    assert sorted(oof["img_name"]) == sorted(labels["img_name"])  # every image predicted out of fold once
    slides = splits.groups(oof["img_name"].tolist())
    assert all(len(set(oof["fold"][slides == s])) == 1 for s in set(slides))
    summary = json.loads((tmp_path / "t-cv.json").read_text())
    assert np.isclose(summary["mean"]["acc"], per_fold["acc"].mean()) and summary["split"] == "slide"
    # A finished fold is reused, not retrained: the CV resumes.
    mtime = (tmp_path / "t-fold0" / "checkpoints" / "best.ckpt").stat().st_mtime_ns
    cv.main(["--k", "2", "--name", "t", "--runs-dir", str(tmp_path), "--data.data_dir", str(demo_dir), *TINY])
    assert (tmp_path / "t-fold0" / "checkpoints" / "best.ckpt").stat().st_mtime_ns == mtime


def test_random_cross_validation_splits_cells_of_a_slide(demo_dir: Path, tmp_path: Path,
                                                        capsys) -> None:
    cv.main(["--k", "2", "--name", "r", "--runs-dir", str(tmp_path), "--data.data_dir", str(demo_dir),
             "--data.split", "random", *TINY])
    oof = pd.read_csv(tmp_path / "r-oof.csv")
    slides = splits.groups(oof["img_name"].tolist())
    assert any(len(set(oof["fold"][slides == s])) == 2 for s in set(slides))
    assert json.loads((tmp_path / "r-cv.json").read_text())["split"] == "random"
    assert "Cell-level (random) cross-validation" in capsys.readouterr().out
