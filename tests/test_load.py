"""Load through gunicorn (4 worker processes, 4 threads each) on one SQLite
file, or through two such servers on one PostgreSQL database: 16 writers and
8 pollers of four users at once, spread across the servers. Every
acknowledged transaction is in the log; every poller sees each action it may
see exactly once, in order; each poller's replay equals its user's final
bootstrap; no request fails but with a 503 that carries Retry-After and then
succeeds.

LOAD_TRANSACTIONS sets the number of transactions (800 by default, sized
for CI; `LOAD_TRANSACTIONS=20000 python -m pytest tests/test_load.py -s` is
the full run, and prints what it held)."""

import os
import random
import time

import pytest

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
    replay,
    run_clients,
    sign_in,
    wire,
)
from models import db
from servers import SERVERS, WORKERS, Api, running

WRITERS, POLLERS = 16, 8
TRANSACTIONS = int(os.environ.get("LOAD_TRANSACTIONS", 800))
GROUPS = ["g1", "g2", "g3", "g4"]
MODELS = "Group,Author,Todo"


@pytest.fixture
def world(engine, database_url, tmp_path):
    """Four users: the founder in every group, the others in two neighbouring groups each; then gunicorn."""
    app = create_app({"SQLALCHEMY_DATABASE_URI": database_url})
    founder = sign_in(app, "founder")
    setup = [create("Author", "a0", name="founder"), *map(group, GROUPS)]
    setup_transactions = [(mutate(founder, *setup)["lastSyncId"], setup)]
    users = [(founder.token, GROUPS, "a0")]
    for n in range(1, 4):
        groups = [GROUPS[n - 1], GROUPS[n]]
        user, author = sign_in(app, f"user {n}", *(f"group:{g}" for g in groups)), [create("Author", f"a{n}", name=f"user {n}")]
        setup_transactions.append((mutate(user, *author)["lastSyncId"], author))  # each writes by an Author of its own
        users.append((user.token, groups, f"a{n}"))
    with app.app_context():
        db.engine.dispose()
    with running(database_url, tmp_path, SERVERS[engine]) as servers:
        yield servers, users, setup_transactions


def send(api: Api, body: dict, seen: list) -> int:
    """A transaction as the Loco Sync client sends it: again after a 503 (type network)."""
    while True:
        status, headers, answer = api.request("POST", "/mutate", body)
        seen.append(status)
        if status == 503:
            assert answer["error"]["type"] == "network" and "Retry-After" in headers, answer
            time.sleep(0.05)
            continue
        assert status == 200, answer
        return answer["lastSyncId"]


def test_load_through_gunicorn_loses_duplicates_and_reorders_nothing(world, engine, database_url):
    servers, users, setup_transactions = world
    acknowledged: list[tuple[int, list[dict]]] = []
    statuses: list[int] = []
    seen: list[list[dict]] = [[] for _ in range(POLLERS)]
    polls = [0] * POLLERS

    def server_of(number: int):
        # Round-robin over the servers, so that each user writes and polls through every one of them.
        return servers[number // len(users) % len(servers)]

    def writer(number: int):
        token, groups, author_id = users[number % len(users)]
        api, rng, alive = Api(server_of(number), token), random.Random(number), []
        for transaction in range(TRANSACTIONS // WRITERS):
            changes = random_transaction(rng, number, transaction, groups, alive, author_id)
            body = {"changes": changes}
            if transaction % 4 == 0:
                body["transactionId"] = f"w{number}-{transaction}"
            last_sync_id = send(api, body, statuses)
            if "transactionId" in body:  # the response was "lost": the retry must change nothing
                assert wire(send(api, body, statuses)) == wire(last_sync_id)
            acknowledged.append((last_sync_id, changes))

    def poller(number: int, writers_done):
        api, rng, cursor = Api(server_of(number), users[number % len(users)][0]), random.Random(1000 + number), 0
        while True:
            finished = writers_done.is_set()  # read before polling, so the last poll is complete
            status, _, page = api.request("GET", f"/sync?since={cursor}&limit={rng.randint(1, 300)}")
            statuses.append(status)
            assert status == 200, page
            assert page["lastSyncId"] >= cursor, "the cursor moved backwards"
            seen[number] += page["sync"]
            polls[number] += 1
            cursor = page["lastSyncId"]
            if not page["hasMore"]:
                if finished:
                    return
                time.sleep(0.02)  # a poll interval, as a client has

    writing = run_clients(writer, WRITERS, poller, POLLERS)

    founder = Api(servers[0], users[0][0])
    log = read_log_with(lambda path: founder.request("GET", path)[2])
    # Every acknowledged action, each once, in order, and nothing else (on SQLite: no hole either).
    assert_log_holds_exactly(log, [*setup_transactions, *acknowledged], engine)
    assert set(statuses) <= {200, 503}, sorted(set(statuses))

    links = action_groups(database_url)
    for number, actions in enumerate(seen):
        token, groups, _ = users[number % len(users)]
        allowed = {"all", *(f"group:{g}" for g in groups)}
        visible = [a for a in log if links[a["syncId"]] & allowed]
        assert wire(actions) == wire(visible), f"poller {number} missed or repeated actions"
        _, _, everything = Api(server_of(number), token).request("GET", f"/bootstrap?type=eager&models={MODELS}")
        bootstrapped = as_store(everything["bootstrap"])
        assert wire(replay(actions)) == wire(bootstrapped), f"poller {number}'s replay differs from its bootstrap"

    print(
        f"\nload held: {len(acknowledged)} transactions ({len(log)} actions, head {log[-1]['syncId']}) from {WRITERS} "
        f"writers, {sum(polls)} polls from {POLLERS} pollers, {len(servers)} x gunicorn {WORKERS} gevent workers "
        f"on {engine}; {len(acknowledged) / writing:.0f} transactions/s; {statuses.count(503)} answers 503, each then retried"
    )
