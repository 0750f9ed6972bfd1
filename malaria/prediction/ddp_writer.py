"""Collect predictions from every process, so prediction under DDP gives one complete result.

Under DDP each rank predicts its own shard of the images, and `trainer.predict` returns that rank's
share only. `PredictionWriter` gathers the `{"rows", "probs"}` of `MalariaClassifier.predict_step`
from all ranks, drops the repeats that a padding sampler adds (by row index), checks that every
image was predicted once, and, given `out`, writes the submission from rank 0 alone:

    python -m malaria.commands.train predict --config runs/<run>/config.yaml --ckpt_path runs/<run>/checkpoints/best.ckpt \\
        --trainer.devices 2 --trainer.strategy ddp \\
        --trainer.callbacks+=malaria.prediction.ddp_writer.PredictionWriter --trainer.callbacks.out submissions/x.csv
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter

from malaria.common import errors
from malaria.model.metrics import THRESHOLD
from malaria.prediction.submission import write_submission


def gather(obj: Any, world_size: int) -> list[Any]:
    """`obj` from every rank, in rank order (just `[obj]` in a single process)."""
    if world_size < 2 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def merge(parts: Sequence[tuple[np.ndarray, np.ndarray]], expected: np.ndarray) -> np.ndarray:
    """Probabilities in the order of `expected` (row indices) from the ranks' (rows, probs) parts.

    A row predicted twice (a padding sampler repeats a few) keeps its first prediction; a row
    never predicted is an error, as is a row that was not asked for."""
    rows = np.concatenate([r for r, _ in parts])
    probs = np.concatenate([p for _, p in parts])
    unique, first = np.unique(rows, return_index=True)
    missing = np.setdiff1d(expected, unique)
    extra = np.setdiff1d(unique, expected)
    if len(missing) or len(extra):
        raise RuntimeError(f"Predictions do not match the images: {len(missing)} rows missing "
                           f"(e.g. {missing[:5].tolist()}), {len(extra)} unexpected (e.g. {extra[:5].tolist()}).")
    return probs[first][np.searchsorted(unique, expected)]


class PredictionWriter(BasePredictionWriter):
    """Gathers the predictions of all ranks into `probs`, one per row of the predicted dataset.

    Every rank ends with the same complete `rows` and `probs`; with `out`, global rank 0 writes them
    as a submission (`img_name,label`, label 1 when the probability is at least `threshold`).
    `key` names the entry of each `predict_step` output gathered beside "rows": "probs", or the
    pooled features of malaria.commands.features."""

    def __init__(self, out: str | None = None, threshold: float = THRESHOLD, key: str = "probs") -> None:
        super().__init__(write_interval="epoch")
        self.key = key
        self.out = Path(out) if out else None
        self.threshold = threshold
        self.rows: np.ndarray | None = None
        self.probs: np.ndarray | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Refuse early, on every rank, rather than after the whole prediction.
        if self.out is not None and self.out.exists():
            raise errors.ExistsError(f"{self.out} already exists; refusing to overwrite a submission.")

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Sequence[Any],
                           batch_indices: Sequence[Any]) -> None:
        outputs = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        local = (torch.cat([o["rows"] for o in outputs]).cpu().numpy() if outputs else np.empty(0, np.int64),
                 torch.cat([o[self.key] for o in outputs]).float().cpu().numpy() if outputs else np.empty(0))
        loaders = trainer.predict_dataloaders
        dataset = (loaders[0] if isinstance(loaders, (list, tuple)) else loaders).dataset
        self.rows = np.asarray(dataset.rows)
        self.probs = merge(gather(local, trainer.world_size), self.rows)
        if self.out is not None and trainer.is_global_zero:
            self._write_submission(trainer)

    def _write_submission(self, trainer: L.Trainer) -> None:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "test_ids"):
            raise RuntimeError("PredictionWriter(out=...) needs the MalariaDataModule, to name the test images.")
        ids = [datamodule.test_ids[r] for r in self.rows]
        labels = (self.probs >= self.threshold).astype(np.int64)
        write_submission(ids, labels, self.out, metadata={
            "checkpoint": trainer.ckpt_path, "world_size": trainer.world_size, "threshold": self.threshold,
        })
        print(f"Wrote {self.out} ({len(ids)} rows, {int(labels.sum())} predicted parasitized)")
