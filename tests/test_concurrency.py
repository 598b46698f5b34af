"""Through a real server on 127.0.0.1, writers and pollers of two users at
once: every poller sees each committed action it may see exactly once, in
order, and replaying the log from 0 reproduces the rows. And server
processes starting together on a new database all create it cleanly, and a
process starting beside busy ones does not get in their way."""

import json
import random
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from sqlalchemy import text

from app import create_app
from helpers import (
    action_groups,
    as_store,
    assert_log_holds_exactly,
    create,
    group,
    mutate,
    random_transaction,
    read_log_with,
    reader,
    replay,
    run_clients,
    shut_down,
    sign_in,
    wire,
)

WRITERS = 8  # half Ada (every group), half Grace (g1 only)
TRANSACTIONS_PER_WRITER = 25
POLLERS = 4  # likewise
GROUPS = ["g1", "g2", "g3"]
ROOT = Path(__file__).resolve().parent.parent


def call(base_url: str, token: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        base_url + path,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def send_until_acknowledged(base_url: str, token: str, body: dict) -> int:
    """Send a transaction as the Loco Sync client would: retry on 503 (type network)."""
    while True:
        status, answer = call(base_url, token, "/mutate", body)
        if status != 503:
            assert status == 200, answer
            return answer["lastSyncId"]
        assert answer["error"]["type"] == "network"


def test_concurrent_writers_and_pollers_see_every_visible_action_once_in_order(app, base_url, engine):
    ada = sign_in(app, "Ada").token
    setup = [create("Author", "a1", name="Ada"), *map(group, GROUPS)]
    status, answer = call(base_url, ada, "/mutate", {"changes": setup})
    assert status == 200
    grace = sign_in(app, "Grace", "group:g1")
    graces = [create("Author", "a2", name="Grace")]  # she writes by an Author of her own
    graces_transaction = (mutate(grace, *graces)["lastSyncId"], graces)
    users = [(ada, GROUPS, "a1"), (grace.token, ["g1"], "a2")]

    acknowledged: list[tuple[int, list[dict]]] = []
    seen: list[list[dict]] = [[] for _ in range(POLLERS)]

    def writer(number: int):
        (token, groups, author_id), rng, alive = users[number % 2], random.Random(number), []
        for transaction in range(TRANSACTIONS_PER_WRITER):
            changes = random_transaction(rng, number, transaction, groups, alive, author_id)
            body = {"changes": changes}
            if transaction % 3 == 0:
                body["transactionId"] = f"w{number}-{transaction}"
            last_sync_id = send_until_acknowledged(base_url, token, body)
            if "transactionId" in body:  # the response was "lost": the retry must change nothing
                assert wire(send_until_acknowledged(base_url, token, body)) == wire(last_sync_id)
            acknowledged.append((last_sync_id, changes))

    def poller(number: int, writers_done):
        token, rng, cursor = users[number % 2][0], random.Random(1000 + number), 0
        while True:
            finished = writers_done.is_set()  # read before polling, so the last poll is complete
            status, page = call(base_url, token, f"/sync?since={cursor}&limit={rng.randint(1, 50)}")
            assert status == 200, page
            assert page["lastSyncId"] >= cursor
            seen[number] += page["sync"]
            cursor = page["lastSyncId"]
            if not page["hasMore"]:
                if finished:
                    return
                time.sleep(0.01)  # a poll interval, as a client has

    run_clients(writer, WRITERS, poller, POLLERS)

    log = read_log_with(lambda path: call(base_url, ada, path)[1])  # Ada may see everything
    # Every acknowledged action, each once, in order, and nothing else (on SQLite: no hole either).
    assert_log_holds_exactly(log, [(answer["lastSyncId"], setup), graces_transaction, *acknowledged], engine)

    sync_groups = action_groups(app)
    for number, actions in enumerate(seen):
        allowed = {"all", *(f"group:{g}" for g in users[number % 2][1])}
        visible = [action for action in log if sync_groups[action["syncId"]] & allowed]
        assert wire(actions) == wire(visible), f"poller {number} did not see its actions exactly once, in order"

    status, everything = call(base_url, ada, "/bootstrap?type=eager&models=Group,Author,Todo")
    assert wire(everything["firstSyncId"]) == wire(log[-1]["syncId"])
    assert wire(replay(log)) == wire(as_store(everything["bootstrap"]))


def test_server_processes_starting_together_on_a_new_database_all_create_it_cleanly(database_url):
    start = f"from app import create_app; create_app({{'SQLALCHEMY_DATABASE_URI': {database_url!r}}})"
    processes = [subprocess.Popen([sys.executable, "-c", start], cwd=ROOT, stderr=subprocess.PIPE) for _ in range(6)]
    failures = [p.stderr.read().decode() for p in processes if p.wait(timeout=60) != 0]
    assert failures == []


def test_a_server_starting_beside_a_busy_one_does_not_wait_for_its_writes(app, database_url):
    """A server starts while another one's write transaction is open. On
    PostgreSQL even CREATE INDEX IF NOT EXISTS locks its table against writes:
    a server booting beside busy ones deadlocked with their writers, and every
    mutation stalled for PostgreSQL's deadlock_timeout (1 s). On SQLite it
    queued for the write lock. An existing schema is read, not created again."""
    ada = sign_in(app, "Ada")
    mutate(ada, group("g1"), create("Author", "a1", name="Ada"))
    with reader(database_url).connect() as busy:
        busy.begin()
        busy.execute(text("INSERT INTO todos (id, text, author_id, group_id, is_done, like_count) VALUES ('t1', 'Busy', 'a1', 'g1', false, 0)"))
        started = {}
        starting = threading.Thread(target=lambda: started.update(app=create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": database_url})))
        starting.start()
        starting.join(timeout=5)
        assert not starting.is_alive(), "the new server waited for the open write transaction"
        busy.commit()
    assert "app" in started
    shut_down(started["app"])
