"""Scoring submissions against an answer key, and the McNemar comparison of two."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from malaria.commands import score
from malaria.evaluation.slide_errors import by_slide
from malaria.prediction.submission import SubmissionError, write_submission


def test_score_is_the_accuracy_against_an_answer_key_in_any_order(tmp_path: Path) -> None:
    ids = [f"c{i}.png" for i in range(4)]
    key = write_submission(ids[::-1], [1, 1, 0, 0], tmp_path / "key.csv")  # c3=1 c2=1 c1=0 c0=0
    guess = write_submission(ids, [0, 1, 1, 1], tmp_path / "guess.csv")
    assert score.accuracy(guess, key) == 0.75  # c1 is wrong
    assert score.main([str(guess), "--answers", str(key)]) == [0.75]


def test_compare_counts_the_images_only_one_submission_gets_right(tmp_path: Path) -> None:
    ids = [f"c{i}.png" for i in range(40)]
    truth = [i % 2 for i in range(40)]
    key = write_submission(ids, truth, tmp_path / "key.csv")
    a = write_submission(ids, [1 - t if i < 2 else t for i, t in enumerate(truth)], tmp_path / "a.csv")
    b = write_submission(ids[::-1], [1 - t if i >= 28 else t for i, t in enumerate(truth)][::-1], tmp_path / "b.csv")
    result = score.compare(score.correct(a, key), score.correct(b, key))
    assert (result.b_only, result.a_only) == (2, 12)  # b wrong on c28..c39, a on c0, c1
    assert result.gain == pytest.approx(-0.25)
    assert result.p_value == pytest.approx(0.012939, abs=1e-6)  # P(X <= 2 or X >= 12), X ~ Bin(14, 1/2)
    same = score.compare(score.correct(a, key), score.correct(a, key))
    assert (same.b_only, same.a_only, same.gain, same.p_value) == (0, 0, 0.0, 1.0)


def test_score_several_files_compares_each_with_the_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids = [f"c{i}.png" for i in range(4)]
    key = write_submission(ids, [1, 1, 0, 0], tmp_path / "key.csv")
    a = write_submission(ids, [1, 1, 0, 1], tmp_path / "a.csv")
    b = write_submission(ids, [1, 0, 0, 0], tmp_path / "b.csv")
    assert score.main([str(a), str(b), "--answers", str(key)]) == [0.75, 0.75]
    out = capsys.readouterr().out
    assert "b.csv vs" in out and "+0.00 points; images right only in b.csv: 1, only in a.csv: 1" in out
    assert "p = 1.000 (within the key's noise)" in out


def test_score_refuses_a_submission_for_other_images(tmp_path: Path) -> None:
    key = write_submission(["a.png", "b.png"], [1, 0], tmp_path / "key.csv")
    other = write_submission(["a.png", "z.png"], [1, 0], tmp_path / "other.csv")
    with pytest.raises(SubmissionError, match=r"1 missing \('b.png'\), 1 unexpected \('z.png'\)"):
        score.accuracy(other, key)


def test_score_shows_which_slides_hold_the_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids = [f"C{s}P{s}thinF_IMG_20150101_000000_cell_{k}.png" for s in (40, 41, 42) for k in range(4)] + ["plain.png"]
    truth = [1] * 12 + [0]
    guess = [1] * 12 + [1]
    guess[:3] = [0, 0, 0]  # three errors on C40P40, one on C41P41, one on the slideless name
    guess[4] = 0
    key, sub = write_submission(ids, truth, tmp_path / "key.csv"), write_submission(ids, guess, tmp_path / "s.csv")
    slides = by_slide(score.correct(sub, key))
    assert slides.index[0] == "C40P40" and set(slides.index[1:3]) == {"C41P41", "image:plain.png"}
    assert slides.loc["C40P40"].tolist() == [4, 3, 0.25] and slides.loc["C42P42", "errors"] == 0
    assert score.main([str(sub), "--answers", str(key)]) == [pytest.approx(8 / 13)]
    out = capsys.readouterr().out
    assert "5 errors on 3 of 4 slides; 1 slides hold half of them" in out
    assert "C40P40              4       3   0.250" in out and "C42P42" not in out


def test_several_files_name_the_images_every_one_gets_wrong_and_draw_them(
        demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = demo_dir / "test_labels.csv"
    truth = pd.read_csv(key)
    ids, labels = truth["img_name"].tolist(), truth["label"].to_numpy()
    shared = [0, 3, 7]  # wrong in every file; each file is wrong on one more image of its own
    files = []
    for k in range(3):
        guess = labels.copy()
        guess[shared + [10 + k]] = 1 - guess[shared + [10 + k]]
        files.append(write_submission(ids, guess.tolist(), tmp_path / f"s{k}.csv"))
    out_dir = tmp_path / "shared"
    score.main([*map(str, files), "--answers", str(key), "--shared_errors", str(out_dir)])
    n = len(ids)
    by_label = {c: int((labels[shared] == label).sum()) for label, c in enumerate(("uninfected", "parasitized"))}
    counts = ", ".join(f"{c} {k}" for c, k in by_label.items() if k)
    assert (f"wrong in all 3 files: 3 images ({100 * 3 / n:.2f}%; by the key's label: {counts}); "
            f"no vote of these files scores above {1 - 3 / n:.4f}") in capsys.readouterr().out
    written = pd.read_csv(out_dir / "shared_errors.csv")
    assert written["img_name"].tolist() == [ids[i] for i in shared]
    assert written["label"].tolist() == labels[shared].tolist()
    with Image.open(out_dir / "shared_errors.png") as gallery:
        assert gallery.size[0] > 300  # a drawn grid, decoded from the test zip beside the key


def test_files_with_no_error_in_common_say_none_and_need_no_test_zip(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids = [f"c{i}.png" for i in range(4)]
    key = write_submission(ids, [1, 1, 0, 0], tmp_path / "key.csv")
    a = write_submission(ids, [0, 1, 0, 0], tmp_path / "a.csv")
    b = write_submission(ids, [1, 0, 0, 0], tmp_path / "b.csv")
    score.main([str(a), str(b), "--answers", str(key), "--shared_errors", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "wrong in all 2 files: 0 images (0.00%; by the key's label: none); no vote of these files scores above 1.0000" in out
    assert f"no test_data.zip beside {key}: no gallery" in out
    assert pd.read_csv(tmp_path / "out" / "shared_errors.csv").empty


@pytest.mark.parametrize("target", ["file", "earlier"])
def test_shared_errors_never_overwrite_a_file_or_an_earlier_list(
        tmp_path: Path, target: str, capsys: pytest.CaptureFixture[str]) -> None:
    ids = [f"c{i}.png" for i in range(4)]
    key = write_submission(ids, [1, 1, 0, 0], tmp_path / "key.csv")
    a = write_submission(ids, [0, 1, 0, 0], tmp_path / "a.csv")
    out = a if target == "file" else tmp_path / "out"
    if target == "earlier":
        out.mkdir()
        (out / "shared_errors.csv").write_text("img_name,label,slide\n")
    before = {path: path.read_bytes() for path in tmp_path.rglob("*.csv")}
    with pytest.raises(SystemExit) as stop:
        score.main([str(a), str(a), "--answers", str(key), "--shared_errors", str(out)])
    assert stop.value.code == 2
    assert f"argument --shared_errors: {out} is a file or already holds shared_errors.csv" in capsys.readouterr().err
    assert {path: path.read_bytes() for path in tmp_path.rglob("*.csv")} == before


def test_shared_errors_of_a_single_file_is_refused_before_scoring(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids = [f"c{i}.png" for i in range(4)]
    key = write_submission(ids, [1, 1, 0, 0], tmp_path / "key.csv")
    a = write_submission(ids, [0, 1, 0, 0], tmp_path / "a.csv")
    with pytest.raises(SystemExit) as stop:
        score.main([str(a), "--answers", str(key), "--shared_errors", str(tmp_path / "out")])
    assert stop.value.code == 2
    assert "argument --shared_errors: it lists what several files get wrong" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
