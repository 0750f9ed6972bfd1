"""`MalariaCLI`: LightningCLI plus what every run gets, whatever its recipe.

Entry points build their runs with it (`malaria.commands.train`, `malaria.commands.features`, `malaria.commands.lr_find`,
`malaria.commands.bench`, `malaria.commands.cv`). On top of LightningCLI it adds the run directory (`runs/<name>/`),
the loggers, environment.json and summary.json, and the infrastructure (`Infrastructure`):
atomic checkpoints, `best.ckpt` and `last.ckpt`, exact resume, the NaN guard, the learning-rate
monitor and the run report. A recipe then holds only the experiment: model, data, schedule, and
the callbacks that are part of it (fine-tuning, EMA, early stopping).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
    RichProgressBar,
)
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.trainer import Trainer
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from malaria.common import errors, quiet  # noqa: F401 (quiet: silences Lightning's noise on import)
from malaria.run import run_dirs
from malaria.run.checkpointing import AtomicCheckpointIO, ExactResume, LastCheckpoint, RefuseNonFiniteCheckpoints
from malaria.data.datamodule import MalariaDataModule
from malaria.common.flags import NonNegativeInt
from malaria.common.hardware import default_precision
from malaria.model.networks import default_image_size
from malaria.model.classifier import MalariaClassifier
from malaria.evaluation.run_report import RunReport
from malaria.run.preemption import SaveOnPreemption, preempted
from malaria.run.loggers import MODES, WandbSaveConfig, finish_wandb, make_loggers

# Lightning's DDP starts the other ranks by running the same command again; they read the run name here.
RUN_ENV = "MALARIA_RUN"


class RecordEnvironment(L.Callback):
    """Writes environment.json (package versions, git commit, machine) into the run directory.

    At fit start, i.e. once the data has passed its checks: a run that fails on bad input,
    resumed or not, leaves its directory as it was."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        run_dirs.write_json(self.run_dir / "environment.json", run_dirs.environment())


@dataclass
class Infrastructure:
    """The callbacks and checkpoint plugin every run gets, so no recipe repeats them.

    Each can be switched off (`infrastructure: {report: false}` in a recipe, or
    `--infrastructure.report false`); a recipe that lists its own callback of one of these classes
    in `trainer.callbacks` (as run configs saved before these defaults do) keeps its own instead."""

    atomic_checkpoints: bool = True  # AtomicCheckpointIO: a crash never leaves half a checkpoint
    best_checkpoint: bool = True  # checkpoints/best.ckpt, the epoch of the best val/acc
    last_checkpoint_every_n_train_steps: NonNegativeInt = 100  # checkpoints/last.ckpt for RESUME=; 0: none
    exact_resume: bool = True  # ExactResume: RNG states and loader position
    refuse_non_finite: bool = True  # RefuseNonFiniteCheckpoints: never save NaN weights
    save_on_preemption: bool = True  # SaveOnPreemption: last.ckpt on SIGTERM or Ctrl-C
    lr_monitor: bool = True  # the learning rate per epoch in metrics.csv
    report: bool = True  # RunReport: figures and report.md in the run directory

    def callbacks(self, recipe: list[Callback]) -> list[Callback]:
        """The switched-on callbacks the recipe does not bring itself, in the order they must run
        (`LastCheckpoint` after the best checkpoint, so last.ckpt holds its updated state)."""
        wanted: list[Callback] = []
        if self.best_checkpoint:
            # No version counter: a resumed run updates best.ckpt, not best-v1.ckpt.
            wanted.append(ModelCheckpoint(monitor="val/acc", mode="max", filename="best",
                                          auto_insert_metric_name=False, enable_version_counter=False))
        if self.last_checkpoint_every_n_train_steps:
            wanted.append(LastCheckpoint(every_n_train_steps=self.last_checkpoint_every_n_train_steps))
        if self.exact_resume:
            wanted.append(ExactResume())
        if self.refuse_non_finite:
            wanted.append(RefuseNonFiniteCheckpoints())
        if self.lr_monitor:
            wanted.append(LearningRateMonitor(logging_interval="epoch"))
        if self.report:
            wanted.append(RunReport())
        present = {type(c) for c in recipe}
        return [c for c in wanted if type(c) not in present]

    def plugins(self, recipe: list) -> list:
        if self.atomic_checkpoints and not any(isinstance(p, CheckpointIO) for p in recipe):
            return [AtomicCheckpointIO()]
        return []


def full_fit_callbacks(callbacks: list[Callback]) -> list[Callback]:
    """With no holdout there is nothing to monitor: no early stopping, and a monitored checkpoint
    becomes one of the latest epoch under the same name."""
    kept = []
    for callback in callbacks:
        if isinstance(callback, EarlyStopping):
            continue
        if isinstance(callback, ModelCheckpoint) and callback.monitor is not None:
            callback = ModelCheckpoint(dirpath=callback.dirpath, filename=callback.filename,
                                       enable_version_counter=False)
        kept.append(callback)
    return kept


class MalariaCLI(LightningCLI):
    """LightningCLI with the run directory, loggers and `Infrastructure` of every run.

    A recipe that only one entry point can run names it (`entry_point: features`); any other
    entry point refuses it rather than silently train something else."""

    ENTRY_POINT = "train"

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run", type=str | None, default=None,
                            help="Run name; runs/<run>/ holds everything (default: <recipe>-<time>).")
        parser.add_argument("--runs_dir", type=str, default=str(run_dirs.RUNS_DIR))
        parser.add_argument("--wandb.mode", type=Literal[MODES], default="auto", help="auto: online with a key.")
        parser.add_argument("--wandb.project", type=str, default="malaria")
        parser.add_argument("--wandb.group", type=str | None, default=None,
                            help="W&B group of the run (a sweep groups its trials under the study's name).")
        parser.add_argument("--entry_point", type=str | None, default=None,
                            help="The only entry point this recipe runs under (train, features); null: any.")
        parser.add_dataclass_arguments(Infrastructure, "infrastructure")
        # One augmentation config: the datamodule runs its per-image part, the model its batch part.
        parser.link_arguments("data.augment", "model.augment")

    def parse_arguments(self, parser, args) -> None:
        """Lightning seeds before any other hook runs, and numpy refuses seeds outside 32 bits."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")  # self.subcommand is set after this hook
        seed = (self.config[subcommand] if subcommand else self.config).get("seed_everything")
        if not isinstance(seed, bool) and isinstance(seed, int) and not 0 <= seed < 2**32:
            parser.error(f"--seed_everything {seed}: a seed lies in [0, 2**32) (numpy's range).")

    @property
    def run_config(self):
        """This subcommand's settings (the whole config when built with run=False)."""
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        config = self.run_config
        epochs = config.trainer.max_epochs
        if epochs is not None and epochs < 1 and epochs != -1:  # -1: Lightning's "until max_steps"
            raise errors.ConfigError(f"--trainer.max_epochs {epochs}: a run trains at least one epoch.")
        if (accumulate := config.trainer.accumulate_grad_batches) < 1:
            raise errors.ConfigError(f"--trainer.accumulate_grad_batches {accumulate}: a step takes at least "
                                     "one batch.")
        if config.entry_point not in (None, self.ENTRY_POINT):
            recipe = ", ".join(str(c) for c in config.get("config") or []) or "This recipe"
            raise errors.ConfigError(f"{recipe} runs under `python -m malaria.commands.{config.entry_point}` "
                                     f"(make {config.entry_point}), not malaria.commands.{self.ENTRY_POINT}.")
        if not config.run:
            config_files = config.get("config") or []
            config.run = default_run_name(str(config_files[0]) if config_files else None)
        os.environ[RUN_ENV] = config.run
        if config.data.image_size is None:  # the backbone's pretrained input size
            config.data.image_size = default_image_size(config.model.model)
        run_dir = Path(config.runs_dir) / config.run
        resuming = self.subcommand == "fit" and config.get("ckpt_path")
        # Global rank 0 writes the run's folder: the other ranks' view of it (another node's disk, or
        # rank 0's first files) says nothing about this run.
        owner = rank_zero_only.rank == 0
        if self.subcommand == "fit" and not resuming and owner and (run_dir / "checkpoints").exists():
            raise errors.ExistsError(f"{run_dir} already holds checkpoints. Resume it with "
                                     f"`make train RESUME={run_dir}` or pick another run name.")
        config.trainer.default_root_dir = str(run_dir)
        config.trainer.precision = config.trainer.precision or default_precision()
        self.full_fit = config.data.val_fraction == 0
        if self.full_fit:
            config.trainer.limit_val_batches = 0
        self.run_dir = run_dir

    def instantiate_trainer(self, **kwargs) -> Trainer:
        config = self.run_config
        wandb = config.wandb
        loggers = make_loggers(self.run_dir, config.run, wandb.mode, wandb.project, wandb.group)
        init = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer = init.get("trainer") or {}
        infrastructure: Infrastructure = init["infrastructure"]
        recipe_callbacks = _as_list(trainer.get("callbacks"))
        callbacks = [*recipe_callbacks, *infrastructure.callbacks(recipe_callbacks), RecordEnvironment(self.run_dir)]
        if infrastructure.save_on_preemption:  # here, not in callbacks(): it needs the run's folder now
            callbacks.append(SaveOnPreemption(self.run_dir / "checkpoints"))
        plugins = _as_list(trainer.get("plugins"))
        plugins += infrastructure.plugins(plugins)
        if self.full_fit:
            callbacks = full_fit_callbacks(callbacks)
        # Rich progress unless it is switched off: a recipe naming RichProgressBar could not be run
        # with --trainer.enable_progress_bar false (Lightning refuses the combination).
        if trainer.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(RichProgressBar())
        try:
            return super().instantiate_trainer(logger=loggers, callbacks=callbacks, plugins=plugins or None,
                                               **kwargs)
        except (MisconfigurationException, ValueError) as err:  # flags Lightning or this machine refuse
            raise errors.ConfigError(f"--trainer: {err}") from None

    def before_fit(self) -> None:
        self.fit_started = time.time()

    def after_fit(self) -> None:
        checkpoint = self.trainer.checkpoint_callback
        score = checkpoint.best_model_score if checkpoint else None
        summary = {
            "run": self.run_config.run,
            "config": str(self.run_dir / "config.yaml"),
            "best_checkpoint": checkpoint.best_model_path if checkpoint else None,
            "best_val_acc": float(score) if score is not None else None,
            "epochs": self.trainer.current_epoch,
            "fit_seconds": round(time.time() - self.fit_started, 1),
        }
        if self.trainer.is_global_zero:
            run_dirs.write_json(self.run_dir / "summary.json", summary)
            scored = "full fit, no holdout" if self.full_fit else f"best val/acc {summary['best_val_acc']}"
            print(f"Run {summary['run']}: {scored} -> {summary['best_checkpoint']}")
        finish_wandb(self.trainer.loggers)


def default_run_name(config_file: str | None) -> str:
    """The run's name without `--run`, the same in every process of one training: a rank Lightning
    started (DDP on one machine) takes its parent's; the processes an external launcher started on
    several machines (torchrun, SLURM's srun) take `<recipe>-<job id>`, the one id they share;
    otherwise `<recipe>-<time>`."""
    if os.environ.get("LOCAL_RANK", "0") != "0" and RUN_ENV in os.environ:
        return os.environ[RUN_ENV]
    launched = external_launcher()
    if launched is None:
        return run_dirs.new_run_name(config_file)
    launcher, job = launched
    if job is None:
        processes = os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS")
        raise errors.ConfigError(
            f"This training runs in {processes} processes started by {launcher} with no job id they share "
            "(torchrun's --rdzv_id), so they cannot agree on a run name: give every process the same "
            "--run <name>, or torchrun --rdzv_id <id>.")
    return run_dirs.new_run_name(config_file, stamp=job)


def external_launcher() -> tuple[str, str | None] | None:
    """(launcher, the job id its processes share, if any) when torchrun or SLURM started this training in
    several processes; Lightning's own cluster environments tell which."""
    if TorchElasticEnvironment.detect() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        run_id = os.environ.get("TORCHELASTIC_RUN_ID")
        return "torchrun", run_id if run_id and run_id != "none" else None  # "none": no --rdzv_id
    if SLURMEnvironment.detect() and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        job = SLURMEnvironment.job_id()
        return "SLURM", None if job is None else str(job)
    return None


def _as_list(value: object) -> list:
    """A trainer argument that takes one object or a list of them, as a list."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def build(args: list[str] | None = None, run: bool = True, cli: type[MalariaCLI] = MalariaCLI,
          model: type[MalariaClassifier] = MalariaClassifier, callbacks: list[Callback] | None = None) -> MalariaCLI:
    """Train from a recipe; with `run=False`, only build the model, data and trainer from it.
    The one place a CLI is built: every verb that trains gets the same config saving.

    `callbacks` join the run's trainer without entering its config (a sweep's pruning callback
    holds a live Optuna trial, which no config.yaml could rebuild). Raises errors.Preempted when
    SIGTERM or SIGINT stopped the training (after saving last.ckpt)."""
    try:
        return cli(
            model,
            MalariaDataModule,
            save_config_callback=WandbSaveConfig,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"callbacks": callbacks} if callbacks else None,
            args=args,
            run=run,
        )
    except SIGTERMException:  # a SystemExit with no status: it would end the process with 0
        raise preempted() from None
