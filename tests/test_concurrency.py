"""Through a real server on 127.0.0.1, writers and pollers at once: every
poller sees each committed action exactly once, in order, and replaying the
log from 0 reproduces the rows."""

import json
import random
import threading
import time
import urllib.error
import urllib.request

from helpers import as_store, create, delete, group, replay, todo, update

WRITERS = 8
TRANSACTIONS_PER_WRITER = 25
POLLERS = 4
GROUPS = ["g1", "g2", "g3"]


def call(base_url: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        base_url + path,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def send_until_acknowledged(base_url: str, body: dict, busy: list) -> int:
    """Send a transaction as the Loco Sync client would: retry on 503 (type network)."""
    while True:
        status, answer = call(base_url, "/mutate", body)
        if status == 503:
            assert answer["error"]["type"] == "network"
            busy.append(body)
            continue
        assert status == 200, answer
        return answer["lastSyncId"]


def random_transaction(rng: random.Random, writer: int, number: int, alive: list[str]) -> list[dict]:
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
            changes.append(todo(todo_id, rng.choice(GROUPS), text=f"written by {writer}"))
    return changes


def test_concurrent_writers_and_pollers_see_every_action_once_in_order(base_url):
    status, _ = call(base_url, "/mutate", {"changes": [create("Author", "a1", name="Ada"), *map(group, GROUPS)]})
    assert status == 200

    acknowledged: list[tuple[int, list[dict]]] = []
    busy: list[dict] = []
    errors: list[BaseException] = []
    writers_done = threading.Event()

    def writer(number: int):
        rng, alive = random.Random(number), []
        for transaction in range(TRANSACTIONS_PER_WRITER):
            changes = random_transaction(rng, number, transaction, alive)
            body = {"changes": changes}
            if transaction % 3 == 0:
                body["transactionId"] = f"w{number}-{transaction}"
            last_sync_id = send_until_acknowledged(base_url, body, busy)
            if "transactionId" in body:  # the response was "lost": the retry must change nothing
                assert send_until_acknowledged(base_url, body, busy) == last_sync_id
            acknowledged.append((last_sync_id, changes))

    seen: list[list[dict]] = [[] for _ in range(POLLERS)]

    def poller(number: int):
        rng, cursor = random.Random(1000 + number), 0
        while True:
            finished = writers_done.is_set()  # read before polling, so the last poll is complete
            status, page = call(base_url, f"/sync?since={cursor}&limit={rng.randint(1, 50)}")
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

    log = read_whole_log(base_url)
    head = len(GROUPS) + 1 + sum(len(changes) for _, changes in acknowledged)
    assert [action["syncId"] for action in log] == list(range(1, head + 1))  # contiguous: no gaps, no duplicates

    for number, actions in enumerate(seen):
        assert actions == log, f"poller {number} did not see the log exactly once, in order"

    for last_sync_id, changes in acknowledged:
        # A transaction's actions are contiguous and end at its lastSyncId.
        mine = log[last_sync_id - len(changes) : last_sync_id]
        assert [(a["modelId"], a["action"]) for a in mine] == [
            (c["modelId"], {"create": "insert"}.get(c["action"], c["action"])) for c in changes
        ]

    status, everything = call(base_url, "/bootstrap?type=eager&models=Group,Author,Todo")
    assert everything["firstSyncId"] == head
    assert replay(log) == as_store(everything["bootstrap"])


def read_whole_log(base_url: str) -> list[dict]:
    log, cursor = [], 0
    while True:
        _, page = call(base_url, f"/sync?since={cursor}&limit=5000")
        log += page["sync"]
        cursor = page["lastSyncId"]
        if not page["hasMore"]:
            return log
