"""A training step's time by part, from the operators that Lightning's profiler records."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest

from malaria.data.datamodule import MalariaDataModule
from malaria.model.classifier import MalariaClassifier
from malaria.run import step_profile


def test_a_profiled_fit_is_summed_by_part_over_its_recorded_steps(demo_dir: Path) -> None:
    profiler = step_profile.profiler(steps=2, warmup=1)
    L.Trainer(accelerator="cpu", max_steps=3, profiler=profiler, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0).fit(
        MalariaClassifier(model_kwargs={"widths": [8, 16]}),
        datamodule=MalariaDataModule(data_dir=str(demo_dir), image_size=32, batch_size=8, num_workers=0))
    result = step_profile.parts(profiler.function_events)
    assert result.steps == 2
    assert list(result.ms_per_step) == list(step_profile.PARTS)
    for part in ("convolution", "normalisation", "activation", "optimizer", "augmentation", "data"):
        assert result.ms_per_step[part] > 0, part
    record = result.record()
    assert record["ms_per_step"] == pytest.approx(result.total, abs=0.01)
    assert sum(p["share"] for p in record["parts"].values()) == pytest.approx(1, abs=1e-3)


def test_a_profile_without_a_recorded_step_is_refused() -> None:
    with pytest.raises(ValueError, match="recorded no training step"):
        step_profile.parts([])


def _event(name: str, start: float, end: float) -> SimpleNamespace:
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end))


def test_the_forward_and_backward_pass_count_by_operator_though_lightning_runs_them_in_the_optimizer_step() -> None:
    regions = step_profile.spans([
        _event("Optimizer.step#AdamW.step", 0, 100),
        _event("[Strategy]SingleDeviceStrategy.training_step", 10, 40),
        _event("[Strategy]SingleDeviceStrategy.backward", 50, 90),
        _event("[LightningModule]MalariaClassifier.on_after_batch_transfer", 200, 210),
        _event("aten::conv2d", 12, 20),  # an operator marks no region
    ])
    assert len(regions) == 4
    part = lambda name, start: step_profile.part_of(_event(name, start, start + 1), regions)  # noqa: E731
    assert part("aten::mkldnn_convolution", 12) == "convolution"
    assert part("aten::native_batch_norm_backward", 60) == "normalisation"
    assert part("aten::cross_entropy_loss", 35) == "rest"
    assert part("aten::lerp_", 95) == "optimizer"  # AdamW's own work, after the closure
    assert part("aten::add_", 205) == "augmentation"
    assert part("aten::relu", 300) == "activation"
