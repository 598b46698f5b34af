"""Through a real server on 127.0.0.1, writers and pollers of two users at
once: every poller sees each committed action it may see exactly once, in
order, and replaying the log from 0 reproduces the rows."""

import json
import random
import sqlite3
import threading
import time
import urllib.error
import urllib.request

from helpers import as_store, create, database_path, delete, group, replay, sign_in, todo, update

WRITERS = 8  # half Ada (every group), half Grace (g1 only)
TRANSACTIONS_PER_WRITER = 25
POLLERS = 4  # likewise
GROUPS = ["g1", "g2", "g3"]


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


def random_transaction(rng: random.Random, writer: int, number: int, groups: list[str], alive: list[str]) -> list[dict]:
    changes = []
    for position in range(rng.randint(1, 3)):
        roll = rng.random()
        if alive and roll < 0.35:
            changes.append(update("Todo", rng.choice(alive), likeCount=rng.randint(0, 99), isDone=rng.random() < 0.5))
        elif alive and roll < 0.5:
            changes.append(delete("Todo", alive.pop(rng.randrange(len(alive)))))
        else:
            todo_id = f"w{writer}-{number}-{position}"
            alive.append(todo_id)
            changes.append(todo(todo_id, rng.choice(groups), text=f"written by {writer}"))
    return changes


def test_concurrent_writers_and_pollers_see_every_visible_action_once_in_order(app, base_url):
    ada = sign_in(app, "Ada").token
    status, _ = call(base_url, ada, "/mutate", {"changes": [create("Author", "a1", name="Ada"), *map(group, GROUPS)]})
    assert status == 200
    grace = sign_in(app, "Grace", "group:g1").token
    users = [(ada, GROUPS), (grace, ["g1"])]

    acknowledged: list[tuple[int, list[dict]]] = []
    errors: list[BaseException] = []
    writers_done = threading.Event()

    def writer(number: int):
        (token, groups), rng, alive = users[number % 2], random.Random(number), []
        for transaction in range(TRANSACTIONS_PER_WRITER):
            changes = random_transaction(rng, number, transaction, groups, alive)
            body = {"changes": changes}
            if transaction % 3 == 0:
                body["transactionId"] = f"w{number}-{transaction}"
            last_sync_id = send_until_acknowledged(base_url, token, body)
            if "transactionId" in body:  # the response was "lost": the retry must change nothing
                assert send_until_acknowledged(base_url, token, body) == last_sync_id
            acknowledged.append((last_sync_id, changes))

    seen: list[list[dict]] = [[] for _ in range(POLLERS)]

    def poller(number: int):
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

    def guarded(target, number):
        try:
            target(number)
        except BaseException as error:  # surfaced in the main thread below
            errors.append(error)

    pollers = [threading.Thread(target=guarded, args=(poller, n)) for n in range(POLLERS)]
    writers = [threading.Thread(target=guarded, args=(writer, n)) for n in range(WRITERS)]
    for thread in pollers + writers:
        thread.start()
    for thread in writers:
        thread.join()
    writers_done.set()
    for thread in pollers:
        thread.join()
    assert not errors, errors

    log = read_whole_log(base_url, ada)  # Ada may see everything
    head = len(GROUPS) + 1 + sum(len(changes) for _, changes in acknowledged)
    assert [action["syncId"] for action in log] == list(range(1, head + 1))  # contiguous: no gaps, no duplicates

    sync_groups = groups_of_actions(app)
    for number, actions in enumerate(seen):
        allowed = {"all", *(f"group:{g}" for g in users[number % 2][1])}
        visible = [action for action in log if sync_groups[action["syncId"]] & allowed]
        assert actions == visible, f"poller {number} did not see its actions exactly once, in order"

    for last_sync_id, changes in acknowledged:
        # A transaction's actions are contiguous and end at its lastSyncId.
        mine = log[last_sync_id - len(changes) : last_sync_id]
        assert [(a["modelId"], a["action"]) for a in mine] == [
            (c["modelId"], {"create": "insert"}.get(c["action"], c["action"])) for c in changes
        ]

    status, everything = call(base_url, ada, "/bootstrap?type=eager&models=Group,Author,Todo")
    assert everything["firstSyncId"] == head
    assert replay(log) == as_store(everything["bootstrap"])


def read_whole_log(base_url: str, token: str) -> list[dict]:
    log, cursor = [], 0
    while True:
        _, page = call(base_url, token, f"/sync?since={cursor}&limit=5000")
        log += page["sync"]
        cursor = page["lastSyncId"]
        if not page["hasMore"]:
            return log


def groups_of_actions(app) -> dict[int, set[str]]:
    groups: dict[int, set[str]] = {}
    with sqlite3.connect(database_path(app)) as connection:
        for sync_action_id, sync_group in connection.execute("SELECT sync_action_id, sync_group FROM sync_action_group"):
            groups.setdefault(sync_action_id, set()).add(sync_group)
    return groups
