"""How SQLite is set up: durable, serializable writes and one snapshot per read."""

import sqlite3

import pytest
from sqlalchemy import event, text

from helpers import database_path, mutate, todo, wire
from models import db

pytestmark = pytest.mark.sqlite_only("SQLite's own settings: pragmas, BEGIN modes, sqlite3's statement trace, its query plans")


def test_connections_use_wal_full_sync_foreign_keys_a_busy_timeout_and_a_bounded_wal(app):
    with app.app_context():

        def pragma(name):
            return db.session.execute(text(f"PRAGMA {name}")).scalar()

        assert pragma("journal_mode") == "wal"
        assert pragma("synchronous") == 2  # FULL
        assert pragma("foreign_keys") == 1
        assert pragma("busy_timeout") == app.config["SQLITE_BUSY_TIMEOUT_MS"]
        assert pragma("journal_size_limit") == 64 * 1024 * 1024  # a checkpointed WAL shrinks back to this


def record_statements(app, by_connection: dict | None = None) -> list[str]:
    """The statements SQLite runs for the app from now on: 'BEGIN <mode>' or the first keyword
    (also in `by_connection`, per database connection, if given)."""
    statements: list[str] = []

    def recorder(dbapi_connection, _record):
        def record(statement):
            words = statement.split()
            statements.append(" ".join(words[:2]) if words[0] == "BEGIN" else words[0])
            if by_connection is not None:
                by_connection.setdefault(id(dbapi_connection), []).append(statements[-1])

        dbapi_connection.set_trace_callback(record)

    with app.app_context():
        db.engine.dispose()  # every connection from now on is a new one, traced
        event.listen(db.engine, "connect", recorder)
    return statements


def test_a_mutation_takes_the_write_lock_at_begin(app, seeded):
    statements = record_statements(app)
    mutate(seeded, todo("t2", "g1"))
    write = statements[statements.index("BEGIN IMMEDIATE") :]
    assert "INSERT" in write and "BEGIN DEFERRED" not in write
    assert "INSERT" not in statements[: -len(write)]  # nothing is written before the lock is held


def test_reads_run_in_one_explicit_transaction(app, seeded):
    by_connection: dict = {}
    record_statements(app, by_connection)
    assert wire(seeded.get("/bootstrap?type=eager&models=Todo,Group").get_json()["firstSyncId"]) == wire(5)  # read to its end
    # One connection checks the token; the bootstrap reads on its own, in one transaction.
    reads = max(by_connection.values(), key=len)
    assert reads[0] == "BEGIN DEFERRED" and reads.count("BEGIN DEFERRED") == 1
    assert reads.count("SELECT") >= 4  # groups, the head, each model: all after that one BEGIN


def test_the_group_join_table_is_indexed_for_group_and_range_lookups(app, seeded):
    with sqlite3.connect(database_path(app)) as connection:
        plan = connection.execute(
            "EXPLAIN QUERY PLAN SELECT sync_action_id FROM sync_action_group "
            "WHERE sync_group IN ('all', 'group:g1') AND sync_action_id > 3 ORDER BY sync_action_id"
        ).fetchall()
    details = " ".join(row[-1] for row in plan)
    assert "USING" in details and "INDEX" in details, details
    assert "sync_group=? AND sync_action_id>?" in details, details
