"""What the README shows is what happens: every command of its console blocks (the seed, the
curl walkthrough, the CLI), run in order in one bash against `flask run` on a new database
as a reader types them, prints exactly the text the README shows under it (tokens and the
database's path masked: they differ on every machine). Its client is examples/client.py,
whole, and its links lead somewhere."""

import os
import queue
import re
import secrets
import shlex
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from readers import ROOT, TOKEN, environment, flask_run

README = (ROOT / "README.md").read_text()
DATABASE_PATH = re.compile(r"(?<=^Initialized an empty database at ).*$", re.MULTILINE)


def console_blocks(text: str) -> list[str]:
    return re.findall(r"^```console\n(.*?)^```", text, re.DOTALL | re.MULTILINE)


def commands_and_outputs(block: str) -> list[tuple[str, str]]:
    """(command, the output the README shows for it): a command runs on from its `$ ` line
    while a quote is open; its output is every line up to the next command. Blank lines
    only space the commands out (no output shown has one)."""
    found: list[tuple[str, list[str]]] = []
    lines = iter(block.splitlines())
    for line in lines:
        if line.startswith("$ "):
            command = line[2:]
            while not complete(command):
                command += "\n" + next(lines)
            found.append((command, []))
        elif line:
            assert found, f"output before any command: {line!r}"
            found[-1][1].append(line)
    return [(command, "".join(f"{line}\n" for line in output)) for command, output in found]


def complete(command: str) -> bool:
    try:
        shlex.split(command, comments=True)
    except ValueError:  # "No closing quotation"
        return False
    return True


def masked(text: str) -> str:
    return DATABASE_PATH.sub("<database>", TOKEN.sub("<token>", text))


class Shell:
    """One bash, as the reader's terminal: variables and background jobs last from one command to the next."""

    def __init__(self, directory: Path, env: dict[str, str]):
        self.process = subprocess.Popen(
            ["bash", "--noprofile", "--norc"], cwd=directory, env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self.read, daemon=True).start()

    def read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def run(self, command: str, timeout: float = 60) -> tuple[str, int]:
        """What the command printed (stdout and stderr, as a terminal shows them), and its exit status."""
        marker = f"@@{secrets.token_hex(8)}"
        # The marker starts a line of its own even after output without a final newline, which then shows.
        self.process.stdin.write(f"{command}\nprintf '\\n{marker} %s\\n' $?\n")
        self.process.stdin.flush()
        printed = ""
        while (line := self.lines.get(timeout=timeout)) is not None:
            if line.startswith(marker):
                return printed.removesuffix("\n"), int(line.split()[1])
            printed += line
        raise AssertionError(f"bash ended during {command!r}; it printed {printed!r}")

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=10)


def test_the_quick_start_is_two_commands():
    [block] = re.findall(r"## Quick start\n.*?```sh\n(.*?)```", README, re.DOTALL)
    commands = [line.split("  #")[0].strip() for line in block.splitlines()]
    assert commands == ["pip install -r requirements.txt && flask --app app run", "pip install -r requirements-dev.txt && python -m pytest"]
    assert "TEST_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/test python -m pytest" in README
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == commands[1]  # CI runs exactly the README's test command


def test_the_readme_is_read_in_fifteen_minutes():
    assert len(README.encode()) <= 15_000  # the rest is in docs/, which the README links


def test_every_command_prints_what_the_readme_shows(database_url, tmp_path):
    if shutil.which("curl") is None:
        reason = "curl is not installed: the README's walkthrough is curl commands"
        if os.environ.get("LOCO_REQUIRE_TOOLS") == "1":
            pytest.fail(f"{reason} (LOCO_REQUIRE_TOOLS=1)")
        pytest.skip(reason)
    steps = [step for block in console_blocks(README) for step in commands_and_outputs(block)]
    shown = " ".join(command for command, _ in steps)
    for command in ["flask --app app seed", "curl", "create-user", "add-member", "remove-member", "init-db", "wait=25"]:
        assert command in shown, f"the README's console blocks no longer show {command!r}"
    tokens: dict[str, str] = {}  # a token the README shows -> the one this run printed in its place
    with flask_run(database_url, tmp_path) as address:
        shell = Shell(tmp_path, environment(database_url))
        try:
            for command, output in steps:
                for readme_token, token in tokens.items():
                    command = command.replace(readme_token, token)
                printed, status = shell.run(command.replace("localhost:5000", address))
                assert status == 0, (command, printed)
                assert masked(printed) == masked(output), command
                for readme_token, token in zip(TOKEN.findall(output), TOKEN.findall(printed)):
                    tokens.setdefault(readme_token, token)
        finally:
            shell.close()


def test_the_readme_shows_the_example_client_whole():
    assert f"```python\n{(ROOT / 'examples' / 'client.py').read_text()}```\n" in README


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))])
def test_every_link_leads_somewhere(page):
    text = (ROOT / page).read_text()
    text = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"https?://", target):
            continue
        path, _, fragment = target.partition("#")
        linked = (ROOT / page).parent / path if path else ROOT / page
        assert linked.exists(), f"{page} links to {target}, which does not exist"
        if fragment:
            headings = re.findall(r"^#+ (.*)$", linked.read_text(), re.MULTILINE)
            assert fragment in {anchor(h) for h in headings}, f"{page} links to {target}: no such heading"
