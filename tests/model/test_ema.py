"""The warmed-up weight EMA: it forgets the first weights within an epoch, and a resumed run warms up on."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from malaria.commands import train
from malaria.model.ema import WarmupEMA, warmup_decay, warmup_ema

REPO = Path(__file__).parents[2]


def average_after_a_jump(averaged: AveragedModel, net: nn.Linear, updates: int) -> float:
    """The average's weight when the network's weight is 0 at the first update and 1 at every later one."""
    for update in range(updates):
        net.weight.data.fill_(float(update > 0))
        averaged.update_parameters(net)
    return averaged.module.weight.item()


def test_the_average_forgets_the_first_weights_within_an_epoch() -> None:
    net = nn.Linear(1, 1, bias=False)
    warm = AveragedModel(net, multi_avg_fn=partial(warmup_ema, decay=0.995, power=2 / 3))
    fixed = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.995))  # Lightning's EMAWeightAveraging
    steps = 61  # one epoch of configs/gpu.yaml on `full`
    assert average_after_a_jump(warm, net, steps) > 0.9
    assert average_after_a_jump(fixed, net, steps) < 0.3  # 0.995 ** 60 of the first weights is left


def test_the_decay_warms_up_to_its_set_value() -> None:
    decays = [warmup_decay(n, 0.995, 2 / 3) for n in range(1, 5000)]
    assert decays[0] < 0.4
    assert all(a <= b for a, b in zip(decays, decays[1:]))
    assert decays[-1] == 0.995
    with pytest.raises(ValueError, match="decay"):
        WarmupEMA(decay=1.0)
    with pytest.raises(ValueError, match="power"):
        WarmupEMA(power=0.0)


def test_the_gpu_recipe_resumes_its_average_where_it_stopped(demo_dir: Path, tmp_path: Path) -> None:
    tiny = ["--data.data_dir", str(demo_dir), "--data.image_size", "32", "--data.batch_size", "16",
            "--data.num_workers", "0", "--trainer.limit_train_batches", "3",
            "--trainer.limit_val_batches", "1",
            "--trainer.enable_model_summary", "false", "--trainer.enable_progress_bar", "false",
            "--wandb.mode", "disabled", "--runs_dir", str(tmp_path), "--run", "ema"]
    train.main(["fit", "--config", str(REPO / "configs" / "gpu.yaml"), *tiny, "--trainer.max_epochs", "1"])
    run = tmp_path / "ema"
    last = run / "checkpoints" / "last.ckpt"
    assert int(torch.load(last, weights_only=False)["averaging_state"]["n_averaged"]) == 3
    cli = train.main(["fit", "--config", str(run / "config.yaml"), "--runs_dir", str(tmp_path),
                      "--ckpt_path", str(last), "--trainer.max_epochs", "2"])
    assert cli.trainer.global_step == 6  # and the warm-up counted on from the checkpoint's 3 updates:
    assert int(torch.load(last, weights_only=False)["averaging_state"]["n_averaged"]) == 6
