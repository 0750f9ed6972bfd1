"""Preemption: SIGTERM or SIGINT during training saves `last.ckpt`, then names the resume command.

Lightning does most of it. Its signal connector notes a SIGTERM; the training loop raises
`SIGTERMException` at the next batch boundary, once the batch's hooks (and checkpoints) have run;
the trainer then calls every callback's `on_exception` before it tears down. `SaveOnPreemption`
saves there, as Lightning's `OnExceptionCheckpoint` does, but only for that exception: it writes
`last.ckpt` through the run's checkpoint IO (write-then-rename), in the state a mid-epoch
`last.ckpt` has, so the resumed run is the same run. It also routes SIGINT (Ctrl-C) through the
same path: Python's KeyboardInterrupt would land anywhere, half-way through an optimizer step
included. (`OnExceptionCheckpoint` itself saves on every exception, a NaN or a full disk included,
deletes its file at the end of a run, and makes Lightning resume every new fit from "last".)

A second signal while saving only notes the stop again; killing the process outright (kill -9)
leaves the previous `last.ckpt`, since the new one is renamed into place only once complete.
A SIGTERMException reaching `build` (`malaria.run.cli`) becomes `errors.Preempted`: one line naming
the command that resumes the run, and exit status 128 + the signal's number, as a shell reports.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from malaria.common import errors


@dataclass(frozen=True)
class Stop:
    """Where a signal stopped training, and what was saved."""

    signal: signal.Signals
    checkpoint: Path
    saved: bool  # False when the signal came before the first training batch: nothing new to save
    epoch: int
    step: int


class SaveOnPreemption(L.Callback):
    """`last.ckpt` when SIGTERM or SIGINT stops training; on any other exception nothing is saved
    (a NaN or a full disk must not replace the last good checkpoint)."""

    # Signals are process-wide, and so is the record of the last stop they caused: `build` reads it
    # after the trainer has re-raised Lightning's exception, which carries no details.
    last_stop: ClassVar[Stop | None] = None

    def __init__(self, dirpath: str | Path) -> None:
        self.path = Path(dirpath) / "last.ckpt"
        self._signal = signal.SIGTERM
        self._previous_sigint: Any = None
        self._training = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        SaveOnPreemption.last_stop = None
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._sigint_as_sigterm)

    def _sigint_as_sigterm(self, signum: int, frame: FrameType | None) -> None:
        """Hand Ctrl-C to whatever handles SIGTERM now: Lightning's connector during training.
        Before it is installed (data checks, model set-up) nothing needs saving: Ctrl-C as usual."""
        handler = signal.getsignal(signal.SIGTERM)
        if not callable(handler):
            signal.default_int_handler(signum, frame)
        self._signal = signal.SIGINT
        handler(signal.SIGTERM, frame)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._training = True

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        # During the sanity check a resumed run has not restored its random streams yet (ExactResume
        # does at train start): its last.ckpt, untouched, is the right one to resume from.
        saved = self._training and not trainer.sanity_checking
        if saved:
            trainer.save_checkpoint(self.path)
        if trainer.is_global_zero:
            SaveOnPreemption.last_stop = Stop(self._signal, self.path, saved, trainer.current_epoch,
                                              trainer.global_step)
        self._restore_sigint()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_sigint()

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None


def preempted() -> errors.Preempted:
    """The error for a training stopped by a signal, naming `make train RESUME=<run>` when it resumes."""
    stop = SaveOnPreemption.last_stop
    if stop is None:  # stopped before the trainer was set up, or on another rank
        return errors.Preempted("stopped by SIGTERM before training began", None, 128 + signal.SIGTERM)
    run_dir = stop.checkpoint.parent.parent
    resume = f"make train RESUME={run_dir}" if stop.checkpoint.exists() else None
    if stop.saved:
        what = f"stopped by {stop.signal.name} at epoch {stop.epoch}, step {stop.step}; saved {stop.checkpoint}"
    else:
        what = f"stopped by {stop.signal.name} before training began; nothing new to save"
    return errors.Preempted(what, resume, 128 + stop.signal)
