"""What the machine computes fastest: the precision every Trainer of the project defaults to."""

from __future__ import annotations

from pathlib import Path

import torch

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
