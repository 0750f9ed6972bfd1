"""Slide priors: what the training labels say about a slide, applied to its other cells.

The competition's test cells are a random 20% of the same slides as the training cells, and
slides differ a great deal: some hold almost only parasitized cells, others almost none. Bayes'
rule with the slide as a second piece of evidence, assuming the image and the slide are
independent given the label, moves a cell's log-odds by how far its slide's rate of
parasitized cells is from the overall rate:

    logit p(y | image, slide) = logit p(y | image) + logit rate(slide) - logit rate(all)

A slide's rate is shrunk toward the overall rate by `strength` pseudo-cells, so a slide seen
through three cells moves a prediction little. A slide the training labels never saw (a new
patient, or a file name with no slide) is left as it is: the prior helps the leaderboard's
random split and does nothing, good or bad, for unseen patients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import special

from malaria.data import splits

DEFAULT_STRENGTH = 1.0  # chosen on the `full` holdout (docs/results.md)
EPS = 1e-6


def logit(p: np.ndarray | float) -> np.ndarray:
    """Log-odds, with probabilities clipped away from 0 and 1 (a slide of only one class)."""
    return special.logit(np.clip(p, EPS, 1 - EPS))


@dataclass(frozen=True)
class SlidePrior:
    """Per-slide shift of the log-odds of parasitized, fitted on labelled training cells."""

    shifts: dict[str, float]

    @classmethod
    def fit(cls, names: Sequence[str], labels: np.ndarray, strength: float = DEFAULT_STRENGTH) -> SlidePrior:
        if strength <= 0:
            raise ValueError(f"slide prior strength must be > 0 pseudo-cells, got {strength}")
        cells = pd.DataFrame({"slide": [splits.slide_of(n) for n in names], "label": np.asarray(labels, float)})
        overall = cells["label"].mean()
        per_slide = cells.dropna(subset=["slide"]).groupby("slide")["label"].agg(["sum", "size"])
        rates = (per_slide["sum"] + strength * overall) / (per_slide["size"] + strength)
        return cls({slide: float(shift) for slide, shift in (logit(rates) - logit(overall)).items()})

    def adjust(self, names: Sequence[str], probs: np.ndarray) -> np.ndarray:
        """Probabilities of parasitized with each cell's slide taken into account."""
        shift = np.array([self.shifts.get(splits.slide_of(n), 0.0) for n in names])
        return special.expit(logit(np.asarray(probs, dtype=np.float64)) + shift)
