import numpy as np
import pytest

from malaria import splits


@pytest.mark.parametrize(
    ("name", "slide"),
    [
        ("C33P1thinF_IMG_20150619_114756a_cell_179.png", "C33P1"),
        ("C182P143NThinF_IMG_20151201_172842_cell_27.png", "C182P143"),
        ("C73P34_ThinF_IMG_20150815_112246_cell_180.png", "C73P34"),
        ("C1_thinF_IMG_20150604_104722_cell_9.png", "C1"),
        ("C211ThinF_IMG_20151029_164033_cell_47.png", "C211"),
        ("cell_001.png", None),
        ("Cat_photo.png", None),
    ],
)
def test_slide_of(name: str, slide: str | None) -> None:
    assert splits.slide_of(name) == slide


def _names(n_slides: int, per_slide: int) -> tuple[list[str], np.ndarray]:
    names = [f"C{s}P{s}ThinF_IMG_1_cell_{i}.png" for s in range(n_slides) for i in range(per_slide)]
    labels = np.array([(s + i) % 2 for s in range(n_slides) for i in range(per_slide)])
    return names, labels


def test_holdout_keeps_each_slide_on_one_side() -> None:
    names, labels = _names(20, 10)
    train, val = splits.holdout(labels, names, 0.2, seed=0)
    slides = splits.groups(names)
    assert not set(slides[train]) & set(slides[val])
    assert len(train) + len(val) == len(names)
    assert 0.1 < len(val) / len(names) < 0.3


def test_holdout_depends_on_seed_and_is_reproducible() -> None:
    names, labels = _names(20, 10)
    a = splits.holdout(labels, names, 0.2, seed=0)[1]
    assert np.array_equal(a, splits.holdout(labels, names, 0.2, seed=0)[1])
    assert not np.array_equal(a, splits.holdout(labels, names, 0.2, seed=1)[1])


def test_names_without_slides_fall_back_to_stratified() -> None:
    names = [f"img_{i}.png" for i in range(100)]
    labels = np.array([i % 2 for i in range(100)])
    train, val = splits.holdout(labels, names, 0.2, seed=0)
    assert len(val) == 20 and labels[val].sum() == 10


def test_kfold_covers_every_image_once_in_validation() -> None:
    names, labels = _names(15, 6)
    folds = splits.kfold(labels, names, 5, seed=0)
    seen = np.concatenate([val for _, val in folds])
    assert sorted(seen.tolist()) == list(range(len(names)))


def test_random_split_ignores_slides_but_keeps_class_balance() -> None:
    names, labels = _names(20, 10)
    train, val = splits.holdout(labels, names, 0.2, seed=0, split="random")
    slides = splits.groups(names)
    assert len(val) == 40 and labels[val].sum() == 20
    assert len(set(slides[train]) & set(slides[val])) > 10  # cells of one slide on both sides


def test_unknown_split_is_refused() -> None:
    names, labels = _names(4, 5)
    with pytest.raises(ValueError, match="split must be"):
        splits.kfold(labels, names, 2, seed=0, split="patient")


def test_no_holdout_is_a_full_fit() -> None:
    names, labels = _names(4, 5)
    train, val = splits.holdout(labels, names, 0, seed=0)
    assert train.tolist() == list(range(20)) and len(val) == 0
    with pytest.raises(ValueError, match="val_fraction"):
        splits.holdout(labels, names, 1.0, seed=0)


def test_subsample_keeps_class_proportions_and_is_seeded() -> None:
    rows, labels = np.arange(100, 300), np.array([0] * 100 + [1] * 40 + [0] * 160)
    taken = splits.subsample(rows, labels, 50, seed=0)
    assert len(taken) == len(set(taken)) == 50 and set(taken) <= set(rows)
    assert labels[taken].sum() == 10  # rows 100-299 hold 40 parasitized of 200: a fifth
    assert np.array_equal(taken, splits.subsample(rows, labels, 50, seed=0))
    assert not np.array_equal(taken, splits.subsample(rows, labels, 50, seed=1))
    with pytest.raises(ValueError, match="cannot train on 201 cells: the training side holds 200"):
        splits.subsample(rows, labels, 201, seed=0)
