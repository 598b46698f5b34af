"""Through a real server on 127.0.0.1, writers and pollers of two users at
once: every poller sees each committed action it may see exactly once, in
order, and replaying the log from 0 reproduces the rows."""

import json
import random
import time
import urllib.error
import urllib.request

from helpers import (
    action_groups,
    as_store,
    assert_acknowledged_in_log,
    create,
    database_path,
    group,
    random_transaction,
    read_log_with,
    replay,
    run_clients,
    sign_in,
)

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


def test_concurrent_writers_and_pollers_see_every_visible_action_once_in_order(app, base_url):
    ada = sign_in(app, "Ada").token
    status, _ = call(base_url, ada, "/mutate", {"changes": [create("Author", "a1", name="Ada"), *map(group, GROUPS)]})
    assert status == 200
    grace = sign_in(app, "Grace", "group:g1").token
    users = [(ada, GROUPS), (grace, ["g1"])]

    acknowledged: list[tuple[int, list[dict]]] = []
    seen: list[list[dict]] = [[] for _ in range(POLLERS)]

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
    head = len(GROUPS) + 1 + sum(len(changes) for _, changes in acknowledged)
    assert [action["syncId"] for action in log] == list(range(1, head + 1))  # contiguous: no gaps, no duplicates

    sync_groups = action_groups(database_path(app))
    for number, actions in enumerate(seen):
        allowed = {"all", *(f"group:{g}" for g in users[number % 2][1])}
        visible = [action for action in log if sync_groups[action["syncId"]] & allowed]
        assert actions == visible, f"poller {number} did not see its actions exactly once, in order"

    assert_acknowledged_in_log(log, acknowledged)

    status, everything = call(base_url, ada, "/bootstrap?type=eager&models=Group,Author,Todo")
    assert everything["firstSyncId"] == head
    assert replay(log) == as_store(everything["bootstrap"])
