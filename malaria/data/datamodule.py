"""The LightningDataModule: competition files in, batches of uint8 images out."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import albumentations as A
import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, Sampler

from malaria.data import archive, cache, colour, splits
from malaria.common.errors import ConfigError
from malaria.common.flags import Fraction, NonNegativeInt, PositiveInt
from malaria.data.sampling import ResumableLoader, ResumableSampler
from malaria.data.augmentation import Augment, train_transform

log = logging.getLogger(__name__)


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class CellDataset(Dataset):
    """Images from a memory-mapped cache, as (uint8 NCHW images, float labels, row indices).

    The DataLoader asks for whole batches (`__getitems__`): one read of the cache for all of a
    batch's rows, about 4x fewer CPU cycles than image by image; load it with
    `collate_fn=whole_batch`. Items are `i`, or `(i, seed)` from a `ResumableSampler`: the
    augmentation of that image is then drawn from its own seed, whatever worker or rank loads it.
    The cache is opened lazily in each process: a memmap pickled into a worker would be copied."""

    def __init__(self, cache_path: Path, rows: np.ndarray, labels: np.ndarray | None,
                 transform: A.Compose | None = None) -> None:
        self.cache_path = cache_path
        self.rows = rows
        self.labels = labels
        self.transform = transform
        self._images: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def images(self, rows: np.ndarray) -> np.ndarray:
        """The (len(rows), size, size, 3) uint8 images of these table rows, read from the cache."""
        if self._images is None:
            self._images = np.load(self.cache_path, mmap_mode="r")
        return self._images[rows]

    def augment(self, image: np.ndarray, seed: int | None) -> np.ndarray:
        if seed is not None:
            # One stream shared by all transforms: Compose.set_random_seed would give each
            # transform its own copy of the same stream, so that both flips always agree.
            self.transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
        return self.transform(image=image)["image"]

    def __getitems__(self, items: list[int | tuple[int, int]]) -> Batch:
        pairs = [item if isinstance(item, tuple) else (item, None) for item in items]
        rows = self.rows[[i for i, _ in pairs]]
        images = self.images(rows)
        if self.transform is not None:
            images = np.stack([self.augment(image, seed) for image, (_, seed) in zip(images, pairs)])
        labels = self.labels[rows].astype(np.float32) if self.labels is not None else np.full(len(rows), -1.0)
        return (torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
                torch.as_tensor(labels, dtype=torch.float32), torch.as_tensor(rows, dtype=torch.int64))

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        images, labels, rows = self.__getitems__([item])
        return images[0], labels[0], int(rows[0])


class ConcatCells(Dataset):
    """Several CellDatasets as one (the training cells and pseudo-labelled test cells): item i
    indexes their concatenation, and a batch still reads each part's rows at once."""

    def __init__(self, parts: Sequence[CellDataset]) -> None:
        self.parts = list(parts)
        self.offsets = np.cumsum([0, *(len(part) for part in self.parts)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitems__(self, items: list[int | tuple[int, int]]) -> Batch:
        index = np.array([item[0] if isinstance(item, tuple) else item for item in items])
        part_of = np.searchsorted(self.offsets, index, side="right") - 1
        batches = []
        for p, part in enumerate(self.parts):
            positions = np.flatnonzero(part_of == p)
            local = [(int(index[i] - self.offsets[p]), *items[i][1:]) if isinstance(items[i], tuple)
                     else int(index[i] - self.offsets[p]) for i in positions]
            if local:
                batches.append((positions, part.__getitems__(local)))
        order = torch.as_tensor(np.argsort(np.concatenate([positions for positions, _ in batches])))
        return tuple(torch.cat([batch[k] for _, batch in batches])[order] for k in range(3))


def whole_batch(batch: Batch) -> Batch:
    """The collate_fn of a DataLoader over a CellDataset, which hands out whole batches."""
    return batch


def default_workers(per_image_work: bool) -> int:
    """Half the cores, up to 8: the other half feed the model's own threads on a CPU machine.

    0 (the main process reads) on a CPU machine when workers would only read the cache (all
    augmentation on the device): handing a batch across processes then costs more than reading it
    (`make bench`, 2 cores: 7,800 images/s in the main process, 4,600 through one worker)."""
    if not per_image_work and not torch.cuda.is_available():
        return 0
    return min(8, max(1, (os.cpu_count() or 2) // 2))


class MalariaDataModule(L.LightningDataModule):
    """Reads train_data.zip + train_labels.csv and test_data.zip from `data_dir`.

    With no competition files there and `demo` on, it generates a small synthetic competition in
    `data_dir/demo` so a fresh clone trains end to end, and says so loudly.

    `stain_norm: slide` moves every cell by its slide's LAB moments to the typical slide's
    (Reinhard per slide, malaria.data.colour), in training, validation and prediction alike, once,
    into a cache of its own. A slide's moments come from all of its images that the competition
    hands out, training and test: colours need no labels, so a new patient's slide is
    standardised by its own test cells."""

    def __init__(
        self,
        data_dir: str = "data",
        image_size: PositiveInt | None = 64,
        val_fraction: Fraction = 0.2,
        fold: NonNegativeInt = 0,
        split: splits.Split = "random",
        train_cells: PositiveInt | None = None,
        exclude: str | None = None,
        pseudo_labels: str | None = None,
        seed: int = 42,
        batch_size: PositiveInt = 128,
        num_workers: NonNegativeInt | None = None,
        augment: Augment | None = None,
        stain_norm: Literal["none", "slide"] = "none",
        cache_dir: str | None = None,
        demo: bool = True,
    ) -> None:
        super().__init__()
        if val_fraction and fold >= splits.fold_count(val_fraction):
            raise ConfigError(f"data.fold {fold}: a holdout of data.val_fraction {val_fraction} has "
                              f"{splits.fold_count(val_fraction)} folds, numbered from 0.")
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.augment = augment or Augment()
        per_image_work = train_transform(self.augment) is not None
        self.num_workers = default_workers(per_image_work) if num_workers is None else num_workers
        self.train_table: archive.ImageTable | None = None
        self.test_table: archive.ImageTable | None = None
        self.train_rows = self.val_rows = np.empty(0, dtype=np.int64)
        self.train_cache: Path | None = None
        self.test_cache: Path | None = None
        self.pseudo: tuple[np.ndarray, np.ndarray] | None = None  # test rows, and labels of every test row
        self._tables: dict[str, archive.ImageTable] = {}
        self._decoded: dict[str, Path] = {}
        self._slide_colours: pd.DataFrame | None = None

    @property
    def source_dir(self) -> Path:
        """Where the competition files are read from: data_dir, or its demo folder."""
        return archive.source_dir(self.data_dir, self.hparams.demo)

    @property
    def cache_dir(self) -> Path:
        """Next to the data, unless that folder is read-only: then in the project's .cache/."""
        if self.hparams.cache_dir:
            return Path(self.hparams.cache_dir)
        source = self.source_dir
        # Mode bits, not os.access: root may write anywhere, but a read-only folder means "don't".
        if source.stat().st_mode & stat.S_IWUSR:
            return source / ".cache"
        return Path(".cache") / source.resolve().name

    def prepare_data(self) -> None:
        """Lightning's hook, on one process only: the caches a fit needs (the test one too where
        its zip is, so a bad test file fails before training), or the test one alone to predict."""
        if self.trainer is not None and self.trainer.state.fn == TrainerFn.PREDICTING:
            self.prepare(("test",))
        else:
            self.prepare(("train", "test") if (self.source_dir / archive.TEST_ZIP).exists() else ("train",))

    def prepare(self, needed: Sequence[Literal["train", "test"]]) -> None:
        """Make demo data if needed, check the tables of `needed`, then build their decode caches.

        Every table is checked before any cache is written: a bad file leaves the folder as it was.
        Prediction needs the test images alone; the slide prior reads training labels, not images."""
        if self.source_dir != self.data_dir:
            self._make_demo()
        elif not archive.has_competition(self.data_dir):
            raise archive.DataError(
                f"{self.data_dir} holds no train_data.zip + train_labels.csv; run `make data` or set data.demo: true."
            )
        if self.hparams.stain_norm == "slide":  # a slide's moments need every image of it
            needed = self._splits_present()
        tables = {split: self._table(split) for split in needed}  # every table checked first
        for split in tables:
            self._readable_cache(split)

    def _splits_present(self) -> list[Literal["train", "test"]]:
        return ["train", "test"] if (self.source_dir / archive.TEST_ZIP).exists() else ["train"]

    def _table(self, split: Literal["train", "test"]) -> archive.ImageTable:
        """The checked table of `split`, read once."""
        if split not in self._tables:
            load = archive.load_train if split == "train" else archive.load_test
            self._tables[split] = load(self.source_dir)
        return self._tables[split]

    def _decoded_cache(self, split: Literal["train", "test"]) -> Path:
        if split not in self._decoded:
            self._decoded[split] = cache.build(self._table(split), self.hparams.image_size, self.cache_dir, split)
        return self._decoded[split]

    def _readable_cache(self, split: Literal["train", "test"]) -> Path:
        """The cache the model reads: the decoded images, standardised by slide with `stain_norm: slide`."""
        decoded = self._decoded_cache(split)
        if self.hparams.stain_norm != "slide":
            return decoded
        slides = self.slide_colours()
        target = colour.reference(slides)
        ids = self._table(split).ids
        # The moments follow from the decoded caches, so their names name the transform too.
        sources = "|".join(self._decoded_cache(s).name for s in self._splits_present())
        tag = f"slidenorm{hashlib.sha256(sources.encode()).hexdigest()[:8]}"
        return cache.derive(decoded, tag, lambda images, rows: colour.standardise(images, ids[rows], slides, target))

    def slide_colours(self) -> pd.DataFrame:
        """Each slide's colour (malaria.data.colour.slide_colours) over all its training and test
        images as decoded; computed once."""
        if self._slide_colours is None:
            names, colours = [], []
            for split in self._splits_present():
                names += self._table(split).ids
                colours.append(colour.cell_colours(np.load(self._decoded_cache(split), mmap_mode="r")))
            self._slide_colours = colour.slide_colours(names, pd.concat(colours, ignore_index=True))
        return self._slide_colours

    def slide_moments(self) -> torch.Tensor:
        """(2, 6): the mean and the spread, over the slides of the training cells, of each slide's LAB
        moments: where RandStainNA draws its targets."""
        moments = self.slide_colours().loc[sorted(self.training_slides()), list(colour.LAB_COLUMNS)]
        return torch.tensor(np.stack([moments.mean(), moments.std(ddof=0)]), dtype=torch.float32)

    def _make_demo(self) -> None:
        from malaria.data.demo import make_demo_competition

        log.warning(
            "\n%s\nNo competition files in %s: training on SYNTHETIC DEMO DATA in %s.\n"
            "For the real competition put train_data.zip, train_labels.csv and test_data.zip in %s\n"
            "(`make data` downloads them with your Kaggle credentials).\n%s",
            "=" * 78, self.data_dir, self.source_dir, self.data_dir, "=" * 78,
        )
        make_demo_competition(self.source_dir)

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate") and self.train_cache is None:
            self.split()
            self.train_cache = self._readable_cache("train")
            rank_zero_info(self.split_summary)
        if stage == "fit" and self.hparams.pseudo_labels and self.pseudo is None:
            self.setup("predict")
            self.pseudo = self._pseudo_labelled(Path(self.hparams.pseudo_labels))
        if stage in ("test", "predict") and self.test_cache is None:
            self.test_table = self._table("test")
            self.test_cache = self._readable_cache("test")

    def split(self) -> None:
        """The training table and its two sides, `train_rows` and `val_rows` (no images read)."""
        if self.train_table is not None:
            return
        self.train_table = self._table("train")
        self.train_rows, self.val_rows = splits.holdout(
            self.train_table.labels, self.train_table.ids, self.hparams.val_fraction, self.hparams.seed,
            self.hparams.fold, self.hparams.split,
        )
        if self.hparams.exclude:  # suspect labels (make audit) leave training, never the holdout
            self.train_rows = self._without(self.train_rows, Path(self.hparams.exclude))
        if self.hparams.train_cells is not None:  # a learning curve's point; the holdout stays whole
            self.train_rows = splits.subsample(self.train_rows, self.train_table.labels,
                                               self.hparams.train_cells, self.hparams.seed)

    def training_slides(self) -> set[str]:
        """The slides of the cells the model trains on, whose colours its BatchNorm statistics hold."""
        self.split()
        return set(splits.groups([self.train_table.ids[r] for r in self.train_rows]))

    @property
    def split_summary(self) -> str:
        """How many cells, slides and parasitized cells each side of the holdout got."""
        labels, ids = self.train_table.labels, self.train_table.ids
        validation = splits.describe(labels, ids, self.val_rows) if len(self.val_rows) else "none (a full fit)"
        return (f"Holdout ({self.hparams.split} split): training {splits.describe(labels, ids, self.train_rows)}; "
                f"validation {validation}.")

    def _without(self, rows: np.ndarray, exclude_csv: Path) -> np.ndarray:
        """`rows` less the training cells named in the img_name column of `exclude_csv` (`make audit`'s
        label_issues.csv, or any list of ids), read and checked as every id CSV is."""
        try:
            excluded = archive.read_id_csv(exclude_csv, with_labels=False)["img_name"]
        except archive.DataError as err:  # the message starts with the file: name the flag before it
            raise archive.DataError(f"data.exclude {err}") from None
        index = {name: row for row, name in enumerate(self.train_table.ids)}
        unknown = [name for name in excluded if name not in index]
        if unknown:
            raise archive.DataError(f"{exclude_csv}: {len(unknown)} ids are not training cells of "
                                    f"{self.source_dir}, the first {unknown[0]!r}.")
        return np.setdiff1d(rows, [index[name] for name in excluded])

    def _pseudo_labelled(self, csv_path: Path) -> tuple[np.ndarray, np.ndarray]:
        """The test rows that `csv_path` (a submission, or any `img_name,label` CSV of test cells)
        labels, and labels for every test row (-1 where it gives none)."""
        frame = archive.read_id_csv(csv_path, with_labels=True)
        index = {name: row for row, name in enumerate(self.test_table.ids)}
        unknown = [name for name in frame["img_name"] if name not in index]
        if unknown:
            raise archive.DataError(f"data.pseudo_labels {csv_path}: {len(unknown)} ids are not test cells of "
                                    f"{self.source_dir}, the first {unknown[0]!r}.")
        rows = np.array([index[name] for name in frame["img_name"]], dtype=np.int64)
        labels = np.full(len(self.test_table), -1, dtype=np.int64)
        labels[rows] = frame["label"].astype(int).to_numpy()
        rank_zero_info(f"Pseudo-labels: {len(rows)} test cells from {csv_path} "
                       f"({int(labels[rows].sum())} parasitized) join the training cells.")
        return np.sort(rows), labels

    def _ranks(self) -> dict[str, int]:
        """num_replicas and rank under DDP; empty on one device."""
        trainer = self.trainer
        if trainer is None or trainer.world_size < 2:
            return {}
        return trainer.distributed_sampler_kwargs

    def _loader_kwargs(self) -> dict:
        workers = self.num_workers
        return {
            "batch_size": self.hparams.batch_size,
            "num_workers": workers,
            # Workers stay alive between epochs: restarting them costs more than an epoch of a small set.
            "persistent_workers": workers > 0,
            "collate_fn": whole_batch,
            "pin_memory": torch.cuda.is_available(),
            # The loader's own generator: it leaves the global RNG stream alone, which then depends
            # on neither the number of workers nor where a resumed run restarted.
            "generator": torch.Generator().manual_seed(self.hparams.seed),
        }

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        """In order; under DDP each rank gets its share with no padding repeats (Lightning's own
        sampler pads), so metrics reduced across ranks count every image exactly once."""
        ranks = self._ranks()
        sampler: Sampler | None = UnrepeatedDistributedSampler(dataset, shuffle=False, **ranks) if ranks else None
        return DataLoader(dataset, shuffle=False, sampler=sampler, **self._loader_kwargs())

    def train_dataloader(self) -> ResumableLoader:
        """Shuffled by (seed, epoch); under DDP the ranks' shards are disjoint (the remainder that
        does not divide evenly is dropped, a different few images each epoch)."""
        transform = train_transform(self.augment)
        dataset: Dataset = CellDataset(self.train_cache, self.train_rows, self.train_table.labels, transform)
        if self.pseudo is not None:
            rows, labels = self.pseudo
            dataset = ConcatCells([dataset, CellDataset(self.test_cache, rows, labels, transform)])
        sampler = ResumableSampler(dataset, seed=self.hparams.seed, **self._ranks())
        return ResumableLoader(dataset, sampler=sampler, drop_last=len(sampler) > self.hparams.batch_size,
                               **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(CellDataset(self.train_cache, self.val_rows, self.train_table.labels))

    def predict_dataloader(self) -> DataLoader:
        rows = np.arange(len(self.test_table))
        return self._eval_loader(CellDataset(self.test_cache, rows, None))

    @property
    def test_ids(self) -> list[str]:
        return self.test_table.ids
