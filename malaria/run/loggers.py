"""Experiment loggers: a CSV file always, Weights & Biases when it is not switched off.

W&B runs offline unless the user has an API key, so training never needs the network; an
offline run is uploaded later with `wandb sync runs/<name>/wandb/offline-run-*`. The W&B run's
name and id are the run directory's name, so a resumed run continues the same W&B run online.
(W&B cannot resume offline: each offline session gets its own `offline-run-*` folder, same id.)

Tracking degrades, it never stops a run: with a key but no reachable server (no network, a firewall,
a server down), the run says so in one line and logs offline, to be synced later. The CSV log
never depends on W&B.
"""

from __future__ import annotations

import csv
import logging
import netrc
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import requests
import yaml
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from malaria.common.atomic import reported_as

log = logging.getLogger(__name__)

MODES = ("auto", "online", "offline", "disabled")
# Older spellings that wandb still accepts in WANDB_MODE; Lightning's WandbLogger itself sets
# WANDB_MODE=dryrun for an offline run, so a second run in the same process reads that.
ALIASES = {"dryrun": "offline", "run": "online"}
# How long the server may take to answer before a run logs offline instead. wandb.init itself
# retries an unreachable server for 40 s or more whatever its init_timeout (wandb 0.31), and then
# fails the run; this answer bounds the wait and lets the run go on.
REACH_SECONDS = 10.0


def has_wandb_key() -> bool:
    """An API key in the environment or in ~/.netrc (where `wandb login` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    """`auto` becomes online with a key and offline without; WANDB_MODE overrides the config."""
    mode = os.environ.get("WANDB_MODE", mode)
    mode = ALIASES.get(mode, mode)
    if mode not in MODES:
        raise ValueError(f"wandb mode must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        mode = "online" if has_wandb_key() else "offline"
        if mode == "offline":
            log.warning("W&B: no API key found, logging offline (sync later with `wandb sync`). "
                        "Set WANDB_MODE=disabled to turn it off.")
    return mode


class _AppendingWriter(ExperimentWriter):
    """Lightning's writer deletes an existing metrics.csv; a resumed run appends to it instead.
    A full disk under either of its files is one error naming the file, not a traceback."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])

    def log_hparams(self, params: dict[str, Any]) -> None:
        with reported_as(Path(self.log_dir) / self.NAME_HPARAMS_FILE):
            super().log_hparams(params)

    def save(self) -> None:
        with reported_as(Path(self.metrics_file_path)):
            super().save()


class ResumableCSVLogger(CSVLogger):
    """CSVLogger that keeps the metrics of the epochs before an interruption."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def server_unreachable(timeout: float = REACH_SECONDS) -> str | None:
    """Why W&B's server (WANDB_BASE_URL or the host of `wandb login`) cannot be reached, or None.

    Any HTTP answer, an error status included, means the server is there: what follows is W&B's
    business. Only a failure to connect or to answer in time counts."""
    import wandb

    # Settings read as wandb.init reads them, without wandb.setup(), which would fix this process's
    # W&B mode before Lightning can switch it to offline.
    settings = wandb.Settings()
    settings.update_from_system_settings()
    settings.update_from_env_vars(dict(os.environ))
    url = settings.base_url
    try:
        requests.head(url, timeout=timeout, allow_redirects=False)
    except requests.RequestException as err:
        reason = f"no answer within {timeout:.0f} s" if isinstance(err, requests.Timeout) else type(err).__name__
        return f"{url}: {reason}"
    return None


def offline_notice(run_dir: Path, reason: str) -> None:
    """The one line a run prints when it falls back to offline logging."""
    log.warning(f"W&B: cannot reach the server ({reason}); logging offline into {run_dir}/wandb/ "
                f"and training on. Upload later with `wandb sync {run_dir}/wandb/offline-run-*`.")


class FallbackWandbLogger(WandbLogger):
    """A WandbLogger whose run, if wandb.init fails online, is started offline instead.

    `server_unreachable` catches the common case before training starts; this catches a server
    that answers but refuses or drops the run (an expired key, a server error) when Lightning
    first touches the experiment."""

    @property
    @rank_zero_experiment
    def experiment(self):  # noqa: ANN201 (wandb's Run, imported lazily as Lightning does)
        try:
            return super().experiment
        except Exception as err:  # wandb raises CommError, AuthenticationError, UsageError, ...
            if self._offline:  # nothing left to fall back to
                raise
            import wandb

            wandb.teardown()  # the failed online run still holds its id in W&B's service process
            offline_notice(Path(self.save_dir), f"{type(err).__name__}: {' '.join(str(err).split())[:200]}")
            self._offline, self._log_model = True, False
            return super().experiment


def make_wandb_logger(run_dir: Path, run_name: str, wandb_mode: str, project: str,
                      group: str | None = None) -> WandbLogger | None:
    """A W&B logger writing under run_dir/wandb/, in W&B's `group` if one is given, or None when W&B
    is disabled.

    Online, the best and last checkpoints are uploaded as a model artifact at the end of training."""
    mode = resolve_mode(wandb_mode)
    if mode == "disabled":
        return None
    if mode == "online" and (reason := server_unreachable()) is not None:
        offline_notice(run_dir, reason)
        mode = "offline"
    # W&B looks for the git repository from save_dir, which does not exist yet when it starts
    # ("git root ... does not exist"): the code's commit is that of the working directory, as in
    # environment.json.
    return FallbackWandbLogger(
        name=run_name, id=run_name, project=project, group=group, save_dir=str(run_dir),
        offline=mode == "offline", resume="allow", log_model=mode == "online",
        settings={"git_root": os.getcwd()},
    )


def make_loggers(run_dir: Path, run_name: str, wandb_mode: str, project: str,
                 group: str | None = None) -> list[Logger]:
    """CSV metrics in run_dir/metrics.csv, plus a W&B run named and identified like the run dir."""
    loggers: list[Logger] = [ResumableCSVLogger(save_dir=run_dir, name="", version="")]
    wandb_logger = make_wandb_logger(run_dir, run_name, wandb_mode, project, group)
    if wandb_logger is not None:
        loggers.append(wandb_logger)
    return loggers


def find_wandb_logger(loggers: Iterable[Logger]) -> WandbLogger | None:
    return next((lg for lg in loggers if isinstance(lg, WandbLogger)), None)


def finish_wandb(loggers: Iterable[Logger]) -> None:
    """Close the W&B run so its files are complete and a next run in this process starts fresh
    (WandbLogger reuses any run still open in the process)."""
    if find_wandb_logger(loggers) is not None:
        import wandb

        wandb.finish()


class WandbSaveConfig(SaveConfigCallback):
    """Saves config.yaml like LightningCLI does, and logs the full resolved config (trainer,
    callbacks, model, data, seed) to W&B under `cli`: Lightning itself logs only the
    hyperparameters of the model and the data module."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        with reported_as(Path(trainer.log_dir or ".") / self.config_filename):
            super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        wandb_logger = find_wandb_logger(trainer.loggers)
        if wandb_logger is not None:
            config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
            wandb_logger.log_hyperparams({"cli": config})
