"""The server and commands as a reader of the README runs them: `flask --app app ...`
in processes of their own, on one database named by DATABASE_URL."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKEN = re.compile(r"(?<![\w.-])[1-9][0-9]*\.[A-Za-z0-9_-]{43}(?![\w-])")


def environment(database_url: str) -> dict[str, str]:
    """The reader's shell: the commands on PATH, the database in DATABASE_URL, and the app
    importable from any directory (so that what a command writes stays out of the clone)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "DATABASE_URL": database_url, "PATH": path, "PYTHONPATH": str(ROOT)}


def flask_command(database_url: str, *arguments: str) -> str:
    """`flask --app app ARGUMENTS`; returns what it printed."""
    ran = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", *arguments],
        cwd=ROOT, env=environment(database_url), capture_output=True, text=True, timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    return ran.stdout


def seeded_tokens(printed: str) -> dict[str, str]:
    """The tokens `flask --app app seed` printed, by user name."""
    return dict(re.findall(r"^  (Ada|Grace) .* (\S+)$", printed, re.MULTILINE))


@contextmanager
def flask_run(database_url: str, directory: Path) -> Iterator[str]:
    """`flask run` on a port of its own choosing; yields its address, host:port. The app is the
    README's with the tests' check of every response (tests/contract.py)."""
    log = directory / "flask-run.log"
    with open(log, "w") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "flask", "--app", "contract:checked_app()", "run", "--port", "0"],
            cwd=ROOT,
            env={**environment(database_url), "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while not (listening := re.search(r"Running on http://(127\.0\.0\.1:\d+)", log.read_text())):
            assert server.poll() is None and time.monotonic() < deadline, f"flask run did not start:\n{log.read_text()}"
            time.sleep(0.05)
        yield listening[1]
    finally:
        server.terminate()
        server.wait(timeout=10)
