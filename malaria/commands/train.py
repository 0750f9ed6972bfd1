"""Training entry point: `python -m malaria.commands.train fit --config configs/default.yaml`.

`malaria.run.cli.MalariaCLI` builds the model, data and trainer from the YAML recipe, in its own run
directory (`runs/<name>/`) with the checkpoints, loggers, report and summary every run gets.
Resume an interrupted run with
`--config runs/<name>/config.yaml --ckpt_path runs/<name>/checkpoints/last.ckpt` (`make train RESUME=runs/<name>`).

`--data.val_fraction 0` is a full fit, the last step before a submission: every training image
trains, for the recipe's epochs, and the final weights are the run's `best.ckpt`.
"""

from __future__ import annotations

from malaria.common import errors
from malaria.run.cli import MalariaCLI, build


def main(args: list[str] | None = None, run: bool = True) -> MalariaCLI:
    """Train from a recipe; with `run=False`, only build the model, data and trainer from it."""
    return build(args, run)


if __name__ == "__main__":
    errors.run(main)
