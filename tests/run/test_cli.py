"""MalariaCLI: the infrastructure every run gets without its recipe naming it, and recipes that
name their one entry point."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from malaria.common import errors
from malaria.commands import train
from malaria.run.checkpointing import AtomicCheckpointIO, LastCheckpoint
from malaria.evaluation.run_report import RunReport


def test_a_run_config_saved_before_the_defaults_resumes_without_doubled_callbacks(tmp_path: Path) -> None:
    old = yaml.safe_load(Path("configs/default.yaml").read_text())
    old["trainer"]["plugins"] = [{"class_path": "malaria.checkpointing.AtomicCheckpointIO"}]  # saved before the folders: old names
    old["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"monitor": "val/acc", "mode": "max"}},
        {"class_path": "malaria.checkpointing.LastCheckpoint", "init_args": {"every_n_train_steps": 7}},
        {"class_path": "malaria.report.RunReport"},
    ]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    cli = train.main(["--config", str(tmp_path / "config.yaml"), "--runs_dir", str(tmp_path), "--wandb.mode",
                      "disabled"], run=False)
    kinds = [type(c) for c in cli.trainer.callbacks]
    assert kinds.count(ModelCheckpoint) == kinds.count(LastCheckpoint) == kinds.count(RunReport) == 1
    assert next(c for c in cli.trainer.callbacks if type(c) is LastCheckpoint)._every_n_train_steps == 7


def test_a_features_recipe_refuses_the_training_entry_point(tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigError, match="make features"):
        train.main(["--config", "configs/resnet18_features.yaml", "--runs_dir", str(tmp_path)], run=False)


def test_infrastructure_is_default_and_each_part_can_be_switched_off_or_replaced(tmp_path: Path) -> None:
    def trainer(*extra: str) -> L.Trainer:
        return train.main(["--config", "configs/default.yaml", "--runs_dir", str(tmp_path), "--wandb.mode", "disabled",
                           *extra], run=False).trainer

    kinds = [type(c) for c in trainer().callbacks]
    assert {ModelCheckpoint, LastCheckpoint, RunReport} <= set(kinds)
    assert kinds.index(ModelCheckpoint) < kinds.index(LastCheckpoint)  # last.ckpt holds the best's state
    off = trainer("--infrastructure.report", "false", "--infrastructure.last_checkpoint_every_n_train_steps", "0",
                  "--infrastructure.atomic_checkpoints", "false")
    assert not {RunReport, LastCheckpoint} & {type(c) for c in off.callbacks}
    assert not isinstance(off.strategy.checkpoint_io, AtomicCheckpointIO)
    own = trainer("--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                  "--trainer.callbacks.monitor", "val/loss")
    assert [c.monitor for c in own.callbacks if type(c) is ModelCheckpoint] == ["val/loss"]
