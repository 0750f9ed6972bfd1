"""The one threshold, and the metrics every stage scores saved predictions with."""

from __future__ import annotations

import numpy as np
import pytest

from malaria.model.metrics import THRESHOLD, binary_metrics, classes, score


def test_a_probability_at_the_threshold_is_parasitized() -> None:
    assert classes([0.0, np.nextafter(THRESHOLD, 0), THRESHOLD, 1.0]).tolist() == [0, 0, 1, 1]


def test_saved_predictions_score_as_training_logs_them() -> None:
    probs = np.array([0.9, 0.8, 0.4, 0.2, 0.6, 0.1])
    labels = np.array([1, 1, 1, 0, 0, 0])  # one parasitized cell missed, one uninfected cell flagged
    scores = score(probs, labels)
    assert scores["acc"] == pytest.approx(4 / 6)
    assert scores["f1"] == pytest.approx(2 / 3)
    assert scores["auroc"] == pytest.approx(8 / 9)  # of the 9 (parasitized, uninfected) pairs, 8 ranked right
    assert 0 < scores["average_precision"] <= 1
    assert set(binary_metrics().keys()) == {"acc", "f1", "auroc"}  # what training logs, without AP
