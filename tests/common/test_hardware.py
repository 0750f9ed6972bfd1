from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from malaria.common import hardware

AVX512_NO_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"
AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"


@pytest.mark.parametrize("cpuinfo, expected", [(AVX512_BF16, True), (AVX512_NO_BF16, False), (ARM, False)])
def test_bf16_is_read_from_the_cpu_flags(tmp_path: Path, cpuinfo: str, expected: bool) -> None:
    (tmp_path / "cpuinfo").write_text(cpuinfo)
    assert hardware.cpu_has_bf16(tmp_path / "cpuinfo") is expected


def test_a_machine_without_cpuinfo_keeps_fp32(tmp_path: Path) -> None:
    assert hardware.cpu_flags(tmp_path / "absent") == frozenset()
    assert not hardware.cpu_has_bf16(tmp_path / "absent")


@pytest.mark.parametrize("has_bf16, expected", [(True, "bf16-mixed"), (False, "32-true")])
def test_cpu_precision_follows_the_hardware(monkeypatch: pytest.MonkeyPatch, has_bf16: bool, expected: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: has_bf16)
    assert hardware.default_precision() == expected


def test_logits_stay_fp32_under_bf16_autocast() -> None:
    from malaria.model.classifier import MalariaClassifier

    model = MalariaClassifier(model_kwargs={"widths": [8, 16]}).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(4, 3, 32, 32))
    assert logits.dtype == torch.float32


def test_a_training_step_of_the_default_network_costs_about_one_gflop_an_image_at_64_px() -> None:
    from malaria.model.networks import create_model

    net = create_model("malaria_cnn", widths=[32, 64, 128, 128], convs_per_stage=2)
    at_64 = hardware.training_gflop_per_image(net, 64)
    assert 0.9 < at_64 < 1.2  # forward 0.35 GFLOP, backward about twice that
    assert hardware.training_gflop_per_image(net, 32) == pytest.approx(at_64 / 4, rel=0.02)


PIXELS = 16 * 16
POINTWISE, DEPTHWISE = 2 * PIXELS * 8 * 3, 2 * PIXELS * 8 * 9  # the forward FLOP of each layer below


def pointwise_then_depthwise() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1, bias=False),
                               torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False))


def test_a_depthwise_convolution_counts_its_weight_gradient_once() -> None:
    """Pointwise then depthwise, 8 channels: each backward product costs what its forward did, and the
    first layer (whose input needs no gradient) has only its weight's. torch 2.14 alone counts the
    depthwise weight gradient 8 times over."""
    expected = 2 * POINTWISE + 3 * DEPTHWISE
    assert hardware.training_gflop_per_image(pointwise_then_depthwise(), 16) * 1e9 == pytest.approx(expected)


def test_the_fix_applies_only_while_torch_overcounts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard reads torch's own count; once torch counts right, its count is used as it is."""
    net = pointwise_then_depthwise()
    with FlopCounterMode(display=False) as counter:
        net(torch.randn(1, 3, 16, 16)).sum().backward()
    own = counter.get_total_flops()
    assert hardware.torch_overcounts_grouped_convolutions() == (own > 2 * POINTWISE + 3 * DEPTHWISE)
    monkeypatch.setattr(hardware, "torch_overcounts_grouped_convolutions", lambda: False)
    assert hardware.training_gflop_per_image(net, 16) * 1e9 == pytest.approx(own)


def test_the_matmul_peak_is_a_rate() -> None:
    assert 0 < hardware.matmul_peak_gflops(torch.float32, size=256, repeats=2) < 1e6
