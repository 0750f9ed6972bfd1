"""MalariaCLI: the infrastructure every run gets without its recipe naming it, and recipes that
name their one entry point."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from malaria.common import errors
from malaria.commands import train
from malaria.run import cli
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


LAUNCHERS = ("TORCHELASTIC_RUN_ID", "RANK", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE",
             "SLURM_NTASKS", "SLURM_JOB_ID", "SLURM_JOB_NAME", cli.RUN_ENV)


def torchrun(rank: int, processes: int, run_id: str = "job7") -> dict[str, str]:
    """What torchrun sets in each process it starts, one per machine."""
    return {"TORCHELASTIC_RUN_ID": run_id, "RANK": str(rank), "GROUP_RANK": str(rank), "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1", "WORLD_SIZE": str(processes)}


@pytest.mark.parametrize(("environment", "name"), [
    ({}, r"default-\d{8}-\d{6}"),  # a process of its own: the time
    ({"LOCAL_RANK": "1", cli.RUN_ENV: "parent"}, "parent"),  # a rank Lightning's DDP started: its parent's
    (torchrun(rank=1, processes=2), "default-job7"),  # torchrun on two machines: the rendezvous id
    (torchrun(rank=0, processes=1), r"default-\d{8}-\d{6}"),  # torchrun, one process: nothing to agree on
    ({"SLURM_NTASKS": "8", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train"}, "default-4242"),  # srun
])
def test_every_process_of_one_training_names_its_run_alike(monkeypatch: pytest.MonkeyPatch,
                                                           environment: dict[str, str], name: str) -> None:
    for variable in LAUNCHERS:
        monkeypatch.delenv(variable, raising=False)
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    assert re.fullmatch(name, cli.default_run_name("configs/default.yaml"))


def test_torchrun_without_a_shared_id_asks_for_a_run_name(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable, value in torchrun(rank=0, processes=2, run_id="none").items():  # no --rdzv_id
        monkeypatch.setenv(variable, value)
    with pytest.raises(errors.ConfigError, match="2 processes started by torchrun .* --run <name>"):
        cli.default_run_name("configs/default.yaml")
