"""Run directories: `runs/<name>/` holds a run's config, metrics, checkpoints and summary."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from malaria.common import atomic
from malaria.common.errors import MissingError

RUNS_DIR = Path("runs")
PACKAGES = ("torch", "torchvision", "lightning", "timm", "albumentations", "torchmetrics", "numpy", "wandb")


def new_run_name(config_path: str | None, tag: str = "", stamp: str | None = None) -> str:
    """`<recipe>[-<tag>]-<stamp>`, e.g. `default-20261122-221500`: the stamp is the time unless given
    (a launcher's job id, which every process of one training shares)."""
    recipe = Path(config_path).stem if config_path else "run"
    return "-".join(filter(None, [recipe, tag, stamp or time.strftime("%Y%m%d-%H%M%S")]))


def write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic.write_text(path, json.dumps(payload, indent=2, default=str) + "\n")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def environment() -> dict[str, Any]:
    """What reproduces a run besides its config: package versions, git commit, machine."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": platform.python_version(), "platform": platform.platform(), "git_commit": git_commit(),
            "packages": versions}


CHECKPOINTS = ("best", "last")


def checkpoint(run_dir: Path, which: str = "best") -> Path:
    """A run's `best.ckpt` (its best holdout epoch; the latest epoch in a full fit) or `last.ckpt`
    (its latest weights: the final ones once training has finished)."""
    path = run_dir / "checkpoints" / f"{which}.ckpt"
    if not path.exists():
        raise MissingError(f"{run_dir} has no checkpoints/{which}.ckpt: did its training finish an epoch?")
    return path


def latest_run(runs_dir: Path = RUNS_DIR) -> Path:
    """The most recently modified run that has a best checkpoint."""
    runs = [p.parent.parent for p in runs_dir.glob("*/checkpoints/best.ckpt")]
    if not runs:
        raise MissingError(f"No trained run in {runs_dir}/: run `make train` first.")
    return max(runs, key=lambda p: (p / "checkpoints" / "best.ckpt").stat().st_mtime)


def read_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}
