"""What a user sees when a verb fails on their input: one paragraph, exit status 1, no traceback,
and nothing written in their folders. The commands run as `make` runs them, in a subprocess (the
whole bad-input table through `make train`: tests/data/test_reliability.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import TINY, write_competition
from runner import assert_one_paragraph, run_commands, run_module, snapshot

from malaria.common import errors
from malaria.commands import train as train_cli

def train(data_dir: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_module("malaria.commands.train", "fit", *TINY, "--data.data_dir", str(data_dir), cwd=cwd)


def test_zips_without_the_labels_csv_fail_naming_the_missing_file(tmp_path: Path) -> None:
    data = write_competition(tmp_path / "data")
    (data / "train_labels.csv").unlink()
    before = snapshot(data)
    message = assert_one_paragraph(train(data, tmp_path), "train_data.zip, test_data.zip", "train_labels.csv")
    assert "demo" in message  # says how demo data would be had instead
    assert snapshot(data) == before and not (data / "demo").exists()  # no demo data written beside them


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run, trained in-process on a tiny competition."""
    data = write_competition(tmp_path_factory.mktemp("good") / "data")
    runs_dir = tmp_path_factory.mktemp("runs")
    train_cli.main(["fit", *TINY, "--data.data_dir", str(data), "--trainer.enable_progress_bar", "false",
                    "--runs_dir", str(runs_dir), "--run", "tiny"])
    return runs_dir / "tiny"


def test_predicting_on_a_partial_competition_names_what_is_wrong(tmp_path: Path, tiny_run: Path) -> None:
    no_test_zip = write_competition(tmp_path / "no_test_zip")
    (no_test_zip / "test_data.zip").unlink()
    disagreeing = write_competition(tmp_path / "disagreeing")
    (disagreeing / "sample_submission.csv").write_text("img_name,label\nnot-in-the-zip.png,0\n")
    folders = {"no_test_zip": no_test_zip, "disagreeing": disagreeing}
    before = {name: snapshot(folder) for name, folder in folders.items()}
    results = run_commands([("malaria.commands.predict", ["--run", str(tiny_run), "--data.data_dir", str(folder),
                                                 "--out", str(tmp_path / f"{name}.csv")], tmp_path)
                            for name, folder in folders.items()], tmp_path / "logs")
    assert_one_paragraph(results[0], str(no_test_zip / "test_data.zip"), "not found")
    assert_one_paragraph(results[1], str(disagreeing / "sample_submission.csv"), "not-in-the-zip.png")
    assert {name: snapshot(folder) for name, folder in folders.items()} == before
    assert not list(tmp_path.glob("*.csv"))  # no submission written


def test_predicting_from_a_missing_run_says_so(tmp_path: Path) -> None:
    assert_one_paragraph(run_module("malaria.commands.predict", "--run", "runs/nothing", cwd=tmp_path), "runs/nothing")


def test_unexpected_errors_keep_their_traceback() -> None:
    def broken() -> None:
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        errors.run(broken)
    with pytest.raises(SystemExit) as exit_:
        errors.run(lambda: (_ for _ in ()).throw(errors.ConfigError("bad recipe")))
    assert exit_.value.code == 1


def test_an_output_that_is_never_overwritten_is_refused_in_one_paragraph(tmp_path: Path,
                                                                          tiny_run: Path) -> None:
    """A user's existing submission, or a folder of theirs where demo data would go: errors.ExistsError,
    whichever verb meets it, and nothing written."""
    work = tmp_path / "work"
    taken = work / "taken.csv"
    foreign = work / "empty_data" / "demo"  # a DATA_DIR without competition files makes its demo there
    foreign.mkdir(parents=True)
    taken.write_text("mine\n")
    (foreign / "notes.txt").write_text("mine\n")
    before = snapshot(work)
    results = run_commands([
        ("malaria.commands.train", ["predict", "--config", str(tiny_run / "config.yaml"),
                                    "--ckpt_path", str(tiny_run / "checkpoints" / "best.ckpt"),
                                    "--trainer.callbacks+=malaria.prediction.ddp_writer.PredictionWriter",
                                    "--trainer.callbacks.out", str(taken)], work),
        ("malaria.commands.train", ["fit", *TINY, "--data.data_dir", str(foreign.parent)], work),
        ("malaria.data.demo", ["--out", str(foreign)], work),
    ], tmp_path / "logs")
    assert_one_paragraph(results[0], str(taken), "refusing to overwrite a submission")
    for result in results[1:]:
        assert_one_paragraph(result, str(foreign), "refusing to put demo data there")
    assert snapshot(work) == before
