"""What PostgreSQL needs said its own way; chosen when DATABASE_URL names it.

SQLite is one file with one writer at a time, so its write lock orders the
log and its PRAGMAs tell other processes of a commit. PostgreSQL runs writers
side by side, on several app servers: this module gives app.py's `?` SQL to
psycopg, in pipeline mode inside a write (statements go out as they come, and
one round trip brings back every result read so far), names the row locks
that make READ COMMITTED writes safe (docs/design.md, "Writes on PostgreSQL"),
takes the log's advisory lock (so commits land in syncId order), notifies
listeners at COMMIT, and holds GET /sync's statement in PostgreSQL's dialect. psycopg itself is imported by SQLAlchemy, only for a PostgreSQL URL
(tests/test_portability.py).
Proved by tests/test_postgres.py and by every test run with TEST_DATABASE_URL.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

BEGIN_READ = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
# Each check locks what it reads (ROW_LOCKS), or is a constraint; so no predicate locks, and no conflict that is not real.
BEGIN_WRITE = "BEGIN ISOLATION LEVEL READ COMMITTED"
ROW_LOCKS = {
    "caller": " FOR SHARE",  # a revocation (an UPDATE of the user) commits before the write, or after it
    "caller_joining": " FOR NO KEY UPDATE",  # creates a sync group: the same user's others wait, so MAX_SYNC_GROUPS_PER_USER holds
    "update": " FOR NO KEY UPDATE",  # read the newest version, and keep it until COMMIT: no lost update
    "delete": " FOR UPDATE",  # and a row being made to reference it (below) commits first, or after
    "reference": " FOR KEY SHARE",  # the row a change names cannot be deleted until COMMIT; it may be updated
}
LOG_LOCK = 0x10C0_5E9C  # the advisory lock key of the log's tail
SCHEMA_LOCK = LOG_LOCK + 1
LARGE_WRITE_LOCK = LOG_LOCK + 2
LARGE_WRITE_WAIT_S = 10


class PostgresConnection:
    """psycopg's connection, taking SQL written with sqlite3's `?` placeholders."""

    def __init__(self, pooled):
        self.pooled, self.driver, self.pipeline = pooled, pooled.driver_connection, None

    def execute(self, sql: str, params: Any = ()):
        return self.driver.execute(pyformat(sql) if isinstance(params, tuple | list) else sql, params)

    def executemany(self, sql: str, rows: list) -> None:
        if self.pipeline is not None:  # psycopg's executemany would sync the pipeline: a round trip
            for row in rows:
                self.driver.execute(pyformat(sql), row)
            return
        with self.driver.cursor() as cursor:
            cursor.executemany(pyformat(sql), rows)

    def stream(self, sql: str, params: list):
        """A server-side cursor, which fetches rows as they are read (sqlite3's cursors always do)."""
        cursor = self.driver.cursor(name="stream")
        cursor.execute(pyformat(sql), params)
        return cursor

    @contextlib.contextmanager
    def pipelined(self):
        """A write transaction's statements are sent as they come, and read when fetched: a fetch waits for
        one round trip that brings back every result sent before it. (The results are all read before COMMIT.)"""
        with self.driver.pipeline() as self.pipeline:
            try:
                yield
            finally:
                self.pipeline = None

    def settle(self) -> None:
        """Every statement sent has its result, and an error among them is raised here. After an error, psycopg
        skips the statements that follow until this sync; then the transaction takes ROLLBACK (TO SAVEPOINT)."""
        if self.pipeline is not None:
            self.pipeline.sync()

    @property
    def in_transaction(self) -> bool:
        return self.driver.info.transaction_status.name != "IDLE"

    def close(self) -> None:
        self.pooled.close()


@functools.lru_cache(maxsize=512)
def pyformat(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


def lock_log(db_connection) -> None:
    """Until this transaction ends: see app.py's lock_log for why."""
    db_connection.execute("SELECT pg_advisory_xact_lock(?)", (LOG_LOCK,))


def try_lock_log(db_connection) -> bool:
    """The log's lock, if no other transaction holds it (writer.py takes in the writes that queue meanwhile)."""
    return db_connection.execute("SELECT pg_try_advisory_xact_lock(?)", (LOG_LOCK,)).fetchone()[0]


@contextlib.contextmanager
def large_write_turn(db_connection):
    """Held by one large write at a time (writer.py), on every app server, outside its transaction. Waited
    for at most LARGE_WRITE_WAIT_S: then lock_timeout's error, answered 503 type network (database.as_fault)."""
    with db_connection.driver.transaction():  # a session's lock, taken in a transaction only for SET LOCAL
        db_connection.execute(f"SET LOCAL lock_timeout = '{LARGE_WRITE_WAIT_S}s'")
        db_connection.execute("SELECT pg_advisory_lock(?)", (LARGE_WRITE_LOCK,))
    try:
        yield
    finally:
        db_connection.execute("SELECT pg_advisory_unlock(?)", (LARGE_WRITE_LOCK,))


def lock_schema(db_connection) -> None:
    db_connection.execute("SELECT pg_advisory_xact_lock(?)", (SCHEMA_LOCK,))


def notify_log(db_connection) -> None:
    """Delivered at COMMIT to every listener of the database, so it names its schema: see long_poll.py."""
    db_connection.execute("SELECT pg_notify('sync_log', current_schema())")


def listen_for_commits(engine, stopped, heard) -> None:
    """Call `heard` after each write transaction of this schema commits, on any app server, until `stopped()`."""
    pooled = engine.raw_connection()
    listener = pooled.driver_connection  # a connection of its own, outside the pool
    pooled.detach()
    try:
        listener.execute("LISTEN sync_log")
        (schema,) = listener.execute("SELECT current_schema()").fetchone()
        heard()  # what committed before LISTEN
        while not stopped():
            # Another schema's notifications are another log's.
            if any(notification.payload == schema for notification in listener.notifies(timeout=1.0)):
                heard()
    finally:
        listener.close()


COLUMNS = "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = ?"


def start_log_after(db_connection, sync_id: int) -> None:
    db_connection.execute("SELECT setval(pg_get_serial_sequence('sync_action', 'id'), ?)", (sync_id,))


# A sync action as the wire's JSON. Written out, not json_build_object, whose text has spaces around every colon.
WIRE_ACTION = """'{"syncId":' || id || ',"action":' || to_json(action) || ',"modelName":' || to_json(model_name)
            || ',"modelId":' || to_json(model_id) || coalesce(',"data":' || nullif(data, 'null'), '') || '}'"""

# An action's bytes on the wire, near enough, without building it: its row's, its id's, and 100 for the rest.
ACTION_BYTES = "coalesce(octet_length(data), 0) + octet_length(model_id) + 100"

# machinery/sqlite.py's PAGE, said in PostgreSQL's dialect; a single statement reads one snapshot here too.
PAGE = f"""
WITH log AS (
    SELECT log_start, coalesce((SELECT max(id) FROM sync_action), log_start) AS head
    FROM (SELECT coalesce((SELECT after_sync_id FROM sync_log_start), 0) AS log_start) AS start
),
caller_groups(sync_group) AS (
    SELECT 'all' UNION ALL SELECT sync_group FROM memberships WHERE user_id = %(user_id)s
),
page AS (
    SELECT least(%(until)s, head) AS cursor FROM log
),
visible AS (
    SELECT id, {ACTION_BYTES} AS size
    FROM sync_action
    WHERE id IN (
        SELECT sync_action_id FROM sync_action_group
        WHERE sync_group IN (SELECT sync_group FROM caller_groups)
          AND sync_action_id > %(since)s AND sync_action_id <= (SELECT cursor FROM page)
    )
),
sized AS (
    SELECT id, sum(size) OVER (ORDER BY id) - size AS before FROM visible
)
SELECT log_start, (SELECT reason FROM sync_log_start), head,
    CASE WHEN EXISTS (SELECT 1 FROM sized WHERE before >= %(max_bytes)s)
        THEN (SELECT max(id) FROM sized WHERE before < %(max_bytes)s) ELSE cursor END,
    (SELECT array_to_json(array_agg(sync_group ORDER BY sync_group <> 'all', sync_group))::text FROM caller_groups),
    (SELECT coalesce(string_agg({WIRE_ACTION}, ',' ORDER BY id), '') FROM sync_action
     WHERE id IN (SELECT id FROM sized WHERE before < %(max_bytes)s)),
    (SELECT coalesce(max(id), 0) FROM membership_change),
    (SELECT token_sha256 FROM users WHERE id = %(user_id)s)
FROM log, page
"""
