"""Hostile inputs: each bad competition file either fails with a message naming the file, line or
zip member at fault, or is recovered from in a documented way (with a warning where information
is dropped). In every case the existing runs, caches and submissions stay byte-for-byte as they
were. Every input is generated here; the test ids read as the behaviour table of issue 8.

Inputs go through `MalariaDataModule.prepare_data` + `setup`, the code `make train` and
`make predict` run before the first batch; then the whole table again through `make train`'s own
command, in child processes, for what the user sees; the last tests go through the training CLI.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from runner import REPO, Result, run_commands
from conftest import TINY, cell, png_bytes, write_competition, write_zip
from PIL import Image

from malaria.data import cache
from malaria.commands import train
from malaria.data.archive import DataError
from malaria.data.datamodule import MalariaDataModule
from malaria.prediction.submission import SubmissionError, validate_submission, write_submission

SIZE = 16  # cache image size
N = 8  # training images per generated competition


# ----------------------------------------------------------------------------------------------
# The user's precious files, and proof that nothing touched them


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under root: (size, mtime in ns, sha256), by relative path."""
    return {
        str(p.relative_to(root)): (
            p.stat().st_size,
            p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@dataclass
class Workspace:
    """A finished run, the decode caches of a good competition, and a submission, as a user has them."""

    root: Path

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def submission(self) -> Path:
        return self.root / "submissions" / "old.csv"

    def assert_untouched(self, before: dict, new_files_allowed: bool = False) -> None:
        """No existing file changed or vanished, and no new file unless a recovered input made a new cache."""
        after = snapshot(self.root)
        assert {k: after.get(k) for k in before} == before
        new = sorted(set(after) - set(before))
        if new_files_allowed:
            assert all(n.startswith("cache/") and not n.split("/")[-1].startswith(".") for n in new), new
        else:
            assert new == []


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    ws = Workspace(tmp_path_factory.mktemp("workspace"))
    run = ws.runs_dir / "old"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "summary.json", "metrics.csv", "environment.json"):
        (run / name).write_text(f"the user's {name}")
    for name in ("best.ckpt", "last.ckpt"):
        torch.save(
            {"epoch": 3, "global_step": 120, "state_dict": {"w": torch.ones(2)}}, run / "checkpoints" / name
        )
    good = write_competition(tmp_path_factory.mktemp("good"), n=N)
    datamodule = load(good, ws.cache_dir)
    write_submission(
        datamodule.test_ids,
        np.arange(len(datamodule.test_ids)) % 2,
        ws.submission,
        metadata={"runs": ["old"]},
    )
    return ws


@pytest.fixture
def before(workspace: Workspace) -> dict:
    return snapshot(workspace.root)


def load(folder: Path, cache_dir: Path) -> MalariaDataModule:
    """Read, check and cache a competition folder the way training and prediction do."""
    # val_fraction 0.5: two folds, which a handful of images can stratify by slide.
    datamodule = MalariaDataModule(
        data_dir=str(folder),
        image_size=SIZE,
        val_fraction=0.5,
        num_workers=0,
        cache_dir=str(cache_dir),
        demo=False,
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.setup("predict")
    return datamodule


# ----------------------------------------------------------------------------------------------
# Generators of bad inputs. Each edits a fresh good competition and returns the culprit's name.


def train_members(folder: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(folder / "train_data.zip") as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def first_member(folder: Path) -> str:
    return min(train_members(folder))


def first_id(folder: Path) -> str:
    return Path(first_member(folder)).name


def ids(folder: Path) -> list[str]:
    return [Path(m).name for m in sorted(train_members(folder))]


def add_members(folder: Path, extra: dict[str, bytes]) -> None:
    write_zip(folder / "train_data.zip", {**train_members(folder), **extra})


def replace_first_image(folder: Path, data: bytes) -> str:
    member = first_member(folder)
    add_members(folder, {member: data})
    return member


def write_labels(folder: Path, text: str | bytes) -> str:
    path = folder / "train_labels.csv"
    if isinstance(text, str):
        text = text.encode()
    path.write_bytes(text)
    return path.name


def labels_csv(
    folder: Path, label_of_first: str = "0", header: str = "img_name,label", end: str = "\n"
) -> str:
    """The competition's label CSV with the first id's label replaced."""
    rows = [f"{i},{label_of_first if n == 0 else n % 2}" for n, i in enumerate(ids(folder))]
    return end.join([header, *rows]) + end


def png_raw(width: int, height: int, bit_depth: int, color_type: int, rows: bytes = b"") -> bytes:
    """A PNG written by hand, for what PIL cannot write (16-bit RGB) or should not decode (huge sizes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def png_16bit(image: np.ndarray, color_type: int) -> bytes:
    """8-bit pixels stretched to 16 bits (v * 257), each row prefixed with filter type 0."""
    wide = (image.astype(">u2") * 257).reshape(image.shape[0], -1)
    return png_raw(
        image.shape[1], image.shape[0], 16, color_type, b"".join(b"\x00" + row.tobytes() for row in wide)
    )


def store_first_image_twice(folder: Path) -> str:
    """Zip tools can append an entry under a name already present; both copies stay in the archive."""
    member = first_member(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile's "Duplicate name"
        with zipfile.ZipFile(folder / "train_data.zip", "a") as archive:
            archive.writestr(member, png_bytes(cell(99)))
    return member


def patch_member(folder: Path, edit: Callable[[bytearray, zipfile.ZipInfo], None]) -> str:
    """Edit the raw zip bytes of the first member: a damaged download, or a foreign zip tool."""
    path = folder / "train_data.zip"
    member = first_member(folder)
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    data = bytearray(path.read_bytes())
    edit(data, info)
    path.write_bytes(bytes(data))
    return member


def flip_a_data_byte(data: bytearray, info: zipfile.ZipInfo) -> None:
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    data[start + 60] ^= 0xFF


def deflate64(data: bytearray, info: zipfile.ZipInfo) -> None:
    """Mark the member as Deflate64 (method 9), which Windows Explorer uses for big archives."""
    method = struct.pack("<H", 9)
    data[info.header_offset + 8 : info.header_offset + 10] = method  # local header
    entry = data.find(b"PK\x01\x02")  # central directory: find this member's entry
    while data[entry + 46 : entry + 46 + len(info.filename)] != info.filename.encode():
        entry = data.find(b"PK\x01\x02", entry + 4)
    data[entry + 10 : entry + 12] = method


# ----------------------------------------------------------------------------------------------
# Inputs that must stop the pipeline with a message naming the culprit


@dataclass(frozen=True)
class Fails:
    file: str  # the file the message must name
    pattern: str  # regex the message must match; {culprit} stands for what the generator returned
    cli_pattern: str | None = None  # where `make train` words it otherwise (it looks for demo data first)


FAILING = [
    # zips
    pytest.param(
        lambda f: (f / "train_data.zip").write_bytes((f / "train_data.zip").read_bytes()[:300]),
        Fails("train_data.zip", "not a readable zip archive.*Download it again"),
        id="truncated zip -> error naming the zip, asks to download again",
    ),
    pytest.param(
        lambda f: (f / "train_data.zip").write_text("<html>Please sign in</html>"),
        Fails("train_data.zip", "not a readable zip archive"),
        id="html page saved as zip -> error naming the zip",
    ),
    pytest.param(
        lambda f: write_zip(f / "train_data.zip", {}),
        Fails("train_data.zip", "holds no PNG or JPEG images"),
        id="zip with zero members -> error",
    ),
    pytest.param(
        lambda f: write_zip(f / "train_data.zip", {"train/readme.txt": b"hi", "__MACOSX/._a.png": b"x"}),
        Fails("train_data.zip", "holds no PNG or JPEG images"),
        id="zip with only text and junk -> error",
    ),
    pytest.param(
        lambda f: add_members(f, {"../evil.png": png_bytes(cell(0))}),
        Fails("train_data.zip", "unsafe member paths '../evil.png'"),
        id="member path with .. -> error naming it, archive refused",
    ),
    pytest.param(
        lambda f: add_members(f, {"/etc/evil.png": png_bytes(cell(0))}),
        Fails("train_data.zip", "unsafe member paths '/etc/evil.png'"),
        id="absolute member path -> error naming it, archive refused",
    ),
    pytest.param(
        lambda f: add_members(f, {"copy/" + first_id(f): png_bytes(cell(0))}) or first_id(f),
        Fails("train_data.zip", "same file name appears in several folders.*{culprit}"),
        id="same file name in two folders -> error naming both",
    ),
    pytest.param(
        store_first_image_twice,
        Fails("train_data.zip", "members stored twice: '{culprit}'; re-create the archive"),
        id="same member stored twice -> error naming it",
    ),
    pytest.param(
        lambda f: patch_member(f, flip_a_data_byte),
        Fails("train_data.zip", "{culprit}.*Bad CRC-32"),
        id="damaged member (bad CRC) -> error naming the member",
    ),
    pytest.param(
        lambda f: patch_member(f, deflate64),
        Fails("train_data.zip", "{culprit}.*compression method is not supported"),
        id="member in unsupported compression (Deflate64) -> error naming the member",
    ),
    # images
    pytest.param(
        lambda f: replace_first_image(f, b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4),
        Fails("train_data.zip", "1 images cannot be decoded: {culprit}"),
        id="corrupt PNG bytes -> error naming the member",
    ),
    pytest.param(
        lambda f: replace_first_image(f, png_bytes(cell(0, 64))[:-200]),
        Fails("train_data.zip", "{culprit} .*truncated"),
        id="truncated PNG -> error naming the member",
    ),
    pytest.param(
        lambda f: replace_first_image(f, b"hello, I am not an image"),
        Fails("train_data.zip", "{culprit} .*cannot identify image"),
        id="text file named .png -> error naming the member",
    ),
    pytest.param(
        lambda f: replace_first_image(f, png_raw(10_000, 10_000, 8, 2)),
        Fails("train_data.zip", "{culprit} .*DecompressionBomb"),
        id="100-megapixel PNG -> refused before decoding, error naming the member",
    ),
    # label CSVs
    pytest.param(
        lambda f: write_labels(f, "name,target\na.png,1\n"),
        Fails("train_labels.csv", "expected a header with img_name,label, found 'name,target'"),
        id="CSV with wrong header -> error showing the header found",
    ),
    pytest.param(
        lambda f: write_labels(f, labels_csv(f).split("\n", 1)[1]),
        Fails("train_labels.csv", "expected a header with img_name,label, found 'C1"),
        id="CSV without header -> error showing the first row",
    ),
    pytest.param(
        lambda f: write_labels(f, labels_csv(f).replace(",", ";")),
        Fails("train_labels.csv", "expected a header with img_name,label, found 'img_name;label'"),
        id="CSV separated by semicolons -> error showing the header found",
    ),
    pytest.param(
        lambda f: write_labels(f, labels_csv(f) + f"{first_id(f)},1\n") and first_id(f),
        Fails("train_labels.csv", "duplicate ids '{culprit}'"),
        id="duplicate ids -> error naming them",
    ),
    pytest.param(
        lambda f: write_labels(f, labels_csv(f) + "lost.png,1\n") and "lost.png",
        Fails("train_labels.csv", "1 ids have no image in .*train_data.zip: '{culprit}'"),
        id="ids missing from the zip -> error naming them",
    ),
    *[
        pytest.param(
            lambda f, bad=bad: write_labels(f, labels_csv(f, bad)) and first_id(f),
            Fails("train_labels.csv", rf"line 2 \({{culprit}}\) has label '{re.escape(bad)}'"),
            id=f"label {bad!r} -> error naming line",
        )
        for bad in ("1.0", "yes", "2", "")
    ],
    pytest.param(
        lambda f: write_labels(f, "\n\n".join(labels_csv(f, "x").split("\n"))) and first_id(f),
        Fails("train_labels.csv", r"line 3 \({culprit}\) has label 'x'"),
        id="blank lines before a bad row -> error with the line number an editor shows",
    ),
    pytest.param(
        lambda f: write_labels(f, labels_csv(f).replace(first_id(f), " ")),
        Fails("train_labels.csv", "empty img_name on line 2"),
        id="empty id -> error naming line",
    ),
    pytest.param(
        lambda f: write_labels(f, ""),
        Fails("train_labels.csv", "not a readable CSV"),
        id="empty CSV -> error",
    ),
    pytest.param(
        lambda f: write_labels(f, "img_name,label\n"),
        Fails("train_labels.csv", "header but no rows"),
        id="CSV with header only -> error",
    ),
    pytest.param(
        lambda f: write_labels(f, labels_csv(f).replace(",1\n", ",1,7\n", 1)),
        Fails("train_labels.csv", "not a readable CSV .*Expected 2 fields in line 3, saw 3"),
        id="row with a third field under a 2-column header -> error naming the line",
    ),
    pytest.param(
        lambda f: write_labels(f, (labels_csv(f) + "caf\u00e9.png,1\n").encode("latin-1")),
        Fails("train_labels.csv", "not UTF-8 text.*save it as a UTF-8 CSV"),
        id="Latin-1 CSV -> error asking for UTF-8",
    ),
    pytest.param(
        lambda f: (f / "train_data.zip").unlink(),
        Fails("", "holds no train_data.zip", cli_pattern="holds train_labels.csv, test_data.zip but no train_data.zip"),
        id="training zip missing -> error saying what to put where",
    ),
    # test side
    pytest.param(
        lambda f: (
            (f / "sample_submission.csv").write_text("img_name,label\nnot-in-test.png,0\n")
            and "not-in-test.png"
        ),
        Fails("sample_submission.csv", "1 ids have no image in .*test_data.zip: '{culprit}'"),
        id="sample_submission id missing from the test zip -> error naming it",
    ),
    pytest.param(
        lambda f: (f / "test_data.zip").write_bytes(b"PK\x03\x04 cut short"),
        Fails("test_data.zip", "not a readable zip archive"),
        id="truncated test zip -> error naming it",
    ),
]


@pytest.mark.parametrize(("make_bad", "expected"), FAILING)
def test_bad_input_fails_naming_the_culprit(
    make_bad: Callable[[Path], str | None],
    expected: Fails,
    tmp_path: Path,
    workspace: Workspace,
    before: dict,
) -> None:
    folder = write_competition(tmp_path / "data", n=N)
    culprit = make_bad(folder)
    pattern = expected.pattern.replace("{culprit}", re.escape(culprit) if isinstance(culprit, str) else "")
    with pytest.raises(DataError, match=pattern) as error:
        load(folder, workspace.cache_dir)
    assert str(folder / expected.file) in str(error.value)
    workspace.assert_untouched(before)  # every table is checked before any cache is written


@dataclass(frozen=True)
class CommandRun:
    folder: Path
    culprit: str | None
    before: dict
    result: Result


@pytest.fixture(scope="module")
def train_commands(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CommandRun]:
    """`make train` on every bad input of the table, all in one batch of child processes."""
    root = tmp_path_factory.mktemp("commands")
    cases, commands = {}, []
    for param in FAILING:
        make_bad = param.values[0]
        folder = write_competition(root / f"case{len(cases)}" / "data", n=N)
        culprit = make_bad(folder)
        cases[param.id] = (folder, culprit, snapshot(folder))
        commands.append(("malaria.commands.train", [
            "fit", *TINY, "--data.data_dir", str(folder), "--data.cache_dir", str(folder.parent / "cache"),
            "--data.image_size", str(SIZE),
        ], folder.parent))
    results = run_commands(commands, root / "logs")
    return {case: CommandRun(*cases[case], result) for case, result in zip(cases, results)}


@pytest.mark.parametrize(("make_bad", "expected"), FAILING)
def test_make_train_on_bad_input_prints_one_paragraph(
    make_bad: Callable[[Path], str | None], expected: Fails, request: pytest.FixtureRequest,
    train_commands: dict[str, CommandRun],
) -> None:
    run = train_commands[request.node.callspec.id]
    stderr = run.result.stderr
    assert run.result.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr and "error: " in stderr, stderr[-3000:]
    message = stderr[stderr.index("error: "):].strip()
    assert "\n" not in message, message  # one paragraph, nothing after it
    culprit = re.escape(run.culprit) if isinstance(run.culprit, str) else ""
    assert re.search((expected.cli_pattern or expected.pattern).replace("{culprit}", culprit), message), message
    assert str(run.folder / expected.file) in message
    assert snapshot(run.folder) == run.before  # the competition folder is as the user left it
    assert not list(run.folder.parent.glob("runs/*/checkpoints/*"))


# ----------------------------------------------------------------------------------------------
# Inputs that are recovered from: what is kept, what is dropped, and the warning that says so


@dataclass(frozen=True)
class Recovers:
    images: int  # training images kept
    warning: str | None  # regex the log must match; None: accepted silently, nothing is dropped


RECOVERED = [
    pytest.param(
        lambda f: add_members(f, {"train/notes.txt": b"some notes"}),
        Recovers(N, "ignoring 1 non-image members: 'train/notes.txt'"),
        id="text file next to the images -> ignored with a warning",
    ),
    pytest.param(
        lambda f: add_members(f, {"__MACOSX/train/._" + first_id(f): b"\x00\x05\x16\x07 resource fork"}),
        Recovers(N, None),
        id="__MACOSX resource forks -> ignored",
    ),
    pytest.param(
        lambda f: add_members(f, {"train/.DS_Store": b"\x00\x00\x00\x01Bud1", "train/.hidden.png": b"x"}),
        Recovers(N, None),
        id="hidden files -> ignored",
    ),
    pytest.param(
        lambda f: replace_first_image(f, _jpeg(cell(0))),
        Recovers(N, None),
        id="JPEG inside a .png member -> decoded by content",
    ),
    pytest.param(
        lambda f: write_labels(
            f, "img_name,label,slide\n" + "".join(f"{i},{n % 2},C{n}\n" for n, i in enumerate(ids(f)))
        ),
        Recovers(N, "ignoring columns 'slide'"),
        id="extra CSV columns -> ignored with a warning",
    ),
    pytest.param(
        lambda f: write_labels(f, labels_csv(f, header="id,label")),
        Recovers(N, None),
        id="id instead of img_name header -> accepted",
    ),
    pytest.param(
        lambda f: write_labels(f, "\ufeff" + labels_csv(f)), Recovers(N, None), id="UTF-8 BOM -> accepted"
    ),
    pytest.param(
        lambda f: write_labels(f, labels_csv(f, end="\r\n")),
        Recovers(N, None),
        id="CRLF line ends -> accepted",
    ),
    pytest.param(
        lambda f: write_labels(f, labels_csv(f, end="\r")),
        Recovers(N, None),
        id="CR-only line ends (old Mac) -> accepted",
    ),
    pytest.param(
        lambda f: write_labels(f, "\n\n  \n".join(labels_csv(f).split("\n"))),
        Recovers(N, None),
        id="blank and whitespace-only lines -> skipped",
    ),
    pytest.param(
        lambda f: write_labels(f, labels_csv(f).replace(",", " , ")),
        Recovers(N, None),
        id="spaces around values -> stripped",
    ),
    pytest.param(
        lambda f: write_labels(f, labels_csv(f).split("\n", 2)[0] + "\n" + labels_csv(f).split("\n", 2)[2]),
        Recovers(N - 1, "1 images are not listed in train_labels.csv and will be skipped"),
        id="images without labels -> skipped with a warning naming them",
    ),
]


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


@pytest.mark.parametrize(("make_odd", "expected"), RECOVERED)
def test_recoverable_input_is_recovered_as_documented(
    make_odd: Callable[[Path], object],
    expected: Recovers,
    tmp_path: Path,
    workspace: Workspace,
    before: dict,
    caplog: pytest.LogCaptureFixture,
) -> None:
    folder = write_competition(tmp_path / "data", n=N)
    make_odd(folder)
    with caplog.at_level(logging.WARNING, logger="malaria"):
        datamodule = load(folder, workspace.cache_dir)
    assert len(datamodule.train_table) == expected.images
    assert set(datamodule.train_table.labels.tolist()) == {0, 1}
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("malaria.data.archive")]
    if expected.warning is None:
        assert warnings == []
    else:
        assert any(re.search(expected.warning, w) for w in warnings), warnings
    images = np.load(datamodule.train_cache)
    assert (
        images.shape == (expected.images, SIZE, SIZE, 3)
        and images.reshape(expected.images, -1).std(1).min() > 5
    )
    workspace.assert_untouched(before, new_files_allowed=True)


# ----------------------------------------------------------------------------------------------
# Unusual but valid PNGs: decoded to exactly the pixels an 8-bit RGB PNG of the same picture gives


PICTURE = cell(3, 12)[:, :10]  # 12 x 10 RGB
GRAY = PICTURE[..., 0]
OPAQUE = np.full(GRAY.shape, 255, np.uint8)
HALF_SEEN = (np.indices(GRAY.shape).sum(0) % 2 * 255).astype(np.uint8)  # checkerboard of clear and opaque
FEW_COLOURS = PICTURE // 64 * 64  # at most 64 colours: a palette holds them exactly


def _with_palette(image: np.ndarray, transparent_index: int | None = None) -> bytes:
    colours, index = np.unique(image.reshape(-1, 3), axis=0, return_inverse=True)
    paletted = Image.fromarray(index.reshape(image.shape[:2]).astype(np.uint8))
    paletted = paletted.convert("P")
    paletted.putpalette(colours.astype(np.uint8).tobytes())
    buffer = io.BytesIO()
    paletted.save(
        buffer, format="PNG", **({} if transparent_index is None else {"transparency": transparent_index})
    )
    return buffer.getvalue()


def _palette_first_colour_clear(image: np.ndarray) -> tuple[bytes, np.ndarray]:
    data = _with_palette(image, transparent_index=0)
    with Image.open(io.BytesIO(data)) as paletted:
        clear = np.asarray(paletted) == 0
    return data, np.where(clear[..., None], 0, image)


UNUSUAL = [
    pytest.param(lambda: (png_16bit(PICTURE, 2), PICTURE), id="16-bit RGB PNG -> same pixels as 8-bit"),
    pytest.param(
        lambda: (png_16bit(np.dstack([PICTURE, OPAQUE]), 6), PICTURE), id="16-bit RGBA PNG -> same pixels"
    ),
    pytest.param(
        lambda: (png_bytes(GRAY.astype(np.uint16) * 257), np.dstack([GRAY] * 3)),
        id="16-bit grayscale PNG -> gray copied to R, G and B",
    ),
    pytest.param(
        lambda: (png_bytes(GRAY), np.dstack([GRAY] * 3)), id="8-bit grayscale PNG -> gray copied to RGB"
    ),
    pytest.param(
        lambda: (png_bytes(np.dstack([GRAY, OPAQUE])), np.dstack([GRAY] * 3)),
        id="grayscale + alpha PNG -> gray copied to RGB",
    ),
    pytest.param(
        lambda: (png_bytes(GRAY > 128), np.dstack([(GRAY > 128) * np.uint8(255)] * 3)),
        id="1-bit PNG -> black and white",
    ),
    pytest.param(
        lambda: (png_bytes(np.dstack([PICTURE, HALF_SEEN])), PICTURE * (HALF_SEEN[..., None] > 0)),
        id="RGBA PNG -> transparent pixels black, like the crops' background",
    ),
    pytest.param(lambda: (_with_palette(FEW_COLOURS), FEW_COLOURS), id="palette PNG -> same pixels"),
    pytest.param(
        lambda: _palette_first_colour_clear(FEW_COLOURS), id="palette PNG with a transparent colour -> black"
    ),
    pytest.param(
        lambda: (png_bytes(PICTURE[:1, :1]), PICTURE[:1, :1]), id="1x1 PNG -> one colour, padded and resized"
    ),
    pytest.param(
        lambda: (
            png_bytes(np.kron(PICTURE, np.ones((200, 200, 1), np.uint8))),
            np.kron(PICTURE, np.ones((200, 200, 1), np.uint8)),
        ),
        id="2400x2000 PNG -> decoded and resized like any other",
    ),
]


@pytest.mark.parametrize("make_png", UNUSUAL)
def test_unusual_png_gives_the_pixels_of_its_rgb_twin(
    make_png: Callable[[], tuple[bytes, np.ndarray]], tmp_path: Path, workspace: Workspace, before: dict
) -> None:
    data, rgb = make_png()
    folder = write_competition(tmp_path / "data", n=N)
    member = replace_first_image(folder, data)
    datamodule = load(folder, workspace.cache_dir)
    row = datamodule.train_table.members.index(member)
    np.testing.assert_array_equal(
        np.load(datamodule.train_cache)[row], cache.square(Image.fromarray(rgb), SIZE)
    )
    workspace.assert_untouched(before, new_files_allowed=True)


# ----------------------------------------------------------------------------------------------
# Submission CSVs for another test set: refused, and the user's file left as it was


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param(
            lambda ids: ids[:-1] + ["other.png"],
            "missing 1 ids.*1 unexpected ids, first on line",
            id="submission with wrong ids -> error naming the missing and unexpected ids",
        ),
        pytest.param(
            lambda ids: ids[::-1],
            "line 2 has id .* but .* is expected there",
            id="submission in the wrong order -> error naming the first misplaced line",
        ),
        pytest.param(
            lambda ids: [*ids, "one-more.png"],
            r"\d+ rows but \d+ expected ids",
            id="submission with the wrong row count -> error giving both counts",
        ),
    ],
)
def test_wrong_submission_is_refused_and_left_alone(
    change: Callable[[list[str]], list[str]], message: str, workspace: Workspace, before: dict
) -> None:
    written = validate_submission(workspace.submission)["img_name"].tolist()
    with pytest.raises(SubmissionError, match=re.escape(str(workspace.submission)) + ".*" + message):
        validate_submission(workspace.submission, change(written))
    workspace.assert_untouched(before)


# ----------------------------------------------------------------------------------------------
# The training CLI on bad input: the run stops before touching any existing run


def _fit_on_bad_labels(tmp_path: Path, workspace: Workspace, run: str, *extra: str) -> None:
    folder = write_competition(tmp_path / "bad", n=N)
    write_labels(folder, labels_csv(folder, "yes"))
    with pytest.raises(DataError, match="has label 'yes'"):
        train.main(["fit", "--config", "configs/default.yaml", "--data.data_dir", str(folder),
                    "--data.cache_dir", str(workspace.cache_dir), "--runs_dir", str(workspace.runs_dir),
                    "--run", run, "--wandb.mode", "disabled", *extra])


def test_training_on_bad_input_leaves_existing_runs_alone(
    tmp_path: Path, workspace: Workspace, before: dict
) -> None:
    _fit_on_bad_labels(tmp_path, workspace, "new")
    after = snapshot(workspace.root)
    assert {k: after.get(k) for k in before} == before
    assert all(k.startswith("runs/new/") for k in set(after) - set(before))


def test_resuming_on_bad_input_leaves_the_run_alone(
    tmp_path: Path, workspace: Workspace, before: dict
) -> None:
    last = workspace.runs_dir / "old" / "checkpoints" / "last.ckpt"
    _fit_on_bad_labels(tmp_path, workspace, "old", "--ckpt_path", str(last))
    workspace.assert_untouched(before)
