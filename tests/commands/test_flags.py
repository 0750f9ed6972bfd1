"""Every verb checks its flags where it parses them: a bad one ends the verb with one `error:`
paragraph naming the flag and its value, a non-zero exit status, no traceback and no run folder.

Each row runs through `make`: `make -n` expands the verb's recipe and its variables, and the command
it prints runs as a child process of the shared runner (tests/runner.py), in an empty folder."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest
from runner import REPO, Result, run_commands

CONFIG = str(REPO / "configs" / "default.yaml")
FEATURES = str(REPO / "configs" / "resnet18_features.yaml")
GPU = str(REPO / "configs" / "gpu.yaml")
STAGED = str(REPO / "configs" / "lite0_staged.yaml")

# (make verb and variables, what the error names)
BAD_FLAGS: list[tuple[list[str], list[str]]] = [
    (["train", "EPOCHS=0"], ["--trainer.max_epochs 0"]),
    (["train", "EPOCHS=-3"], ["--trainer.max_epochs -3"]),
    (["train", "DATA_DIR=nope"], ["nope does not exist"]),  # a typo, never a reason for demo data
    (["train", "ARGS=--model.lr -1"], ["model.lr", "-1"]),
    (["train", "ARGS=--model.lr 0"], ["model.lr", "0"]),
    (["train", "ARGS=--model.weight_decay -0.1"], ["model.weight_decay", "-0.1"]),
    (["train", "ARGS=--model.warmup_epochs -1"], ["model.warmup_epochs", "-1"]),
    (["train", "ARGS=--model.label_smoothing 1"], ["model.label_smoothing", "1"]),
    (["train", "ARGS=--data.val_fraction 1.5"], ["data.val_fraction", "1.5"]),
    (["train", "ARGS=--data.val_fraction 1"], ["data.val_fraction", "1"]),
    (["train", "ARGS=--data.batch_size 0"], ["data.batch_size", "0"]),
    (["train", "ARGS=--data.image_size 0"], ["data.image_size", "0"]),
    (["train", "ARGS=--data.num_workers -1"], ["data.num_workers", "-1"]),
    (["train", "ARGS=--data.train_cells 0"], ["data.train_cells", "0"]),
    (["train", "ARGS=--data.fold 5"], ["data.fold 5", "data.val_fraction 0.2"]),
    (["train", "ARGS=--data.split patient"], ["data.split", "patient"]),
    (["train", "ARGS=--data.augment.hflip 2"], ["data.augment", "hflip", "2"]),
    (["train", "ARGS=--data.augment.zoom 1"], ["data.augment", "zoom", "1"]),
    (["train", "ARGS=--data.augment.rotate 400"], ["data.augment", "rotate", "400"]),
    (["train", "ARGS=--data.augment.stain_p 2"], ["data.augment", "stain_p", "2"]),
    (["train", "ARGS=--data.augment.stain_scale 1"], ["data.augment", "stain_scale", "1"]),
    (["train", "ARGS=--data.augment.randstain_p -0.5"], ["data.augment", "randstain_p", "-0.5"]),
    (["train", "ARGS=--data.augment.stain_p 0.5 --data.augment.on_device false"], ["stain_p", "on_device"]),
    (["train", "ARGS=--data.stain_norm always"], ["data.stain_norm", "always"]),
    (["train", "ARGS=--model.model_kwargs.stem pixels"], ["stem", "pixels"]),
    (["train", "ARGS=--model.optimizer nosuch"], ["--model.optimizer", "nosuch"]),
    (["train", "ARGS=--model.model_kwargs.widths [0]"], ["widths", "[0]"]),
    (["train", "ARGS=--trainer.devices 0"], ["--trainer", "devices"]),
    (["train", "ARGS=--trainer.strategy nosuch"], ["--trainer", "nosuch"]),
    (["train", "ARGS=--trainer.accumulate_grad_batches 0"], ["--trainer.accumulate_grad_batches 0"]),
    (["train", "ARGS=--seed_everything -5"], ["--seed_everything -5"]),
    (["train", "ARGS=--model.mixup.mixup_alpha -1"], ["--model.mixup", "mixup_alpha"]),
    (["train", "ARGS=--model.model_kwargs.drop_rate 1.5"], ["drop_rate 1.5"]),
    (["train", "ARGS=--model.model_kwargs.nosuch 3"], ["model_kwargs", "nosuch"]),
    (["train", "ARGS=--wandb.mode sometimes"], ["wandb.mode", "sometimes"]),
    (["train", "ARGS=--infrastructure.last_checkpoint_every_n_train_steps -1"],
     ["infrastructure.last_checkpoint_every_n_train_steps", "-1"]),
    (["train", f"CONFIG={GPU}", "ARGS=--trainer.callbacks.decay 1.5"], ["WarmupEMA", "decay", "1.5"]),
    (["train", f"CONFIG={STAGED}", "ARGS=--trainer.callbacks.lr_fraction 0"], ["FineTune", "lr_fraction", "0"]),
    (["train", f"CONFIG={STAGED}", "ARGS=--trainer.callbacks.unfreeze {1: 0}"], ["FineTune", "unfreeze"]),
    (["features", f"CONFIG={FEATURES}", "EPOCHS=0"], ["--trainer.max_epochs 0"]),
    (["features", f"CONFIG={FEATURES}", "ARGS=--data.batch_size 0"], ["data.batch_size", "0"]),
    (["lr-find", "ARGS=--model.lr -1"], ["model.lr", "-1"]),
    (["cv", "K=1"], ["--k", "1"]),
    (["cv", "K=two"], ["--k", "two"]),
    (["cv", "K=2", "EPOCHS=0"], ["--trainer.max_epochs 0"]),
    (["cv", "K=2", "ARGS=--data.batch_size 0"], ["data.batch_size", "0"]),
    (["audit", "K=1"], ["--k", "1"]),
    (["predict", "ARGS=--slide_prior -1"], ["--slide_prior", "-1"]),
    (["predict", "ARGS=--checkpoint middle"], ["--checkpoint", "middle"]),
    (["predict", "OUT=taken.csv"], ["--out", "taken.csv"]),
    (["predict", "ARGS=--adapt_bn -16"], ["--adapt_bn", "-16"]),
    (["holdout", "ARGS=--slide_prior -1"], ["--slide_prior", "-1"]),
    (["holdout", "ARGS=--adapt_bn lots"], ["--adapt_bn", "lots"]),
    (["cv", "K=2", "ARGS=--adapt_bn -1"], ["--adapt_bn", "-1"]),
    (["holdout", "ARGS=--slide_prior none"], ["--slide_prior", "none"]),
    (["bench", "BATCHES=0"], ["--batches", "0"]),
    (["bench", "ARGS=--precision half"], ["--precision", "half"]),
    (["bench", "ARGS=--data.augment.stain_p 2"], ["data.augment", "stain_p", "2"]),
    (["sweep", "TRIALS=-1"], ["--trials", "-1"]),
    (["sweep", "BUDGET=0"], ["--budget", "0"]),
    (["sweep", "TRIAL_MINUTES=-5"], ["--trial_minutes", "-5"]),
    (["sweep", "PRUNER=sometimes"], ["--pruner", "sometimes"]),
    (["sweep", "ARGS=--objective leaderboard"], ["--objective", "leaderboard"]),
    (["sweep", "STORAGE=nosuch://x/y"], ["--storage", "nosuch://x/y"]),
    # A server that is not there: refused before any trial, the password never printed.
    (["sweep", "STORAGE=postgresql://u:secret@127.0.0.1:1/db"],
     ["Cannot open the study store", "u:***@127.0.0.1:1"]),
    (["score", "FILE=taken.csv taken.csv", "ARGS=--shared_errors taken.csv"], ["--shared_errors", "taken.csv"]),
    (["score", "FILE=taken.csv", "ARGS=--shared_errors out"], ["--shared_errors", "two or more files"]),
]


def make_commands(verb_and_variables: list[str]) -> list[tuple[str, list[str]]]:
    """The (module, args) of each Python command `make <verb> VAR=...` would run, in order."""
    dry_run = subprocess.run(["make", "-s", "-n", "--no-print-directory", "-C", str(REPO), f"CONFIG={CONFIG}",
                              *verb_and_variables], capture_output=True, text=True, check=True)
    commands = []
    for line in dry_run.stdout.replace("\\\n", " ").split("&&"):
        words = shlex.split(line.replace("\n", " "))
        if "-m" in words and words[words.index("-m") + 1].startswith("malaria."):
            start = words.index("-m")
            commands.append((words[start + 1], words[start + 2:]))
    return commands


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Result, Path]]:
    """Every row's first command, run in a folder of its own, all in one batch of child processes."""
    root = tmp_path_factory.mktemp("flags")
    jobs, folders = [], []
    for i, (make_args, _) in enumerate(BAD_FLAGS):
        folder = root / f"row{i}"
        folder.mkdir()
        (folder / "taken.csv").write_text("img_name,label\n")  # the one file a row may refuse to overwrite
        module, args = make_commands(make_args)[0]
        jobs.append((module, args, folder))
        folders.append(folder)
    outcomes = run_commands(jobs, root / "logs")
    return {" ".join(row[0]): (outcome, folder) for row, outcome, folder in zip(BAD_FLAGS, outcomes, folders)}


@pytest.mark.parametrize(("make_args", "named"), BAD_FLAGS, ids=[" ".join(row[0]) for row in BAD_FLAGS])
def test_a_bad_flag_ends_in_one_error_paragraph_naming_it(
    make_args: list[str], named: list[str], results: dict[str, tuple[Result, Path]]
) -> None:
    result, folder = results[" ".join(make_args)]
    assert result.returncode != 0, result.stdout[-1000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    message = result.stderr[result.stderr.index("error: "):].strip()
    assert "\n\n" not in message, message
    assert all(n in message for n in named), message
    assert sorted(p.name for p in folder.iterdir()) == ["taken.csv"]  # no run folder, nothing written


def test_the_table_covers_every_verb_that_takes_flags() -> None:
    verbs = {row[0][0] for row in BAD_FLAGS}
    assert verbs >= {"train", "features", "lr-find", "cv", "audit", "predict", "holdout", "bench", "sweep", "score"}
    assert len(BAD_FLAGS) >= 20
