"""Write and check submission CSVs (`img_name,label`, one row per test image).

A submission is a file the user keeps and uploads, so it is never overwritten: each run writes a
new time-stamped file, published atomically so that a crash never leaves half a CSV behind.
An optional `<file>.csv.json` sidecar records what produced it (runs, checkpoints, val_acc,
config, tta); `malaria.commands.leaderboard` turns it into the Kaggle submission message.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import pandas as pd

from malaria.common import errors
from malaria.common.atomic import stage_file
from malaria.common.errors import listing
from malaria.data.archive import HEADER, SAMPLE_SUBMISSION, check_rows, read_id_csv

HISTORY_NAME = "history.csv"  # the Kaggle upload log that malaria.commands.leaderboard keeps in submissions/
SHOWN = 3  # how many offending ids an error message lists (errors.listing)


class SubmissionError(errors.UserError, ValueError):
    """A submission is malformed; the message names the file and the first offending line or ids."""


def newest_submission(directory: Path = Path("submissions")) -> Path:
    """The most recently written submission CSV in `directory` (the upload history excluded)."""
    candidates = [p for p in Path(directory).glob("*.csv") if p.name != HISTORY_NAME]
    if not candidates:
        raise SubmissionError(f"no submission CSV in {directory}/; run `make predict` first or pass a file.")
    return max(candidates, key=lambda p: (p.stat().st_mtime_ns, p.name))


def default_submission_path(run_name: str, directory: Path = Path("submissions")) -> Path:
    """`<directory>/<run>-<YYYYmmdd-HHMMSS>.csv`, the run name reduced to file-name-safe characters."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", run_name).strip("-.") or "run"
    return Path(directory) / f"{safe}-{datetime.now():%Y%m%d-%H%M%S}.csv"


def sidecar_path(path: Path) -> Path:
    """Where the metadata of submission `path` lives: `<path>.json`."""
    return path.with_name(path.name + ".json")


def _check_arrays(ids: Sequence[str], labels: Sequence[int] | np.ndarray, path: Path) -> np.ndarray:
    """Return labels as int64 after checking they are 0/1 integers matching `ids` one to one, and
    that the rows pass the checks the file will be read back with (`archive.check_rows`)."""
    values = np.asarray(labels)
    if values.ndim != 1 or len(values) != len(ids):
        raise SubmissionError(f"{path}: {len(ids)} ids but labels of shape {values.shape}.")
    # Floats are refused rather than rounded: a 0.7 here means probabilities were passed by mistake.
    if not (np.issubdtype(values.dtype, np.integer) or values.dtype == np.bool_):
        raise SubmissionError(f"{path}: labels must be integers 0/1, got dtype {values.dtype}.")
    not_text = [i for i, name in enumerate(ids) if not isinstance(name, str)]
    if not_text:
        raise SubmissionError(f"{path}: id number {not_text[0] + 1} is {ids[not_text[0]]!r}, not a string.")
    values = values.astype(np.int64)
    # indexed by the line each row will be written on, line 1 being the header
    rows = pd.DataFrame({HEADER[0]: list(ids), HEADER[1]: values.astype(str)}, index=range(2, len(ids) + 2))
    check_rows(rows, path, error=SubmissionError)
    return values


def _json_default(value: Any) -> Any:
    """Let metadata hold numpy scalars and paths, which `json` cannot encode by itself."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, PurePath):
        return str(value)
    raise TypeError(f"metadata value {value!r} of type {type(value).__name__} is not JSON serialisable")


def _publish(staged: Path, path: Path) -> None:
    """Give the finished temp file its final name, failing if that name already exists.

    os.link is os.replace's no-clobber twin: it is atomic and refuses an existing target, so two
    runs finishing in the same second can't overwrite each other's submission.
    """
    try:
        os.link(staged, path)
    except FileExistsError:
        raise errors.ExistsError(f"{path} already exists; refusing to overwrite a submission.") from None
    finally:
        os.unlink(staged)


def write_submission(
    ids: Sequence[str],
    labels: Sequence[int] | np.ndarray,
    path: Path,
    metadata: dict | None = None,
) -> Path:
    """Write `img_name,label` rows to a new file at `path` (plus a `<path>.json` sidecar if `metadata`).

    Raises SubmissionError for bad ids/labels and errors.ExistsError if `path` or its sidecar exists.
    """
    path = Path(path)
    values = _check_arrays(ids, labels, path)
    sidecar = sidecar_path(path)
    for target in (path, sidecar) if metadata is not None else (path,):
        if target.exists():
            raise errors.ExistsError(f"{target} already exists; refusing to overwrite a submission.")
    path.parent.mkdir(parents=True, exist_ok=True)

    table = pd.DataFrame({HEADER[0]: list(ids), HEADER[1]: values})
    staged_csv = stage_file(path, lambda f: table.to_csv(f, index=False, lineterminator="\n"))
    if metadata is not None:
        try:
            text = json.dumps(metadata, indent=2, sort_keys=True, default=_json_default) + "\n"
            # The sidecar goes first so that a CSV, once visible, always has its metadata next to it.
            _publish(stage_file(sidecar, lambda f: f.write(text)), sidecar)
        except BaseException:
            os.unlink(staged_csv)
            raise
    try:
        _publish(staged_csv, path)
    except BaseException:
        if metadata is not None:
            os.unlink(sidecar)
        raise
    return path


def _check_expected(table: pd.DataFrame, expected_ids: Sequence[str], path: Path) -> None:
    """Same ids as expected, in the same order; messages give CSV line numbers."""
    expected = list(expected_ids)
    got = table[HEADER[0]].tolist()
    expected_set, got_set = set(expected), set(got)
    missing = [i for i in expected if i not in got_set]
    extra = [i for i in got if i not in expected_set]
    if missing or extra or len(got) != len(expected):
        parts = [f"{path}: {len(got)} rows but {len(expected)} expected ids"]
        if missing:
            parts.append(f"missing {len(missing)} ids: {listing(missing, SHOWN)}")
        if extra:
            line = got.index(extra[0]) + 2
            parts.append(f"{len(extra)} unexpected ids, first on line {line}: {listing(extra, SHOWN)}")
        raise SubmissionError("; ".join(parts) + ".")
    for row, (want, have) in enumerate(zip(expected, got)):
        if want != have:
            raise SubmissionError(
                f"{path}: line {row + 2} has id {have!r} but {want!r} is expected there; "
                "rows must follow the order of sample_submission.csv."
            )


def validate_submission(path: Path, expected_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """Check a submission CSV and return it as a table (`img_name` str, `label` int64).

    Read as Kaggle will read it (`archive.read_id_csv`, exact): the header `img_name,label` (a
    UTF-8 BOM and CRLF endings are fine), labels written exactly `0` or `1`, unique non-empty ids,
    no blank lines and, if `expected_ids` is given, exactly those ids in that order. Raises
    SubmissionError naming the file and the first offending line (1-based)."""
    path = Path(path)
    table = read_id_csv(path, with_labels=True, exact=True, error=SubmissionError)
    if expected_ids is not None:
        _check_expected(table, expected_ids, path)
    return table


def read_sample_submission(data_dir: Path) -> list[str] | None:
    """The test ids, in order, from `data_dir/sample_submission.csv`; None if that file is absent.

    Read as prediction reads it (`archive.read_id_csv`), so a submission is checked against the
    very ids, in the very order, that `make predict` wrote."""
    path = Path(data_dir) / SAMPLE_SUBMISSION
    if not path.is_file():
        return None
    return read_id_csv(path, with_labels=False)["img_name"].tolist()
