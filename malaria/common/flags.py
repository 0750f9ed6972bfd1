"""The ranges of the project's flags, checked where they are parsed.

The LightningCLI verbs read them from the type hints of `MalariaDataModule` and
`MalariaClassifier` (jsonargparse's restricted types); the argparse verbs pass the same types
through `argument`. Either way a bad value ends the verb in its parser with one `error:` paragraph
naming the flag and the value, before anything is read, trained or written.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

from jsonargparse.typing import (
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
    restricted_number_type,
)

__all__ = ["ClosedUnitInterval", "Fraction", "FoldCount", "HalfTurn", "NonNegativeFloat", "NonNegativeInt",
           "OpenUnitInterval", "PositiveFloat", "PositiveInt", "argument"]

Fraction = restricted_number_type("Fraction", float, [(">=", 0), ("<", 1)],
                                  docstring="A fraction in [0, 1): 0 is none, 1 would leave nothing else.")
FoldCount = restricted_number_type("FoldCount", int, (">=", 2), docstring="At least 2 folds.")
HalfTurn = restricted_number_type("HalfTurn", float, [(">=", 0), ("<=", 180)],
                                  docstring="An angle in degrees, either way: 180 covers every rotation.")

Number = TypeVar("Number", int, float)


def argument(restricted: Callable[[str], Number]) -> Callable[[str], Number]:
    """An argparse `type=` from a restricted type, whose error message says the allowed range."""

    def parse(text: str) -> Number:
        try:
            return restricted(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{err} ({restricted.__name__})") from None

    parse.__name__ = restricted.__name__
    return parse
