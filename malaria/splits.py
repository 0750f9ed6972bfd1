"""Train/validation splits that never put one slide (patient) on both sides.

Cells from one smear share stain, focus and parasite stage, so a random split lets a model
score well by recognising slides. NIH file names carry the slide in their prefix:
`C33P1thinF_IMG_..._cell_179.png` comes from slide C33P1, `C1_...` from healthy slide C1.
`split="random"` ignores slides, as the competition's own test split does: it measures the
leaderboard-like figure, which rewards recognising slides.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

Split = Literal["slide", "random"]

SLIDE_PATTERN = re.compile(r"^(C\d+[AB]?)(?:N?_?)(P\d+)?(?=.*_IMG_)", re.IGNORECASE)


def slide_of(name: str) -> str | None:
    """The slide a NIH file name comes from, or None when the name carries none."""
    match = SLIDE_PATTERN.match(name)
    if match is None:
        return None
    prefix, patient = match.groups()
    return (prefix + (patient or "")).upper()


def groups(names: Sequence[str]) -> np.ndarray:
    """A group label per image: its slide, or the image itself when its name has no slide."""
    return np.array([slide_of(n) or f"image:{n}" for n in names])


def kfold(labels: np.ndarray, names: Sequence[str], n_folds: int, seed: int,
          split: Split = "slide") -> list[tuple[np.ndarray, np.ndarray]]:
    """Class-stratified folds, grouped by slide (plain stratified when no name has a slide) or,
    with `split="random"`, by image."""
    if split not in ("slide", "random"):
        raise ValueError(f"split must be 'slide' or 'random', got {split!r}")
    if split == "random":
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        return list(splitter.split(np.zeros(len(labels)), labels))
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(labels)), labels, groups(names)))


def holdout(labels: np.ndarray, names: Sequence[str], val_fraction: float, seed: int,
            fold: int = 0, split: Split = "slide") -> tuple[np.ndarray, np.ndarray]:
    """Train and validation indices with about `val_fraction` of the images in validation;
    `val_fraction=0` trains on every image and validates on none (a full fit)."""
    if val_fraction == 0:
        return np.arange(len(labels)), np.empty(0, dtype=np.int64)
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be 0 (no holdout) or between 0 and 1, got {val_fraction}")
    n_folds = max(2, round(1 / val_fraction))
    return kfold(labels, names, n_folds, seed, split)[fold]


def subsample(rows: np.ndarray, labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` of `rows`, drawn at random with the classes in their proportions (for learning curves)."""
    if not 2 <= n <= len(rows):
        raise ValueError(f"cannot train on {n} cells: the training side holds {len(rows)}.")
    if n == len(rows):
        return rows
    taken, _ = train_test_split(rows, train_size=n, stratify=labels[rows], random_state=seed)
    return np.sort(taken)
