"""What the machine computes fastest: the precision every Trainer of the project defaults to."""

from __future__ import annotations

import copy
import functools
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_backward_flop

# CPU flags (Linux /proc/cpuinfo names) of native bf16 arithmetic: AVX512-BF16 (Intel Cooper Lake
# and later, AMD Zen 4 and later) and AMX. Without them PyTorch emulates bf16, slower than fp32.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags as the kernel reports them; empty where there is no /proc/cpuinfo."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU does bf16 in hardware, read from the running machine, never assumed."""
    return bool(cpu_flags(cpuinfo) & BF16_CPU_FLAGS)


def default_precision() -> str:
    """Mixed precision where the hardware has it: bf16 (or fp16) on a GPU, bf16 autocast on a CPU
    with native bf16 (about 2x the training images per second of fp32 at 64 px, docs/results.md),
    full precision on any other CPU."""
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_bf16() else "32-true"


def matmul_peak_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """The machine's own ceiling for `dtype`: GFLOP/s of the best of `repeats` square matmuls on the
    device the project trains on (all CPU threads, or the GPU)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up the kernels
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


@functools.cache
def torch_overcounts_grouped_convolutions() -> bool:
    """Whether torch's FLOP counter counts a grouped convolution's weight gradient once per group
    (pytorch/pytorch#183405), read from its count of a tiny 2-group convolution: the fix below then
    stops itself in the torch release that counts right, with no version number to keep."""
    conv = torch.nn.Conv2d(2, 2, 1, groups=2, bias=False)
    with FlopCounterMode(display=False) as counter:
        conv(torch.ones(1, 2, 1, 1)).sum().backward()  # the input needs no gradient: only the weight's
    forward = 2 * 2  # one multiply-add for each of the 2 output channels
    return counter.get_total_flops() > 2 * forward


def _grouped_conv_backward_flop(grad_out_shape: list[int], x_shape: list[int], w_shape: list[int],
                                bias: Any, stride: Any, padding: Any, dilation: Any, transposed: bool,
                                output_padding: Any, groups: int, output_mask: list[bool], out_shape: Any,
                                **kwargs: Any) -> int:
    """torch's count of a convolution's backward, with the weight gradient of a grouped convolution
    divided by its groups: torch 2.14 counts it once per group, which put EfficientNet's training
    step at 14x its cost (fixed upstream by pytorch/pytorch#183405). Used only while
    `torch_overcounts_grouped_convolutions`."""
    args = (grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding,
            groups)
    flops = conv_backward_flop(*args, output_mask, out_val=out_shape, **kwargs)
    if not output_mask[1] or groups == 1:
        return flops
    weight = conv_backward_flop(*args, [False, True, False], out_val=out_shape, **kwargs)
    return flops - weight + weight // groups


def training_gflop_per_image(net: torch.nn.Module, image_size: int, batch: int = 4) -> float:
    """GFLOP of one training step per image (forward and backward), as `torch.utils.flop_counter`
    counts them: convolutions and matmuls, the work the hardware's peak is quoted for."""
    net = copy.deepcopy(net).train()
    images = torch.randn(batch, 3, image_size, image_size, device=next(net.parameters()).device)
    fixes = ({torch.ops.aten.convolution_backward: _grouped_conv_backward_flop}
             if torch_overcounts_grouped_convolutions() else {})
    with FlopCounterMode(display=False, custom_mapping=fixes) as counter:
        net(images).float().sum().backward()
    return counter.get_total_flops() / batch / 1e9
