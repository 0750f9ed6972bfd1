"""Rebuild a finished run's report (`runs/<name>/report.md`, its figures, Grad-CAM maps):

    python -m malaria.commands.report                      # the latest run in runs/
    python -m malaria.commands.report --run runs/<name>    # add --wandb offline|online to log it to W&B too

From the run's best checkpoint on its validation split, as `RunReport` builds it at the end of
training (malaria.evaluation.run_report).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from malaria.common import errors
from malaria.run import run_dirs
from malaria.run import loggers
from malaria.prediction.predictor import load
from malaria.evaluation.run_report import Report, build_report, log_to_wandb, predict_validation


def _wandb_project(run_dir: Path) -> str:
    """The project the run trained in, from its saved CLI config."""
    config = run_dir / "config.yaml"
    saved = yaml.safe_load(config.read_text()) if config.exists() else None
    return ((saved or {}).get("wandb") or {}).get("project") or "malaria"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=None, help="run directory (default: the latest in runs/)")
    parser.add_argument("--data.data_dir", dest="data_dir", default=None, help="competition folder (default: the run's own)")
    parser.add_argument("--wandb", default="disabled", choices=loggers.MODES,
                        help="also log the report to the run's W&B run (default: disabled)")
    return parser


def main(argv: Sequence[str] | None = None) -> Report:
    args = _parser().parse_args(argv)
    run_dir = args.run or run_dirs.latest_run()
    checkpoint = run_dirs.checkpoint(run_dir)
    model, datamodule = load(checkpoint, args.data_dir)
    predictions = predict_validation(model, datamodule)
    model.to("cuda" if torch.cuda.is_available() else "cpu")  # for Grad-CAM
    report = build_report(run_dir, model, predictions, checkpoint)
    wandb_logger = loggers.make_wandb_logger(run_dir, run_dir.name, args.wandb, _wandb_project(run_dir))
    if wandb_logger is not None:
        log_to_wandb(wandb_logger, report, predictions)
        loggers.finish_wandb([wandb_logger])
    print(f"Wrote {report.markdown} ({len(report.figures)} figures, validation accuracy "
          f"{report.metrics['acc']:.4f})")
    return report


if __name__ == "__main__":
    errors.run(main)
