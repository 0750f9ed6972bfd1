"""Score runs and their ensemble on the holdout they share, with and without TTA.

    python -m malaria.holdout --run runs/a runs/b runs/c

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

from malaria import runs
from malaria.cv import fold_metrics
from malaria.predict import load, predict_split

ENSEMBLE = "ensemble (mean probability)"


def holdout_probabilities(run_dir: Path, tta: bool) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Ids, probabilities of parasitized and labels of a run's own holdout."""
    model, datamodule = load(runs.best_checkpoint(run_dir), tta=tta)
    if datamodule.hparams.val_fraction == 0:
        raise ValueError(f"{run_dir} trained on every image (data.val_fraction 0): it has no holdout to score.")
    return predict_split(model, datamodule, split="val")


def score_runs(run_dirs: Sequence[Path]) -> pd.DataFrame:
    """Accuracy, F1 and AUROC of each run and of their mean probability, without and with TTA."""
    rows, first_ids = [], None
    for tta in (False, True):
        total = None
        for run_dir in run_dirs:
            ids, probs, labels = holdout_probabilities(run_dir, tta)
            if first_ids is None:
                first_ids = ids
            elif ids != first_ids:
                raise ValueError(
                    f"{run_dir} holds out other images than {run_dirs[0]}: their data settings (data.seed, "
                    "data.split, data.val_fraction, data.fold or the training files) differ, so no shared "
                    "holdout can score their ensemble."
                )
            rows.append({"member": run_dir.name, "tta": tta, "images": len(ids), **fold_metrics(probs, labels)})
            total = probs if total is None else total + probs
        if len(run_dirs) > 1:
            rows.append({"member": ENSEMBLE, "tta": tta, "images": len(ids),
                         **fold_metrics(total / len(run_dirs), labels)})
    return pd.DataFrame(rows)


def render(scores: pd.DataFrame) -> Table:
    table = Table(title=f"Shared holdout ({scores['images'].iloc[0]} images)")
    for column in ("member", "TTA", "acc", "f1", "auroc"):
        table.add_column(column, justify="left" if column == "member" else "right")
    for row in scores.itertuples():
        table.add_row(row.member, "on" if row.tta else "off", f"{row.acc:.4f}", f"{row.f1:.4f}", f"{row.auroc:.4f}")
    return table


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", nargs="*", type=Path, default=None,
                        help="run directories (default: the latest run in runs/)")
    args = parser.parse_args(argv)
    run_dirs = args.run or [runs.latest_run()]
    scores = score_runs(run_dirs)
    Console().print(render(scores))
    return scores


if __name__ == "__main__":
    main()
