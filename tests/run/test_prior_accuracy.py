"""`val/acc_prior`, logged by `PriorAccuracy` after each validation epoch, is the accuracy `make holdout`
computes with the slide prior from the same weights; on a slide-grouped holdout the prior does nothing."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from conftest import TINY
from malaria.commands import holdout, train
from malaria.run import run_dirs
from malaria.run.prior_accuracy import METRIC


def fit(demo_dir: Path, runs_dir: Path, *extra: str) -> pd.DataFrame:
    """Two epochs with the callback, keeping the final weights as best.ckpt; the epochs' metrics."""
    train.main(["fit", *TINY, "--data.data_dir", str(demo_dir), "--runs_dir", str(runs_dir), "--run", "r",
                "--trainer.max_epochs", "2", "--infrastructure.report", "false",
                "--trainer.callbacks+=malaria.run.prior_accuracy.PriorAccuracy", *extra])
    return pd.read_csv(runs_dir / "r" / "metrics.csv").dropna(subset=["val/acc"]).set_index("epoch")


@pytest.mark.slow  # two short trainings
def test_the_logged_figure_is_the_holdout_accuracy_with_the_slide_prior(demo_dir: Path,
                                                                        tmp_path: Path) -> None:
    metrics = fit(demo_dir, tmp_path)
    assert metrics.index.tolist() == [0, 1] and metrics[METRIC].notna().all()
    # The final epoch's weights, scored the way `make holdout` scores a run (here best.ckpt's copy of them).
    last = run_dirs.checkpoint(tmp_path / "r", "last")
    (tmp_path / "r" / "checkpoints" / "best.ckpt").write_bytes(last.read_bytes())
    scores = holdout.score_runs([tmp_path / "r"]).set_index(["tta", "prior"])["acc"]
    assert metrics[METRIC][1] == pytest.approx(scores[False, True], abs=1e-6)
    assert metrics["val/acc"][1] == pytest.approx(scores[False, False], abs=1e-6)
    assert metrics[METRIC][1] != metrics["val/acc"][1]  # on the demo's random holdout, the slides tell


@pytest.mark.slow
def test_a_slide_grouped_holdout_leaves_the_figure_as_the_images_say(demo_dir: Path, tmp_path: Path) -> None:
    metrics = fit(demo_dir, tmp_path, "--data.split", "slide")
    assert metrics[METRIC].tolist() == metrics["val/acc"].tolist()  # no holdout slide has training labels

