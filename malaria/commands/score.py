"""Score submissions against an answer key, and tell a real difference between two from noise.

    python -m malaria.commands.score submissions/a.csv [submissions/b.csv ...] --answers data/test_labels.csv

`make score` runs it. Each file is validated and scored (accuracy, the leaderboard's metric, and
which slides hold the errors); each file after the first is also compared with the first, image
by image, by the exact McNemar test. Given several, it counts the images every one gets wrong: no
vote of these submissions can get them right, so they bound what ensembling them can score, and
`--shared_errors DIR` writes them out with a gallery, to see whether the model or the label is wrong.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from scipy.stats import binomtest

from malaria.common import errors
from malaria.common.atomic import replace_file, save_figure
from malaria.common.errors import listing
from malaria.data import archive, splits
from malaria.data.archive import CLASSES
from malaria.evaluation.slide_errors import describe_errors
from malaria.prediction.submission import HEADER, SHOWN, SubmissionError, newest_submission, validate_submission


def correct(path: Path, answers: Path) -> pd.Series:
    """Per image, whether the submission's label is the answer key's: booleans indexed by img_name.

    Both files are validated; they must hold the same ids, in any order."""
    table = validate_submission(path)
    truth = validate_submission(answers).set_index(HEADER[0])[HEADER[1]]
    missing = truth.index.difference(table[HEADER[0]])
    extra = pd.Index(table[HEADER[0]]).difference(truth.index)
    if len(missing) or len(extra):
        raise SubmissionError(f"{path}: ids differ from {answers}: {len(missing)} missing "
                              f"({listing(missing, SHOWN)}), {len(extra)} unexpected ({listing(extra, SHOWN)}).")
    ids = table[HEADER[0]]
    return pd.Series(table[HEADER[1]].to_numpy() == truth[ids].to_numpy(), index=ids.to_numpy())


def accuracy(path: Path, answers: Path) -> float:
    """Accuracy of a submission against an answer key in the same format (the leaderboard's metric)."""
    return float(correct(path, answers).mean())


@dataclass(frozen=True)
class Comparison:
    """Submission `b` against submission `a` on the same answer key."""

    gain: float  # accuracy of b minus accuracy of a
    b_only: int  # images b gets right and a gets wrong
    a_only: int  # images a gets right and b gets wrong
    p_value: float  # exact McNemar test: could the split of those images be a coin's?


def compare(a: pd.Series, b: pd.Series) -> Comparison:
    """Paired comparison of two submissions' `correct` series.

    Only the images one gets right and the other wrong carry evidence, so the exact McNemar test
    is a two-sided binomial test of those counts against an even split: on a test set of a few
    thousand cells, differences of a few tenths of a point are usually within its noise."""
    b = b[a.index]
    b_only, a_only = int((b & ~a).sum()), int((a & ~b).sum())
    p_value = binomtest(b_only, b_only + a_only).pvalue if b_only + a_only else 1.0
    return Comparison(float(b.mean() - a.mean()), b_only, a_only, float(p_value))


def wrong_in_all(results: Sequence[pd.Series]) -> pd.Index:
    """The images every submission gets wrong, given their `correct` series."""
    right = pd.concat([result.reindex(results[0].index) for result in results], axis=1)
    return right.index[~right.any(axis=1)]


def save_shared_errors(labels: pd.Series, answers: Path, out: Path, shown: int = 48) -> None:
    """`out/shared_errors.csv` (img_name, the key's label, slide) and, when the test zip lies beside
    the answer key, `out/shared_errors.png`: the first `shown` cells, captioned with the key's label."""
    from malaria.evaluation.run_report import zip_gallery  # torch and Lightning: only to draw

    table = pd.DataFrame({"img_name": labels.index, "label": labels.to_numpy(),
                          "slide": [splits.slide_of(name) or "" for name in labels.index]})
    out.mkdir(parents=True, exist_ok=True)
    replace_file(out / "shared_errors.csv", lambda f: table.to_csv(f, index=False))
    print(f"wrote {out / 'shared_errors.csv'}")
    if not (answers.parent / archive.TEST_ZIP).exists():
        print(f"no {archive.TEST_ZIP} beside {answers}: no gallery")
        return
    top = table.head(shown)
    figure = zip_gallery(archive.load_test(answers.parent), top["img_name"].tolist(),
                         [f"key: {CLASSES[label]}" for label in top["label"]],
                         f"Wrong in every submission, with the answer key's label ({len(top)} of {len(table)})")
    save_figure(figure, out / "shared_errors.png")
    print(f"wrote {out / 'shared_errors.png'}")


def main(argv: Sequence[str] | None = None) -> list[float] | None:
    """`python -m malaria.commands.score [FILE ...] [--answers KEY]`: validate submissions, score them given a key.

    Given several files and a key, each after the first is also compared with the first, image by image."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("files", type=Path, nargs="*",
                        help="submission CSVs (default: the newest in submissions/)")
    parser.add_argument("--answers", type=Path, default=None,
                        help="answer key, e.g. ../shared/realdata/dev/test_labels.csv")
    parser.add_argument("--shared_errors", type=Path, default=None, metavar="DIR",
                        help="with several files: write the images every one gets wrong to DIR")
    args = parser.parse_args(argv)
    files = args.files or [newest_submission()]
    if args.shared_errors and (len(files) < 2 or args.answers is None):
        parser.error("argument --shared_errors: it lists what several files get wrong: "
                     "give two or more files and --answers.")
    if args.shared_errors and (args.shared_errors.is_file() or (args.shared_errors / "shared_errors.csv").exists()):
        parser.error(f"argument --shared_errors: {args.shared_errors} is a file or already holds shared_errors.csv; "
                     "name a new folder (nothing there is overwritten).")
    if args.answers is None:
        for file in files:
            print(f"{file}: valid, {len(validate_submission(file))} rows")
        return None
    results = [correct(file, args.answers) for file in files]
    for file, result in zip(files, results):
        print(f"{file}: accuracy {result.mean():.4f} against {args.answers}")
        print(describe_errors(result))
    for file, result in zip(files[1:], results[1:]):
        c = compare(results[0], result)
        verdict = "a real difference" if c.p_value < 0.05 else "within the key's noise"
        print(f"{file} vs {files[0]}: {100 * c.gain:+.2f} points; images right only in {file.name}: {c.b_only}, "
              f"only in {files[0].name}: {c.a_only}; exact McNemar p = {c.p_value:.3f} ({verdict})")
    if len(results) > 1:
        shared = wrong_in_all(results)
        labels = validate_submission(args.answers).set_index(HEADER[0])[HEADER[1]][shared]
        counts = ", ".join(f"{CLASSES[label]} {count}" for label, count in labels.value_counts().sort_index().items())
        print(f"wrong in all {len(results)} files: {len(shared)} images ({100 * len(shared) / len(results[0]):.2f}%; "
              f"by the key's label: {counts or 'none'}); no vote of these files scores above "
              f"{1 - len(shared) / len(results[0]):.4f}")
        if args.shared_errors:
            save_shared_errors(labels, args.answers, args.shared_errors)
    return [float(result.mean()) for result in results]


if __name__ == "__main__":
    errors.run(main)
