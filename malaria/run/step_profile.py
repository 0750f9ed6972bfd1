"""Where a training step's time goes: torch's profiler through Lightning's, summed by part.

`make bench ARGS="--profile"` trains a few steps under Lightning's `PyTorchProfiler`, which marks
each of the loop's hooks with a `record_function`. Every operator's own time (its self time, on
the thread that ran it) goes by the innermost of these regions its start lies in, or else by its name:
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
from collections.abc import Iterable, Sequence
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
# Spans that mark a region rather than do work: the profiler's steps, Lightning's hooks
# (`[pl]...`, `[Strategy]...`, `[LightningModule]...`), the optimizer's `Optimizer.step#AdamW.step`.
MARKERS = (STEP, "[", "Optimizer.")
PARTS = ("convolution", "normalisation", "activation", "pooling", "optimizer", "augmentation", "data", "rest",
         "overhead")


def profiler(steps: int, warmup: int) -> PyTorchProfiler:
    """Lightning's profiler, recording `steps` training steps after `warmup` unrecorded ones; its
    summary file goes to a temporary folder (the figures come from `parts`)."""
    schedule = torch.profiler.schedule(wait=0, warmup=warmup, active=steps, repeat=1)
    return PyTorchProfiler(dirpath=tempfile.mkdtemp(prefix="malaria-profile-"), filename="profile",
                           schedule=schedule, record_module_names=False)


Span = tuple[float, float, "str | None"]


def spans(events: Iterable[FunctionEvent]) -> list[Span]:
    """The loop's regions as time spans (start, end, part), found by their markers' names.

    By time, not by the profiler's parent links: those break where Lightning's closure runs the
    forward and backward pass inside `Optimizer.step`, and the optimizer's own operators then show
    no parent but the step."""
    out = []
    for event in events:
        part = next((part for marker, part in REGIONS if marker in event.name), "")
        if part != "":
            out.append((event.time_range.start, event.time_range.end, part))
    return out


def part_of(event: FunctionEvent, regions: Sequence[Span] = ()) -> str:
    """The part an operator's own time belongs to: the innermost region its start lies in, else
    (or where that region is the forward or backward pass) its name's (autograd's
    `ConvolutionBackward0` and aten's `convolution_backward` alike)."""
    start = event.time_range.start
    inside = [(end - begin, part) for begin, end, part in regions if begin <= start < end]
    if inside:
        part = min(inside, key=lambda span: span[0])[1]
        if part is not None:
            return part
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
    regions = spans(e for e in events if e.thread == steps[0].thread)
    for event in events:
        # Operators only (aten::..., autograd's nodes): the profiler's, Lightning's and the
        # optimizer's region markers are spans, and a span's self time double-counts whatever ran
        # inside it without being linked as its child (autograd's backward, for one).
        if event.name.startswith(MARKERS) or not start <= event.time_range.start < end:
            continue
        if event.thread != steps[0].thread:  # the step's own thread: others (workers) overlap it
            continue
        totals[part_of(event, regions)] += event.self_cpu_time_total
    totals["overhead"] = max(0.0, wall - sum(totals.values()))
    return StepProfile({part: us / 1000 / len(steps) for part, us in totals.items()}, len(steps))
