"""What the README shows is what the server does: its seed output and its curl
walkthrough, run as a reader would (`flask --app app seed`, `flask run`, the
very curl commands in one bash), every answer compared with the README's as
JSON text, every value in its type."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import wire

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
TOKEN = re.compile(r"(?<![\w.-])[1-9][0-9]*\.[A-Za-z0-9_-]{43}(?![\w-])")


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end]


def console_blocks(text: str) -> list[str]:
    return re.findall(r"```console\n(.*?)```", text, re.DOTALL)


def commands_and_answers(block: str) -> list[tuple[str, str]]:
    """(command, the output the README shows for it): a command runs on from its `$ ` line
    while a quote is open; its output is what follows, up to the next command or blank line."""
    found: list[tuple[str, list[str]]] = []
    lines = iter(block.splitlines())
    for line in lines:
        if line.startswith("$ "):
            command = line[2:]
            while not complete(command):
                command += "\n" + next(lines)
            found.append((command, []))
        elif line.strip() and found:
            found[-1][1].append(line)
    return [(command, "\n".join(output)) for command, output in found]


def complete(command: str) -> bool:
    try:
        shlex.split(command, comments=True)
    except ValueError:  # "No closing quotation"
        return False
    return True


@pytest.fixture
def readers_server(database_url, tmp_path):
    """`flask --app app seed`, then `flask run` on a new database, as the README says; the server
    is the README's app with the tests' check of every response (tests/contract.py)."""
    environment = {**os.environ, "DATABASE_URL": database_url}
    seeded = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", "seed"], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=60
    )
    assert seeded.returncode == 0, seeded.stderr
    log = tmp_path / "flask-run.log"
    with open(log, "w") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "flask", "--app", "contract:checked_app()", "run", "--port", "0"],
            cwd=ROOT,
            env={**environment, "PYTHONPATH": str(ROOT / "tests")},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while not (listening := re.search(r"Running on http://(127\.0\.0\.1:\d+)", log.read_text())):
            assert server.poll() is None and time.monotonic() < deadline, f"flask run did not start:\n{log.read_text()}"
            time.sleep(0.05)
        yield seeded.stdout, listening[1], tmp_path
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_seed_prints_what_the_quick_start_shows(readers_server):
    printed, address, _ = readers_server
    [block] = [b for b in console_blocks(section("Quick start")) if b.startswith("$ flask --app app seed")]
    [(_, shown)] = commands_and_answers(block)
    assert TOKEN.sub("<token>", printed.strip()) == TOKEN.sub("<token>", shown.strip())


def test_the_curl_walkthrough_answers_exactly_as_shown(readers_server):
    if shutil.which("curl") is None:
        reason = "curl is not installed: the README's walkthrough is curl commands"
        if os.environ.get("LOCO_REQUIRE_TOOLS") == "1":
            pytest.fail(f"{reason} (LOCO_REQUIRE_TOOLS=1)")
        pytest.skip(reason)
    printed, address, directory = readers_server
    walkthrough = section("A walk through the protocol with curl")
    # The reader keeps the tokens seed printed, as the README's first block does with its own.
    tokens = dict(re.findall(r"^  (Ada|Grace) .* (\S+)$", printed, re.MULTILINE))
    assert re.search(r"^ADA='Authorization: Bearer \S+'\nGRACE='Authorization: Bearer \S+'$", walkthrough, re.MULTILINE)
    steps = [step for block in console_blocks(walkthrough) for step in commands_and_answers(block)]
    assert len(steps) >= 14
    # One bash runs them all in turn, as a reader types them; a marker before each splits the output.
    script = [f"ADA='Authorization: Bearer {tokens['Ada']}'", f"GRACE='Authorization: Bearer {tokens['Grace']}'"]
    for n, (command, _) in enumerate(steps):
        script += [f"echo '@@ {n}'", command.replace("localhost:5000", address)]
    ran = subprocess.run(["bash", "-c", "\n".join(script)], cwd=directory, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    answers = re.split(r"^@@ \d+\n", ran.stdout, flags=re.MULTILINE)[1:]
    assert len(answers) == len(steps)
    for (command, shown), answer in zip(steps, answers):
        if not shown:
            assert answer == "", (command, answer)
            continue
        assert answer.endswith("}\n"), (command, answer)
        assert wire(json.loads(answer)) == wire(json.loads(shown)), command
