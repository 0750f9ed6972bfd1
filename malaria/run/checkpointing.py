"""Checkpoints that survive a crash and resume exactly where training stopped.

A run killed at any moment must leave either the previous checkpoint or the new one, never half
of one, and resuming from `last.ckpt` must continue the same run, not a similar one:

- `AtomicCheckpointIO` writes each checkpoint to a temporary file beside it, then renames it.
- `LastCheckpoint` keeps `last.ckpt` no more than a few minutes behind, mid-epoch included.
- `ExactResume` restores the global RNG states and the training loader's position on resume.
- `RefuseNonFiniteCheckpoints` stops training rather than save NaN or inf weights.

The resumable data order they rely on lives beside the data module, in `malaria.data.sampling`.
Wiring: every run gets all four from `malaria.run.cli.Infrastructure`, so no recipe names them.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from malaria.common.atomic import stage_file


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` to a temporary file in the checkpoint's own folder, fsync, then `os.replace`.

    Lightning's own save stages the bytes in the system temp folder and `shutil.move`s them, which
    is a copy, not a rename, whenever that folder is on another file system (as on Kaggle), and
    it never fsyncs: a crash can then leave a truncated `last.ckpt` in place of the good one.
    Remote paths (s3://, gs://) keep Lightning's transactional upload.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for abandoned in path.parent.glob(f".{path.name}.*.tmp"):  # from a save that was killed
            abandoned.unlink(missing_ok=True)
        os.replace(stage_file(path, lambda f: torch.save(checkpoint, f), binary=True,
                              size_hint=_tensor_bytes(checkpoint)), path)


def _tensor_bytes(value: Any) -> int:
    """The bytes of every tensor in a checkpoint: about its size on disk, for a full-disk error."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _is_local(path: str | Path) -> bool:
    return isinstance(get_filesystem(path), LocalFileSystem)


class LastCheckpoint(ModelCheckpoint):
    """`last.ckpt` every `every_n_train_steps` steps and after every validation, nothing else.

    Lightning's `ModelCheckpoint(save_last=True)` writes `last.ckpt` only when it also saves a
    regular checkpoint: a monitored one then leaves `last.ckpt` at the best epoch, a step-based one
    up to `every_n_train_steps` behind the end of training. Best checkpoints are a second
    ModelCheckpoint's job; list this one after it, so `last.ckpt` holds its updated state. There is
    one `last.ckpt` per run, overwritten in place (no `last-v1`)."""

    def __init__(self, every_n_train_steps: int = 100, dirpath: str | Path | None = None) -> None:
        super().__init__(dirpath=dirpath, every_n_train_steps=every_n_train_steps, save_top_k=0,
                         save_last=True, enable_version_counter=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last(trainer)

    def _save_last(self, trainer: L.Trainer) -> None:
        """Where Lightning's ModelCheckpoint saves at the end of an epoch, unless this step is saved."""
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class ExactResume(L.Callback):
    """Restores what a Lightning checkpoint alone does not, so a resumed run continues the same run.

    - The global RNG states (torch, CUDA, numpy, random) that dropout and batch augmentation draw
      from: saved in every checkpoint, restored at `on_train_start`, after the sanity check and the
      data loaders have drawn their own numbers, i.e. where the stream was when it was saved.
    - The training loader's position: Lightning saves it with its loops, but restores it only into
      a loader built after the checkpoint was loaded, and `estimated_stepping_batches` in
      `configure_optimizers` builds it before (Lightning issue #20550). It is read from the
      checkpoint here (`on_load_checkpoint`) and applied to `trainer.train_dataloader` before the
      first batch is drawn; where Lightning did restore it, this sets the same position again.
    """

    def __init__(self) -> None:
        self._loaded: dict[str, Any] | None = None
        self._loader_states: list[dict[str, Any]] = []

    def state_dict(self) -> dict[str, Any]:
        # Tensors and plain tuples only: Lightning resumes with torch.load(weights_only=True).
        name, keys, position, has_gauss, gauss = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
            "python": random.getstate(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
        self._loader_states = fit_loop.get("combined_loader") or []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loaders = trainer.train_dataloader
        stateful = [dl for dl in (loaders if isinstance(loaders, (list, tuple)) else [loaders])
                    if hasattr(dl, "load_state_dict")]
        for loader, state in zip(stateful, self._loader_states):
            loader.load_state_dict(state)
        self._loader_states = []
        if self._loaded is None:
            return
        state, self._loaded = self._loaded, None
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        name, keys, position, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))


class RefuseNonFiniteCheckpoints(L.Callback):
    """Raises FloatingPointError instead of writing a checkpoint whose weights hold NaN or inf.

    The model stops on a non-finite training loss, but an overflowing step can leave NaN weights
    after a finite loss; this catches them at the one moment it matters, before they are saved.
    Parameters and buffers only: metric states such as a running maximum start at -inf."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        for name, tensor in [*pl_module.named_parameters(), *pl_module.named_buffers()]:
            if torch.is_floating_point(tensor) and not torch.isfinite(tensor).all():
                raise FloatingPointError(
                    f"Weight {name!r} holds NaN or inf at epoch {trainer.current_epoch}, "
                    f"step {trainer.global_step}; refusing to save this checkpoint (the last good one "
                    "stays). Lower model.lr or check the inputs."
                )
