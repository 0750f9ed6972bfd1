import numpy as np
import torch

from malaria.model.classifier import MalariaClassifier, warmup_cosine
from malaria.data.augmentation import dihedral_views, random_dihedral


def _batch(n: int = 4, size: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    return images, torch.tensor([0.0, 1.0] * (n // 2)), torch.arange(n)


def test_dihedral_views_are_the_eight_distinct_symmetries() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    views = dihedral_views(x)
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8


def test_random_dihedral_keeps_each_image_content() -> None:
    x = torch.rand(16, 3, 8, 8)
    out = random_dihedral(x)
    for a, b in zip(x, out):
        assert torch.isclose(a.sum(), b.sum()) and any(torch.equal(v[0], b) for v in dihedral_views(a[None]))


def test_batches_are_normalised_on_device_with_the_backbone_stats() -> None:
    model = MalariaClassifier(model_kwargs={"widths": (8, 16)}).eval()
    images, labels, rows = model.on_after_batch_transfer(_batch(), 0)
    assert images.dtype == torch.float32
    assert -3 < images.min() < -1 and 1 < images.max() < 3  # (x/255 - 0.5) / 0.25


def test_shared_step_and_tta_prediction() -> None:
    model = MalariaClassifier(model_kwargs={"widths": (8, 16)}, tta=True, label_smoothing=0.1).eval()
    batch = model.on_after_batch_transfer(_batch(), 0)
    loss, probs, labels = model.model_step(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    out = model.predict_step(batch, 0)
    with torch.no_grad():
        views = torch.stack([torch.sigmoid(model(v)) for v in dihedral_views(batch[0])])
    assert torch.allclose(out["probs"], views.mean(0), atol=1e-6)  # the mean of the 8 views, not one
    assert not torch.allclose(out["probs"], views[0], atol=1e-6)
    assert torch.equal(out["rows"], torch.arange(4))


def test_warmup_cosine_schedule() -> None:
    factor = warmup_cosine(10, 100)
    assert factor(0) == 0.1 and factor(9) == 1.0
    assert factor(55) < factor(20) and abs(factor(100) - 0.01) < 1e-9


def test_compile_switch_keeps_checkpoint_names() -> None:
    plain = MalariaClassifier(model_kwargs={"widths": (8, 16)})
    compiled = MalariaClassifier(model_kwargs={"widths": (8, 16)}, compile_net=True)
    assert compiled.state_dict().keys() == plain.state_dict().keys()
    assert compiled.net._compiled_call_impl is not None and plain.net._compiled_call_impl is None


def test_mixup_mixes_training_images_and_labels_alike() -> None:
    model = MalariaClassifier(model_kwargs={"widths": (8, 16)}, mixup={"mixup_alpha": 4.0}, channels_last=False)
    model.batch_augment = None  # only the mixing under test
    raw = _batch(n=6)
    plain, _, _ = model.eval().on_after_batch_transfer(raw, 0)
    np.random.seed(1)  # timm draws the mixing weight from numpy
    images, labels, _ = model.train().on_after_batch_transfer(raw, 0)
    share = labels[0].item()  # a label-0 image mixed with a label-1 one: its label is the other's share
    assert 0.05 < share < 0.95 and torch.allclose(labels, torch.tensor([share, 1 - share] * 3), atol=1e-6)
    assert torch.allclose(images, (1 - share) * plain + share * plain.flip(0), atol=1e-5)
    _, _, metric_labels = model.model_step((images, labels, raw[2]))
    assert metric_labels.tolist() == (labels >= 0.5).long().tolist()


def test_mixup_leaves_evaluation_and_odd_batches_alone() -> None:
    model = MalariaClassifier(model_kwargs={"widths": (8, 16)}, mixup={"cutmix_alpha": 1.0, "mixup_alpha": 0.0})
    model.batch_augment = None
    raw = _batch(n=4)
    assert torch.equal(model.eval().on_after_batch_transfer(raw, 0)[1], raw[1])
    odd = (raw[0][:3], raw[1][:3], raw[2][:3])
    assert torch.equal(model.train().on_after_batch_transfer(odd, 0)[1], odd[1])
