"""GET /sync: the handshake, and the sync actions after a syncId, in order, with no gaps."""

import threading

import pytest

import app as app_module
from machinery import sqlite
from models import SCHEMA_VERSION
from helpers import same_user, as_store, assert_error, delete, mutate, read_log, replay, todo, update, wire


def test_the_handshake_gives_the_head_the_callers_sync_groups_and_the_schema_version(seeded):
    body = seeded.get("/sync").get_json()
    assert wire(body) == wire({"sync": [], "lastSyncId": 5, "syncGroups": ["all", "group:g1", "group:g2"], "hasMore": False,
                               "schemaVersion": SCHEMA_VERSION})


def test_the_handshake_of_an_empty_database_is_zero(client):
    assert wire(client.get("/sync").get_json()["lastSyncId"]) == wire(0)


def test_since_returns_the_actions_after_it_in_order(seeded):
    mutate(seeded, todo("t2", "g2"), update("Todo", "t1", isDone=True))
    mutate(seeded, delete("Todo", "t2"))

    body = seeded.get("/sync?since=5").get_json()

    assert wire([(a["syncId"], a["action"], a["modelId"]) for a in body["sync"]]) == wire([
        (6, "insert", "t2"),
        (7, "update", "t1"),
        (8, "delete", "t2"),
    ])
    assert wire(body["lastSyncId"]) == wire(8)
    assert body["hasMore"] is False
    assert body["syncGroups"] == ["all", "group:g1", "group:g2"]


def test_a_poll_at_the_head_is_empty_and_keeps_the_cursor(seeded):
    assert wire(seeded.get("/sync?since=5").get_json()) == wire({
        "sync": [],
        "lastSyncId": 5,
        "syncGroups": ["all", "group:g1", "group:g2"],
        "hasMore": False,
    })


def test_until_bounds_the_range_inclusively(seeded):
    body = seeded.get("/sync?since=1&until=3").get_json()
    assert wire([a["syncId"] for a in body["sync"]]) == wire([2, 3])
    assert wire(body["lastSyncId"]) == wire(3)
    assert body["hasMore"] is False


def test_until_past_the_head_stops_the_cursor_at_the_head(seeded):
    body = seeded.get("/sync?since=3&until=99").get_json()
    assert wire([a["syncId"] for a in body["sync"]]) == wire([4, 5])
    assert wire(body["lastSyncId"]) == wire(5)  # not 99: actions 6..99 may still be written


def test_limit_pages_the_log_and_has_more_says_another_page_follows(seeded):
    pages, since = [], 0
    while True:
        body = seeded.get(f"/sync?since={since}&limit=2").get_json()
        pages.append(([a["syncId"] for a in body["sync"]], body["lastSyncId"], body["hasMore"]))
        since = body["lastSyncId"]
        if not body["hasMore"]:
            break
    assert wire(pages) == wire([([1, 2], 2, True), ([3, 4], 4, True), ([5], 5, False)])


def test_a_page_that_ends_exactly_at_the_head_has_no_more(seeded):
    body = seeded.get("/sync?since=3&limit=2").get_json()
    assert wire(([a["syncId"] for a in body["sync"]], body["lastSyncId"], body["hasMore"])) == wire(([4, 5], 5, False))


def test_paging_within_until_stops_at_until(seeded):
    first = seeded.get("/sync?since=0&until=3&limit=2").get_json()
    second = seeded.get(f"/sync?since={first['lastSyncId']}&until=3&limit=2").get_json()
    assert wire(([a["syncId"] for a in first["sync"]], first["hasMore"])) == wire(([1, 2], True))
    assert wire(([a["syncId"] for a in second["sync"]], second["lastSyncId"], second["hasMore"])) == wire(([3], 3, False))


def test_the_default_limit_is_1000(seeded):
    mutate(seeded, *(update("Todo", "t1", likeCount=n) for n in range(1000)))
    body = seeded.get("/sync?since=0").get_json()
    assert wire((len(body["sync"]), body["lastSyncId"], body["hasMore"])) == wire((1000, 1000, True))
    assert wire(seeded.get("/sync?since=1000").get_json()["sync"][-1]["syncId"]) == wire(1005)


def test_a_cursor_past_the_head_is_refused_because_the_database_was_reset(seeded):
    error = assert_error(seeded.get("/sync?since=6"), 409, "bootstrap_again")
    assert "ends at 5" in error["message"] and "Bootstrap again" in error["message"]
    assert wire(error["details"]) == wire({"reason": "reset"})


def test_the_largest_possible_cursor_is_answered_not_overflowed(seeded):
    """since + limit passes the largest 64-bit integer: the page's bound must not overflow."""
    error = assert_error(seeded.get(f"/sync?since={2**63 - 1}&limit=5000"), 409, "bootstrap_again")
    assert "ends at 5" in error["message"]
    assert assert_error(seeded.get(f"/sync?since={2**63 - 1}&until={2**63 - 1}"), 409, "bootstrap_again")


def test_replaying_the_log_from_zero_reproduces_the_rows(seeded):
    mutate(seeded, todo("t2", "g2"), update("Todo", "t1", text="edited", likeCount=4))
    mutate(seeded, delete("Todo", "t2"), update("Author", "a2", name="G. Hopper"), delete("Group", "g2"))

    store = replay(read_log(seeded))

    everything = seeded.get("/bootstrap?type=eager&models=Group,Author,Todo").get_json()["bootstrap"]
    assert wire(store) == wire(as_store(everything))


@pytest.mark.sqlite_only("pauses the poll's statement half-way with sqlite3's progress handler")
def test_the_cursor_never_passes_an_action_the_response_did_not_carry(app, seeded, monkeypatch):
    """A writer commits while the poll's statement is running (SQLite's progress
    handler pauses it half-way): the page and its cursor stop at the head the
    statement started from, and the next poll returns the new action."""
    connection = app_module.connection
    committed = []

    def commit_once():
        if not committed:
            writer = threading.Thread(target=lambda: committed.append(mutate(same_user(app, seeded), todo("t2", "g1"))))
            writer.start()
            writer.join()
        return 0  # go on with the statement

    class PausingConnection:
        def __init__(self, db_connection):
            self.db_connection = db_connection

        def execute(self, sql, *params):
            if sql is not sqlite.PAGE:
                return self.db_connection.execute(sql, *params)
            self.db_connection.set_progress_handler(commit_once, 50)
            try:
                return self.db_connection.execute(sql, *params)
            finally:
                self.db_connection.set_progress_handler(None, 0)

        def __getattr__(self, name):
            return getattr(self.db_connection, name)

    monkeypatch.setattr(app_module, "connection", lambda: PausingConnection(connection()))
    body = seeded.get("/sync?since=4").get_json()
    monkeypatch.undo()

    assert wire(committed) == wire([{"lastSyncId": 6}])  # the writer did commit while the poll read
    assert wire(([a["syncId"] for a in body["sync"]], body["lastSyncId"])) == wire(([5], 5))
    assert wire([a["syncId"] for a in seeded.get("/sync?since=5").get_json()["sync"]]) == wire([6])


INVALID = {
    "since not a number": ("since=abc", "since: Must be a non-negative integer"),
    "negative since": ("since=-1", "since: Must be a non-negative integer"),
    "fractional since": ("since=1.5", "since: Must be a non-negative integer"),
    "empty since": ("since=", "since: Must be a non-negative integer"),
    "since with spaces": ("since=%201", "since: Must be a non-negative integer"),
    "since over 64 bits": ("since=9223372036854775808", "since: Must be a non-negative integer"),
    "until below since": ("since=4&until=3", "until: until (3) must not be less than since (4)"),
    "until without since": ("until=3", "until: until needs since"),
    "zero limit": ("since=0&limit=0", "limit: Must be between 1 and 5000"),
    "limit over 5000": ("since=0&limit=5001", "limit: Must be between 1 and 5000"),
    "limit without since": ("limit=3", "limit: limit needs since"),
    "repeated since": ("since=1&since=4", "since: Given 2 times; give it once"),
    "repeated until": ("since=1&until=2&until=3", "until: Given 2 times; give it once"),
    "unknown parameter": ("sinse=3", "sinse: Unknown field"),
}


@pytest.mark.parametrize("query, says", INVALID.values(), ids=INVALID.keys())
def test_an_invalid_sync_request_is_400(seeded, query, says):
    error = assert_error(seeded.get(f"/sync?{query}"), 400, "invalid_request")
    assert says in error["message"]
