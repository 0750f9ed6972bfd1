"""What a run learned, in pictures: `runs/<name>/report.md` with curves, errors and Grad-CAM maps.

Built once at the end of training by the `RunReport` callback (which every run gets, see
`malaria.run.cli.Infrastructure`), so no epoch gets slower, or on demand by `malaria.commands.report`.
Everything is computed from the run's best checkpoint on its validation split: cells the model
never trained on, split as the run's own `data.split` split it (`random`: cells, as the
leaderboard draws its test cells; `slide`: whole slides). Every recipe names its split.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget
from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay
from torch import nn
from torchvision.utils import make_grid

from malaria.common import errors
from malaria.common.atomic import save_figure, write_text
from malaria.data import cache
from malaria.data.archive import CLASSES, ImageTable
from malaria.data.datamodule import MalariaDataModule
from malaria.prediction.predictor import predict_subset
from malaria.model.metrics import THRESHOLD, classes, score
from malaria.model.classifier import MalariaClassifier
from malaria.evaluation.slide_errors import describe_errors

log = logging.getLogger(__name__)

FIGURES_DIR = "figures"
DPI = 110
TITLES = {
    "learning_curves": "Learning curves",
    "confusion_matrix": "Confusion matrix",
    "roc_pr": "ROC and precision-recall curves",
    "mistakes": "Most confident mistakes",
    "gradcam": "Grad-CAM heatmaps",
    "filters": "First-layer filters",
}


@dataclass
class ValPredictions:
    """The validation split as the model saw it: ids, labels (1 = parasitized), P(parasitized).

    Images stay in the memory-mapped decode cache (`pixels`, N x S x S x 3 uint8) and are read
    only for the few cells a figure shows: a full split at 224 px would not fit in memory."""

    ids: list[str]
    rows: np.ndarray
    labels: np.ndarray
    probs: np.ndarray
    pixels: np.ndarray
    split_summary: str = ""  # how many cells, slides and parasitized cells each side got

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def preds(self) -> np.ndarray:
        return classes(self.probs)

    def images(self, index: np.ndarray | int) -> np.ndarray:
        """uint8 HxWx3 image(s) of validation position(s) `index`."""
        return np.asarray(self.pixels[self.rows[index]])


@dataclass
class Report:
    markdown: Path
    figures: dict[str, Path]
    metrics: dict[str, float]


def predict_validation(model: MalariaClassifier, datamodule: MalariaDataModule) -> ValPredictions:
    """P(parasitized) for every validation cell, without TTA, as `val/acc` was measured in training."""
    val = predict_subset(model, datamodule, "val", tta=False)
    return ValPredictions(ids=val.ids, rows=val.rows, labels=val.labels, probs=val.probs,
                          pixels=np.load(datamodule.train_cache, mmap_mode="r"),
                          split_summary=datamodule.split_summary)


def validation_metrics(predictions: ValPredictions) -> dict[str, float]:
    """The training metrics (same threshold) plus average precision and counts."""
    return {
        **score(predictions.probs, predictions.labels),
        "images": len(predictions),
        "parasitized": int(predictions.labels.sum()),
        "mistakes": int((predictions.preds != predictions.labels).sum()),
    }


# ---------------------------------------------------------------- figures

def _blank(ax: Axes) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def learning_curves(metrics_csv: Path) -> Figure:
    """Train vs validation loss and accuracy per epoch, from the run's CSVLogger file."""
    if not metrics_csv.exists():
        raise FileNotFoundError(f"{metrics_csv} is missing: the learning curves are drawn from the CSV "
                                "logger's file.")
    # Step rows and epoch rows share one table; each epoch-level value sits on its own row.
    per_epoch = pd.read_csv(metrics_csv).groupby("epoch").last()
    fig = Figure(figsize=(10, 4), layout="constrained")
    panels = {"loss": ("train/loss_epoch", "val/loss"), "accuracy": ("train/acc", "val/acc")}
    val_acc = per_epoch["val/acc"].dropna() if "val/acc" in per_epoch else pd.Series(dtype=float)
    best_epoch = val_acc.idxmax() if len(val_acc) else None
    for ax, (quantity, columns) in zip(fig.subplots(1, 2), panels.items()):
        for column, split in zip(columns, ("train", "validation")):
            if column in per_epoch:
                series = per_epoch[column].dropna()
                ax.plot(series.index, series.to_numpy(), "o-", label=split)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", linestyle="--",
                       label=f"best val acc (epoch {int(best_epoch)})")
        ax.set(title=f"{quantity.capitalize()} per epoch", xlabel="epoch", ylabel=quantity)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Learning curves: train vs validation")
    return fig


def confusion_matrix(predictions: ValPredictions) -> Figure:
    fig = Figure(figsize=(4.8, 4.2), layout="constrained")
    ax = fig.subplots()
    ConfusionMatrixDisplay.from_predictions(
        predictions.labels, predictions.preds, labels=[0, 1], display_labels=CLASSES, ax=ax,
        colorbar=False, values_format="d", cmap="Blues",
    )
    ax.set_title(f"Confusion matrix (validation, threshold {THRESHOLD})")
    return fig


def roc_pr(predictions: ValPredictions) -> Figure:
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    roc_ax, pr_ax = fig.subplots(1, 2)
    curves = {"name": "validation", "plot_chance_level": True}
    RocCurveDisplay.from_predictions(predictions.labels, predictions.probs, ax=roc_ax, **curves)
    roc_ax.set_title("ROC curve (parasitized = positive)")
    PrecisionRecallDisplay.from_predictions(predictions.labels, predictions.probs, ax=pr_ax, **curves)
    pr_ax.set_title("Precision-recall curve (parasitized = positive)")
    return fig


def confident_mistakes(predictions: ValPredictions, n: int) -> np.ndarray:
    """Validation positions of the `n` wrong predictions farthest from the threshold."""
    wrong = np.flatnonzero(predictions.preds != predictions.labels)
    confidence = np.abs(predictions.probs[wrong] - THRESHOLD)
    return wrong[np.argsort(-confidence, kind="stable")][:n]


def image_grid(images: np.ndarray, captions: Sequence[str], title: str, columns: int = 8,
               inches: float = 1.5) -> Figure:
    """N same-sized HxWx3 images (uint8, or floats in [0, 1]) in rows of `columns`, laid out by
    torchvision's `make_grid`, each captioned in its top-left corner."""
    fig = Figure(figsize=(inches * columns, inches * max(1, -(-len(images) // columns)) + 0.5), layout="constrained")
    ax = fig.subplots()
    ax.set_axis_off()
    fig.suptitle(title)
    if not len(images):
        ax.text(0, 0.5, "none", fontsize=12)
        return fig
    batch = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2)
    pad = max(1, batch.shape[-1] // 16)
    grid = make_grid(batch, nrow=columns, padding=pad, pad_value=255 if batch.dtype == torch.uint8 else 1.0)
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    height, width = batch.shape[-2] + pad, batch.shape[-1] + pad
    for k, caption in enumerate(captions):
        ax.text((k % columns) * width + 1.5 * pad, (k // columns) * height + 1.5 * pad, caption, fontsize=6,
                va="top", bbox={"facecolor": "white", "alpha": 0.7, "pad": 1, "linewidth": 0})
    return fig


def zip_gallery(table: ImageTable, names: Sequence[str], captions: Sequence[str], title: str,
                size: int = 96, columns: int = 8) -> Figure:
    """The named cells of a competition zip, decoded at `size` px, in an `image_grid`."""
    members = dict(zip(table.ids, table.members))
    with zipfile.ZipFile(table.zip_path) as zipped:
        images = [cache.decode(zipped.read(members[name]), size) for name in names]
    return image_grid(np.stack(images) if images else [], captions, title, columns, inches=1.3)


def mistakes_gallery(predictions: ValPredictions, shown: np.ndarray, columns: int = 8) -> Figure:
    captions = [f"true: {CLASSES[predictions.labels[i]]}\nP(parasitized) {predictions.probs[i]:.2f}" for i in shown]
    images = predictions.images(np.asarray(shown, dtype=np.int64)) if len(shown) else []
    return image_grid(images, captions, "Most confident mistakes (validation): true class and predicted "
                                        "P(parasitized)", columns, inches=1.6)


class _FeatureMapTap(nn.Module):
    """`net` run as forward_head(forward_features(x)) with the last feature map passing through an
    Identity that Grad-CAM hooks: one target layer for every timm-interface network."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.features = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.net.forward_features(x)
        if features.ndim != 4:
            raise ValueError(f"Grad-CAM needs a convolutional feature map, but {type(self.net).__name__}."
                             f"forward_features returned shape {tuple(features.shape)}.")
        return self.net.forward_head(self.features(features))


def gradcam(net: nn.Module, images: torch.Tensor, classes: Sequence[int]) -> np.ndarray:
    """Grad-CAM maps in [0, 1], N x H x W like `images` (normalised, N x 3 x H x W), each showing
    where the last feature map holds evidence for `classes[i]` (1 parasitized, 0 uninfected)."""
    tapped = _FeatureMapTap(net)
    cam = GradCAM(model=tapped, target_layers=[tapped.features])
    try:
        with torch.enable_grad():  # the caller may be inside no_grad; Grad-CAM needs the gradients
            return cam(input_tensor=images, targets=[BinaryClassifierOutputTarget(int(c)) for c in classes])
    finally:
        cam.activations_and_grads.release()


def gradcam_groups(predictions: ValPredictions, per_group: int, seed: int) -> dict[str, np.ndarray]:
    """A random sample of correct parasitized, correct uninfected and wrong cells."""
    rng = np.random.default_rng(seed)
    preds, labels = predictions.preds, predictions.labels
    pools = {
        "correct, parasitized": np.flatnonzero((preds == labels) & (labels == 1)),
        "correct, uninfected": np.flatnonzero((preds == labels) & (labels == 0)),
        "wrong": np.flatnonzero(preds != labels),
    }
    return {name: np.sort(rng.choice(pool, min(per_group, len(pool)), replace=False))
            for name, pool in pools.items() if len(pool)}


def gradcam_figure(model: MalariaClassifier, predictions: ValPredictions, per_group: int,
                   seed: int) -> Figure:
    """Each sampled cell above its Grad-CAM overlay for the class the model predicted."""
    groups = gradcam_groups(predictions, per_group, seed)
    chosen = np.concatenate(list(groups.values()))
    images = predictions.images(chosen)
    maps = gradcam(model.net, model.normalise(torch.from_numpy(images).permute(0, 3, 1, 2)),
                   predictions.preds[chosen])
    cam_of = dict(zip(chosen.tolist(), zip(images, maps)))
    fig = Figure(figsize=(1.7 * per_group, 3.5 * len(groups) + 0.6), layout="constrained")
    axes = np.atleast_2d(fig.subplots(2 * len(groups), per_group))
    for g, (name, members) in enumerate(groups.items()):
        for col in range(per_group):
            top, bottom = axes[2 * g, col], axes[2 * g + 1, col]
            _blank(top)
            _blank(bottom)
            if col >= len(members):
                continue
            i = int(members[col])
            image, heatmap = cam_of[i]
            top.imshow(image)
            top.set_title(f"true {CLASSES[predictions.labels[i]][:5]}. P(par.) {predictions.probs[i]:.2f}",
                          fontsize=8)
            bottom.imshow(show_cam_on_image(image.astype(np.float32) / 255, heatmap, use_rgb=True))
        axes[2 * g, 0].set_ylabel(name, fontsize=10)
        axes[2 * g + 1, 0].set_ylabel("Grad-CAM", fontsize=10)
    fig.suptitle("Grad-CAM on the last feature map, for the predicted class (red = strong evidence)")
    return fig


def first_layer_filters(net: nn.Module, columns: int = 8) -> Figure | None:
    """The RGB kernels of the first convolution on the image, each stretched to [0, 1]."""
    convs = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3]
    if not convs:
        return None
    name, conv = convs[0]
    weights = conv.weight.detach().float().cpu()[:64]
    low = weights.amin(dim=(1, 2, 3), keepdim=True)
    high = weights.amax(dim=(1, 2, 3), keepdim=True)
    kernels = ((weights - low) / (high - low + 1e-8)).permute(0, 2, 3, 1).numpy()
    k = conv.kernel_size
    return image_grid(kernels, [], f"First-layer filters ({name}: {conv.out_channels} x {k[0]}x{k[1]} RGB)",
                      columns, inches=0.9)


# ---------------------------------------------------------------- report

def _markdown(run_dir: Path, figures: dict[str, Path], metrics: dict[str, float],
              predictions: ValPredictions, mistakes: np.ndarray, checkpoint: Path | None) -> str:
    def image(name: str) -> list[str]:
        if name not in figures:
            return []
        return [f"![{TITLES[name]}]({figures[name].relative_to(run_dir).as_posix()})", ""]

    source = f"`{checkpoint}`" if checkpoint else "the final weights (no checkpoint was saved)"
    lines = [
        f"# Run report: `{run_dir.name}`", "",
        f"Validation split ({metrics['images']} cells, {metrics['parasitized']} parasitized), predicted by "
        f"{source} without test-time augmentation; threshold {THRESHOLD}.", "",
        *([predictions.split_summary, ""] if predictions.split_summary else []),
        "## Validation metrics", "",
        "| metric | value |", "|---|---|",
        *[f"| {k} | {v:.4f} |" for k, v in metrics.items() if isinstance(v, float)],
        f"| mistakes | {metrics['mistakes']} of {metrics['images']} |", "",
        f"## {TITLES['learning_curves']}", "",
        "Train and validation curves diverging while validation loss rises means overfitting.", "",
        *image("learning_curves"),
        f"## {TITLES['confusion_matrix']}", "", *image("confusion_matrix"),
        f"## {TITLES['roc_pr']}", "", *image("roc_pr"),
        f"## {TITLES['mistakes']}", "", *image("mistakes"),
        "| image | true class | P(parasitized) |", "|---|---|---|",
        *[f"| {predictions.ids[i]} | {CLASSES[predictions.labels[i]]} | {predictions.probs[i]:.3f} |"
          for i in mistakes],
        "",
        "## Errors by slide", "",
        "```", describe_errors(pd.Series(predictions.preds == predictions.labels, index=predictions.ids)), "```", "",
        f"## {TITLES['gradcam']}", "",
        "Heatmaps from the network's last feature map, for the predicted class, on a random sample of "
        "correct and wrong validation cells. On correct parasitized cells they should sit on the "
        "parasite.", "",
        *image("gradcam"),
    ]
    if "filters" in figures:
        lines += [f"## {TITLES['filters']}", "", *image("filters")]
    config = run_dir / "config.yaml"
    lines += ["## Config", ""]
    if config.exists():
        lines += ["```yaml", config.read_text().rstrip(), "```", ""]
    else:
        lines += ["(no config.yaml in the run)", ""]
    return "\n".join(lines)


def build_report(run_dir: Path, model: MalariaClassifier, predictions: ValPredictions,
                 checkpoint: Path | None = None, gradcam_per_group: int = 6, n_mistakes: int = 16,
                 seed: int = 0) -> Report:
    """All figures into run_dir/figures/ and run_dir/report.md, replacing an earlier report."""
    (run_dir / FIGURES_DIR).mkdir(parents=True, exist_ok=True)
    mistakes = confident_mistakes(predictions, n_mistakes)
    figures = {
        "learning_curves": learning_curves(run_dir / "metrics.csv"),
        "confusion_matrix": confusion_matrix(predictions),
        "roc_pr": roc_pr(predictions),
        "mistakes": mistakes_gallery(predictions, mistakes),
        "gradcam": gradcam_figure(model, predictions, gradcam_per_group, seed),
        "filters": first_layer_filters(model.net),
    }
    paths = {name: save_figure(fig, run_dir / FIGURES_DIR / f"{name}.png", dpi=DPI)
             for name, fig in figures.items() if fig is not None}
    metrics = validation_metrics(predictions)
    text = _markdown(run_dir, paths, metrics, predictions, mistakes, checkpoint)
    markdown = write_text(run_dir / "report.md", text)
    return Report(markdown=markdown, figures=paths, metrics=metrics)


def log_to_wandb(logger: WandbLogger, report: Report, predictions: ValPredictions, samples: int = 100,
                 seed: int = 0, step: int | None = None) -> None:
    """The report's figures (`report/<figure>`), an interactive confusion matrix, a table of sample
    validation cells (image, id, label, prediction, probability) and the best checkpoint's
    validation metrics in the run summary (`best/val_<metric>`)."""
    import wandb

    for name, path in report.figures.items():
        logger.log_image(key=f"report/{name}", images=[str(path)], step=step, caption=[TITLES[name]])
    labels, preds = predictions.labels.tolist(), predictions.preds.tolist()
    chart = wandb.plot.confusion_matrix(y_true=labels, preds=preds, class_names=list(CLASSES),
                                        title="Confusion matrix (validation)")
    logger.log_metrics({"report/confusion_matrix_chart": chart}, step=step)
    n = len(predictions)
    chosen = np.sort(np.random.default_rng(seed).choice(n, min(samples, n), replace=False))
    logger.log_table(
        key="report/val_samples",
        columns=["id", "image", "label", "prediction", "p_parasitized", "correct"],
        data=[[predictions.ids[i], wandb.Image(predictions.images(i)), CLASSES[labels[i]], CLASSES[preds[i]],
               round(float(predictions.probs[i]), 4), labels[i] == preds[i]] for i in chosen],
        step=step,
    )
    logger.experiment.summary.update({f"best/val_{k}": v for k, v in report.metrics.items()})


class RunReport(Callback):
    """Builds the run's report from its best checkpoint when `fit` ends, and logs it to W&B when a
    WandbLogger is attached.

    It runs once, after the last epoch and on rank zero only, so training is not slowed. A failure
    here is logged, not raised: the checkpoints are already safe and `make report` can retry."""

    def __init__(self, gradcam_per_group: int = 6, mistakes: int = 16, wandb_samples: int = 100,
                 seed: int = 0) -> None:
        self.gradcam_per_group = gradcam_per_group
        self.mistakes = mistakes
        self.wandb_samples = wandb_samples
        self.seed = seed

    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.fast_dev_run:  # a smoke test writes no checkpoints or metrics to report on
            return
        if trainer.limit_val_batches == 0:
            print("No report: the run validated on nothing (a full fit, data.val_fraction 0).")
            return
        # Not trainer.log_dir: under DDP it is a collective call, which rank zero alone would hang in.
        run_dir = Path(trainer.default_root_dir)
        try:
            report = self.build(trainer, pl_module, run_dir)
        except errors.WriteError:  # a full disk stops the verb: the user has to act
            raise
        except Exception:
            log.exception("Could not build the run report; the run itself is complete. "
                          "Retry with `python -m malaria.commands.report --run %s`.", run_dir)
            return
        print(f"Report: {report.markdown} ({len(report.figures)} figures)")

    def build(self, trainer: Trainer, pl_module: LightningModule, run_dir: Path) -> Report:
        checkpoint = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        model = pl_module
        if checkpoint:
            model = type(pl_module).load_from_checkpoint(checkpoint, map_location=pl_module.device,
                                                         weights_only=False)
        # Feature extraction trains on cached features; its datamodule keeps the images in `images`.
        predictions = predict_validation(model, getattr(trainer.datamodule, "images", trainer.datamodule))
        report = build_report(run_dir, model, predictions, Path(checkpoint) if checkpoint else None,
                              self.gradcam_per_group, self.mistakes, self.seed)
        wandb_logger = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
        if wandb_logger is not None:
            log_to_wandb(wandb_logger, report, predictions, self.wandb_samples, self.seed,
                         trainer.global_step)
        return report
