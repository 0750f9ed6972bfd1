"""Scoring runs and their ensemble on a shared holdout."""

import dataclasses

from pathlib import Path

import numpy as np
import pytest

from malaria.commands import holdout
from malaria.run import run_dirs
from malaria.commands import train
from malaria.prediction.predictor import load, predict_members, predict_subset, slide_prior
from malaria.model.metrics import score

from conftest import TINY


@pytest.fixture(scope="module")
def runs_dir(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two runs that share a holdout (other model seed and image size), one that does not, one full fit."""
    runs_dir = tmp_path_factory.mktemp("runs")
    for name, extra in {"a": ["--data.image_size", "32"],
                        "b": ["--data.image_size", "40", "--seed_everything", "7"],
                        "other-split": ["--data.image_size", "32", "--data.seed", "3"],
                        "full-fit": ["--data.image_size", "32", "--data.val_fraction", "0"]}.items():
        train.main(["fit", *TINY, "--data.data_dir", str(demo_dir), "--runs_dir", str(runs_dir), "--run", name,
                    *extra])
    return runs_dir


def test_ensemble_is_scored_on_the_mean_probability_of_its_members(runs_dir: Path) -> None:
    members = [runs_dir / "a", runs_dir / "b"]
    scores = holdout.score_runs(members)
    assert scores[["member", "tta", "prior"]].values.tolist() == [
        [member, tta, prior] for tta, prior in holdout.VIEWS for member in ("a", "b", holdout.ENSEMBLE)]
    pa, pb = {}, {}
    for tta in (False, True):
        for with_prior in (False, True):
            for probs, member in zip((pa, pb), members):
                model, datamodule = load(run_dirs.checkpoint(member))
                view = predict_subset(model, datamodule, "val", tta=tta, prior=1.0 if with_prior else 0.0)
                probs[tta, with_prior], labels = view.probs, view.labels
    for view in holdout.VIEWS:
        for member, probs in (("a", pa[view]), (holdout.ENSEMBLE, (pa[view] + pb[view]) / 2)):
            row = scores[(scores["member"] == member) & (scores["tta"] == view[0]) & (scores["prior"] == view[1])]
            for metric, value in score(probs, labels).items():
                assert row.iloc[0][metric] == pytest.approx(value)
    assert scores["images"].nunique() == 1 and scores["images"].iloc[0] == len(labels)
    # TTA and the prior are different predictions, not relabelled copies
    assert not np.allclose(pa[False, False], pa[True, False])
    assert not np.allclose(pa[False, False], pa[False, True])


def test_runs_that_hold_out_other_images_are_refused(runs_dir: Path) -> None:
    with pytest.raises(ValueError, match="other-split/.*predicts other images than .*a/.*: their data settings"):
        holdout.score_runs([runs_dir / "a", runs_dir / "other-split"])


def test_a_full_fit_has_no_holdout(runs_dir: Path) -> None:
    with pytest.raises(ValueError, match="full-fit/.* trained on every image"):
        holdout.score_runs([runs_dir / "full-fit"])


def test_main_prints_the_table(runs_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    holdout.main(["--run", str(runs_dir / "a"), str(runs_dir / "b")])
    out = capsys.readouterr().out
    assert "Shared holdout" in out and holdout.ENSEMBLE in out


def test_slide_prior_0_scores_without_the_prior(runs_dir: Path) -> None:
    scores = holdout.main(["--run", str(runs_dir / "a"), "--slide_prior", "0"])
    assert scores[["tta", "prior"]].values.tolist() == [[False, False], [True, False]]


def test_the_holdouts_slide_prior_never_sees_the_holdouts_labels(runs_dir: Path) -> None:
    model, datamodule = load(run_dirs.checkpoint(runs_dir / "a"))
    predict_subset(model, datamodule, subset="val")
    table = datamodule.train_table
    before = slide_prior(datamodule, "val", 1.0).shifts

    def flipped(rows: np.ndarray) -> np.ndarray:
        labels = table.labels.copy()
        labels[rows] = 1 - labels[rows]
        return labels

    datamodule.train_table = dataclasses.replace(table, labels=flipped(datamodule.val_rows))  # every holdout label wrong
    assert slide_prior(datamodule, "val", 1.0).shifts == before
    datamodule.train_table = dataclasses.replace(table, labels=flipped(datamodule.train_rows))  # the training side's count
    assert slide_prior(datamodule, "val", 1.0).shifts != before
