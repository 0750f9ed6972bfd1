"""Out of space is an error, not damage (issue 31): a write that fails with ENOSPC or on a read-only
folder stops the verb with one `error:` paragraph naming the file and about how much it needs, and
leaves every file written before as it was.

The full disk is injected at the lowest write points (fsync, posix_fallocate) in child processes, by
tests/faults/sitecustomize.py; and, where this process may mount one (root in a container that
allows it), it is real: a size-capped tmpfs under the run folder, which also reaches the files
Lightning writes itself (config.yaml, hparams.yaml, metrics.csv)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from runner import REPO, assert_one_paragraph, run_commands, snapshot
from conftest import TINY

from malaria.common import atomic
from malaria.common import errors
from malaria.commands import leaderboard
from malaria.commands import predict
from malaria.commands import train

FAULTS = Path(__file__).resolve().parents[1] / "faults"
# Each faulty command runs in its own folder (where its FULL_DISK file is): the recipe by its full path.
TINY_ANYWHERE = [str(REPO / arg) if arg.startswith("configs/") else arg for arg in TINY]


def test_a_full_disk_is_a_write_error_naming_the_file_and_leaving_the_old_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = atomic.write_text(tmp_path / "summary.json", "the old one")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(errors.WriteError, match=rf"cannot write {path}: No space left on device \(it needs about "
                                               r"1 KiB, [0-9.]+ [KMG]iB free there\)"):
        atomic.write_text(path, "the new one, longer")
    assert path.read_text() == "the old one" and os.listdir(tmp_path) == ["summary.json"]


def test_a_read_only_folder_is_a_write_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path))

    monkeypatch.setattr(atomic.tempfile, "NamedTemporaryFile", read_only)
    with pytest.raises(errors.WriteError, match=rf"cannot write {tmp_path / 'a.csv'}: Read-only file system"):
        atomic.write_text(tmp_path / "a.csv", "x")


def test_a_figure_is_saved_whole_or_not_at_all_and_closed(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure
    from PIL import Image

    figure, _ = plt.subplots(figsize=(2, 1))
    path = atomic.save_figure(figure, tmp_path / "plot.png", dpi=50)
    assert Image.open(path).size == (100, 50) and not plt.fignum_exists(figure.number)
    drawn = path.read_bytes()

    def fails(self: Figure, *args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug while drawing")

    monkeypatch.setattr(Figure, "savefig", fails)
    figure, _ = plt.subplots()
    with pytest.raises(RuntimeError, match="a bug while drawing"):
        atomic.save_figure(figure, path)
    assert path.read_bytes() == drawn and os.listdir(tmp_path) == ["plot.png"]
    assert not plt.fignum_exists(figure.number)  # closed on failure too


@pytest.fixture(scope="module")
def workspace(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's folder: the competition with its decoded cache, a finished run with its report, a
    submission and the upload history."""
    root = tmp_path_factory.mktemp("workspace")
    # without the shared demo folder's caches: other tests may have decoded the size the cache case must write
    data = Path(shutil.copytree(demo_dir, root / "data", ignore=shutil.ignore_patterns(".cache")))
    train.main(["fit", *TINY, "--data.data_dir", str(data), "--runs_dir", str(root / "runs"), "--run", "tiny",
                "--trainer.enable_progress_bar", "false"])
    shutil.copytree(root / "runs" / "tiny", root / "runs" / "copy")  # the run that resumes
    submission = root / "submissions" / "old.csv"
    predict.main(["--run", str(root / "runs" / "tiny"), "--out", str(submission)])
    leaderboard.main(["submit", "--file", str(submission), "--dry_run", "--data.data_dir", str(data),
                      "--history", str(root / "submissions" / "history.csv"), "--competition", "x"])
    return root


@pytest.mark.slow  # five verbs in child processes: ~60 s
def test_each_write_on_a_full_disk_stops_with_one_paragraph_and_changes_nothing(workspace: Path,
                                                                                tmp_path: Path) -> None:
    data, run, copy = workspace / "data", workspace / "runs" / "tiny", workspace / "runs" / "copy"
    submissions = workspace / "submissions"
    verbs = {  # name: (what to fail, the command)
        "checkpoint": (".ckpt", "malaria.commands.train", ["fit", "--config", str(copy / "config.yaml"), "--run", "copy",
                                                  "--ckpt_path", str(copy / "checkpoints" / "last.ckpt"),
                                                  "--trainer.max_epochs", "2"]),
        "cache": (".npy", "malaria.commands.train", ["fit", *TINY_ANYWHERE, "--data.data_dir", str(data), "--data.image_size", "24",
                                            "--runs_dir", str(tmp_path / "runs"), "--run", "new"]),
        "report": ("report.md", "malaria.commands.report", ["--run", str(run)]),
        "submission": ("new.csv", "malaria.commands.predict", ["--run", str(run), "--out", str(submissions / "new.csv")]),
        "history": ("history.csv", "malaria.commands.leaderboard", ["submit", "--file", str(submissions / "old.csv"),
                                                           "--dry_run", "--data.data_dir", str(data), "--history",
                                                           str(submissions / "history.csv"), "--competition", "x"]),
    }
    kept = [run / "checkpoints", copy / "checkpoints", data / ".cache", submissions]
    before = {folder: snapshot(folder) for folder in kept}
    report = (run / "report.md").read_bytes()
    commands = []
    for name, (target, module, args) in verbs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "FULL_DISK").write_text(target)
        commands.append((module, args, tmp_path / name))
    results = dict(zip(verbs, run_commands(commands, tmp_path / "logs", timeout=500, pythonpath=(FAULTS,))))

    messages = {name: assert_one_paragraph(results[name], "cannot write", "No space left on device", "free there")
                for name in verbs}
    assert str(copy / "checkpoints") in messages["checkpoint"] and "needs about" in messages["checkpoint"]
    assert str(data / ".cache") in messages["cache"] and ".npy" in messages["cache"]
    assert "needs about" in messages["cache"]
    assert str(run / "report.md") in messages["report"]
    assert str(submissions / "new.csv") in messages["submission"]
    assert str(submissions / "history.csv") in messages["history"]
    assert {folder: snapshot(folder) for folder in kept} == before
    assert (run / "report.md").read_bytes() == report
    print("\n".join(f"{name}: {message}" for name, message in messages.items()))


@contextmanager
def small_filesystem(path: Path, kib: int) -> Iterator[Path]:
    """A real file system of `kib` KiB mounted at `path` (tmpfs, 4 KiB pages), or the test skips."""
    path.mkdir(parents=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mount.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.slow  # five short trainings in child processes: ~60 s
def test_a_run_on_a_real_full_disk_stops_at_the_file_it_could_not_write(demo_dir: Path, tmp_path: Path) -> None:
    # Each run's folder lies on a file system of one to four pages (the first with its page taken),
    # so each stops at a later file: the first files every run writes are a page each.
    sizes = {"none-free": (4, 1), "one-page": (4, 0), "two-pages": (8, 0), "three-pages": (12, 0),
             "four-pages": (16, 0)}  # name: (KiB, bytes of a file taking space first)
    with ExitStack() as mounts:
        commands = []
        for name, (kib, taken) in sizes.items():
            disk = mounts.enter_context(small_filesystem(tmp_path / name, kib))
            if taken:
                (disk / "taken").write_bytes(b"x" * taken)
            commands.append(("malaria.commands.train", ["fit", *TINY_ANYWHERE, "--data.data_dir", str(demo_dir),
                                                        "--runs_dir", str(disk), "--run", "t"], tmp_path))
        results = run_commands(commands, tmp_path / "logs", timeout=500)
    stopped_at = []
    for name, result in zip(sizes, results):
        message = assert_one_paragraph(result, f"cannot write {tmp_path / name / 't'}/", "No space left on device")
        stopped_at.append(Path(re.search(r"cannot write (\S+): ", message)[1]).name)
    # Lightning's own writes among them, each named as the project's atomic writes are.
    assert {"config.yaml", "hparams.yaml", "metrics.csv"} <= set(stopped_at), stopped_at
    assert len(set(stopped_at)) == len(sizes), stopped_at  # every page further, a later file
