"""Fetch the competition files from Kaggle and send submissions to its leaderboard.

Uses the official `kaggle` client. Every submission Kaggle accepted, and every dry run, is appended
to `submissions/history.csv` with the file's sha256, so a leaderboard score can always be traced
back to the exact CSV, run and config that produced it. Transient failures are retried with
backoff; before each retry, and before a rerun uploads, Kaggle's list of submissions is checked
for this file and message, so an upload whose reply was lost is recorded, not repeated.

    python -m malaria.commands.leaderboard download [--competition X] [--data.data_dir data]
    python -m malaria.commands.leaderboard submit [--file F] [--message M] [--dry_run] [--competition X]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import zipfile
from dataclasses import astuple, dataclass, fields, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import requests
import yaml

from malaria.data.archive import DEMO_SUBDIR, SAMPLE_SUBMISSION, missing_files
from malaria.common.atomic import replace_file, stage_file
from malaria.common import errors, retry
from malaria.common.errors import UserError
from malaria.prediction.submission import (
    HISTORY_NAME,
    SubmissionError,
    newest_submission,
    read_sample_submission,
    sidecar_path,
    validate_submission,
)

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "kaggle.yaml"
HISTORY = Path("submissions") / HISTORY_NAME
CREDENTIALS_HELP = (
    "No usable Kaggle credentials. Create a token at https://www.kaggle.com/settings/api, then either "
    "export KAGGLE_API_TOKEN=<token> or save it to ~/.kaggle/access_token; a legacy kaggle.json also "
    "works in ~/.kaggle/kaggle.json (chmod 600) or as KAGGLE_USERNAME and KAGGLE_KEY."
)
HTTP_HINTS = {
    401: "Kaggle rejected the credentials; create a new token",
    403: "accept the competition rules on its Kaggle page, or the daily submission limit is reached",
    404: "no such competition; check the slug in configs/kaggle.yaml or pass --competition",
    429: "too many requests or the daily submission limit is reached; try again later",
}


class KaggleError(UserError, RuntimeError):
    """Kaggle could not be used; the message says why and what to do."""


@dataclass(frozen=True)
class SubmissionRecord:
    """One row of the submission history."""

    time: str
    file: str
    sha256: str
    run: str
    message: str
    result: str


HISTORY_COLUMNS = tuple(field.name for field in fields(SubmissionRecord))


def default_competition(config: Path = CONFIG) -> str:
    """The competition slug from `configs/kaggle.yaml` (`competition: <slug>`)."""
    try:
        slug = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("competition")
    except (OSError, yaml.YAMLError) as err:
        raise KaggleError(f"{config}: cannot read the competition slug ({err}); pass --competition.") from None
    if not isinstance(slug, str) or not slug.strip():
        raise KaggleError(f"{config}: expected a line 'competition: <kaggle slug>'; pass --competition.")
    return slug.strip()


def connect() -> Any:
    """The official client, authenticated.

    `import kaggle` authenticates at import time; depending on the version a failure there prints
    help and calls exit(), raises, or is swallowed (2.x, leaving the client unauthenticated).
    All three become a KaggleError here, so a missing token can't end the calling process.
    """
    try:
        # The client prints its own help text on failure; ours below is shorter and names all options.
        with contextlib.redirect_stdout(io.StringIO()):
            import kaggle

            api = kaggle.api
            # Versions without this flag raise or exit during the import when authentication fails.
            if not getattr(api, "_authenticated", True):
                api.authenticate()
    except ImportError as err:
        raise KaggleError(f"the kaggle package is not installed ({err}); run `pip install -e .`.") from None
    except SystemExit:
        raise KaggleError(CREDENTIALS_HELP) from None
    except requests.RequestException as err:  # checking a token is a network call
        raise KaggleError(f"Kaggle could not check the credentials: {_reason(err)}") from None
    except OSError as err:  # older clients raise this when kaggle.json is missing
        raise KaggleError(f"{CREDENTIALS_HELP} ({err})") from None
    return api


def _reason(err: BaseException) -> str:
    """A one-line description of a client error, with a hint for the common HTTP statuses."""
    text = " ".join(str(err).split()) or type(err).__name__
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status is None:
        return f"{type(err).__name__}: {text}"
    hint = HTTP_HINTS.get(status)
    return f"HTTP {status}: {text}" + (f" ({hint})" if hint else "")


def _extract(archive: Path, data_dir: Path) -> list[Path]:
    """Unpack the outer download into `data_dir`, flat, leaving inner zips zipped and existing files alone."""
    written: list[Path] = []
    seen: set[str] = set()
    try:
        with zipfile.ZipFile(archive) as outer:
            for info in outer.infolist():
                # Taking only the base name flattens folders and makes '../' members harmless.
                name = PurePosixPath(info.filename).name
                if info.is_dir() or name.startswith(".") or "__MACOSX" in info.filename:
                    continue
                if name in seen:
                    raise KaggleError(f"{archive}: two members are named {name!r}; unpack it by hand.")
                seen.add(name)
                target = data_dir / name
                if target.exists():
                    continue
                with outer.open(info) as source:
                    staged = stage_file(target, partial(shutil.copyfileobj, source), binary=True)
                os.replace(staged, target)
                written.append(target)
    except zipfile.BadZipFile as err:
        raise KaggleError(f"{archive}: not a readable zip ({err}); delete it and download again.") from None
    return written


def download(competition: str, data_dir: Path, api: Any = None) -> list[Path]:
    """Put the competition files into `data_dir`; return the files written (none if all were there).

    The outer archive Kaggle serves is unpacked and removed; the image zips inside stay zipped
    because the pipeline reads them directly.
    """
    data_dir = Path(data_dir)
    if not missing_files(data_dir):
        return []
    data_dir.mkdir(parents=True, exist_ok=True)
    api = api or connect()
    try:
        api.competition_download_files(competition, path=str(data_dir), quiet=False)
    except Exception as err:  # any client failure (network, HTTP, auth) ends the download the same way
        raise KaggleError(f"could not download competition {competition!r}: {_reason(err)}") from err
    archive = data_dir / f"{competition}.zip"
    if not archive.is_file():
        raise KaggleError(f"the Kaggle client reported success but {archive} is missing.")
    written = _extract(archive, data_dir)
    archive.unlink()
    missing = missing_files(data_dir)
    if missing:
        raise KaggleError(
            f"{data_dir}: the download of {competition!r} lacks {', '.join(missing)}; "
            "check the competition's Data page and --competition."
        )
    return written


def describe(file: Path) -> tuple[str, str]:
    """(run name, default message) from the file's `<csv>.json` sidecar, else from its name."""
    meta_path = sidecar_path(file)
    if not meta_path.is_file():
        return file.stem, file.name
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise SubmissionError(f"{meta_path}: unreadable metadata ({err}); fix it or delete it.") from None
    runs = meta.get("runs") or ([meta["run"]] if meta.get("run") else [])
    run = "+".join(str(r) for r in runs) or file.stem
    parts = [run]
    if meta.get("config"):
        parts.append(f"config {meta['config']}")
    if isinstance(meta.get("val_acc"), (int, float)):
        parts.append(f"val_acc {meta['val_acc']:.4f}")
    if meta.get("tta"):
        parts.append("tta")
    return run, " | ".join(parts)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def append_history(history: Path, record: SubmissionRecord) -> None:
    """Add `record` to the history CSV by atomically replacing it with old rows + the new one."""
    history.parent.mkdir(parents=True, exist_ok=True)
    old = history.read_text(encoding="utf-8") if history.exists() else ""
    expected_header = ",".join(HISTORY_COLUMNS)
    if old and old.splitlines()[0] != expected_header:
        raise KaggleError(f"{history}: line 1 is not {expected_header!r}; move the file aside.")
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    if not old:
        writer.writerow(HISTORY_COLUMNS)
    writer.writerow(astuple(record))
    separator = "" if not old or old.endswith("\n") else "\n"
    replace_file(history, lambda f: f.write(old + separator + rows.getvalue()))


def _missing_sample_hint(data_dir: Path) -> str:
    demo = data_dir / DEMO_SUBDIR
    if (demo / SAMPLE_SUBMISSION).exists():
        return (f"{data_dir} holds only the generated demo competition, which Kaggle does not score. Check a demo "
                f"submission with `make submit DRY_RUN=1 DATA_DIR={demo}`, or run `make data` for the real files.")
    return "run `make data` (python -m malaria.commands.leaderboard download) first."


def submit(
    file: Path | None,
    message: str | None,
    competition: str,
    data_dir: Path,
    dry_run: bool = False,
    api: Any = None,
    history: Path = HISTORY,
) -> SubmissionRecord:
    """Validate a submission against the sample submission, upload it, and log the attempt.

    `file` defaults to the newest CSV next to `history`; `message` to a summary of the sidecar.
    A dry run does all of it but the upload. Transient failures (timeouts, HTTP 429 and 5xx) are
    retried with backoff (`malaria.common.retry`); the history records only what Kaggle accepted, so a
    failure is a KaggleError and no row, and rerunning the same submit neither uploads twice nor
    loses the record.
    """
    history = Path(history)
    file = Path(file) if file is not None else newest_submission(history.parent)
    expected = read_sample_submission(Path(data_dir))
    if expected is None:
        raise KaggleError(f"{Path(data_dir) / SAMPLE_SUBMISSION} not found; {_missing_sample_hint(Path(data_dir))}")
    validate_submission(file, expected)
    run, default_message = describe(file)
    attempt = dict(
        time=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        file=str(file),
        sha256=_sha256(file),
        run=run,
        message=message or default_message,
    )
    if dry_run:
        record = SubmissionRecord(**attempt, result="dry-run")
        append_history(history, record)
        return record

    api = api or connect()
    message = attempt["message"]
    record = SubmissionRecord(**attempt, result="submitted")
    try:
        # A rerun after a reply that never came, or of a submission already made: never upload twice.
        already = _accepted(api, competition, file, message)
        if not already:
            for trial in retry.transient_failures(f"upload of {file} to {competition!r}"):
                with trial:
                    # The previous try may have reached Kaggle before failing.
                    if trial.retry_state.attempt_number > 1 and _accepted(api, competition, file, message):
                        break
                    response = api.competition_submit(str(file), message, competition, quiet=True)
                    if response.message == api.COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE:
                        raise retry.TransientError(f"upload failed: {response.message}")
    except Exception as err:  # any client failure (network, HTTP rejection) ends the same way
        raise KaggleError(
            f"{file} was not submitted to {competition!r}: {_reason(err)}. Nothing was added to {history}; "
            "run the same command again: a submission Kaggle accepted despite the error is found and recorded, "
            "not uploaded twice."
        ) from None
    if already and _recorded(history, record):
        return replace(record, result="already submitted")
    append_history(history, record)
    return record


def _accepted(api: Any, competition: str, file: Path, message: str) -> bool:
    """Whether Kaggle lists a submission of this file (by name) with this message, among the latest."""
    for trial in retry.transient_failures(f"listing the submissions to {competition!r}"):
        with trial:
            listed = api.competition_submissions(competition) or []
    return any(s is not None and s.file_name == file.name and (s.description or "") == message for s in listed)


def _recorded(history: Path, record: SubmissionRecord) -> bool:
    """Whether the history already holds this file's upload with this message."""
    if not history.is_file():
        return False
    with history.open(newline="", encoding="utf-8") as handle:
        return any(row.get("sha256") == record.sha256 and row.get("message") == record.message
                   and row.get("result") == "submitted" for row in csv.DictReader(handle))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m malaria.commands.leaderboard", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("download", "fetch the competition files"), ("submit", "upload a submission")):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--competition", help=f"Kaggle slug (default: from {CONFIG.name})")
        command.add_argument("--data.data_dir", dest="data_dir", type=Path, default=Path("data"))
    submit_cmd = commands.choices["submit"]
    submit_cmd.add_argument("--file", type=Path, help="submission CSV (default: newest in submissions/)")
    submit_cmd.add_argument("--message", help="submission description (default: run, config, val_acc)")
    submit_cmd.add_argument("--dry_run", action="store_true", help="do everything except the upload")
    submit_cmd.add_argument("--history", type=Path, default=HISTORY)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    competition = args.competition or default_competition()
    if args.command == "download":
        written = download(competition, args.data_dir)
        what = f"unpacked {len(written)} files into" if written else "nothing to download; all files in"
        print(f"{competition}: {what} {args.data_dir}/")
    else:
        record = submit(args.file, args.message, competition, args.data_dir, args.dry_run, history=args.history)
        print(f"{record.result}: {record.file} -> {competition} ({record.message!r}); logged in {args.history}")
        if record.result == "submitted":
            print(f"scores: https://www.kaggle.com/competitions/{competition}/submissions")


if __name__ == "__main__":
    errors.run(main)
