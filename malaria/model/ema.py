"""A weight EMA whose decay warms up, as timm's `ModelEmaV3(use_warmup=True)` does.

Lightning's `EMAWeightAveraging` averages with its full decay from the first optimizer step, so the
average holds the random first weights for as long as the decay remembers them: at 0.995 and the
GPU recipe's 61 steps an epoch on `full`, validation read 50% (every cell one class) for four
epochs (docs/results.md). Here the n-th update uses `min(decay, 1 - (1 + n) ** -power)`: the
average follows the network while it changes fastest and keeps the full decay's window once there
is that much history to average. The update count lives in the averaged model, so a resumed run
continues the warm-up where it stopped.
"""

from __future__ import annotations

from functools import partial

from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor
from torch.optim.swa_utils import get_ema_multi_avg_fn

from malaria.common.flags import OpenUnitInterval, PositiveFloat


def warmup_decay(updates: int, decay: float, power: float) -> float:
    """The decay of update number `updates` (1 for the first average after the copy)."""
    return min(decay, 1.0 - (1.0 + updates) ** -power)


def warmup_ema(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor, *, decay: float,
                power: float) -> None:
    """`AveragedModel`'s multi_avg_fn: torch's own EMA update, at this update's decay (reading the
    count from the device once for each dtype's group of tensors, a step)."""
    get_ema_multi_avg_fn(warmup_decay(int(num_averaged), decay, power))(averaged, current, num_averaged)


class WarmupEMA(WeightAveraging):
    """Exponential moving average of the weights (and BatchNorm buffers), validated and checkpointed
    in place of the trained weights, with timm's warm-up of the decay (power 2/3 is timm's default)."""

    def __init__(self, decay: OpenUnitInterval = 0.999, power: PositiveFloat = 2 / 3,
                 use_buffers: bool = True) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"WarmupEMA: decay must lie between 0 and 1, got {decay}")
        if power <= 0.0:
            raise ValueError(f"WarmupEMA: power must be positive, got {power}")
        super().__init__(use_buffers=use_buffers, multi_avg_fn=partial(warmup_ema, decay=decay, power=power))
