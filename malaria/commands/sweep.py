"""Hyperparameter search over a recipe: `python -m malaria.commands.sweep --config configs/default.yaml
--space configs/sweeps/default.yaml --trials 20 [training overrides]` (`make sweep`).

An Optuna study in a real store, SQLite under `runs/sweeps/<study>/study.db` unless `--storage`
names another (any RDB URL such as `postgresql://...`, or a file path: Optuna's JournalStorage).
Rerunning the same command continues the study: finished trials are kept, and a trial whose
process died (its heartbeat stopped, RDB stores only) is marked failed, not counted, and proposed
once more. `--trials` is the number of results (complete or pruned trials) the study should hold, so
a rerun runs only the rest. Several workers (processes, machines) pointing at one store share its
trials; each finishes the trial it started, so the study may end up to (workers - 1) trials over.

Each trial is an ordinary run, `runs/<study>-trial<n>/` (checkpoints, metrics, config), trained
in this process on one device, without its report (`make report RUN=` builds one), limited by
`--trial_minutes` and what is left of `--budget`. Its score (`--objective submission`) is what
`make predict` would submit from it, measured on the holdout: its best checkpoint, TTA as the recipe
predicts, the slide prior on with the training side's labels; `--objective images` scores its best
`val/acc`, the images alone. Both are recorded. `--pruner` stops unpromising trials after an epoch
on the same figure per epoch (`val/acc_prior` or `val/acc`): median rule, successive halving or
Hyperband, epochs being the resource. The holdout is the recipe's, or a slide-grouped one with
`--data.split slide` (new patients: there the prior does nothing); never test labels. W&B groups the
trials under the study's name.

When the sweep stops, or with `--trials 0` (report only, from the store alone): the ranked table of
trials (`trials.csv`), the optimisation history and parameter importances (`history.png`,
`importances.png`), the resolved recipe the trials started from (`recipe.yaml`) and the best trial's
complete recipe, `best.yaml`, for `make train CONFIG=runs/sweeps/<study>/best.yaml`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # Optuna's plots draw with pyplot: no display needed
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from lightning.pytorch import LightningModule, Trainer  # noqa: E402
from optuna.distributions import distribution_to_json  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from optuna_integration import PyTorchLightningPruningCallback  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from malaria.common import atomic, errors  # noqa: E402
from malaria.common.atomic import replace_file, write_text  # noqa: E402
from malaria.common.flags import NonNegativeInt, PositiveFloat, PositiveInt, argument  # noqa: E402
from malaria.model.metrics import classes  # noqa: E402
from malaria.prediction import predictor  # noqa: E402
from malaria.prediction.slide_prior import DEFAULT_STRENGTH  # noqa: E402
from malaria.run import run_dirs, search_space  # noqa: E402
from malaria.run.cli import build  # noqa: E402
from malaria.run.loggers import finish_wandb  # noqa: E402
from malaria.run.prior_accuracy import METRIC as PRIOR_METRIC  # noqa: E402
from malaria.run.prior_accuracy import PriorAccuracy  # noqa: E402
from malaria.run.studies import PRUNERS, make_pruner, make_storage, open_study, storage_url  # noqa: E402

# Trials are built from argument lists on purpose.
warnings.filterwarnings("ignore", message="LightningCLI's args parameter")

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # the trials that are results
# A trial's score (--objective): what `make predict` would submit from it, or its images alone.
OBJECTIVES = {
    "submission": "the holdout accuracy of what make predict submits (slide prior on, TTA as the recipe "
                  "predicts)",
    "images": "the best holdout val/acc of the images alone",
}
COLUMN = {"submission": "submission_acc", "images": "images_acc"}  # its column in the ranked table
PER_EPOCH = {"submission": PRIOR_METRIC, "images": "val/acc"}  # what pruning watches after each epoch
# Set for every trial: one device (parallelism comes from workers, and a DDP launch would rerun
# this whole sweep in each rank), and no report. Training overrides come after, so they win.
TRIAL_DEFAULTS = ["--trainer.devices", "1", "--infrastructure.report", "false"]


class QuietStops(logging.Filter):
    """Optuna logs a failed trial's traceback before it re-raises the error. For a stop (SIGTERM,
    Ctrl-C) or a user error the verb then says what happened in one line, so the traceback is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        kind = record.exc_info[0] if record.exc_info else None
        return not (kind and issubclass(kind, (KeyboardInterrupt, errors.UserError)))


# The filter goes on the private logger of Optuna's trial loop, which logs the traceback: optuna.logging's
# public functions set the verbosity or the handler of the whole library, none drops one kind of record,
# and a filter on the public "optuna" logger would not see its children's records (logging applies a
# logger's filters only to what is logged on that logger itself). If Optuna moves the loop, the Ctrl-C
# test in tests/commands/test_sweep.py sees the traceback again and fails.
logging.getLogger("optuna.study._optimize").addFilter(QuietStops())


class NoHoldoutScore(RuntimeError):
    """A trial stopped (by its time limit) before its first validation: it has no score."""


class TrialPruning(PyTorchLightningPruningCallback):
    """Optuna's pruning on the objective's figure after every validation. A pruned trial stops by an
    exception, which skips the CLI's `after_fit` and the objective's return: its best images-alone
    accuracy is recorded, and its W&B run closed, here instead."""

    def __init__(self, trial: optuna.Trial, monitor: str) -> None:
        super().__init__(trial, monitor)
        self.trial = trial

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        best = trainer.callback_metrics.get("val/acc_best")
        if isinstance(exception, optuna.TrialPruned) and best is not None:
            self.trial.set_user_attr("images_acc", float(best))
        finish_wandb(trainer.loggers)


def same_recipe(recorded: Any, current: Any) -> bool:
    """Whether a study's recorded recipe is the current one, but for flags added to the code since the
    study began: a key the record lacks is ignored while the current recipe leaves it unset (None)."""
    def trimmed(now: Any, then: Any) -> Any:
        if isinstance(now, dict) and isinstance(then, dict):
            return {key: trimmed(value, then.get(key)) for key, value in now.items()
                    if key in then or value is not None}
        return now

    return trimmed(current, recorded) == recorded


def check_same_sweep(study: optuna.Study, settings: dict[str, Any]) -> None:
    """A study continues only the sweep it was started with: same resolved recipe, space and objective.

    Optuna writes a study's attributes one at a time, and workers start together: the recipe is written
    last, so a worker that finds it finds the rest; one that does not records the same settings again."""
    recorded = study.user_attrs
    if "recipe" not in recorded:
        for key, value in sorted(settings.items(), key=lambda item: item[0] == "recipe"):
            study.set_user_attr(key, value)
        return
    for key in ("recipe", "space"):
        if not same_recipe(recorded.get(key), settings[key]):
            raise errors.ConfigError(
                f"Study {study.study_name} was started with another {key} "
                f"({recorded.get('config')} {' '.join(recorded.get('overrides', []))}, space "
                f"{recorded.get('space_file')}). Continue it with the same CONFIG, SPACE, EPOCHS, "
                "DATA_DIR and ARGS, or start a new one with STUDY=<name>.")
    objective = objective_of(study)
    if objective != settings["objective"]:
        raise errors.ConfigError(f"Study {study.study_name} scores its trials by {OBJECTIVES[objective]}: "
                                 f"continue it with --objective {objective}, or start a new one with "
                                 "STUDY=<name>.")


def objective_of(study: optuna.Study) -> str:
    """The study's objective; studies begun before there was a choice scored the images alone."""
    return study.user_attrs.get("objective", "images")


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


def stop_at(deadline: float) -> Callable[[optuna.Study, optuna.trial.FrozenTrial], None]:
    """Stops the study once less than a second of the budget is left: `max_time` counts whole seconds,
    so a trial cut by it may end just before Optuna's own timeout, which would start one more."""

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if time.time() > deadline - 1:
            study.stop()

    return callback


def submission_accuracy(run_dir: Path) -> float:
    """The holdout accuracy of what `make predict` would submit from the run: its best checkpoint, TTA
    as the recipe predicts, the slide prior on (the holdout's from the training side's labels)."""
    model, datamodule = predictor.load(run_dirs.checkpoint(run_dir, "best"))
    holdout = predictor.predict_subset(model, datamodule, "val", prior=DEFAULT_STRENGTH)
    return float((classes(holdout.probs) == holdout.labels).mean())


class Objective:
    """One trial: its parameters as training flags, trained as an ordinary run. Both figures are
    recorded (user attributes `submission_acc` and `images_acc`); the study's objective is the score."""

    def __init__(self, study_name: str, recipe: search_space.RecipeParser, space: search_space.Space,
                 runs_dir: Path, trial_minutes: float | None, deadline: float | None, objective: str) -> None:
        self.study_name, self.recipe, self.space = study_name, recipe, space
        self.runs_dir, self.trial_minutes, self.deadline = runs_dir, trial_minutes, deadline
        self.objective = objective

    def __call__(self, trial: optuna.Trial) -> float:
        params = {key: search_space.suggest(trial, key, dist) for key, dist in self.space.items()}
        run = f"{self.study_name}-trial{trial.number}"
        if (self.runs_dir / run / "checkpoints").exists():
            raise errors.ExistsError(f"{self.runs_dir / run} is a trial of an earlier study named "
                                     f"{self.study_name}: start this one with another STUDY=<name>.")
        trial.set_user_attr("run", run)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        args = ["fit", "--config", self.recipe.config, *TRIAL_DEFAULTS, *self.recipe.overrides,
                *self.recipe.flags(params), "--run", run, "--runs_dir", str(self.runs_dir),
                "--wandb.group", self.study_name]
        limits = [60 * self.trial_minutes] if self.trial_minutes else []
        if self.deadline is not None:
            limits.append(self.deadline - time.time())
        if limits:
            args += ["--trainer.max_time", json.dumps({"seconds": max(1, int(min(limits)))})]
        pruning = TrialPruning(trial, monitor=PER_EPOCH[self.objective])
        try:
            cli = build(args, callbacks=[PriorAccuracy(), pruning])
        except (errors.Preempted, SystemExit) as stop:  # saved by malaria.run.preemption, or Lightning's sys.exit(1)
            raise KeyboardInterrupt from stop
        best = cli.trainer.callback_metrics.get("val/acc_best")
        if best is None:
            raise NoHoldoutScore(f"Trial {trial.number} stopped before its first validation: "
                                 "raise TRIAL_MINUTES or BUDGET.")
        figures = {"images_acc": float(best), "submission_acc": submission_accuracy(self.runs_dir / run)}
        for column, figure in figures.items():
            trial.set_user_attr(column, figure)
        return figures[COLUMN[self.objective]]


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial, best first: results (complete, then pruned, by the study's objective), then
    the rest. Both figures are shown; a pruned trial's objective figure is the best it reached by epoch
    before it was stopped (without TTA), and its images_acc its best val/acc."""
    column = COLUMN[objective_of(study)]
    rows = []
    for trial in study.trials:
        figures = {name: trial.user_attrs.get(name, math.nan) for name in COLUMN.values()}
        reached = max(trial.intermediate_values.values(), default=math.nan)
        figures[column] = trial.value if trial.state == TrialState.COMPLETE else reached
        rows.append({
            "trial": trial.number,
            "state": trial.state.name.lower(),
            **figures,
            "epochs": len(trial.intermediate_values),
            "minutes": round(trial.duration.total_seconds() / 60, 2) if trial.duration else math.nan,
            **trial.params,
            "run": trial.user_attrs.get("run"),
            "worker": trial.user_attrs.get("worker"),
        })
    if not rows:
        return pd.DataFrame(columns=["rank", "trial", "state", *COLUMN.values(), "epochs", "minutes", "run",
                                     "worker"])
    table = pd.DataFrame(rows)
    results_first = table["state"].map({"complete": 0, "pruned": 1}).fillna(2)
    table = table.assign(_order=results_first).sort_values(
        ["_order", column, "trial"], ascending=[True, False, True], na_position="last").drop(columns="_order")
    table.insert(0, "rank", range(1, len(table) + 1))
    return table.reset_index(drop=True)


def show(table: pd.DataFrame, study: optuna.Study) -> Table:
    """The table as rich prints it: parameters by their last name where that is unambiguous."""
    objective = objective_of(study)
    view = Table(title=f"Study {study.study_name}: trials ranked by {COLUMN[objective]}, "
                       f"{OBJECTIVES[objective]}")
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


def save_plot(axes: Any, path: Path) -> None:
    """An Optuna plot's figure, laid out, through the one atomic figure writer."""
    axes.figure.tight_layout()
    atomic.save_figure(axes.figure, path, dpi=120)


def recorded_recipe(study: optuna.Study, study_dir: Path) -> search_space.RecipeParser | None:
    """The resolved recipe the study's trials started from, as the store recorded it, written to
    recipe.yaml: best.yaml then needs no recipe file, and a later edit of one changes nothing here."""
    recipe = study.user_attrs.get("recipe")
    if not recipe:  # a study begun outside `make sweep`
        return None
    path = study_dir / "recipe.yaml"
    write_text(path, yaml.safe_dump(recipe, sort_keys=False))
    return search_space.RecipeParser(str(path), [])


def report(study: optuna.Study, study_dir: Path) -> pd.DataFrame:
    """The ranked table (printed, trials.csv), the two figures and best.yaml, from the store alone."""
    from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances

    column = COLUMN[objective_of(study)]
    study_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a dead worker's trial, once its grace is over
        table = trials_table(study)
        replace_file(study_dir / "trials.csv", lambda f: table.to_csv(f, index=False))
        print_wide(show(table, study))
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if complete:
            save_plot(plot_optimization_history(study, target_name=column), study_dir / "history.png")
        if len(complete) >= 2:
            save_plot(plot_param_importances(study, target_name=column), study_dir / "importances.png")
        else:
            print("Parameter importances need two complete trials.")
    recipe = recorded_recipe(study, study_dir)
    if complete and recipe is not None:
        best, recorded = study.best_trial, study.user_attrs
        header = (f"# Best trial {best.number} of study {study.study_name}: {column} {best.value:.4f} "
                  f"(run {best.user_attrs.get('run')}).\n# {recorded.get('config')} "
                  f"{' '.join(recorded.get('overrides', []))} with {best.params}\n")
        write_text(study_dir / "best.yaml", header + recipe.dump(best.params))
        print(f"Best trial {best.number}: {column} {best.value:.4f}. Train it: "
              f"make train CONFIG={study_dir / 'best.yaml'}")
    print(f"Study {study.study_name}: {study_dir}/ (trials.csv, history.png, importances.png, best.yaml)")
    return table


def _parser() -> argparse.ArgumentParser:
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
    parser.add_argument("--storage", type=storage_url, default=None,
                        help="RDB URL or journal file path (default: sqlite under runs/sweeps/<study>/)")
    parser.add_argument("--objective", choices=OBJECTIVES, default="submission",
                        help="a trial's score: " + "; ".join(f"{k}: {v}" for k, v in OBJECTIVES.items()))
    parser.add_argument("--pruner", choices=PRUNERS, default="median",
                        help="stop unpromising trials by epoch: median rule, successive halving or Hyperband")
    parser.add_argument("--seed", type=int, default=42, help="sampler seed (trial n draws from seed + n)")
    parser.add_argument("--heartbeat", type=argument(PositiveInt), default=10,
                        help="seconds between a running trial's heartbeats; silent for 3 of them: failed")
    parser.add_argument("--runs_dir", type=Path, default=run_dirs.RUNS_DIR)
    return parser


def with_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """The space, study name and store where the command left them out, and the study's folder."""
    recipe_name = Path(args.config).stem
    args.space = args.space or Path(args.config).parent / "sweeps" / f"{recipe_name}.yaml"
    args.study = args.study or "-".join(dict.fromkeys([recipe_name, args.space.stem]))
    args.study_dir = args.runs_dir / "sweeps" / args.study
    args.default_storage = args.storage is None
    args.storage = args.storage or f"sqlite:///{args.study_dir / 'study.db'}"
    return args


def report_only(args: argparse.Namespace) -> pd.DataFrame:
    """`--trials 0`: the report of an existing study, from its store alone."""
    local_file = args.storage.removeprefix("sqlite:///")  # a journal path, or an SQLite file's
    if "://" not in local_file and not Path(local_file).exists():
        raise errors.MissingError(f"No study {args.study}: {local_file} does not exist.")
    try:
        study = optuna.load_study(study_name=args.study, storage=make_storage(args.storage, args.heartbeat))
    except KeyError:
        raise errors.MissingError(f"No study {args.study} in "
                                  f"{make_url(args.storage).render_as_string(hide_password=True)}.") from None
    return report(study, args.study_dir)


def run_sweep(args: argparse.Namespace, overrides: list[str]) -> pd.DataFrame:
    """Trials until the study holds `--trials` results (or the budget is spent), then the report."""
    space = search_space.load(args.space)
    recipe = search_space.RecipeParser(args.config, overrides)
    recipe.check(space, source=str(args.space))
    if recipe.base["data.val_fraction"] == 0:
        raise errors.ConfigError("A sweep scores trials on the holdout: data.val_fraction must be above 0.")
    if args.default_storage:  # the one store that lives in the study's folder
        args.study_dir.mkdir(parents=True, exist_ok=True)
    pruner = make_pruner(args.pruner, recipe.base["trainer.max_epochs"])
    study, created = open_study(args.study, make_storage(args.storage, args.heartbeat), args.seed, pruner)
    check_same_sweep(study, {
        "config": args.config, "overrides": overrides, "space_file": str(args.space),
        "recipe": recipe.resolved(), "space": {k: distribution_to_json(d) for k, d in space.items()},
        "objective": args.objective,
    })
    if created:  # by this worker alone: enqueue_trial's own check for a twin is no lock
        enqueue_recipe(study, recipe, space)
    remaining = args.trials - len(study.get_trials(deepcopy=False, states=COUNTED))
    budget = 60 * args.budget if args.budget else None  # seconds: no new trial after, none running past
    deadline = time.time() + budget if budget else None
    objective = Objective(args.study, recipe, space, args.runs_dir, args.trial_minutes, deadline,
                          args.objective)
    interrupted = False
    if remaining > 0:
        try:
            study.optimize(objective, n_trials=remaining, timeout=budget,
                           callbacks=[optuna.study.MaxTrialsCallback(args.trials, states=COUNTED),
                                      *([stop_at(deadline)] if deadline is not None else [])],
                           catch=(FloatingPointError, NoHoldoutScore), gc_after_trial=True)
        except KeyboardInterrupt:
            interrupted = True
    table = report(study, args.study_dir)
    if interrupted:
        print(f"Interrupted: study {args.study} keeps its finished trials; rerun the same command to "
              "continue it.")
        raise SystemExit(130)
    return table


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    # Anything the parser does not know is a training override: --data.data_dir data --trainer.max_epochs 5.
    args, overrides = _parser().parse_known_args(argv)
    args = with_defaults(args)
    return report_only(args) if args.trials == 0 else run_sweep(args, overrides)


if __name__ == "__main__":
    errors.run(main)
