"""Crashes: gunicorn is killed with SIGKILL at random moments under load,
and restarted on the same database (one server on a SQLite file; on
PostgreSQL two servers, writers and pollers spread across them, all killed
and restarted together). Every transaction that got a 200 is there; nothing
is half-written; the log stays contiguous (on PostgreSQL: each transaction's
syncIds are); a client that retries its unacknowledged transactions with the
same transactionId gets each applied exactly once; pollers that follow the
restarts still see each action exactly once, in order.

CRASHES sets how many times the servers are killed (3 by default)."""

import json
import os
import random
import threading
import time

import pytest
from sqlalchemy import text

from app import create_app
from helpers import (
    as_store,
    assert_log_holds_exactly,
    create,
    group,
    mutate,
    reader,
    replay,
    sign_in,
    stored_rows,
    todo,
    update,
    wire,
)
from models import db
from servers import SERVERS, Api, ServerDown, running

CRASHES = int(os.environ.get("CRASHES", 3))
WRITERS, POLLERS = 8, 2


@pytest.fixture
def world(engine, database_url, tmp_path):
    app = create_app({"SQLALCHEMY_DATABASE_URI": database_url})
    writer = sign_in(app, "writer")
    setup = [create("Author", "a1", name="Ada"), group("g1"), group("g2")]
    setup_transaction = (mutate(writer, *setup)["lastSyncId"], setup)
    with app.app_context():
        db.engine.dispose()
    with running(database_url, tmp_path, SERVERS[engine]) as servers:
        yield servers, writer.token, setup_transaction


def test_sigkill_under_load_loses_nothing_and_applies_retries_once(world, engine, database_url):
    servers, token, setup_transaction = world
    acknowledged: dict[str, tuple[int, list[dict]]] = {}  # transactionId -> (lastSyncId, changes)
    unacknowledged_sends = [0]
    kills, heads_after_kill = [0], []  # kills[0] counts up just before each SIGKILL
    interrupted: dict[str, int] = {}  # transactionId -> the crash that cut its first send
    errors: list[BaseException] = []
    stop, writers_done = threading.Event(), threading.Event()
    seen: list[list[dict]] = [[] for _ in range(POLLERS)]

    def writer(number: int):
        api, rng, transaction = Api(servers[number % len(servers)], token), random.Random(number), 0
        while not stop.is_set():
            transaction += 1
            todo_id = f"w{number}-{transaction}"
            changes = [todo(todo_id, rng.choice(["g1", "g2"]))] + [update("Todo", todo_id, likeCount=n) for n in range(rng.randint(0, 2))]
            body = {"changes": changes, "transactionId": f"tx-{todo_id}"}
            while True:  # until acknowledged: a lost answer is retried with the same transactionId
                try:
                    status, _, answer = api.request("POST", "/mutate", body)
                except ServerDown:
                    unacknowledged_sends[0] += 1
                    interrupted.setdefault(body["transactionId"], kills[0] - 1)
                    time.sleep(0.05)
                    continue
                if status in (502, 503):
                    time.sleep(0.05)
                    continue
                assert status == 200, answer
                acknowledged[body["transactionId"]] = (answer["lastSyncId"], changes)
                break

    def poller(number: int):
        api, cursor = Api(servers[number % len(servers)], token), 0
        while True:
            finished = writers_done.is_set()  # read before polling, so the last poll is complete
            try:
                status, _, page = api.request("GET", f"/sync?since={cursor}&limit=50")
            except ServerDown:
                time.sleep(0.05)
                continue
            assert status == 200, page
            assert page["lastSyncId"] >= cursor
            seen[number] += page["sync"]
            cursor = page["lastSyncId"]
            if not page["hasMore"]:
                if finished:
                    return
                time.sleep(0.02)

    def guarded(target, number):
        try:
            target(number)
        except BaseException as error:
            errors.append(error)
            stop.set()
            writers_done.set()

    writers = [threading.Thread(target=guarded, args=(writer, n)) for n in range(WRITERS)]
    pollers = [threading.Thread(target=guarded, args=(poller, n)) for n in range(POLLERS)]
    for thread in writers + pollers:
        thread.start()
    rng = random.Random(7)
    acknowledged_before_each_crash = []
    try:
        for _ in range(CRASHES):
            time.sleep(rng.uniform(0.3, 1.5))  # a random moment under load
            kills[0] += 1
            for server in servers:
                server.kill()
            acknowledged_before_each_crash.append(len(acknowledged))
            heads_after_kill.append(check_database(database_url, engine)[-1]["syncId"])  # the database as the crash left it
            for server in servers:
                server.start()
        time.sleep(0.5)
    finally:
        # A check that fails between a kill and its restart must not leave the
        # clients retrying a dead server forever, and the session never ending.
        for server in servers:
            if server.process.poll() is not None:
                server.start()
        stop.set()
        for thread in writers:
            thread.join()
        writers_done.set()
        for thread in pollers:
            thread.join()
    assert not errors, errors
    assert all(later > earlier for earlier, later in zip([0, *acknowledged_before_each_crash], acknowledged_before_each_crash))

    log = check_database(database_url, engine)
    # Every 200, whole, at the syncIds it was given; and nothing else, each once, in order.
    assert_log_holds_exactly(log, [setup_transaction, *acknowledged.values()], engine)
    # Each transaction applied exactly once, retries included: one insert per todo, and nothing unacknowledged.
    inserted = [a["modelId"] for a in log if a["action"] == "insert" and a["modelName"] == "Todo"]
    assert sorted(inserted) == sorted(changes[0]["modelId"] for _, changes in acknowledged.values())
    for number, actions in enumerate(seen):
        assert wire(actions) == wire(log), f"poller {number} missed or repeated actions across the restarts"
    assert interrupted, "no request was cut by a crash: the test did not test anything"
    # Committed before the crash, but the client never heard: its retry was answered, not applied again.
    answer_lost = [t for t, crash in interrupted.items() if acknowledged[t][0] <= heads_after_kill[crash]]
    print(
        f"\ncrashes survived: {CRASHES}; {len(acknowledged)} transactions acknowledged; {len(interrupted)} cut by a "
        f"crash and retried with their transactionId ({len(answer_lost)} had committed before the crash); "
        f"{unacknowledged_sends[0]} failed sends in all; nothing lost or applied twice"
    )


def check_database(url: str, engine: str) -> list[dict]:
    """Read the tables directly, in one snapshot: the log is contiguous (on
    PostgreSQL a rolled back transaction may leave a hole), every action has
    its groups, and replaying it gives exactly the rows (no half-written
    transaction)."""
    # A PostgreSQL backend may still finish a COMMIT its killed client sent: read one snapshot.
    isolation = {"isolation_level": "REPEATABLE READ"} if engine == "postgresql" else {}
    with reader(url).connect().execution_options(**isolation) as connection:

        def query(sql: str) -> list[tuple]:
            return [tuple(row) for row in connection.execute(text(sql))]

        ids = [sync_id for (sync_id,) in query("SELECT id FROM sync_action ORDER BY id")]
        if engine == "sqlite":
            assert wire(ids) == wire(list(range(1, len(ids) + 1))), "the log has a gap"
        unlinked = query("SELECT count(*) FROM sync_action WHERE id NOT IN (SELECT sync_action_id FROM sync_action_group)")[0][0]
        assert unlinked == 0, "an action without sync groups"
        log = []
        for sync_id, action, model_name, model_id, data in query("SELECT id, action, model_name, model_id, data FROM sync_action ORDER BY id"):
            entry = {"syncId": sync_id, "action": action, "modelName": model_name, "modelId": model_id}
            if isinstance(data, str):  # SQLite's JSON is text; psycopg decodes it
                data = json.loads(data)
            if data is not None:
                entry["data"] = data
            log.append(entry)
        recorded = {last_sync_id for (last_sync_id,) in query("SELECT last_sync_id FROM client_transaction")}
        rows = stored_rows(connection)
    assert wire(replay(log)) == wire(as_store(rows)), "rows and actions disagree: a half-written transaction"
    assert recorded <= set(ids), "a recorded transaction whose actions are missing"
    return log
