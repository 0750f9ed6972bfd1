"""Training entry point: `python -m malaria.train fit --config configs/default.yaml`.

LightningCLI builds the model, data and trainer from the YAML recipe; this subclass adds the
run directory (`runs/<name>/`), the loggers, and a summary written at the end of training.
Resume an interrupted run with `--config runs/<name>/config.yaml --ckpt_path last`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.trainer import Trainer

from malaria import runs
from malaria.datamodule import MalariaDataModule
from malaria.module import MalariaClassifier
from malaria.tracking import MODES, make_loggers


def default_precision() -> str:
    """Mixed precision on a GPU (bf16 where the GPU has it), full precision on a CPU."""
    if not torch.cuda.is_available():
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


class MalariaCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run", type=str | None, default=None,
                            help="Run name; runs/<run>/ holds everything (default: <recipe>-<time>).")
        parser.add_argument("--runs_dir", type=str, default=str(runs.RUNS_DIR))
        parser.add_argument("--wandb.mode", type=str, default="auto", help=f"One of {MODES}.")
        parser.add_argument("--wandb.project", type=str, default="malaria")

    @property
    def run_config(self):
        """This subcommand's settings (the whole config when built with run=False)."""
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        config = self.run_config
        if not config.run:
            config_files = config.get("config") or []
            config.run = runs.new_run_name(str(config_files[0]) if config_files else None)
        run_dir = Path(config.runs_dir) / config.run
        resuming = self.subcommand == "fit" and config.get("ckpt_path")
        if self.subcommand == "fit" and not resuming and (run_dir / "checkpoints").exists():
            raise SystemExit(f"{run_dir} already holds checkpoints. Resume it with `make train RESUME={run_dir}` "
                             "or pick another run name.")
        config.trainer.default_root_dir = str(run_dir)
        config.trainer.precision = config.trainer.precision or default_precision()
        self.run_dir = run_dir

    def instantiate_trainer(self, **kwargs) -> Trainer:
        config = self.run_config
        loggers = make_loggers(self.run_dir, config.run, config.wandb.mode, config.wandb.project)
        return super().instantiate_trainer(logger=loggers, **kwargs)

    def before_fit(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        runs.write_json(self.run_dir / "environment.json", runs.environment())
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
            runs.write_json(self.run_dir / "summary.json", summary)
            print(f"Run {summary['run']}: best val/acc {summary['best_val_acc']} -> {summary['best_checkpoint']}")


def main(args: list[str] | None = None, run: bool = True) -> MalariaCLI:
    """Train from a recipe; with `run=False`, only build the model, data and trainer from it."""
    return MalariaCLI(
        MalariaClassifier,
        MalariaDataModule,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
