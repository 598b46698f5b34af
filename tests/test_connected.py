"""Connected clients: a held poll costs a connection, not a thread. Under the
production settings (gunicorn.conf.py's gevent worker) many held polls never
delay a mutation; a commit wakes only the polls of its sync groups, answered
from one read per process; a membership change ends its user's held poll
with the new groups, on every server; a client that leaves frees its poll, and a
slow one holds only its own connection; a shutdown answers thousands at once. (How fast, at 10,000 clients, is
bench/connected.py's row, measured and not asserted.)"""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import socket
import time

import pytest

import app as protocol
from app import create_app
from helpers import group, mutate, shut_down, sign_in, todo, wire
from servers import Api, Gunicorn


class HeldPolls:
    """`count` clients, each on a connection of its own, holding GET /sync?since=...&wait=..."""

    def __init__(self, url: str, token: str, since: int, count: int, wait: int = 30):
        host, port = url.removeprefix("http://").split(":")
        request = f"GET /sync?since={since}&wait={wait} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\r\n"
        self.sockets = []
        for _ in range(count):
            client = socket.create_connection((host, int(port)), timeout=30)
            client.sendall(request.encode())
            self.sockets.append(client)

    def answers(self, timeout: float) -> list[dict | None]:
        """Each connection's answer body, or None for those not answered within `timeout`."""
        received = {client: b"" for client in self.sockets}
        bodies: dict[socket.socket, dict] = {}
        selector = selectors.DefaultSelector()
        for client in self.sockets:
            client.setblocking(False)
            selector.register(client, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while len(bodies) < len(self.sockets) and time.monotonic() < deadline:
            for key, _ in selector.select(max(0.0, deadline - time.monotonic())):
                chunk = key.fileobj.recv(65536)
                received[key.fileobj] += chunk
                head, _, body = received[key.fileobj].partition(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                if length and len(body) >= int(length[1]):
                    bodies[key.fileobj] = json.loads(body)
                    selector.unregister(key.fileobj)
                elif not chunk:
                    raise AssertionError(f"the server closed a held poll without an answer: {received[key.fileobj][:200]!r}")
        selector.close()
        return [bodies.get(client) for client in self.sockets]

    def close(self) -> None:
        for client in self.sockets:
            client.close()


@pytest.fixture
def production(database_url, tmp_path):
    """Two servers run with the documented command, every setting from gunicorn.conf.py, on one
    database; Ada (all, g1, g2) and Grace (all, g2) with their tokens."""
    app = create_app({"SQLALCHEMY_DATABASE_URI": database_url})
    ada = sign_in(app, "Ada")
    mutate(ada, group("g1"), group("g2"), {"action": "create", "modelName": "Author", "modelId": "a1", "data": {"id": "a1", "name": "Ada"}})
    grace = sign_in(app, "Grace", "group:g2")
    shut_down(app)
    servers = [
        Gunicorn(database_url, tmp_path / f"gunicorn-{n}.log", workers=2 * os.cpu_count(), app="app:create_app()", flags=False)
        for n in (1, 2)
    ]
    try:
        for server in servers:
            server.start()
        yield servers, ada.token, grace.token
    finally:
        for server in servers:
            server.stop()


def head_of(server: Gunicorn, token: str) -> int:
    status, _, answer = Api(server, token).request("GET", "/sync")
    assert status == 200
    return answer["lastSyncId"]


def test_held_polls_far_beyond_the_old_thread_count_never_delay_a_mutation(production):
    (server, other_server), ada, _ = production
    since = head_of(server, ada)
    polls = HeldPolls(server.url, ada, since, 300)  # the threaded workers of before (4 x 4 threads) held 16
    writer = Api(other_server, ada)  # a commit through another app server wakes them too
    answered = []
    for n in range(5):
        status, _, answer = writer.request("POST", "/mutate", {"changes": [todo(f"t{n}", "g1")]})
        assert status == 200
        answered.append(answer["lastSyncId"])
    # The first mutation woke all 300; each answer carries it, and only it, as the first action.
    bodies = polls.answers(timeout=20)
    polls.close()
    assert all(body is not None for body in bodies), f"{bodies.count(None)} of 300 held polls were not woken; answered {answered}"
    assert {wire(body["sync"][0]["syncId"]) for body in bodies} == {wire(answered[0])}
    for body in bodies:  # in order, from the first, none skipped
        assert wire([action["syncId"] for action in body["sync"]]) == wire(answered[: len(body["sync"])]), (body, answered)


def test_slow_senders_hold_only_their_own_connections(production):
    (server, _), ada, _ = production
    host, port = server.url.removeprefix("http://").split(":")
    # 64 clients that send their request a header line at a time (under the threaded worker they held every thread)
    slow = [socket.create_connection((host, int(port)), timeout=30) for _ in range(64)]
    for client in slow:
        client.sendall(b"GET /sync HTTP/1.1\r\nHost: x\r\n")
    others = Api(server, ada)

    answered = []
    for n in range(8):
        for client in slow:
            client.sendall(f"X-Slow-{n}: still sending\r\n".encode())
        status, _, answer = others.request("POST", "/mutate", {"changes": [todo(f"t{n}", "g1")]})
        answered.append((status, others.request("GET", "/sync")[0]))
        time.sleep(0.1)

    # Every other request was answered while all 64 slow requests were still unfinished...
    assert answered == [(200, 200)] * 8
    for client in slow:
        client.setblocking(False)
        with pytest.raises(BlockingIOError):
            client.recv(1)  # no answer yet, and not closed
        client.setblocking(True)
    # ...and each slow one is served once it is complete.
    for client in slow:
        client.sendall(f"Authorization: Bearer {ada}\r\nConnection: close\r\n\r\n".encode())
    for client in slow:
        assert client.makefile("rb").readline().startswith(b"HTTP/1.1 200")
        client.close()
    others.close()


def test_a_commit_wakes_only_the_polls_of_its_groups_from_one_read(app, seeded, base_url, monkeypatch):
    grace = sign_in(app, "Grace", "group:g2")
    since = seeded.get("/sync").get_json()["lastSyncId"]
    page_reads = []
    real_read_page = protocol.read_page
    monkeypatch.setattr(protocol, "read_page", lambda *args: page_reads.append(args) or real_read_page(*args))
    in_g1 = HeldPolls(base_url, seeded.token, since, 10)  # Ada: all, g1, g2
    in_g2_only = HeldPolls(base_url, grace.token, since, 10)  # Grace: all, g2
    held = app.extensions["held_polls"]
    deadline = time.monotonic() + 10
    while held.count < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert held.count == 20
    reads_before, page_reads_before = held.page_reads, len(page_reads)

    last_sync_id = mutate(seeded, todo("t9", "g1"))["lastSyncId"]

    woken = in_g1.answers(timeout=10)
    assert all(body is not None and wire(body["sync"][0]["syncId"]) == wire(last_sync_id) for body in woken)
    assert in_g2_only.answers(timeout=0.5) == [None] * 10  # g1's action does not concern them: still held
    assert held.count == 10
    # One read of the new actions answered all ten; no poll read its own page.
    assert held.page_reads - reads_before <= 2 and len(page_reads) == page_reads_before
    in_g1.close()
    in_g2_only.close()


def test_a_poll_held_through_reads_that_do_not_concern_it_is_answered_by_the_first_that_does(production):
    (server, other_server), ada, grace = production
    since = head_of(server, grace)
    polls = HeldPolls(server.url, grace, since, 3)  # Grace: all, g2
    writer = Api(other_server, ada)
    hidden = [writer.request("POST", "/mutate", {"changes": [todo(f"t{n}", "g1")]})[2]["lastSyncId"] for n in range(3)]
    assert polls.answers(timeout=0.5) == [None] * 3  # read, and none of it hers: still held

    status, _, answer = writer.request("POST", "/mutate", {"changes": [todo("t9", "g2")]})

    assert status == 200 and hidden[-1] < answer["lastSyncId"]
    for body in polls.answers(timeout=10):
        assert body is not None, "the poll was not woken by an action it may see"
        assert wire([action["syncId"] for action in body["sync"]]) == wire([answer["lastSyncId"]])
        assert wire(body["lastSyncId"]) == wire(answer["lastSyncId"])
    polls.close()


def test_a_membership_change_ends_its_users_held_poll_on_every_server_with_the_new_groups(database_url, tmp_path, runner):
    app = runner.app
    ada = sign_in(app, "Ada")
    mutate(ada, group("g1"), group("g2"))
    grace = sign_in(app, "Grace")
    since = grace.get("/sync").get_json()["lastSyncId"]
    servers = [Gunicorn(database_url, tmp_path / f"gunicorn-{n}.log", workers=2, app="app:create_app()") for n in (1, 2)]
    try:
        for server in servers:
            server.start()
        polls = [HeldPolls(server.url, grace.token, since, 3) for server in servers]
        bystander = HeldPolls(servers[0].url, ada.token, since, 3)
        time.sleep(0.5)
        assert all(answer is None for answer in polls[0].answers(timeout=0.2))  # held

        # As from a shell: the command runs outside both servers (here, in the tests' process).
        result = runner.invoke(args=["add-member", str(grace_id(app, grace.token)), "g1"])
        assert result.exit_code == 0, result.output

        for server_polls in polls:
            for body in server_polls.answers(timeout=10):
                assert body is not None, "a held poll of the user was not ended"
                assert wire(body) == wire({"sync": [], "lastSyncId": since, "syncGroups": ["all", "group:g1"], "hasMore": False})
        assert bystander.answers(timeout=0.5) == [None] * 3  # another user's polls stay held
        for held in [*polls, bystander]:
            held.close()
    finally:
        for server in servers:
            server.stop()


def grace_id(app, token: str) -> int:
    return int(token.split(".")[0])


def worker_pids(server: Gunicorn) -> list[int]:
    pid = server.process.pid
    with open(f"/proc/{pid}/task/{pid}/children") as listing:
        return [int(child) for child in listing.read().split()]


def server_sockets(port: int) -> list[tuple[str, int]]:
    """The server's side of each TCP connection to 127.0.0.1:port: its state (01 established,
    08 close-wait) and the bytes received that the server has not read (/proc/net/tcp)."""
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return [(row[3], int(row[4].split(":")[1], 16)) for row in rows if row[1].endswith(f":{port:04X}")]


def connections_to(port: int, state: str) -> int:
    return sum(1 for each, _ in server_sockets(port) if each == state)


def settled(server: Gunicorn, count: int, timeout: float = 60) -> None:
    """Wait until the server has read every request of `count` connections, then for its workers to go idle."""
    port, deadline = int(server.url.rsplit(":", 1)[1]), time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = server_sockets(port)
        # Accepted or waiting in the listen backlog, each with the bytes the app has not read yet.
        if sum(state == "01" for state, _ in rows) >= count and not any(unread for state, unread in rows if state == "01"):
            break
        time.sleep(0.1)
    ticks = -1
    while time.monotonic() < deadline:
        now = 0
        for pid in worker_pids(server):
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            now += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
        if now == ticks:
            return
        ticks = now
        time.sleep(0.25)
    raise AssertionError(f"the server was still busy after {timeout} s")


def test_a_client_that_leaves_frees_its_held_poll(production):
    (server, _), ada, _ = production
    port = int(server.url.rsplit(":", 1)[1])
    polls = HeldPolls(server.url, ada, head_of(server, ada), 50)
    time.sleep(0.5)
    assert connections_to(port, "01") >= 50

    polls.close()  # the clients go away; their polls would otherwise be held for 30 s

    deadline = time.monotonic() + 10
    while connections_to(port, "08") and time.monotonic() < deadline:
        time.sleep(0.05)
    # The server closed its side of each: nothing of the poll is left waiting.
    assert connections_to(port, "08") == 0
    assert time.monotonic() < deadline


def test_a_shutdown_with_thousands_of_held_polls_answers_them_at_once(production):
    (server, _), ada, _ = production
    status, _, handshake = Api(server, ada).request("GET", "/sync")
    since = handshake["lastSyncId"]
    polls = HeldPolls(server.url, ada, since, 2000)
    settled(server, 2000)  # every poll read and held: a connection not yet accepted would be closed unanswered

    started = time.monotonic()
    os.killpg(server.process.pid, signal.SIGTERM)
    bodies = polls.answers(timeout=20)
    server.process.wait(timeout=20)
    polls.close()

    assert time.monotonic() - started < 15, "the shutdown waited for the held polls"
    assert bodies.count(None) == 0, f"{bodies.count(None)} of 2000 held polls were not answered"
    assert {wire(body) for body in bodies} == {wire({"sync": [], "lastSyncId": since, "syncGroups": handshake["syncGroups"], "hasMore": False})}
