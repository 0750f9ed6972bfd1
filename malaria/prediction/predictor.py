"""One way from checkpoints to probabilities: the verbs that predict (predict, holdout, cv, report)
go through `predict_subset` and `predict_checkpoints`; `make features` runs its frozen backbone
through the same `predict_dataset`.

Prediction runs through `Trainer.predict` with a `PredictionWriter`, so under DDP each rank
predicts its share and every rank ends with all of the subset, each image once, in row order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from malaria.common import errors, quiet  # noqa: F401 (quiet: silences Lightning's noise on import)
from malaria.data import archive
from malaria.data.datamodule import CellDataset, MalariaDataModule, whole_batch
from malaria.common.hardware import default_precision
from malaria.model.classifier import MalariaClassifier
from malaria.prediction.slide_prior import SlidePrior
from malaria.prediction.ddp_writer import PredictionWriter

Subset = Literal["val", "test"]  # the holdout of the training images, or the test set


def bare_trainer(**overrides: Any) -> L.Trainer:
    """A one-device Trainer that writes nothing (no logger, checkpoints, summary or progress bar),
    on the accelerator and precision training would use: for prediction, feature extraction and
    `make bench`'s timings."""
    settings = dict(accelerator="auto", devices=1, precision=default_precision(), logger=False,
                    enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False)
    return L.Trainer(**{**settings, **overrides})


@dataclass
class Predictions:
    """One subset (the holdout or the test set) as a model saw it: ids, dataset rows, P(parasitized), labels (None for test)."""

    ids: list[str]
    rows: np.ndarray
    probs: np.ndarray
    labels: np.ndarray | None


def load(checkpoint: Path, data_dir: str | None = None) -> tuple[MalariaClassifier, MalariaDataModule]:
    """The model and its datamodule from a checkpoint.

    The data settings (image size, split, cache) come from the checkpoint, so images are
    prepared exactly as in training."""
    model = MalariaClassifier.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=False)
    overrides = {"data_dir": data_dir} if data_dir else {}
    datamodule = MalariaDataModule.load_from_checkpoint(checkpoint, weights_only=False, **overrides)
    return model, datamodule


def subset_dataset(datamodule: MalariaDataModule, subset: Subset) -> CellDataset:
    """The un-augmented images of the test set or of the holdout, prepared on first use."""
    if subset not in ("val", "test"):
        raise errors.ConfigError(f"subset must be 'val' or 'test', not {subset!r}.")
    datamodule.prepare(("test",) if subset == "test" else ("train",))
    datamodule.setup("predict" if subset == "test" else "validate")
    if subset == "test":
        return CellDataset(datamodule.test_cache, np.arange(len(datamodule.test_table)), None)
    return CellDataset(datamodule.train_cache, datamodule.val_rows, datamodule.train_table.labels)


def predict_dataset(module: L.LightningModule, dataset: CellDataset, batch_size: int, num_workers: int = 0,
                    trainer: L.Trainer | None = None, key: str = "probs") -> np.ndarray:
    """`module.predict_step(...)[key]` for every row of `dataset`, in the order of `dataset.rows`.

    A new one-device trainer unless `trainer` is given (a DDP one shards the rows; the writer
    gathers them back on every rank)."""
    writer = PredictionWriter(key=key)
    if trainer is None:
        trainer = bare_trainer()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=whole_batch)
    trainer.callbacks.append(writer)
    try:
        trainer.predict(module, dataloaders=loader, return_predictions=False)
    finally:
        trainer.callbacks.remove(writer)  # a caller's trainer is left as it came
    return writer.probs


def predict_subset(model: MalariaClassifier, datamodule: MalariaDataModule, subset: Subset = "test",
                  tta: bool | None = None, prior: float = 0.0) -> Predictions:
    """P(parasitized) of the test set or the holdout: with `tta` (default: the model's
    own setting) averaged over the 8 dihedral views; with `prior` > 0, each cell's probability
    also weighs its slide's training labels (malaria.prediction.slide_prior)."""
    dataset = subset_dataset(datamodule, subset)
    if len(dataset) == 0:
        raise errors.ConfigError(f"{datamodule.source_dir}: the {subset} subset is empty (a validation split "
                                 "needs data.val_fraction > 0).")
    saved_tta = model.hparams.tta
    if tta is not None:
        model.hparams.tta = tta
    try:
        probs = predict_dataset(model, dataset, datamodule.hparams.batch_size, datamodule.num_workers)
    finally:
        model.hparams.tta = saved_tta
    table = datamodule.test_table if subset == "test" else datamodule.train_table
    rows = np.asarray(dataset.rows)
    ids = [table.ids[r] for r in rows]
    labels = None if subset == "test" else table.labels[rows].astype(np.int64)
    if prior:
        probs = slide_prior(datamodule, subset, prior).adjust(ids, probs)
    return Predictions(ids, rows, probs.astype(np.float64), labels)


def slide_prior(datamodule: MalariaDataModule, subset: Subset, strength: float) -> SlidePrior:
    """The slide prior from the labels a prediction of `subset` may use: every training cell for the
    test set, only the training side of the holdout for the holdout."""
    table = datamodule.train_table if datamodule.train_table is not None else archive.load_train(datamodule.source_dir)
    rows = np.arange(len(table)) if subset == "test" else datamodule.train_rows
    return SlidePrior.fit([table.ids[r] for r in rows], table.labels[rows], strength)


def predict_checkpoints(checkpoints: Sequence[Path], subset: Subset = "test", data_dir: str | None = None,
                        tta: bool | None = None, prior: float = 0.0) -> Predictions:
    """The mean probability over one or several checkpoints, which must predict the same images."""
    first: Predictions | None = None
    total = None
    for checkpoint in checkpoints:
        model, datamodule = load(checkpoint, data_dir)
        these = predict_subset(model, datamodule, subset, tta, prior)
        if first is not None and these.ids != first.ids:
            raise errors.ConfigError(f"{checkpoint} predicts other images than {checkpoints[0]}.")
        first = first or these
        total = these.probs if total is None else total + these.probs
    return Predictions(first.ids, first.rows, total / len(checkpoints), first.labels)
