"""The project's own failures, and how every verb reports them.

An error about what the user gave (data, a recipe, a run, weights, a submission) derives from
`UserError`: the verb prints it as one paragraph on stderr and exits with 1, with no traceback,
since the message already names the file, row or member at fault. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn


class UserError(Exception):
    """A problem with the user's input that the message fully explains."""


class MissingError(UserError, FileNotFoundError):
    """A run, checkpoint or file the command needs is not there."""


class ExistsError(UserError, FileExistsError):
    """An output that is never overwritten is already there."""


class ConfigError(UserError, ValueError):
    """A recipe or flag that cannot work."""


class WriteError(UserError, OSError):
    """An output could not be written (no space left, a read-only folder); nothing before it changed."""


class Preempted(Exception):
    """Training stopped by SIGTERM or SIGINT after saving its state (`malaria.run.preemption`)."""

    def __init__(self, what: str, resume: str | None, exit_status: int) -> None:
        super().__init__(f"{what}; resume with `{resume}`" if resume else what)
        self.what, self.resume, self.exit_status = what, resume, exit_status


def listing(names: Sequence[object], shown: int = 5) -> str:
    """The first `shown` offending names of an error message, and how many more there are."""
    names = list(names)
    more = f" (and {len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(repr(n) for n in names[:shown]) + more


def run(main: Callable[[], Any]) -> NoReturn:
    """Call an entry point's `main`; a UserError ends it with `error: <message>` and exit status 1,
    a preemption with its one line and 128 + the signal's number."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except Preempted as stop:
        print(stop, file=sys.stderr)
        sys.exit(stop.exit_status)
    sys.exit(0)
