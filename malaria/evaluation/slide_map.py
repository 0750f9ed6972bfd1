"""The slides in stain space: one point per slide, where a person sees which slides are unlike the rest.

Each slide sits at its cells' median amount of the two Giemsa stains (malaria.data.colour),
sized by its cells, drawn as a circle when cells of it trained the model and as a square when
none did (a new patient), and coloured by accuracy where labels are known (out of fold in
`make cv`, against an answer key in `make score`). A new slide whose colour lies outside the
training slides' range is named: the network has seen no cell stained like it.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy.stats import chi2
from sklearn.covariance import MinCovDet

from malaria.data.colour import STAIN_COLUMNS

# A slide further from the training slides than 99% of a normal fitted to them lies outside their range.
OUTSIDE = float(np.sqrt(chi2.ppf(0.99, df=len(STAIN_COLUMNS))))


def distances(slides: pd.DataFrame, training: Collection[str]) -> pd.Series:
    """Each slide's Mahalanobis distance in stain space from the training slides, under a robust
    fit (scikit-learn's minimum covariance determinant, so odd training slides do not widen it)."""
    points = slides[list(STAIN_COLUMNS)].to_numpy(np.float64)
    fitted = MinCovDet(random_state=0).fit(points[slides.index.isin(list(training))])
    return pd.Series(np.sqrt(fitted.mahalanobis(points)), index=slides.index)


def outside(slides: pd.DataFrame, training: Collection[str]) -> pd.DataFrame:
    """The slides with no training cell whose colour lies outside the training slides' range,
    furthest first, with their cells, stains and distance."""
    new = slides.loc[~slides.index.isin(list(training))]
    if new.empty or len(training) <= len(STAIN_COLUMNS) + 1:
        return new.iloc[:0].assign(distance=[])
    far = distances(slides, training).loc[new.index]
    table = new[["cells", *STAIN_COLUMNS]].assign(distance=far)
    return table[table["distance"] > OUTSIDE].sort_values("distance", ascending=False)


def describe_outside(table: pd.DataFrame) -> list[str]:
    """One line per out-of-range slide, as `make predict` prints them."""
    return [f"new slide {slide}: {int(row.cells)} cells stained unlike any training slide (methyl blue "
            f"{row.methyl_blue:.3f}, eosin {row.eosin:.3f}; {row.distance:.1f} robust sd from them, the range "
            f"ends at {OUTSIDE:.1f}): its cells are the least certain." for slide, row in table.iterrows()]


def draw(slides: pd.DataFrame, training: Collection[str], accuracy: pd.Series | None = None,
         title: str = "Slides in stain space", named: int = 8) -> Figure:
    """The picture: training slides as circles, new slides as squares, sized by cells, coloured by
    `accuracy` (slide -> fraction right) where given; the least accurate and the out-of-range
    slides named."""
    figure = Figure(figsize=(8, 6.5))
    ax = figure.subplots()
    seen = slides.index.isin(list(training))
    size = 12 + 4 * np.sqrt(slides["cells"].to_numpy(np.float64))
    scored = accuracy.reindex(slides.index) if accuracy is not None else pd.Series(np.nan, index=slides.index)
    mappable = None
    for mask, marker, label in ((seen, "o", "slides with training cells"), (~seen, "s", "new slides (no training cell)")):
        if not mask.any():
            continue
        part, acc = slides[mask], scored[mask]
        has = acc.notna().to_numpy()
        if (~has).any():
            ax.scatter(part.loc[~has, "methyl_blue"], part.loc[~has, "eosin"], s=size[mask][~has], marker=marker,
                       facecolors="none", edgecolors="grey", label=f"{label}, unscored" if has.any() else label)
        if has.any():
            mappable = ax.scatter(part.loc[has, "methyl_blue"], part.loc[has, "eosin"], s=size[mask][has],
                                  marker=marker, c=acc[has], cmap="RdYlGn", vmin=0.8, vmax=1.0,
                                  edgecolors="black", linewidths=0.4, label=label)
    names = list(scored.dropna().sort_values().index[:named])
    if 0 < seen.sum() and (~seen).any():
        names += [s for s in outside(slides, training).index if s not in names]
    for slide in names:
        ax.annotate(slide, (slides.loc[slide, "methyl_blue"], slides.loc[slide, "eosin"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    if mappable is not None:
        figure.colorbar(mappable, ax=ax, label="accuracy (cells right)")
    ax.set_xlabel("methyl blue (median over the slide's cells, optical density)")
    ax.set_ylabel("eosin (median over the slide's cells, optical density)")
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    figure.tight_layout()
    return figure
