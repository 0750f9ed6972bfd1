"""K-fold cross-validation grouped by slide: `python -m malaria.commands.cv --k 5 [training overrides]`.

Grouped by slide whatever the recipe's holdout, since that is the figure unseen patients will see;
`--data.split random` gives the cell-level figure the leaderboard's random test split rewards.

Each fold is an ordinary run (`runs/<name>-fold<i>/`), so its checkpoint can join an ensemble:
`make predict RUN="runs/<name>-fold0 runs/<name>-fold1 ..."`. Out-of-fold probabilities land in
`runs/<name>-oof.csv` and the per-fold table in `runs/<name>-cv.json`.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from malaria.common import errors
from malaria.run import run_dirs
from malaria.data import splits
from malaria.common.atomic import replace_file
from malaria.run.cli import build
from malaria.common.flags import FoldCount, argument
from malaria.prediction.predictor import load, predict_subset
from malaria.model.metrics import classes, score
from malaria.evaluation.slide_errors import describe_errors


def run_fold(config: str, k: int, fold: int, name: str, runs_dir: Path, overrides: Sequence[str]) -> Path:
    """Train one fold as its own run; an already finished fold is reused and an interrupted one
    resumed from its last.ckpt, so a CV resumes."""
    run_dir = runs_dir / f"{name}-fold{fold}"
    last = run_dir / "checkpoints" / "last.ckpt"
    if (run_dir / "summary.json").exists():
        return run_dir
    if last.exists():  # what `make train RESUME=<fold>` runs
        build(["fit", "--config", str(run_dir / "config.yaml"), "--ckpt_path", str(last)])
    else:
        build(["fit", "--config", config, "--data.split", "slide",
               "--data.val_fraction", str(1 / k), "--data.fold", str(fold),
               "--run", run_dir.name, "--runs_dir", str(runs_dir), *overrides])
    return run_dir


def resume_command(args: argparse.Namespace, name: str, overrides: Sequence[str]) -> str:
    """The `make cv` that finishes this CV: the same folds, the interrupted one resumed."""
    flags = shlex.join(["--name", name, "--runs_dir", str(args.runs_dir), *overrides])
    return f"make cv K={args.k} CONFIG={args.config} ARGS={shlex.quote(flags)}"


def summarise(per_fold: pd.DataFrame, split: splits.Split = "slide") -> Table:
    title = "Slide-grouped cross-validation" if split == "slide" else "Cell-level (random) cross-validation"
    table = Table(title=title)
    for column in ("fold", "images", "acc", "f1", "auroc"):
        table.add_column(column, justify="right")
    for row in per_fold.itertuples():
        table.add_row(str(row.fold), str(row.images), f"{row.acc:.4f}", f"{row.f1:.4f}", f"{row.auroc:.4f}")
    mean, std = per_fold.mean(numeric_only=True), per_fold.std(numeric_only=True)
    table.add_row("mean ± std", "", *(f"{mean[m]:.4f} ± {std[m]:.4f}" for m in ("acc", "f1", "auroc")))
    return table


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--k", type=argument(FoldCount), default=5, help="folds (at least 2)")
    parser.add_argument("--name", default=None, help="runs are <name>-fold<i> (default: <recipe>-cv<k>-<time>)")
    parser.add_argument("--runs_dir", type=Path, default=run_dirs.RUNS_DIR)
    # Anything else is a training override, e.g. --data.data_dir data --trainer.max_epochs 5.
    args, overrides = parser.parse_known_args(argv)
    name = args.name or run_dirs.new_run_name(args.config, tag=f"cv{args.k}")

    rows, oof, fold_dirs = [], [], []
    for fold in range(args.k):
        try:
            run_dir = run_fold(args.config, args.k, fold, name, args.runs_dir, overrides)
        except errors.Preempted as stop:
            raise errors.Preempted(stop.what, resume_command(args, name, overrides), stop.exit_status) from None
        fold_dirs.append(str(run_dir))
        model, datamodule = load(run_dirs.checkpoint(run_dir))
        val = predict_subset(model, datamodule, subset="val")
        rows.append({"fold": fold, "images": len(val.ids), **score(val.probs, val.labels)})
        oof.append(pd.DataFrame({"img_name": val.ids, "label": val.labels, "prob": val.probs, "fold": fold}))

    per_fold = pd.DataFrame(rows)
    table = pd.concat(oof)
    replace_file(args.runs_dir / f"{name}-oof.csv", lambda f: table.to_csv(f, index=False))
    split = datamodule.hparams.split
    summary = {"name": name, "k": args.k, "split": split, "folds": rows,
               "mean": per_fold.mean(numeric_only=True).to_dict(), "std": per_fold.std(numeric_only=True).to_dict()}
    run_dirs.write_json(args.runs_dir / f"{name}-cv.json", summary)
    console = Console()
    console.print(summarise(per_fold, split))
    right = pd.Series(classes(table["prob"].to_numpy()) == table["label"].to_numpy(), index=table["img_name"])
    console.print("Out-of-fold errors by slide:", describe_errors(right), sep="\n", highlight=False)
    console.print(f"Ensemble the folds: make predict RUN=\"{' '.join(fold_dirs)}\"")
    return per_fold


if __name__ == "__main__":
    errors.run(main)
