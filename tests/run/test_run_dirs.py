"""Run folders: their names, the latest finished run, a run's checkpoints and records."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from malaria.common import errors
from malaria.run import run_dirs


def finished(runs: Path, name: str, mtime: int) -> Path:
    best = runs / name / "checkpoints" / "best.ckpt"
    best.parent.mkdir(parents=True)
    best.write_bytes(b"weights")
    os.utime(best, (mtime, mtime))
    return runs / name


def test_a_run_is_named_after_its_recipe_and_the_time() -> None:
    assert re.fullmatch(r"gpu-\d{8}-\d{6}", run_dirs.new_run_name("configs/gpu.yaml"))
    assert re.fullmatch(r"run-cv-\d{8}-\d{6}", run_dirs.new_run_name(None, "cv"))


def test_the_latest_run_is_the_newest_with_a_best_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(errors.MissingError, match="No trained run in"):
        run_dirs.latest_run(tmp_path)
    finished(tmp_path, "old", 1_000)
    newest = finished(tmp_path, "new", 2_000)
    (tmp_path / "unfinished" / "checkpoints").mkdir(parents=True)  # killed before its first epoch ended
    assert run_dirs.latest_run(tmp_path) == newest


def test_a_missing_checkpoint_is_the_users_error(tmp_path: Path) -> None:
    run = finished(tmp_path, "r", 1_000)
    assert run_dirs.checkpoint(run) == run / "checkpoints" / "best.ckpt"
    with pytest.raises(errors.MissingError, match="has no checkpoints/last.ckpt"):
        run_dirs.checkpoint(run, "last")


def test_records_are_json_written_whole(tmp_path: Path) -> None:
    assert run_dirs.read_summary(tmp_path) == {}
    run_dirs.write_json(tmp_path / "summary.json", {"best": 0.97, "where": tmp_path})
    assert run_dirs.read_summary(tmp_path) == {"best": 0.97, "where": str(tmp_path)}
    environment = run_dirs.environment()
    assert set(environment) == {"python", "platform", "git_commit", "packages"}
    assert environment["packages"]["torch"]  # the versions that reproduce the run
