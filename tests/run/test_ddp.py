"""Lightning's own DDP, 2 CPU processes, through the real CLI on demo data.

`strategy=ddp` starts the other rank by running the same command line again, so each run here is a
`python -m malaria.commands.train` subprocess (inside pytest the command line would be pytest's). The
`Recorder` callback below, loaded by its class path, writes what each rank saw to a JSON file.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import yaml
import torch
from conftest import TINY
from runner import run_module

from malaria.data.datamodule import MalariaDataModule
from malaria.model.classifier import MalariaClassifier
from malaria.prediction.submission import validate_submission
from malaria.prediction.ddp_writer import PredictionWriter

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 32
TWO_EPOCHS = [*TINY, "--trainer.max_epochs", "2", "--data.image_size", str(IMAGE_SIZE)]
DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]


class Recorder(L.Callback):
    """Per rank: the rows of every training and validation batch, the validation probabilities as
    the model computed them, and the final weights, written to `<out_dir>/rank<N>.json`."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.epochs: dict[int, dict[str, list]] = {}
        self.start: torch.Tensor | None = None

    def _epoch(self, trainer: L.Trainer) -> dict[str, list]:
        return self.epochs.setdefault(trainer.current_epoch, {"train": [], "val": [], "probs": [], "labels": []})

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = torch.cat([p.detach().flatten() for p in pl_module.net.parameters()]).clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._epoch(trainer)["train"] += batch[2].tolist()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking:
            return
        images, labels, rows = batch  # as validation_step got it: transferred and normalised
        with torch.no_grad():
            probs = torch.sigmoid(pl_module(images))
        epoch = self._epoch(trainer)
        epoch["val"] += rows.tolist()
        epoch["probs"] += probs.tolist()
        epoch["labels"] += labels.tolist()

    def on_fit_end(self, trainer, pl_module) -> None:
        weights = torch.cat([p.detach().flatten() for p in pl_module.net.parameters()])
        self.out_dir.mkdir(parents=True, exist_ok=True)
        classifier = sum(p.numel() for p in pl_module.net.get_classifier().parameters())
        record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "epochs": self.epochs,
                  "weights": weights.tolist(), "trained": int((weights != self.start).sum()), "classifier": classifier}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def cli(*args: str) -> None:
    """`python -m malaria.commands.train ARGS` from the repository root, with this folder importable."""
    done = run_module("malaria.commands.train", *args, cwd=ROOT, pythonpath=Path(__file__).parent)
    assert done.returncode == 0, f"{args}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"


def fit_ddp(data_dir: Path, runs_dir: Path, run: str, *extra: str) -> tuple[Path, list[dict]]:
    """Fit with 2 processes; the run directory and each rank's record, in rank order."""
    record_dir = runs_dir / f"{run}-record"
    cli("fit", *TWO_EPOCHS, *DDP, "--data.data_dir", str(data_dir), "--runs_dir", str(runs_dir), "--run", run,
        "--trainer.callbacks+=test_ddp.Recorder", "--trainer.callbacks.out_dir", str(record_dir), *extra)
    return runs_dir / run, [json.loads((record_dir / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def ddp_run(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    return fit_ddp(demo_dir, tmp_path_factory.mktemp("ddp"), "ddp")


@pytest.fixture(scope="module")
def split(demo_dir: Path) -> MalariaDataModule:
    """The training and validation rows of the demo data, as the recipe splits them."""
    recipe = yaml.safe_load(Path("configs/default.yaml").read_text())["data"]
    datamodule = MalariaDataModule(data_dir=str(demo_dir), image_size=IMAGE_SIZE, split=recipe["split"])
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def test_two_ranks_ran_in_step(ddp_run: tuple[Path, list[dict]]) -> None:
    _, records = ddp_run
    assert [r["rank"] for r in records] == [0, 1] and {r["world_size"] for r in records} == {2}
    assert records[0]["weights"] == records[1]["weights"]  # DDP keeps the replicas identical


def test_each_rank_trains_on_a_disjoint_shard(ddp_run: tuple[Path, list[dict]], split: MalariaDataModule) -> None:
    _, records = ddp_run
    train_rows = set(split.train_rows.tolist())
    for epoch in ("0", "1"):
        shards = [r["epochs"][epoch]["train"] for r in records]
        assert all(len(s) == len(set(s)) for s in shards)
        assert not set(shards[0]) & set(shards[1])
        seen = set(shards[0]) | set(shards[1])
        assert seen <= train_rows
        # Only the remainder of the per-rank batching is dropped.
        assert len(train_rows) - len(seen) < 2 * 16 + 2
    first, second = (set(records[0]["epochs"][e]["train"]) for e in ("0", "1"))
    assert first != second  # reshuffled each epoch


def test_validation_metrics_are_reduced_over_every_image(ddp_run: tuple[Path, list[dict]],
                                                          split: MalariaDataModule) -> None:
    run_dir, records = ddp_run
    metrics = pd.read_csv(run_dir / "metrics.csv")
    logged = metrics.dropna(subset=["val/acc"]).set_index("epoch")["val/acc"]
    for epoch in ("0", "1"):
        shards = [r["epochs"][epoch] for r in records]
        rows = shards[0]["val"] + shards[1]["val"]
        # Each validation image exactly once across the ranks: no padding repeats.
        assert sorted(rows) == sorted(split.val_rows.tolist())
        assert min(len(s["val"]) for s in shards) >= len(rows) // 2
        probs = np.array(shards[0]["probs"] + shards[1]["probs"])
        labels = np.array(shards[0]["labels"] + shards[1]["labels"])
        full_set_accuracy = ((probs > 0.5) == labels).mean()
        assert logged[int(epoch)] == pytest.approx(full_set_accuracy, abs=1e-6)


def test_ddp_prediction_writes_one_complete_ordered_submission(ddp_run: tuple[Path, list[dict]], demo_dir: Path,
                                                               tmp_path: Path) -> None:
    run_dir, _ = ddp_run
    checkpoint = run_dir / "checkpoints" / "best.ckpt"
    # One process predicting every image in order is the reference.
    model = MalariaClassifier.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=False)
    datamodule = MalariaDataModule.load_from_checkpoint(checkpoint, weights_only=False)
    reference = PredictionWriter()
    L.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[reference],
              enable_progress_bar=False).predict(model, datamodule=datamodule, return_predictions=False)
    sample = pd.read_csv(demo_dir / "sample_submission.csv")["img_name"].tolist()
    assert reference.rows.tolist() == list(range(len(sample)))
    # A threshold in the widest gap near the median splits the labels about evenly, so the
    # comparison below checks the order of the rows, not just a column of zeros.
    ranked = np.sort(reference.probs)
    middle = slice(len(ranked) // 4, 3 * len(ranked) // 4)
    gap = int(np.argmax(np.diff(ranked[middle]))) + middle.start
    threshold = float((ranked[gap] + ranked[gap + 1]) / 2)

    out = tmp_path / "ddp.csv"
    cli("predict", "--config", str(run_dir / "config.yaml"), "--ckpt_path", str(checkpoint),
        "--runs_dir", str(tmp_path / "runs"), "--run", "predict", "--trainer.callbacks+=malaria.prediction.ddp_writer.PredictionWriter",
        "--trainer.callbacks.out", str(out), "--trainer.callbacks.threshold", str(threshold))
    submission = validate_submission(out, sample)
    assert submission["img_name"].tolist() == sample
    assert submission["label"].tolist() == (reference.probs >= threshold).astype(int).tolist()
    assert 0 < submission["label"].sum() < len(sample)


def test_fine_tuning_keeps_the_replicas_identical_after_unfreezing(demo_dir: Path, tmp_path: Path) -> None:
    """Lightning issue 20340: parameters frozen when DDP wraps the model are left out of its
    gradient all-reduce, so once a fine-tuning callback unfreezes them each rank trains its own copy."""
    _, records = fit_ddp(demo_dir, tmp_path, "finetune",
                         "--trainer.callbacks+=malaria.model.finetune.FineTune", "--trainer.callbacks.unfreeze", "{1: all}")
    assert records[0]["trained"] > records[0]["classifier"]  # the backbone was unfrozen and trained
    before = np.array(records[0]["weights"])
    assert records[0]["weights"] == records[1]["weights"], (
        f"ranks diverged after unfreezing: max difference {np.abs(before - np.array(records[1]['weights'])).max():.3g}")
