"""`make sweep`: spaces checked before any trial, a study that survives a kill and continues, two
workers sharing one store (an SQLite file, and a real PostgreSQL server: conftest's `postgres_url`),
trials scored as `make predict` would submit them, pruning by epoch (median rule, successive halving,
Hyperband), and a report, rebuilt from the store alone anywhere, whose best.yaml trains.

Every trial is TINY (conftest) on the demo competition, over a small space of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from filelock import FileLock
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from malaria.common import errors
from malaria.run import run_dirs as runs
from malaria.run import search_space, studies
from malaria.commands import holdout, sweep
from malaria.commands import train

from runner import REPO, run_commands
from conftest import TINY, read_wandb_log

RETRY = optuna.storages.RetryHeartbeatStaleTrialCallback

SPACE = """
model.lr: {low: 1.0e-3, high: 1.0e-2, log: true}
model.model_kwargs.drop_rate: {low: 0.0, high: 0.5}
data.image_size: [24, 32]
"""


# Spaces that hold the recipe's own values (TINY's lr and image size), so a new study begins with them.
RECIPE_SPACE = """
model.lr: {low: 1.0e-3, high: 1.0e-2, log: true}
data.image_size: [24, 32]
"""


def sweep_args(tmp_path: Path, demo_dir: Path, *extra: str, space: str = SPACE) -> list[str]:
    space_file = tmp_path / "space.yaml"
    space_file.write_text(space)
    return [*TINY, "--space", str(space_file), "--runs_dir", str(tmp_path / "runs"),
            "--data.data_dir", str(demo_dir), *extra]


def load(tmp_path: Path, study: str, storage: str | None = None) -> optuna.Study:
    storage = storage or f"sqlite:///{tmp_path}/runs/sweeps/{study}/study.db"
    return optuna.load_study(study_name=study, storage=storage)


def test_the_shipped_space_searches_what_the_default_recipe_accepts() -> None:
    space = search_space.load(Path("configs/sweeps/default.yaml"))
    search_space.RecipeParser("configs/default.yaml", []).check(space, "configs/sweeps/default.yaml")
    assert {"model.lr", "model.weight_decay", "model.label_smoothing", "model.model_kwargs.drop_rate",
            "data.image_size", "data.batch_size", "model.warmup_epochs"} <= set(space)


@pytest.mark.parametrize(("space", "named"), [
    ("model.lrr: {low: 1.0e-3, high: 1.0e-2}", "unknown key model.lrr"),
    ("model.lr: {low: 1.0e-2, high: 1.0e-3}", "model.lr: empty range"),
    ("data.image_size: []", "data.image_size: an empty list of choices"),
    ("model.lr: {low: 0.0, high: 1.0e-2, log: true}", "model.lr"),
    ("data.split: [random, sideways]", f"data.split: the recipe {TINY[1]} refuses 'sideways'"),
    ("data.batch_size: [16, 2.5]", f"data.batch_size: the recipe {TINY[1]} refuses 2.5"),
])
def test_a_bad_space_is_one_error_naming_the_key_before_any_trial(demo_dir: Path, tmp_path: Path, capsys,
                                                                  space: str, named: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        errors.run(lambda: sweep.main(sweep_args(tmp_path, demo_dir, "--trials", "1", space=space)))
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.startswith("error: ") and named in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # no study, no trial


def test_a_report_of_a_study_that_does_not_exist_says_so(tmp_path: Path) -> None:
    with pytest.raises(errors.MissingError, match="No study nope"):
        sweep.main(["--trials", "0", "--study", "nope", "--runs_dir", str(tmp_path)])


def test_a_worker_that_finds_a_new_study_half_recorded_records_it_too() -> None:
    settings = {"config": "c.yaml", "overrides": [], "space_file": "s.yaml",
                "recipe": {"model": {"lr": 0.003}}, "space": {}, "objective": "submission"}
    study = optuna.create_study()
    study.set_user_attr("config", "c.yaml")  # another worker, started at the same time, is writing
    sweep.check_same_sweep(study, settings)  # recorded here as well, no error
    assert study.user_attrs == settings
    study.set_user_attr("config", "recorded.yaml")
    sweep.check_same_sweep(study, settings)  # now the study's: checked, not recorded again
    assert study.user_attrs["config"] == "recorded.yaml"
    with pytest.raises(errors.ConfigError, match="another recipe"):
        sweep.check_same_sweep(study, {**settings, "recipe": {"model": {"lr": 0.01}}})


def test_a_study_continues_after_the_code_gained_a_flag_but_not_after_a_changed_value() -> None:
    recorded = {"model": {"lr": 0.003}, "wandb": {"mode": "auto"}}
    assert sweep.same_recipe(recorded, {"model": {"lr": 0.003}, "wandb": {"mode": "auto", "group": None}})
    assert not sweep.same_recipe(recorded, {"model": {"lr": 0.003}, "wandb": {"mode": "auto", "group": "g"}})
    assert not sweep.same_recipe(recorded, {"model": {"lr": 0.01}, "wandb": {"mode": "auto"}})
    assert not sweep.same_recipe(recorded, {"model": {}, "wandb": {"mode": "auto"}})  # a value gone


def test_a_new_study_starts_with_the_recipes_own_values_where_the_space_holds_them(capsys) -> None:
    recipe = search_space.RecipeParser(TINY[1], TINY[2:])
    space = {"model.lr": FloatDistribution(1.0e-3, 1.0e-2, log=True), "data.image_size": CategoricalDistribution([24, 32])}
    study = optuna.create_study(direction="maximize")
    sweep.enqueue_recipe(study, recipe, space)
    sweep.enqueue_recipe(study, recipe, space)  # asked twice (a rerun after a crash): still one
    study.optimize(lambda trial: sum(search_space.suggest(trial, k, d) for k, d in space.items()), n_trials=2)
    assert study.trials[0].params == {"model.lr": 0.003, "data.image_size": 32}  # configs/default.yaml, TINY
    assert study.trials[1].params != study.trials[0].params

    outside = optuna.create_study(direction="maximize")
    sweep.enqueue_recipe(outside, recipe, {**space, "data.image_size": CategoricalDistribution([24])})
    assert outside.trials == [] and "not all in the space (data.image_size=32)" in capsys.readouterr().out


@pytest.mark.slow  # trials, and for some a second Python process
def test_sweep_ranks_trials_draws_figures_writes_a_best_recipe_that_trains_and_continues(
        demo_dir: Path, tmp_path: Path, capsys) -> None:
    args = sweep_args(tmp_path, demo_dir, "--study", "s")
    table = sweep.main([*args, "--trials", "3"])
    assert table["rank"].tolist() == [1, 2, 3] and set(table["state"]) == {"complete"}
    assert table["submission_acc"].is_monotonic_decreasing and table["epochs"].eq(1).all()
    study_dir = tmp_path / "runs" / "sweeps" / "s"
    saved = pd.read_csv(study_dir / "trials.csv")
    assert saved["trial"].tolist() == table["trial"].tolist()
    assert {"model.lr", "model.model_kwargs.drop_rate", "data.image_size", "minutes", "run", "submission_acc",
            "images_acc"} <= set(saved.columns)
    for figure in ("history.png", "importances.png"):
        assert (study_dir / figure).read_bytes()[:4] == b"\x89PNG"
    for row in table.itertuples():  # each an ordinary run, scored as `make holdout` scores its submission
        run = tmp_path / "runs" / row.run
        scores = holdout.score_runs([run]).set_index(["tta", "prior"])["acc"]
        assert row.run == f"s-trial{row.trial}" and row.submission_acc == pytest.approx(scores[False, True])
        assert runs.read_summary(run)["best_val_acc"] == pytest.approx(row.images_acc)  # the images alone
    assert "make train CONFIG=" in capsys.readouterr().out

    best_yaml = study_dir / "best.yaml"
    best = yaml.safe_load(best_yaml.read_text())
    assert best["model"]["lr"] == pytest.approx(table["model.lr"][0])
    assert best["model"]["model_kwargs"] == {"widths": [8, 16, 32],  # TINY's, with the trial's dropout
                                             "drop_rate": pytest.approx(table["model.model_kwargs.drop_rate"][0])}
    assert best["run"] is None and best["trainer"]["max_epochs"] == 1
    train.main(["fit", "--config", str(best_yaml), "--runs_dir", str(tmp_path / "runs"), "--run", "best"])
    assert runs.read_summary(tmp_path / "runs" / "best")["best_val_acc"] is not None

    first = (tmp_path / "runs" / "s-trial0" / "checkpoints" / "best.ckpt").stat().st_mtime_ns
    assert len(sweep.main([*args, "--trials", "4"])) == 4  # the same command, one more result
    assert (tmp_path / "runs" / "s-trial0" / "checkpoints" / "best.ckpt").stat().st_mtime_ns == first
    report = sweep.main(["--trials", "0", "--study", "s", "--runs_dir", str(tmp_path / "runs")])
    assert len(report) == 4 and not (tmp_path / "runs" / "s-trial4").exists()
    with pytest.raises(errors.ConfigError, match="Study s was started with another recipe"):
        sweep.main([*args, "--trials", "5", "--trainer.max_epochs", "2"])
    with pytest.raises(errors.ConfigError, match="Study s scores its trials by the holdout accuracy of what "
                                                 "make predict submits.*--objective submission"):
        sweep.main([*args, "--trials", "5", "--objective", "images"])


def start_worker(args: list[str], cwd: Path, logs: Path) -> subprocess.Popen:
    """`make sweep` as a process of its own (to be killed, or to run beside another), output in `logs`."""
    logs.mkdir(parents=True, exist_ok=True)
    with (logs / "out").open("a") as out, (logs / "err").open("a") as err:
        return subprocess.Popen([sys.executable, "-m", "malaria.commands.sweep", *args], cwd=cwd, stdout=out,
                                stderr=err, env={**os.environ, "PYTHONPATH": str(REPO)})


def finish(workers: list[subprocess.Popen], timeout: float = 300) -> list[int]:
    """The workers' exit statuses; one still running after `timeout` is killed."""
    try:
        return [worker.wait(timeout=timeout) for worker in workers]
    finally:
        for worker in workers:
            worker.kill()


def stop_mid_trial(worker: subprocess.Popen, running: Callable[[], list[FrozenTrial]],
                   which: Callable[[FrozenTrial], bool], stop: signal.Signals = signal.SIGKILL) -> int | None:
    """Polls the study's running trials until one that `which` picks has finished an epoch, then sends
    `stop` to the worker; that trial's number, or None if the worker ended first."""
    deadline = time.time() + 300
    while time.time() < deadline and worker.poll() is None:
        time.sleep(0.2)
        try:
            mid_way = [t.number for t in running() if t.intermediate_values and which(t)]
        except KeyError:  # no study yet
            continue
        if mid_way:
            worker.send_signal(stop)  # SIGKILL: no handler runs, the heartbeat just stops; SIGINT: Ctrl-C
            return mid_way[0]
    return None


@pytest.mark.slow  # trials, and for some a second Python process
@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT], ids=["killed", "ctrl-c"])
def test_a_stopped_sweep_continues_where_it_stopped(demo_dir: Path, tmp_path: Path, stop: signal.Signals) -> None:
    args = sweep_args(tmp_path, demo_dir, "--study", "k", "--trials", "2", "--heartbeat", "1",
                      "--trainer.max_epochs", "12")  # long enough for the poller to catch trial 1 mid-way
    worker = start_worker(args, REPO, tmp_path / "worker")
    db = tmp_path / "runs" / "sweeps" / "k" / "study.db"

    def running() -> list[FrozenTrial]:
        with FileLock(f"{db}.lock"):  # as the worker creates the store's tables
            return load(tmp_path, "k").get_trials(states=(TrialState.RUNNING,))

    try:
        stopped = stop_mid_trial(worker, running, lambda t: t.number >= 1, stop)  # the 2nd trial
        worker.wait(timeout=120)
    finally:
        worker.kill()
    out, err = tmp_path / "worker" / "out", tmp_path / "worker" / "err"
    assert stopped is not None, err.read_text()[-3000:]
    if stop == signal.SIGINT:  # the worker reports and says how to go on
        assert worker.returncode == 130 and "rerun the same command to continue" in out.read_text()
        assert "Traceback" not in err.read_text(), err.read_text()[-3000:]
    else:
        time.sleep(3.5)  # past the dead trial's grace period: three missed heartbeats
    finished = load(tmp_path, "k").trials[0]
    assert finished.state == TrialState.COMPLETE

    table = sweep.main(args).set_index("trial")
    study = load(tmp_path, "k")
    assert study.trials[stopped].state == TrialState.FAIL  # marked failed, not counted
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2 and len(study.trials) == 3
    assert study.trials[0].datetime_complete == finished.datetime_complete  # kept, not rerun
    assert table.loc[stopped, "state"] == "fail" and table.loc[stopped, "rank"] == 3
    # A killed trial (its heartbeat stopped) is proposed once more; Ctrl-C is the user's own choice.
    retried = RETRY.retried_trial_number(study.trials[2]) == stopped
    assert retried == (stop == signal.SIGKILL)
    assert (study.trials[2].params == study.trials[stopped].params) == retried


def assert_shared_without_loss(study: optuna.Study, runs_dir: Path, trials: int) -> None:
    """Every trial of the study complete, each an ordinary run of its own, from both workers, no proposal
    drawn twice (the recipe's own values, enqueued by the worker that created the study, included), and at
    most one trial beyond `trials` (a worker finishes the trial it started)."""
    done = study.trials
    assert all(t.state == TrialState.COMPLETE for t in done)
    assert trials <= len(done) <= trials + 1
    assert len({t.user_attrs["worker"] for t in done}) == 2  # both workers ran trials
    assert len({tuple(t.params.values()) for t in done}) == len(done)
    assert done[0].params == {"model.lr": 0.003, "data.image_size": 32}  # the recipe's: TINY on default.yaml
    folders = {p.name for p in runs_dir.glob(f"{study.study_name}-trial*")}
    assert folders == {t.user_attrs["run"] for t in done}
    for t in done:
        assert t.user_attrs["run"] == f"{study.study_name}-trial{t.number}"
        summary = runs.read_summary(runs_dir / t.user_attrs["run"])
        assert summary["best_val_acc"] == pytest.approx(t.user_attrs["images_acc"])


def two_workers(args: list[str], cwd: Path, logs: Path) -> None:
    """The same `make sweep` twice, started together in `cwd`; both must end well."""
    results = run_commands([("malaria.commands.sweep", args, cwd)] * 2, logs, parallel=2)
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-3000:] + results[1].stderr[-3000:]


@pytest.mark.slow  # trials, and for some a second Python process
def test_two_workers_share_one_study_without_losing_or_repeating_a_trial(demo_dir: Path, tmp_path: Path) -> None:
    # Scored on the images alone (--objective images): each trial's score is its run's best val/acc.
    args = sweep_args(tmp_path, demo_dir, "--study", "w", "--trials", "4", "--objective", "images",
                      space=RECIPE_SPACE)
    two_workers(args, REPO, tmp_path / "logs")
    study = load(tmp_path, "w")
    assert_shared_without_loss(study, tmp_path / "runs", 4)
    assert all(t.value == t.user_attrs["images_acc"] for t in study.trials)


@pytest.fixture(scope="module")
def postgres_sweep(demo_dir: Path, postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two workers, started together in one working copy, sharing study `pg` on the PostgreSQL server. The
    recipe is a file of that copy (`--config recipe.yaml`), so a report elsewhere cannot read it."""
    copy = tmp_path_factory.mktemp("copy")
    (copy / "recipe.yaml").write_text((REPO / "configs" / "default.yaml").read_text())
    args = sweep_args(copy, demo_dir, "--study", "pg", "--trials", "4", "--storage", postgres_url,
                      space=RECIPE_SPACE)
    two_workers([*args, "--config", "recipe.yaml"], copy, copy / "logs")
    return copy


@pytest.mark.slow
def test_two_workers_share_one_study_on_a_postgresql_server(postgres_sweep: Path, postgres_url: str) -> None:
    study = optuna.load_study(study_name="pg", storage=postgres_url)
    assert_shared_without_loss(study, postgres_sweep / "runs", 4)
    assert all(t.value == t.user_attrs["submission_acc"] for t in study.trials)  # the default objective


@pytest.mark.slow
def test_the_report_is_rebuilt_from_the_server_alone_in_another_folder(
        postgres_sweep: Path, postgres_url: str, tmp_path: Path) -> None:
    copy = postgres_sweep
    report_only = ["--study", "pg", "--storage", postgres_url, "--trials", "0"]
    (result,) = run_commands([("malaria.commands.sweep", report_only, tmp_path)], tmp_path / "logs")
    assert result.returncode == 0, result.stderr[-3000:]
    here, there = tmp_path / "runs" / "sweeps" / "pg", copy / "runs" / "sweeps" / "pg"
    assert pd.read_csv(here / "trials.csv").equals(pd.read_csv(there / "trials.csv"))
    assert (here / "best.yaml").read_text() == (there / "best.yaml").read_text()  # no recipe file here
    assert (here / "history.png").exists() and (here / "importances.png").exists()
    assert not (tmp_path / "runs" / "pg-trial0").exists()  # trial folders stay where they ran


@pytest.mark.slow  # trials, in two more Python processes
def test_a_killed_workers_trial_is_failed_by_its_heartbeat_and_rerun_by_the_other(
        demo_dir: Path, postgres_url: str, tmp_path: Path) -> None:
    # Trials of about 4 s, longer than the grace period of 3 s: after the kill the other worker starts a
    # trial once the grace is over, fails the dead one there and runs it again.
    args = sweep_args(tmp_path, demo_dir, "--study", "kill", "--trials", "4", "--storage", postgres_url,
                      "--heartbeat", "1", "--trainer.max_epochs", "4")
    victim, survivor = [start_worker(args, REPO, tmp_path / f"worker{i}") for i in range(2)]
    try:
        killed = stop_mid_trial(
            victim, lambda: load(tmp_path, "kill", postgres_url).get_trials(states=(TrialState.RUNNING,)),
            lambda t: t.user_attrs.get("worker", "").endswith(f":{victim.pid}"))
    finally:
        victim.kill()
    assert killed is not None, (tmp_path / "worker0" / "err").read_text()[-3000:]
    assert finish([survivor]) == [0], (tmp_path / "worker1" / "err").read_text()[-3000:]
    trials = load(tmp_path, "kill", postgres_url).trials
    assert trials[killed].state == TrialState.FAIL
    (rerun,) = [t for t in trials if RETRY.retried_trial_number(t) == killed]
    assert rerun.state == TrialState.COMPLETE and rerun.params == trials[killed].params
    assert rerun.user_attrs["worker"].endswith(f":{survivor.pid}")
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) >= 4  # nothing else lost


@pytest.mark.slow  # a W&B service start-up
def test_a_trial_below_the_median_is_pruned_by_epoch_and_logged_in_the_study_group(
        no_key: None, demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    args = sweep_args(tmp_path, demo_dir, "--study", "p", "--trials", "4", "--trainer.max_epochs", "3",
                      "--wandb.mode", "offline")
    space = search_space.load(tmp_path / "space.yaml")
    (tmp_path / "runs" / "sweeps" / "p").mkdir(parents=True)
    study = optuna.create_study(study_name="p", direction="maximize",
                                storage=f"sqlite:///{tmp_path}/runs/sweeps/p/study.db")
    for lr in (1e-3, 2e-3, 3e-3):  # a history no real trial can match: val/acc 2 at every epoch
        study.add_trial(optuna.trial.create_trial(
            params={"model.lr": lr, "model.model_kwargs.drop_rate": 0.1, "data.image_size": 24},
            distributions=space, value=2.0, intermediate_values={0: 2.0, 1: 2.0, 2: 2.0}))
    try:
        table = sweep.main(args)
    finally:
        wandb.teardown()
    trial = load(tmp_path, "p").trials[3]
    assert trial.state == TrialState.PRUNED and sorted(trial.intermediate_values) == [0, 1]  # after epoch 2
    assert table["state"].tolist() == ["complete"] * 3 + ["pruned"]
    run = tmp_path / "runs" / "p-trial3"
    assert (run / "checkpoints" / "best.ckpt").exists() and not (run / "summary.json").exists()
    assert wandb.run is None  # closed, so the next trial's logger starts its own run
    (log,) = run.glob("wandb/offline-run-*-p-trial3/run-p-trial3.wandb")
    (record,) = [r.run for r in read_wandb_log(log) if r.WhichOneof("record_type") == "run"]
    assert (record.run_id, record.run_group) == ("p-trial3", "p")


@pytest.mark.slow  # a trial
def test_successive_halving_stops_a_trial_at_its_first_rung_where_the_median_rule_would_wait(
        demo_dir: Path, tmp_path: Path) -> None:
    args = sweep_args(tmp_path, demo_dir, "--study", "h", "--trials", "3", "--trainer.max_epochs", "4",
                      "--pruner", "halving")
    space = search_space.load(tmp_path / "space.yaml")
    (tmp_path / "runs" / "sweeps" / "h").mkdir(parents=True)
    study = optuna.create_study(study_name="h", direction="maximize",
                                pruner=studies.make_pruner("halving", 4),
                                storage=f"sqlite:///{tmp_path}/runs/sweeps/h/study.db")

    def unbeatable(trial: optuna.Trial) -> float:  # reports through the pruner, as a worker's trial does
        for key, dist in space.items():
            search_space.suggest(trial, key, dist)
        for epoch in range(4):
            trial.report(2.0, epoch)
            trial.should_prune()
        return 2.0

    study.optimize(unbeatable, n_trials=2)  # two trials: too few for the median rule (three)
    sweep.main(args)
    trial = load(tmp_path, "h").trials[2]
    assert trial.state == TrialState.PRUNED and sorted(trial.intermediate_values) == [0, 1]  # after epoch 2


def test_the_budget_bounds_the_sweep_and_cuts_its_last_trial_short(demo_dir: Path, tmp_path: Path) -> None:
    args = sweep_args(tmp_path, demo_dir, "--study", "b", "--trials", "3", "--budget", "0.05",
                      "--trainer.max_epochs", "500")
    table = sweep.main(args)
    (trial,) = load(tmp_path, "b").trials  # no second trial once the 3 s are spent
    assert len(trial.intermediate_values) < 500 and len(table) == 1  # Lightning's max_time stopped it
    assert trial.state in (TrialState.COMPLETE, TrialState.FAIL)  # FAIL: stopped before a validation
