"""The slide prior: Bayes' rule with a cell's slide, from training labels only."""

import numpy as np
import pytest

from malaria.prediction.slide_prior import SlidePrior, logit

# Slide C40P1 holds 9 parasitized cells of 10, slide C41P2 1 of 10: overall rate 0.5.
NAMES = [f"C40P1thinF_IMG_20150101_000000_cell_{k}.png" for k in range(10)] + \
        [f"C41P2thinF_IMG_20150101_000000_cell_{k}.png" for k in range(10)]
LABELS = np.array([1] * 9 + [0] + [1] + [0] * 9)


def test_a_cell_on_the_fence_follows_its_slide() -> None:
    prior = SlidePrior.fit(NAMES, LABELS, strength=1.0)
    probs = prior.adjust(["C40P1thinF_IMG_x_cell_99.png", "C41P2thinF_IMG_x_cell_99.png"], np.array([0.5, 0.5]))
    # rate of C40P1 shrunk by one pseudo-cell at 0.5: (9 + 0.5) / 11
    assert probs[0] == pytest.approx(9.5 / 11)
    assert probs[1] == pytest.approx(1.5 / 11)


def test_a_confident_image_outweighs_its_slide() -> None:
    prior = SlidePrior.fit(NAMES, LABELS, strength=1.0)
    probs = prior.adjust(["C41P2thinF_IMG_x_cell_99.png"], np.array([0.99]))
    assert probs[0] > 0.9
    assert logit(probs[0]) == pytest.approx(logit(0.99) + logit(1.5 / 11))


def test_unseen_slides_and_names_without_slides_are_left_alone() -> None:
    prior = SlidePrior.fit(NAMES, LABELS, strength=1.0)
    names = ["C99P60thinF_IMG_x_cell_1.png", "plain_name.png"]
    assert prior.adjust(names, np.array([0.3, 0.7])) == pytest.approx([0.3, 0.7])


def test_strength_shrinks_a_small_slide_toward_the_overall_rate() -> None:
    names, labels = NAMES + ["C42P3thinF_IMG_x_cell_0.png"], np.append(LABELS, 1)
    cell = ["C42P3thinF_IMG_x_cell_9.png"]
    weak, strong = (SlidePrior.fit(names, labels, s).adjust(cell, np.array([0.4]))[0] for s in (1.0, 100.0))
    assert 0.4 < strong < weak


def test_strength_must_be_positive() -> None:
    with pytest.raises(ValueError, match="strength must be > 0"):
        SlidePrior.fit(NAMES, LABELS, strength=0)
