"""The report's pieces: confident mistakes, learning curves from metrics.csv, Grad-CAM maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch

from malaria.evaluation import run_report
from malaria.model.networks import create_model


def _predictions(probs: list[float], labels: list[int]) -> run_report.ValPredictions:
    n = len(probs)
    return run_report.ValPredictions(ids=[f"cell_{i}.png" for i in range(n)], rows=np.arange(n),
                                 labels=np.array(labels), probs=np.array(probs),
                                 pixels=np.zeros((n, 8, 8, 3), dtype=np.uint8))


def test_confident_mistakes_come_most_confident_first() -> None:
    predictions = _predictions([0.9, 0.2, 0.51, 0.99, 0.05, 0.6], [1, 1, 0, 0, 0, 0])
    assert run_report.confident_mistakes(predictions, 10).tolist() == [3, 1, 5, 2]
    assert run_report.confident_mistakes(predictions, 2).tolist() == [3, 1]


def test_learning_curves_use_the_epoch_rows_of_metrics_csv(tmp_path: Path) -> None:
    rows = [  # a step row between epoch rows, as the CSVLogger writes them
        {"epoch": 0, "step": 5, "train/loss_step": 0.9},
        {"epoch": 0, "step": 9, "val/loss": 0.7, "val/acc": 0.6},
        {"epoch": 0, "step": 9, "train/loss_epoch": 0.8, "train/acc": 0.55},
        {"epoch": 1, "step": 19, "val/loss": 0.5, "val/acc": 0.8},
        {"epoch": 1, "step": 19, "train/loss_epoch": 0.6, "train/acc": 0.7},
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "metrics.csv", index=False)
    loss_ax, acc_ax = run_report.learning_curves(tmp_path / "metrics.csv").axes
    expected = ((loss_ax, [0.8, 0.6], [0.7, 0.5]), (acc_ax, [0.55, 0.7], [0.6, 0.8]))
    for ax, train_values, val_values in expected:
        lines = {line.get_label(): np.asarray(line.get_ydata()).tolist() for line in ax.lines}
        assert lines["train"] == train_values and lines["validation"] == val_values
        assert "best val acc (epoch 1)" in lines


@pytest.mark.parametrize(("name", "kwargs", "size"), [
    ("malaria_cnn", {"widths": [8, 16, 32]}, 32),
    ("test_efficientnet", {}, 64),  # a timm backbone, found through the same forward_features hook
])
def test_gradcam_maps_have_the_input_shape_and_vary(name: str, kwargs: dict, size: int) -> None:
    torch.manual_seed(0)
    net = create_model(name, **kwargs).eval()
    images = torch.randn(3, 3, size, size)
    maps = run_report.gradcam(net, images, [1, 0, 1])
    assert maps.shape == (3, size, size)
    assert ((maps >= 0) & (maps <= 1)).all()
    assert all(m.max() - m.min() > 0.1 for m in maps), "a constant heatmap"


def test_gradcam_explains_the_requested_class() -> None:
    torch.manual_seed(0)
    net = create_model("malaria_cnn", widths=[8, 16, 32]).eval()
    images = torch.randn(1, 3, 32, 32)
    parasitized, uninfected = run_report.gradcam(net, images.repeat(2, 1, 1, 1), [1, 0])
    assert not np.allclose(parasitized, uninfected)


def test_gradcam_refuses_token_outputs_with_a_clear_error() -> None:
    net = timm.create_model("test_vit", num_classes=1, img_size=32).eval()
    with pytest.raises(ValueError, match="convolutional feature map"):
        run_report.gradcam(net, torch.randn(1, 3, 32, 32), [1])
