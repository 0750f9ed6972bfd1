"""The flips and quarter turns give the same distribution on the CPU (albumentations, image by image)
as on the device (`random_dihedral`, on the batch after transfer)."""

import random

import albumentations as A
import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency, chisquare

from malaria.transforms import dihedral_views, random_dihedral

DRAWS = 2000
# Distinct pixel values: each of the 8 dihedral views of this image is a different array.
IMAGE = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)


def view_index(chw: torch.Tensor) -> int:
    """Which of the 8 `dihedral_views` of IMAGE this (C, H, W) image is."""
    views = dihedral_views(torch.from_numpy(IMAGE.transpose(2, 0, 1))[None])
    return next(i for i, view in enumerate(views) if torch.equal(view[0], chw))


def cpu_counts(transforms: list[A.BasicTransform]) -> np.ndarray:
    transform = A.Compose(transforms)
    # One seeded stream shared by all transforms (as CellDataset does per image):
    # A.Compose(seed=...) would give each transform its own copy of the same stream, so that
    # HorizontalFlip and VerticalFlip, both p=0.5, would always flip together.
    transform.set_random_state(np.random.default_rng(0), random.Random(0))
    outputs = (transform(image=IMAGE)["image"] for _ in range(DRAWS))
    views = [view_index(torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))) for out in outputs]
    return np.bincount(views, minlength=8)


def device_counts() -> np.ndarray:
    torch.manual_seed(0)
    batch = torch.from_numpy(IMAGE.transpose(2, 0, 1).copy())[None].repeat(DRAWS, 1, 1, 1)
    return np.bincount([view_index(image) for image in random_dihedral(batch)], minlength=8)


CPU_PATHS = {
    "square_symmetry": [A.SquareSymmetry(p=1.0)],
    "flips_and_rot90": [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=1.0)],
}


@pytest.mark.parametrize("path", CPU_PATHS)
def test_cpu_and_device_draw_each_dihedral_view_an_eighth_of_the_time(path: str) -> None:
    cpu = cpu_counts(CPU_PATHS[path])
    device = device_counts()
    for counts in (cpu, device):
        assert counts.sum() == DRAWS
        assert np.all(np.abs(counts / DRAWS - 1 / 8) < 0.035), counts  # about 4.5 standard errors
        assert chisquare(counts).pvalue > 1e-3, counts
    # Same distribution on both paths: a contingency test cannot tell them apart.
    assert chi2_contingency(np.stack([cpu, device])).pvalue > 1e-3, (cpu, device)


def test_a_biased_path_is_caught() -> None:
    """The checks above fail for a path that never turns the image (only 4 of the 8 views)."""
    counts = cpu_counts([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)])
    assert (counts == 0).sum() == 4 and chisquare(counts).pvalue < 1e-6
    assert chi2_contingency(np.stack([counts, device_counts()])).pvalue < 1e-6
