"""Predict the test set with one run, or an ensemble of runs, and write a submission CSV.

    python -m malaria.commands.predict                       # the latest run's best checkpoint
    python -m malaria.commands.predict --run runs/a runs/b   # average the probabilities of several runs
    python -m malaria.commands.predict --checkpoint last     # the final weights instead of the best epoch
    python -m malaria.commands.predict --slide_prior 0       # the images alone, without their slides' priors
    python -m malaria.commands.predict --adapt_bn 16         # new slides' BatchNorm statistics adapted to them

Beside the submission, `<name>.slides.png` draws every slide in stain space (malaria.evaluation.slide_map),
and the summary says how many test cells come from slides no training cell came from, naming the
new slides stained unlike any training slide.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from malaria.common import errors
from malaria.common.atomic import save_figure
from malaria.common.flags import NonNegativeFloat, argument
from malaria.data import splits
from malaria.evaluation import slide_map
from malaria.model.metrics import classes
from malaria.prediction.bn_adaptation import DEFAULT_ADAPT
from malaria.prediction.predictor import Members, Predictions, predict_members
from malaria.prediction.slide_prior import DEFAULT_STRENGTH
from malaria.prediction.submission import default_submission_path, write_submission
from malaria.run import run_dirs


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", nargs="*", type=Path, default=None,
                        help="run directories (default: the latest run in runs/)")
    parser.add_argument("--data.data_dir", dest="data_dir", default=None, help="competition folder (default: the run's own)")
    parser.add_argument("--out", type=Path, default=None,
                        help="submission path (default: submissions/<run>-<time>.csv)")
    parser.add_argument("--checkpoint", choices=run_dirs.CHECKPOINTS, default="best",
                        help="each run's best holdout epoch (default) or its final weights")
    parser.add_argument("--slide_prior", type=argument(NonNegativeFloat), default=DEFAULT_STRENGTH, metavar="STRENGTH",
                        help="weigh each cell's slide by the training labels of that slide, shrunk by "
                             f"STRENGTH pseudo-cells (default {DEFAULT_STRENGTH}; 0: the images alone)")
    parser.add_argument("--adapt_bn", type=argument(NonNegativeFloat), default=DEFAULT_ADAPT, metavar="IMAGES",
                        help="BatchNorm statistics adapted to each test slide no training cell came from, the "
                             f"training statistics weighing IMAGES images (default {DEFAULT_ADAPT}; 0: off)")
    tta = parser.add_mutually_exclusive_group()
    tta.add_argument("--tta", dest="tta", action="store_true", default=None, help="average the 8 dihedral views")
    tta.add_argument("--no_tta", dest="tta", action="store_false")
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.out is not None and args.out.exists():
        parser.error(f"argument --out: {args.out} already exists; a submission is never overwritten.")
    folders = args.run or [run_dirs.latest_run()]
    checkpoints = [run_dirs.checkpoint(r, args.checkpoint) for r in folders]
    members = predict_members(checkpoints, "test", args.data_dir, args.tta, args.adapt_bn)
    predicted = members.ensemble(args.slide_prior)
    name = "+".join(r.name for r in folders)
    out = args.out or default_submission_path(name)
    summaries = [run_dirs.read_summary(r) for r in folders]
    accuracies = [s["best_val_acc"] for s in summaries if s.get("best_val_acc") is not None]
    metadata = {
        "runs": [r.name for r in folders],
        "checkpoints": [str(c) for c in checkpoints],
        "config": ", ".join(str(r / "config.yaml") for r in folders),
        "val_acc": float(np.mean(accuracies)) if accuracies else None,
        "tta": args.tta,
        "slide_prior": args.slide_prior,
        "adapt_bn": args.adapt_bn,
    }
    labels = classes(predicted.probs)
    write_submission(predicted.ids, labels, out, metadata=metadata)
    print(f"Wrote {out} ({len(labels)} rows, {int(labels.sum())} predicted parasitized)")
    describe_slides(members, predicted, out.with_suffix(".slides.png"), args.adapt_bn)
    return out


def describe_slides(members: Members, predicted: Predictions, picture: Path, adapt: float) -> None:
    """How many test cells come from slides no training cell came from (new patients), which of those
    slides are stained unlike any training slide, and the picture of all slides."""
    datamodule = members.datamodule
    training = datamodule.training_slides()
    groups = splits.groups(predicted.ids)
    new = ~np.isin(groups, sorted(training))
    treated = f"BatchNorm adapted to each (--adapt_bn {adapt:g})" if adapt else "no adaptation (--adapt_bn 0)"
    print(f"{int(new.sum())} of {len(groups)} test cells come from {len(np.unique(groups[new]))} slides with no "
          f"training cell: no slide prior for them, {treated}.")
    slides = datamodule.slide_colours()
    for line in slide_map.describe_outside(slide_map.outside(slides, training)):
        print(line)
    save_figure(slide_map.draw(slides, training, title=f"Slides in stain space: {len(training)} with training "
                                                           f"cells, {len(slides) - len(training)} new"), picture)
    print(f"Wrote {picture} (every slide in stain space)")


if __name__ == "__main__":
    errors.run(main)
