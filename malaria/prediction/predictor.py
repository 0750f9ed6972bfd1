"""One way from checkpoints to probabilities: the verbs that predict (predict, holdout, cv, report)
go through `predict_subset`, and those that average runs (predict, holdout) through
`predict_members`; `make features` runs its frozen backbone through the same `predict_dataset`.

Prediction runs through `Trainer.predict` with a `PredictionWriter`, so under DDP each rank
predicts its share and every rank ends with all of the subset, each image once, in row order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from malaria.common import errors, quiet  # noqa: F401 (quiet: silences Lightning's noise on import)
from malaria.data import archive, splits
from malaria.data.datamodule import CellDataset, MalariaDataModule, whole_batch
from malaria.common.hardware import default_precision
from malaria.model.classifier import MalariaClassifier
from malaria.prediction.bn_adaptation import mixed_batchnorm
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
    stored = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
    if "split" not in stored.get("datamodule_hyper_parameters", {}):  # saved before data.split existed: slides
        overrides["split"] = "slide"
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
                   tta: bool | None = None, prior: float = 0.0, adapt: float = 0.0) -> Predictions:
    """P(parasitized) of the test set or the holdout: with `tta` (default: the model's own setting)
    averaged over the 8 dihedral views; with `adapt` > 0, each slide the model never trained on
    predicted with BatchNorm statistics adapted to it (malaria.prediction.bn_adaptation, `adapt`
    training images' worth of weight on the training statistics); with `prior` > 0, each cell's
    probability also weighs its slide's training labels (malaria.prediction.slide_prior)."""
    dataset = subset_dataset(datamodule, subset)
    if len(dataset) == 0:
        raise errors.ConfigError(f"{datamodule.source_dir}: the {subset} subset is empty (a validation split "
                                 "needs data.val_fraction > 0).")
    table = datamodule.test_table if subset == "test" else datamodule.train_table
    rows = np.asarray(dataset.rows)
    ids = [table.ids[r] for r in rows]
    saved_tta = model.hparams.tta
    if tta is not None:
        model.hparams.tta = tta
    try:
        probs = predict_dataset(model, dataset, datamodule.hparams.batch_size, datamodule.num_workers)
        if adapt:
            for positions in new_slides(ids, datamodule.training_slides()).values():
                probs[positions] = predict_slide(model, dataset, positions, adapt)
    finally:
        model.hparams.tta = saved_tta
    labels = None if subset == "test" else table.labels[rows].astype(np.int64)
    if prior:
        probs = slide_prior(datamodule, subset, prior).adjust(ids, probs)
    return Predictions(ids, rows, probs.astype(np.float64), labels)


def new_slides(ids: Sequence[str], training_slides: set[str]) -> dict[str, np.ndarray]:
    """The positions in `ids` of each slide with no training cell (a cell with no slide in its name
    is a slide of its own)."""
    groups = splits.groups(list(ids))
    return {slide: np.flatnonzero(groups == slide) for slide in np.unique(groups) if slide not in training_slides}


def predict_slide(model: MalariaClassifier, dataset: CellDataset, positions: np.ndarray, adapt: float,
                  max_batch: int = 2048) -> np.ndarray:
    """The probabilities of one slide's cells (these positions of `dataset`), its whole slide one batch
    (in near-equal batches past `max_batch`), each normalised with adapted BatchNorm statistics."""
    cells = CellDataset(dataset.cache_path, np.asarray(dataset.rows)[positions], dataset.labels)
    batch = -(-len(cells) // -(-len(cells) // max_batch))
    with mixed_batchnorm(model, adapt):
        return predict_dataset(model, cells, batch)


def slide_prior(datamodule: MalariaDataModule, subset: Subset, strength: float) -> SlidePrior:
    """The slide prior from the labels a prediction of `subset` may use: every training cell for the
    test set, only the training side of the holdout for the holdout."""
    table = datamodule.train_table if datamodule.train_table is not None else archive.load_train(datamodule.source_dir)
    rows = np.arange(len(table)) if subset == "test" else datamodule.train_rows
    return SlidePrior.fit([table.ids[r] for r in rows], table.labels[rows], strength)


@dataclass
class Members:
    """Several checkpoints' predictions of the same images, images alone, and the slide prior their
    subset may use: an ensemble's members, each scorable alone."""

    names: list[str]
    predictions: list[Predictions]
    datamodule: MalariaDataModule
    subset: Subset

    def member(self, index: int, prior: float = 0.0) -> Predictions:
        """One member, with the slide prior of `prior` pseudo-cells (0: the images alone)."""
        each = self.predictions[index]
        if not prior:
            return each
        return dataclasses.replace(each, probs=slide_prior(self.datamodule, self.subset, prior).adjust(each.ids, each.probs))

    def ensemble(self, prior: float = 0.0) -> Predictions:
        """The mean of the members' probabilities, each with the prior first (as each would submit)."""
        members = [self.member(i, prior) for i in range(len(self.predictions))]
        return dataclasses.replace(members[0], probs=np.mean([m.probs for m in members], axis=0))


def predict_members(checkpoints: Sequence[Path], subset: Subset = "test", data_dir: str | None = None,
                    tta: bool | None = None, adapt: float = 0.0) -> Members:
    """Each checkpoint's probabilities of the same images (refused where they hold out other ones):
    what `make predict` averages into a submission and `make holdout` scores member by member."""
    predictions, datamodule = [], None
    for checkpoint in checkpoints:
        model, datamodule_of = load(checkpoint, data_dir)
        if subset == "val" and datamodule_of.hparams.val_fraction == 0:
            raise errors.ConfigError(f"{checkpoint} trained on every image (data.val_fraction 0): "
                                     "it has no holdout to score.")
        these = predict_subset(model, datamodule_of, subset, tta, adapt=adapt)
        if predictions and these.ids != predictions[0].ids:
            raise errors.ConfigError(
                f"{checkpoint} predicts other images than {checkpoints[0]}: their data settings (data.seed, "
                "data.split, data.val_fraction, data.fold or the training files) differ, so they cannot be averaged.")
        predictions.append(these)
        datamodule = datamodule or datamodule_of
    return Members([run_name(c) for c in checkpoints], predictions, datamodule, subset)


def run_name(checkpoint: Path) -> str:
    """runs/<name>/checkpoints/best.ckpt -> <name>."""
    return checkpoint.parent.parent.name if checkpoint.parent.name == "checkpoints" else checkpoint.stem


def predict_checkpoints(checkpoints: Sequence[Path], subset: Subset = "test", data_dir: str | None = None,
                        tta: bool | None = None, prior: float = 0.0, adapt: float = 0.0) -> Predictions:
    """The mean probability over one or several checkpoints, which must predict the same images."""
    return predict_members(checkpoints, subset, data_dir, tta, adapt).ensemble(prior)
