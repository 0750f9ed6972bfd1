"""Augmentation gives the same distribution on the CPU (albumentations, image by image) as on the
device (on the batch after transfer): the flips and quarter turns of `random_dihedral`, and the
flips, affine warp and colour jitter of `BatchAugment`."""

import dataclasses
import random

import albumentations as A
import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency, chisquare, ks_2samp

from malaria.data.augmentation import (
    Augment,
    BatchAugment,
    adjust_colour,
    dihedral_views,
    per_image_steps,
    random_dihedral,
)

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


def cell_image(size: int = 64) -> np.ndarray:
    """A pink disc off the centre with a dark purple dot off its centre, on black: every flip, turn,
    shift, zoom or shear of it moves its intensity centroid or spread somewhere else."""
    y, x = np.mgrid[:size, :size] / size
    image = np.zeros((size, size, 3), np.uint8)
    image[(y - 0.5) ** 2 + (x - 0.47) ** 2 < 0.34 ** 2] = (205, 150, 170)
    image[(y - 0.37) ** 2 + (x - 0.62) ** 2 < 0.08 ** 2] = (110, 50, 140)
    return image


def summaries(images: torch.Tensor) -> dict[str, np.ndarray]:
    """Per image (N, 3, H, W): the cell's area, intensity centroid and spread, and mean colour."""
    cell = images.sum(1) > 30
    weight = images.mean(1)
    total = weight.sum((1, 2))
    y, x = (torch.arange(images.shape[-1], dtype=torch.float32)[:, None], torch.arange(images.shape[-1])[None])
    cy, cx = (weight * y).sum((1, 2)) / total, (weight * x).sum((1, 2)) / total
    spread = (weight * ((y - cy[:, None, None]) ** 2 + (x - cx[:, None, None]) ** 2)).sum((1, 2)) / total
    colour = (images * cell[:, None]).sum((2, 3)) / cell.sum((1, 2))[:, None]
    chroma = images.max(1).values - images.min(1).values
    out = {"area": cell.float().mean((1, 2)), "cy": cy, "cx": cx, "spread": spread, "red": colour[:, 0],
           "green": colour[:, 1], "blue": colour[:, 2], "chroma": (chroma * cell).sum((1, 2)) / cell.sum((1, 2))}
    return {name: values.numpy() for name, values in out.items()}


def per_image_draws(aug: Augment, n: int = 1500) -> dict[str, np.ndarray]:
    transform = A.Compose(per_image_steps(aug))
    transform.set_random_state(np.random.default_rng(0), random.Random(0))
    image = cell_image()
    outputs = np.stack([transform(image=image)["image"] for _ in range(n)])
    return summaries(torch.from_numpy(outputs.transpose(0, 3, 1, 2)).float())


def batch_draws(aug: Augment, n: int = 1500) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    batch = torch.from_numpy(cell_image().transpose(2, 0, 1).copy())[None].repeat(n, 1, 1, 1)
    return summaries(BatchAugment(aug)(batch).round())


def smallest_p(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[float, str]:
    """The two-sample Kolmogorov-Smirnov p-value of the summary that differs most."""
    return min((ks_2samp(a[name], b[name]).pvalue, name) for name in a)


@pytest.fixture(scope="module")
def albumentations_draws() -> dict[str, np.ndarray]:
    return per_image_draws(Augment())


def test_batch_augment_draws_what_albumentations_draws(albumentations_draws: dict[str, np.ndarray]) -> None:
    p, summary = smallest_p(albumentations_draws, batch_draws(Augment()))
    assert p > 1e-4, f"{summary} differs between the paths (p={p:.2g})"


@pytest.mark.parametrize("change", [{"zoom": 0.2}, {"shift": 0.1}, {"shear": 25.0}, {"affine_p": 0.5},
                                    {"vflip": 0.0}, {"brightness": 0.3}, {"contrast": 0.3}, {"saturation": 0.4},
                                    {"color_p": 0.3}], ids=str)
def test_a_different_augmentation_is_caught(change: dict, albumentations_draws: dict[str, np.ndarray]) -> None:
    """The comparison above has the power to see a change of any one setting."""
    p, _ = smallest_p(albumentations_draws, batch_draws(dataclasses.replace(Augment(), **change)))
    assert p < 1e-6


@pytest.mark.parametrize("factors", [
    {"brightness": 1.15}, {"brightness": 0.85}, {"contrast": 0.85}, {"contrast": 1.15}, {"saturation": 1.15},
    {"saturation": 0.85}, {"hue": 0.02}, {"hue": -0.02},
], ids=str)
def test_each_colour_adjustment_matches_albumentations(factors: dict) -> None:
    """Within a grey level on average; the hue by a rotation in YIQ rather than HSV. A hue turned the
    wrong way is 2.5 levels off."""
    image = cell_image()
    neutral = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0} | factors
    reference = A.ColorJitter(**{name: (value, value) for name, value in neutral.items()}, p=1.0)(image=image)["image"]
    batch = torch.from_numpy(image.transpose(2, 0, 1).copy())[None].float()
    ours = adjust_colour(batch, *(torch.tensor([neutral[k]]) for k in ("brightness", "contrast", "saturation", "hue")))
    difference = (ours.clamp(0, 255).round()[0] - torch.from_numpy(reference.transpose(2, 0, 1)).float()).abs()
    assert difference.mean() < 1.0 and difference.max() <= 12
    assert not torch.equal(ours[0], batch[0])


def test_batch_augment_keeps_shape_and_range_and_varies_per_image() -> None:
    batch = torch.from_numpy(cell_image(32).transpose(2, 0, 1).copy())[None].repeat(16, 1, 1, 1)
    out = BatchAugment(Augment())(batch)
    assert out.shape == batch.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 255
    assert len({tuple(image.flatten().round().tolist()) for image in out}) > 12
