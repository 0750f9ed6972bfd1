"""Transfer learning as Lightning callbacks, for any timm backbone, chosen in the trainer config.

`FeatureExtraction` freezes the whole backbone for the run, so only the new classifier trains
(on augmented images here, or on cached features with malaria/commands/features.py). `FineTune` starts
the same way, then unfreezes the top layer groups at the epochs it is given, each at a fraction
of the classifier's learning rate.

Layer groups are timm's own (`group_matcher`: stem, then stages or blocks, bottom to top) and the
classifier is `net.get_classifier()`, so no model family is special-cased. The LightningModule
keeps its timm network in `net`, as MalariaClassifier does.

Pitfalls of Lightning's `BaseFinetuning` that this module handles:
- Frozen BatchNorm layers are put in eval mode before every training batch: freezing alone only
  stops their running statistics from updating, while training batches would still be normalised
  with their own batch statistics instead of the pretrained ones.
- New param groups are de-duplicated by identity (`filter_on_optimizer` compares values, so two
  freshly initialised BatchNorm layers look like one), split like timm's optimizer factory does
  (no weight decay on norms and biases), and the LR schedulers are extended to drive them.
- On resume, the unfrozen groups are made trainable again: `BaseFinetuning` restores the
  optimizer's param groups but not `requires_grad`.
- Under DDP the model is wrapped again after unfreezing: DistributedDataParallel registers only
  the parameters that need gradients when it wraps, so without a new wrapper each rank would
  train its own copy of the unfrozen layers (Lightning issue 20340).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any, Literal, NamedTuple

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.strategies import DDPStrategy
from timm.models import group_parameters
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from malaria.common.flags import NonNegativeInt, PositiveFloat, PositiveInt

log = logging.getLogger(__name__)

GroupCount = PositiveInt | Literal["all"]


class LayerGroup(NamedTuple):
    """One of timm's layer groups: a readable name (e.g. `layer4`) and the modules owning its parameters."""

    name: str
    modules: list[nn.Module]


def _group_name(owners: list[str]) -> str:
    """The owners' common module path (`layer4`), or their top-level names joined (`conv1+bn1`)."""
    parts = [owner.split(".") for owner in owners]
    common = os.path.commonprefix(parts)
    return ".".join(common) if common else "+".join(dict.fromkeys(p[0] for p in parts))


def network(pl_module: L.LightningModule) -> nn.Module:
    """The timm network that the callbacks work on."""
    net = getattr(pl_module, "net", None)
    if not isinstance(net, nn.Module) or not hasattr(net, "group_matcher"):
        raise TypeError(f"{type(pl_module).__name__} must keep a timm network (with group_matcher) in `net`.")
    return net


def layer_groups(net: nn.Module, coarse: bool = True) -> list[LayerGroup]:
    """The backbone's layer groups, bottom to top, as timm's `group_matcher` defines them.

    `coarse` groups by stage (ResNet `layer1`..`layer4`), otherwise by block. The classifier
    (`net.get_classifier()`) belongs to no group; whatever else sits above the last stage (VGG's
    `pre_logits`, ConvNeXt's head norm) forms the top group. A group lists the modules that own its
    parameters directly, so freezing it touches nothing else."""
    classifier = {id(p) for p in net.get_classifier().parameters()}
    parameters = dict(net.named_parameters())
    groups = []
    for _, names in sorted(group_parameters(net, net.group_matcher(coarse=coarse)).items()):
        owners = [n.rpartition(".")[0] for n in names if id(parameters[n]) not in classifier]
        owners = list(dict.fromkeys(owners))
        if owners:
            groups.append(LayerGroup(_group_name(owners), [net.get_submodule(o) for o in owners]))
    return groups


def extend_schedulers(trainer: L.Trainer, optimizer: Optimizer) -> None:
    """Make the LR schedulers of `optimizer` drive param groups added after they were built.

    torch schedulers keep one base LR (LambdaLR also one lambda) per group and zip them with the
    optimizer's groups, so a group added later would silently keep a constant LR. Each new group
    gets its own `initial_lr` as base LR and follows the first group's lambda, so its LR stays the
    same multiple of the first group's through warm-up and decay. Schedulers that work on the
    groups' current LR (ReduceLROnPlateau, StepLR) need nothing."""
    groups = optimizer.param_groups
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        if scheduler.optimizer is not optimizer:
            continue
        base_lrs = getattr(scheduler, "base_lrs", None)
        if base_lrs is not None:
            base_lrs.extend(g["initial_lr"] for g in groups[len(base_lrs):])
        lambdas = getattr(scheduler, "lr_lambdas", None)
        if lambdas is not None:
            lambdas.extend([lambdas[0]] * (len(groups) - len(lambdas)))


def add_param_groups(trainer: L.Trainer, net: nn.Module, group: LayerGroup, optimizer: Optimizer,
                     lr_scale: float) -> None:
    """Add the trainable parameters of `group` to the optimizer at `lr_scale` x the first group's LR.

    Weight decay follows timm's split (none on norms and biases) at the optimizer's own rate."""
    members = {id(p) for m in group.modules for p in m.parameters(recurse=False) if p.requires_grad}
    present = {id(p) for g in optimizer.param_groups for p in g["params"]}
    first = optimizer.param_groups[0]
    weight_decay = max(g.get("weight_decay", 0.0) for g in optimizer.param_groups)
    no_decay_names = getattr(net, "no_weight_decay", set)()
    for split in param_groups_weight_decay(net, weight_decay, no_weight_decay_list=no_decay_names):
        params = [p for p in split["params"] if id(p) in members and id(p) not in present]
        if params:
            optimizer.add_param_group({
                "params": params,
                "weight_decay": split["weight_decay"],
                "lr": lr_scale * first["lr"],
                "initial_lr": lr_scale * first.get("initial_lr", first["lr"]),
                # A unique name per group: LearningRateMonitor logs it as lr-AdamW/<name>.
                "name": group.name if split["weight_decay"] else f"{group.name}/no_decay",
            })
    extend_schedulers(trainer, optimizer)


def rewrap_ddp(trainer: L.Trainer) -> None:
    """Wrap the LightningModule in a new DistributedDataParallel, as the DDP strategy did at setup,
    so that parameters made trainable since then have their gradients averaged across ranks."""
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, DistributedDataParallel):
        strategy.model = strategy.lightning_module
        strategy.configure_ddp()


def frozen_norms(net: nn.Module) -> Iterator[_BatchNorm]:
    """BatchNorm layers frozen by `BaseFinetuning.freeze` (it turns off their running statistics)."""
    return (m for m in net.modules() if isinstance(m, _BatchNorm) and not m.track_running_stats)


class FeatureExtraction(BaseFinetuning):
    """Freeze the whole backbone for the run: only the classifier (`net.get_classifier()`) trains.

    The optimizer then holds the classifier only (timm's `create_optimizer_v2` skips frozen
    parameters), and the frozen BatchNorm layers normalise with their pretrained statistics."""

    coarse = True  # FineTune may unfreeze blocks instead of stages

    def __init__(self) -> None:
        super().__init__()
        self.groups: list[LayerGroup] = []

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        self.groups = layer_groups(network(pl_module), self.coarse)
        self.freeze([g.modules for g in self.groups], train_bn=False)

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        """Nothing to unfreeze: the backbone stays frozen."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # Per batch, not per epoch: any `train()` call (a hook, a validation loop) would undo it.
        for norm in frozen_norms(network(pl_module)):
            norm.eval()


class FineTune(FeatureExtraction):
    """Freeze the backbone and train the classifier, then unfreeze the top layer groups on a schedule.

    Args:
        unfreeze: epoch -> how many top layer groups are trainable from that epoch on, or "all";
            e.g. `{3: 1, 6: "all"}` trains the classifier alone for 3 epochs, adds the top group,
            then the whole backbone from epoch 6.
        lr_fraction: the top group's LR as a fraction of the classifier's; it follows the
            classifier's schedule (warm-up, decay) at that ratio.
        lr_decay: each group further down gets this factor more (discriminative LRs; 1 = equal).
        train_bn: also train the BatchNorm layers of unfrozen groups, weights and running
            statistics. Off by default: on small data the pretrained statistics are the better ones.
        coarse: groups are stages (True) or blocks (False), as timm's `group_matcher` defines them.
    """

    def __init__(self, unfreeze: dict[NonNegativeInt, GroupCount], lr_fraction: PositiveFloat = 0.1,
                 lr_decay: PositiveFloat = 1.0, train_bn: bool = False, coarse: bool = True) -> None:
        super().__init__()
        for epoch, count in unfreeze.items():
            if epoch < 0 or not (count == "all" or (isinstance(count, int) and count >= 1)):
                raise ValueError(f"FineTune unfreeze: {epoch}: {count!r} must map an epoch >= 0 "
                                 "to a count >= 1 or 'all'.")
        if lr_fraction <= 0 or lr_decay <= 0:
            raise ValueError(f"FineTune lr_fraction ({lr_fraction}) and lr_decay ({lr_decay}) must be "
                             "positive.")
        self.unfreeze = dict(sorted(unfreeze.items()))
        self.lr_fraction = lr_fraction
        self.lr_decay = lr_decay
        self.train_bn = train_bn
        self.coarse = coarse
        self.unfrozen = 0  # how many top groups are trainable now; checkpointed
        self.resuming = False  # set by load_state_dict, which Lightning calls only when a fit resumes

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "unfrozen": self.unfrozen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.unfrozen = state_dict["unfrozen"]
        self.resuming = True
        super().load_state_dict(state_dict)

    def groups_at(self, epoch: int) -> int:
        """How many top groups the schedule wants trainable at `epoch` (never fewer than before)."""
        wanted = [len(self.groups) if n == "all" else min(n, len(self.groups))
                  for start, n in self.unfreeze.items() if start <= epoch]
        return max([self.unfrozen, *wanted])

    def _make_trainable(self, group: LayerGroup) -> None:
        self.make_trainable([m for m in group.modules if self.train_bn or not isinstance(m, _BatchNorm)])
        if self.train_bn:  # frozen, they were kept in eval mode
            for norm in group.modules:
                if isinstance(norm, _BatchNorm):
                    norm.train()

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        unfrozen = self.unfrozen
        for depth in range(self.unfrozen, self.groups_at(epoch)):
            group = self.groups[-1 - depth]
            scale = self.lr_fraction * self.lr_decay**depth
            self._make_trainable(group)
            add_param_groups(pl_module.trainer, network(pl_module), group, optimizer, scale)
            self.unfrozen = depth + 1
            log.info("Epoch %d: unfroze %s at %.3g x the classifier's LR.", epoch, group.name, scale)
        if self.unfrozen != unfrozen:
            rewrap_ddp(pl_module.trainer)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)  # puts the checkpoint's param groups back, by name
        if self.resuming:
            self.resuming = False
            for group in self.groups[len(self.groups) - self.unfrozen:]:
                self._make_trainable(group)
            for optimizer in trainer.optimizers:
                extend_schedulers(trainer, optimizer)
            if self.unfrozen:
                rewrap_ddp(trainer)
