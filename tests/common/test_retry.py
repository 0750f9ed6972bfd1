"""The retry policy of network calls: transient failures retried a bounded number of times, the rest
raised at once (through Kaggle's client: tests/commands/test_leaderboard.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import requests

from malaria.common import retry


def http_error(status: int) -> requests.HTTPError:
    return requests.HTTPError(f"HTTP {status}", response=SimpleNamespace(status_code=status))


@pytest.mark.parametrize(("error", "transient"), [
    (requests.Timeout("read timed out"), True),
    (requests.ConnectionError("connection reset"), True),
    (retry.TransientError("the client said: try later"), True),
    (http_error(429), True),
    (http_error(503), True),
    (http_error(401), False),  # a rejected token: no retry makes it right
    (http_error(404), False),
    (ValueError("a bug"), False),
])
def test_what_is_worth_another_try(error: BaseException, transient: bool) -> None:
    assert retry.is_transient(error) is transient


def attempts(failures: list[BaseException]) -> int:
    """How many attempts an action takes that fails with `failures` in turn, then succeeds."""
    made = 0
    for attempt in retry.transient_failures("upload of x.csv"):
        with attempt:
            made += 1
            if made <= len(failures):
                raise failures[made - 1]
    return made


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry, "FIRST_WAIT_S", 0)


def test_transient_failures_are_retried_then_the_last_one_is_raised(caplog: pytest.LogCaptureFixture) -> None:
    assert attempts([requests.Timeout("slow")] * (retry.ATTEMPTS - 1)) == retry.ATTEMPTS
    assert "upload of x.csv failed (Timeout: slow); attempt 2 of 4" in caplog.text
    with pytest.raises(requests.Timeout, match="slow"):
        attempts([requests.Timeout("slow")] * retry.ATTEMPTS)


def test_a_permanent_failure_is_raised_at_once() -> None:
    assert attempts([]) == 1
    with pytest.raises(requests.HTTPError, match="HTTP 403"):
        attempts([http_error(403), requests.Timeout("never reached")])
