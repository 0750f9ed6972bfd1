"""Fast feature extraction: the frozen backbone runs once, the classifier trains on cached features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from torchmetrics.classification import BinaryAccuracy

from malaria.common import hardware
from malaria.commands import features
from malaria.run.loggers import WandbSaveConfig
from malaria.data.datamodule import MalariaDataModule
from malaria.commands.features import FeatureHead
from malaria.prediction.predictor import predict_checkpoints
from malaria.model.metrics import score
from malaria.model.classifier import MalariaClassifier

MODEL = "test_resnet"  # timm's tiny ResNet: resnet18's structure at 0.5M parameters


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local 'pretrained' backbone (never the network), randomly initialised."""
    path = tmp_path_factory.mktemp("weights") / f"{MODEL}.pth"
    torch.save(timm.create_model(MODEL).state_dict(), path)
    return path


def optimizer_steps(cli: features.FeaturesCLI) -> dict[str, int]:
    """How many optimizer steps each parameter in the optimizer has taken, by name."""
    optimizer = cli.trainer.optimizers[0]
    names = {id(p): n for n, p in cli.model.net.named_parameters()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return {names[id(p)]: int(optimizer.state[p]["step"]) for p in params}


def run_features(data_dir: Path, runs_dir: Path, weights: Path, *extra: str) -> features.FeaturesCLI:
    return features.main([
        "--config", "configs/resnet18_features.yaml", "--model.model", MODEL, "--model.pretrained", "false",
        "--model.pretrained_file", str(weights), "--data.data_dir", str(data_dir), "--data.image_size", "32",
        "--data.batch_size", "32", "--data.num_workers", "0", "--trainer.max_epochs", "3",
        "--trainer.enable_model_summary", "false", "--runs_dir", str(runs_dir), *extra,
    ])


@pytest.mark.parametrize("name, kwargs", [("test_resnet", {}), ("test_efficientnet", {}),
                                          ("test_convnext", {}), ("malaria_cnn", {"widths": [8, 16]})])
def test_the_classifier_on_pooled_features_is_the_whole_network(name: str, kwargs: dict) -> None:
    head = FeatureHead(model=name, model_kwargs=kwargs).eval()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    batch = (images, torch.zeros(4), torch.arange(4))
    with torch.no_grad():
        pooled = head.pooled_features(images)
        assert pooled.shape == (4, head.net.get_classifier().in_features)
        normalised = head.on_after_batch_transfer(batch, 0)[0]
        assert torch.allclose(head(pooled), head(normalised), atol=1e-5)
        assert head.on_after_batch_transfer((pooled, *batch[1:]), 0)[0] is pooled  # features pass untouched

        head.standardise(pooled.mean(0), pooled.std(0) + 0.1)
        standardised = head(pooled)
        assert not torch.allclose(standardised, head(normalised), atol=1e-3)  # weights are in another space
        head.fold_standardisation()
        assert not head.standardised
        assert torch.allclose(head(pooled), standardised, atol=1e-5)
        assert torch.allclose(head(normalised), standardised, atol=1e-5)


def test_features_mode_trains_only_the_classifier_and_predicts_from_images(
        weights: Path, demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Exact agreement of validation and prediction holds at one precision: fp32 throughout, as bf16
    # autocast (this CPU's default) rounds the features and the images' path differently.
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: False)
    cli = run_features(demo_dir, tmp_path, weights, "--run", "feat")
    run = tmp_path / "feat"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 3  # best_val_acc is checked against predictions below
    assert {"train/loss_epoch", "val/acc"} <= set(pd.read_csv(run / "metrics.csv").columns)
    cached = list((demo_dir / ".cache").glob("train-32px-*-features-*.npy"))
    assert cached and {np.load(c).shape for c in cached} == {(240, cli.model.net.num_features)}

    assert optimizer_steps(cli) == {"fc.weight": cli.trainer.global_step, "fc.bias": cli.trainer.global_step}
    trained = MalariaClassifier.load_from_checkpoint(run / "checkpoints" / "best.ckpt", weights_only=False)
    assert type(trained) is MalariaClassifier  # a plain image classifier: predict.py needs nothing special
    state = trained.net.state_dict()
    assert all(torch.equal(state[k], v) for k, v in torch.load(weights).items() if not k.startswith("fc."))
    assert not cli.model.standardised  # folded at the end of fitting

    # What was validated on cached features is what predicts from images.
    images = MalariaDataModule(data_dir=str(demo_dir), image_size=32, batch_size=64, num_workers=0,
                               split=cli.datamodule.hparams.split)  # the recipe's holdout
    images.setup("fit")
    accuracy = BinaryAccuracy()
    with torch.no_grad():
        for batch in images.val_dataloader():
            normalised, labels, _ = trained.eval().on_after_batch_transfer(batch, 0)
            accuracy.update(torch.sigmoid(trained(normalised)), labels.long())
    assert accuracy.compute().item() == pytest.approx(summary["best_val_acc"], abs=1e-6)

    best = [run / "checkpoints" / "best.ckpt"]
    assert len(predict_checkpoints(best, "test", tta=False).ids) == 40
    val = predict_checkpoints(best, "val", tta=False)
    assert score(val.probs, val.labels)["acc"] == pytest.approx(summary["best_val_acc"], abs=1e-6)


def test_features_are_extracted_once_per_backbone_and_runs_resume(
        weights: Path, demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_features(demo_dir, tmp_path, weights, "--run", "once")
    run = tmp_path / "once"

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone ran again")

    monkeypatch.setattr(features, "extract", no_backbone)
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    cli = features.main(["--config", str(run / "config.yaml"), "--runs_dir", str(tmp_path),
                         "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--trainer.max_epochs", "5"])
    assert cli.trainer.current_epoch == 5 and cli.trainer.global_step > last["global_step"]
    assert cli.save_config_callback is WandbSaveConfig  # built as `make train` builds its CLI
    # The Adam state came back: its step counts run on from the checkpoint's, for the classifier alone.
    assert optimizer_steps(cli) == {"fc.weight": cli.trainer.global_step, "fc.bias": cli.trainer.global_step}

    other = tmp_path / "other.pth"
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in torch.load(weights).items()}, other)
    with pytest.raises(AssertionError, match="backbone ran again"):
        run_features(demo_dir, tmp_path, other, "--run", "other")
