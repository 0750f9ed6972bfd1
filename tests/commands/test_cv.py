import json
import os
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from malaria.commands import cv
from malaria.common import errors
from malaria.model.classifier import MalariaClassifier
from malaria.data import splits

from conftest import TINY

TINY_CV = [*TINY, "--model.tta", "false"]


def test_cross_validation_covers_every_image_once_without_slide_leaks(demo_dir: Path, tmp_path: Path,
                                                                     capsys) -> None:
    per_fold = cv.main(["--k", "2", "--name", "t", "--runs_dir", str(tmp_path),
                        "--data.data_dir", str(demo_dir), *TINY_CV])
    assert per_fold["fold"].tolist() == [0, 1]
    oof = pd.read_csv(tmp_path / "t-oof.csv")
    oof_acc = ((oof["prob"] >= 0.5) == oof["label"]).groupby(oof["fold"]).mean()
    assert np.allclose(per_fold["acc"], oof_acc)  # each fold scored on its own out-of-fold cells
    best = [json.loads((tmp_path / f"t-fold{f}" / "summary.json").read_text())["best_val_acc"] for f in (0, 1)]
    assert np.allclose(per_fold["acc"], best, atol=1e-6)  # the best checkpoint's val/acc, predicted again
    labels = pd.read_csv(demo_dir / "train_labels.csv")
    assert sorted(oof["img_name"]) == sorted(labels["img_name"])  # every image predicted out of fold once
    slides = splits.groups(oof["img_name"].tolist())
    assert all(len(set(oof["fold"][slides == s])) == 1 for s in set(slides))
    summary = json.loads((tmp_path / "t-cv.json").read_text())
    assert np.isclose(summary["mean"]["acc"], per_fold["acc"].mean()) and summary["split"] == "slide"
    errors = int(((oof["prob"] >= 0.5) != oof["label"]).sum())
    by_slide = capsys.readouterr().out.split("Out-of-fold errors by slide:", 1)[1]
    assert (f"{errors} errors on " in by_slide) if errors else ("no errors" in by_slide)
    # A finished fold is reused, not retrained: the CV resumes.
    mtime = (tmp_path / "t-fold0" / "checkpoints" / "best.ckpt").stat().st_mtime_ns
    cv.main(["--k", "2", "--name", "t", "--runs_dir", str(tmp_path), "--data.data_dir", str(demo_dir), *TINY_CV])
    assert (tmp_path / "t-fold0" / "checkpoints" / "best.ckpt").stat().st_mtime_ns == mtime


def test_random_cross_validation_splits_cells_of_a_slide(demo_dir: Path, tmp_path: Path,
                                                        capsys) -> None:
    cv.main(["--k", "2", "--name", "r", "--runs_dir", str(tmp_path), "--data.data_dir", str(demo_dir),
             "--data.split", "random", *TINY_CV])
    oof = pd.read_csv(tmp_path / "r-oof.csv")
    slides = splits.groups(oof["img_name"].tolist())
    assert any(len(set(oof["fold"][slides == s])) == 2 for s in set(slides))
    assert json.loads((tmp_path / "r-cv.json").read_text())["split"] == "random"
    assert "Cell-level (random) cross-validation" in capsys.readouterr().out


def test_a_cv_stopped_by_sigterm_names_its_resume_and_finishes_from_there(
        demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM while fold 1 trains: last.ckpt, a `make cv` line that resumes, and the rerun finishes the
    interrupted fold from its last.ckpt rather than refusing its checkpoints folder."""
    step = MalariaClassifier.training_step

    def preempted_in_fold_1(self: MalariaClassifier, batch, batch_idx: int):
        if self.trainer.default_root_dir.endswith("fold1") and self.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler notes it; the batch finishes
        return step(self, batch, batch_idx)

    monkeypatch.setattr(MalariaClassifier, "training_step", preempted_in_fold_1)
    args = ["--k", "2", "--name", "p", "--runs_dir", str(tmp_path), "--data.data_dir", str(demo_dir), *TINY_CV]
    with pytest.raises(errors.Preempted) as stopped:
        cv.main(args)
    last = tmp_path / "p-fold1" / "checkpoints" / "last.ckpt"
    assert str(stopped.value).startswith(f"stopped by SIGTERM at epoch 0, step 3; saved {last}; resume with `make cv K=2")
    assert "--name p" in stopped.value.resume and stopped.value.exit_status == 128 + signal.SIGTERM
    assert torch.load(last, weights_only=False)["global_step"] == 3

    monkeypatch.setattr(MalariaClassifier, "training_step", step)
    assert cv.main(args)["fold"].tolist() == [0, 1]
    assert json.loads((tmp_path / "p-fold1" / "summary.json").read_text())["epochs"] == 1
