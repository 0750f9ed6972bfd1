"""A fake `kaggle` client for child processes (tests/commands/test_leaderboard.py): with tests/fakes first on
PYTHONPATH, `import kaggle` gives this `api`, whose server side is `kaggle_fake.json` in the working
directory: `failures` to answer the next uploads with ("timeout", "lost": accepted but the reply
timed out, or an HTTP status such as "503"), and `accepted`, the submissions Kaggle holds."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import requests

STATE = Path("kaggle_fake.json")


def _http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status} Server Error", response=response)


class FakeApi:
    COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE = "Could not submit to competition"

    def _load(self) -> dict:
        return json.loads(STATE.read_text())

    def _save(self, state: dict) -> None:
        STATE.write_text(json.dumps(state))

    def competition_submit(self, file_name: str, message: str, competition: str, quiet: bool = False):
        state = self._load()
        failure = state["failures"].pop(0) if state["failures"] else None
        if failure not in (None, "lost"):
            self._save(state)
            raise requests.ConnectTimeout("connect timed out") if failure == "timeout" else _http_error(int(failure))
        state["accepted"].append({"file_name": Path(file_name).name, "description": message,
                                  "competition": competition})
        self._save(state)
        if failure == "lost":
            raise requests.ReadTimeout("read timed out")
        return SimpleNamespace(message="Successfully submitted", ref=len(state["accepted"]))

    def competition_submissions(self, competition: str) -> list:
        return [SimpleNamespace(**s) for s in self._load()["accepted"] if s["competition"] == competition]


api = FakeApi()
