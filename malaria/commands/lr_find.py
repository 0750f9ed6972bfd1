"""Lightning's learning-rate range test on a recipe: `python -m malaria.commands.lr_find --config configs/default.yaml`.

Prints the suggested `model.lr` and saves the loss-vs-LR plot to `runs/lr_find-<recipe>.png`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from lightning.pytorch.tuner import Tuner

from malaria.common import errors
from malaria.common.atomic import save_figure
from malaria.run.cli import build as build_cli


def main(argv: Sequence[str] | None = None) -> float | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    cli = build_cli(["--run", "lr_find", "--wandb.mode", "disabled", *argv], run=False)
    finder = Tuner(cli.trainer).lr_find(cli.model, datamodule=cli.datamodule, update_attr=False)
    suggestion = finder.suggestion()
    recipe = Path(cli.config.get("config", ["run"])[0]).stem if cli.config.get("config") else "run"
    plot = Path(cli.config.runs_dir) / f"lr_find-{recipe}.png"
    plot.parent.mkdir(parents=True, exist_ok=True)
    save_figure(finder.plot(suggest=True), plot)
    print(f"Suggested model.lr: {suggestion:.2e}  (plot: {plot}); try `make train ARGS='--model.lr {suggestion:.1e}'`")
    return suggestion


if __name__ == "__main__":
    errors.run(main)
