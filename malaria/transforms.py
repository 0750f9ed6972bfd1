"""Training augmentation with albumentations, on uint8 images straight from the cache.

Validation and test images get no CPU transform at all: the cache already holds them at the
model's size, and the model normalises on its own device (see `MalariaClassifier`).
"""

from __future__ import annotations

from dataclasses import dataclass

import albumentations as A
import cv2
import torch


@dataclass
class Augment:
    """Probabilities and ranges of each training augmentation; 0 turns one off.

    Cells have no orientation, so full rotations and both flips are safe; colour jitter stands in
    for the variation of Giemsa staining between slides."""

    hflip: float = 0.5
    vflip: float = 0.5
    rotate: float = 180.0  # degrees, either way
    shift: float = 0.05  # fraction of the side
    shear: float = 10.0  # degrees
    zoom: float = 0.1  # scale in [1 - zoom, 1 + zoom]
    affine_p: float = 0.75
    brightness: float = 0.15
    contrast: float = 0.15
    saturation: float = 0.15
    hue: float = 0.02
    color_p: float = 0.75
    elastic_p: float = 0.0
    elastic_alpha: float = 30.0
    elastic_sigma: float = 5.0


def train_transform(aug: Augment) -> A.Compose:
    """The albumentations pipeline for training images."""
    return A.Compose([
        A.HorizontalFlip(p=aug.hflip),
        A.VerticalFlip(p=aug.vflip),
        A.Affine(
            rotate=(-aug.rotate, aug.rotate),
            translate_percent=(-aug.shift, aug.shift),
            shear=(-aug.shear, aug.shear),
            scale=(1 - aug.zoom, 1 + aug.zoom),
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,  # the crops' background is black
            p=aug.affine_p,
        ),
        A.ColorJitter(
            brightness=aug.brightness, contrast=aug.contrast, saturation=aug.saturation, hue=aug.hue,
            p=aug.color_p,
        ),
        A.ElasticTransform(
            alpha=aug.elastic_alpha, sigma=aug.elastic_sigma, border_mode=cv2.BORDER_CONSTANT, fill=0,
            p=aug.elastic_p,
        ),
    ])


def dihedral_views(images: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips and quarter turns of a batch (N, C, H, W): a cell looks the same in each."""
    turns = [torch.rot90(images, k, dims=(2, 3)) for k in range(4)]
    return turns + [t.flip(3) for t in turns]


def random_dihedral(images: torch.Tensor) -> torch.Tensor:
    """Each image of a square batch in one random dihedral view, on the batch's own device.

    The cheap augmentations run here, after transfer, so a GPU is not held back by CPU work."""
    choice = torch.randint(0, 8, (images.shape[0],), device=images.device)
    out = torch.empty_like(images)
    for view, transformed in enumerate(dihedral_views(images)):
        mask = choice == view
        out[mask] = transformed[mask]
    return out
