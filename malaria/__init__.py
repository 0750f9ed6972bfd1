"""malaria: a Kaggle pipeline for "Fighting Malaria with CNNs" (NIH red blood cell images).

Data flows one way, folder by folder: `common` (errors, atomic writes, flag ranges) <- `data`
(zip + CSV -> decoded cache -> DataModule) <- `model` (networks, weights, LightningModule, its
metrics, fine-tuning) <- `prediction` (checkpoints -> probabilities -> submission CSV) <- `evaluation`
(errors per slide, the run report) <- `run` (CLI, checkpoints, loggers, run folders)
<- `commands` (the verbs `make` runs). Nothing imports a folder to its right, and no verb another.
Importing the package imports nothing heavy: `make submit` need not load torch.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.1.0"

# Where each module lived before the package had folders. Runs trained before the move name them
# in their checkpoints (pickled hyperparameters such as `malaria.transforms.Augment`) and in their
# config.yaml (`malaria.reporting.RunReport`, `malaria.checkpointing.LastCheckpoint`...): importing
# an old name gives the module that lives on under its new one, so those runs still predict,
# resume and rebuild their reports.
MOVED = {
    "errors": "common.errors", "atomic": "common.atomic", "quiet": "common.quiet",
    "archive": "data.archive", "cache": "data.cache", "splits": "data.splits", "sampling": "data.sampling",
    "datamodule": "data.datamodule", "demo": "data.demo", "transforms": "data.augmentation",
    "models": "model.networks", "weights": "model.pretrained", "module": "model.classifier",
    "finetune": "model.finetune",
    "cli": "run.cli", "checkpointing": "run.checkpointing", "tracking": "run.loggers", "runs": "run.run_dirs",
    "inference": "prediction.predictor", "writer": "prediction.ddp_writer", "priors": "prediction.slide_prior",
    "submit": "prediction.submission",
    "metrics": "model.metrics", "slide_errors": "evaluation.slide_errors", "reporting": "evaluation.run_report",
    "report": "evaluation.run_report",  # old configs name malaria.report.RunReport
    "train": "commands.train", "features": "commands.features", "predict": "commands.predict",
    "holdout": "commands.holdout", "cv": "commands.cv", "audit": "commands.audit", "lr_find": "commands.lr_find",
    "bench": "commands.bench", "leaderboard": "commands.leaderboard", "scoring": "commands.score",
}


class _OldNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports `malaria.<old>` as the module now at `malaria.<new>` (the same module object)."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        old = name.removeprefix(f"{__name__}.")
        if name.startswith(f"{__name__}.") and old in MOVED:
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = importlib.import_module(f"{__name__}.{MOVED[spec.name.removeprefix(f'{__name__}.')]}")
        self._spec = module.__spec__
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        module.__spec__ = self._spec  # the import system gave it the old name's spec; it keeps its own


if not any(isinstance(finder, _OldNames) for finder in sys.meta_path):
    sys.meta_path.append(_OldNames())
