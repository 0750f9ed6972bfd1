"""Studies: proposals seeded per trial, so a study reproduces and a rerun never repeats itself; Hyperband
with epochs as the resource. Sweeps end to end (stores, workers, pruning real trials) are in
tests/commands/test_sweep.py."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import optuna
from optuna.trial import TrialState

import postgres
from malaria.run import studies


def test_trials_draw_from_their_own_seed_so_a_study_reproduces_and_a_rerun_never_repeats() -> None:
    def objective(trial: optuna.Trial) -> float:
        return trial.suggest_float("x", 0, 1)

    def study(sampler: optuna.samplers.BaseSampler, n: int, storage=None) -> optuna.Study:
        study = optuna.create_study(study_name="s", storage=storage, sampler=sampler, load_if_exists=True)
        study.optimize(objective, n_trials=n)
        return study

    drawn = [t.params["x"] for t in study(studies.TrialSeededTPE(7), 12).trials]
    assert [t.params["x"] for t in study(studies.TrialSeededTPE(7), 12).trials] == drawn
    # A rerun (a fresh process: a fresh sampler on the same store) continues with new draws,
    # where one seeded TPESampler per process would propose the first trials again.
    storage = optuna.storages.InMemoryStorage()
    study(studies.TrialSeededTPE(7), 4, storage)
    resumed = [t.params["x"] for t in study(studies.TrialSeededTPE(7), 4, storage).trials]
    assert resumed[:4] == drawn[:4] and len(set(resumed)) == 8


def test_hyperband_runs_only_the_promising_trials_to_the_recipes_last_epoch() -> None:
    """Epochs as the resource: brackets whose first rungs are epochs 2 and 4 (steps 1 and 3) of 9; the third
    bracket's would be epoch 10, past the recipe's end, so its trials all run to the end."""
    study = optuna.create_study(direction="maximize", pruner=studies.make_pruner("hyperband", 9),
                                sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial: optuna.Trial) -> float:  # a learning curve that climbs to the trial's quality
        quality = trial.suggest_float("quality", 0, 1)
        for epoch in range(9):
            trial.report(quality * (epoch + 1) / 9, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return quality

    study.optimize(objective, n_trials=40)
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert {t.last_step for t in pruned} == {1, 3} and {t.last_step for t in complete} == {8}
    assert len(pruned) > len(complete) / 2
    assert max(t.params["quality"] for t in complete) > max(t.params["quality"] for t in pruned)


def test_workers_starting_together_on_an_empty_database_all_open_it(postgres_url: str) -> None:
    """Each worker's store creates Optuna's tables where they are missing; started together, all but one
    lose that race (optuna issue 1092) and must find the tables on their next attempt."""
    database = postgres.create_database(postgres_url, "race")
    start = threading.Barrier(4)

    def open_store(_: int) -> optuna.storages.BaseStorage:
        start.wait()
        return studies.make_storage(database, heartbeat=10)

    with ThreadPoolExecutor(4) as pool:
        stores = list(pool.map(open_store, range(4)))
    study = optuna.create_study(study_name="s", storage=stores[0])
    assert [optuna.load_study(study_name="s", storage=store).study_name for store in stores] == ["s"] * 4
    assert study.study_name == "s"


def test_of_workers_opening_a_new_study_together_exactly_one_creates_it(tmp_path) -> None:
    storage = studies.make_storage(f"sqlite:///{tmp_path}/study.db", heartbeat=10)
    start = threading.Barrier(4)

    def open_it(_: int) -> bool:
        start.wait()
        return studies.open_study("s", storage, 0, optuna.pruners.NopPruner())[1]

    with ThreadPoolExecutor(4) as pool:
        assert sorted(pool.map(open_it, range(4))) == [False, False, False, True]
