"""The app as it runs in production: gunicorn processes on 127.0.0.1, and a
small keep-alive HTTP client for the tests that drive them. The tests'
servers also check every response against the contract (tests/contract.py),
which costs their workers CPU: rates measured here are not the benchmark's."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 4  # two processes a core, each a gevent worker (gunicorn.conf.py): see docs/performance.md
# Servers (gunicorn masters, each on its own port) sharing one database in the
# load and crash tests: several app servers in front of one PostgreSQL database,
# as it is deployed; one on a SQLite file, as docs/testing.md's table describes.
SERVERS = {"sqlite": 1, "postgresql": 2}


class Gunicorn:
    """`gunicorn --workers 4 'app:create_app()'` on a free port, on one database, the rest from gunicorn.conf.py.
    The tests' servers check each response against the contract (tests/contract.py)."""

    def __init__(self, database_url: str, log_path: Path, workers: int = WORKERS, app: str = "contract:checked_app()", flags: bool = True):
        """flags=False runs `gunicorn <app>` as docs/production.md says, with every setting from
        gunicorn.conf.py but the address (GUNICORN_CMD_ARGS binds a free port)."""
        self.database_url, self.log_path, self.workers, self.app, self.flags = database_url, log_path, workers, app, flags
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 30) -> None:
        log = open(self.log_path, "ab")
        start = self.log_path.stat().st_size
        command, environment = [sys.executable, "-m", "gunicorn"], {**os.environ, "DATABASE_URL": self.database_url}
        if self.flags:
            command += ["--workers", str(self.workers), "--bind", "127.0.0.1:0", "--graceful-timeout", "5", "--pythonpath", "tests"]
        else:
            environment["GUNICORN_CMD_ARGS"] = "--bind 127.0.0.1:0 --pythonpath tests"
        self.process = subprocess.Popen(
            [*command, self.app],
            cwd=ROOT,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so a kill reaches the master and every worker
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_bytes()[start:].decode(errors="replace")
            listening = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", text)
            if listening and text.count("Booting worker") >= self.workers:
                self.url = f"http://127.0.0.1:{listening[1]}"
                if self.answers():
                    return
            assert self.process.poll() is None, f"gunicorn exited:\n{text}"
            time.sleep(0.05)
        raise AssertionError(f"gunicorn did not start in {timeout} s:\n{self.log_path.read_text()}")

    def answers(self) -> bool:
        try:
            connection = http.client.HTTPConnection(self.url.removeprefix("http://"), timeout=5)
            connection.request("GET", "/")  # any answer will do
            connection.getresponse().read()
            connection.close()
        except (OSError, http.client.HTTPException):
            return False
        return True

    def kill(self) -> None:
        """SIGKILL the master and all workers: no shutdown code runs."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


@contextmanager
def running(database_url: str, directory: Path, count: int) -> Iterator[list[Gunicorn]]:
    """`count` servers on one database, started, and stopped at the end (also when one fails to start)."""
    servers = [Gunicorn(database_url, directory / f"gunicorn-{n}.log") for n in range(1, count + 1)]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


class ServerDown(Exception):
    """The request may or may not have reached the server: the connection failed."""


class Api:
    """One keep-alive connection, as one client has; follows the server across restarts."""

    def __init__(self, server: Gunicorn, token: str):
        self.server, self.token = server, token
        self.connection: http.client.HTTPConnection | None = None
        self.url = ""

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, dict[str, str], Any]:
        if self.connection is None or self.url != self.server.url:
            self.close()
            self.url = self.server.url
            self.connection = http.client.HTTPConnection(self.url.removeprefix("http://"), timeout=60)
        headers = {"Authorization": f"Bearer {self.token}"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            self.connection.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
            response = self.connection.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException) as error:
            self.close()
            raise ServerDown(str(error)) from error
        return response.status, dict(response.getheaders()), json.loads(payload)

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None
