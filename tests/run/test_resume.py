"""Interrupted and repeated runs: a real SIGKILL mid-epoch, then `make train RESUME=...`, must end
exactly where an uninterrupted run ends; the same seed and config give the same predictions; a
NaN stops training before a broken checkpoint is written; checkpoints are written atomically.

Tolerance: none. On one CPU machine the resumed run's weights and final metrics are bit-identical
to the uninterrupted run's (torch.equal / ==). Only the interrupted epoch's train/* epoch means
differ: Lightning does not checkpoint its running logging sums, so they cover the resumed part.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from malaria.run import run_dirs
from malaria.commands import train
from malaria.run.checkpointing import AtomicCheckpointIO, RefuseNonFiniteCheckpoints
from malaria.prediction.predictor import predict_checkpoints
from malaria.model.classifier import MalariaClassifier

REPO = Path(__file__).absolute().parents[2]
EPOCHS = 3
EVERY_N_STEPS = 4


def tiny_recipe(folder: Path) -> Path:
    """configs/default.yaml shrunk to seconds, with a fine-tuning phase and batch augmentation.

    last.ckpt is saved every few steps instead of every 100; the backbone is frozen for epoch 0
    and unfrozen at epoch 1, the epoch that gets interrupted."""
    config = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    config["infrastructure"] = {"report": False, "last_checkpoint_every_n_train_steps": EVERY_N_STEPS}
    finetune = {"class_path": "malaria.model.finetune.FineTune", "init_args": {"unfreeze": {1: "all"}}}
    config["trainer"].update(
        callbacks=[finetune],
        max_epochs=EPOCHS,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    config["data"].update(image_size=32, batch_size=16, num_workers=0)
    config["model"].update(model_kwargs={"widths": [8, 16, 32]}, batch_dihedral=True)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def fit_args(recipe: Path, demo_dir: Path, runs_dir: Path, run: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(recipe),
        "--data.data_dir",
        str(demo_dir),
        "--runs_dir",
        str(runs_dir),
        "--run",
        run,
    ]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = load(a)["state_dict"], load(b)["state_dict"]
    assert first.keys() == second.keys()
    different = [k for k in first if not torch.equal(first[k], second[k])]
    assert different == [], f"{len(different)} tensors differ, e.g. {different[:3]}"


def epoch_metrics(run_dir: Path) -> pd.DataFrame:
    """The last logged value of each metric per epoch."""
    return pd.read_csv(run_dir / "metrics.csv").groupby("epoch").last()


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_recipe(tmp_path_factory.mktemp("recipe"))


@pytest.fixture(scope="module")
def straight(recipe: Path, demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of the tiny recipe."""
    runs_dir = tmp_path_factory.mktemp("runs")
    train.main(fit_args(recipe, demo_dir, runs_dir, "straight"))
    return runs_dir / "straight"


def steps_per_epoch(run_dir: Path) -> int:
    return load(run_dir / "checkpoints" / "last.ckpt")["global_step"] // EPOCHS


def kill_when(command: list[str], last: Path, wanted: Callable[[int], bool], log: Path,
              sig: signal.Signals = signal.SIGKILL, times: int = 1) -> None:
    """Run `command`; send it `sig` (`times` in a row) as soon as it has saved `last` at a global step
    that is `wanted`. A SIGKILL must kill it; SIGTERM and SIGINT must end it with 128 + the signal."""
    seen = None
    with log.open("w") as output:
        child = subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while child.poll() is None and time.monotonic() < deadline:
            # Each save renames a new file into place: a new inode means a new checkpoint to look at.
            stamp = last.stat().st_ino if last.exists() else None
            if stamp is not None and stamp != seen:
                seen = stamp
                if wanted(load(last)["global_step"]):
                    for _ in range(times):
                        child.send_signal(sig)
                    break
            time.sleep(0.005)
        child.wait()
    expected = -signal.SIGKILL if sig == signal.SIGKILL else 128 + sig
    assert child.returncode == expected, f"training was not stopped mid-run:\n{log.read_text()[-3000:]}"


def test_training_killed_mid_epoch_resumes_to_identical_weights_and_metrics(
    straight: Path, recipe: Path, demo_dir: Path, tmp_path: Path
) -> None:
    per_epoch = steps_per_epoch(straight)
    run = tmp_path / "killed"
    last = run / "checkpoints" / "last.ckpt"
    kill_when(
        [sys.executable, "-m", "malaria.commands.train", *fit_args(recipe, demo_dir, tmp_path, "killed")],
        last,
        lambda step: per_epoch < step < 2 * per_epoch,
        tmp_path / "killed.log",
    )
    interrupted_at = load(last)["global_step"]
    assert per_epoch < interrupted_at < 2 * per_epoch, "the kill must land in epoch 1, after its unfreezing"
    assert not (run / "summary.json").exists()

    # What `make train RESUME=runs/killed` runs.
    train.main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", str(last)])

    assert_same_weights(straight / "checkpoints" / "last.ckpt", last)
    assert load(last)["global_step"] == EPOCHS * per_epoch
    assert (
        load(last)["callbacks"]["FineTune"]["unfrozen"]
        == load(straight / "checkpoints" / "last.ckpt")["callbacks"]["FineTune"]["unfrozen"]
        > 0
    )
    final = epoch_metrics(straight).loc[EPOCHS - 1]
    pd.testing.assert_series_equal(epoch_metrics(run).loc[EPOCHS - 1, final.index], final)
    val = [c for c in final.index if c.startswith("val/")]
    pd.testing.assert_frame_equal(epoch_metrics(run).loc[1:, val], epoch_metrics(straight).loc[1:, val])
    assert_same_weights(straight / "checkpoints" / "best.ckpt", run / "checkpoints" / "best.ckpt")
    assert not list((run / "checkpoints").glob(".*.tmp"))  # a save the kill cut short left no litter


def test_same_seed_and_config_give_identical_predictions(
    straight: Path, recipe: Path, demo_dir: Path
) -> None:
    again = straight.parent / "again"
    train.main(fit_args(recipe, demo_dir, straight.parent, "again"))
    assert_same_weights(straight / "checkpoints" / "last.ckpt", again / "checkpoints" / "last.ckpt")
    first, second = (predict_checkpoints([run / "checkpoints" / "best.ckpt"], data_dir=str(demo_dir))
                     for run in (straight, again))
    assert first.ids == second.ids and np.array_equal(first.probs, second.probs) and first.probs.std() > 0
    environment = json.loads((again / "environment.json").read_text())
    assert environment["git_commit"] == run_dirs.git_commit() and environment["packages"]["torch"]
    assert yaml.safe_load((again / "config.yaml").read_text())["seed_everything"] == 42


# ----------------------------------------------------------------------------------------------
# NaN and inf: a clear stop, and no checkpoint holding them


def test_nan_loss_stops_training_before_that_epoch_is_saved(
    straight: Path, recipe: Path, demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    poisoned_step = steps_per_epoch(straight) + 2  # the third step of epoch 1
    forward = MalariaClassifier.forward

    def diverging(self: MalariaClassifier, images: torch.Tensor) -> torch.Tensor:
        logits = forward(self, images)
        return logits * torch.nan if self.training and self.global_step >= poisoned_step else logits

    monkeypatch.setattr(MalariaClassifier, "forward", diverging)
    with pytest.raises(
        FloatingPointError, match=rf"loss became nan at epoch 1, step {poisoned_step}\. Stopping"
    ):
        train.main(fit_args(recipe, demo_dir, tmp_path, "nan"))
    saved = [load(p) for p in (tmp_path / "nan" / "checkpoints").glob("*.ckpt")]
    assert saved and max(c["global_step"] for c in saved) < poisoned_step
    assert all(
        torch.isfinite(t).all() for c in saved for k, t in c["state_dict"].items() if k.startswith("net.")
    )
    assert not (tmp_path / "nan" / "summary.json").exists()


def test_non_finite_weights_are_never_written(
    recipe: Path, demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An overflowing step can leave NaN weights behind a finite loss; the checkpoint after it is refused."""
    step = MalariaClassifier.optimizer_step

    def overflowing(self: MalariaClassifier, *args, **kwargs) -> None:
        step(self, *args, **kwargs)
        if self.trainer.global_step + 1 == 2 * EVERY_N_STEPS:  # the step counter moves once this hook returns
            next(self.net.parameters()).data.fill_(torch.inf)

    monkeypatch.setattr(MalariaClassifier, "optimizer_step", overflowing)
    with pytest.raises(
        FloatingPointError, match=rf"holds NaN or inf at epoch 0, step {2 * EVERY_N_STEPS}; refusing"
    ):
        train.main(fit_args(recipe, demo_dir, tmp_path, "inf"))
    checkpoints = tmp_path / "inf" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["last.ckpt"]
    assert load(checkpoints / "last.ckpt")["global_step"] == EVERY_N_STEPS  # the save before stays


def test_refuse_non_finite_checkpoints_ignores_metric_states() -> None:
    """A running maximum starts at -inf: only parameters and buffers are checked."""
    model = MalariaClassifier(model_kwargs={"widths": (8, 16)})
    trainer = type("Trainer", (), {"current_epoch": 0, "global_step": 0})()
    RefuseNonFiniteCheckpoints().on_save_checkpoint(trainer, model, {"state_dict": model.state_dict()})
    model.net.head.bias.data.fill_(torch.nan)
    with pytest.raises(FloatingPointError, match="'net.head.bias'"):
        RefuseNonFiniteCheckpoints().on_save_checkpoint(trainer, model, {"state_dict": model.state_dict()})


# ----------------------------------------------------------------------------------------------
# Atomic checkpoint writes


def test_checkpoint_write_is_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    good = path.read_bytes()
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask

    def crash_half_way(checkpoint: dict, f) -> None:
        f.write(good[: len(good) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crash_half_way)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    assert path.read_bytes() == good
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left over


# ----------------------------------------------------------------------------------------------
# The training order: a function of (seed, epoch), resumable at any batch
