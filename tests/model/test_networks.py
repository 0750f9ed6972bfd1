from pathlib import Path

import pytest
import timm
import torch

from malaria.model.networks import MalariaCNN, create_model


def test_scratch_cnn_is_in_timms_registry() -> None:
    model = timm.create_model("malaria_cnn", num_classes=1, widths=(8, 16))
    assert isinstance(model, MalariaCNN)
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 1)
    assert model.forward_features(x).shape == (2, 16, 8, 8)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 16)
    assert model.get_classifier() is model.head


def test_group_matcher_gives_one_group_per_stage() -> None:
    from timm.models import group_parameters

    model = create_model("malaria_cnn", widths=(8, 16, 32))
    groups = group_parameters(model, model.group_matcher())
    assert len(groups) == 4  # stem stage, two more stages, head


@pytest.mark.parametrize("name", ["malaria_cnn", "resnet18", "efficientnet_b0"])
def test_any_backbone_gives_one_logit(name: str) -> None:
    model = create_model(name).eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1)


def test_pretrained_file_loads_local_weights(tmp_path: Path) -> None:
    source = timm.create_model("resnet18", num_classes=1000)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = create_model("resnet18", pretrained_file=str(path))
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.get_classifier().out_features == 1


def test_missing_pretrained_file_and_unknown_model_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_model("resnet18", pretrained_file=str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="Unknown model"):
        create_model("no_such_net")
    with pytest.raises(ValueError, match="no pretrained weights"):
        create_model("malaria_cnn", pretrained=True)
