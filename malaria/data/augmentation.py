"""Training augmentation: albumentations image by image in the DataLoader workers, or the same
flips, affine warp and colour jitter on whole batches on the model's device (`Augment.on_device`).

Validation and test images get no transform at all: the cache already holds them at the model's
size, and the model normalises on its own device (see `MalariaClassifier`).
"""

from __future__ import annotations

from dataclasses import dataclass

import albumentations as A
import cv2
import kornia.augmentation as K
import torch
from torch import nn

from malaria.common.errors import ConfigError
from malaria.common.flags import ClosedUnitInterval, Fraction, HalfTurn, NonNegativeFloat
from malaria.data import colour


@dataclass
class Augment:
    """Probabilities and ranges of each training augmentation; 0 turns one off.

    Cells have no orientation, so full rotations and both flips are safe; colour jitter, stain
    jitter and RandStainNA stand in for the variation of Giemsa staining between slides (the last
    two on the device only, malaria.data.colour)."""

    hflip: ClosedUnitInterval = 0.5
    vflip: ClosedUnitInterval = 0.5
    rotate: HalfTurn = 180.0  # degrees, either way
    shift: ClosedUnitInterval = 0.05  # fraction of the side
    shear: NonNegativeFloat = 10.0  # degrees
    zoom: Fraction = 0.1  # scale in [1 - zoom, 1 + zoom]
    affine_p: ClosedUnitInterval = 0.75
    brightness: NonNegativeFloat = 0.15
    contrast: NonNegativeFloat = 0.15
    saturation: NonNegativeFloat = 0.15
    hue: NonNegativeFloat = 0.02
    color_p: ClosedUnitInterval = 0.75
    elastic_p: ClosedUnitInterval = 0.0
    elastic_alpha: NonNegativeFloat = 30.0
    elastic_sigma: NonNegativeFloat = 5.0
    # Stain jitter (Tellez et al. 2019): methyl blue and eosin each times U(1 - scale, 1 + scale),
    # plus U(-shift, shift) in optical density, for stain_p of the images.
    stain_p: ClosedUnitInterval = 0.0
    stain_scale: Fraction = 0.2
    stain_shift: NonNegativeFloat = 0.05
    # RandStainNA (Shen et al. 2022): for randstain_p of the images, the cell's LAB moments moved to
    # ones drawn from the training slides' (a normal per moment, fitted over the slides).
    randstain_p: ClosedUnitInterval = 0.0
    # Flips, affine and colour jitter on the batch after transfer (BatchAugment), the elastic
    # deformation alone in the workers: 5.9x the images/s of the per-image path on a 2-core CPU
    # (make bench), and a GPU is never held back by CPU augmentation. false: all in the workers.
    on_device: bool = True


def train_transform(aug: Augment) -> A.Compose | None:
    """The albumentations pipeline the DataLoader workers run on training images, if any."""
    if not aug.on_device and (aug.stain_p or aug.randstain_p):
        raise ConfigError("data.augment.stain_p and randstain_p run on the device only: keep "
                          "data.augment.on_device true.")
    steps = [] if aug.on_device else per_image_steps(aug)
    if aug.elastic_p > 0:
        steps.append(A.ElasticTransform(
            alpha=aug.elastic_alpha, sigma=aug.elastic_sigma, border_mode=cv2.BORDER_CONSTANT, fill=0,
            p=aug.elastic_p,
        ))
    return A.Compose(steps) if steps else None


def per_image_steps(aug: Augment) -> list[A.BasicTransform]:
    """Flips, affine warp and colour jitter, one image at a time."""
    return [
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
    ]


# Luma and the YIQ colour space: a hue shift is a rotation of the chroma plane (I, Q) about the
# grey axis, one 3x3 matrix per image (NVIDIA DALI's ColorTwist does the same). Through HSV, as
# albumentations and kornia do it, the colour jitter costs ~35x more per image on a CPU; the two
# differ by less than a grey level on average at the shifts used here (tested).
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


class BatchAugment(nn.Module):
    """`per_image_steps` for a whole batch (N, 3, H, W), each image its own draw, on its own device.

    Same distributions as the albumentations path (tested): flips; kornia's RandomAffine with
    rotation, per-axis shift, scale and shear as albumentations' Affine samples them; and
    brightness, contrast, saturation and hue factors as albumentations' ColorJitter draws them,
    composed into one affine colour map per image. Takes uint8 or float images on the 0-255 scale,
    returns float ones on that scale."""

    def __init__(self, aug: Augment) -> None:
        super().__init__()
        zoom, shear = aug.zoom, aug.shear
        self.geometry = nn.Sequential(
            K.RandomHorizontalFlip(p=aug.hflip),
            K.RandomVerticalFlip(p=aug.vflip),
            K.RandomAffine(degrees=aug.rotate, translate=(aug.shift, aug.shift),
                           scale=(1 - zoom, 1 + zoom, 1 - zoom, 1 + zoom), shear=(-shear, shear, -shear, shear),
                           padding_mode="zeros", p=aug.affine_p),
        )
        self.aug = aug
        # RandStainNA's targets: mean and spread over the training slides of each LAB moment
        # (2, 6), set from the data before training (MalariaClassifier.on_fit_start).
        self.slide_moments: torch.Tensor | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = self.geometry(images.float())
        if self.aug.stain_p:
            images = self.jitter_stains(images)
        if self.aug.randstain_p:
            images = self.randstain(images)
        return self.jitter_colour(images).clamp_(0, 255)

    def _chosen(self, images: torch.Tensor, p: float) -> torch.Tensor:
        return torch.rand(len(images), device=images.device) < p

    def jitter_stains(self, images: torch.Tensor) -> torch.Tensor:
        """Each stain's amount scaled and shifted at random, for `stain_p` of the images."""
        n, device, aug = len(images), images.device, self.aug
        chosen = self._chosen(images, aug.stain_p)[:, None]
        scale = 1 + (torch.rand(n, 3, device=device) * 2 - 1) * aug.stain_scale
        shift = (torch.rand(n, 3, device=device) * 2 - 1) * aug.stain_shift
        scale[:, 2], shift[:, 2] = 1, 0  # the residual is no stain
        scale, shift = torch.where(chosen, scale, 1.0), torch.where(chosen, shift, 0.0)
        return colour.jitter_stains(images, scale, shift)

    def randstain(self, images: torch.Tensor) -> torch.Tensor:
        """RandStainNA: `randstain_p` of the images take the LAB moments of a random slide."""
        if self.slide_moments is None:
            raise RuntimeError("BatchAugment.slide_moments is unset: RandStainNA draws from the training "
                               "slides' colours (MalariaDataModule.slide_moments()).")
        chosen = self._chosen(images, self.aug.randstain_p)
        if not chosen.any():
            return images
        moments = self.slide_moments.to(images.device)
        picked = images[chosen]
        target = moments[0] + moments[1] * torch.randn(len(picked), 6, device=images.device)
        target[:, 3:] = target[:, 3:].clamp_min(1e-2)
        out = images.clone()
        out[chosen] = colour.reinhard(picked, colour.lab_moments(picked), target)
        return out

    def jitter_colour(self, images: torch.Tensor) -> torch.Tensor:
        """Colour factors drawn as albumentations' ColorJitter draws them, for `color_p` of the images."""
        aug, n = self.aug, len(images)
        applied = torch.rand(n, device=images.device) < aug.color_p

        def factor(spread: float, neutral: float) -> torch.Tensor:
            drawn = neutral + (torch.rand(n, device=images.device) * 2 - 1) * spread
            return torch.where(applied, drawn, torch.full_like(drawn, neutral))

        return adjust_colour(images, factor(aug.brightness, 1.0), factor(aug.contrast, 1.0),
                             factor(aug.saturation, 1.0), factor(aug.hue, 0.0))


def adjust_colour(images: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor,
                  saturation: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """torchvision's colour adjustments with one factor per image, in that order, as one affine map:
    out = H S (c b x + (1 - c) b mean_grey(x)) = A x + (1 - c) b mean_grey(x), since S and H keep grey.
    `hue` is a fraction of a full turn. Unclamped."""
    n, device = len(images), images.device
    to_yiq, to_rgb = _RGB_TO_YIQ.to(device), _YIQ_TO_RGB.to(device)
    luma = to_yiq[0]
    grey = torch.ones(3, 1, device=device) * luma  # x -> luma . x in every channel
    s = saturation[:, None, None]
    saturate = s * torch.eye(3, device=device) + (1 - s) * grey
    angle = hue * 2 * torch.pi
    cos, sin, zero, one = angle.cos(), angle.sin(), torch.zeros_like(angle), torch.ones_like(angle)
    rotate = torch.stack([one, zero, zero, zero, cos, sin, zero, -sin, cos], 1).view(n, 3, 3)
    matrix = to_rgb @ rotate @ to_yiq @ saturate * (contrast * brightness)[:, None, None]
    pixels = images.shape[-2] * images.shape[-1]
    mean_grey = torch.einsum("c,nchw->n", luma, images) / pixels
    offset = (1 - contrast) * brightness * mean_grey
    return torch.einsum("nij,njhw->nihw", matrix, images) + offset[:, None, None, None]


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
