"""Stain channels, LAB moments and per-slide standardisation (malaria.data.colour) on cell-like
images: a pink disc with a purple spot on the crops' black padding."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from malaria.data import colour


def cells(n: int = 6, size: int = 32, seed: int = 0, tint: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> torch.Tensor:
    """(n, 3, size, size) 0-255 floats: pink discs of varied shade, some with a purple spot,
    black outside; `tint` scales the channels (another slide's stain)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 2.5) ** 2
    spot = (yy - size / 2.5) ** 2 + (xx - size / 2) ** 2 < (size / 10) ** 2
    images = np.zeros((n, 3, size, size), np.float32)
    for i in range(n):
        pink = np.array([215, 160, 165]) + rng.normal(0, 6, 3)
        images[i][:, disc] = (pink[:, None] + rng.normal(0, 4, (3, disc.sum()))) * np.array(tint)[:, None]
        if i % 2:
            images[i][:, spot] = np.array([130, 40, 130])[:, None] * np.array(tint)[:, None]
    return torch.from_numpy(images.clip(0, 255).round())


def test_the_stain_round_trip_keeps_every_colour() -> None:
    images = torch.rand(4, 3, 8, 8) * 255
    assert torch.allclose(colour.from_stains(colour.to_stains(images)), images, atol=1e-2)


def test_stain_jitter_moves_one_stain_and_leaves_the_padding_black() -> None:
    images = cells()
    mask = colour.cell_mask(images).expand_as(images)
    same = colour.jitter_stains(images, torch.ones(6, 3), torch.zeros(6, 3))
    assert (same - images).abs().max() < 0.5  # no jitter: the identity within rounding
    more_blue = colour.jitter_stains(images, torch.tensor([[1.5, 1.0, 1.0]] * 6), torch.zeros(6, 3))
    before, after = colour.to_stains(images), colour.to_stains(more_blue)
    cell = mask[:, 0]
    assert torch.allclose(after[:, 0][cell], 1.5 * before[:, 0][cell], rtol=0.05, atol=0.02)
    assert torch.allclose(after[:, 1][cell], before[:, 1][cell], atol=0.02)
    assert torch.equal(more_blue[~mask], images[~mask]) and more_blue[~mask].max() == 0


def test_reinhard_moves_a_cell_to_the_target_moments() -> None:
    images = cells()
    target = torch.tensor([[70.0, 20.0, -5.0, 8.0, 6.0, 5.0]]).expand(6, -1)
    moved = colour.reinhard(images, colour.lab_moments(images), target)
    assert torch.allclose(colour.lab_moments(moved), target, atol=1.5)
    assert moved[~colour.cell_mask(images).expand_as(images)].max() == 0


def test_slide_colours_are_medians_over_each_slides_cells() -> None:
    names = [f"C{s}P{s}thinF_IMG_1_cell_{i}.png" for s in (1, 2) for i in range(6)] + ["odd.png"]
    table = pd.DataFrame({column: np.arange(13.0) for column in [*colour.LAB_COLUMNS, *colour.STAIN_COLUMNS]})
    slides = colour.slide_colours(names, table)
    assert slides.loc["C1P1", "cells"] == 6 and slides.loc["C1P1", "L_mean"] == np.median(np.arange(6.0))
    assert slides.loc["image:odd.png", "cells"] == 1  # a cell with no slide is standardised alone


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return images.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_standardisation_gives_a_recoloured_slide_back_its_colour() -> None:
    """Slide B is slide A through another stain (every channel scaled): after standardising both to
    the same target, their cells agree within a few grey levels, and each slide's cells all went
    through one and the same transform."""
    a, b = cells(seed=3), cells(seed=3, tint=(0.85, 0.95, 1.08))
    names = [f"C1P1thinF_IMG_1_cell_{i}.png" for i in range(6)] + [f"C2P2thinF_IMG_1_cell_{i}.png" for i in range(6)]
    pixels = np.concatenate([to_uint8(a), to_uint8(b)])
    slides = colour.slide_colours(names, colour.cell_colours(pixels))
    target = colour.reference(slides)
    out = colour.standardise(pixels, names, slides, target).astype(float)
    cell = colour.cell_mask(a).permute(0, 2, 3, 1).expand(-1, -1, -1, 3).numpy()
    assert np.abs(out[:6] - out[6:])[cell].mean() < 3
    assert np.abs(pixels[:6].astype(float) - pixels[6:])[cell].mean() > 10  # they did differ
    # One transform per slide: a cell standardised with its slide-mates or alone comes out the same.
    alone = colour.standardise(pixels[7:8], names[7:8], slides, target)
    assert np.array_equal(alone[0], out[7].astype(np.uint8))


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_batch_stain_augmentation_follows_its_probability(p: float) -> None:
    from malaria.data.augmentation import Augment, BatchAugment

    augment = BatchAugment(Augment(hflip=0, vflip=0, affine_p=0, color_p=0, stain_p=p, stain_scale=0.3))
    images = cells(16)
    out = augment(images)
    changed = (out - images).abs().flatten(1).amax(1) > 1
    assert changed.all() if p else not changed.any()
    assert out[~colour.cell_mask(images).expand_as(images)].max() == 0


def test_randstain_needs_the_slides_moments_and_draws_from_them() -> None:
    from malaria.data.augmentation import Augment, BatchAugment

    augment = BatchAugment(Augment(hflip=0, vflip=0, affine_p=0, color_p=0, randstain_p=1.0))
    images = cells(32)
    with pytest.raises(RuntimeError, match="slide_moments"):
        augment(images)
    target = torch.tensor([[60.0, 30.0, -10.0, 9.0, 7.0, 6.0], [0.5, 0.5, 0.5, 0.1, 0.1, 0.1]])
    augment.slide_moments = target
    moments = colour.lab_moments(augment(images))
    assert torch.allclose(moments.mean(0), target[0], atol=2.0)
