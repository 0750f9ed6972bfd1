"""Hyperparameter search over a recipe: `python -m malaria.commands.sweep --config configs/default.yaml
--space configs/sweeps/default.yaml --trials 20 [training overrides]` (`make sweep`).

An Optuna study in a real store, SQLite under `runs/sweeps/<study>/study.db` unless `--storage`
names another (any RDB URL such as `postgresql://...`, or a file path: Optuna's JournalStorage).
Rerunning the same command continues the study: finished trials are kept, and a trial whose
process died (its heartbeat stopped, RDB stores only) is marked failed and not counted.
`--trials` is the number of results (complete or pruned trials) the study should hold, so a rerun
runs only the rest. Several workers (processes, machines) pointing at one store share its trials;
each finishes the trial it started, so the study may end up to (workers - 1) trials over.

Each trial is an ordinary run, `runs/<study>-trial<n>/` (checkpoints, metrics, config), trained
in this process on one device, without its report (`make report RUN=` builds one), pruned by epoch
on the holdout `val/acc` (median rule), limited by `--trial_minutes` and what is left of
`--budget`. Its score is its best `val/acc`: the holdout the recipe picks its epoch on, or a
slide-grouped one with `--data.split slide`; never test labels. W&B groups the trials under the
study's name.

When the sweep stops, or with `--trials 0` (report only): the ranked table of trials
(`trials.csv`), the optimisation history and parameter importances (`history.png`,
`importances.png`) and the best trial's complete recipe, `best.yaml`, for
`make train CONFIG=runs/sweeps/<study>/best.yaml`.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any
from unittest import mock

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
from filelock import FileLock  # noqa: E402
from lightning.pytorch import LightningModule, Trainer  # noqa: E402
from optuna.distributions import distribution_to_json  # noqa: E402
from optuna.samplers import BaseSampler, TPESampler  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402
from optuna_integration import PyTorchLightningPruningCallback  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from malaria.common import errors  # noqa: E402
from malaria.run import run_dirs as runs
from malaria.run import search_space
from malaria.common.atomic import replace_file, write_text  # noqa: E402
from malaria.common.flags import NonNegativeInt, PositiveFloat, PositiveInt, argument  # noqa: E402
from malaria.run.cli import build  # noqa: E402
from malaria.run.loggers import finish_wandb  # noqa: E402

# Trials are built from argument lists on purpose, and the heartbeat is chosen knowingly.
warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
warnings.filterwarnings("ignore", message="Argument ``(heartbeat_interval|grace_period)`` is an experimental")

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # the trials that are results
# Set for every trial: one device (parallelism comes from workers, and a DDP launch would rerun
# this whole sweep in each rank), and no report. Training overrides come after, so they win.
TRIAL_DEFAULTS = ["--trainer.devices", "1", "--infrastructure.report", "false"]


class QuietStops(logging.Filter):
    """Optuna logs a failed trial's traceback before it re-raises the error. For a stop (SIGTERM,
    Ctrl-C) or a user error the verb then says what happened in one line, so the traceback is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        kind = record.exc_info[0] if record.exc_info else None
        return not (kind and issubclass(kind, (KeyboardInterrupt, errors.UserError)))


# Optuna's trial loop logs under its module's name; a filter on that logger sees its records.
logging.getLogger("optuna.study._optimize").addFilter(QuietStops())


class NoHoldoutScore(RuntimeError):
    """A trial stopped (by its time limit) before its first validation: it has no score."""


class TrialSeededTPE(BaseSampler):
    """TPE whose random stream is seeded by the study's seed plus the trial's number.

    One seeded `TPESampler` per process would repeat its proposals in a rerun and in every worker
    started together; trial numbers come from the shared store, so each trial gets its own stream,
    and a study run again from scratch proposes the same trials."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.tpe = TPESampler(seed=seed)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.tpe = TPESampler(seed=self.seed + trial.number)
        self.tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict:
        return self.tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict) -> dict:
        return self.tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: optuna.distributions.BaseDistribution) -> Any:
        return self.tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self.tpe.after_trial(study, trial, state, values)


class TrialPruning(PyTorchLightningPruningCallback):
    """Optuna's pruning on `val/acc` after every validation. A pruned trial stops by an exception,
    which skips the CLI's `after_fit`, so its W&B run is closed here instead."""

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        finish_wandb(trainer.loggers)


def make_storage(url: str, heartbeat: int) -> optuna.storages.BaseStorage:
    """An RDB store for a URL (SQLite, PostgreSQL, MySQL...) with a heartbeat, so that a trial whose
    process died is failed; Optuna's journal file for a plain path (no heartbeat there)."""
    if "://" not in url:
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url))
    # SQLite locks the whole file per write: with several local workers, wait for it, don't fail.
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    # Two local workers starting together would both create the tables of a new SQLite file.
    lock = FileLock(url.removeprefix("sqlite:///") + ".lock") if url.startswith("sqlite:///") else nullcontext()
    with lock:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat,
                                          grace_period=3 * heartbeat)


def open_study(name: str, storage: optuna.storages.BaseStorage, seed: int) -> optuna.Study:
    """The study `name`, created by the first worker to come and joined by the others."""
    return optuna.create_study(
        study_name=name, storage=storage, direction="maximize", load_if_exists=True,
        sampler=TrialSeededTPE(seed),
        # No pruning on the first epoch (warm-up), nor before three trials give a median.
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1),
    )


def check_same_sweep(study: optuna.Study, settings: dict[str, Any]) -> None:
    """A study continues only the sweep it was started with: same resolved recipe and space."""
    recorded = study.user_attrs
    if not recorded:
        for key, value in settings.items():
            study.set_user_attr(key, value)
        return
    for key in ("recipe", "space"):
        if recorded.get(key) != settings[key]:
            raise errors.ConfigError(
                f"Study {study.study_name} was started with another {key} "
                f"({recorded.get('config')} {' '.join(recorded.get('overrides', []))}, space "
                f"{recorded.get('space_file')}). Continue it with the same CONFIG, SPACE, EPOCHS, "
                "DATA_DIR and ARGS, or start a new one with STUDY=<name>.")


def enqueue_recipe(study: optuna.Study, recipe: search_space.RecipeParser, space: search_space.Space) -> None:
    """The recipe's own values as the new study's first trial, so that the ranked table says whether
    the search beat the recipe, measured on the same cells, epochs and limits as every other trial."""
    params = {key: recipe.value(key) for key in space}
    outside = [f"{key}={value!r}" for key, value in params.items() if not search_space.contains(space[key], value)]
    if outside:
        print(f"The recipe's own values are not all in the space ({', '.join(outside)}): "
              "no trial of them.")
        return
    study.enqueue_trial(params, skip_if_exists=True)


def max_time(seconds: float) -> str:
    """Lightning's `max_time` (DD:HH:MM:SS) for a limit in seconds."""
    minutes, secs = divmod(max(1, int(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"{days:02d}:{hours:02d}:{minutes:02d}:{secs:02d}"


def stop_at(deadline: float) -> Callable[[optuna.Study, optuna.trial.FrozenTrial], None]:
    """Stops the study once less than a second of the budget is left: `max_time` counts whole seconds,
    so a trial cut by it may end just before Optuna's own timeout, which would start one more."""

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if time.time() > deadline - 1:
            study.stop()

    return callback


class Objective:
    """One trial: its parameters as training flags, trained as an ordinary run; the score is the
    run's best `val/acc`."""

    def __init__(self, study_name: str, recipe: search_space.RecipeParser, space: search_space.Space,
                 runs_dir: Path, trial_minutes: float | None, deadline: float | None) -> None:
        self.study_name, self.recipe, self.space = study_name, recipe, space
        self.runs_dir, self.trial_minutes, self.deadline = runs_dir, trial_minutes, deadline

    def __call__(self, trial: optuna.Trial) -> float:
        params = {key: search_space.suggest(trial, key, dist) for key, dist in self.space.items()}
        run = f"{self.study_name}-trial{trial.number}"
        if (self.runs_dir / run / "checkpoints").exists():
            raise errors.ExistsError(f"{self.runs_dir / run} is a trial of an earlier study named "
                                     f"{self.study_name}: start this one with another STUDY=<name>.")
        trial.set_user_attr("run", run)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        args = ["fit", "--config", self.recipe.config, *TRIAL_DEFAULTS, *self.recipe.overrides,
                *self.recipe.flags(params), "--run", run, "--runs_dir", str(self.runs_dir)]
        limits = [60 * self.trial_minutes] if self.trial_minutes else []
        if self.deadline is not None:
            limits.append(self.deadline - time.time())
        if limits:
            args += ["--trainer.max_time", max_time(min(limits))]
        try:
            cli = build(args, callbacks=[TrialPruning(trial, monitor="val/acc")])
        except (errors.Preempted, SystemExit) as stop:  # saved by malaria.run.preemption, or Lightning's sys.exit(1)
            raise KeyboardInterrupt from stop
        best = cli.trainer.callback_metrics.get("val/acc_best")
        if best is None:
            raise NoHoldoutScore(f"Trial {trial.number} stopped before its first validation: "
                                 "raise TRIAL_MINUTES or BUDGET.")
        return float(best)


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial, best first: results (complete, then pruned, by val/acc), then the rest.

    A pruned trial's val/acc is the best it reached before it was stopped."""
    rows = []
    for trial in study.trials:
        reached = max(trial.intermediate_values.values(), default=math.nan)
        rows.append({
            "trial": trial.number,
            "state": trial.state.name.lower(),
            "val_acc": trial.value if trial.state == TrialState.COMPLETE else reached,
            "epochs": len(trial.intermediate_values),
            "minutes": round(trial.duration.total_seconds() / 60, 2) if trial.duration else math.nan,
            **trial.params,
            "run": trial.user_attrs.get("run"),
            "worker": trial.user_attrs.get("worker"),
        })
    if not rows:
        return pd.DataFrame(columns=["rank", "trial", "state", "val_acc", "epochs", "minutes", "run", "worker"])
    table = pd.DataFrame(rows)
    results_first = table["state"].map({"complete": 0, "pruned": 1}).fillna(2)
    table = table.assign(_order=results_first).sort_values(
        ["_order", "val_acc", "trial"], ascending=[True, False, True], na_position="last").drop(columns="_order")
    table.insert(0, "rank", range(1, len(table) + 1))
    return table.reset_index(drop=True)


def show(table: pd.DataFrame, study_name: str) -> Table:
    """The table as rich prints it: parameters by their last name where that is unambiguous."""
    view = Table(title=f"Study {study_name}: trials ranked by holdout val/acc")
    short = [column.rsplit(".", 1)[-1] for column in table.columns]
    shown = [column for column in table.columns if column != "worker"]
    for column in shown:
        name = column.rsplit(".", 1)[-1]
        view.add_column(name if short.count(name) == 1 else column,
                        justify="left" if column in ("state", "run") else "right")
    for row in table[shown].itertuples(index=False):
        view.add_row(*(_cell(value) for value in row))
    return view


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def print_wide(view: Table) -> None:
    """Print a table whole: off a terminal (a log, a pipe) rich would squeeze it to 80 columns."""
    console = Console()
    (console if console.is_terminal else Console(width=10_000)).print(view)


def save_figure(axes: Any, path: Path) -> None:
    figure = axes.figure
    figure.tight_layout()
    replace_file(path, lambda f: figure.savefig(f, format="png", dpi=120), binary=True)
    plt.close(figure)


def report(study: optuna.Study, study_dir: Path, recipe: search_space.RecipeParser | None) -> pd.DataFrame:
    """The ranked table (printed, trials.csv), the two figures and best.yaml, from the store."""
    from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances

    study_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a dead worker's trial, once its grace is over
        table = trials_table(study)
        replace_file(study_dir / "trials.csv", lambda f: table.to_csv(f, index=False))
        print_wide(show(table, study.study_name))
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if complete:
            save_figure(plot_optimization_history(study, target_name="val/acc"), study_dir / "history.png")
        if len(complete) >= 2:
            save_figure(plot_param_importances(study, target_name="val/acc"), study_dir / "importances.png")
        else:
            print("Parameter importances need two complete trials.")
    if complete and recipe is not None:
        best = study.best_trial
        header = (f"# Best trial {best.number} of study {study.study_name}: val/acc {best.value:.4f} "
                  f"(run {best.user_attrs.get('run')}).\n# {recipe.config} "
                  f"{' '.join(recipe.overrides)} with {best.params}\n")
        write_text(study_dir / "best.yaml", header + recipe.dump(best.params))
        print(f"Best trial {best.number}: val/acc {best.value:.4f}. Train it: "
              f"make train CONFIG={study_dir / 'best.yaml'}")
    print(f"Study {study.study_name}: {study_dir}/ (trials.csv, history.png, importances.png, best.yaml)")
    return table


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--space", type=Path, default=None,
                        help="search space (default: sweeps/<recipe>.yaml beside the recipe)")
    parser.add_argument("--trials", type=argument(NonNegativeInt), default=20,
                        help="results the study should hold; 0: report only")
    parser.add_argument("--budget", type=argument(PositiveFloat), default=None,
                        help="minutes for this worker's whole sweep")
    parser.add_argument("--trial_minutes", type=argument(PositiveFloat), default=None, help="time limit of one trial")
    parser.add_argument("--study", default=None, help="study name (default: the recipe's, and the space's)")
    parser.add_argument("--storage", default=None,
                        help="RDB URL or journal file path (default: sqlite under runs/sweeps/<study>/)")
    parser.add_argument("--seed", type=int, default=42, help="sampler seed (trial n draws from seed + n)")
    parser.add_argument("--heartbeat", type=argument(PositiveInt), default=10,
                        help="seconds between a running trial's heartbeats; silent for 3 of them: failed")
    parser.add_argument("--runs_dir", type=Path, default=runs.RUNS_DIR)
    # Anything else is a training override, e.g. --data.data_dir data --trainer.max_epochs 5.
    args, overrides = parser.parse_known_args(argv)
    recipe_name = Path(args.config).stem
    space_file = args.space or Path(args.config).parent / "sweeps" / f"{recipe_name}.yaml"
    name = args.study or "-".join(dict.fromkeys([recipe_name, space_file.stem]))
    study_dir = args.runs_dir / "sweeps" / name
    url = args.storage or f"sqlite:///{study_dir / 'study.db'}"

    if args.trials == 0:
        local_file = url.removeprefix("sqlite:///")  # a journal path, or an SQLite file's
        if "://" not in local_file and not Path(local_file).exists():
            raise errors.MissingError(f"No study {name}: {local_file} does not exist.")
        try:
            study = optuna.load_study(study_name=name, storage=make_storage(url, args.heartbeat))
        except KeyError:
            raise errors.MissingError(f"No study {name} in {url}.") from None
        recorded = study.user_attrs
        recipe = (search_space.RecipeParser(recorded["config"], recorded["overrides"])
                  if recorded.get("config") else None)
        return report(study, study_dir, recipe)

    space = search_space.load(space_file)
    recipe = search_space.RecipeParser(args.config, overrides)
    recipe.check(space, source=str(space_file))
    if recipe.base["data.val_fraction"] == 0:
        raise errors.ConfigError("A sweep scores trials on the holdout: data.val_fraction must be above 0.")
    study_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(name, make_storage(url, args.heartbeat), args.seed)
    new = not study.user_attrs
    check_same_sweep(study, {
        "config": args.config, "overrides": overrides, "space_file": str(space_file),
        "recipe": recipe.resolved(), "space": {k: distribution_to_json(d) for k, d in space.items()},
    })
    if new:
        enqueue_recipe(study, recipe, space)
    remaining = args.trials - len(study.get_trials(deepcopy=False, states=COUNTED))
    budget = 60 * args.budget if args.budget else None  # seconds: no new trial after, none running past
    deadline = time.time() + budget if budget else None
    objective = Objective(name, recipe, space, args.runs_dir, args.trial_minutes, deadline)
    interrupted = False
    if remaining > 0:
        try:
            with mock.patch.dict(os.environ, {"WANDB_RUN_GROUP": name}):
                study.optimize(objective, n_trials=remaining, timeout=budget,
                               callbacks=[optuna.study.MaxTrialsCallback(args.trials, states=COUNTED),
                                          *([stop_at(deadline)] if deadline is not None else [])],
                               catch=(FloatingPointError, NoHoldoutScore), gc_after_trial=True)
        except KeyboardInterrupt:
            interrupted = True
    table = report(study, study_dir, recipe)
    if interrupted:
        print(f"Interrupted: study {name} keeps its finished trials; rerun the same command to continue it.")
        raise SystemExit(130)
    return table


if __name__ == "__main__":
    errors.run(main)
