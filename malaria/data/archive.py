"""Read the competition's zips and CSVs into validated tables.

Everything that can be wrong with the inputs is checked here, before any training starts, so a
bad file fails with a message naming it instead of a traceback from inside a DataLoader worker.
Images stay inside their zip: a table row says which member holds which id.
"""

from __future__ import annotations

import logging
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from malaria.common.errors import UserError, listing

log = logging.getLogger(__name__)

TRAIN_ZIP = "train_data.zip"
TEST_ZIP = "test_data.zip"
LABEL_CSVS = ("train_labels.csv", "train_data.csv")
SAMPLE_SUBMISSION = "sample_submission.csv"
DEMO_SUBDIR = "demo"  # data_dir/demo: the generated competition of a fresh clone
ID_COLUMNS = ("img_name", "id")
CLASSES = ("uninfected", "parasitized")  # the names of labels 0 and 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
HEADER = ("img_name", "label")  # of every id CSV: the labels, the sample submission, a submission
LABELS = ("0", "1")  # a label as a CSV must write it


class DataError(UserError, ValueError):
    """The competition files are unusable; the message names the file and what is wrong."""


@dataclass(frozen=True)
class ImageTable:
    """Which zip member holds each id's image, and its label (None for the test set)."""

    zip_path: Path
    ids: list[str]
    members: list[str]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)


def _is_junk(member: str) -> bool:
    """macOS resource forks, hidden files and folders that zip tools add."""
    parts = PurePosixPath(member).parts
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def list_images(zip_path: Path) -> dict[str, str]:
    """Map each image file name to its member path, at any folder depth inside the zip."""
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = [i.filename for i in archive.infolist() if not i.is_dir()]
    except FileNotFoundError:
        raise DataError(f"{zip_path}: file not found.") from None
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"{zip_path}: not a readable zip archive ({err}). Download it again.") from None

    unsafe = [m for m in members if m.startswith(("/", "\\")) or ".." in PurePosixPath(m).parts]
    if unsafe:
        raise DataError(f"{zip_path}: unsafe member paths {listing(unsafe)}; refusing to read this archive.")

    members = [m for m in members if not _is_junk(m)]
    images = [m for m in members if m.lower().endswith(IMAGE_SUFFIXES)]
    ignored = sorted(set(members) - set(images))
    if ignored:
        log.warning("%s: ignoring %d non-image members: %s", zip_path, len(ignored), listing(ignored))
    if not images:
        raise DataError(f"{zip_path}: the archive holds no PNG or JPEG images.")

    twice = sorted(m for m, n in Counter(images).items() if n > 1)
    if twice:
        raise DataError(f"{zip_path}: members stored twice: {listing(twice)}; re-create the archive.")
    by_name: dict[str, str] = {}
    clashes: list[str] = []
    for member in sorted(images):
        name = PurePosixPath(member).name
        if name in by_name:
            clashes.append(f"{by_name[name]} / {member}")
        by_name[name] = member
    if clashes:
        raise DataError(f"{zip_path}: the same file name appears in several folders: {listing(clashes)}.")
    return by_name


def _read_lines(csv_path: Path, error: type[UserError]) -> pd.DataFrame:
    """Every line of a CSV as strings, the header included, indexed by its line number as an editor
    shows it: blank lines are kept, so that the numbers in messages stay right."""
    try:
        lines = pd.read_csv(csv_path, header=None, dtype=str, keep_default_na=False, skip_blank_lines=False,
                            encoding="utf-8-sig")
    except FileNotFoundError:
        raise error(f"{csv_path}: file not found.") from None
    except UnicodeDecodeError as err:
        raise error(f"{csv_path}: not UTF-8 text ({err}); save it as a UTF-8 CSV.") from None
    except pd.errors.EmptyDataError:
        raise error(f"{csv_path}: not a readable CSV: the file is empty; expected a header with "
                    f"{','.join(HEADER)}.") from None
    except pd.errors.ParserError as err:
        raise error(f"{csv_path}: not a readable CSV ({str(err).strip()}).") from None
    lines.index += 1
    return lines


def check_rows(table: pd.DataFrame, path: Path, with_labels: bool = True,
               error: type[UserError] = DataError) -> None:
    """The checks every `img_name,label` table passes, read from a CSV or about to be written to
    one: ids not empty and unique, labels written exactly `0` or `1`. `table` holds strings and is
    indexed by line number; errors name the file and the first offending line."""
    names = table[HEADER[0]]
    blank = names.index[names.str.strip() == ""]
    if len(blank):
        raise error(f"{path}: empty img_name on line {blank[0]}.")
    if with_labels:
        bad = table.index[~table[HEADER[1]].isin(LABELS)]
        if len(bad):
            line = bad[0]
            raise error(f"{path}: line {line} ({names[line]}) has label {table[HEADER[1]][line]!r}; labels "
                        f"must be 0 (uninfected) or 1 (parasitized); lines with another label: {len(bad)}.")
    repeated = names.duplicated()
    if repeated.any():
        line = names.index[repeated.argmax()]
        first = names.index[(names == names[line]).argmax()]
        twice = listing(names[repeated].unique().tolist())
        raise error(f"{path}: duplicate ids {twice}: line {line} repeats id {names[line]!r} from line {first}.")


def read_id_csv(csv_path: Path, with_labels: bool, exact: bool = False,
                error: type[UserError] = DataError) -> pd.DataFrame:
    """Read an `img_name,label` CSV (`img_name` alone when `with_labels` is off), checking every row
    (`check_rows`); the table has `img_name` (str) and `label` (int64) columns.

    By default it reads a file as people and tools write them: a UTF-8 BOM, CRLF or CR line ends,
    blank lines, spaces around values and `id` for `img_name` are accepted, and other columns
    ignored (with a warning beside labels). `exact` reads a file as Kaggle will, a submission: the
    header is exactly `img_name,label`, and nothing is stripped or skipped. Errors give the line
    number as an editor shows it."""
    lines = _read_lines(csv_path, error)
    header, body = lines.iloc[0].tolist(), lines.iloc[1:]
    wanted = list(HEADER) if with_labels else [HEADER[0]]
    if exact:
        id_column = HEADER[0] if header == wanted else None
    else:
        header = [c.strip() for c in header]
        id_column = next((c for c in ID_COLUMNS if c in header), None)
    if id_column is None or (with_labels and HEADER[1] not in header):
        found = ",".join(header)[:80]
        raise error(f"{csv_path}: expected a header with {','.join(wanted)}, found {found!r}.")
    positions = [header.index(id_column), *([header.index(HEADER[1])] if with_labels else [])]
    table = body.iloc[:, positions].set_axis(wanted, axis=1)
    if not exact:
        # Beside labels, another column may be the one that was meant; read for its ids alone, a file's
        # other columns are its own (a sample submission's label, the ranks of `make audit`'s list).
        extra = [c for i, c in enumerate(header) if i not in positions]
        if extra and with_labels:
            log.warning("%s: ignoring columns %s", csv_path, listing(extra))
        table = table.apply(lambda column: column.str.strip())
        table = table[(table != "").any(axis=1)]
    if table.empty:
        raise error(f"{csv_path}: the CSV has a header but no rows.")
    check_rows(table, csv_path, with_labels, error)
    if with_labels:
        table = table.astype({HEADER[1]: np.int64})
    return table.reset_index(drop=True)


def _match(zip_path: Path, csv_path: Path, ids: list[str]) -> list[str]:
    """Member path for every id, failing on ids without an image."""
    images = list_images(zip_path)
    missing = [i for i in ids if i not in images]
    if missing:
        raise DataError(f"{csv_path}: {len(missing)} ids have no image in {zip_path}: {listing(missing)}.")
    unlabelled = sorted(set(images) - set(ids))
    if unlabelled:
        log.warning("%s: %d images are not listed in %s and will be skipped: %s",
                    zip_path, len(unlabelled), csv_path.name, listing(unlabelled))
    return [images[i] for i in ids]


def missing_files(data_dir: Path,
                  wanted: tuple[str | tuple[str, ...], ...] = (TRAIN_ZIP, TEST_ZIP, SAMPLE_SUBMISSION, LABEL_CSVS),
                  ) -> list[str]:
    """Which of the `wanted` competition files `data_dir` lacks (a tuple: any one of these names)."""
    missing = []
    for names in wanted:
        names = (names,) if isinstance(names, str) else names
        if not any((data_dir / name).is_file() for name in names):
            missing.append(" or ".join(names))
    return missing


def has_competition(data_dir: Path) -> bool:
    """True when data_dir holds the training zip and a label CSV."""
    return not missing_files(data_dir, (TRAIN_ZIP, LABEL_CSVS))


def refuse_partial(data_dir: Path) -> None:
    """A folder with some competition files but not the training zip and its labels is a mistake
    (a forgotten or misnamed file), never a reason to fall back to demo data."""
    found = [n for n in (TRAIN_ZIP, *LABEL_CSVS, TEST_ZIP, SAMPLE_SUBMISSION) if (data_dir / n).exists()]
    if not found or has_competition(data_dir):
        return
    missing = missing_files(data_dir, (TRAIN_ZIP, LABEL_CSVS))
    raise DataError(f"{data_dir} holds {', '.join(found)} but no {' and no '.join(missing)}: "
                    "add the missing file (check its name), or use an empty folder for demo data.")


def source_dir(data_dir: Path, demo: bool = True) -> Path:
    """Where a run reads its competition from: data_dir, or with no competition files there and
    `demo` on, its generated demo folder (data_dir/demo)."""
    if has_competition(data_dir) or not demo:
        return data_dir
    if not data_dir.is_dir():  # a mistyped DATA_DIR, never a reason to fall back to demo data
        raise DataError(f"{data_dir} does not exist: check DATA_DIR. Demo data is made in an existing folder "
                        "that holds no competition files, such as the project's data/.")
    refuse_partial(data_dir)
    return data_dir / DEMO_SUBDIR


def load_train(data_dir: Path) -> ImageTable:
    """The labelled training table from train_data.zip + train_labels.csv (or train_data.csv)."""
    csv_path = next((data_dir / c for c in LABEL_CSVS if (data_dir / c).exists()), data_dir / LABEL_CSVS[0])
    frame = read_id_csv(csv_path, with_labels=True)
    ids = frame["img_name"].tolist()
    members = _match(data_dir / TRAIN_ZIP, csv_path, ids)
    return ImageTable(data_dir / TRAIN_ZIP, ids, members, frame["label"].to_numpy())


def load_test(data_dir: Path) -> ImageTable:
    """The test table, in sample_submission.csv order when that file exists, else by file name."""
    zip_path = data_dir / TEST_ZIP
    sample = data_dir / SAMPLE_SUBMISSION
    if sample.exists():
        ids = read_id_csv(sample, with_labels=False)["img_name"].tolist()
        return ImageTable(zip_path, ids, _match(zip_path, sample, ids))
    images = list_images(zip_path)
    ids = sorted(images)
    return ImageTable(zip_path, ids, [images[i] for i in ids])
