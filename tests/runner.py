"""Run entry points as `make` runs them, each in its own process.

`run_commands` runs many without paying each one's start-up: one Python process imports the heavy
libraries once, then forks a child per command that runs `python -m <module> <args>` as
`__main__`, with its own working directory, stdout, stderr and exit status. A child that raises
prints the traceback Python would, and exits with 1. `run_module` runs one in a fresh interpreter,
for what a fork cannot do (DDP starts its other ranks by running the same command line again)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Libraries only: an entry module imported before it runs as __main__ would run twice.
PRELOAD = ("torch", "lightning.pytorch", "lightning.pytorch.cli", "timm", "albumentations", "pandas",
           "sklearn.model_selection", "matplotlib.pyplot", "wandb")

SERVER = r"""
import json, os, runpy, sys, traceback

jobs = json.load(sys.stdin)
for name in json.loads(sys.argv[1]):
    __import__(name)


def child(job):
    os.chdir(job["cwd"])
    for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv = [job["module"], *job["args"]]
    code = 0
    try:
        runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            code = exit_.code or 0
        else:
            print(exit_.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


codes, running, queue = {}, {}, list(enumerate(jobs))
while queue or running:
    while queue and len(running) < int(sys.argv[2]):
        index, job = queue.pop(0)
        pid = os.fork()
        if pid == 0:
            child(job)
        running[pid] = index
    pid, status = os.wait()
    codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
json.dump([codes[i] for i in range(len(jobs))], sys.stdout)
"""


def run_module(module: str, *args: str, cwd: Path, pythonpath: Path = REPO,
               timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`python -m module *args` in a fresh interpreter, in cwd, with W&B off."""
    paths = dict.fromkeys([pythonpath, REPO / "tests", REPO])  # test modules import conftest and runner
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, paths)),
           "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_commands(commands: list[tuple[str, list[str], Path]], logs: Path, parallel: int = 2,
                 timeout: float = 600, pythonpath: tuple[Path, ...] = ()) -> list[Result]:
    """Run each (module, args, cwd) as `python -m module *args` in cwd; their outputs go through `logs`.
    `pythonpath` comes before the repository (a `sitecustomize.py` there runs first, as in tests/faults/)."""
    logs.mkdir(parents=True, exist_ok=True)
    jobs = [{"module": module, "args": list(args), "cwd": str(cwd),
             "stdout": str(logs / f"{i}.out"), "stderr": str(logs / f"{i}.err")}
            for i, (module, args, cwd) in enumerate(commands)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in (*pythonpath, REPO))}
    server = subprocess.run([sys.executable, "-c", SERVER, json.dumps(PRELOAD), str(parallel)],
                            input=json.dumps(jobs), env=env, capture_output=True, text=True, timeout=timeout)
    assert server.returncode == 0, server.stderr[-3000:]
    codes = json.loads(server.stdout)
    return [Result(code, Path(job["stdout"]).read_text(), Path(job["stderr"]).read_text())
            for code, job in zip(codes, jobs)]


def free_port() -> int:
    """A loopback TCP port free now, for a server a test starts (the kernel picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` and its bytes: equal snapshots mean a verb changed nothing there."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_paragraph(result: subprocess.CompletedProcess[str] | Result, *named: str) -> str:
    """A verb refused with exit status 1 and one `error:` paragraph naming each of `named`, no traceback."""
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    message = result.stderr[result.stderr.index("error: "):].strip()
    assert "\n\n" not in message and all(n in message for n in named), message
    return message
