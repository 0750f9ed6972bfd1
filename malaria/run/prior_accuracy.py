"""`val/acc_prior`: each validation epoch's holdout accuracy with the slide prior on.

What `make predict` submits weighs each cell by its slide's training labels
(`malaria.prediction.slide_prior`), so a sweep that prunes trials by epoch watches this figure, not the
images' own `val/acc`. The prior of the holdout uses only the training side's labels
(`malaria.prediction.predictor.slide_prior`); a slide-grouped holdout's slides have none, and there
the figure equals `val/acc`.

Validation's own probabilities are scored: a forward hook on the LightningModule keeps the logits
`validation_step` computes, so no image goes through the network twice. Under DDP each rank counts its
share and torchmetrics adds the counts up, so every holdout cell counts once.
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.hooks import RemovableHandle
from torchmetrics.classification import BinaryAccuracy

from malaria.common.flags import PositiveFloat
from malaria.data.datamodule import Batch
from malaria.model.metrics import THRESHOLD
from malaria.prediction.predictor import slide_prior
from malaria.prediction.slide_prior import DEFAULT_STRENGTH, SlidePrior

METRIC = "val/acc_prior"


class PriorAccuracy(Callback):
    """Logs `val/acc_prior` after every validation epoch (not the sanity check), beside `val/acc`."""

    def __init__(self, strength: PositiveFloat = DEFAULT_STRENGTH) -> None:
        self.strength = strength
        self.accuracy = BinaryAccuracy(THRESHOLD)
        self.prior: SlidePrior | None = None
        self.logits: list[torch.Tensor] = []
        self.hook: RemovableHandle | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.accuracy = self.accuracy.to(pl_module.device)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self.prior is None:  # the split is fixed for the run: fit the slides' rates once
            self.prior = slide_prior(trainer.datamodule, "val", self.strength)
        self.hook = pl_module.register_forward_hook(self._keep)

    def _keep(self, module: LightningModule, inputs: tuple, output: object) -> None:
        # Under DDP Lightning also calls the module to run validation_step through the DDP wrapper (its
        # output: the step's, None); only the network's logits are kept.
        if isinstance(output, torch.Tensor):
            self.logits.append(output.detach())

    def on_validation_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Batch,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        self.logits.clear()

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: object,
                                batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.hook is None or not self.logits:
            return
        _, labels, rows = batch
        table = trainer.datamodule.train_table
        # The step's first forward is validation's own (another callback may run the network again).
        probs = torch.sigmoid(self.logits[0]).cpu().numpy()
        adjusted = self.prior.adjust([table.ids[r] for r in rows.tolist()], probs)
        self.accuracy.update(torch.as_tensor(adjusted, device=labels.device), (labels >= 0.5).long())
        self.logits.clear()

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.hook is None:
            return
        self.hook.remove()
        self.hook = None
        pl_module.log(METRIC, self.accuracy.compute())  # compute() has summed the ranks' counts already
        self.accuracy.reset()

