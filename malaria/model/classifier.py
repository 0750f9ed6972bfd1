"""The LightningModule: a timm-interface network, one shared step, binary metrics (malaria.model.metrics)."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import timm
import torch
from timm.data import Mixup
from timm.optim import create_optimizer_v2, get_optimizer_info
from torch import nn
from torchmetrics import MaxMetric

from malaria.data.datamodule import Batch
from malaria.common.errors import ConfigError
from malaria.common.flags import Fraction, NonNegativeFloat, PositiveFloat
from malaria.model.metrics import binary_metrics
from malaria.model.networks import create_model
from malaria.data.augmentation import Augment, BatchAugment, dihedral_views, random_dihedral


def warmup_cosine(warmup_steps: int, total_steps: int, floor: float = 0.01):
    """LR factor: linear warm-up, then cosine decay to `floor` of the base LR."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def mixup_for_one_logit(arguments: dict[str, Any]) -> Mixup:
    """timm's Mixup in its multi-label form, which mixes the 0/1 labels themselves. What timm would
    refuse only at the first training batch (no positive alpha, a negative one) is refused here."""
    try:
        mixup = Mixup(**arguments, label_smoothing=0.0, num_classes=1, multi_label=True)
    except (AssertionError, TypeError) as err:
        raise ConfigError(f"--model.mixup {arguments}: {err}") from None
    alphas = (mixup.mixup_alpha, mixup.cutmix_alpha)
    if min(alphas) < 0 or (max(alphas) == 0 and mixup.cutmix_minmax is None):
        raise ConfigError(f"--model.mixup {arguments}: mixup_alpha and cutmix_alpha must not be negative, "
                          "and one of them positive (or cutmix_minmax set).")
    return mixup


def check_optimizer(name: str) -> None:
    """Refuse a name timm's optimizer factory would refuse, before the run starts rather than at its
    first step. timm reads `lookahead_<name>` as Lookahead over <name>."""
    try:
        get_optimizer_info(name.lower().split("_")[-1])
    except ValueError:
        raise ConfigError(f"--model.optimizer {name!r}: not an optimizer timm knows "
                          "(timm.optim.list_optimizers(), optionally prefixed lookahead_).") from None


class MalariaClassifier(L.LightningModule):
    """Binary classifier (1 = parasitized) around any `timm.create_model` network.

    Batches arrive as uint8 images; they are augmented (training, `augment.on_device`) and
    normalised here, on the model's device, with the network's own pretrained mean and std, so the
    DataLoader moves 4x fewer bytes. `augment` is the datamodule's (the CLI links the two), which
    runs the rest in its workers.

    `mixup` takes `timm.data.Mixup`'s arguments (`mixup_alpha`, `cutmix_alpha`, `prob`,
    `switch_prob`...) and mixes training batches and their labels; the loss then sees soft labels."""

    def __init__(
        self,
        model: str = "malaria_cnn",
        pretrained: bool = False,
        pretrained_file: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        optimizer: str = "adamw",
        lr: PositiveFloat = 3e-3,
        weight_decay: NonNegativeFloat = 0.05,
        warmup_epochs: NonNegativeFloat = 1.0,
        label_smoothing: Fraction = 0.0,
        mixup: dict[str, Any] | None = None,
        batch_dihedral: bool = False,
        tta: bool = False,
        channels_last: bool = True,
        compile_net: bool = False,
        augment: Augment | None = None,
    ) -> None:
        super().__init__()
        check_optimizer(optimizer)
        self.save_hyperparameters()
        self.net = create_model(model, pretrained=pretrained, pretrained_file=pretrained_file,
                                **(model_kwargs or {}))
        data_config = timm.data.resolve_model_data_config(self.net)
        self.register_buffer("mean", torch.tensor(data_config["mean"]).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(data_config["std"]).view(1, 3, 1, 1) * 255, persistent=False)
        if isinstance(augment, dict):  # as the CLI's link and a checkpoint's hyperparameters pass it
            augment = Augment(**augment)
        augment = augment or Augment()
        self.batch_augment = BatchAugment(augment) if augment.on_device else None
        self.mixup = mixup_for_one_logit(mixup) if mixup else None
        self.criterion = nn.BCEWithLogitsLoss()
        self.train_metrics = binary_metrics().clone(prefix="train/")
        self.val_metrics = binary_metrics().clone(prefix="val/")
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # a resumed run remembers its best epoch
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if compile_net:  # in place: checkpoints keep the plain network's parameter names
            self.net.compile()

    def on_fit_start(self) -> None:
        self.use_slide_colours(self.trainer.datamodule)

    def use_slide_colours(self, datamodule: Any) -> None:
        """Give RandStainNA, where the recipe uses it, the training slides' colours to draw from."""
        if self.batch_augment is not None and self.batch_augment.aug.randstain_p:
            self.batch_augment.slide_moments = datamodule.slide_moments()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits, one per image, for normalised float images; fp32 even under bf16 autocast, whose
        8-bit mantissa would round probabilities above 0.998 to 1 (infinite log-odds for the slide prior)."""
        return self.net(images).squeeze(1).float()

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, 3, H, W) -> the network's input, on the model's device."""
        return (images.to(self.mean.device).float() - self.mean) / self.std

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        images, labels, rows = batch
        # Lightning puts the module in train mode for training batches only.
        if self.training and self.batch_augment is not None:
            images = self.batch_augment(images)
        images = self.normalise(images)
        if self.training and self.hparams.batch_dihedral:
            images = random_dihedral(images)
        if self.training and self.mixup is not None and len(images) % 2 == 0:  # timm pairs image i with N-1-i
            images, labels = self.mixup(images, labels[:, None])
            labels = labels.squeeze(1)
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels, rows

    def model_step(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, labels, _ = batch
        logits = self(images)
        smoothing = self.hparams.label_smoothing
        loss = self.criterion(logits, labels * (1 - smoothing) + 0.5 * smoothing)
        # Metrics count a mixed image as its larger part's class.
        return loss, torch.sigmoid(logits), (labels >= 0.5).long()

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss, probs, labels = self.model_step(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"Training loss became {loss.item()} at epoch {self.current_epoch}, step {self.global_step}. "
                "Stopping before a broken checkpoint is saved; lower model.lr or check the input images."
            )
        self.train_metrics.update(probs, labels)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        loss, probs, labels = self.model_step(batch)
        self.val_metrics.update(probs, labels)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log_dict(self.val_metrics, on_epoch=True, prog_bar=False)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:  # its few batches must not count as the best accuracy
            return
        self.val_acc_best(self.val_metrics["acc"].compute())
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor]:
        """Probability of parasitized per image, averaged over the 8 dihedral views with `tta`."""
        images, _, rows = batch
        views = dihedral_views(images) if self.hparams.tta else [images]
        probs = torch.stack([torch.sigmoid(self(v)) for v in views]).mean(0)
        return {"rows": rows, "probs": probs.float()}

    def configure_optimizers(self) -> dict[str, Any]:
        # timm's factory skips frozen parameters and exempts norms and biases from weight decay; its
        # names include "sgd" (Nesterov, momentum 0.9) and Lookahead wrappers such as "lookahead_adamw".
        optimizer = create_optimizer_v2(
            self.net, self.hparams.optimizer, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        total = self.trainer.estimated_stepping_batches
        warmup = int(self.hparams.warmup_epochs * total / max(1, self.trainer.max_epochs))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
