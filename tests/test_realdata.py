"""Brief training on real NIH cells (../shared/realdata/dev): accuracy must be far above chance."""

from pathlib import Path

import pandas as pd
import pytest

from malaria.commands import predict
from malaria.commands import train

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def test_default_recipe_learns_real_cells(realdata: Path, tmp_path: Path) -> None:
    train.main(["fit", "--config", "configs/default.yaml", "--data.data_dir", str(realdata),
                "--trainer.max_epochs", "2", "--infrastructure.report", "false",
                "--runs_dir", str(tmp_path), "--run", "real",
                "--data.cache_dir", str(tmp_path / "cache")])
    out = predict.main(["--run", str(tmp_path / "real"), "--out", str(tmp_path / "sub.csv")])
    truth = pd.read_csv(realdata / "test_labels.csv")
    merged = pd.read_csv(out).merge(truth, on="img_name", suffixes=("", "_true"))
    assert len(merged) == len(truth)
    accuracy = (merged["label"] == merged["label_true"]).mean()
    assert accuracy > 0.9, f"test accuracy {accuracy:.3f} after 2 epochs"
