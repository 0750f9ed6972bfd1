"""Where a training step's time goes: torch's profiler through Lightning's, summed by part.

`make bench ARGS="--profile"` trains a few steps under Lightning's `PyTorchProfiler`, which marks
each of the loop's hooks with a `record_function`. Every operator's own time (its self time, on
the thread that ran it) goes to the first of these that holds:
  data          inside the loop's fetch of the next batch, or its transfer to the device
  augmentation  inside `on_after_batch_transfer` (the on-device augmentation and normalisation)
  optimizer     inside `Optimizer.step` or `zero_grad`, but outside the training step and the
                backward pass, which Lightning runs inside `Optimizer.step` as its closure
  convolution, normalisation, activation, pooling
                by the operator's name (forward and backward alike)
  rest          any other operator (the loss, the metrics, copies, the head's matmul...)
and whatever the steps' wall time holds beyond the operators (Python, Lightning's own loop,
waiting) is `overhead`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from lightning.pytorch.profilers import PyTorchProfiler
from torch.autograd.profiler_util import FunctionEvent

# Regions of the loop, by a part of their record_function's name, innermost first; None: the
# operator's own name decides (the forward and backward pass, which run inside the optimizer's step).
REGIONS: tuple[tuple[str, str | None], ...] = (
    (".training_step", None),
    (".backward", None),
    ("Optimizer.step", "optimizer"),
    ("Optimizer.zero_grad", "optimizer"),
    ("optimizer_zero_grad", "optimizer"),
    ("on_after_batch_transfer", "augmentation"),
    ("train_dataloader_next", "data"),
    ("batch_to_device", "data"),
)
# Operators by a part of their name (aten::mkldnn_convolution, aten::native_batch_norm_backward...).
OPERATORS = (
    ("conv", "convolution"),
    ("batch_norm", "normalisation"),
    ("layer_norm", "normalisation"),
    ("group_norm", "normalisation"),
    ("pool", "pooling"),
    ("relu", "activation"),
    ("threshold", "activation"),
    ("clamp_min", "activation"),
    ("gelu", "activation"),
    ("silu", "activation"),
    ("hardswish", "activation"),
)
# torch names the span of a step `ProfilerStep#<n>`, or `ProfilerStep*` once it has grouped them (2.14)
STEP = "ProfilerStep"
PARTS = ("convolution", "normalisation", "activation", "pooling", "optimizer", "augmentation", "data", "rest",
         "overhead")


def profiler(steps: int, warmup: int) -> PyTorchProfiler:
    """Lightning's profiler, recording `steps` training steps after `warmup` unrecorded ones; its
    summary file goes to a temporary folder (the figures come from `parts`)."""
    schedule = torch.profiler.schedule(wait=0, warmup=warmup, active=steps, repeat=1)
    return PyTorchProfiler(dirpath=tempfile.mkdtemp(prefix="malaria-profile-"), filename="profile",
                           schedule=schedule, record_module_names=False)


def part_of(event: FunctionEvent) -> str:
    """The part an operator's own time belongs to: its innermost loop region's, else its name's
    (autograd's `ConvolutionBackward0` and aten's `convolution_backward` alike)."""
    node: FunctionEvent | None = event
    while node is not None:
        region = next((part for marker, part in REGIONS if marker in node.name), "")
        if region is None:
            break
        if region:
            return region
        node = node.cpu_parent
    name = event.name.lower()
    return next((part for marker, part in OPERATORS if marker in name), "rest")


@dataclass
class StepProfile:
    """Milliseconds a step spends in each part, over `steps` recorded steps."""

    ms_per_step: dict[str, float]
    steps: int

    @property
    def total(self) -> float:
        return sum(self.ms_per_step.values())

    def record(self) -> dict:
        total = self.total
        return {"kind": "profile", "steps": self.steps, "ms_per_step": round(total, 2),
                "parts": {part: {"ms_per_step": round(ms, 2), "share": round(ms / total, 4)}
                          for part, ms in self.ms_per_step.items()}}


def parts(events: Iterable[FunctionEvent]) -> StepProfile:
    """Sum operators' self time by part, within the recorded steps (the profiler's `ProfilerStep` spans)."""
    events = list(events)
    steps = [e for e in events if e.name.startswith(STEP)]
    if not steps:
        raise ValueError("The profiler recorded no training step: run more batches than the warm-up.")
    start, end = min(e.time_range.start for e in steps), max(e.time_range.end for e in steps)
    wall = sum(e.time_range.elapsed_us() for e in steps)
    totals = dict.fromkeys(PARTS, 0.0)
    for event in events:
        # Operators only (aten::..., the optimizer's own loop): the profiler's and Lightning's
        # region markers hold no work of their own beyond what their children count.
        if event.name.startswith((STEP, "[pl]")) or not start <= event.time_range.start < end:
            continue
        if event.thread != steps[0].thread:  # the step's own thread: others (workers) overlap it
            continue
        totals[part_of(event)] += event.self_cpu_time_total
    totals["overhead"] = max(0.0, wall - sum(totals.values()))
    return StepProfile({part: us / 1000 / len(steps) for part, us in totals.items()}, len(steps))
