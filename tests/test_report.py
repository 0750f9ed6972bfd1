"""The run report: figures are real PNGs, report.md embeds them all, Grad-CAM maps are sane."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from PIL import Image

from malaria import report, train
from malaria.models import create_model

TINY = [
    "--config", "configs/default.yaml",
    "--trainer.max_epochs", "2",
    "--trainer.limit_train_batches", "6",
    "--trainer.enable_model_summary", "false",
    "--data.image_size", "32",
    "--data.batch_size", "16",
    "--data.num_workers", "0",
    "--model.model_kwargs", '{"widths": [8, 16, 32]}',
]
FIGURES = {"learning_curves", "confusion_matrix", "roc_pr", "mistakes", "gradcam", "filters"}


@pytest.fixture(scope="module")
def reported(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run whose RunReport callback built the report at the end of fit."""
    runs_dir = tmp_path_factory.mktemp("runs")
    train.main(["fit", *TINY, "--data.data_dir", str(demo_dir), "--runs_dir", str(runs_dir), "--run", "tiny"])
    return runs_dir / "tiny"


def metrics_table(markdown: str) -> dict[str, float]:
    return {k: float(v) for k, v in re.findall(r"^\| (\w+) \| ([0-9.]+) \|$", markdown, flags=re.MULTILINE)}


def test_fit_end_writes_every_figure_as_a_real_png(reported: Path) -> None:
    pngs = {p.stem: p for p in (reported / "figures").glob("*.png")}
    assert set(pngs) == FIGURES
    for name, path in pngs.items():
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert 250 <= image.width <= 3000 and 150 <= image.height <= 3000, (name, image.size)
            assert np.asarray(image.convert("L")).std() > 5, f"{name} looks blank"
    leftovers = [p for p in (reported / "figures").iterdir() if ".tmp" in p.name]
    assert not leftovers, "temporary files left behind"


def test_report_md_embeds_every_figure_the_config_and_the_metrics(reported: Path) -> None:
    markdown = (reported / "report.md").read_text()
    linked = set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown))
    assert linked == {f"figures/{name}.png" for name in FIGURES}
    assert all((reported / link).exists() for link in linked)
    assert "```yaml" in markdown and "model: malaria_cnn" in markdown
    metrics = metrics_table(markdown)
    assert {"acc", "f1", "auroc", "average_precision"} <= set(metrics)
    mistakes, images = map(int, re.search(r"\| mistakes \| (\d+) of (\d+)", markdown).groups())
    assert metrics["acc"] == pytest.approx(1 - mistakes / images, abs=1e-4)
    by_slide = markdown.split("## Errors by slide", 1)[1]
    assert (f"{mistakes} errors on " in by_slide) if mistakes else ("no errors" in by_slide)


def test_cli_rebuilds_the_same_report_from_the_best_checkpoint(reported: Path, tmp_path: Path) -> None:
    run = tmp_path / "tiny"
    shutil.copytree(reported, run)
    (run / "figures" / "gradcam.png").unlink()
    built = report.main(["--run", str(run)])
    assert (run / "figures" / "gradcam.png").exists() and set(built.figures) == FIGURES
    # The callback and the CLI see the same checkpoint and the same validation split.
    rebuilt, original = ((r / "report.md").read_text() for r in (run, reported))
    assert metrics_table(rebuilt) == metrics_table(original)


def test_cli_names_the_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="best.ckpt"):
        report.main(["--run", str(tmp_path)])


def _predictions(probs: list[float], labels: list[int]) -> report.ValPredictions:
    n = len(probs)
    return report.ValPredictions(ids=[f"cell_{i}.png" for i in range(n)], rows=np.arange(n),
                                 labels=np.array(labels), probs=np.array(probs),
                                 pixels=np.zeros((n, 8, 8, 3), dtype=np.uint8))


def test_confident_mistakes_come_most_confident_first() -> None:
    predictions = _predictions([0.9, 0.2, 0.51, 0.99, 0.05, 0.6], [1, 1, 0, 0, 0, 0])
    assert report.confident_mistakes(predictions, 10).tolist() == [3, 1, 5, 2]
    assert report.confident_mistakes(predictions, 2).tolist() == [3, 1]


def test_learning_curves_use_the_epoch_rows_of_metrics_csv(tmp_path: Path) -> None:
    rows = [  # a step row between epoch rows, as the CSVLogger writes them
        {"epoch": 0, "step": 5, "train/loss_step": 0.9},
        {"epoch": 0, "step": 9, "val/loss": 0.7, "val/acc": 0.6},
        {"epoch": 0, "step": 9, "train/loss_epoch": 0.8, "train/acc": 0.55},
        {"epoch": 1, "step": 19, "val/loss": 0.5, "val/acc": 0.8},
        {"epoch": 1, "step": 19, "train/loss_epoch": 0.6, "train/acc": 0.7},
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "metrics.csv", index=False)
    loss_ax, acc_ax = report.learning_curves(tmp_path / "metrics.csv").axes
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
    maps = report.gradcam(net, images, [1, 0, 1])
    assert maps.shape == (3, size, size)
    assert ((maps >= 0) & (maps <= 1)).all()
    assert all(m.max() - m.min() > 0.1 for m in maps), "a constant heatmap"


def test_gradcam_explains_the_requested_class() -> None:
    torch.manual_seed(0)
    net = create_model("malaria_cnn", widths=[8, 16, 32]).eval()
    images = torch.randn(1, 3, 32, 32)
    parasitized, uninfected = report.gradcam(net, images.repeat(2, 1, 1, 1), [1, 0])
    assert not np.allclose(parasitized, uninfected)


def test_gradcam_refuses_token_outputs_with_a_clear_error() -> None:
    net = timm.create_model("test_vit", num_classes=1, img_size=32).eval()
    with pytest.raises(ValueError, match="convolutional feature map"):
        report.gradcam(net, torch.randn(1, 3, 32, 32), [1])
