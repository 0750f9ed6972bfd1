"""Kaggle download/submit with a fake client at the network boundary: no test touches the network."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from runner import run_commands

from malaria.common import errors, retry
from malaria.commands import leaderboard
from malaria.commands.leaderboard import KaggleError, connect, default_competition, download, main, submit
from malaria.prediction.submission import SubmissionError, write_submission

FAKES = Path(__file__).resolve().parents[1] / "fakes"
IDS = ["t1.png", "t2.png", "t3.png"]
COMPETITION = "fake-malaria"
OUTER_FILES = ("train_data.zip", "train_labels.csv", "test_data.zip", "sample_submission.csv")


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _competition_files() -> dict[str, bytes]:
    """Tiny stand-ins for what Kaggle serves: image zips kept zipped, plus the CSVs."""
    return {
        "train_data.zip": _zip_bytes({"train/x1.png": b"png", "train/x2.png": b"png"}),
        "train_labels.csv": b"img_name,label\nx1.png,0\nx2.png,1\n",
        "test_data.zip": _zip_bytes({f"test/{i}": b"png" for i in IDS}),
        "sample_submission.csv": ("img_name,label\n" + "".join(f"{i},0\n" for i in IDS)).encode(),
    }


class FakeKaggleApi:
    """Stands in for kaggle.api: records calls, serves a local archive, or fails on demand."""

    COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE = "Could not submit to competition"

    def __init__(self, files: dict[str, bytes] | None = None, error: Exception | None = None) -> None:
        self.files = _competition_files() if files is None else files
        self.error = error
        self.downloads: list[tuple[str, str]] = []
        self.submissions: list[tuple[str, str, str]] = []
        self.reply = "Successfully submitted"

    def competition_download_files(self, competition: str, path: str, quiet: bool = True) -> None:
        if self.error:
            raise self.error
        self.downloads.append((competition, path))
        Path(path, f"{competition}.zip").write_bytes(_zip_bytes(self.files))

    def competition_submit(self, file_name: str, message: str, competition: str, quiet: bool = False):
        if self.error:
            raise self.error
        self.submissions.append((file_name, message, competition))
        return type("Response", (), {"message": self.reply})()

    def competition_submissions(self, competition: str) -> list:
        """What Kaggle lists: the uploads it accepted (a failed upload reply accepts nothing)."""
        if self.reply == self.COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE:
            return []
        return [SimpleNamespace(file_name=Path(f).name, description=m) for f, m, c in self.submissions
                if c == competition]


class FlakyKaggleApi(FakeKaggleApi):
    """Fails the first uploads as `failures` says: an exception, or "lost" (accepted, then the reply
    times out)."""

    def __init__(self, *failures: Exception | str) -> None:
        super().__init__()
        self.failures = list(failures)
        self.calls = 0

    def competition_submit(self, file_name: str, message: str, competition: str, quiet: bool = False):
        self.calls += 1
        failure = self.failures.pop(0) if self.failures else None
        if isinstance(failure, Exception):
            raise failure
        response = super().competition_submit(file_name, message, competition, quiet)
        if failure == "lost":
            raise requests.ReadTimeout("read timed out")
        return response


def _http_error(status: int, text: str) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(text, response=response)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "sample_submission.csv").write_bytes(_competition_files()["sample_submission.csv"])
    return folder


@pytest.fixture
def history(tmp_path: Path) -> Path:
    return tmp_path / "submissions" / "history.csv"


def _history_rows(history: Path) -> list[dict[str, str]]:
    with history.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _submission(history: Path, name: str = "run-a.csv", metadata: dict | None = None) -> Path:
    return write_submission(IDS, [1, 0, 1], history.parent / name, metadata=metadata)


def test_download_unpacks_and_is_idempotent(tmp_path: Path) -> None:
    api = FakeKaggleApi()
    target = tmp_path / "data"
    written = download(COMPETITION, target, api=api)
    assert sorted(p.name for p in written) == sorted(OUTER_FILES)
    assert sorted(p.name for p in target.iterdir()) == sorted(OUTER_FILES)
    assert zipfile.is_zipfile(target / "test_data.zip")  # inner image zips stay zipped
    assert download(COMPETITION, target, api=api) == []
    assert api.downloads == [(COMPETITION, str(target))]


def test_download_keeps_files_already_there(tmp_path: Path) -> None:
    (tmp_path / "train_labels.csv").write_text("mine")
    written = download(COMPETITION, tmp_path, api=FakeKaggleApi())
    assert (tmp_path / "train_labels.csv").read_text() == "mine"
    assert "train_labels.csv" not in {p.name for p in written}


def test_download_lists_missing_files(tmp_path: Path) -> None:
    files = _competition_files()
    del files["test_data.zip"], files["train_labels.csv"]
    with pytest.raises(KaggleError, match="lacks test_data.zip, train_labels.csv or train_data.csv"):
        download(COMPETITION, tmp_path, api=FakeKaggleApi(files))


def test_download_network_failure_is_clear(tmp_path: Path) -> None:
    api = FakeKaggleApi(error=_http_error(404, "Not Found"))
    with pytest.raises(KaggleError, match="HTTP 404.*check the slug"):
        download(COMPETITION, tmp_path, api=api)


def test_dry_run_validates_logs_and_does_not_upload(data_dir: Path, history: Path) -> None:
    meta = {"runs": ["r1", "r2"], "config": "configs/resnet.yaml", "val_acc": 0.97123, "tta": True}
    file = _submission(history, metadata=meta)
    api = FakeKaggleApi()
    record = submit(file, None, COMPETITION, data_dir, dry_run=True, api=api, history=history)
    assert api.submissions == []
    assert record.message == "r1+r2 | config configs/resnet.yaml | val_acc 0.9712 | tta"
    [row] = _history_rows(history)
    assert row["result"] == "dry-run"
    assert row["run"] == "r1+r2"
    assert row["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()


def test_submit_defaults_to_newest_csv(data_dir: Path, history: Path) -> None:
    old, new = _submission(history, "old.csv"), _submission(history, "new.csv")
    os.utime(old, (2_000_000_000, 2_000_000_000))  # newer mtime despite being written first
    os.utime(new, (1_000_000_000, 1_000_000_000))
    api = FakeKaggleApi()
    submit(None, None, COMPETITION, data_dir, api=api, history=history)
    submit(None, "second", COMPETITION, data_dir, api=api, history=history)  # history.csv is now newest
    assert api.submissions == [(str(old), "old.csv", COMPETITION), (str(old), "second", COMPETITION)]


def test_a_rejection_is_an_error_and_no_history_row(data_dir: Path, history: Path) -> None:
    file = _submission(history)
    before = file.read_bytes()
    submit(file, "first", COMPETITION, data_dir, api=FakeKaggleApi(), history=history)
    rejecting = FakeKaggleApi(error=_http_error(403, "rules not accepted"))
    with pytest.raises(KaggleError, match="not submitted.*HTTP 403: rules not accepted.*Nothing was added"):
        submit(file, "second", COMPETITION, data_dir, api=rejecting, history=history)
    assert [(r["message"], r["result"]) for r in _history_rows(history)] == [("first", "submitted")]
    assert file.read_bytes() == before


def test_failed_upload_reply_is_a_failure(data_dir: Path, history: Path, no_waiting: None) -> None:
    api = FakeKaggleApi()
    api.reply = api.COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE
    with pytest.raises(KaggleError, match="upload failed"):
        submit(_submission(history), None, COMPETITION, data_dir, api=api, history=history)
    assert len(api.submissions) == retry.ATTEMPTS and not history.exists()


@pytest.fixture
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry, "FIRST_WAIT_S", 0)


def test_transient_failures_are_retried_into_one_submission(data_dir: Path, history: Path, no_waiting: None) -> None:
    api = FlakyKaggleApi(requests.ConnectTimeout("connect timed out"), _http_error(503, "unavailable"))
    file = _submission(history)
    assert submit(file, "m", COMPETITION, data_dir, api=api, history=history).result == "submitted"
    assert api.calls == 3 and api.submissions == [(str(file), "m", COMPETITION)]
    assert [r["result"] for r in _history_rows(history)] == ["submitted"]


def test_an_upload_whose_reply_was_lost_is_recorded_not_repeated(data_dir: Path, history: Path,
                                                                 no_waiting: None) -> None:
    api = FlakyKaggleApi("lost")
    file = _submission(history)
    submit(file, "m", COMPETITION, data_dir, api=api, history=history)
    assert api.calls == 1 and len(api.submissions) == 1 and len(_history_rows(history)) == 1


def test_a_rerun_after_a_final_failure_submits_once_and_records_once(data_dir: Path, history: Path,
                                                                     no_waiting: None) -> None:
    file = _submission(history)
    down = FlakyKaggleApi(*[_http_error(502, "bad gateway")] * retry.ATTEMPTS)
    with pytest.raises(KaggleError, match=f"HTTP 502: bad gateway.*Nothing was added to {history}"):
        submit(file, "m", COMPETITION, data_dir, api=down, history=history)
    assert down.calls == retry.ATTEMPTS and not history.exists()
    api = FlakyKaggleApi()
    assert submit(file, "m", COMPETITION, data_dir, api=api, history=history).result == "submitted"
    assert submit(file, "m", COMPETITION, data_dir, api=api, history=history).result == "already submitted"
    assert api.calls == 1 and len(_history_rows(history)) == 1


def test_a_bad_token_is_not_retried(data_dir: Path, history: Path, no_waiting: None) -> None:
    api = FlakyKaggleApi(_http_error(401, "unauthenticated"))
    with pytest.raises(KaggleError, match="HTTP 401"):
        submit(_submission(history), "m", COMPETITION, data_dir, api=api, history=history)
    assert api.calls == 1


def test_invalid_csv_is_never_uploaded(data_dir: Path, history: Path) -> None:
    file = write_submission(IDS[::-1], [0, 0, 0], history.parent / "reversed.csv")
    api = FakeKaggleApi()
    with pytest.raises(SubmissionError, match="line 2 has id 't3.png' but 't1.png' is expected"):
        submit(file, None, COMPETITION, data_dir, api=api, history=history)
    assert api.submissions == []
    assert not history.exists()


def test_submit_needs_the_sample_submission(tmp_path: Path, history: Path) -> None:
    with pytest.raises(KaggleError, match="sample_submission.csv not found.*download"):
        submit(_submission(history), None, COMPETITION, tmp_path, api=FakeKaggleApi(), history=history)


def test_a_demo_only_data_dir_points_to_the_demo_sample(data_dir: Path, history: Path) -> None:
    parent = data_dir.parent / "fresh-clone-data"
    shutil.copytree(data_dir, parent / "demo")
    file = _submission(history)
    with pytest.raises(KaggleError, match=r"only the generated demo.*DATA_DIR=.*fresh-clone-data/demo"):
        submit(file, None, COMPETITION, parent, dry_run=True, history=history)
    assert not history.exists()
    record = submit(file, None, COMPETITION, parent / "demo", dry_run=True, history=history)
    assert record.result == "dry-run"


def test_missing_credentials_are_an_error_not_a_history_row(
    data_dir: Path, history: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_credentials() -> None:
        raise KaggleError(leaderboard.CREDENTIALS_HELP)

    monkeypatch.setattr(leaderboard, "connect", no_credentials)
    with pytest.raises(KaggleError, match="KAGGLE_API_TOKEN"):
        submit(_submission(history), None, COMPETITION, data_dir, history=history)
    assert not history.exists()  # the history holds only what Kaggle accepted


@pytest.fixture
def fresh_kaggle_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A credential-free HOME, a dead proxy instead of the internet, and `kaggle` not yet imported."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_CONFIG_DIR", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in [m for m in sys.modules if m == "kaggle" or m.startswith("kaggle.")]:
        monkeypatch.delitem(sys.modules, name)
    return home


def test_real_client_without_credentials_gives_clear_error(
    fresh_kaggle_import: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(KaggleError, match=r"KAGGLE_API_TOKEN.*~/\.kaggle/access_token.*kaggle\.json"):
        connect()
    assert capsys.readouterr().out == ""  # the client's own help text is replaced by ours


def test_real_client_never_shows_the_token(
    fresh_kaggle_import: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = "KGAT_not-a-real-token-0123456789"
    monkeypatch.setenv("KAGGLE_API_TOKEN", secret)
    with pytest.raises(KaggleError, match="Kaggle could not check the credentials: ProxyError") as caught:
        connect()
    captured = capsys.readouterr()
    assert secret not in str(caught.value) + captured.out + captured.err


@pytest.mark.parametrize("failure", ["raise SystemExit(1)", "raise OSError('Could not find kaggle.json')"])
def test_client_failing_on_import_cannot_end_the_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    package = tmp_path / "site" / "kaggle"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"print('help text')\n{failure}\n")
    monkeypatch.syspath_prepend(str(package.parent))
    for name in [m for m in sys.modules if m == "kaggle" or m.startswith("kaggle.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(KaggleError, match="No usable Kaggle credentials"):
        connect()


def test_competition_slug_comes_from_config(tmp_path: Path) -> None:
    assert default_competition() == "fighting-malaria-with-cnns"
    broken = tmp_path / "kaggle.yaml"
    broken.write_text("other: 1\n")
    with pytest.raises(KaggleError, match="competition: <kaggle slug>"):
        default_competition(broken)


def test_cli_dry_run_and_error_exit(
    data_dir: Path, history: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = _submission(history)
    common = ["--competition", COMPETITION, "--data.data_dir", str(data_dir), "--history", str(history)]
    main(["submit", "--dry_run", "--file", str(file), *common])
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith(f"dry-run: {file} -> {COMPETITION}")
    with pytest.raises(SystemExit) as exit_:
        errors.run(lambda: main(["submit", "--dry_run", "--file", str(history.parent / "missing.csv"), *common]))
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "file not found" in err and "Traceback" not in err
    assert len(_history_rows(history)) == 1


def test_history_with_a_foreign_header_is_left_alone(data_dir: Path, history: Path) -> None:
    file = _submission(history)
    history.write_text("date,score\n2024-01-01,0.9\n")
    with pytest.raises(KaggleError, match="line 1 is not 'time,file,sha256,run,message,result'"):
        submit(file, None, COMPETITION, data_dir, dry_run=True, history=history)
    assert history.read_text() == "date,score\n2024-01-01,0.9\n"


def test_cli_download_and_submit_through_the_client(
    tmp_path: Path, history: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    api = FakeKaggleApi()
    monkeypatch.setattr(leaderboard, "connect", lambda: api)
    data = tmp_path / "data"
    main(["download", "--competition", COMPETITION, "--data.data_dir", str(data)])
    assert capsys.readouterr().out == f"{COMPETITION}: unpacked 4 files into {data}/\n"
    file = _submission(history)
    common = ["--competition", COMPETITION, "--data.data_dir", str(data), "--history", str(history)]
    main(["submit", "--file", str(file), "--message", "cli", *common])
    assert capsys.readouterr().out.startswith(f"submitted: {file} -> {COMPETITION} ('cli')")
    assert api.submissions == [(str(file), "cli", COMPETITION)]
    assert sorted(p.name for p in history.parent.iterdir()) == ["history.csv", "run-a.csv"]  # no temp files left


@pytest.mark.slow  # three child processes, 3 s of backoff: ~20 s
def test_make_submit_against_a_failing_kaggle_submits_once(data_dir: Path, history: Path, tmp_path: Path) -> None:
    """`make submit`'s command in child processes, the kaggle client replaced by tests/fakes/kaggle."""
    file = _submission(history)
    state = tmp_path / "kaggle_fake.json"
    state.write_text(json.dumps({"failures": ["timeout", "503"], "accepted": []}))
    args = ["submit", "--file", str(file), "--message", "m", "--competition", COMPETITION,
            "--data.data_dir", str(data_dir), "--history", str(history)]
    (first,) = run_commands([("malaria.commands.leaderboard", args, tmp_path)], tmp_path / "logs", pythonpath=(FAKES,))
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith(f"submitted: {file} -> {COMPETITION} ('m')")
    assert first.stderr.count("failed (") == 2 and "attempt 3 of 4" in first.stderr  # the two retries, said
    assert len(json.loads(state.read_text())["accepted"]) == 1
    assert [r["result"] for r in _history_rows(history)] == ["submitted"]

    # All four tries fail: one paragraph, no row; the rerun's upload is lost in flight, then found.
    other = _submission(history, "run-b.csv")
    state.write_text(json.dumps({"failures": ["500"] * retry.ATTEMPTS + ["lost"], "accepted": []}))
    other_args = [*args[:2], str(other), *args[3:]]
    failed, rerun = run_commands([("malaria.commands.leaderboard", other_args, tmp_path)] * 2, tmp_path / "logs2",
                                 parallel=1, pythonpath=(FAKES,))
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    (paragraph,) = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
    assert f"{other} was not submitted to {COMPETITION!r}: HTTP 500" in paragraph
    assert rerun.returncode == 0, rerun.stderr
    assert [a["file_name"] for a in json.loads(state.read_text())["accepted"]] == ["run-b.csv"]
    assert [(r["file"], r["result"]) for r in _history_rows(history)] == [(str(file), "submitted"),
                                                                          (str(other), "submitted")]
