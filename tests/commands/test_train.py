"""End to end on generated demo data: train, then predict a valid submission."""

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import RichProgressBar

from malaria.data import archive
from malaria.common import errors
from malaria.commands import features
from malaria.commands import predict
from malaria.commands import train
from malaria.run.checkpointing import AtomicCheckpointIO
from malaria.prediction.submission import validate_submission

from conftest import REPO, TINY


def fit(data_dir: Path, runs_dir: Path, *extra: str) -> train.MalariaCLI:
    return train.main(["fit", *TINY, "--data.data_dir", str(data_dir), "--runs_dir", str(runs_dir), *extra])


@pytest.fixture(scope="module")
def trained(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs_dir = tmp_path_factory.mktemp("runs")
    fit(demo_dir, runs_dir, "--run", "tiny", "--trainer.max_epochs", "2")
    return runs_dir / "tiny"


def test_run_directory_holds_everything(trained: Path) -> None:
    for name in ("config.yaml", "metrics.csv", "summary.json", "environment.json",
                 "checkpoints/best.ckpt", "checkpoints/last.ckpt", "report.md"):
        assert (trained / name).exists(), name  # default.yaml names none of the infrastructure
    summary = json.loads((trained / "summary.json").read_text())
    metrics = pd.read_csv(trained / "metrics.csv")
    assert summary["best_val_acc"] == pytest.approx(metrics["val/acc"].max()) and summary["epochs"] == 2
    assert {"train/loss_epoch", "val/acc", "val/f1", "val/auroc", "val/acc_best"} <= set(metrics.columns)
    assert json.loads((trained / "environment.json").read_text())["packages"]["torch"] == torch.__version__.split("+")[0]


def test_training_on_demo_data_clearly_beats_chance(demo_dir: Path, tmp_path: Path) -> None:
    """The demo's parasites are learnable, so a broken pipeline (labels shuffled against images, a
    wrong normalisation, weights that never update) shows as a holdout near the 50% of chance."""
    fit(demo_dir, tmp_path, "--run", "learns", "--trainer.max_epochs", "8", "--model.lr", "0.01",
        "--model.model_kwargs", '{"widths": [16, 32, 64]}', "--infrastructure.report", "false")
    summary = json.loads((tmp_path / "learns" / "summary.json").read_text())
    assert summary["best_val_acc"] >= 0.8  # 39 of 48 balanced holdout cells: odds of 1 in 100,000 by chance


def test_predict_writes_a_valid_submission_and_never_overwrites(trained: Path, demo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sub.csv"
    predict.main(["--run", str(trained), "--data.data_dir", str(demo_dir), "--out", str(out)])
    sample = pd.read_csv(demo_dir / "sample_submission.csv")
    table = validate_submission(out, sample["img_name"].tolist())
    assert len(table) == len(sample)
    metadata = json.loads(out.with_name(out.name + ".json").read_text())
    assert metadata["runs"] == ["tiny"] and metadata["slide_prior"] == 1.0
    before = out.read_bytes()
    with pytest.raises(SystemExit) as refused:  # the parser refuses it before predicting
        predict.main(["--run", str(trained), "--data.data_dir", str(demo_dir), "--out", str(out)])
    assert refused.value.code == 2
    assert out.read_bytes() == before


def test_predict_takes_the_final_weights_when_asked(trained: Path, demo_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "tiny"
    shutil.copytree(trained, run)
    last = run / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    state["state_dict"]["net.head.bias"].fill_(50.0)  # these weights call every cell parasitized
    torch.save(state, last)
    predicted = {}
    for which in ("best", "last"):
        out = tmp_path / f"{which}.csv"
        predict.main(["--run", str(run), "--data.data_dir", str(demo_dir), "--out", str(out), "--checkpoint", which])
        predicted[which] = pd.read_csv(out)["label"]
        history = json.loads(out.with_name(out.name + ".json").read_text())
        assert history["checkpoints"] == [str(run / "checkpoints" / f"{which}.ckpt")]
    assert predicted["last"].eq(1).all() and not predicted["best"].eq(1).all()


def test_an_existing_run_is_never_overwritten(trained: Path) -> None:
    best = (trained / "checkpoints" / "best.ckpt").read_bytes()
    with pytest.raises(errors.ExistsError, match="RESUME"):
        fit(Path("unused"), trained.parent, "--run", "tiny")
    assert (trained / "checkpoints" / "best.ckpt").read_bytes() == best


def test_resume_continues_from_last_checkpoint(trained: Path, tmp_path: Path) -> None:
    run = tmp_path / "tiny"
    shutil.copytree(trained, run)
    train.main(["fit", "--config", str(run / "config.yaml"), "--runs_dir", str(tmp_path),
                "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--trainer.max_epochs", "3"])
    metrics = pd.read_csv(run / "metrics.csv")
    assert sorted(metrics["epoch"].dropna().unique().astype(int).tolist()) == [0, 1, 2]
    assert json.loads((run / "summary.json").read_text())["epochs"] == 3


def test_full_fit_trains_on_every_image_and_keeps_the_final_weights(demo_dir: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    cli = fit(demo_dir, tmp_path, "--run", "full", "--trainer.max_epochs", "2", "--data.val_fraction", "0")
    run = tmp_path / "full"
    assert len(cli.datamodule.train_rows) == len(cli.datamodule.train_table) and len(cli.datamodule.val_rows) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_val_acc"] is None and summary["epochs"] == 2
    assert not any(c.startswith("val/") for c in pd.read_csv(run / "metrics.csv").columns)
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=False)
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert best["epoch"] == 1 and all(torch.equal(best["state_dict"][k], v) for k, v in last["state_dict"].items())
    assert not (run / "report.md").exists() and "full fit" in capsys.readouterr().out
    out = tmp_path / "sub.csv"
    predict.main(["--run", str(run), "--data.data_dir", str(demo_dir), "--out", str(out)])
    assert len(validate_submission(out, pd.read_csv(demo_dir / "sample_submission.csv")["img_name"].tolist())) > 0


def test_missing_data_without_demo_is_a_clear_error(tmp_path: Path) -> None:
    from malaria.data.archive import DataError

    with pytest.raises(DataError, match="no train_data.zip"):
        fit(tmp_path / "empty", tmp_path / "runs", "--data.demo", "false")


def test_progress_bar_is_rich_unless_switched_off(demo_dir: Path, tmp_path: Path) -> None:
    def progress(*extra: str):
        cli = train.main([*TINY, "--data.data_dir", str(demo_dir), "--runs_dir", str(tmp_path), *extra],
                         run=False)
        return cli.trainer.progress_bar_callback

    assert isinstance(progress(), RichProgressBar)
    assert progress("--trainer.enable_progress_bar", "false") is None


@pytest.mark.parametrize("on_device", ["true", "false"])
def test_one_augment_config_splits_between_workers_and_device(on_device: str, demo_dir: Path,
                                                                tmp_path: Path) -> None:
    cli = train.main([*TINY, "--data.data_dir", str(demo_dir), "--runs_dir", str(tmp_path),
                      "--data.augment.on_device", on_device, "--data.augment.zoom", "0.3"], run=False)
    assert cli.model.batch_augment is None or cli.model.batch_augment.aug == cli.datamodule.augment
    assert cli.datamodule.augment.zoom == 0.3
    assert (cli.model.batch_augment is not None) == (on_device == "true")
    cli.datamodule.setup("fit")
    worker_transform = cli.datamodule.train_dataloader().dataset.transform
    assert (worker_transform is None) == (on_device == "true")


RECIPES = sorted(p for p in (Path(__file__).parents[2] / "configs").glob("*.yaml") if p.name != "kaggle.yaml")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_runs_a_fast_dev_run_step(recipe: Path, demo_dir: Path, tmp_path: Path) -> None:
    args = ["--config", str(recipe), "--model.pretrained", "false", "--trainer.fast_dev_run", "1",
            "--data.data_dir", str(demo_dir), "--data.image_size", "32", "--data.batch_size", "8",
            "--data.num_workers", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--runs_dir", str(tmp_path), "--wandb.mode", "disabled",
            "--data.cache_dir", str(tmp_path / "cache")]  # features of other backbones stay out of the demo's cache
    features_only = yaml.safe_load(recipe.read_text()).get("entry_point") == "features"
    cli = features.main(args) if features_only else train.main(["fit", *args])
    assert cli.trainer.global_step == 1
    assert cli.trainer.checkpoint_callback.monitor == "val/acc"
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_runs_print_no_cloud_logger_tip_nor_a_sample_submission_warning(demo_dir: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
        archive.load_test(demo_dir)
    assert "litlogger" not in caplog.text and "ignoring columns" not in caplog.text


def test_cv_and_bf16_runs_print_no_lightning_warnings_for_others(demo_dir: Path, tmp_path: Path) -> None:
    """cv and sweep pass the CLI its arguments beside their own sys.argv, and the CPU default's bf16
    summary cannot be sized: neither is the user's mistake, so neither is printed."""
    script = ("import sys; sys.argv = ['cv', '--k', '2']\n"
              "from lightning.pytorch.utilities.model_summary import summarize\n"
              "from malaria.run.cli import build\n"
              f"cli = build(['--config', '{REPO / 'configs' / 'default.yaml'}', '--data.data_dir', '{demo_dir}',"
              f" '--run', 'x', '--runs_dir', '{tmp_path}', '--wandb.mode', 'disabled',"
              " '--trainer.precision', 'bf16-mixed'], run=False)\n"
              "cli.model.trainer = cli.trainer\n"
              "print(summarize(cli.model))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "Trainable params" in done.stdout and "bfloat16" in done.stderr  # it summarised, in bf16
    assert "args parameter" not in done.stderr and "not supported by the model summary" not in done.stderr


def test_predicting_verbs_are_quiet_without_the_cli() -> None:
    """`make predict`, holdout, cv never import the CLI: the prediction core silences Lightning too."""
    script = ("import lightning as L, malaria.prediction.predictor\n"
              "L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "GPU available" in done.stderr + done.stdout  # Lightning did speak, and only its noise went
    assert "litlogger" not in done.stderr + done.stdout
