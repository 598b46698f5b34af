"""GET /bootstrap: model rows plus the firstSyncId they reflect, from one snapshot."""

import json
import socket
import sqlite3
import threading
import time

import pytest
from werkzeug.test import EnvironBuilder, run_wsgi_app

import app as app_module
from helpers import same_user, as_store, assert_error, database_path, mutate, read_log, replay, todo, wire


def test_eager_bootstrap_returns_every_row_of_the_requested_models(seeded):
    mutate(seeded, todo("t2", "g2"))

    body = seeded.get("/bootstrap?type=eager&models=Todo,Author").get_json()

    assert list(body) == ["bootstrap", "firstSyncId", "syncGroups"]
    assert list(body["bootstrap"]) == ["Todo", "Author"]
    assert [t["id"] for t in body["bootstrap"]["Todo"]] == ["t1", "t2"]
    assert wire(body["bootstrap"]["Author"]) == wire([{"id": "a1", "name": "Ada"}, {"id": "a2", "name": "Grace"}])
    assert wire(body["firstSyncId"]) == wire(6)
    assert body["syncGroups"] == ["all", "group:g1", "group:g2"]


def test_every_requested_model_has_a_key_even_when_empty(client):
    body = client.get("/bootstrap?type=eager&models=Group,Author,Todo").get_json()
    assert wire(body) == wire({"bootstrap": {"Group": [], "Author": [], "Todo": []}, "firstSyncId": 0, "syncGroups": ["all"]})


def test_an_empty_model_list_is_allowed(seeded):
    body = seeded.get("/bootstrap?type=eager&models=").get_json()
    assert wire(body) == wire({"bootstrap": {}, "firstSyncId": 5, "syncGroups": ["all", "group:g1", "group:g2"]})


def test_lazy_bootstrap_returns_only_rows_in_the_requested_groups(seeded):
    mutate(seeded, todo("t2", "g2"), todo("t3", "g1"))

    body = seeded.get("/bootstrap?type=lazy&models=Todo,Group,Author&syncGroups=group:g1").get_json()

    assert [t["id"] for t in body["bootstrap"]["Todo"]] == ["t1", "t3"]
    assert wire(body["bootstrap"]["Group"]) == wire([{"id": "g1", "name": "Group g1"}])
    assert body["bootstrap"]["Author"] == []  # Authors are in "all", which was not asked for
    assert body["syncGroups"] == ["group:g1"]
    assert wire(body["firstSyncId"]) == wire(7)


def test_lazy_bootstrap_of_several_groups_serves_each_of_them(seeded):
    mutate(seeded, todo("t2", "g2"))

    body = seeded.get("/bootstrap?type=lazy&models=Todo,Author&syncGroups=group:g2,all").get_json()

    assert [t["id"] for t in body["bootstrap"]["Todo"]] == ["t2"]
    assert [a["id"] for a in body["bootstrap"]["Author"]] == ["a1", "a2"]
    assert body["syncGroups"] == ["group:g2", "all"]


def test_rows_and_first_sync_id_come_from_one_snapshot(app, seeded, monkeypatch):
    """A writer commits after the endpoint has read the caller's groups and
    before it reads the head and streams the rows: firstSyncId and the rows
    must still come from one snapshot."""
    committed = []
    read_head = app_module.read_head

    def read_head_after_a_concurrent_commit(*args):
        writer = threading.Thread(target=lambda: committed.append(mutate(same_user(app, seeded), todo("t2", "g1"))))
        writer.start()
        writer.join()
        return read_head(*args)

    monkeypatch.setattr(app_module, "read_head", read_head_after_a_concurrent_commit)
    body = seeded.get("/bootstrap?type=eager&models=Todo").get_json()
    monkeypatch.undo()

    assert wire(committed) == wire([{"lastSyncId": 6}])  # the writer did commit in between
    assert [t["id"] for t in body["bootstrap"]["Todo"]] == ["t1"]
    assert wire(body["firstSyncId"]) == wire(5)
    # So a client that bootstraps, then replays from firstSyncId, lands on the server's rows.
    store = replay(read_log(seeded, since=body["firstSyncId"]), as_store(body["bootstrap"]))
    assert wire(store) == wire(as_store(seeded.get("/bootstrap?type=eager&models=Todo").get_json()["bootstrap"]))


INVALID = {
    "no type": ("models=Todo", "type: Missing data for required field"),
    "unknown type": ("type=full&models=Todo", "type: Must be one of: eager, lazy"),
    "no models": ("type=eager", "models: Missing data for required field"),
    "unknown model": ("type=eager&models=Todo,Robot", "models: Unknown model 'Robot'. Known models: Author, Group, Todo"),
    "empty model name": ("type=eager&models=Todo,,Group", "models: Unknown model ''"),
    "lazy without syncGroups": ("type=lazy&models=Todo", "syncGroups: A lazy bootstrap names the sync groups it loads"),
    "lazy with no groups": ("type=lazy&models=Todo&syncGroups=", "syncGroups: Must list at least one entry"),
    "malformed group": ("type=lazy&models=Todo&syncGroups=team:g1", "syncGroups: Malformed sync group 'team:g1'"),
    "group without id": ("type=lazy&models=Todo&syncGroups=group:", "syncGroups: Malformed sync group 'group:'"),
    "eager with syncGroups": ("type=eager&models=Todo&syncGroups=all", "syncGroups: Only a lazy bootstrap takes syncGroups"),
    "repeated models": ("type=eager&models=Todo&models=Group", "models: Given 2 times; give it once"),
    "unknown parameter": ("type=eager&models=Todo&model=Group", "model: Unknown field"),
}


@pytest.mark.parametrize("query, says", INVALID.values(), ids=INVALID.keys())
def test_an_invalid_bootstrap_request_is_400(seeded, query, says):
    error = assert_error(seeded.get(f"/bootstrap?{query}"), 400, "invalid_request")
    assert says in error["message"]


@pytest.mark.parametrize("read", ["whole", "one chunk", "nothing (HEAD)"])
def test_a_bootstrap_gives_its_connection_back_however_much_the_client_reads(app, seeded, read):
    """Its read transaction must not outlive the answer: a snapshot held open pins the WAL (and, on PostgreSQL, old row versions)."""
    for first in range(2, 2100, 1000):  # more than one chunk of rows
        mutate(seeded, *(todo(f"t{n}", "g1") for n in range(first, min(first + 1000, 2100))))
    with app.app_context():
        pool = app_module.db.engine.pool
    environ = EnvironBuilder(
        "/bootstrap?type=eager&models=Todo",
        method="HEAD" if read.startswith("nothing") else "GET",
        headers={"Authorization": seeded.environ_base["HTTP_AUTHORIZATION"]},
    ).get_environ()
    body, status, _ = run_wsgi_app(app, environ)  # as a server runs it: the answer, held until closed
    assert status.startswith("200")
    if read == "whole":
        assert len(json.loads(b"".join(body))["bootstrap"]["Todo"]) == 2099
    elif read == "one chunk":
        next(body)
    body.close()  # what a server does once it has sent the answer, or the client has gone
    assert pool.checkedout() == 0


@pytest.mark.sqlite_only("checkpoints SQLite's write-ahead log")
def test_a_bootstrap_not_read_in_time_is_cut_off_so_the_log_can_be_checkpointed(app, seeded, base_url):
    app.config.update(BOOTSTRAP_MAX_S=1, MAX_STRING_BYTES=1 << 20, MAX_ROW_BYTES=1 << 20, MAX_TRANSACTION_BYTES=1 << 24)
    for batch in range(16):  # about 16 MB of rows: more than the sockets buffer, so the server waits to send
        mutate(seeded, *[todo(f"b{batch}-{n}", "g1") | {"data": todo(f"b{batch}-{n}", "g1")["data"] | {"text": "x" * 60_000}}
                         for n in range(16)])
    host, port = base_url.removeprefix("http://").split(":")
    slow = socket.create_connection((host, int(port)))
    slow.sendall(f"GET /bootstrap?type=eager&models=Todo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {seeded.token}\r\n\r\n".encode())
    time.sleep(0.3)  # the bootstrap's snapshot is open; the client reads nothing
    mutate(seeded, todo("t9", "g1"))  # a commit after its snapshot: its frames stay in the WAL while the snapshot lasts

    checkpointer = sqlite3.connect(database_path(app), timeout=0)  # asks, and does not wait for readers
    checkpoints = [checkpointer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]]
    deadline = time.monotonic() + 15
    while checkpoints[-1] != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
        checkpoints.append(checkpointer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0])
    checkpointer.close()

    # Pinned at first (busy 1), then free once the bootstrap was cut off...
    assert checkpoints[0] == 1 and checkpoints[-1] == 0, checkpoints
    # ...and the slow client gets a broken answer, never a complete one: it bootstraps again.
    slow.settimeout(10)
    received = b""
    while chunk := slow.recv(1 << 20):
        received += chunk
    slow.close()
    assert received.startswith(b"HTTP/1.1 200") and not received.endswith(b"0\r\n\r\n")
    assert seeded.get("/sync").status_code == 200
