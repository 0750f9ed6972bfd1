"""Test-time BatchNorm adaptation: statistics mixed per batch, restored after, and applied in
prediction only to the slides the model never trained on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from malaria.commands import train
from malaria.data import splits
from malaria.prediction.bn_adaptation import mixed_batchnorm
from malaria.prediction.predictor import load, predict_subset
from malaria.run import run_dirs

from conftest import TINY


def trained_norm() -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(3)
    norm.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
    norm.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    return norm.eval()


def test_mixing_weighs_the_training_statistics_as_strength_images() -> None:
    norm, x = trained_norm(), torch.randn(8, 3, 5, 5) * 3 + 7
    before = (norm.running_mean.clone(), norm.running_var.clone())
    with mixed_batchnorm(norm, strength=8.0):  # as many pseudo-images as the batch holds: halfway
        out = norm(x)
    mean = (before[0] + x.mean((0, 2, 3))) / 2
    var = (before[1] + x.var((0, 2, 3), unbiased=False)) / 2
    expected = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + norm.eps)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.equal(norm.running_mean, before[0]) and torch.equal(norm.running_var, before[1])


def test_no_weight_on_the_training_statistics_is_the_batchs_own_normalisation() -> None:
    norm, x = trained_norm(), torch.randn(6, 3, 4, 4) * 2 - 1
    with mixed_batchnorm(norm, strength=0.0):
        out = norm(x)
    assert torch.allclose(out.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(out.var((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-3)
    with pytest.raises(ValueError, match=">= 0"):
        with mixed_batchnorm(norm, strength=-1.0):
            pass


@pytest.fixture(scope="module")
def run(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs_dir = tmp_path_factory.mktemp("runs")
    train.main(["fit", *TINY, "--data.data_dir", str(demo_dir), "--runs_dir", str(runs_dir), "--run", "r",
                "--data.split", "random"])
    return runs_dir / "r"


def test_only_slides_without_training_cells_are_adapted_and_the_others_keep_their_bits(
        run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, datamodule = load(run_dirs.checkpoint(run))
    plain = predict_subset(model, datamodule, "val", tta=False).probs
    groups = splits.groups(predict_subset(model, datamodule, "val", tta=False).ids)
    seen = set(datamodule.training_slides())
    # The holdout's largest slide, as if none of its cells had trained the model.
    names, counts = np.unique(groups, return_counts=True)
    new = names[np.argmax(counts)]
    assert new in seen
    monkeypatch.setattr(datamodule, "training_slides", lambda: seen - {new})
    adapted = predict_subset(model, datamodule, "val", tta=False, adapt=4.0).probs
    untouched = np.isin(groups, sorted(seen - {new}))
    assert untouched.sum() > 0 and np.array_equal(adapted[untouched], plain[untouched])  # to the bit
    assert not np.allclose(adapted[groups == new], plain[groups == new])
    assert np.array_equal(predict_subset(model, datamodule, "val", tta=False).probs, plain)  # statistics restored
