"""Preemption (issue 31): SIGTERM or Ctrl-C mid-epoch saves last.ckpt at that moment, through the atomic
path, and exits with one line naming the resume command; the resumed run ends with the weights of an
uninterrupted one, as after kill -9 (tests/run/test_resume.py, whose tiny recipe and runs these reuse)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from test_resume import (  # noqa: F401 (recipe and straight are fixtures)
    assert_same_weights,
    fit_args,
    kill_when,
    load,
    recipe,
    steps_per_epoch,
    straight,
)

from malaria.commands import train
from malaria.run.preemption import SaveOnPreemption, Stop, preempted


def stop_mid_epoch(sig: signal.Signals, recipe: Path, demo_dir: Path, folder: Path, per_epoch: int,
                   times: int = 1) -> tuple[Path, str]:
    """Train in a child process and send it `sig` during epoch 1; the run and what it printed."""
    run = folder / "stopped"
    log = folder / "stopped.log"
    kill_when([sys.executable, "-m", "malaria.commands.train", *fit_args(recipe, demo_dir, folder, "stopped")],
              run / "checkpoints" / "last.ckpt", lambda step: per_epoch < step < 2 * per_epoch, log, sig, times)
    return run, log.read_text()


def test_sigterm_mid_epoch_saves_the_moment_and_resumes_to_identical_weights(
        straight: Path, recipe: Path, demo_dir: Path, tmp_path: Path) -> None:
    per_epoch = steps_per_epoch(straight)
    run, output = stop_mid_epoch(signal.SIGTERM, recipe, demo_dir, tmp_path, per_epoch)
    last = run / "checkpoints" / "last.ckpt"
    saved = load(last)["global_step"]
    assert per_epoch < saved < 2 * per_epoch
    # The line names the step the signal stopped at, and last.ckpt holds that very step.
    (line,) = [line for line in output.splitlines() if line.startswith("stopped by")]
    assert line == (f"stopped by SIGTERM at epoch 1, step {saved}; saved {last}; "
                    f"resume with `make train RESUME={run}`")
    assert "Traceback" not in output and not (run / "summary.json").exists()

    # What `make train RESUME=<run>` runs.
    train.main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", str(last)])
    assert_same_weights(straight / "checkpoints" / "last.ckpt", last)
    assert_same_weights(straight / "checkpoints" / "best.ckpt", run / "checkpoints" / "best.ckpt")


def test_ctrl_c_twice_saves_once_and_corrupts_nothing(
        straight: Path, recipe: Path, demo_dir: Path, tmp_path: Path) -> None:
    per_epoch = steps_per_epoch(straight)
    run, output = stop_mid_epoch(signal.SIGINT, recipe, demo_dir, tmp_path, per_epoch, times=2)
    last = run / "checkpoints" / "last.ckpt"
    saved = load(last)["global_step"]  # loads: whole
    (line,) = [line for line in output.splitlines() if line.startswith("stopped by")]
    assert line.startswith(f"stopped by SIGINT at epoch 1, step {saved}; saved {last}")
    assert per_epoch < saved < 2 * per_epoch
    assert sorted(p.name for p in last.parent.iterdir()) == ["best.ckpt", "last.ckpt"]  # no half-written file
    assert "Traceback" not in output


def test_a_signal_before_training_saves_nothing_and_says_so(tmp_path: Path, monkeypatch) -> None:
    """Stopped during the sanity check of a resumed run: its last.ckpt stays and still resumes it."""
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    stop = Stop(signal.SIGINT, last, saved=False, epoch=0, step=0)
    monkeypatch.setattr(SaveOnPreemption, "last_stop", stop)
    assert str(preempted()) == "stopped by SIGINT before training began; nothing new to save"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"the run's")
    stopped = preempted()
    assert str(stopped).endswith(f"resume with `make train RESUME={tmp_path / 'run'}`")
    assert stopped.exit_status == 130
