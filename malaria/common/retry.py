"""The retry policy for network calls: transient failures (a timeout, a dropped connection, HTTP 429
or 5xx) are retried with exponential backoff, a bounded number of times; anything else, such as a
rejected token or an unknown competition, fails at once. Built on tenacity.

    for attempt in retry.transient_failures("upload of x.csv"):
        with attempt:
            ...
"""

from __future__ import annotations

import logging

import requests
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential

log = logging.getLogger(__name__)

ATTEMPTS = 4  # the first try and three retries: FIRST_WAIT_S * (1 + 2 + 4) of waiting
FIRST_WAIT_S = 1.0
MAX_WAIT_S = 30.0


class TransientError(RuntimeError):
    """A failure the caller knows is worth another try (the client reported it without raising)."""


def is_transient(err: BaseException) -> bool:
    if isinstance(err, (TransientError, requests.Timeout, requests.ConnectionError)):
        return True
    status = getattr(getattr(err, "response", None), "status_code", None)
    return status == 429 or (isinstance(status, int) and 500 <= status < 600)


def transient_failures(what: str, attempts: int = ATTEMPTS) -> Retrying:
    """Attempts at `what`: the last failure, transient or not, is re-raised as it was."""

    def announce(state: RetryCallState) -> None:
        err = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0
        log.warning("%s failed (%s: %s); attempt %d of %d in %.0f s.", what, type(err).__name__,
                    " ".join(str(err).split())[:200], state.attempt_number + 1, attempts, wait)

    return Retrying(retry=retry_if_exception(is_transient), stop=stop_after_attempt(attempts),
                    wait=wait_exponential(multiplier=FIRST_WAIT_S, max=MAX_WAIT_S), before_sleep=announce, reraise=True)
