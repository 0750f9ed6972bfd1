"""DataLoader settings of MalariaDataModule: augmentation seeds, and DDP shards."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import albumentations as A
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader

from malaria.data.sampling import ResumableLoader, ResumableSampler
from malaria.data import archive, splits
from malaria.data.datamodule import CellDataset, ConcatCells, MalariaDataModule, whole_batch
from malaria.data.augmentation import Augment, train_transform

BATCH = 8


@pytest.fixture
def same_image_cache(tmp_path: Path) -> Path:
    """A cache holding one random image 32 times: any difference in a batch is augmentation."""
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    path = tmp_path / "cache.npy"
    np.save(path, np.broadcast_to(image, (4 * BATCH, 16, 16, 3)))
    return path


def epoch_batches(cache_path: Path, workers: int, seed: int = 0, epoch: int = 0) -> list[torch.Tensor]:
    """The training batches of one epoch, as the datamodule's sampler orders and seeds them."""
    dataset = CellDataset(cache_path, np.arange(4 * BATCH), None, train_transform(Augment(on_device=False)))
    sampler = ResumableSampler(dataset, seed=seed)
    sampler.set_epoch(epoch)
    loader = ResumableLoader(dataset, batch_size=BATCH, sampler=sampler, num_workers=workers, collate_fn=whole_batch)
    return [batch[0] for batch in loader]


def test_augmentations_depend_on_seed_and_epoch_not_on_workers(same_image_cache: Path) -> None:
    """Each image is augmented from its own seed: forked workers, which inherit the parent's
    albumentations generators, neither repeat each other's draws nor change the result."""
    alone = epoch_batches(same_image_cache, workers=0)
    assert len({tuple(image.flatten().tolist()) for batch in alone for image in batch}) == 4 * BATCH
    assert all(torch.equal(a, b) for a, b in zip(alone, epoch_batches(same_image_cache, workers=2)))
    assert not torch.equal(alone[0], epoch_batches(same_image_cache, workers=0, epoch=1)[0])
    assert not torch.equal(alone[0], epoch_batches(same_image_cache, workers=0, seed=1)[0])


def test_seeded_transforms_draw_independently(tmp_path: Path) -> None:
    """Both flips have p=0.5: from one seed per image they must still combine in all 4 ways."""
    image = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3)
    np.save(tmp_path / "one.npy", image[None])
    flips = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)])
    dataset = CellDataset(tmp_path / "one.npy", np.zeros(1, dtype=np.int64), None, flips)
    outputs = {tuple(dataset[(0, seed)][0].flatten().tolist()) for seed in range(64)}
    assert len(outputs) == 4


def ddp_loaders(datamodule: MalariaDataModule, rank: int) -> tuple[DataLoader, DataLoader]:
    datamodule.trainer = SimpleNamespace(world_size=2, global_rank=rank,
                                         distributed_sampler_kwargs={"num_replicas": 2, "rank": rank})
    return datamodule.train_dataloader(), datamodule.val_dataloader()


def test_under_ddp_shards_are_disjoint_and_validation_counts_every_image_once(demo_dir: Path) -> None:
    datamodule = MalariaDataModule(data_dir=str(demo_dir), image_size=32, batch_size=BATCH, num_workers=0)
    datamodule.prepare_data()
    datamodule.setup("fit")
    (train0, val0), (train1, val1) = ddp_loaders(datamodule, 0), ddp_loaders(datamodule, 1)
    assert isinstance(train0.sampler, ResumableSampler) and train0.sampler.num_replicas == 2
    assert isinstance(val0.sampler, UnrepeatedDistributedSampler)

    rows = [np.concatenate([b[2].numpy() for b in loader]) for loader in (train0, train1)]
    assert not set(rows[0]) & set(rows[1]) and len(rows[0]) == len(rows[1])
    assert set(rows[0]) | set(rows[1]) <= set(datamodule.train_rows.tolist())

    val_rows = [np.concatenate([b[2].numpy() for b in loader]) for loader in (val0, val1)]
    assert sorted(np.concatenate(val_rows).tolist()) == sorted(datamodule.val_rows.tolist())


def test_one_device_trains_on_one_shard_and_validates_in_order(demo_dir: Path) -> None:
    datamodule = MalariaDataModule(data_dir=str(demo_dir), image_size=32, batch_size=BATCH, num_workers=0)
    datamodule.prepare_data()
    datamodule.setup("fit")
    sampler = datamodule.train_dataloader().sampler
    assert isinstance(sampler, ResumableSampler) and sampler.num_replicas == 1
    assert len(sampler) == len(datamodule.train_rows)
    rows = np.concatenate([b[2].numpy() for b in datamodule.val_dataloader()])
    assert rows.tolist() == datamodule.val_rows.tolist()


def test_train_cells_shrinks_the_training_side_only(demo_dir: Path) -> None:
    whole = MalariaDataModule(data_dir=str(demo_dir), image_size=32, num_workers=0)
    part = MalariaDataModule(data_dir=str(demo_dir), image_size=32, num_workers=0, train_cells=40)
    for datamodule in (whole, part):
        datamodule.prepare_data()
        datamodule.setup("fit")
    assert len(part.train_rows) == 40 and set(part.train_rows) < set(whole.train_rows)
    assert np.array_equal(part.val_rows, whole.val_rows)


def test_pseudo_labelled_test_cells_join_the_training_batches(demo_dir: Path, tmp_path: Path) -> None:
    reader = MalariaDataModule(data_dir=str(demo_dir), image_size=32, num_workers=0)
    reader.prepare_data()
    reader.setup("predict")
    named = reader.test_table.ids[:10]
    csv = tmp_path / "pseudo.csv"
    csv.write_text("img_name,label\n" + "".join(f"{name},1\n" for name in named))
    datamodule = MalariaDataModule(data_dir=str(demo_dir), image_size=32, num_workers=0, pseudo_labels=str(csv))
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.hparams.batch_size = len(datamodule.train_rows) + 10  # one batch holds the whole epoch
    (images, labels, rows), = list(datamodule.train_dataloader())
    assert len(images) == len(datamodule.train_rows) + 10
    assert labels.sum() == datamodule.train_table.labels[datamodule.train_rows].sum() + 10


def test_concatenated_cells_read_each_part_and_keep_the_batch_order(tmp_path: Path) -> None:
    for name, value in (("dark", 0), ("bright", 255)):
        np.save(tmp_path / f"{name}.npy", np.full((4, 8, 8, 3), value, dtype=np.uint8))
    dark = CellDataset(tmp_path / "dark.npy", np.arange(4), np.zeros(4))
    bright = CellDataset(tmp_path / "bright.npy", np.array([2, 3]), np.ones(4))
    images, labels, rows = ConcatCells([dark, bright]).__getitems__([5, 0, 4, (1, 7)])
    assert labels.tolist() == [1, 0, 1, 0] and rows.tolist() == [3, 0, 2, 1]
    assert images.flatten(1).amax(1).tolist() == [255, 0, 255, 0]


def test_pseudo_labels_for_cells_outside_the_test_set_are_refused(demo_dir: Path, tmp_path: Path) -> None:
    csv = tmp_path / "pseudo.csv"
    csv.write_text("img_name,label\nnot_a_test_cell.png,1\n")
    datamodule = MalariaDataModule(data_dir=str(demo_dir), image_size=32, num_workers=0, pseudo_labels=str(csv))
    datamodule.prepare_data()
    with pytest.raises(archive.DataError, match="pseudo.csv: 1 ids are not test cells.*not_a_test_cell.png"):
        datamodule.setup("fit")


def test_an_exclusion_list_is_read_as_every_id_csv(demo_dir: Path, tmp_path: Path) -> None:
    """data.exclude takes `id` for img_name as the label CSV does, refuses what the label CSV refuses
    (here a repeated id), and names the flag before the file."""
    whole = MalariaDataModule(data_dir=str(demo_dir), image_size=32, num_workers=0)
    whole.prepare_data()
    whole.setup("fit")
    names = [whole.train_table.ids[r] for r in whole.train_rows[:3]]
    cases = {"ids.csv": "id\n" + "".join(f" {name} \n" for name in names),
             "twice.csv": f"img_name\n{names[0]}\n{names[0]}\n"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)

    def setup(name: str) -> MalariaDataModule:
        datamodule = MalariaDataModule(data_dir=str(demo_dir), image_size=32, num_workers=0,
                                       exclude=str(tmp_path / name))
        datamodule.setup("fit")
        return datamodule

    assert set(setup("ids.csv").train_rows) == set(whole.train_rows[3:])
    with pytest.raises(archive.DataError, match=rf"duplicate ids '{re.escape(names[0])}': line 3 repeats"):
        setup("twice.csv")
    with pytest.raises(archive.DataError, match=r"^data\.exclude .*absent\.csv: file not found"):
        setup("absent.csv")


def test_every_recipe_states_its_holdout_split() -> None:
    """What a run validates on is the recipe's to say, never MalariaDataModule's default: `random`
    cells or whole `slide`s give figures that do not compare."""
    recipes = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
    splits = {p.name: yaml.safe_load(p.read_text()).get("data", {}).get("split") for p in recipes
              if p.name != "kaggle.yaml"}
    assert len(splits) >= 10 and {name: s for name, s in splits.items() if s not in ("random", "slide")} == {}


def test_slide_standardisation_reads_a_standardised_cache_for_training_and_prediction_alike(demo_dir: Path) -> None:
    """`stain_norm: slide` gives the model caches of standardised cells, the test cells' by their own
    slides' moments; the decoded caches stay as they were, and the slides' colours draw together."""
    plain = MalariaDataModule(data_dir=str(demo_dir), image_size=32, num_workers=0)
    normed = MalariaDataModule(data_dir=str(demo_dir), image_size=32, num_workers=0, stain_norm="slide")
    for datamodule in (plain, normed):
        datamodule.prepare_data()
        datamodule.setup("fit")
        datamodule.setup("predict")
    for split in ("train_cache", "test_cache"):
        before, after = getattr(plain, split), getattr(normed, split)
        assert "slidenorm" in after.name and before != after
        assert not np.array_equal(np.load(before), np.load(after))
    means = {}
    for name, datamodule in (("plain", plain), ("normed", normed)):
        images = np.load(datamodule.train_cache).astype(float)
        slides = np.array([splits.slide_of(i) for i in datamodule.train_table.ids])
        means[name] = np.array([images[slides == s].mean(axis=(0, 1, 2)) for s in np.unique(slides)])
    assert means["normed"].std(axis=0).mean() < means["plain"].std(axis=0).mean()
