"""Throughput of the data pipeline and the model: `make bench`, or

    python -m malaria.commands.bench [--data.data_dir ../shared/realdata/dev] [--config configs/default.yaml]
                            [--batches 8] [--data_batches 40] [--warmup 2] [--compile]
                            [--model.channels_last false ...]

For a recipe's model, image size, batch size and augmentation it measures images per second of:
  decode   zip members to arrays at the model's size (the project does it once, into the cache)
  data     the training batches alone: DataLoader, transfer, the model's on-device batch transforms
  train    training steps through Lightning, data loading included
  predict  inference with the recipe's TTA, data loading included
for the project's pipeline and for a naive one that decodes every PNG from the zip each time it is
used and runs all augmentation image by image on the CPU, with the same model and augmentation.
Each stage times a fixed number of batches after a warm-up, cycling through the data if needed, so a
run takes minutes whatever the data size. Without competition files it runs on the demo data.
The training stage's achieved GFLOP/s (torch.utils.flop_counter's count of a training step times
its images/s) is set against the machine's own peak, measured here by fp32 and bf16 matmuls, so a
recipe shows how close to the hardware it runs. `--profile` then trains the same steps once more
under torch's profiler and says where a step's time goes, part by part (convolutions,
normalisation, activations, pooling, optimizer, augmentation, data, the rest; malaria.run.step_profile),
and at how many GFLOP/s the convolutions themselves run. Options after the bench's own are recipe overrides, as for `malaria.commands.train`. One JSON object per line
goes to stdout; a table and the logs go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import itertools
import json
import os
import resource
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import lightning as L
import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from malaria.data import cache
from malaria.common import errors
from malaria.run import step_profile
from malaria.run.cli import build
from malaria.common.flags import PositiveInt, argument
from malaria.data.archive import ImageTable
from malaria.data.sampling import ResumableSampler
from malaria.data.datamodule import CellDataset, MalariaDataModule, default_workers, whole_batch
from malaria.common.hardware import default_precision, matmul_peak_gflops, training_gflop_per_image
from malaria.prediction.predictor import bare_trainer
from malaria.model.classifier import MalariaClassifier
from malaria.data.augmentation import train_transform

STAGES = ("decode", "data", "train", "predict")
PIPELINES = ("project", "naive")


class ZipDataset(CellDataset):
    """The naive baseline: every image is read from the zip (`cache_path` here) and decoded again each
    time it is used."""

    def __init__(self, table: ImageTable, size: int, rows: np.ndarray, transform: A.Compose | None) -> None:
        super().__init__(table.zip_path, rows, table.labels, transform)
        self.members = table.members
        self.size = size
        self._zip: zipfile.ZipFile | None = None

    def images(self, rows: np.ndarray) -> np.ndarray:
        if self._zip is None:  # one handle per process: an open ZipFile must not cross a fork
            self._zip = zipfile.ZipFile(self.cache_path)
        return np.stack([cache.decode(self._zip.read(self.members[row]), self.size) for row in rows])


@dataclass
class Result:
    """Images processed in the timed part of one stage of one pipeline."""

    stage: str
    pipeline: str
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")

    def record(self) -> dict[str, Any]:
        return {"kind": "stage", "stage": self.stage, "pipeline": self.pipeline, "images": self.images,
                "seconds": round(self.seconds, 4), "images_per_s": round(self.images_per_s, 1)}


class Stopwatch(L.Callback):
    """Times the training or prediction batches that follow the first `warmup` ones."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.batches = self.images = 0
        self.start = self.seconds = 0.0

    def _tick(self, trainer: L.Trainer, batch: Sequence[torch.Tensor]) -> None:
        synchronize(trainer.strategy.root_device)
        self.batches += 1
        if self.batches == self.warmup:
            self.start = time.perf_counter()
        elif self.batches > self.warmup:
            self.images += len(batch[0])
            self.seconds = time.perf_counter() - self.start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._tick(trainer, batch)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._tick(trainer, batch)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer reads when the work is done rather than submitted."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_recipe(config: Path, overrides: Sequence[str]) -> tuple[MalariaClassifier, MalariaDataModule]:
    """The model and datamodule of a training recipe with overrides, built by the training CLI
    itself, so every setting (`image_size: null`, the augment link) resolves as in training."""
    with tempfile.TemporaryDirectory(prefix="malaria-bench-") as runs_dir:
        cli = build(["--config", str(config), "--runs_dir", runs_dir, "--run", "bench", "--wandb.mode", "disabled",
                     *overrides], run=False)
    return cli.model, cli.datamodule


def naive_setup(model: MalariaClassifier, datamodule: MalariaDataModule) -> tuple[MalariaClassifier, A.Compose]:
    """The same model, with every augmentation image by image on the CPU (so none on the device);
    the stain levers, which exist only on the device, are left out of it."""
    naive = copy.deepcopy(model)
    naive.batch_augment = None
    image_by_image = dataclasses.replace(datamodule.augment, on_device=False, stain_p=0.0, randstain_p=0.0)
    transforms = [train_transform(image_by_image)]
    if naive.hparams.batch_dihedral:
        naive.hparams.batch_dihedral = False
        transforms.append(A.SquareSymmetry(p=1.0))  # albumentations' uniform draw of the 8 dihedral views
    return naive, A.Compose(transforms)


def naive_workers(datamodule: MalariaDataModule) -> int:
    """The naive pipeline decodes every image it loads: it gets the workers per-image work gets,
    unless the recipe sets them."""
    workers = datamodule.hparams.num_workers
    return default_workers(per_image_work=True) if workers is None else workers


def loader(dataset: CellDataset, datamodule: MalariaDataModule, workers: int, shuffle: bool) -> DataLoader:
    """A DataLoader with the datamodule's batch size and (for training) its sampler."""
    sampler = ResumableSampler(dataset, seed=datamodule.hparams.seed) if shuffle else None
    return DataLoader(dataset, batch_size=datamodule.hparams.batch_size, sampler=sampler, drop_last=shuffle,
                      num_workers=workers, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
                      collate_fn=whole_batch)


def cycle(batches: Iterable, count: int) -> Iterable:
    """`count` batches, starting the loader again as often as needed."""
    return itertools.islice(itertools.chain.from_iterable(itertools.repeat(batches)), count)


def time_decode(table: ImageTable, size: int, count: int, workers: int) -> tuple[Result, Result]:
    """Project: cache.build over `count` images, all cores. Naive: decoding in its DataLoader workers."""
    subset = ImageTable(table.zip_path, table.ids[:count], table.members[:count], table.labels)
    with tempfile.TemporaryDirectory(prefix="malaria-bench-") as tmp:
        start = time.perf_counter()
        cache.build(subset, size, Path(tmp), "bench")
        project = Result("decode", "project", len(subset), time.perf_counter() - start)
    dataset = ZipDataset(subset, size, np.arange(len(subset)), None)
    batches = DataLoader(dataset, batch_size=64, num_workers=workers, collate_fn=whole_batch)
    start = time.perf_counter()
    images = sum(len(batch[0]) for batch in batches)
    return project, Result("decode", "naive", images, time.perf_counter() - start)


def time_data(batches: Iterable, model: MalariaClassifier, warmup: int, count: int, pipeline: str) -> Result:
    """Training batches as the model receives them: loaded, transferred, transformed on the device."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()  # the model's batch transforms apply to training batches only
    images, start = 0, time.perf_counter()
    for i, batch in enumerate(cycle(batches, warmup + count)):
        batch = [t.to(device, non_blocking=True) for t in batch]
        model.on_after_batch_transfer(batch, 0)
        synchronize(device)
        if i == warmup - 1:
            start = time.perf_counter()
        elif i >= warmup:
            images += len(batch[0])
    return Result("data", pipeline, images, time.perf_counter() - start)


def _trainer(stopwatch: Stopwatch, steps: int, precision: str, **overrides: Any) -> L.Trainer:
    return bare_trainer(max_steps=steps, max_epochs=10_000, limit_val_batches=0, limit_predict_batches=steps,
                        num_sanity_val_steps=0, callbacks=[stopwatch], default_root_dir=tempfile.gettempdir(),
                        precision=precision, **overrides)


def time_train(model: MalariaClassifier, warmup: int, count: int, pipeline: str, precision: str,
               **fit_kwargs: Any) -> Result:
    """Optimisation steps, through the same Lightning loop as `malaria.commands.train`."""
    stopwatch = Stopwatch(warmup)
    _trainer(stopwatch, warmup + count, precision).fit(model, **fit_kwargs)
    return Result("train", pipeline, stopwatch.images, stopwatch.seconds)


def profile_train(model: MalariaClassifier, datamodule: MalariaDataModule, warmup: int, count: int,
                  precision: str) -> step_profile.StepProfile:
    """The project's training steps once more, under the profiler: where a step's time goes."""
    profiler = step_profile.profiler(count, warmup)
    _trainer(Stopwatch(warmup), warmup + count, precision, profiler=profiler).fit(model, datamodule=datamodule)
    return step_profile.parts(profiler.function_events)


def time_predict(model: MalariaClassifier, batches: DataLoader, warmup: int, count: int, pipeline: str,
                 precision: str) -> Result:
    stopwatch = Stopwatch(warmup)
    _trainer(stopwatch, warmup + count, precision).predict(model, dataloaders=batches, return_predictions=False)
    return Result("predict", pipeline, stopwatch.images, stopwatch.seconds)


def run(model: MalariaClassifier, datamodule: MalariaDataModule, batches: int, warmup: int, precision: str,
        compile_net: bool = False, data_batches: int | None = None) -> Iterator[Result]:
    """Every stage for both pipelines, as each finishes; the models start from the same weights."""
    datamodule.prepare_data()
    datamodule.setup("fit")
    table, size = datamodule.train_table, datamodule.hparams.image_size
    model.use_slide_colours(datamodule)  # the data stage runs the on-device augmentation outside a fit
    naive_model, naive_transform = naive_setup(model, datamodule)
    project_trained, naive_trained = copy.deepcopy(model), copy.deepcopy(naive_model)
    if compile_net:  # in place, after copying: a copy would share the original's compiled forward
        for each in (model, naive_model, project_trained, naive_trained):
            each.net.compile()
    # Prediction reads the training images without augmentation: a test set may be too small to time.
    predict_rows = np.resize(np.arange(len(table)), (warmup + batches) * datamodule.hparams.batch_size)

    workers = naive_workers(datamodule)
    yield from time_decode(table, size, min(len(table), batches * datamodule.hparams.batch_size), workers)
    data_batches = data_batches or batches
    yield time_data(datamodule.train_dataloader(), model, warmup, data_batches, "project")
    naive_train = loader(ZipDataset(table, size, datamodule.train_rows, naive_transform), datamodule, workers,
                         shuffle=True)
    yield time_data(naive_train, naive_model, warmup, data_batches, "naive")
    yield time_train(project_trained, warmup, batches, "project", precision, datamodule=datamodule)
    yield time_train(naive_trained, warmup, batches, "naive", precision, train_dataloaders=naive_train)
    cached = loader(CellDataset(datamodule.train_cache, predict_rows, None), datamodule, datamodule.num_workers,
                    shuffle=False)
    yield time_predict(model, cached, warmup, batches, "project", precision)
    zipped = loader(ZipDataset(table, size, predict_rows, None), datamodule, workers, shuffle=False)
    yield time_predict(naive_model, zipped, warmup, batches, "naive", precision)


def ratios(results: Sequence[Result]) -> dict[str, float]:
    """Project images/s over naive images/s for each stage that runs every epoch."""
    speed = {(r.stage, r.pipeline): r.images_per_s for r in results}
    return {stage: round(speed[stage, "project"] / speed[stage, "naive"], 2)
            for stage in STAGES[1:] if (stage, "project") in speed and (stage, "naive") in speed}


def compute(model: MalariaClassifier, image_size: int, batch_size: int, results: Sequence[Result], precision: str,
            profile: step_profile.StepProfile | None = None) -> dict[str, Any]:
    """The project's training GFLOP/s against the machine's measured matmul peaks; with a profile,
    the convolutions' own GFLOP/s too (nearly all of a CNN's FLOPs, in their share of the step)."""
    train = next(r for r in results if (r.stage, r.pipeline) == ("train", "project"))
    gflop = training_gflop_per_image(model.net, image_size)
    peaks = {"fp32": matmul_peak_gflops(torch.float32), "bf16": matmul_peak_gflops(torch.bfloat16)}
    achieved = gflop * train.images_per_s
    in_use = "bf16" if precision.startswith("bf16") else "fp32"  # 16-mixed: fp16, quoted against bf16's peak
    record = {"kind": "compute", "train_gflop_per_image": float(f"{gflop:.4g}"),
              "train_gflops": float(f"{achieved:.4g}"), "peak_gflops_fp32": round(peaks["fp32"], 1),
              "peak_gflops_bf16": round(peaks["bf16"], 1), "peak_in_use": in_use,
              "fraction_of_peak": float(f"{achieved / peaks[in_use]:.3g}")}
    if profile is not None and profile.ms_per_step["convolution"] > 0:
        convolution = gflop * batch_size / (profile.ms_per_step["convolution"] / 1000)
        record |= {"convolution_gflops": float(f"{convolution:.4g}"),
                   "convolution_fraction_of_peak": float(f"{convolution / peaks[in_use]:.3g}")}
    return record


def peak_rss_mib() -> dict[str, float]:
    """Peak resident memory of this process and of its largest finished child (DataLoader workers)."""
    to_mib = 1 / 1024  # Linux reports KiB
    return {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * to_mib, 1),
            "peak_rss_children_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * to_mib, 1)}


def profile_table(profile: step_profile.StepProfile, flops: dict[str, Any]) -> Table:
    out = Table(title=f"Where a training step's time goes ({profile.steps} steps under torch's profiler, "
                      f"{profile.total:,.0f} ms a step)")
    for column in ("part", "ms a step", "share"):
        out.add_column(column, justify="left" if column == "part" else "right")
    for part, ms in profile.ms_per_step.items():
        out.add_row(part, f"{ms:,.1f}", f"{ms / profile.total:.0%}")
    if "convolution_gflops" in flops:
        out.caption = (f"the convolutions run at {flops['convolution_gflops']:,.0f} GFLOP/s = "
                       f"{flops['convolution_fraction_of_peak']:.0%} of the {flops['peak_in_use']} matmul peak")
    return out


def table(setup: dict[str, Any], results: Sequence[Result], ratio: dict[str, float], flops: dict[str, Any],
          memory: dict[str, Any]) -> Table:
    speed = {(r.stage, r.pipeline): r.images_per_s for r in results}
    out = Table(title=f"malaria bench: {setup['model']} at {setup['image_size']} px, batch {setup['batch_size']}, "
                      f"workers {setup['num_workers']} / {setup['naive_num_workers']} (project / naive), "
                      f"{setup['device']}, {setup['precision']}")
    out.add_column("stage")
    for pipeline in PIPELINES:
        out.add_column(f"{pipeline} img/s", justify="right")
    out.add_column("project / naive", justify="right")
    for stage in STAGES:
        cells = [f"{speed[stage, p]:,.0f}" if (stage, p) in speed else "-" for p in PIPELINES]
        out.add_row(stage, *cells, f"{ratio[stage]:.2f}x" if stage in ratio else "once vs every epoch")
    out.caption = (f"training: {flops['train_gflop_per_image']:.2f} GFLOP an image, {flops['train_gflops']:,.0f} "
                   f"GFLOP/s = {flops['fraction_of_peak']:.0%} of this machine's {flops['peak_in_use']} matmul peak "
                   f"({flops['peak_gflops_fp32']:,.0f} fp32, {flops['peak_gflops_bf16']:,.0f} bf16 GFLOP/s)\n"
                   f"peak RSS {memory['peak_rss_mib']:,.0f} MiB (largest child {memory['peak_rss_children_mib']:,.0f} "
                   f"MiB); load average {memory['load_avg_start']} -> {memory['load_avg_end']} "
                   f"on {setup['cpu_count']} CPUs; data: {setup['data_source']}")
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/default.yaml"), help="training recipe")
    parser.add_argument("--batches", type=argument(PositiveInt), default=8, help="timed batches per stage and pipeline")
    parser.add_argument("--data_batches", type=argument(PositiveInt), default=40,
                        help="timed batches of the data stage, which is cheap enough to time longer")
    parser.add_argument("--warmup", type=argument(PositiveInt), default=2, help="untimed batches before each timing")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network (warm-up compiles)")
    parser.add_argument("--profile", action="store_true",
                        help="then profile the project's training steps: where a step's time goes, by part")
    parser.add_argument("--precision", choices=("32-true", "bf16-mixed", "16-mixed"), default=None,
                        help="the Trainer's precision (default: what the hardware has, as in training)")
    return parser


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args, overrides = _parser().parse_known_args(argv)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    out = sys.stdout
    records: list[dict[str, Any]] = []

    def emit(record: dict[str, Any]) -> None:
        records.append(record)
        print(json.dumps(record), file=out, flush=True)

    load_start = os.getloadavg()
    # Progress bars and logs go to stderr, so stdout holds nothing but the JSON lines.
    with contextlib.redirect_stdout(sys.stderr):
        model, datamodule = load_recipe(args.config, overrides)
        setup = {
            "kind": "setup", "config": str(args.config), "data_source": str(datamodule.source_dir),
            "demo": datamodule.source_dir != datamodule.data_dir, "model": model.hparams.model,
            "image_size": datamodule.hparams.image_size, "batch_size": datamodule.hparams.batch_size,
            "num_workers": datamodule.num_workers, "naive_num_workers": naive_workers(datamodule),
            "on_device_augment": datamodule.augment.on_device, "channels_last": model.hparams.channels_last,
            "batch_dihedral": model.hparams.batch_dihedral, "tta": model.hparams.tta, "compile": args.compile,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "precision": args.precision or default_precision(), "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "batches": args.batches,
            "data_batches": args.data_batches, "warmup": args.warmup,
        }
        emit(setup)
        results = []
        for result in run(model, datamodule, args.batches, args.warmup, setup["precision"], args.compile,
                          args.data_batches):
            results.append(result)
            emit(result.record())
        profile = None
        if args.profile:
            profile = profile_train(copy.deepcopy(model), datamodule, args.warmup, args.batches, setup["precision"])
            emit(profile.record())
    ratio = ratios(results)
    for stage, value in ratio.items():
        emit({"kind": "ratio", "stage": stage, "project_over_naive": value})
    flops = compute(model, setup["image_size"], setup["batch_size"], results, setup["precision"], profile)
    emit(flops)
    memory = {"kind": "memory", **peak_rss_mib(), "load_avg_start": [round(x, 2) for x in load_start],
              "load_avg_end": [round(x, 2) for x in os.getloadavg()]}
    emit(memory)
    console = Console(stderr=True)
    console.print(table(setup, results, ratio, flops, memory))
    if profile is not None:
        console.print(profile_table(profile, flops))
    return records


if __name__ == "__main__":
    errors.run(main)
