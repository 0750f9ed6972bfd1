"""The binary metrics every stage reports, and the one threshold that turns a probability into a class.

Training logs them per epoch (`MalariaClassifier`), and `make cv`, `make holdout` and the run
report score saved predictions with the same torchmetrics definitions, so their figures compare.
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC, BinaryAveragePrecision, BinaryF1Score

THRESHOLD = 0.5  # P(parasitized) at or above it is parasitized: in training, reports and submissions


def binary_metrics() -> MetricCollection:
    """acc, f1 and auroc of P(parasitized) against 0/1 labels, as training logs them."""
    return MetricCollection({"acc": BinaryAccuracy(THRESHOLD), "f1": BinaryF1Score(THRESHOLD), "auroc": BinaryAUROC()})


def score(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The training metrics of saved predictions, plus average precision."""
    collection = binary_metrics()
    collection.add_metrics({"average_precision": BinaryAveragePrecision()})
    values = collection(torch.as_tensor(probs, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.long))
    return {name: value.item() for name, value in values.items()}


def classes(probs: np.ndarray) -> np.ndarray:
    """0/1 predictions of probabilities."""
    return (np.asarray(probs) >= THRESHOLD).astype(np.int64)
