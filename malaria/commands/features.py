"""Fast feature extraction: the frozen backbone runs once over the un-augmented training images,
its pooled features are cached, and only the new classifier trains on them.

    python -m malaria.commands.features --config configs/resnet18_features.yaml [--data.data_dir D] [--run NAME]

It is `malaria.commands.train`'s CLI with `fit` implied, so the run directory, loggers, callbacks and
resume work the same. Checkpoints are plain MalariaClassifier checkpoints (frozen backbone +
trained classifier): `malaria.commands.predict` predicts from images, with TTA, as after any other run.
Features are cached beside the decoded images, keyed by the image cache and the backbone's
weights, so another run with other head settings (lr, epochs) never runs the backbone again. The
classifier trains on standardised features (see `FeatureHead`): a linear probe on raw pooled
activations converges badly.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from malaria.common import errors
from malaria.common.atomic import replace_file
from malaria.run.cli import MalariaCLI, build
from malaria.data.datamodule import CellDataset, MalariaDataModule
from malaria.prediction.predictor import bare_trainer, predict_dataset
from malaria.model.classifier import Batch, MalariaClassifier

STANDARDISATION = "feature_standardisation"  # checkpoint entry: the classifier as it trains


class FeatureHead(MalariaClassifier):
    """A MalariaClassifier that also takes pooled features (N, D) in place of images, and runs only
    its classifier on them.

    Raw pooled activations are a badly conditioned problem for a linear classifier (a large shared
    mean, small spreads), so after `standardise` the classifier trains on standardised features:
    its weights live in that space. Checkpoints, and the module once fitting ends, hold the
    standardisation folded into the classifier (w/s, b - w.m/s): plain MalariaClassifier weights,
    which predict from images."""

    def standardise(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """From now on, the classifier sees (features - mean) / std."""
        self.register_buffer("feature_mean", mean, persistent=False)
        self.register_buffer("feature_std", std, persistent=False)

    @property
    def standardised(self) -> bool:
        return hasattr(self, "feature_mean")

    def _classifier(self) -> tuple[str, nn.Linear]:
        """The classifier and its state-dict prefix (e.g. `net.fc`)."""
        classifier = self.net.get_classifier()
        if not isinstance(classifier, nn.Linear) or classifier.bias is None:
            raise TypeError(f"Feature extraction trains a linear classifier; {self.hparams.model}'s is "
                            f"{type(classifier).__name__}. Use malaria.commands.train with FeatureExtraction instead.")
        return next(n for n, m in self.named_modules() if m is classifier), classifier

    def _folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The classifier's weight and bias for raw features: the same logits as on standardised ones."""
        classifier = self._classifier()[1]
        weight = classifier.weight / self.feature_std
        return weight, classifier.bias - weight @ self.feature_mean

    def fold_standardisation(self) -> None:
        """Fold the standardisation into the classifier, so images and raw features give the same logits."""
        weight, bias = self._folded()
        classifier = self._classifier()[1]
        with torch.no_grad():
            classifier.weight.copy_(weight)
            classifier.bias.copy_(bias)
        del self.feature_mean, self.feature_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2:
            return super().forward(x)
        if self.standardised:
            x = (x - self.feature_mean) / self.feature_std
        return self.net.get_classifier()(x).squeeze(1)

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        if batch[0].ndim == 2:  # features need no normalising or augmenting
            return batch
        return super().on_after_batch_transfer(batch, dataloader_idx)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not self.standardised:
            return
        prefix, _ = self._classifier()
        state = checkpoint["state_dict"]
        checkpoint[STANDARDISATION] = {"weight": state[f"{prefix}.weight"], "bias": state[f"{prefix}.bias"],
                                       "mean": self.feature_mean, "std": self.feature_std}
        state[f"{prefix}.weight"], state[f"{prefix}.bias"] = (t.detach().clone() for t in self._folded())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(STANDARDISATION)
        if saved is None:
            return
        prefix, _ = self._classifier()
        checkpoint["state_dict"][f"{prefix}.weight"] = saved["weight"]
        checkpoint["state_dict"][f"{prefix}.bias"] = saved["bias"]
        self.standardise(saved["mean"], saved["std"])

    def on_fit_end(self) -> None:
        if self.standardised:
            self.fold_standardisation()

    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:
        """timm's pre-logits features of uint8 images: exactly what `net.get_classifier()` sees."""
        x = self.normalise(images)
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)


class _Extractor(L.LightningModule):
    """A FeatureHead's backbone as `trainer.predict` sees it: (rows, features) per batch."""

    def __init__(self, head: FeatureHead) -> None:
        super().__init__()
        self.head = head

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor]:
        images, _, rows = batch
        return {"rows": rows, "features": self.head.pooled_features(images).float()}


def extract(head: FeatureHead, dataset: CellDataset, batch_size: int, num_workers: int,
            accelerator: str = "auto", precision: str | None = None) -> np.ndarray:
    """Pooled features of every image of `dataset`, in row order, through the prediction core
    (so a GPU and mixed precision are used where the trainer would use them)."""
    trainer = bare_trainer(accelerator=accelerator, precision=precision, enable_progress_bar=True)
    return predict_dataset(_Extractor(head), dataset, batch_size, num_workers, trainer, key="features")


def features_path(head: FeatureHead, images: MalariaDataModule) -> Path:
    """Where the features of `images`' training cache through `head`'s backbone are cached.

    The key covers the image cache (zip, ids, size), the architecture and every backbone weight
    and buffer, so new pretrained weights or another seed never reuse stale features."""
    digest = hashlib.sha256(images.train_cache.name.encode())
    architecture = [head.hparams.model, head.hparams.model_kwargs]
    digest.update(json.dumps(architecture, sort_keys=True, default=str).encode())
    classifier = {id(p) for p in head.net.get_classifier().parameters()}
    for name, tensor in [*head.net.named_parameters(), *head.net.named_buffers()]:
        if id(tensor) not in classifier:
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return images.cache_dir / f"{images.train_cache.stem}-features-{digest.hexdigest()[:16]}.npy"


def cached_features(head: FeatureHead, images: MalariaDataModule, accelerator: str = "auto",
                    precision: str | None = None) -> np.ndarray:
    """Features of all training images (train and validation rows), computed once per backbone."""
    path = features_path(head, images)
    if path.exists():
        features = np.load(path)
        if len(features) == len(images.train_table):
            return features
    dataset = CellDataset(images.train_cache, np.arange(len(images.train_table)), images.train_table.labels)
    features = extract(head, dataset, images.hparams.batch_size, images.num_workers, accelerator, precision)
    replace_file(path, lambda f: np.save(f, features), binary=True)
    return features


class FeatureDataModule(L.LightningDataModule):
    """Batches of cached features, split into train and validation rows as `images` splits them.

    Its hyperparameters are the image datamodule's, so a checkpoint rebuilds the image data for
    `malaria.commands.predict`."""

    def __init__(self, images: MalariaDataModule, features: torch.Tensor) -> None:
        super().__init__()
        self.images = images
        self.save_hyperparameters(dict(images.hparams))
        labels = torch.tensor(images.train_table.labels, dtype=torch.float32)
        self.train_set, self.val_set = (
            TensorDataset(features[rows], labels[rows], torch.from_numpy(rows))
            for rows in (images.train_rows, images.val_rows)
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size)


class FeaturesCLI(MalariaCLI):
    """MalariaCLI whose `fit` trains the classifier on cached features instead of images."""

    ENTRY_POINT = "features"

    def before_fit(self) -> None:
        super().before_fit()
        images = self.datamodule
        images.prepare_data()
        images.setup("fit")
        config = self.config[self.subcommand].trainer
        features = cached_features(self.model, images, config.accelerator, self.trainer.precision)
        features = torch.from_numpy(features)
        train = features[images.train_rows]
        std = train.std(0)
        # A feature that never varies in training stays at 0 after centring; dividing by ~0 would let
        # the folded classifier blow it up on new images.
        self.model.standardise(train.mean(0), torch.where(std > 1e-6, std, torch.ones_like(std)))
        self.datamodule = FeatureDataModule(images, features)


def main(args: list[str] | None = None) -> FeaturesCLI:
    """`python -m malaria.commands.features [fit options]`: the `fit` subcommand is implied."""
    args = sys.argv[1:] if args is None else args
    return build(["fit", *args], cli=FeaturesCLI, model=FeatureHead)


if __name__ == "__main__":
    errors.run(main)
