"""Lightning's learning-rate range test on a recipe: a suggestion, and its plot written whole."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
from conftest import TINY
from PIL import Image

from malaria.commands import lr_find


def test_the_range_test_suggests_a_rate_and_saves_its_plot(demo_dir: Path, tmp_path: Path) -> None:
    open_figures = plt.get_fignums()
    suggestion = lr_find.main([*TINY, "--trainer.max_epochs", "20", "--data.data_dir", str(demo_dir),
                               "--runs_dir", str(tmp_path)])
    assert suggestion is not None and 1e-8 < suggestion < 1
    plot = tmp_path / "lr_find-default.png"
    assert Image.open(plot).size[0] > 100  # a whole PNG, not a half-written one
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left beside it
    assert plt.get_fignums() == open_figures  # the plot's figure was closed once saved
