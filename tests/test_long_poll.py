"""Long polls: GET /sync?since=N&wait=S holds an empty answer until an action
the caller may see arrives, or S seconds pass. Held polls are woken by
writers of any process, cost no CPU while they wait, and do not delay a
shutdown. (How fast they wake is measured by bench/, not asserted here.)"""

import os
import signal
import sqlite3
import threading
import time
from types import SimpleNamespace

import pytest

from app import create_app
from helpers import assert_error, database_path, group, mutate, read_log, sign_in, todo, update, wire
from models import db
from servers import Api, Gunicorn


def poll_in_background(url: str, token: str, query: str) -> dict:
    """Send a poll from another thread; the dict fills in with its answer and how long it took."""
    result = {}

    def run():
        started = time.monotonic()
        api = Api(SimpleNamespace(url=url), token)
        result["status"], _, result["body"] = api.request("GET", f"/sync?{query}")
        result["seconds"] = time.monotonic() - started
        api.close()

    result["thread"] = threading.Thread(target=run, daemon=True)
    result["thread"].start()
    return result


def finished(poll: dict, timeout: float) -> dict:
    poll["thread"].join(timeout)
    assert not poll["thread"].is_alive(), "the poll is still held"
    return poll


def head(client) -> int:
    return client.get("/sync").get_json()["lastSyncId"]


def test_a_poll_with_nothing_new_is_held_until_an_action_arrives(seeded, base_url):
    since = head(seeded)
    poll = poll_in_background(base_url, seeded.token, f"since={since}&wait=20")
    time.sleep(0.3)
    assert poll["thread"].is_alive()

    last_sync_id = mutate(seeded, todo("t2", "g1"))["lastSyncId"]

    finished(poll, 10)
    assert poll["status"] == 200
    assert wire([a["syncId"] for a in poll["body"]["sync"]]) == wire([last_sync_id])
    assert wire(poll["body"]["lastSyncId"]) == wire(last_sync_id) and poll["body"]["hasMore"] is False
    assert 0.3 <= poll["seconds"] < 10


def test_a_poll_with_something_to_read_is_answered_at_once(seeded):
    started = time.monotonic()
    body = seeded.get("/sync?since=0&wait=20").get_json()

    assert len(body["sync"]) == 5 and wire(body["lastSyncId"]) == wire(5)
    assert time.monotonic() - started < 10


def test_a_poll_that_nothing_reaches_ends_with_an_empty_page_when_its_wait_ends(seeded):
    started = time.monotonic()
    body = seeded.get("/sync?since=5&wait=0.5").get_json()

    assert time.monotonic() - started >= 0.5
    assert wire(body) == wire({"sync": [], "lastSyncId": 5, "syncGroups": ["all", "group:g1", "group:g2"], "hasMore": False})


def test_actions_the_caller_cannot_see_do_not_end_its_wait_but_its_cursor_moves_past_them(app, seeded, base_url):
    grace = sign_in(app, "Grace", "group:g1")
    poll = poll_in_background(base_url, grace.token, "since=5&wait=1")
    time.sleep(0.2)

    hidden = mutate(seeded, todo("t2", "g2"))["lastSyncId"]  # only in group:g2

    finished(poll, 10)
    assert poll["body"]["sync"] == [] and wire(poll["body"]["lastSyncId"]) == wire(hidden)
    assert poll["seconds"] >= 1


@pytest.mark.sqlite_only("checkpoints SQLite's write-ahead log")
def test_a_held_poll_holds_no_snapshot_so_the_log_can_be_checkpointed(seeded, app, base_url):
    poll = poll_in_background(base_url, seeded.token, f"since={head(seeded)}&wait=3")
    time.sleep(0.3)

    # A read transaction left open would keep part of the WAL: busy would be 1.
    with sqlite3.connect(database_path(app)) as connection:
        busy, _, _ = connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    assert busy == 0 and poll["thread"].is_alive()
    finished(poll, 10)


def test_a_poll_held_across_init_db_does_not_continue_into_the_new_database(seeded, base_url, runner):
    old_head = head(seeded)
    poll = poll_in_background(base_url, seeded.token, f"since={old_head}&wait=10")
    time.sleep(0.3)

    assert runner.invoke(args=["init-db"]).exit_code == 0
    assert runner.invoke(args=["seed"]).exit_code == 0  # user 1, the poller's id, exists again with a new token

    finished(poll, 10)
    # Checked again on waking, as for any new request: the old token is unknown to the new database.
    assert poll["status"] == 401 and poll["body"]["error"]["code"] == "unauthorized"


def test_a_shutdown_between_a_read_and_its_wake_up_keeps_the_answer_the_read_gave(app, seeded, base_url, monkeypatch):
    held = app.extensions["held_polls"]
    since = head(seeded)
    poll = poll_in_background(base_url, seeded.token, f"since={since}&wait=20")
    deadline = time.monotonic() + 10
    while held.count < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    real_dispatch = held.dispatch

    class StopFirst(list):  # the server stops after the read answered the poll, before the poll is told
        def __getitem__(self, index):
            held.close()
            return list.__getitem__(self, index)

    monkeypatch.setattr(held, "dispatch", lambda *args: StopFirst(real_dispatch(*args)))

    last_sync_id = mutate(seeded, todo("t2", "g1"))["lastSyncId"]

    finished(poll, 10)
    # Its answer carries the action; a shutdown must not turn it into an empty page past it.
    assert wire([a["syncId"] for a in poll["body"]["sync"]]) == wire([last_sync_id])
    assert wire(poll["body"]["lastSyncId"]) == wire(last_sync_id)


def test_a_poll_whose_page_fills_with_actions_it_may_not_see_is_answered_over_several_reads(app, seeded, base_url):
    held = app.extensions["held_polls"]
    grace = sign_in(app, "Grace", "group:g2")
    since = head(seeded)
    poll = poll_in_background(base_url, grace.token, f"since={since}&wait=20&limit=5")
    while held.count < 1:
        time.sleep(0.01)
    for n in range(5):  # one read each: none of them hers, none filling her page of 5 syncIds
        reads = held.page_reads
        mutate(seeded, todo(f"t{n + 2}", "g1"))
        while held.page_reads == reads:
            time.sleep(0.01)
    assert poll["thread"].is_alive()

    mutate(seeded, todo("t9", "g2"))  # hers, past her page: the read that brings it starts after it

    finished(poll, 10)
    assert wire(poll["body"]) == wire({"sync": [], "lastSyncId": since + 5, "syncGroups": ["all", "group:g2"], "hasMore": True})


def test_a_held_polls_answer_stops_at_max_page_bytes_and_says_there_is_more(app, seeded, base_url):
    app.config["MAX_PAGE_BYTES"] = 10_000
    held, since = app.extensions["held_polls"], head(seeded)
    poll = poll_in_background(base_url, seeded.token, f"since={since}&wait=20")
    while held.count < 1:
        time.sleep(0.01)

    big = [todo(f"t{n}", "g1", text="x" * 3_000) for n in range(10, 20)]  # about 3.2 KB each
    last_sync_id = mutate(seeded, *big)["lastSyncId"]

    answer = finished(poll, 10)["body"]
    assert [a["modelId"] for a in answer["sync"]] == ["t10", "t11", "t12", "t13"]  # the fourth starts under the limit
    assert wire(answer["lastSyncId"]) == wire(since + 4) and wire(answer["hasMore"]) == "true"
    rest = seeded.get(f"/sync?since={answer['lastSyncId']}&wait=1").get_json()
    assert wire([a["syncId"] for a in rest["sync"]]) == wire(list(range(since + 5, since + 9)))
    assert wire(rest["lastSyncId"]) == wire(since + 8) and last_sync_id == since + 10


def test_a_wait_that_ends_after_a_read_cut_by_bytes_says_there_is_more(app, seeded, base_url, monkeypatch):
    app.config["MAX_PAGE_BYTES"] = 10_000
    held, since = app.extensions["held_polls"], head(seeded)
    grace = sign_in(app, "Grace", "group:g2")
    poll = poll_in_background(base_url, grace.token, f"since={since}&wait=2")
    while held.count < 1:
        time.sleep(0.01)
    monkeypatch.setattr(held, "read_again", lambda: None)  # the wait ends before the reader goes on

    mutate(seeded, *(todo(f"t{n}", "g1", text="x" * 3_000) for n in range(10, 30)))  # not hers; read 4 at a time

    answer = finished(poll, 10)["body"]
    assert answer["sync"] == [] and since < answer["lastSyncId"] < since + 20
    assert wire(answer["hasMore"]) == "true"


def test_polls_answered_with_the_same_actions_share_one_answer_not_a_copy_each(app, seeded, base_url, monkeypatch):
    """A 1 MB write to `all` with 1,000 polls held made a worker grow by 1 GB, one copy per poll."""
    held, since, answers = app.extensions["held_polls"], head(seeded), []
    dispatch = held.dispatch
    monkeypatch.setattr(held, "dispatch", lambda *args: [answers.append(poll.answer) or poll for poll in dispatch(*args)])
    polls = [poll_in_background(base_url, seeded.token, f"since={since}&wait=20") for _ in range(8)]
    while held.count < 8:
        time.sleep(0.01)

    names = [update("Author", "a1", name="x" * 30_000), update("Author", "a1", name="y" * 30_000), update("Author", "a1", name="Ada")]
    mutate(seeded, *names)  # in `all`: every poll's; over 64 KB, so sent as it is

    bodies = [finished(poll, 10)["body"] for poll in polls]
    assert len(answers) == 8 and len({id(answer["sync"]) for answer in answers}) == 1
    assert wire(bodies) == wire([{"sync": read_log(seeded, since), "lastSyncId": since + 3, "syncGroups": ["all", "group:g1", "group:g2"],
                                  "hasMore": False}] * 8)


def test_a_reader_that_the_database_fails_starts_again(app, seeded, base_url, monkeypatch):
    held = app.extensions["held_polls"]
    since = head(seeded)
    poll = poll_in_background(base_url, seeded.token, f"since={since}&wait=20")
    while held.count < 1:
        time.sleep(0.01)
    real_read, failures = held.read, []

    def fails_once(*args):
        if not failures:
            failures.append(args)
            raise sqlite3.OperationalError("disk I/O error")  # as a restarted database or a full disk would
        return real_read(*args)

    monkeypatch.setattr(held, "read", fails_once)

    last_sync_id = mutate(seeded, todo("t2", "g1"))["lastSyncId"]

    finished(poll, 10)
    assert failures and wire([a["syncId"] for a in poll["body"]["sync"]]) == wire([last_sync_id])


def test_a_revoked_token_ends_its_held_polls_at_once(app, seeded, base_url, runner):
    grace = sign_in(app, "Grace", "group:g2")
    poll = poll_in_background(base_url, grace.token, f"since={head(seeded)}&wait=20")
    time.sleep(0.3)
    assert poll["thread"].is_alive()

    assert runner.invoke(args=["revoke-token", grace.token.split(".")[0]]).exit_code == 0

    finished(poll, 10)  # not at the end of its wait
    assert poll["status"] == 401 and poll["body"]["error"]["code"] == "unauthorized"


def test_a_poll_without_wait_is_never_held(seeded):
    started = time.monotonic()
    assert seeded.get("/sync?since=5").get_json()["sync"] == []
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    "query, field",
    [("wait=5", "wait"), ("since=5&wait=31", "wait"), ("since=5&wait=-1", "wait"), ("since=5&wait=1e1", "wait"),
     ("since=5&wait=abc", "wait"), ("since=5&wait=", "wait"), ("since=1&until=5&wait=5", "wait")],
)
def test_wait_is_a_number_of_seconds_up_to_30_and_only_for_polls_to_the_head(seeded, query, field):
    error = assert_error(seeded.get(f"/sync?{query}"), 400, "invalid_request")
    assert field in error["details"]


# --- Across processes, under gunicorn -------------------------------------------


@pytest.fixture
def two_servers(database_url, tmp_path):
    """Two gunicorn servers with one worker each, on one database: a writer of one, a poller of the other."""
    url = database_url
    app = create_app({"SQLALCHEMY_DATABASE_URI": url})
    ada = sign_in(app, "Ada")
    mutate(ada, group("g1"))
    mutate(ada, {"action": "create", "modelName": "Author", "modelId": "a1", "data": {"id": "a1", "name": "Ada"}})
    with app.app_context():
        db.engine.dispose()
    servers = [Gunicorn(url, tmp_path / f"gunicorn-{n}.log", workers=1) for n in (1, 2)]
    try:
        for server in servers:
            server.start()
        yield servers, ada.token
    finally:  # before the database is dropped
        for server in servers:
            server.stop()


def test_a_writer_in_another_process_wakes_a_held_poll(two_servers):
    (poller_server, writer_server), token = two_servers
    writer = Api(writer_server, token)
    since = writer.request("GET", "/sync")[2]["lastSyncId"]
    poll = poll_in_background(poller_server.url, token, f"since={since}&wait=25")
    time.sleep(0.5)
    assert poll["thread"].is_alive()

    status, _, answer = writer.request("POST", "/mutate", {"changes": [todo("t1", "g1")]})

    assert status == 200
    finished(poll, 15)  # well within the wait: woken, not timed out
    assert wire([a["syncId"] for a in poll["body"]["sync"]]) == wire([answer["lastSyncId"]])


def test_held_polls_do_not_burn_cpu_while_they_wait(two_servers):
    (server, _), token = two_servers
    since = Api(server, token).request("GET", "/sync")[2]["lastSyncId"]
    worker = worker_pid(server)
    polls = [poll_in_background(server.url, token, f"since={since}&wait=3") for _ in range(6)]
    time.sleep(0.5)

    before, started = cpu_seconds(worker), time.monotonic()
    time.sleep(2)
    used, elapsed = cpu_seconds(worker) - before, time.monotonic() - started

    for poll in polls:
        finished(poll, 10)
    # A loop that spins while polls are held would use about `elapsed` seconds of CPU.
    assert used < 0.25 * elapsed, f"the worker used {used:.2f} s of CPU in {elapsed:.2f} s"


def test_a_shutting_down_server_answers_its_held_polls_at_once(two_servers):
    (server, _), token = two_servers
    since = Api(server, token).request("GET", "/sync")[2]["lastSyncId"]
    polls = [poll_in_background(server.url, token, f"since={since}&wait=30") for _ in range(4)]
    time.sleep(0.5)

    started = time.monotonic()
    os.killpg(server.process.pid, signal.SIGTERM)
    server.process.wait(timeout=20)

    assert time.monotonic() - started < 10, "shutdown waited for the held polls"
    for poll in polls:
        finished(poll, 5)
        assert poll["status"] == 200 and poll["body"]["sync"] == [] and wire(poll["body"]["lastSyncId"]) == wire(since)


def worker_pid(server: Gunicorn) -> int:
    pid = server.process.pid
    with open(f"/proc/{pid}/task/{pid}/children") as listing:
        children = listing.read().split()
    assert len(children) == 1, children
    return int(children[0])


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
