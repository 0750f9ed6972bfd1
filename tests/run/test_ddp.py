"""DDP on 2 CPU processes through the real CLI on demo data: started by Lightning on one machine, and
by torchrun as on two machines (two torchrun commands, one process each, meeting at a c10d rendezvous
on loopback, gloo).

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
from runner import free_port, run_commands, run_module

from malaria.data.datamodule import MalariaDataModule
from malaria.model.classifier import MalariaClassifier
from malaria.model.metrics import classes
from malaria.prediction.predictor import slide_prior
from malaria.prediction.slide_prior import DEFAULT_STRENGTH
from malaria.prediction.submission import validate_submission
from malaria.prediction.ddp_writer import PredictionWriter
from malaria.run.prior_accuracy import METRIC as PRIOR_METRIC

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 32
TWO_EPOCHS = [*TINY, "--trainer.max_epochs", "2", "--data.image_size", str(IMAGE_SIZE)]
DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
# One process on each of two "nodes", as two machines would run it.
NODES = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "2",
         "--trainer.strategy", "ddp"]


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


def recorded(data_dir: Path, runs_dir: Path, record_dir: Path, *extra: str) -> list[str]:
    """The fit arguments of a 2-process run whose ranks the `Recorder` follows."""
    return ["fit", *TWO_EPOCHS, "--data.data_dir", str(data_dir), "--runs_dir", str(runs_dir),
            "--trainer.callbacks+=test_ddp.Recorder", "--trainer.callbacks.out_dir", str(record_dir), *extra]


def records(record_dir: Path) -> list[dict]:
    return [json.loads((record_dir / f"rank{r}.json").read_text()) for r in range(2)]


def fit_ddp(data_dir: Path, runs_dir: Path, run: str, *extra: str) -> tuple[Path, list[dict]]:
    """Fit with 2 processes; the run directory and each rank's record, in rank order."""
    record_dir = runs_dir / f"{run}-record"
    cli(*recorded(data_dir, runs_dir, record_dir, *DDP, "--run", run, *extra))
    return runs_dir / run, records(record_dir)


def fit_torchrun(data_dir: Path, runs_dir: Path) -> tuple[Path, list[dict]]:
    """Fit on two "nodes" of one process each: two torchrun commands, as two machines would run them, with
    no --run (the nodes name the run after the rendezvous id) and val/acc_prior logged."""
    record_dir = runs_dir.parent / f"{runs_dir.name}-record"
    rendezvous = ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--rdzv_id", "j7"]
    node = ["--nnodes", "2", "--nproc_per_node", "1", *rendezvous, "-m", "malaria.commands.train",
            *recorded(data_dir, runs_dir, record_dir, *NODES,
                      "--trainer.callbacks+=malaria.run.prior_accuracy.PriorAccuracy")]
    logs = runs_dir.parent / f"{runs_dir.name}-logs"
    nodes = run_commands([("torch.distributed.run", node, ROOT)] * 2, logs, parallel=2,
                         pythonpath=(Path(__file__).parent, ROOT / "tests"))
    assert [n.returncode for n in nodes] == [0, 0], nodes[0].stderr[-4000:] + nodes[1].stderr[-4000:]
    return runs_dir / "default-j7", records(record_dir)


@pytest.fixture(scope="module")
def ddp_run(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    return fit_ddp(demo_dir, tmp_path_factory.mktemp("ddp"), "ddp")


@pytest.fixture(scope="module")
def torchrun_run(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    return fit_torchrun(demo_dir, tmp_path_factory.mktemp("torchrun") / "runs")


@pytest.fixture(params=["ddp_run", "torchrun_run"], ids=["lightning", "torchrun"])
def launched(request: pytest.FixtureRequest) -> tuple[Path, list[dict]]:
    """The same checks for a run Lightning started and for one torchrun started on two nodes."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def split(demo_dir: Path) -> MalariaDataModule:
    """The training and validation rows of the demo data, as the recipe splits them."""
    recipe = yaml.safe_load(Path("configs/default.yaml").read_text())["data"]
    datamodule = MalariaDataModule(data_dir=str(demo_dir), image_size=IMAGE_SIZE, split=recipe["split"])
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def test_two_ranks_ran_in_step(launched: tuple[Path, list[dict]]) -> None:
    _, records = launched
    assert [r["rank"] for r in records] == [0, 1] and {r["world_size"] for r in records} == {2}
    assert records[0]["weights"] == records[1]["weights"]  # DDP keeps the replicas identical


def test_each_rank_trains_on_a_disjoint_shard(launched: tuple[Path, list[dict]],
                                              split: MalariaDataModule) -> None:
    _, records = launched
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


def test_validation_metrics_are_reduced_over_every_image(launched: tuple[Path, list[dict]],
                                                          split: MalariaDataModule) -> None:
    run_dir, records = launched
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


def test_torchrun_nodes_write_one_run_named_after_the_rendezvous(
        torchrun_run: tuple[Path, list[dict]]) -> None:
    run_dir, _ = torchrun_run
    assert [p.name for p in run_dir.parent.iterdir()] == ["default-j7"]  # one folder, named alike on both
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert (run_dir / "report.md").exists() and (run_dir / "summary.json").exists()


def test_the_slide_prior_accuracy_counts_every_holdout_cell_once_across_nodes(
        torchrun_run: tuple[Path, list[dict]], split: MalariaDataModule) -> None:
    run_dir, records = torchrun_run
    metrics = pd.read_csv(run_dir / "metrics.csv")
    logged = metrics.dropna(subset=[PRIOR_METRIC]).set_index("epoch")[PRIOR_METRIC]
    prior = slide_prior(split, "val", DEFAULT_STRENGTH)
    for epoch in ("0", "1"):
        shards = [r["epochs"][epoch] for r in records]
        rows = shards[0]["val"] + shards[1]["val"]
        probs = np.array(shards[0]["probs"] + shards[1]["probs"])
        probs = prior.adjust([split.train_table.ids[r] for r in rows], probs)
        labels = np.array(shards[0]["labels"] + shards[1]["labels"])
        assert logged[int(epoch)] == pytest.approx((classes(probs) == labels).mean(), abs=1e-6)


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
