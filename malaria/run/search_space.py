"""Search spaces for `make sweep`: a small YAML file keyed by the training CLI's own flag names.

    model.lr: {low: 5.0e-4, high: 2.0e-2, log: true}    # a range: int when both ends are, else float
    data.batch_size: {low: 64, high: 256, step: 64}      # optional step (not with log)
    data.image_size: [64, 80, 96]                        # choices (numbers, strings, booleans)
    model.model_kwargs.drop_rate: {low: 0.0, high: 0.5}  # a key inside a dict-valued flag

Each entry becomes an Optuna distribution. `RecipeParser` holds the training CLI's own parser and
the recipe (plus the sweep's training overrides) resolved by it: every choice and both ends of
every range are parsed against it before any trial runs, so a typo or a value the recipe would
refuse is an error naming its key, not a trial that fails an hour into the sweep. The same parser
writes a trial's complete recipe (`best.yaml`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import Trial

from malaria.run.cli import MalariaCLI
from malaria.data.datamodule import MalariaDataModule
from malaria.common.errors import ConfigError, MissingError
from malaria.model.classifier import MalariaClassifier

Space = dict[str, BaseDistribution]
RANGE_FIELDS = ("low", "high", "log", "step")


def load(path: Path) -> Space:
    """The distributions of a search-space file, each checked on its own (ranges, choices)."""
    path = Path(path)
    if not path.is_file():
        raise MissingError(f"Search space {path} does not exist.")
    try:
        entries = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"Search space {path} is not valid YAML: {err}") from None
    if not isinstance(entries, dict) or not entries:
        raise ConfigError(f"Search space {path} must map training flags to ranges or choices, "
                          "e.g. `model.lr: {low: 1.0e-4, high: 1.0e-2, log: true}`.")
    return {str(key): distribution(f"{path}: {key}", spec) for key, spec in entries.items()}


def distribution(where: str, spec: object) -> BaseDistribution:
    """A list of choices, or a `{low, high[, log][, step]}` range, as an Optuna distribution."""
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{where}: an empty list of choices.")
        if not all(value is None or isinstance(value, (bool, int, float, str)) for value in spec):
            raise ConfigError(f"{where}: choices must be numbers, strings or booleans, got {spec}.")
        return CategoricalDistribution(spec)
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a range `{{low: .., high: ..}}` or a list of choices, got {spec!r}.")
    unknown = sorted(set(spec) - set(RANGE_FIELDS))
    if unknown or not {"low", "high"} <= set(spec):
        raise ConfigError(f"{where}: a range has `low` and `high` and optionally `log` and `step`, "
                          f"got {sorted(spec)}.")
    low, high, step = (_number(where, field, spec.get(field)) for field in ("low", "high", "step"))
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log must be true or false, got {log!r}.")
    if low > high:
        raise ConfigError(f"{where}: empty range, low {low} is above high {high}.")
    try:
        if all(isinstance(v, int) for v in (low, high, step) if v is not None):
            return IntDistribution(low, high, log=log, step=step or 1)
        return FloatDistribution(low, high, log=log, step=step)
    except ValueError as err:  # Optuna's own checks: log needs low > 0, and excludes a step
        raise ConfigError(f"{where}: {err}") from None


def _number(where: str, field: str, value: object) -> int | float | None:
    """A range's bound as a number. YAML reads `1e-4` (no dot) as text: that is taken as 0.0001."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {field} must be a number, got {value!r}.") from None


def suggest(trial: Trial, key: str, dist: BaseDistribution) -> Any:
    """The trial's value for one entry, through Optuna's public suggest API."""
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(key, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)


def contains(dist: BaseDistribution, value: Any) -> bool:
    """Whether a value is one the distribution can propose (a choice, or inside the range)."""
    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(dist, IntDistribution) and value != int(value):
        return False
    return dist.low <= value <= dist.high


def candidates(dist: BaseDistribution) -> list[Any]:
    """The values that stand for a whole distribution when the recipe checks it: its extremes."""
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    return [dist.low, dist.high]


class _ParseOnly(MalariaCLI):
    """The training CLI up to its parsed config: no run directory, model, data or trainer."""

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


class RecipeParser:
    """A recipe and training overrides, resolved by the training CLI's own parser.

    `flags(params)` turns a trial's parameters into training flags; a parameter below a dict-valued
    flag (`model.model_kwargs.drop_rate`) is merged into the recipe's dict, which the CLI would
    otherwise replace whole."""

    def __init__(self, config: str, overrides: Sequence[str]) -> None:
        self.config = config
        self.overrides = list(overrides)
        if not Path(config).is_file():
            raise MissingError(f"Recipe {config} does not exist.")
        try:
            self.cli = _ParseOnly(MalariaClassifier, MalariaDataModule, args=self._args([]), run=False,
                                  parser_kwargs={"exit_on_error": False})
        except argparse.ArgumentError as err:
            raise ConfigError(f"The recipe {config} with {' '.join(self.overrides) or 'no overrides'} "
                              f"is refused by the training CLI: {err}") from None
        self.base = self.cli.config

    def _args(self, flags: Sequence[str]) -> list[str]:
        return ["--config", self.config, *self.overrides, *flags]

    def resolved(self) -> dict[str, Any]:
        """The complete resolved recipe, as plain data (what a study records to compare reruns)."""
        return yaml.safe_load(self.cli.parser.dump(self.base, skip_unset=False))

    def flag_of(self, key: str) -> tuple[str, list[str]]:
        """The CLI flag that sets `key`, and the path of `key` inside that flag's dict (if any)."""
        if key in self.base:
            return key, []
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            flag = ".".join(parts[:cut])
            if flag in self.base:
                if self.base[flag] is None or isinstance(self.base[flag], dict):
                    return flag, parts[cut:]
                break
        raise KeyError(key)

    def value(self, key: str) -> Any:
        """The recipe's own value for a key of the space (None where it leaves it unset)."""
        flag, path = self.flag_of(key)
        node = self.base[flag]
        for part in path:
            node = node.get(part) if isinstance(node, Mapping) else None
        return node

    def flags(self, params: Mapping[str, Any]) -> list[str]:
        """Training flags that set these parameters on top of the recipe and overrides."""
        values: dict[str, Any] = {}
        for key, value in params.items():
            flag, path = self.flag_of(key)
            if not path:
                values[flag] = value
                continue
            node = values.setdefault(flag, json.loads(json.dumps(self.base[flag] or {})))
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
        return [arg for flag, value in values.items()
                for arg in (f"--{flag}", value if isinstance(value, str) else json.dumps(value))]

    def parse(self, params: Mapping[str, Any]):
        return self.cli.parser.parse_args(self._args(self.flags(params)))

    def check(self, space: Space, source: str) -> None:
        """Every key is a training flag (or lies in a dict-valued one) and the recipe accepts every
        choice and both ends of every range; the first that fails is an error naming it."""
        for key, dist in space.items():
            try:
                self.flag_of(key)
            except KeyError:
                raise ConfigError(f"{source}: unknown key {key}: not a flag of the training CLI "
                                  "(`python -m malaria.commands.train fit --help` lists them).") from None
            for value in candidates(dist):
                try:
                    self.parse({key: value})
                except argparse.ArgumentError as err:
                    reason = " ".join(str(err).split())
                    raise ConfigError(f"{source}: {key}: the recipe {self.config} refuses {value!r}: "
                                      f"{reason}") from None

    def dump(self, params: Mapping[str, Any]) -> str:
        """The complete recipe of a trial with these parameters, as `make train CONFIG=` reads it."""
        config = self.parse(params)
        config.run = None  # a new run, not the trial's
        return self.cli.parser.dump(config, skip_unset=False)
