"""K-fold cross-validation grouped by slide: `python -m malaria.commands.cv --k 5 [training overrides]`.

Grouped by slide whatever the recipe's holdout, since that is the figure unseen patients will see;
`--data.split random` gives the cell-level figure the leaderboard's random test split rewards.

Each fold is an ordinary run (`runs/<name>-fold<i>/`), so its checkpoint can join an ensemble:
`make predict RUN="runs/<name>-fold0 runs/<name>-fold1 ..."`. Out-of-fold probabilities land in
`runs/<name>-oof.csv`, the figures in `runs/<name>-cv.json`, and `runs/<name>-cv.md` shows them with
the slides in stain space coloured by their out-of-fold accuracy (`runs/<name>-cv-slides.png`).
Besides the folds' mean, the printout gives the pooled accuracy (every cell once), the mean of the
slides' accuracies (every patient once, however many cells) and the slides it gets most wrong.
With `--adapt_bn N`, held-out slides are predicted with BatchNorm adapted to each
(malaria.prediction.bn_adaptation), and the figures without it are given beside.
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
from malaria.common.atomic import replace_file, save_figure, write_text
from malaria.common.flags import FoldCount, NonNegativeFloat, argument
from malaria.data import splits
from malaria.evaluation import slide_map
from malaria.evaluation.slide_errors import by_slide, describe_errors
from malaria.model.metrics import classes, score
from malaria.prediction.bn_adaptation import DEFAULT_ADAPT
from malaria.prediction.predictor import predict_members
from malaria.run import run_dirs
from malaria.run.cli import build

WORST_SLIDES = 5


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


def figures(per_fold: pd.DataFrame, oof: pd.DataFrame, column: str = "prob") -> dict:
    """The CV's headline figures from its out-of-fold probabilities `column`: folds' mean and sd,
    worst fold, pooled accuracy, mean per-slide accuracy and the worst slides."""
    right = pd.Series(classes(oof[column].to_numpy()) == oof["label"].to_numpy(), index=oof["img_name"].to_numpy())
    folds = oof.assign(right=right.to_numpy()).groupby("fold")["right"].mean()
    slides = by_slide(right)
    worst = slides.sort_values(["acc", "cells"], ascending=[True, False]).head(WORST_SLIDES)
    return {"fold_mean": float(folds.mean()), "fold_std": float(folds.std()), "worst_fold": float(folds.min()),
            "pooled": float(right.mean()), "slide_mean": float(slides["acc"].mean()), "slides": len(slides),
            "worst_slides": [{"slide": name, "cells": int(row.cells), "acc": float(row.acc)}
                             for name, row in worst.iterrows()]}


def headline(name: str, values: dict) -> str:
    worst = ", ".join(f"{w['slide']} {w['acc']:.3f} ({w['cells']} cells)" for w in values["worst_slides"])
    return (f"{name}: pooled {values['pooled']:.4f}; folds {values['fold_mean']:.4f} ± {values['fold_std']:.4f}, "
            f"worst fold {values['worst_fold']:.4f}; mean of {values['slides']} slides' accuracies "
            f"{values['slide_mean']:.4f}; worst slides: {worst}")


def write_report(path: Path, name: str, per_fold: pd.DataFrame, summary: dict, picture: Path | None) -> None:
    """runs/<name>-cv.md: the folds, the headline figures and the slide picture."""
    lines = [f"# Cross-validation {name}", "", f"{summary['k']} folds, {summary['split']} split; "
             f"BatchNorm adaptation: {summary['adapt_bn'] or 'off'}.", "",
             "| fold | images | acc | f1 | auroc |", "|---|---|---|---|---|"]
    lines += [f"| {r.fold} | {r.images} | {r.acc:.4f} | {r.f1:.4f} | {r.auroc:.4f} |" for r in per_fold.itertuples()]
    for key, label in (("figures", "as predicted"), ("unadapted", "without BatchNorm adaptation")):
        if key in summary:
            lines += ["", f"**{label}**: {headline(name, summary[key]).split(': ', 1)[1]}"]
    if picture is not None:
        lines += ["", f"![Slides in stain space, coloured by out-of-fold accuracy]({picture.name})"]
    write_text(path, "\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--k", type=argument(FoldCount), default=5, help="folds (at least 2)")
    parser.add_argument("--name", default=None, help="runs are <name>-fold<i> (default: <recipe>-cv<k>-<time>)")
    parser.add_argument("--runs_dir", type=Path, default=run_dirs.RUNS_DIR)
    parser.add_argument("--adapt_bn", type=argument(NonNegativeFloat), default=DEFAULT_ADAPT, metavar="IMAGES",
                        help="BatchNorm adapted to each held-out slide, the training statistics weighing IMAGES "
                             f"images (default {DEFAULT_ADAPT}; 0: off)")
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
        checkpoint = [run_dirs.checkpoint(run_dir)]
        members = predict_members(checkpoint, "val", adapt=args.adapt_bn)
        val = members.member(0)
        rows.append({"fold": fold, "images": len(val.ids), **score(val.probs, val.labels)})
        fold_oof = pd.DataFrame({"img_name": val.ids, "label": val.labels, "prob": val.probs, "fold": fold})
        if args.adapt_bn:
            fold_oof["prob_unadapted"] = predict_members(checkpoint, "val").member(0).probs
        oof.append(fold_oof)

    per_fold = pd.DataFrame(rows)
    table = pd.concat(oof)
    replace_file(args.runs_dir / f"{name}-oof.csv", lambda f: table.to_csv(f, index=False))
    datamodule = members.datamodule
    split = datamodule.hparams.split
    summary = {"name": name, "k": args.k, "split": split, "adapt_bn": args.adapt_bn, "folds": rows,
               "mean": per_fold.mean(numeric_only=True).to_dict(), "std": per_fold.std(numeric_only=True).to_dict(),
               "figures": figures(per_fold, table)}
    if args.adapt_bn:
        summary["unadapted"] = figures(per_fold, table, "prob_unadapted")
    run_dirs.write_json(args.runs_dir / f"{name}-cv.json", summary)
    right = pd.Series(classes(table["prob"].to_numpy()) == table["label"].to_numpy(), index=table["img_name"])
    picture = save_figure(
        slide_map.draw(datamodule.slide_colours(), set(splits.groups(datamodule.train_table.ids)),
                       by_slide(right)["acc"], title=f"{name}: slides in stain space, out-of-fold accuracy"),
        args.runs_dir / f"{name}-cv-slides.png")
    write_report(args.runs_dir / f"{name}-cv.md", name, per_fold, summary, picture)
    console = Console()
    console.print(summarise(per_fold, split))
    console.print(headline("Out of fold", summary["figures"]), highlight=False)
    if args.adapt_bn:
        console.print(headline("Without BatchNorm adaptation", summary["unadapted"]), highlight=False)
    console.print("Out-of-fold errors by slide:", describe_errors(right), sep="\n", highlight=False)
    console.print(f"Report: {args.runs_dir / f'{name}-cv.md'} (slides in stain space: {picture})")
    console.print(f"Ensemble the folds: make predict RUN=\"{' '.join(fold_dirs)}\"")
    return per_fold


if __name__ == "__main__":
    errors.run(main)
