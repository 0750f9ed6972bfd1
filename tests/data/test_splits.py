import numpy as np
import pytest

from malaria.data import splits
from malaria.common.errors import ConfigError


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


def _uneven(seed: int = 0) -> tuple[list[str], np.ndarray]:
    """15 slides as uneven as a real competition's (dev's test slides): 60 to 75 uninfected cells on
    each, and from none (3 healthy patients) to 245 parasitized ones."""
    rng = np.random.default_rng(seed)
    parasitized = rng.permutation([0, 0, 0, 2, 5, 10, 20, 30, 45, 60, 100, 124, 131, 176, 245])
    names, labels = [], []
    for s, positives in enumerate(parasitized):
        negatives = int(rng.integers(60, 76))
        names += [f"C{s}P{s}ThinF_IMG_1_cell_{i}.png" for i in range(negatives + positives)]
        labels += [0] * negatives + [1] * positives
    return names, np.array(labels)


@pytest.mark.parametrize("seed", [0, 1, 2, 42])
def test_holdout_of_uneven_slides_is_near_the_fraction_with_the_classes_balanced(seed: int) -> None:
    names, labels = _uneven(seed)
    train, val = splits.holdout(labels, names, 0.2, seed=seed)
    assert not set(splits.groups(names)[train]) & set(splits.groups(names)[val])
    assert abs(len(val) / len(names) - 0.2) < 0.03
    assert abs(labels[val].mean() - labels.mean()) < 0.05


def test_folds_of_uneven_slides_are_of_even_size() -> None:
    names, labels = _uneven()
    folds = splits.kfold(labels, names, 5, seed=0)
    sizes = np.array([len(val) for _, val in folds])
    assert sorted(np.concatenate([val for _, val in folds]).tolist()) == list(range(len(names)))
    assert np.all(np.abs(sizes - len(names) / 5) < 0.15 * len(names) / 5), sizes


def test_slides_too_few_for_the_fraction_are_split_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    names = [f"C{s}P{s}ThinF_IMG_1_cell_{i}.png" for s, n in enumerate([10, 10, 80]) for i in range(n)]
    labels = np.array([i % 2 for i in range(100)])
    with caplog.at_level("WARNING"):
        train, val = splits.holdout(labels, names, 0.5, seed=0)
    assert len(train) and len(val)
    assert "cannot be split near val_fraction 0.50" in caplog.text and "slides" in caplog.text


def test_describe_counts_cells_slides_and_parasitized() -> None:
    names, labels = _names(4, 5)
    assert splits.describe(labels, names, np.arange(10)) == "10 cells (50.0%) from 2 slides, 50.0% parasitized"


def test_fewer_slides_than_folds_is_the_users_error() -> None:
    names, labels = _names(3, 10)
    with pytest.raises(ConfigError, match="5 slide-grouped folds from 3 slides"):
        splits.kfold(labels, names, 5, seed=0)
