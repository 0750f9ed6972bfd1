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
from malaria.prediction.predictor import load, predict_subset, slide_prior
from malaria.model.metrics import score
from malaria.prediction.slide_prior import DEFAULT_STRENGTH

ENSEMBLE = "ensemble (mean probability)"


Views = tuple[bool, bool]  # (TTA, slide prior)
VIEWS: tuple[Views, ...] = ((False, False), (True, False), (False, True), (True, True))


def holdout_probabilities(run_dir: Path, prior: float = DEFAULT_STRENGTH,
                          ) -> tuple[list[str], np.ndarray, dict[Views, np.ndarray]]:
    """Ids and labels of a run's own holdout, and its probabilities of parasitized with TTA off and
    on, each without and with the slide prior of the holdout's training side (`prior` 0: without)."""
    model, datamodule = load(run_dirs.checkpoint(run_dir))
    if datamodule.hparams.val_fraction == 0:
        raise errors.ConfigError(f"{run_dir} trained on every image (data.val_fraction 0): it has no holdout to score.")
    probs = {}
    for tta in (False, True):
        val = predict_subset(model, datamodule, subset="val", tta=tta)
        ids, labels, probs[tta, False] = val.ids, val.labels, val.probs
    if prior:
        prior_of_slides = slide_prior(datamodule, "val", prior)
        for tta in (False, True):
            probs[tta, True] = prior_of_slides.adjust(ids, probs[tta, False])
    return ids, labels, probs


def score_runs(folders: Sequence[Path], prior: float = DEFAULT_STRENGTH) -> pd.DataFrame:
    """Accuracy, F1 and AUROC of each run and of their mean probability, without and with TTA and
    slide prior."""
    members, first_ids = [], None
    for run_dir in folders:
        ids, labels, probs = holdout_probabilities(run_dir, prior)
        if first_ids is not None and ids != first_ids:
            raise errors.ConfigError(
                f"{run_dir} holds out other images than {folders[0]}: their data settings (data.seed, "
                "data.split, data.val_fraction, data.fold or the training files) differ, so no shared "
                "holdout can score their ensemble."
            )
        first_ids = ids
        members.append((run_dir.name, probs))
    rows = []
    for tta, with_prior in (view for view in VIEWS if view in members[0][1]):
        scored = [(name, probs[tta, with_prior]) for name, probs in members]
        if len(members) > 1:
            scored.append((ENSEMBLE, np.mean([probs for _, probs in scored], axis=0)))
        rows += [{"member": name, "tta": tta, "prior": with_prior, "images": len(labels),
                  **score(probs, labels)} for name, probs in scored]
    return pd.DataFrame(rows)


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
    args = parser.parse_args(argv)
    folders = args.run or [run_dirs.latest_run()]
    scores = score_runs(folders, args.slide_prior)
    Console().print(render(scores))
    return scores


if __name__ == "__main__":
    errors.run(main)
