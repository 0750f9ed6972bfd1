"""Predict the test set with one run, or an ensemble of runs, and write a submission CSV.

    python -m malaria.predict                       # the latest run's best checkpoint
    python -m malaria.predict --run runs/a runs/b   # average the probabilities of several runs
    python -m malaria.predict --checkpoint last     # the final weights instead of the best epoch
    python -m malaria.predict --slide-prior 0       # the images alone, without their slides' priors
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch

from malaria import archive, errors, runs
from malaria.datamodule import MalariaDataModule
from malaria.module import MalariaClassifier
from malaria.priors import DEFAULT_STRENGTH, SlidePrior
from malaria.submit import default_submission_path, write_submission
from malaria.train import default_precision


def load(checkpoint: Path, data_dir: str | None = None, tta: bool | None = None,
         ) -> tuple[MalariaClassifier, MalariaDataModule]:
    """The model and its datamodule from a checkpoint.

    The data settings (image size, split, cache) come from the checkpoint, so images are
    prepared exactly as in training."""
    model = MalariaClassifier.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=False)
    if tta is not None:
        model.hparams.tta = tta
    overrides = {"data_dir": data_dir} if data_dir else {}
    datamodule = MalariaDataModule.load_from_checkpoint(checkpoint, weights_only=False, **overrides)
    return model, datamodule


def slide_prior(datamodule: MalariaDataModule, split: str, strength: float) -> SlidePrior:
    """The slide prior from the labels a prediction of `split` may use: every training cell for the
    test set, only the training side of the holdout for the holdout."""
    table = datamodule.train_table if datamodule.train_table is not None else archive.load_train(datamodule.source_dir)
    rows = np.arange(len(table)) if split == "test" else datamodule.train_rows
    return SlidePrior.fit([table.ids[r] for r in rows], table.labels[rows], strength)


def predict_split(model: MalariaClassifier, datamodule: MalariaDataModule, split: str = "test",
                  prior: float = 0.0) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """Ids, probabilities of parasitized and labels (None for test) of the test or validation split;
    with `prior` > 0, each cell's probability also weighs its slide's training labels (malaria.priors)."""
    datamodule.prepare_data()
    datamodule.setup("predict" if split == "test" else "validate")
    if split == "test":
        table, rows, loader = datamodule.test_table, np.arange(len(datamodule.test_table)), datamodule.predict_dataloader()
    else:
        table, rows, loader = datamodule.train_table, datamodule.val_rows, datamodule.val_dataloader()
    trainer = L.Trainer(accelerator="auto", devices=1, precision=default_precision(), logger=False,
                        enable_checkpointing=False, enable_model_summary=False)
    outputs = trainer.predict(model, dataloaders=loader)
    by_row = np.full(len(table), np.nan)
    by_row[torch.cat([o["rows"] for o in outputs]).numpy()] = torch.cat([o["probs"] for o in outputs]).numpy()
    labels = None if table.labels is None else table.labels[rows]
    ids, probs = [table.ids[r] for r in rows], by_row[rows]
    if prior:
        probs = slide_prior(datamodule, split, prior).adjust(ids, probs)
    return ids, probs, labels


def predict_checkpoint(checkpoint: Path, data_dir: str | None = None, tta: bool | None = None,
                       prior: float = 0.0) -> tuple[list[str], np.ndarray]:
    """Test ids and their probabilities of parasitized, from one checkpoint."""
    ids, probs, _ = predict_split(*load(checkpoint, data_dir, tta), split="test", prior=prior)
    return ids, probs


def ensemble(checkpoints: Sequence[Path], data_dir: str | None, tta: bool | None,
             prior: float = 0.0) -> tuple[list[str], np.ndarray]:
    """The mean probability over several checkpoints."""
    ids, total = None, None
    for checkpoint in checkpoints:
        these_ids, probs = predict_checkpoint(checkpoint, data_dir, tta, prior)
        if ids is not None and these_ids != ids:
            raise errors.ConfigError(f"{checkpoint} predicts a different test set than {checkpoints[0]}.")
        ids, total = these_ids, probs if total is None else total + probs
    return ids, total / len(checkpoints)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", nargs="*", type=Path, default=None,
                        help="run directories (default: the latest run in runs/)")
    parser.add_argument("--data-dir", default=None, help="competition folder (default: the run's own)")
    parser.add_argument("--out", type=Path, default=None,
                        help="submission path (default: submissions/<run>-<time>.csv)")
    parser.add_argument("--checkpoint", choices=runs.CHECKPOINTS, default="best",
                        help="each run's best holdout epoch (default) or its final weights")
    parser.add_argument("--slide-prior", type=float, default=DEFAULT_STRENGTH, metavar="STRENGTH",
                        help="weigh each cell's slide by the training labels of that slide, shrunk by "
                             f"STRENGTH pseudo-cells (default {DEFAULT_STRENGTH}; 0: the images alone)")
    tta = parser.add_mutually_exclusive_group()
    tta.add_argument("--tta", dest="tta", action="store_true", default=None, help="average the 8 dihedral views")
    tta.add_argument("--no-tta", dest="tta", action="store_false")
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    args = _parser().parse_args(argv)
    run_dirs = args.run or [runs.latest_run()]
    checkpoints = [runs.checkpoint(r, args.checkpoint) for r in run_dirs]
    ids, probs = ensemble(checkpoints, args.data_dir, args.tta, args.slide_prior)
    name = "+".join(r.name for r in run_dirs)
    out = args.out or default_submission_path(name)
    summaries = [runs.read_summary(r) for r in run_dirs]
    accuracies = [s["best_val_acc"] for s in summaries if s.get("best_val_acc") is not None]
    metadata = {
        "runs": [r.name for r in run_dirs],
        "checkpoints": [str(c) for c in checkpoints],
        "config": ", ".join(str(r / "config.yaml") for r in run_dirs),
        "val_acc": float(np.mean(accuracies)) if accuracies else None,
        "tta": args.tta,
        "slide_prior": args.slide_prior,
    }
    write_submission(ids, (probs >= 0.5).astype(np.int64), out, metadata=metadata)
    print(f"Wrote {out} ({len(ids)} rows, {int((probs >= 0.5).sum())} predicted parasitized)")
    return out


if __name__ == "__main__":
    errors.run(main)
