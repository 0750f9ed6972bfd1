"""Stain colour: Giemsa's two stains, each cell's and each slide's colour, and per-slide standardisation.

Slides differ in stain more than in anything else a model can see: most are pink, some lilac-blue,
some pale greyish-brown with faint parasites, and a slide no training cell came from may lie
outside every colour the network trained on. Three levers work on that colour, all batched in
torch on whatever device holds the images (0-255 float, N x 3 x H x W):

- stain channels: optical density split into methyl blue and eosin with scikit-image's Giemsa
  matrix (`skimage.color.rgb_from_bex`, Ruifrok and Johnston's colour deconvolution), whose third
  vector (their cross product) makes the split invertible, so every colour survives the round
  trip; `jitter_stains` scales and shifts each channel (Tellez et al. 2019);
- LAB moments: the mean and spread of each CIELAB channel over a cell's pixels (kornia's
  conversion); `reinhard` moves an image's moments to others (Reinhard et al. 2001), the step
  that RandStainNA (Shen et al. 2022) takes towards random targets and per-slide
  standardisation towards the training slides' typical colour;
- each slide's colour, the median over its cells (`slide_colours`), for that standardisation and
  for the picture of the slides.

The crops' black padding is never coloured: pixels whose brightest channel is below `BACKGROUND`
are left as they were and left out of every statistic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from kornia.color import lab_to_rgb, rgb_to_lab

from malaria.data import splits

# Rows: methyl blue, eosin, and their cross product (skimage.color.rgb_from_bex), in optical density.
GIEMSA = torch.tensor([[0.834750233, 0.513556283, 0.196330403], [0.092789, 0.954111, 0.283111]],
                      dtype=torch.float64)
GIEMSA = torch.cat([GIEMSA, torch.linalg.cross(GIEMSA[0], GIEMSA[1])[None]]).float()
BACKGROUND = 25  # brightest channel below this: the black padding and the blend at a cell's rim
LAB_COLUMNS = ("L_mean", "a_mean", "b_mean", "L_std", "a_std", "b_std")
STAIN_COLUMNS = ("methyl_blue", "eosin")


def cell_mask(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) booleans: the pixels of the cell, not of the padding around it."""
    return images.amax(1, keepdim=True) >= BACKGROUND


def to_stains(images: torch.Tensor) -> torch.Tensor:
    """Stain concentrations (methyl blue, eosin, residual) of 0-255 RGB images, per pixel."""
    density = -torch.log((images.float() + 1) / 256)
    return torch.einsum("nchw,cs->nshw", density, torch.linalg.inv(GIEMSA.to(images.device)))


def from_stains(stains: torch.Tensor) -> torch.Tensor:
    """0-255 RGB images of stain concentrations: `to_stains` undone."""
    density = torch.einsum("nshw,sc->nchw", stains, GIEMSA.to(stains.device))
    return 256 * torch.exp(-density) - 1


def jitter_stains(images: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Each image's stain channels times `scale` plus `shift` (both (N, 3), in optical density),
    the padding untouched; 0-255 floats, clamped."""
    stains = to_stains(images) * scale[:, :, None, None] + shift[:, :, None, None]
    return torch.where(cell_mask(images), from_stains(stains).clamp(0, 255), images.float())


def lab_moments(images: torch.Tensor) -> torch.Tensor:
    """(N, 6): mean and standard deviation of L, a and b over each image's cell pixels."""
    lab = rgb_to_lab(images.float() / 255)
    mask = cell_mask(images).float()
    pixels = mask.sum((2, 3)).clamp_min(1)
    mean = (lab * mask).sum((2, 3)) / pixels
    spread = (((lab - mean[:, :, None, None]) ** 2 * mask).sum((2, 3)) / pixels).sqrt()
    return torch.cat([mean, spread], 1)


def reinhard(images: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cell pixels whose LAB moments are `source` (N, 6) moved to `target` (N, 6): each channel
    centred, scaled by the ratio of spreads and moved to the target mean; the padding untouched."""
    lab = rgb_to_lab(images.float() / 255)
    mean, spread = source[:, :3, None, None], source[:, 3:, None, None].clamp_min(1e-3)
    moved = (lab - mean) / spread * target[:, 3:, None, None] + target[:, :3, None, None]
    rgb = (lab_to_rgb(moved, clip=True) * 255).clamp(0, 255)
    return torch.where(cell_mask(images), rgb, images.float())


def cell_colours(pixels: np.ndarray, batch: int = 1024) -> pd.DataFrame:
    """Per cell of an (N, H, W, 3) uint8 array: its LAB moments and mean stain concentrations."""
    rows = []
    for start in range(0, len(pixels), batch):
        images = torch.from_numpy(np.array(pixels[start:start + batch])).permute(0, 3, 1, 2).float()
        mask = cell_mask(images).float()
        stains = (to_stains(images)[:, :2] * mask).sum((2, 3)) / mask.sum((2, 3)).clamp_min(1)
        rows.append(torch.cat([lab_moments(images), stains], 1).numpy())
    return pd.DataFrame(np.concatenate(rows) if rows else np.empty((0, 8)), columns=[*LAB_COLUMNS, *STAIN_COLUMNS])


def slide_colours(names: Sequence[str], colours: pd.DataFrame) -> pd.DataFrame:
    """Each slide's colour, the median over its cells (robust to a few odd ones), with its number of
    cells; indexed by slide. A cell whose name carries no slide is a slide of its own."""
    table = colours.assign(slide=splits.groups(list(names)))
    per_slide = table.groupby("slide").median()
    per_slide.insert(0, "cells", table.groupby("slide").size())
    return per_slide


def reference(slides: pd.DataFrame) -> np.ndarray:
    """The typical slide's LAB moments (the median slide's, channel by channel): where per-slide
    standardisation moves every slide."""
    return slides[list(LAB_COLUMNS)].median().to_numpy(np.float32)


def standardise(pixels: np.ndarray, names: Sequence[str], slides: pd.DataFrame, target: np.ndarray,
                batch: int = 1024) -> np.ndarray:
    """Every cell of an (N, H, W, 3) uint8 array moved by its slide's LAB moments to `target`: the
    same transform for every cell of a slide (Reinhard, per slide), uint8 again."""
    source = slides.loc[splits.groups(list(names)), list(LAB_COLUMNS)].to_numpy(np.float32)
    out = np.empty_like(pixels)
    goal = torch.tensor(target)[None]
    for start in range(0, len(pixels), batch):
        images = torch.from_numpy(np.array(pixels[start:start + batch])).permute(0, 3, 1, 2)
        moved = reinhard(images, torch.tensor(source[start:start + batch]), goal.expand(len(images), -1))
        out[start:start + batch] = moved.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out
