"""Label audit: the training cells whose labels the out-of-fold predictions most distrust.

    python -m malaria.commands.audit --run runs/<cv name>     # after `make cv`: reads runs/<cv name>-oof.csv

Confident learning (`cleanlab.filter.find_label_issues`) on slide-grouped out-of-fold
probabilities: a cell is suspect when a model that never saw it, nor any cell of its slide, is
more confident in the other class than the class's own typical confidence. The suspects go to
`runs/<cv name>-audit/label_issues.csv`, most suspect first (lowest out-of-fold probability of
the given label), and `audit.md` beside it counts them per class and slide and shows the top ones.
`--data.exclude <that csv>` then trains without them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from cleanlab.filter import find_label_issues
from matplotlib.figure import Figure

from malaria.data import archive
from malaria.data.archive import CLASSES
from malaria.common import errors
from malaria.data import splits
from malaria.common.atomic import replace_file, save_figure, write_text
from malaria.common.flags import PositiveInt, argument
from malaria.evaluation.run_report import zip_gallery

COLUMNS = ["img_name", "label", "prob_given", "rank", "slide"]


def label_issues(oof: pd.DataFrame) -> pd.DataFrame:
    """The suspect rows of an out-of-fold table (img_name, label, prob), most suspect first."""
    labels = oof["label"].to_numpy(dtype=np.int64)
    probs = oof["prob"].to_numpy(dtype=np.float64)
    ranked = find_label_issues(labels, np.stack([1 - probs, probs], axis=1),
                               return_indices_ranked_by="self_confidence")
    suspects = oof.iloc[ranked]
    prob_given = np.where(suspects["label"] == 1, suspects["prob"], 1 - suspects["prob"])
    return pd.DataFrame({
        "img_name": suspects["img_name"].to_numpy(), "label": suspects["label"].to_numpy(),
        "prob_given": prob_given.round(4), "rank": np.arange(1, len(suspects) + 1),
        "slide": [splits.slide_of(n) or "" for n in suspects["img_name"]],
    }, columns=COLUMNS)


def gallery(issues: pd.DataFrame, data_dir: Path, shown: int, columns: int = 8) -> Figure:
    """The most suspect cells, each titled with its given label and that label's probability."""
    top = issues.head(shown)
    captions = [f"#{row.rank} {CLASSES[row.label][:5]} {row.prob_given:.2f}" for row in top.itertuples()]
    return zip_gallery(archive.load_train(data_dir), top["img_name"].tolist(), captions,
                       "Most suspect labels: rank, given label, its out-of-fold probability", columns=columns)


def markdown(name: str, oof: pd.DataFrame, issues: pd.DataFrame, data_dir: Path, shown: int) -> str:
    per_class = [f"| {CLASSES[c]} | {int((oof['label'] == c).sum())} | {int((issues['label'] == c).sum())} | "
                 f"{100 * (issues['label'] == c).sum() / max(1, (oof['label'] == c).sum()):.1f}% |" for c in (0, 1)]
    slides = issues.groupby("slide").size().sort_values(ascending=False).head(15)
    cells = pd.Series([splits.slide_of(n) or "" for n in oof["img_name"]]).value_counts()
    return "\n".join([
        f"# Label audit: `{name}`", "",
        f"Confident learning (cleanlab) on the out-of-fold probabilities of {len(oof)} training cells: "
        f"{len(issues)} suspects ({100 * len(issues) / len(oof):.1f}%), in `label_issues.csv`, most suspect first.", "",
        "| given label | cells | suspects | share |", "|---|---|---|---|", *per_class, "",
        "## Slides with the most suspects", "",
        "| slide | cells | suspects |", "|---|---|---|",
        *[f"| {s or '(no slide)'} | {int(cells.get(s, 0))} | {n} |" for s, n in slides.items()], "",
        f"## The {min(shown, len(issues))} most suspect cells", "",
        "Each titled with its rank, its given label and the out-of-fold probability of that label.", "",
        "![most suspect cells](gallery.png)", "",
        "## Train without them", "",
        "Scored on the original labels of the holdout, which keeps every cell:", "",
        f"    make train DATA_DIR={data_dir} ARGS=\"--data.exclude runs/{name}-audit/label_issues.csv\"", "",
    ])


def audit(cv_run: Path, data_dir: Path | None = None, shown: int = 48) -> Path:
    """Audit a `make cv` run; returns the new audit directory."""
    oof_path = cv_run.with_name(f"{cv_run.name}-oof.csv")
    if not oof_path.is_file():
        raise errors.MissingError(f"{oof_path} not found: `make cv` writes it; RUN names the CV without -oof.csv.")
    out = cv_run.with_name(f"{cv_run.name}-audit")
    if out.exists():
        raise errors.ExistsError(f"{out} exists; an audit is never overwritten: move it away first.")
    if data_dir is None:
        data = yaml.safe_load((cv_run.with_name(f"{cv_run.name}-fold0") / "config.yaml").read_text())["data"]
        data_dir = archive.source_dir(Path(data["data_dir"]), data.get("demo", True))  # as the CV read it
    oof = pd.read_csv(oof_path)
    issues = label_issues(oof)
    staging = out.with_name(f".{out.name}.partial")
    staging.mkdir(parents=True, exist_ok=True)
    replace_file(staging / "label_issues.csv", lambda f: issues.to_csv(f, index=False))
    save_figure(gallery(issues, data_dir, shown), staging / "gallery.png")
    write_text(staging / "audit.md", markdown(cv_run.name, oof, issues, data_dir, shown))
    staging.rename(out)
    return out


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="the CV, runs/<cv name> (as `make cv` printed)")
    parser.add_argument("--data.data_dir", dest="data_dir", type=Path, default=None, help="competition folder (default: the CV's own)")
    parser.add_argument("--shown", type=argument(PositiveInt), default=48, help="cells in the gallery")
    args = parser.parse_args(argv)
    out = audit(args.run, args.data_dir, args.shown)
    issues = pd.read_csv(out / "label_issues.csv")
    print(f"{len(issues)} suspect labels ({int((issues['label'] == 1).sum())} parasitized, "
          f"{int((issues['label'] == 0).sum())} uninfected): {out}/label_issues.csv, {out}/audit.md")
    return out


if __name__ == "__main__":
    errors.run(main)
