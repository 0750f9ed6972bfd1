"""Where the errors are: accuracy per slide, from the slide in each NIH file name."""

from __future__ import annotations

import pandas as pd

from malaria.data import splits


def by_slide(right: pd.Series) -> pd.DataFrame:
    """Cells, errors and accuracy per slide (from the NIH file names), most errors first.

    A few slides hold most errors: slides of faint or unusual stain, and slides whose labels are
    noisy. Names with no slide count as slides of one cell."""
    table = pd.DataFrame({"slide": splits.groups(right.index.tolist()), "right": right.to_numpy()})
    slides = table.groupby("slide")["right"].agg(cells="size", right="sum")
    slides["errors"] = slides["cells"] - slides["right"]
    slides["acc"] = slides["right"] / slides["cells"]
    return slides.sort_values(["errors", "acc"], ascending=[False, True])[["cells", "errors", "acc"]]


def describe_errors(right: pd.Series, shown: int = 10) -> str:
    """How the errors spread over slides, and the slides that hold the most."""
    slides = by_slide(right)
    errors = int(slides["errors"].sum())
    if not errors:
        return "no errors"
    # the fewest slides that hold half the errors
    half = int((slides["errors"].cumsum() < errors / 2).sum()) + 1
    lines = [f"{errors} errors on {int((slides['errors'] > 0).sum())} of {len(slides)} slides; "
             f"{half} slides hold half of them", f"{'slide':<14}{'cells':>7}{'errors':>8}{'acc':>8}"]
    lines += [f"{row.Index:<14}{row.cells:>7}{row.errors:>8}{row.acc:>8.3f}"
              for row in slides.head(shown).itertuples() if row.errors]
    return "\n".join(lines)
