"""The production command, as docs/production.md gives it: `gunicorn 'app:create_app()'`
from the project root, every setting in gunicorn.conf.py."""

import multiprocessing
import re
import socket
import time
from pathlib import Path

import pytest

from app import create_app
from helpers import shut_down, sign_in, wire
from servers import Api, Gunicorn

ROOT = Path(__file__).resolve().parent.parent
PRODUCTION = (ROOT / "docs" / "production.md").read_text()


@pytest.fixture
def documented_server(database_url, tmp_path):
    """The command of docs/production.md, bound to a free port (GUNICORN_CMD_ARGS), and a signed-in user's token."""
    [command] = re.findall(r"## Under gunicorn\n.*?```sh\n(.*?)\n```", PRODUCTION, re.DOTALL)
    assert command == "gunicorn 'app:create_app()'"
    app = create_app({"SQLALCHEMY_DATABASE_URI": database_url})
    token = sign_in(app, "Ada").token
    shut_down(app)
    server = Gunicorn(database_url, tmp_path / "gunicorn.log", workers=2 * multiprocessing.cpu_count(), app="app:create_app()", flags=False)
    server.start()
    yield server, token
    server.stop()


def test_the_documented_command_takes_its_settings_from_gunicorn_conf(documented_server, tmp_path):
    server, token = documented_server
    log = (tmp_path / "gunicorn.log").read_text()
    assert "Using worker: gevent" in log
    assert log.count("Booting worker") == 2 * multiprocessing.cpu_count()
    status, _, answer = Api(server, token).request("GET", "/sync")
    assert status == 200 and wire(answer["syncGroups"]) == wire(["all"])


def test_an_idle_connection_outlives_the_clients_idle_reuse(documented_server):
    """Browsers and Node reuse an idle connection for seconds: one idle for 5 s is still open."""
    server, token = documented_server
    host, port = server.url.removeprefix("http://").split(":")
    request = f"GET /sync HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        for _ in range(2):
            connection.sendall(request)
            answer = read_answer(connection)
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]
            assert b"connection: close" not in answer.lower()
            time.sleep(5)  # idle, as a client between requests


def read_answer(connection: socket.socket) -> bytes:
    """One answer read whole, by its Content-Length; the connection stays open for the next."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = connection.recv(65536)
        assert chunk, f"the server closed the connection: {received!r}"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])
    while len(body) < length:
        chunk = connection.recv(65536)
        assert chunk, "the server closed the connection mid-answer"
        body += chunk
    return head + b"\r\n\r\n" + body
