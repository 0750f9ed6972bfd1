"""The package's shape: data flows one way through its folders, verbs never import one another,
and runs trained before the folders existed still load."""

from __future__ import annotations

import ast
import pickle
import sys
from pathlib import Path

import pytest

import malaria

PACKAGE = Path(malaria.__file__).parent
LAYERS = ("common", "data", "model", "prediction", "evaluation", "run", "commands")  # each imports only leftwards


def imports(path: Path) -> set[str]:
    """The malaria modules a source file imports, as dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("malaria"):
            found |= {f"{node.module}.{a.name}" for a in node.names} if node.module.count(".") == 1 else {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("malaria")}
    return found


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE)


def test_every_module_lives_in_a_layer_folder() -> None:
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py"]
    assert {p.parent.name for p in SOURCES} == set(LAYERS)


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(PACKAGE)) for p in SOURCES])
def test_imports_point_down_and_verbs_stand_alone(path: Path) -> None:
    layer = LAYERS.index(path.parent.name)
    for name in imports(path):
        parts = name.split(".")
        assert len(parts) >= 2 and parts[1] in LAYERS, f"{path.name} imports {name}: not a layer's module"
        target = LAYERS.index(parts[1])
        assert target <= layer, f"{path.relative_to(PACKAGE)} imports upward: {name}"
        if path.parent.name == "commands" and target == layer:
            assert path.name == "__init__.py", f"verb {path.name} imports verb {name}"


def test_a_checkpoint_pickled_under_the_old_module_names_still_loads(tmp_path: Path) -> None:
    """Checkpoints trained before the move pickle e.g. `malaria.transforms.Augment`."""
    from malaria.data.augmentation import Augment

    payload = pickle.dumps(Augment(hflip=0.25), protocol=0).replace(b"malaria.data.augmentation", b"malaria.transforms")
    assert b"malaria.transforms" in payload
    for name in [n for n in sys.modules if n == "malaria.transforms"]:
        del sys.modules[name]
    loaded = pickle.loads(payload)
    assert type(loaded) is Augment and loaded.hflip == 0.25


def test_old_class_paths_in_a_run_config_resolve_to_the_moved_classes() -> None:
    """A config.yaml saved before the move names callbacks and modules by their old paths."""
    import importlib

    from malaria.evaluation.run_report import RunReport
    from malaria.model.classifier import MalariaClassifier
    from malaria.run.checkpointing import LastCheckpoint

    assert importlib.import_module("malaria.module").MalariaClassifier is MalariaClassifier
    assert importlib.import_module("malaria.reporting").RunReport is RunReport
    assert importlib.import_module("malaria.report").RunReport is RunReport
    assert importlib.import_module("malaria.checkpointing").LastCheckpoint is LastCheckpoint


@pytest.mark.parametrize("folder", LAYERS)
def test_each_folders_docstring_names_every_module_in_it(folder: str) -> None:
    """A newcomer reads `malaria/<folder>/__init__.py` to find a module: a new one must be named there."""
    docstring = ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text())) or ""
    modules = sorted(p.stem for p in (PACKAGE / folder).glob("*.py") if p.stem != "__init__")
    if folder == "commands":  # the verbs: the folder's docstring says how to run any of them
        assert "python -m malaria.commands.<verb>" in docstring
        return
    assert [m for m in modules if f"`{m}`" not in docstring] == []
