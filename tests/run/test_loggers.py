"""Loggers: modes, the W&B logger's identity, and what an offline W&B run really writes.

W&B never goes online here: runs are offline, into a temporary folder, and the test reads back
the run's transaction log (`run-<id>.wandb`) to check the config, metrics and media it holds.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from runner import REPO, run_commands
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from conftest import read_wandb_log

from malaria.run import run_dirs
from malaria.run import loggers
from malaria.commands import train
from malaria.data.datamodule import MalariaDataModule
from malaria.model.classifier import MalariaClassifier
from malaria.evaluation.run_report import RunReport

TINY = [
    "--config", "configs/default.yaml",
    "--trainer.max_epochs", "1",
    "--trainer.limit_train_batches", "3",
    "--trainer.enable_model_summary", "false",
    "--data.image_size", "32",
    "--data.batch_size", "16",
    "--data.num_workers", "0",
    "--model.model_kwargs", '{"widths": [8, 16, 32]}',
    "--wandb.mode", "offline",
]


def test_auto_is_offline_without_a_key_and_says_so(no_key: None, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="malaria.run.loggers"):
        assert loggers.resolve_mode("auto") == "offline"
    assert "wandb sync" in caplog.text


def test_auto_is_online_with_a_key(no_key: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert loggers.resolve_mode("auto") == "online"


@pytest.mark.parametrize(("env", "expected"),
                         [("disabled", "disabled"), ("dryrun", "offline"), ("run", "online")])
def test_wandb_mode_environment_overrides_the_config(no_key: None, monkeypatch: pytest.MonkeyPatch, env: str,
                                                     expected: str) -> None:
    monkeypatch.setenv("WANDB_MODE", env)
    assert loggers.resolve_mode("online") == expected


def test_unknown_mode_is_a_clear_error(no_key: None) -> None:
    with pytest.raises(ValueError, match="wandb mode must be one of"):
        loggers.resolve_mode("sometimes")


def test_loggers_csv_always_wandb_named_like_the_run(no_key: None, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loggers, "server_unreachable", lambda: None)  # a reachable server, not the network
    (only,) = loggers.make_loggers(tmp_path, "r1", "disabled", "p")
    assert isinstance(only, CSVLogger)
    csv, wandb_logger = loggers.make_loggers(tmp_path, "r1", "offline", "p")
    assert isinstance(csv, CSVLogger) and Path(csv.log_dir) == tmp_path
    assert isinstance(wandb_logger, WandbLogger)
    # Lightning's `name` is the project; the run's display name is checked in the offline run below.
    assert (wandb_logger.name, wandb_logger.version, wandb_logger.save_dir) == ("p", "r1", str(tmp_path))
    online = loggers.make_wandb_logger(tmp_path, "r1", "online", "p")
    # Checkpoints are uploaded as artifacts online only (Lightning refuses log_model offline).
    assert online._log_model is True and wandb_logger._log_model is False


@pytest.mark.slow  # one W&B service start-up: ~5 s
def test_wandb_starts_quietly_before_the_run_directory_exists(no_key: None, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capfd: pytest.CaptureFixture) -> None:
    import wandb

    monkeypatch.setenv("WANDB_SILENT", "false")  # the suite's default would hide the warning
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)  # a clone of the project
    run_dir = Path("runs") / "quiet"  # as at the start of a run: relative, and not created yet
    try:
        loggers.make_wandb_logger(run_dir, "quiet", "offline", "p").experiment
    finally:
        wandb.finish()
        wandb.teardown()
    assert "git root" not in capfd.readouterr().err


def summarise(records: list) -> dict:
    """Run id/name, config (top-level key -> value), history keys, summary keys, all records."""
    out = {"run": None, "config": {}, "history": set(), "summary": set(), "records": records}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run"] = (record.run.run_id, record.run.display_name)
            out["commit"] = record.run.git.commit
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in record.config.update if i.key})
        elif kind == "history":
            out["history"] |= {i.key or "/".join(i.nested_key) for i in record.history.item}
        elif kind == "summary":
            out["summary"] |= {i.key or "/".join(i.nested_key) for i in record.summary.update}
    return out


def fit_offline(*args: str) -> None:
    """`malaria.commands.train` with the W&B config callback (the wiring train.main is to get)."""
    try:
        train.MalariaCLI(MalariaClassifier, MalariaDataModule, save_config_callback=loggers.WandbSaveConfig,
                         save_config_kwargs={"overwrite": True}, args=["fit", *args])
    finally:
        import wandb

        wandb.finish()  # the next run must not reuse this one
        wandb.teardown()  # stops W&B's service process, which writes out the offline files


@pytest.mark.slow  # two tiny fits and two W&B service start-ups: ~15 s
def test_offline_run_holds_config_metrics_report_and_resumes_the_same_run(
        no_key: None, demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")  # WandbLogger rewrites it; monkeypatch restores it
    run = tmp_path / "runs" / "wb"
    fit_offline(*TINY, "--data.data_dir", str(demo_dir), "--runs_dir", str(tmp_path / "runs"), "--run", "wb")

    (first,) = run.glob("wandb/offline-run-*-wb")
    logged = summarise(read_wandb_log(first / "run-wb.wandb"))
    assert logged["run"] == ("wb", "wb")
    assert logged["commit"] == run_dirs.git_commit()
    assert logged["config"]["cli"]["trainer"]["max_epochs"] == 1  # the full resolved CLI config
    assert logged["config"]["cli"]["model"]["model"] == "malaria_cnn"
    assert logged["config"]["lr"] == pytest.approx(0.003)  # Lightning's own hyperparameter logging
    figures = {f"report/{name}" for name in ("learning_curves", "confusion_matrix", "roc_pr", "mistakes",
                                             "gradcam", "filters")}
    expected = {"train/loss_epoch", "val/acc", "val/auroc", "trainer/global_step", "report/val_samples",
                "report/confusion_matrix_chart_table"}
    media_keys = {key.removesuffix("/_type") for key in logged["history"] if key.endswith("/_type")}
    assert expected | figures <= logged["history"] | media_keys
    assert {"best/val_acc", "best/val_auroc", "best/val_mistakes"} <= logged["summary"]
    media = first / "files" / "media"
    assert {p.name.split("_")[0] for p in media.glob("images/report/*.png")} >= {"gradcam", "mistakes", "roc"}
    (table,) = media.glob("table/report/val_samples_*.table.json")
    content = json.loads(table.read_text())
    assert content["columns"] == ["id", "image", "label", "prediction", "p_parasitized", "correct"]
    shown = len(content["data"])
    assert 0 < shown <= RunReport().wandb_samples
    # The cells' images travel in the table's artifact, uploaded by `wandb sync`.
    (samples,) = [r.artifact for r in logged["records"] if r.WhichOneof("record_type") == "artifact"
                  and "val_samples" in r.artifact.name]
    assert sum(entry.path.endswith(".png") for entry in samples.manifest.contents) == shown

    fit_offline("--config", str(run / "config.yaml"), "--runs_dir", str(tmp_path / "runs"),
                "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--trainer.max_epochs", "2")
    sessions = sorted(run.glob("wandb/offline-run-*-wb"))
    assert len(sessions) == 2  # W&B keeps one folder per offline session, under the same run id
    assert summarise(read_wandb_log(sessions[-1] / "run-wb.wandb"))["run"] == ("wb", "wb")


# ----------------------------------------------------------------------------------------------
# Tracking degrades, never fails (issue 31): a key with no reachable server logs offline


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on: bound by the OS, then released."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def unreachable_server(no_key: None, monkeypatch: pytest.MonkeyPatch) -> str:
    """A (fake) API key and a W&B server URL that refuses every connection: never a real host."""
    url = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", url)
    return url


def test_an_unreachable_server_is_detected_quickly(unreachable_server: str) -> None:
    started = time.monotonic()
    assert loggers.server_unreachable() == f"{unreachable_server}: ConnectionError"
    assert time.monotonic() - started < loggers.REACH_SECONDS


@pytest.mark.slow  # one tiny fit in a child process, one W&B service start-up: ~20 s
def test_a_run_with_an_unreachable_server_trains_on_offline(
        unreachable_server: str, demo_dir: Path, tmp_path: Path) -> None:
    runs_dir = tmp_path / "runs"
    started = time.monotonic()
    (result,) = run_commands([("malaria.commands.train", ["fit", *TINY, "--data.data_dir", str(demo_dir), "--runs_dir",
                                                 str(runs_dir), "--run", "wb", "--wandb.mode", "online"], REPO)],
                             tmp_path / "logs", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert time.monotonic() - started < 240  # wandb.init alone retried an unreachable server for 106 s
    run = runs_dir / "wb"
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "metrics.csv").is_file()
    (offline,) = run.glob("wandb/offline-run-*-wb")
    assert (offline / "run-wb.wandb").is_file()
    (notice,) = [line for line in result.stderr.splitlines() if "cannot reach the server" in line]
    assert unreachable_server in notice and "wandb sync" in notice
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # two W&B service start-ups: ~10 s
def test_a_run_wandb_refuses_online_starts_offline(no_key: None, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """The server answers but wandb.init fails (an expired key, a server error): offline all the same."""
    import wandb

    monkeypatch.setattr(loggers, "server_unreachable", lambda: None)
    init = wandb.init
    calls = []

    def refused_online(**kwargs):
        calls.append(os.environ.get("WANDB_MODE"))
        if len(calls) == 1:
            raise wandb.errors.CommError("Failed to get resume status for run r1: context deadline exceeded")
        return init(**kwargs)

    monkeypatch.setattr(wandb, "init", refused_online)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    logger = loggers.make_wandb_logger(tmp_path, "r1", "online", "p")
    try:
        with caplog.at_level(logging.WARNING, logger="malaria.run.loggers"):
            run = logger.experiment
        assert run.offline and logger._log_model is False
    finally:
        wandb.finish()
        wandb.teardown()
    assert calls == [None, "dryrun"]  # once online, then offline as Lightning spells it
    assert "CommError: Failed to get resume status" in caplog.text
    assert list(tmp_path.glob("wandb/offline-run-*-r1"))
