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
        raise DataError(f"{zip_path}: the archive holds no PNG images.")

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


def read_id_csv(csv_path: Path, with_labels: bool) -> pd.DataFrame:
    """Read an `img_name,label` CSV (`id` accepted for `img_name`), checking ids and labels.

    A UTF-8 BOM, CRLF or CR line ends, blank lines and spaces around values are accepted; other
    columns are ignored with a warning. Errors give the line number as an editor shows it."""
    try:
        # Blank lines are kept while reading, so that row i is still line i + 2 in messages.
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skip_blank_lines=False,
                            encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{csv_path}: file not found.") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{csv_path}: not UTF-8 text ({err}); save it as a UTF-8 CSV.") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise DataError(f"{csv_path}: not a readable CSV ({str(err).strip()}).") from None

    frame.columns = [c.strip() for c in frame.columns]
    id_column = next((c for c in ID_COLUMNS if c in frame.columns), None)
    if id_column is None or (with_labels and "label" not in frame.columns):
        wanted = "img_name,label" if with_labels else "img_name"
        found = ",".join(frame.columns)
        raise DataError(f"{csv_path}: expected a header with {wanted}, found {found[:80]!r}.")
    wanted_columns = [id_column, "label"] if with_labels else [id_column]
    # a sample submission's label column is its format, not an extra
    extra = [c for c in frame.columns if c not in wanted_columns and c != "label"]
    if extra:
        log.warning("%s: ignoring columns %s", csv_path, listing(extra))
    frame = frame[wanted_columns].rename(columns={id_column: "img_name"}).apply(lambda c: c.str.strip())
    frame = frame[(frame != "").any(axis=1)]
    if frame.empty:
        raise DataError(f"{csv_path}: the CSV has a header but no rows.")

    blank = frame.index[frame["img_name"] == ""]
    if len(blank):
        raise DataError(f"{csv_path}: empty img_name on line {blank[0] + 2}.")
    duplicated = frame["img_name"][frame["img_name"].duplicated()].tolist()
    if duplicated:
        raise DataError(f"{csv_path}: duplicate ids {listing(duplicated)}.")
    if with_labels:
        bad = frame.index[~frame["label"].isin(["0", "1"])]
        if len(bad):
            row = bad[0]
            raise DataError(
                f"{csv_path}: line {row + 2} ({frame['img_name'][row]}) has label {frame['label'][row]!r}; "
                "labels must be 0 (uninfected) or 1 (parasitized)."
            )
        frame["label"] = frame["label"].astype(np.int64)
    return frame.reset_index(drop=True)


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
