"""Connections, the two engines' settings, and the schema.

app.py speaks plain SQL with `?` placeholders to the driver's own connection
(sqlite3's, or psycopg's through machinery/postgres.py): its statements stay
in plain sight, and SQLAlchemy's ORM layer cost more than the SQL. This
module gets those connections from SQLAlchemy's pool, sets each engine up so
that transactions begin only where app.py and writer.py say BEGIN, and
creates the tables of models.py, safely when several server processes start
at once. Proved by tests/test_bootstrap.py (one snapshot), tests/test_sqlite.py,
tests/test_postgres.py, tests/test_concurrency.py (servers starting together),
tests/test_errors.py (an exhausted pool, faults that may pass) and tests/test_cli.py.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from flask import current_app, g
from sqlalchemy import event, inspect
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.schema import CreateIndex, CreateTable, DropTable

from machinery import postgres
from machinery.errors import ApiError, database_busy
from models import db

DbConnection = Any  # sqlite3's connection, or postgres.PostgresConnection: both take the same SQL


@dataclass(frozen=True)
class Flavour:
    """What one kind of database needs said its own way."""

    name: str  # "sqlite" or "postgresql"
    dialect: Dialect  # SQLAlchemy's, whose column types convert values to and from the driver's
    begin_read: str  # one snapshot for every statement until COMMIT
    begin_write: str  # SQLite: the write lock at once; PostgreSQL: READ COMMITTED, with row locks (postgres.ROW_LOCKS)

    @property
    def postgres(self) -> bool:
        return self.name == "postgresql"


def flavour() -> Flavour:
    return current_app.extensions["flavour"]


def configure_database(engine: Engine, config: dict[str, Any]) -> Flavour:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection, _record):
        # Neither driver should begin transactions on its own: sqlite3 does not
        # emit BEGIN before a SELECT, so two SELECTs of one "transaction" could
        # read two different snapshots. Take BEGIN away from the driver and
        # emit it ourselves.
        if engine.dialect.name == "postgresql":
            dbapi_connection.autocommit = True
            return
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA journal_mode = WAL")  # readers never block the writer
        dbapi_connection.execute("PRAGMA synchronous = FULL")  # a 200 from /mutate is on disk
        dbapi_connection.execute("PRAGMA journal_size_limit = 67108864")  # 64 MiB: the WAL shrinks back after a big write
        dbapi_connection.execute("PRAGMA foreign_keys = ON")
        dbapi_connection.execute(f"PRAGMA busy_timeout = {int(config['SQLITE_BUSY_TIMEOUT_MS'])}")

    if engine.dialect.name == "postgresql":
        return Flavour("postgresql", engine.dialect, postgres.BEGIN_READ, postgres.BEGIN_WRITE)
    if engine.dialect.name == "sqlite":
        return Flavour("sqlite", engine.dialect, "BEGIN DEFERRED", "BEGIN IMMEDIATE")
    raise RuntimeError(f"DATABASE_URL names a {engine.dialect.name} database; this app runs on SQLite or PostgreSQL.")


def connection() -> DbConnection:
    """This request's (or CLI command's) database connection, from the pool; returned at teardown."""
    if "connection" not in g:
        g.connection = own_connection()
    return g.connection


def own_connection() -> DbConnection:
    """A connection from the pool for the caller alone (a streamed bootstrap holds one), to close when done.

    When every connection of the pool stays in use past its timeout, the request is
    answered 503 type network: the client retries it, rather than rolling a change back."""
    try:
        pooled = db.engine.raw_connection()
    except PoolTimeout:
        raise database_busy("Every database connection of this server is in use; nothing was done. Retry shortly.") from None
    return speaking_sql(pooled)


def read_in_time(chunks: Iterator[str], environ: dict) -> Iterator[str]:
    """A streamed answer read from one snapshot (a bootstrap), to be read within BOOTSTRAP_MAX_S.
    Past that it is cut off, and the client, seeing a broken answer, asks again: the snapshot
    ends, so SQLite can checkpoint its write-ahead log and PostgreSQL vacuum. A client that
    stops reading is cut off too, when a send to it times out."""
    limit_s = current_app.config["BOOTSTRAP_MAX_S"]  # read now: the answer is sent after the request's context ends
    deadline, client = time.monotonic() + limit_s, environ.get("gunicorn.socket") or environ.get("werkzeug.socket")

    def cut_off_in_time() -> Iterator[str]:
        before = client.gettimeout() if client else None
        try:
            for chunk in chunks:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"the answer was not read within BOOTSTRAP_MAX_S ({limit_s} s)")
                if client:
                    client.settimeout(left)
                yield chunk
        finally:
            if client:
                client.settimeout(before)

    return cut_off_in_time()


def speaking_sql(pooled) -> DbConnection:
    """A pooled connection, as the app's SQL is sent to it."""
    return postgres.PostgresConnection(pooled) if flavour().postgres else pooled


def return_connection(_error=None) -> None:
    pooled = g.pop("connection", None)
    if pooled is not None:
        pooled.close()  # back to the pool, which rolls back anything left open


@contextmanager
def read_transaction() -> Iterator[DbConnection]:
    """One snapshot for every statement inside, ended before the answer is sent
    (a held poll must not pin the WAL)."""
    db_connection = connection()
    db_connection.execute(flavour().begin_read)
    try:
        yield db_connection
    finally:
        db_connection.execute("COMMIT")


# Faults that may pass, refused with 503 type network so that the client retries instead of
# rolling a good change back. SQLite: a read-only file, an I/O error, a full disk, a file it
# cannot open, no memory, busy past its timeout. PostgreSQL: a lost connection (class 08, or no
# SQLSTATE), no resources (53: disk full, memory, connections), a server shutting down (57P), a
# statement or lock timeout (57014, 55P03), an I/O error (58), a read-only server (25006). A
# misconfigured server is one too: the change is fine, and the client keeps it until it is fixed.
SQLITE_FAULTS = {sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL, sqlite3.SQLITE_CANTOPEN,
                 sqlite3.SQLITE_NOMEM, sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}
POSTGRES_FAULTS = ("08", "53", "57P", "57014", "55P03", "58", "25006")
POSTGRES_CONNECTION_LOST = ("08", "57P", "25006")  # and a read-only server: connections opened to it


def as_fault(error: BaseException) -> ApiError | None:
    """The answer to a fault that may pass, or None. Where the fault may be in the connections
    themselves (opened read-only, or to a server that went away), the pool starts afresh."""
    if isinstance(error, sqlite3.Error):
        transient = fresh_pool = getattr(error, "sqlite_errorcode", 0) & 0xFF in SQLITE_FAULTS
    else:
        sqlstate = getattr(error, "sqlstate", None)
        transient = sqlstate.startswith(POSTGRES_FAULTS) if sqlstate else type(error).__name__ == "OperationalError"
        fresh_pool = transient and (sqlstate is None or sqlstate.startswith(POSTGRES_CONNECTION_LOST))
    if not transient:
        return None
    current_app.logger.warning("database fault, answered 503: %s", error)
    if fresh_pool:
        if (pooled := g.pop("connection", None)) is not None:
            getattr(pooled, "pooled", pooled).invalidate()
        db.engine.dispose()  # closes the idle ones; those in use are dropped when given back
    return ApiError(503, "database_unavailable", "The database failed for a moment; the server's log says how. Retry shortly.",
                    type="network", headers={"Retry-After": "1"})


def is_retryable(error: BaseException) -> bool:
    """The database could not run the transaction now, but may on a retry."""
    if isinstance(error, sqlite3.OperationalError):
        return getattr(error, "sqlite_errorcode", 0) & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return getattr(error, "sqlstate", None) in ("40001", "40P01")  # serialization failure, deadlock


def schema_statements(drop: bool = False) -> list[str]:
    """The DDL of models.py, idempotent, so processes starting together cannot collide."""
    tables = db.metadata.sorted_tables
    if drop:
        return [str(DropTable(table, if_exists=True).compile(db.engine)) for table in reversed(tables)]
    statements = [str(CreateTable(table, if_not_exists=True).compile(db.engine)) for table in tables]
    statements += [str(CreateIndex(index, if_not_exists=True).compile(db.engine)) for table in tables for index in table.indexes]
    return statements


def schema_is_complete(engine: Engine) -> bool:
    """Whether every table and index of models.py exists, read from the catalog.

    A server starting on an existing database runs no DDL: on PostgreSQL even
    CREATE INDEX IF NOT EXISTS locks its table against writes, so a server
    starting beside busy ones deadlocked with their writers, and every
    mutation stalled for PostgreSQL's deadlock_timeout (1 s)."""
    catalog = inspect(engine)
    for table in db.metadata.sorted_tables:
        if not catalog.has_table(table.name):
            return False
        if {index.name for index in table.indexes} - {index["name"] for index in catalog.get_indexes(table.name)}:
            return False
        if {column.name for column in table.columns} - {column["name"] for column in catalog.get_columns(table.name)}:
            return False
    return True


def create_schema(db_connection: DbConnection) -> None:
    if flavour().postgres:
        postgres.lock_schema(db_connection)  # CREATE TABLE IF NOT EXISTS can still collide with a concurrent one there
    for statement in schema_statements():
        db_connection.execute(statement)
    # A database made by an older version lacks the columns added since; they are nullable (their old rows have none).
    # (PostgreSQL's snapshot may predate another process's CREATE TABLE, hence IF NOT EXISTS there.)
    listed, if_new = (postgres.COLUMNS, "IF NOT EXISTS ") if flavour().postgres else ("SELECT name FROM pragma_table_info(?)", "")
    for table in db.metadata.sorted_tables:
        existing = {name for (name,) in db_connection.execute(listed, (table.name,))}
        for column in (column for column in table.columns if column.name not in existing):
            db_connection.execute(f"ALTER TABLE {table.name} ADD COLUMN {if_new}{column.name} {column.type.compile(db.engine.dialect)}")


def start_log_after(db_connection: DbConnection, sync_id: int) -> None:
    """The next syncId handed out is sync_id + 1."""
    if flavour().postgres:
        postgres.start_log_after(db_connection, sync_id)
    else:
        db_connection.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('sync_action', ?)", (sync_id,))


def engine_options(config: dict[str, Any]) -> dict[str, Any]:
    """The pool: POOL_SIZE connections a process, and a request that waits POOL_TIMEOUT_S for one is
    answered 503 (own_connection). SQLite's may be used by a thread other than the one that opened
    them: under the gevent worker, writer.py commits in gevent's thread pool (event_loop.py)."""
    options = {"pool_size": config["POOL_SIZE"], "max_overflow": 0, "pool_timeout": config["POOL_TIMEOUT_S"]}
    if config["SQLALCHEMY_DATABASE_URI"].startswith("sqlite"):
        options["connect_args"] = {"check_same_thread": False}
    return options
