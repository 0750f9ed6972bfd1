"""A throwaway PostgreSQL server for the tests that share a sweep through one: its own cluster in a
temporary folder, on a free loopback port, fsync off, stopped and removed at the end.

The server is Debian's (`apt-get install postgresql`; `.ci/run` installs it where it is missing) or any
`initdb` and `postgres` on PATH. PostgreSQL refuses to run as root, so as root it runs as the
`postgres` user the package creates. Where it cannot start, `Unavailable` says why: the fixture in
conftest.py then skips, unless `REQUIRED` is set in the environment (CI), where it fails.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from runner import free_port

REQUIRED = "MALARIA_REQUIRE_POSTGRES"
USER = "malaria"  # the cluster's superuser; trust authentication, loopback only


class Unavailable(RuntimeError):
    """No PostgreSQL server can be started on this machine: the message says why."""


def bindir() -> Path:
    """The folder of `initdb` and `postgres`: PATH's, else the newest Debian package's."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("postgres"):
        return Path(os.path.realpath(on_path)).parent
    packaged = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parts[4]))
    if packaged:
        return Path(packaged[-1]).parent
    raise Unavailable("no PostgreSQL server binaries (initdb, postgres): apt-get install -y postgresql")


def create_database(url: str, name: str) -> str:
    """A new, empty database on the server of `url`; its URL."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return url.rsplit("/", 1)[0] + f"/{name}"


class Server:
    """One running cluster; `url` is what `--storage` takes."""

    def __init__(self) -> None:
        try:
            import psycopg  # noqa: F401 (SQLAlchemy's driver for postgresql:// URLs)
        except ImportError:
            raise Unavailable("the psycopg driver is not installed: pip install -e '.[cluster]'") from None
        binaries = bindir()
        owner = None
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise Unavailable("running as root, and no `postgres` user to run the server as") from None
        self.folder = Path(tempfile.mkdtemp(prefix="malaria-pg-"))
        as_owner = dict(user=owner.pw_uid, group=owner.pw_gid, extra_groups=[]) if owner else {}
        if owner:
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
        data, log = self.folder / "data", self.folder / "server.log"
        init = subprocess.run([binaries / "initdb", "-D", data, "-U", USER, "--auth=trust", "--no-sync",
                               "--encoding=UTF8", "--locale=C"],
                              capture_output=True, text=True, cwd=self.folder, **as_owner)
        if init.returncode != 0:
            self.remove()
            raise Unavailable(f"initdb failed: {init.stderr.strip()[-500:]}")
        self.port = free_port()
        with open(log, "w") as out:
            self.process = subprocess.Popen(
                [binaries / "postgres", "-D", data, "-h", "127.0.0.1", "-p", str(self.port),
                 "-k", self.folder,  # its Unix socket in its own folder, not /run/postgresql
                 "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
                stdout=out, stderr=subprocess.STDOUT, cwd=self.folder, **as_owner)
        self.url = f"postgresql://{USER}@127.0.0.1:{self.port}/postgres"
        self.wait_ready(log)

    def wait_ready(self, log: Path, timeout: float = 60) -> None:
        import psycopg

        deadline = time.time() + timeout
        while True:
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if self.process.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise Unavailable(f"the server did not start: {log.read_text()[-500:]}") from None
                time.sleep(0.2)

    def stop(self) -> None:
        """A fast shutdown (SIGINT: the clients are cut off), then the folder goes."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.remove()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
