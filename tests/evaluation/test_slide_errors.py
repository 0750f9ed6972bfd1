"""Errors per slide, from the slide in each NIH file name."""

from __future__ import annotations

import pandas as pd

from malaria.evaluation.slide_errors import by_slide, describe_errors

# C33P1: 4 cells, 3 wrong; C1: 3 cells, 1 wrong; C50P11: 2 cells, none wrong; a name without a slide: wrong
RIGHT = pd.Series(
    [False, False, False, True, False, True, True, True, True, False],
    index=[*(f"C33P1thinF_IMG_1_cell_{i}.png" for i in range(4)),
           *(f"C1_thinF_IMG_2_cell_{i}.png" for i in range(3)),
           *(f"C50P11thinF_IMG_3_cell_{i}.png" for i in range(2)), "odd.png"],
)


def test_slides_are_ranked_by_their_errors() -> None:
    table = by_slide(RIGHT)
    assert table.index.tolist() == ["C33P1", "image:odd.png", "C1", "C50P11"]  # ties: lower accuracy first
    assert table.loc["C33P1"].tolist() == [4, 3, 0.25]
    assert table["cells"].sum() == len(RIGHT) and table["errors"].sum() == (~RIGHT).sum()


def test_the_description_counts_the_slides_that_hold_half_the_errors() -> None:
    lines = describe_errors(RIGHT).splitlines()
    assert lines[0] == "5 errors on 3 of 4 slides; 1 slides hold half of them"
    assert [line.split()[0] for line in lines[2:]] == ["C33P1", "image:odd.png", "C1"]  # no line for C50P11
    assert describe_errors(pd.Series([True, True], index=["a.png", "b.png"])) == "no errors"
