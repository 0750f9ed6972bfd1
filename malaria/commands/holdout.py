"""Score runs and their ensemble on the holdout they share, with and without TTA and slide prior.

    python -m malaria.commands.holdout --run runs/a runs/b runs/c

Choosing an ensemble or TTA by the leaderboard (or a dev answer key) spends submissions and fits
the choice to the test set. Runs trained with the same data settings (`data.seed`, `data.split`,
`data.val_fraction`, `data.fold`) hold out the same images whatever their model seed, image size or
architecture, so their probabilities on those images can be averaged and scored before anything
is submitted. A run trained on every image (`data.val_fraction 0`) has no holdout to score.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from malaria.common import errors
from malaria.run import run_dirs
from malaria.common.flags import NonNegativeFloat, argument
from malaria.prediction.bn_adaptation import DEFAULT_ADAPT
from malaria.prediction.predictor import predict_members
from malaria.model.metrics import score
from malaria.prediction.slide_prior import DEFAULT_STRENGTH

ENSEMBLE = "ensemble (mean probability)"


Views = tuple[bool, bool]  # (TTA, slide prior)
VIEWS: tuple[Views, ...] = ((False, False), (True, False), (False, True), (True, True))


def score_runs(folders: Sequence[Path], prior: float = DEFAULT_STRENGTH, adapt: float = DEFAULT_ADAPT) -> pd.DataFrame:
    """Accuracy, F1 and AUROC of each run and of their mean probability, without and with TTA and
    slide prior (`prior` 0: without only); slides the runs never trained on with BatchNorm adapted
    to them when `adapt` > 0."""
    checkpoints = [run_dirs.checkpoint(run_dir) for run_dir in folders]
    rows = []
    for tta in (False, True):
        members = predict_members(checkpoints, "val", tta=tta, adapt=adapt)
        for with_prior in (False, True) if prior else (False,):
            strength = prior if with_prior else 0.0
            scored = [(name, members.member(i, strength)) for i, name in enumerate(members.names)]
            if len(scored) > 1:
                scored.append((ENSEMBLE, members.ensemble(strength)))
            rows += [{"member": name, "tta": tta, "prior": with_prior, "images": len(p.ids),
                      **score(p.probs, p.labels)} for name, p in scored]
    order = {view: i for i, view in enumerate(VIEWS)}
    return pd.DataFrame(sorted(rows, key=lambda row: order[row["tta"], row["prior"]]))


def render(scores: pd.DataFrame) -> Table:
    table = Table(title=f"Shared holdout ({scores['images'].iloc[0]} images)")
    for column in ("member", "TTA", "slide prior", "acc", "f1", "auroc"):
        table.add_column(column, justify="left" if column == "member" else "right")
    for row in scores.itertuples():
        table.add_row(row.member, "on" if row.tta else "off", "on" if row.prior else "off",
                      f"{row.acc:.4f}", f"{row.f1:.4f}", f"{row.auroc:.4f}")
    return table


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", nargs="*", type=Path, default=None,
                        help="run directories (default: the latest run in runs/)")
    parser.add_argument("--slide_prior", type=argument(NonNegativeFloat), default=DEFAULT_STRENGTH,
                        metavar="STRENGTH", help="pseudo-cells of the slide prior's shrinkage "
                                                 f"(default {DEFAULT_STRENGTH}; 0: no slide prior)")
    parser.add_argument("--adapt_bn", type=argument(NonNegativeFloat), default=DEFAULT_ADAPT, metavar="IMAGES",
                        help="BatchNorm adapted to each holdout slide the runs never trained on, the training "
                             f"statistics weighing IMAGES images (default {DEFAULT_ADAPT}; 0: off)")
    args = parser.parse_args(argv)
    folders = args.run or [run_dirs.latest_run()]
    scores = score_runs(folders, args.slide_prior, args.adapt_bn)
    Console().print(render(scores))
    return scores


if __name__ == "__main__":
    errors.run(main)
