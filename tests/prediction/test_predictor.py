"""Checkpoints to probabilities: an ensemble's members and their mean, and old runs' holdouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from malaria.commands import train
from malaria.prediction.predictor import load, predict_members
from malaria.prediction.slide_prior import SlidePrior
from malaria.run import run_dirs

from conftest import TINY


@pytest.fixture(scope="module")
def runs_dir(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs_dir = tmp_path_factory.mktemp("runs")
    for name, seed in (("a", "1"), ("b", "2")):
        train.main(["fit", *TINY, "--data.data_dir", str(demo_dir), "--runs_dir", str(runs_dir), "--run", name,
                    "--seed_everything", seed, "--infrastructure.report", "false"])
    return runs_dir


def test_the_ensemble_averages_each_members_prior_adjusted_probability(runs_dir: Path) -> None:
    members = predict_members([run_dirs.checkpoint(runs_dir / name) for name in "ab"], "val")
    assert members.names == ["a", "b"]
    a, b = members.member(0), members.member(1)
    assert a.ids == b.ids and not np.array_equal(a.probs, b.probs)
    np.testing.assert_allclose(members.ensemble().probs, (a.probs + b.probs) / 2)
    table = members.datamodule.train_table
    rows = members.datamodule.train_rows  # the holdout's prior reads its training side only
    prior = SlidePrior.fit([table.ids[r] for r in rows], table.labels[rows], 1.0)
    np.testing.assert_allclose(members.ensemble(1.0).probs,
                               (prior.adjust(a.ids, a.probs) + prior.adjust(b.ids, b.probs)) / 2)


def test_a_checkpoint_from_before_data_split_existed_holds_out_slides(runs_dir: Path, tmp_path: Path) -> None:
    checkpoint = torch.load(run_dirs.checkpoint(runs_dir / "a"), weights_only=False)
    assert checkpoint["datamodule_hyper_parameters"]["split"] == "random"  # the DataModule's default now
    del checkpoint["datamodule_hyper_parameters"]["split"]
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    assert load(old)[1].hparams.split == "slide"
    assert load(run_dirs.checkpoint(runs_dir / "a"))[1].hparams.split == "random"
