"""Transfer-learning callbacks: which parameters train in each phase, frozen BatchNorm, LRs, resume."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import timm
import torch
from lightning.pytorch.callbacks import Callback
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader

from malaria.commands import train
from malaria.data.datamodule import CellDataset, MalariaDataModule, whole_batch
from malaria.model.finetune import FeatureExtraction, FineTune, layer_groups
from malaria.model.networks import create_model
from malaria.model.classifier import MalariaClassifier

MODEL = "test_resnet"  # timm's tiny ResNet: the same class and layer groups as resnet18, 0.5M parameters
RECIPES = ["resnet18_features", "resnet18_features_aug", "resnet18_finetune", "vgg16_finetune",
           "efficientnet_b0_finetune"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local 'pretrained' state dict (never the network), with BatchNorm statistics that a
    fresh network does not have, so loading them and keeping them are both visible."""
    state = timm.create_model(MODEL).state_dict()
    generator = torch.Generator().manual_seed(0)
    for name, tensor in state.items():
        if name.endswith(("running_mean", "running_var")):
            state[name] = torch.rand(tensor.shape, generator=generator) + 0.5
    path = tmp_path_factory.mktemp("weights") / f"{MODEL}.pth"
    torch.save(state, path)
    return path


def classifier_model(weights: Path) -> MalariaClassifier:
    return MalariaClassifier(model=MODEL, pretrained_file=str(weights), lr=0.01, weight_decay=0.05,
                             warmup_epochs=0.5)


def data(demo_dir: Path) -> MalariaDataModule:
    return MalariaDataModule(data_dir=str(demo_dir), image_size=32, batch_size=8, num_workers=0)


def fit(model: MalariaClassifier, datamodule: MalariaDataModule, epochs: int, *callbacks: Callback,
        ckpt_path: Path | None = None) -> L.Trainer:
    trainer = L.Trainer(max_epochs=epochs, limit_train_batches=3, limit_val_batches=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=list(callbacks))
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer


class Recorder(Callback):
    """Per epoch: the parameters that got gradients; per step: LRs by group, BatchNorm modes."""

    def __init__(self) -> None:
        self.grads: dict[int, set[str]] = {}
        self.lrs: list[dict[str, float]] = []
        self.norms_training: set[bool] = set()

    def on_after_backward(self, trainer: L.Trainer, pl_module: MalariaClassifier) -> None:
        names = {n for n, p in pl_module.net.named_parameters() if p.grad is not None}
        self.grads.setdefault(trainer.current_epoch, set()).update(names)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: MalariaClassifier, *args) -> None:
        groups = trainer.optimizers[0].param_groups
        self.lrs.append({g.get("name", f"head{i}"): g["lr"] for i, g in enumerate(groups)})
        self.norms_training |= {m.training for m in pl_module.net.modules() if isinstance(m, _BatchNorm)}


def names_of(net: torch.nn.Module, prefixes: tuple[str, ...], norms: bool = False) -> set[str]:
    """Parameter names under `prefixes`, BatchNorm ones only if `norms`."""
    owners = dict(net.named_modules())
    return {n for n, _ in net.named_parameters() if n.startswith(prefixes)
            and (norms or not isinstance(owners[n.rpartition(".")[0]], _BatchNorm))}


def norm_buffers(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in net.named_buffers() if "running" in n}


def optimizer_ids(trainer: L.Trainer) -> list[int]:
    return [id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]]


@pytest.mark.parametrize("name", ["resnet18", "vgg16", "efficientnet_b0", "convnext_atto", "inception_v3",
                                  "malaria_cnn"])
def test_layer_groups_are_timms_own_for_every_family(name: str) -> None:
    with torch.device("meta"):  # no memory, no time: only the structure matters
        net = create_model(name)
    groups = layer_groups(net)
    grouped = [id(p) for g in groups for m in g.modules for p in m.parameters(recurse=False)]
    classifier = [id(p) for p in net.get_classifier().parameters()]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) | set(classifier) == {id(p) for p in net.parameters()}
    assert not set(grouped) & set(classifier)
    first = next(iter(net.parameters()))
    assert any(p is first for m in groups[0].modules for p in m.parameters(recurse=False))  # bottom: the stem
    if name == "vgg16":
        assert groups[-1].name == "pre_logits"  # fc6/fc7 sit above the last convolution
    if name == "resnet18":
        assert [g.name for g in groups] == ["conv1+bn1", "layer1", "layer2", "layer3", "layer4"]


def test_feature_extraction_trains_only_the_classifier(weights: Path, demo_dir: Path) -> None:
    model = classifier_model(weights)
    loaded = torch.load(weights)
    assert torch.equal(dict(model.net.named_buffers())["bn1.running_mean"], loaded["bn1.running_mean"])
    before = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    recorder = Recorder()
    trainer = fit(model, data(demo_dir), 2, FeatureExtraction(), recorder)

    head = {"fc.weight", "fc.bias"}
    assert recorder.grads == {0: head, 1: head}
    assert sorted(optimizer_ids(trainer)) == sorted(id(p) for p in model.net.get_classifier().parameters())
    changed = {n for n, p in model.net.named_parameters() if not torch.equal(p, before[n])}
    assert changed == head
    assert all(torch.equal(b, loaded[n]) for n, b in norm_buffers(model.net).items())
    assert recorder.norms_training == {False}  # pretrained statistics normalise the training batches


def test_fine_tune_unfreezes_top_groups_at_a_fraction_of_the_lr(weights: Path, demo_dir: Path) -> None:
    model = classifier_model(weights)
    loaded = torch.load(weights)
    recorder = Recorder()
    callback = FineTune({1: 1, 2: "all"}, lr_fraction=0.1, lr_decay=0.5)
    trainer = fit(model, data(demo_dir), 3, callback, recorder)

    net = model.net
    head = {"fc.weight", "fc.bias"}
    assert recorder.grads[0] == head
    assert recorder.grads[1] == head | names_of(net, ("layer4",))
    assert recorder.grads[2] == names_of(net, ("",))  # every parameter but the BatchNorm ones
    trainable = [id(p) for p in net.parameters() if p.requires_grad]
    # Each exactly once, although the fresh BatchNorm weights are all equal (Lightning compares values).
    assert sorted(optimizer_ids(trainer)) == sorted(trainable)

    assert all(torch.equal(b, loaded[n]) for n, b in norm_buffers(net).items())
    assert recorder.norms_training == {False}

    depth = {g.name: d for d, g in enumerate(reversed(layer_groups(net)))}  # 0: the top group
    steps_after_unfreeze = recorder.lrs[3:]
    assert len({lrs["head0"] for lrs in steps_after_unfreeze}) == len(steps_after_unfreeze)  # it moves
    for lrs in steps_after_unfreeze:
        for name, lr in lrs.items():
            if not name.startswith("head"):
                scale = 0.1 * 0.5 ** depth[name.removesuffix("/no_decay")]
                assert lr == pytest.approx(lrs["head0"] * scale, rel=1e-9), name
    assert set(recorder.lrs[4]) == {"head0", "head1", "layer4.0"}  # bias-free convs: nothing without decay
    assert set(recorder.lrs[-1]) == {"head0", "head1", *depth}


def test_train_bn_lets_unfrozen_norms_learn_their_statistics(weights: Path, demo_dir: Path) -> None:
    model = classifier_model(weights)
    loaded = torch.load(weights)
    recorder = Recorder()
    trainer = fit(model, data(demo_dir), 1, FineTune({0: 1}, train_bn=True), recorder)

    assert recorder.grads[0] == {"fc.weight", "fc.bias"} | names_of(model.net, ("layer4",), norms=True)
    moved = {n for n, b in norm_buffers(model.net).items() if not torch.equal(b, loaded[n])}
    assert moved and all(n.startswith("layer4") for n in moved)
    assert recorder.norms_training == {False, True}
    decays = {g["name"]: g["weight_decay"] for g in trainer.optimizers[0].param_groups if "name" in g}
    assert decays == {"layer4.0": 0.05, "layer4.0/no_decay": 0.0}  # timm's split: no decay on norms


class Interrupt(Callback):
    """Stops training after `epochs` epochs, as a crash would, without changing the LR schedule."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


class InOrder(MalariaDataModule):
    """The same training batches in every run, un-augmented: two runs can be compared step by step."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(CellDataset(self.train_cache, self.train_rows, self.train_table.labels),
                          batch_size=self.hparams.batch_size, collate_fn=whole_batch)


def training_state(model: MalariaClassifier, trainer: L.Trainer) -> dict:
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [({k: v for k, v in g.items() if k != "params"}, [names[id(p)] for p in g["params"]])
              for g in trainer.optimizers[0].param_groups]
    return {
        "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
        "groups": groups,
        "norms_training": [m.training for m in model.net.modules() if isinstance(m, _BatchNorm)],
        "scheduler": trainer.lr_scheduler_configs[0].scheduler.base_lrs,
    }


@pytest.mark.parametrize("make_callback",
                         [FeatureExtraction, lambda: FineTune({1: 1, 2: "all"}, lr_decay=0.5)],
                         ids=["feature_extraction", "fine_tune"])
def test_resume_after_unfreeze_continues_identically(make_callback, weights: Path, demo_dir: Path,
                                                     tmp_path: Path) -> None:
    def run(*callbacks: Callback, ckpt_path: Path | None = None) -> tuple[MalariaClassifier, L.Trainer]:
        L.seed_everything(0)  # the same new classifier
        model = classifier_model(weights)
        datamodule = InOrder(data_dir=str(demo_dir), image_size=32, batch_size=8, num_workers=0)
        return model, fit(model, datamodule, 3, make_callback(), *callbacks, ckpt_path=ckpt_path)

    straight, straight_trainer = run()
    run(Interrupt(2))[1].save_checkpoint(tmp_path / "last.ckpt")
    resumed, resumed_trainer = run(ckpt_path=tmp_path / "last.ckpt")

    assert training_state(resumed, resumed_trainer) == training_state(straight, straight_trainer)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), name


def test_a_bad_schedule_is_a_clear_error() -> None:
    for unfreeze in ({-1: 1}, {2: 0}, {2: "most"}):
        with pytest.raises(ValueError, match="unfreeze"):
            FineTune(unfreeze)
    with pytest.raises(ValueError, match="lr_fraction"):
        FineTune({1: 1}, lr_fraction=0)
    with pytest.raises(TypeError, match="`net`"):
        FeatureExtraction().freeze_before_training(L.LightningModule())


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_are_valid_configs(recipe: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        train.main(["fit", "--config", f"configs/{recipe}.yaml", "--print_config"])
    assert exit_.value.code in (0, None)
    assert "malaria.model.finetune." in capsys.readouterr().out


def fine_tune_callback(cli: train.MalariaCLI) -> FineTune:
    return next(c for c in cli.trainer.callbacks if isinstance(c, FineTune))


def test_fine_tune_recipe_trains_and_resumes_through_the_cli(weights: Path, demo_dir: Path,
                                                             tmp_path: Path) -> None:
    tiny = ["--model.model", MODEL, "--model.pretrained", "false", "--model.pretrained_file", str(weights),
            "--data.data_dir", str(demo_dir), "--data.image_size", "32", "--data.batch_size", "16",
            "--data.num_workers", "0", "--trainer.limit_train_batches", "2",
            "--trainer.limit_val_batches", "1",
            "--trainer.enable_model_summary", "false"]
    cli = train.main(["fit", "--config", "configs/resnet18_finetune.yaml", *tiny, "--trainer.max_epochs", "3",
                      "--runs_dir", str(tmp_path), "--run", "ft"])
    run = tmp_path / "ft"
    assert fine_tune_callback(cli).unfrozen == 1  # layer4 from epoch 2: the recipe's {2: 1, 5: all}
    assert "lr-AdamW/layer4.0" in pd.read_csv(run / "metrics.csv").columns

    cli = train.main(["fit", "--config", str(run / "config.yaml"), "--runs_dir", str(tmp_path),
                      "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--trainer.max_epochs", "4"])
    callback = fine_tune_callback(cli)
    assert callback.unfreeze == {2: 1, 5: "all"}  # the saved config writes the epochs as strings
    assert callback.unfrozen == 1
