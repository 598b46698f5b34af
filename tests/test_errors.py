"""Every refusal is JSON in one shape, with the Loco Sync error type that makes the client do the right thing."""

import http.client
import json
import sqlite3
import threading
from urllib.parse import urlsplit

import pytest
from sqlalchemy import event

import machinery.writer as writer

from app import create_app, in_write_transaction
from helpers import assert_error, create, database_path, group, mutate, shut_down, sign_in, snapshot, todo, wire
from models import db


def test_an_unknown_route_is_a_json_404(client):
    error = assert_error(client.get("/nope"), 404, "not_found")
    assert "/nope" in error["message"] and "POST /mutate" in error["message"]


def test_a_wrong_method_is_a_json_405_naming_the_allowed_ones(client):
    response = client.get("/mutate")
    assert_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


def test_a_body_over_one_mebibyte_is_413_and_writes_nothing(app, seeded):
    before = snapshot(app)
    huge = todo("t2", "g1", text="x" * (1024 * 1024))
    error = assert_error(seeded.post("/mutate", json={"changes": [huge]}), 413, "payload_too_large")
    assert "1048576 bytes" in error["message"]
    assert snapshot(app) == before


def test_a_chunked_body_over_one_mebibyte_is_413_and_writes_nothing(app, seeded, base_url):
    """Without a Content-Length the body is cut at the limit, where a valid
    JSON prefix must not be applied: the request is refused whole."""
    before = snapshot(app)
    valid_prefix = json.dumps({"changes": [todo("t2", "g1")]}).encode()
    padding = b" " * (1024 * 1024 + 100_000)  # JSON whitespace: only the size is wrong
    connection = http.client.HTTPConnection(urlsplit(base_url).netloc, timeout=30)
    connection.request(
        "POST",
        "/mutate",
        body=iter([valid_prefix, padding]),  # an iterable body is sent chunked
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {seeded.token}"},
    )
    response = connection.getresponse()
    body = json.load(response)

    assert response.status == 413, body
    assert body["error"]["code"] == "payload_too_large"
    assert snapshot(app) == before


def test_a_body_that_is_not_json_is_415(app, seeded):
    before = snapshot(app)
    assert_error(seeded.post("/mutate", data="changes=[]", content_type="text/plain"), 415, "unsupported_media_type")
    assert_error(seeded.post("/mutate", data={"changes": "[]"}), 415, "unsupported_media_type")
    assert snapshot(app) == before


BROKEN_JSON = {
    "truncated": b'{"changes": [',
    "not utf-8": b'{"changes": "\xff"}',
    "NaN": b'{"changes": [], "transactionId": NaN}',
    "deep nesting": b"[" * 200_000 + b"]" * 200_000,
    "a 5000-digit integer": b'{"changes": ' + b"9" * 5000 + b"}",
    "empty": b"",
    "a lone surrogate in a string": b'{"changes": [{"action": "update", "modelName": "Author", "modelId": "a1", '
    b'"data": {"name": "\\udfff"}}]}',
    "a lone surrogate in a transactionId": b'{"changes": [], "transactionId": "\\ud800"}',
}


def test_a_body_that_is_not_valid_json_is_400_and_writes_nothing(app, seeded):
    before = snapshot(app)
    for name, raw in BROKEN_JSON.items():
        response = seeded.post("/mutate", data=raw, content_type="application/json")
        error = assert_error(response, 400, "invalid_json")
        assert error["message"].startswith("The body is not valid JSON"), name
    assert snapshot(app) == before


def test_a_string_holding_nul_is_400_on_every_engine_and_writes_nothing(app, seeded):
    """PostgreSQL cannot store NUL in text, so no engine takes it."""
    before = snapshot(app)
    for body in (
        {"changes": [todo("t9", "g1", text="nul \u0000 inside")]},
        {"changes": [todo("t9", "g1")], "transactionId": "tx\u0000"},
        {"changes": [{**todo("t9", "g1"), "extra\u0000": 1}]},
    ):
        error = assert_error(seeded.post("/mutate", json=body), 400, "invalid_request")
        assert "NUL" in error["message"]
    assert snapshot(app) == before


def test_an_unexpected_failure_is_a_json_500_of_type_server(app):
    def broken():
        raise RuntimeError("boom")

    app.add_url_rule("/broken", view_func=broken)
    error = assert_error(app.test_client().get("/broken"), 500, "internal_error")
    assert "boom" not in error["message"]  # internals stay in the log


# How a write waits for another one is the engine's own: these hold SQLite's
# write lock from a second connection. PostgreSQL has no such lock; its writers
# wait for row locks, and retry deadlocks (tests/test_postgres.py).
HOLDS_SQLITES_WRITE_LOCK = "holds SQLite's write lock (BEGIN IMMEDIATE) from a second sqlite3 connection"


@pytest.mark.sqlite_only(HOLDS_SQLITES_WRITE_LOCK)
def test_a_database_locked_by_another_writer_is_503_network_with_retry_after(database_url):
    app = create_app(
        {
            "TESTING": True,
            "SQLALCHEMY_DATABASE_URI": database_url,
            "SQLITE_BUSY_TIMEOUT_MS": 20,
            "BUSY_RETRIES": 2,
            "BUSY_BACKOFF_S": 0.01,
        }
    )
    client = sign_in(app)
    mutate(client, group("g1"))
    before = snapshot(app)

    other_writer = sqlite3.connect(database_path(app), isolation_level=None)
    other_writer.execute("BEGIN IMMEDIATE")
    try:
        response = client.post("/mutate", json={"changes": [todo("t1", "g1")]})
        error = assert_error(response, 503, "database_busy", type="network")
        assert response.headers["Retry-After"] == "1"
        assert "nothing was written" in error["message"]
    finally:
        other_writer.rollback()
        other_writer.close()

    assert snapshot(app) == before
    # Type network makes the client retry, and once the lock is gone the retry succeeds.
    mutate(client, {"action": "create", "modelName": "Author", "modelId": "a1", "data": {"id": "a1", "name": "A"}})
    assert wire(mutate(client, todo("t1", "g1"))) == wire({"lastSyncId": 3})


def test_an_exhausted_connection_pool_is_503_network_with_retry_after_and_writes_nothing(database_url):
    """A transient fault: the client retries on network, where a 500 (type server) would make it roll back."""
    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": database_url, "POOL_SIZE": 1, "POOL_TIMEOUT_S": 0.2})
    client = sign_in(app)
    mutate(client, group("g1"))
    before = snapshot(app)
    with app.app_context():
        held = db.engine.raw_connection()  # the pool's only connection, in use elsewhere
    try:
        for response in (
            client.post("/mutate", json={"changes": [todo("t1", "g1")]}),
            client.get("/sync?since=0"),
            client.get("/bootstrap?type=eager&models=Todo"),
        ):
            error = assert_error(response, 503, "database_busy", type="network")
            assert response.headers["Retry-After"] == "1" and "nothing was done" in error["message"]
    finally:
        held.close()
    assert snapshot(app) == before
    mutate(client, create("Author", "a1", name="A"))  # a connection is free again: the retry succeeds
    assert wire(mutate(client, todo("t1", "g1"))) == wire({"lastSyncId": 3})
    shut_down(app)


@pytest.mark.sqlite_only(HOLDS_SQLITES_WRITE_LOCK)
def test_a_busy_database_is_retried_with_backoff_before_giving_up(database_url, monkeypatch):
    """The lock is held longer than one busy timeout but less than the retries
    last: the mutation succeeds, after waits that double."""
    app = create_app(
        {
            "TESTING": True,
            "SQLALCHEMY_DATABASE_URI": database_url,
            "SQLITE_BUSY_TIMEOUT_MS": 20,
            "BUSY_RETRIES": 6,
            "BUSY_BACKOFF_S": 0.05,
        }
    )
    client = sign_in(app)
    waits = []
    sleep = writer.time.sleep
    this_thread = threading.current_thread()

    def recorded_sleep(seconds):
        if threading.current_thread() is this_thread:
            waits.append(seconds)
        sleep(seconds)

    monkeypatch.setattr(writer.time, "sleep", recorded_sleep)
    other_writer = sqlite3.connect(database_path(app), isolation_level=None, check_same_thread=False)
    other_writer.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.3, other_writer.rollback)
    release.start()
    try:
        assert wire(mutate(client, group("g1"))) == wire({"lastSyncId": 1})
    finally:
        release.join()
        other_writer.close()
    assert len(waits) >= 2
    assert waits == [0.05 * 2**n for n in range(len(waits))]


# Faults that may pass: the client must retry (type network), never roll a good change back
# (type server), and the first request after the fault clears must succeed.


def faulty_new_connections(app, statement: str):
    """From now on every connection the pool opens runs `statement` first: a stand-in for a file
    made read-only or a full disk, as connections opened during such a fault see it."""
    with app.app_context():
        engine = db.engine

    def fault(dbapi_connection, _record):
        cursor = dbapi_connection.cursor()
        cursor.execute(statement)
        cursor.close()

    event.listen(engine, "connect", fault)
    with app.app_context():
        db.engine.dispose()
    return lambda: event.remove(engine, "connect", fault)


def assert_fault(response) -> None:
    error = assert_error(response, 503, "database_unavailable", type="network")
    assert response.headers["Retry-After"] == "1" and len(error["message"]) < 300


def test_a_read_only_database_is_503_network_and_the_first_request_after_it_succeeds(database_url):
    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": database_url})
    client = sign_in(app)
    mutate(client, group("g1"), create("Author", "a1", name="A"))
    before = snapshot(app)
    sqlite = database_url.startswith("sqlite")
    cleared = faulty_new_connections(app, "PRAGMA query_only = 1" if sqlite else "SET default_transaction_read_only = on")
    try:
        with app.app_context():  # several connections opened while it lasts, back in the pool
            opened = [db.engine.raw_connection() for _ in range(3)]
            for pooled in opened:
                pooled.close()
        assert_fault(client.post("/mutate", json={"changes": [todo("t1", "g1")]}))
    finally:
        cleared()
    assert snapshot(app) == before
    # The fault has cleared: the client's retry succeeds at once, on a connection opened since.
    assert wire(mutate(client, todo("t1", "g1"))) == wire({"lastSyncId": 3})
    shut_down(app)


@pytest.mark.sqlite_only("a full disk stands in as SQLite's max_page_count")
def test_a_full_disk_is_503_network_and_the_first_request_after_it_succeeds(database_url):
    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": database_url})
    client = sign_in(app)
    mutate(client, group("g1"), create("Author", "a1", name="A"))
    before = snapshot(app)
    pages = sqlite3.connect(database_path(app)).execute("PRAGMA page_count").fetchone()[0]
    cleared = faulty_new_connections(app, f"PRAGMA max_page_count = {pages}")
    big = todo("t1", "g1") | {"data": todo("t1", "g1")["data"] | {"text": "x" * 30_000}}  # needs new pages
    try:
        assert_fault(client.post("/mutate", json={"changes": [big]}))
    finally:
        cleared()
    assert snapshot(app) == before
    assert wire(mutate(client, big)) == wire({"lastSyncId": 3})
    shut_down(app)


def test_a_lost_database_connection_is_503_network_and_the_first_request_after_it_succeeds(database_url):
    if database_url.startswith("sqlite"):
        pytest.skip("PostgreSQL only: SQLite has no connection to lose")
    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": database_url, "POOL_SIZE": 1})
    client = sign_in(app)
    mutate(client, group("g1"), create("Author", "a1", name="A"))
    before = snapshot(app)
    with app.app_context():
        pooled = db.engine.raw_connection()  # the pool's only connection
        backend = pooled.driver_connection.info.backend_pid
        pooled.close()
    import psycopg

    with psycopg.connect(database_url.replace("postgresql+psycopg", "postgresql").split("?")[0], autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (backend,))  # as a restart or a network cut would

    assert_fault(client.post("/mutate", json={"changes": [todo("t1", "g1")]}))
    assert snapshot(app) == before
    assert wire(mutate(client, todo("t1", "g1"))) == wire({"lastSyncId": 3})
    shut_down(app)


def test_a_write_whose_transaction_the_database_rolled_back_fails_with_the_databases_own_error(app, seeded):
    """SQLite rolls a whole transaction back on a full disk or an I/O error: the error the client's
    answer is made from must be that one (503, retry), not 'no such savepoint' (500, roll back)."""

    class DiskFull(Exception):
        pass

    def work(db_connection):
        db_connection.execute("ROLLBACK")  # as the database does by itself
        raise DiskFull()

    with app.app_context(), pytest.raises(DiskFull):
        in_write_transaction(work)
    mutate(seeded, create("Author", "a9", name="A"))  # and the next write is fine
