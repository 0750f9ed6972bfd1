"""Networks, all built by `timm.create_model` and sharing timm's interface.

The project's scratch CNN registers itself in timm's registry, so a config names `malaria_cnn`
or any timm backbone the same way, and the fine-tuning callbacks never special-case a family.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from timm.models import get_pretrained_cfg, register_model
from torch import nn

from malaria.model.pretrained import PACKAGED, packaged_state_dict
from malaria.common.errors import ConfigError, MissingError

# Half-way values: the scratch CNN has no pretrained statistics to match.
SCRATCH_MEAN = (0.5, 0.5, 0.5)
SCRATCH_STD = (0.25, 0.25, 0.25)
SCRATCH_SIZE = 64


def _stage(in_channels: int, out_channels: int, convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [
            nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
    layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


Stem = Literal["none", "space_to_depth"]


class MalariaCNN(nn.Module):
    """The course's Conv 32-64-128-128 stack (3x3, ReLU, max-pool), with BatchNorm, dropout and
    global average pooling in place of its large flatten + dense head.

    `stem="space_to_depth"` folds each 2x2 block of pixels into channels before the first stage
    (TResNet's stem; `nn.PixelUnshuffle`), so the stages run at half the side: the first stage's
    activations, whose BatchNorm, ReLU and pooling are memory-bound on a CPU, shrink fourfold."""

    def __init__(self, num_classes: int = 1, widths: Sequence[int] = (32, 64, 128, 128),
                 convs_per_stage: int = 1, drop_rate: float = 0.2, in_chans: int = 3, stem: Stem = "none") -> None:
        super().__init__()
        if not widths or min(widths) < 1 or convs_per_stage < 1 or not 0 <= drop_rate < 1:
            raise ConfigError(f"malaria_cnn: widths {list(widths)} and convs_per_stage {convs_per_stage} "
                              f"must be positive, drop_rate {drop_rate} in [0, 1) (model.model_kwargs).")
        if stem not in ("none", "space_to_depth"):
            raise ConfigError(f"malaria_cnn: stem {stem!r} is 'none' or 'space_to_depth' (model.model_kwargs).")
        self.stem = nn.PixelUnshuffle(2) if stem == "space_to_depth" else nn.Identity()
        channels = [in_chans * (4 if stem == "space_to_depth" else 1), *widths]
        self.stages = nn.Sequential(*(_stage(a, b, convs_per_stage) for a, b in zip(channels, channels[1:])))
        self.num_features = widths[-1]
        self.drop_rate = drop_rate
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(self.num_features, num_classes)
        self.pretrained_cfg = {
            "input_size": (3, SCRATCH_SIZE, SCRATCH_SIZE), "mean": SCRATCH_MEAN, "std": SCRATCH_STD,
            "num_classes": num_classes, "classifier": "head",
        }

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x).flatten(1)
        x = nn.functional.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's layer grouping: one group per stage, then the head."""
        return {"stem": r"^stages\.0\.", "blocks": r"^stages\.([1-9]\d*)"}


@register_model
def malaria_cnn(pretrained: bool = False, **kwargs: Any) -> MalariaCNN:
    """Scratch CNN entry point for `timm.create_model("malaria_cnn")`."""
    if pretrained:
        raise ConfigError("malaria_cnn has no pretrained weights; set pretrained: false.")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return MalariaCNN(**kwargs)


def create_model(name: str, pretrained: bool = False, pretrained_file: str | None = None,
                 num_classes: int = 1, **kwargs: Any) -> nn.Module:
    """`timm.create_model` with a single logit and offline-friendly pretrained weights.

    `pretrained_file` loads a local .pth/.safetensors state dict (no network); `pretrained` takes
    the weights installed with the project for the networks in `malaria.model.pretrained.PACKAGED` (no network),
    and downloads through timm's hub for any other."""
    overlay = None
    if pretrained_file:
        if not Path(pretrained_file).is_file():
            raise MissingError(f"pretrained_file {pretrained_file} does not exist.")
        overlay = {"file": str(pretrained_file)}
    elif pretrained and name in PACKAGED:
        overlay = {"state_dict": packaged_state_dict(name)}
    try:
        return timm.create_model(name, pretrained=pretrained or overlay is not None,
                                 pretrained_cfg_overlay=overlay, num_classes=num_classes, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ConfigError(f"Unknown model {name!r}: use malaria_cnn or a name from timm.list_models().") from None
        raise
    except TypeError as err:  # an argument this network does not take
        raise ConfigError(f"model_kwargs {kwargs} for {name!r}: {err}") from None
    except OSError as err:  # the hub is unreachable or has no weights for this name
        raise MissingError(
            f"Cannot fetch pretrained weights for {name!r} ({err}). Without internet, download the weights "
            "elsewhere and set model.pretrained_file to the local .pth/.safetensors, or set pretrained: false."
        ) from None


def default_image_size(name: str) -> int:
    """The side of the images `name` was pretrained on (timm's pretrained config; 64 for malaria_cnn)."""
    cfg = get_pretrained_cfg(name)
    return cfg.input_size[-1] if cfg is not None else SCRATCH_SIZE
