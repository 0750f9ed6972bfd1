"""The Optuna side of `make sweep`: where a study is stored, how its trials are proposed, and how they
are pruned. `malaria.commands.sweep` decides what a trial is and what it scores.

A store is an RDB URL (SQLite, PostgreSQL through the `cluster` extra's psycopg, MySQL...) or a file
path, Optuna's journal. RDB stores keep a heartbeat for each running trial: one whose process died is
failed by the next worker to start a trial, and its parameters proposed once more.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import optuna
from filelock import FileLock
from optuna.samplers import BaseSampler, TPESampler
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError, ProgrammingError
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_random

from malaria.common import errors

# The heartbeat and the retry of a dead worker's trial are experimental in Optuna, and chosen knowingly.
warnings.filterwarnings("ignore", message="Argument ``(heartbeat_interval|grace_period)`` is an experimental")
warnings.filterwarnings("ignore", message="RetryHeartbeatStaleTrialCallback is experimental")

PRUNERS = ("median", "halving", "hyperband")


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


def storage_url(text: str) -> str:
    """`--storage`: a journal file's path, or a database URL whose dialect and driver are installed, so
    that a typo or a missing driver ends in the parser, before any folder is made."""
    if "://" not in text:
        return text
    try:
        url = make_url(text)
        url.get_dialect().import_dbapi()
    except ArgumentError as err:  # NoSuchModuleError, an unknown dialect, is one too
        raise argparse.ArgumentTypeError(f"{text!r} is not a database URL Optuna can use ({err}); e.g. "
                                         "postgresql://user:password@host/db, or a file path for a journal.")
    except ImportError as err:
        raise argparse.ArgumentTypeError(f"{url.render_as_string(hide_password=True)}: its driver is not "
                                         f"installed ({err}). For PostgreSQL: pip install -e '.[cluster]'."
                                         ) from None
    return text


def make_storage(url: str, heartbeat: int) -> optuna.storages.BaseStorage:
    """An RDB store for a URL (SQLite, PostgreSQL, MySQL...) with a heartbeat, so that a trial whose
    process died is failed and proposed once more; Optuna's journal file for a plain path (no heartbeat
    there)."""
    if "://" not in url:
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url))
    sqlite = url.startswith("sqlite")
    # SQLite locks the whole file per write: with several local workers, wait for it, don't fail. A
    # server's connections can be dropped between a long trial's writes: test each before use.
    engine = {"connect_args": {"timeout": 60}} if sqlite else {"pool_pre_ping": True}
    # Two local workers starting together would both create the tables of a new SQLite file.
    sqlite_file = url.startswith("sqlite:///")
    lock = FileLock(url.removeprefix("sqlite:///") + ".lock") if sqlite_file else nullcontext()
    # Workers starting together on an empty database race to create Optuna's tables (optuna issue 1092):
    # the losers' transactions fail on a table or row the winner has just made, and their next attempt
    # finds them there.
    race = Retrying(retry=retry_if_exception_type((IntegrityError, ProgrammingError)),
                    stop=stop_after_attempt(3), wait=wait_random(0.5, 2), reraise=True)
    try:
        for attempt in race:
            with attempt, lock:
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine, heartbeat_interval=heartbeat, grace_period=3 * heartbeat,
                    # Once: a trial whose parameters kill its worker every time (out of memory) is not
                    # retried forever.
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
    except OperationalError as err:
        reason = str(err.orig or err).strip().splitlines()[0]
        shown = make_url(url).render_as_string(hide_password=True)
        raise errors.MissingError(f"Cannot open the study store {shown}: {reason}. Is the server running, "
                                  "and the URL right?") from None


def make_pruner(kind: str, max_epochs: int | None) -> optuna.pruners.BasePruner:
    """Epochs are the resource: a trial reports its holdout figure after each one (step = epoch - 1).

    median: stop a trial below the median of the earlier trials at the same epoch (not after its first
    epoch, nor before three trials gave a median). halving: asynchronous successive halving, rungs at
    epochs 2, 4, 10, 28...: a trial goes on past a rung only in the top third of the trials that reached
    it. hyperband: halving schedules side by side whose first rungs come later and later, up to the
    recipe's epochs, so a trial that starts slowly has a chance too."""
    if kind == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if kind == "hyperband":
        last = max_epochs if max_epochs and max_epochs > 0 else "auto"  # -1: until max_steps
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=last, reduction_factor=3)
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)


def open_study(name: str, storage: optuna.storages.BaseStorage, seed: int,
               pruner: optuna.pruners.BasePruner) -> tuple[optuna.Study, bool]:
    """The study `name`, and whether this worker created it: the store's unique study name lets exactly
    one of the workers that start together create it; the others join it."""
    settings = dict(study_name=name, storage=storage, sampler=TrialSeededTPE(seed), pruner=pruner)
    try:
        return optuna.create_study(direction="maximize", **settings), True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(**settings), False
