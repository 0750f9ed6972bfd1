"""Test-time BatchNorm adaptation for a slide no training cell came from (Schneider et al. 2020).

A network's BatchNorm layers normalise with the mean and variance they saw in training. A new
patient's slide, stained another way, shifts what every layer sees, and the fixed statistics then
mis-centre it. Within `mixed_batchnorm`, each BatchNorm instead normalises a batch (all of one
slide's cells) with its training statistics mixed with the batch's own, as if the training ones
were `strength` images beside the batch's n:

    mean = (strength * mean_train + n * mean_batch) / (strength + n), and the variance alike

layer by layer, so each layer sees the output of the adapted ones before it. No weight changes,
and no label is read. Slides that gave training cells keep the training statistics.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

DEFAULT_ADAPT = 0.0  # training images' worth of weight on the training statistics; 0: no adaptation


@contextmanager
def mixed_batchnorm(model: nn.Module, strength: float) -> Iterator[None]:
    """Within: every BatchNorm of `model` in eval mode normalises with its running statistics mixed
    with each batch's own (above); on exit the statistics are exactly what they were."""
    if strength < 0:
        raise ValueError(f"BatchNorm adaptation strength must be >= 0 images, got {strength}")
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    saved = {m: (m.running_mean.clone(), m.running_var.clone()) for m in norms}

    def mix(module: _BatchNorm, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].float()
        dims = [0, *range(2, x.dim())]
        n = x.shape[0]
        mean, var = saved[module]
        weight = strength / (strength + n)
        module.running_mean.copy_(weight * mean + (1 - weight) * x.mean(dims))
        module.running_var.copy_(weight * var + (1 - weight) * x.var(dims, unbiased=False))

    handles = [m.register_forward_pre_hook(mix) for m in norms]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for module, (mean, var) in saved.items():
                module.running_mean.copy_(mean)
                module.running_var.copy_(var)
