"""Gathering every rank's predictions into one result, in one process (2 processes:
tests/run/test_ddp.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from malaria.common import errors
from malaria.prediction.ddp_writer import PredictionWriter, gather, merge


def test_merge_puts_the_ranks_shares_in_row_order_and_keeps_a_padded_row_once() -> None:
    # rank 0 predicted rows 0 and 2, rank 1 rows 1 and 3 and, padding its shard, row 0 again
    parts = [(np.array([0, 2]), np.array([0.1, 0.3])), (np.array([1, 3, 0]), np.array([0.2, 0.4, 0.9]))]
    assert merge(parts, np.array([3, 2, 1, 0])).tolist() == [0.4, 0.3, 0.2, 0.1]


@pytest.mark.parametrize(("expected", "match"),
                         [(np.arange(3), "1 unexpected"), (np.arange(5), "1 rows missing")])
def test_merge_refuses_predictions_that_do_not_cover_the_images(expected: np.ndarray, match: str) -> None:
    with pytest.raises(RuntimeError, match=match):
        merge([(np.arange(4), np.zeros(4))], expected)


def test_one_process_gathers_its_own_share() -> None:
    assert gather({"rows": [1]}, world_size=1) == [{"rows": [1]}]


def test_an_existing_submission_is_refused_before_predicting(tmp_path: Path) -> None:
    taken = tmp_path / "taken.csv"
    taken.write_text("mine\n")
    with pytest.raises(errors.ExistsError, match="taken.csv already exists; refusing to overwrite"):
        PredictionWriter(out=str(taken)).setup(None, None, "predict")
    assert taken.read_text() == "mine\n"
