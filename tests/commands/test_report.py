"""The run report, built at the end of fit and again by `make report`: real PNGs, every figure in report.md."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from malaria.commands import report
from malaria.commands import train

from conftest import TINY

TINY_REPORT = [*TINY, "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "6"]
FIGURES = {"learning_curves", "confusion_matrix", "roc_pr", "mistakes", "gradcam", "filters"}


@pytest.fixture(scope="module")
def reported(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run whose RunReport callback built the report at the end of fit."""
    runs_dir = tmp_path_factory.mktemp("runs")
    train.main(["fit", *TINY_REPORT, "--data.data_dir", str(demo_dir), "--runs_dir", str(runs_dir), "--run", "tiny"])
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
    split = re.search(r"Holdout \((\w+) split\): training ([\d,]+) cells .*; validation ([\d,]+) cells", markdown)
    assert split and int(split[3].replace(",", "")) == images  # the split line counts the cells it reports on
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
