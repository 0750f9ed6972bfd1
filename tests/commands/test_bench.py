"""`make bench` smoke run on demo data: its output parses, and each stage reports both pipelines."""

import json
from pathlib import Path

import albumentations as A
import pytest
import torch

from malaria.commands import bench
from malaria.model.networks import default_image_size

TINY = ["--batches", "1", "--data_batches", "1", "--warmup", "1", "--data.image_size", "32", "--data.batch_size", "8",
        "--data.num_workers", "0", "--model.model_kwargs", '{"widths": [8, 16]}', "--model.tta", "false"]


def test_bench_prints_one_json_object_per_line(demo_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = bench.main(["--data.data_dir", str(demo_dir), *TINY])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == records
    setup = lines[0]
    assert setup["kind"] == "setup" and setup["image_size"] == 32 and setup["batch_size"] == 8
    assert not setup["demo"] and setup["data_source"] == str(demo_dir)
    stages = {(r["stage"], r["pipeline"]): r for r in lines if r["kind"] == "stage"}
    assert set(stages) == {(s, p) for s in bench.STAGES for p in bench.PIPELINES}
    for record in stages.values():
        assert record["images"] > 0 and record["seconds"] > 0 and record["images_per_s"] > 0
    assert {r["stage"] for r in lines if r["kind"] == "ratio"} == {"data", "train", "predict"}
    flops = next(r for r in lines if r["kind"] == "compute")
    assert flops["train_gflop_per_image"] > 0 and flops["peak_gflops_fp32"] > 0 and flops["peak_gflops_bf16"] > 0
    train = stages["train", "project"]["images_per_s"]
    assert flops["train_gflops"] == pytest.approx(flops["train_gflop_per_image"] * train, rel=0.01)
    memory = lines[-1]
    assert memory["kind"] == "memory" and memory["peak_rss_mib"] > 0 and len(memory["load_avg_end"]) == 3


def test_naive_pipeline_decodes_the_same_images_as_the_cache(demo_dir: Path) -> None:
    model, datamodule = bench.load_recipe(Path("configs/default.yaml"), ["--data.data_dir", str(demo_dir),
                                                                         "--data.image_size", "32"])
    datamodule.prepare_data()
    datamodule.setup("fit")
    rows = datamodule.val_rows[:4]
    cached = bench.CellDataset(datamodule.train_cache, rows, datamodule.train_table.labels)
    zipped = bench.ZipDataset(datamodule.train_table, 32, rows, None)
    for i in range(len(rows)):
        (image, label, row), (naive_image, naive_label, naive_row) = cached[i], zipped[i]
        assert torch.equal(image, naive_image) and label == naive_label and row == naive_row


def test_the_naive_model_moves_device_augmentation_to_the_cpu() -> None:
    model, datamodule = bench.load_recipe(Path("configs/default.yaml"), ["--model.batch_dihedral", "true"])
    naive, transform = bench.naive_setup(model, datamodule)
    assert model.hparams.batch_dihedral and not naive.hparams.batch_dihedral
    assert model.batch_augment is not None and naive.batch_augment is None
    steps = [type(t) for t in transform.transforms[0].transforms] + [type(t) for t in transform.transforms[1:]]
    assert {A.HorizontalFlip, A.Affine, A.ColorJitter, A.SquareSymmetry} <= set(steps)


def test_randstain_is_benched_with_the_training_slides_colours(demo_dir: Path) -> None:
    records = bench.main(["--data.data_dir", str(demo_dir), *TINY, "--data.augment.randstain_p", "1"])
    assert {r["stage"] for r in records if r["kind"] == "stage"} >= {"data", "train"}


def test_the_stain_levers_which_exist_only_on_the_device_are_left_out_of_the_naive_pipeline() -> None:
    model, datamodule = bench.load_recipe(Path("configs/default.yaml"), ["--data.augment.stain_p", "0.75"])
    naive, transform = bench.naive_setup(model, datamodule)
    assert datamodule.augment.stain_p == 0.75 and naive.batch_augment is None
    assert A.ColorJitter in [type(t) for t in transform.transforms[0].transforms]


def test_bad_arguments_are_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    for flag in ("--batches", "--data_batches", "--warmup"):
        with pytest.raises(SystemExit) as exit_:
            bench.main([flag, "0"])
        assert exit_.value.code == 2
        assert f"argument {flag}: 0 does not conform to restriction v>0" in capsys.readouterr().err


def test_a_recipe_resolves_as_in_training() -> None:
    overrides = ["--data.image_size", "null", "--model.model", "test_resnet", "--model.model_kwargs", "{}"]
    model, datamodule = bench.load_recipe(Path("configs/default.yaml"), overrides)
    assert datamodule.hparams.image_size == default_image_size("test_resnet") == 160  # the backbone's own size


def test_the_precision_flag_sets_the_trainers_and_the_peak_it_is_quoted_against(demo_dir: Path) -> None:
    records = bench.main(["--data.data_dir", str(demo_dir), *TINY, "--precision", "32-true"])
    setup, flops = records[0], next(r for r in records if r["kind"] == "compute")
    assert setup["precision"] == "32-true" and flops["peak_in_use"] == "fp32"
    assert flops["fraction_of_peak"] == pytest.approx(flops["train_gflops"] / flops["peak_gflops_fp32"], rel=0.01)


def test_profile_splits_a_steps_time_into_its_parts(demo_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = bench.main(["--data.data_dir", str(demo_dir), *TINY, "--batches", "3", "--profile"])
    profile = next(r for r in records if r["kind"] == "profile")
    parts = profile["parts"]
    assert list(parts) == list(bench.step_profile.PARTS) and profile["steps"] == 3
    assert sum(p["ms_per_step"] for p in parts.values()) == pytest.approx(profile["ms_per_step"], rel=0.01)
    assert sum(p["share"] for p in parts.values()) == pytest.approx(1, abs=0.01)
    for part in ("convolution", "normalisation", "activation", "pooling", "optimizer", "augmentation", "data"):
        assert parts[part]["ms_per_step"] > 0, part  # each is found where the default recipe spends it
    flops = next(r for r in records if r["kind"] == "compute")
    conv_seconds = parts["convolution"]["ms_per_step"] / 1000
    assert flops["convolution_gflops"] == pytest.approx(flops["train_gflop_per_image"] * 8 / conv_seconds, rel=0.01)
    assert "Where a training step's time goes" in capsys.readouterr().err
