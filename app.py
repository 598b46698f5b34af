"""A Loco Sync backend: mutate, bootstrap and sync over JSON, on SQLite or PostgreSQL.

Read top to bottom, this file follows the protocol:
  1. configuration                      create_app
  2. database setup                     configure_database, lock_log, read_head
  3. who is calling                     authenticate, caller_sync_groups
  4. POST /mutate    (sendTransaction)  commit_changes writes rows + sync actions
  5. GET /bootstrap  (bootstrap)        rows and firstSyncId from one snapshot
  6. GET /sync       (deltaSync, poll)  the sync actions after a syncId
  7. GET /openapi.json, GET /           the API described; the live demo page
  8. errors                             ApiError and the JSON error shape
  9. CLI                                init-db, seed, create-user, add-member, remove-member
Tables, wire schemas and sync-group rules live in models.py.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import hmac
import json
import os
import random
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import click
import psycopg
from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, Flask, current_app, g, render_template, request
from flask.cli import with_appcontext
from marshmallow import Schema, ValidationError, fields, post_load, validate, validates_schema
from sqlalchemy import event, inspect
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.schema import CreateIndex, CreateTable, DropTable
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from models import INT64, MAX_ID_LENGTH, SYNCED_MODELS, SyncedModel, db, model_id

api = Blueprint("api", __name__)
T = TypeVar("T")

MAX_CHANGES = 1000
DEFAULT_LIMIT = 1000
MAX_LIMIT = 5000
MAX_WAIT_S = 30
BOOTSTRAP_CHUNK = 1000  # rows encoded and sent at a time


# --- 1. Configuration -------------------------------------------------------


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__, instance_relative_config=True)
    app.config.from_mapping(
        SQLALCHEMY_DATABASE_URI=os.environ.get("DATABASE_URL") or "sqlite:///" + os.path.join(app.instance_path, "loco.sqlite3"),
        MAX_CONTENT_LENGTH=1024 * 1024,
        SQLITE_BUSY_TIMEOUT_MS=2000,  # how long one attempt waits for the write lock
        BUSY_RETRIES=3,  # SQLite: further attempts, with backoff, before answering 503
        BUSY_BACKOFF_S=0.05,
        # PostgreSQL: serializable transactions are expected to conflict now and then, and a
        # retry at once mostly succeeds: more attempts, sooner.
        SERIALIZATION_RETRIES=10,
        SERIALIZATION_BACKOFF_S=0.001,
        CORS_ORIGIN="*",  # which browser origins may call the API
        MAX_HOLD_S=MAX_WAIT_S,  # the longest a poll is held, whatever its wait=
        LOG_CHECK_INTERVAL_S=0.002,  # how often a process looks for other processes' commits while polls are held
    )
    if test_config is None:
        app.config.from_pyfile("config.py", silent=True)
        if os.environ.get("DATABASE_URL"):  # the environment wins over the file, as a one-off command expects
            app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["DATABASE_URL"]
    else:
        app.config.from_mapping(test_config)
    app.json.sort_keys = False
    os.makedirs(app.instance_path, exist_ok=True)

    db.init_app(app)
    with app.app_context():
        chosen = app.extensions["flavour"] = configure_database(db.engine, app.config)
        sqlite_file = None if chosen.postgres else db.engine.url.database
        app.extensions["log_watcher"] = LogWatcher(db.engine, sqlite_file, app.config["LOG_CHECK_INTERVAL_S"])
        app.extensions["writer"] = Writer(sqlite_file, app.config, postgres=chosen.postgres)
        if not schema_is_complete(db.engine):
            # Under the write lock, with busy retries, so server processes starting together do not race.
            in_write_transaction(create_schema)
    app.teardown_appcontext(return_connection)

    app.register_blueprint(api)
    app.add_url_rule("/openapi.json", view_func=openapi_document)  # not on `api`: it needs no token
    app.add_url_rule("/", view_func=demo_page)
    app.after_request(allow_cross_origin)
    app.register_error_handler(ApiError, error_response)
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, unexpected_error)
    for command in (init_db_command, seed_command, create_user_command, add_member_command, remove_member_command):
        app.cli.add_command(command)
    return app


def allow_cross_origin(response):
    # Client prototypes often run on another origin (a dev server). The API
    # uses no cookies, so a page can only send what it could send anyway.
    response.headers["Access-Control-Allow-Origin"] = current_app.config["CORS_ORIGIN"]
    response.headers["Access-Control-Allow-Methods"] = "GET, POST"
    response.headers["Access-Control-Allow-Headers"] = "Content-Type, Authorization"
    response.headers["Access-Control-Expose-Headers"] = "Retry-After"
    response.headers["Access-Control-Max-Age"] = "600"
    return response


# --- 2. Database setup ------------------------------------------------------
# The endpoints speak SQL to the driver's own connection (sqlite3's or
# psycopg's), with the statements in plain sight. SQLAlchemy provides the
# pool, the connect-time settings and the schema (models.py); its ORM layer
# cost more than the SQL. SQLite is the default; DATABASE_URL may name a
# PostgreSQL database instead. What the two do differently is all here.

DbConnection = Any  # sqlite3's connection, or PostgresConnection: both take the same SQL


@dataclass(frozen=True)
class Flavour:
    """What one kind of database needs said its own way."""

    name: str  # "sqlite" or "postgresql"
    dialect: Dialect  # SQLAlchemy's, whose column types convert values to and from the driver's
    begin_read: str  # one snapshot for every statement until COMMIT
    begin_write: str  # serializable, and on SQLite the write lock at once
    page: str  # GET /sync's one statement: see PAGE_SQLITE

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
        dbapi_connection.execute("PRAGMA foreign_keys = ON")
        dbapi_connection.execute(f"PRAGMA busy_timeout = {int(config['SQLITE_BUSY_TIMEOUT_MS'])}")

    if engine.dialect.name == "postgresql":
        chosen = Flavour(
            "postgresql", engine.dialect, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", "BEGIN ISOLATION LEVEL SERIALIZABLE", PAGE_POSTGRESQL
        )
    elif engine.dialect.name == "sqlite":
        chosen = Flavour("sqlite", engine.dialect, "BEGIN DEFERRED", "BEGIN IMMEDIATE", PAGE_SQLITE)
    else:
        raise RuntimeError(f"DATABASE_URL names a {engine.dialect.name} database; this app runs on SQLite or PostgreSQL.")
    return chosen


class PostgresConnection:
    """psycopg's connection, taking SQL written with sqlite3's `?` placeholders."""

    def __init__(self, pooled):
        self.pooled, self.driver = pooled, pooled.driver_connection

    def execute(self, sql: str, params: Any = ()):
        return self.driver.execute(pyformat(sql) if isinstance(params, tuple | list) else sql, params)

    def executemany(self, sql: str, rows: list) -> None:
        with self.driver.cursor() as cursor:
            cursor.executemany(pyformat(sql), rows)

    def stream(self, sql: str, params: list):
        """A server-side cursor, which fetches rows as they are read (sqlite3's cursors always do)."""
        cursor = self.driver.cursor(name="stream")
        cursor.execute(pyformat(sql), params)
        return cursor

    @property
    def in_transaction(self) -> bool:
        return self.driver.info.transaction_status != psycopg.pq.TransactionStatus.IDLE

    def close(self) -> None:
        self.pooled.close()


@functools.lru_cache(maxsize=512)
def pyformat(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


def connection() -> DbConnection:
    """This request's (or CLI command's) database connection, from the pool; returned at teardown."""
    if "connection" not in g:
        g.connection = speaking_sql(db.engine.raw_connection())
    return g.connection


def speaking_sql(pooled) -> DbConnection:
    """A pooled connection, as the app's SQL is sent to it."""
    return PostgresConnection(pooled) if flavour().postgres else pooled


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


def schema_statements(drop: bool = False) -> list[str]:
    """The DDL of models.py, idempotent, so processes starting together cannot collide."""
    tables = db.metadata.sorted_tables
    if drop:
        return [str(DropTable(table, if_exists=True).compile(db.engine)) for table in reversed(tables)]
    statements = [str(CreateTable(table, if_not_exists=True).compile(db.engine)) for table in tables]
    statements += [str(CreateIndex(index, if_not_exists=True).compile(db.engine)) for table in tables for index in table.indexes]
    return statements


class WriteLock:
    """One writer at a time, across the processes of this server, on SQLite.

    SQLite lets only one transaction write; a second one waits in SQLite's
    busy handler, which sleeps up to 100 ms between tries, so writers of two
    processes spent most of their time asleep. Queueing on a file lock
    instead hands the turn over the moment it is free. (SQLite's busy
    timeout still covers writers that do not take this lock, like the CLI.)
    PostgreSQL needs no such lock: its writers run side by side, and only
    the step that appends to the log takes turns (lock_log).
    """

    def __init__(self, database: str | None):
        self.path = f"{database}-writer.lock" if database else None  # None: in memory, or not SQLite
        self.file, self.pid = -1, 0

    def __enter__(self) -> None:
        if self.path is None:
            return
        if self.pid != os.getpid():  # opened after a fork, so that processes do not share it
            self.file, self.pid = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600), os.getpid()
        fcntl.flock(self.file, fcntl.LOCK_EX)

    def __exit__(self, *_) -> None:
        if self.path is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)


LOG_LOCK = 0x10C0_5E9C  # the advisory lock key of the log's tail, on PostgreSQL


def lock_log(db_connection: DbConnection) -> None:
    """Take the log's tail until this transaction ends, so that transactions
    commit in the order of the syncIds they take. On SQLite the write lock,
    held from BEGIN IMMEDIATE, already does. On PostgreSQL, ids from a
    sequence are handed out at insert time but become visible at commit: A
    could take 10, B take 11 and commit, a poller read past 11, and only then
    A commit 10, which that poller would never see."""
    if flavour().postgres:
        db_connection.execute("SELECT pg_advisory_xact_lock(?)", (LOG_LOCK,))


def is_retryable(error: BaseException) -> bool:
    """The database could not run the transaction now, but may on a retry."""
    if isinstance(error, sqlite3.OperationalError):
        return getattr(error, "sqlite_errorcode", 0) & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return getattr(error, "sqlstate", None) in ("40001", "40P01")  # serialization failure, deadlock


LOG_BOUNDS = "SELECT (SELECT max(id) FROM sync_action), (SELECT after_sync_id FROM sync_log_start)"


def read_log_bounds(db_connection: DbConnection) -> tuple[int, int]:
    """Where this database's log starts (0, or above the log init-db wiped) and
    its head, the greatest syncId, as seen by the current transaction's snapshot."""
    newest, start = db_connection.execute(LOG_BOUNDS).fetchone()
    return start or 0, newest or start or 0


def read_head(db_connection: DbConnection) -> int:
    return read_log_bounds(db_connection)[1]


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
    return True


def create_schema(db_connection: DbConnection) -> None:
    if flavour().postgres:
        # CREATE TABLE IF NOT EXISTS can still collide with a concurrent one there.
        db_connection.execute("SELECT pg_advisory_xact_lock(?)", (LOG_LOCK + 1,))
    for statement in schema_statements():
        db_connection.execute(statement)


def start_log_after(db_connection: DbConnection, sync_id: int) -> None:
    """The next syncId handed out is sync_id + 1."""
    if flavour().postgres:
        db_connection.execute("SELECT setval(pg_get_serial_sequence('sync_action', 'id'), ?)", (sync_id,))
    else:
        db_connection.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('sync_action', ?)", (sync_id,))


# --- 3. Who is calling -----------------------------------------------------


@api.before_request
def authenticate() -> None:
    """Every API request names its user with `Authorization: Bearer <token>`."""
    if request.method == "OPTIONS":
        return  # a CORS preflight carries no credentials
    g.user_id = user_for_token(request.headers.get("Authorization"))


TOKEN = re.compile(r"(?i:bearer) +([1-9][0-9]{0,17})\.([A-Za-z0-9_-]{1,100})")
NO_SUCH_TOKEN = hashlib.sha256(b"").hexdigest()


def user_for_token(header: str | None) -> int:
    if not header:
        raise unauthorized("Send the header Authorization: Bearer <token>.")
    match = TOKEN.fullmatch(header.strip())
    if match is None:
        raise unauthorized(
            "The Authorization header must be 'Bearer <token>', with a token as printed by "
            "`flask --app app create-user` or `seed`."
        )
    user_id = int(match[1])
    stored = connection().execute("SELECT token_sha256 FROM users WHERE id = ?", (user_id,)).fetchone()
    # Compare hashes in constant time, and compare even when there is no such user.
    known = hmac.compare_digest(sha256(match[2]), stored[0] if stored else NO_SUCH_TOKEN)
    if not (stored and known):
        raise unauthorized("Unknown token.")
    return user_id


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, type="auth", headers={"WWW-Authenticate": "Bearer"})


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def caller_sync_groups(user_id: int, db_connection: DbConnection) -> list[str]:
    memberships = db_connection.execute("SELECT sync_group FROM memberships WHERE user_id = ? ORDER BY sync_group", (user_id,))
    return ["all", *(sync_group for (sync_group,) in memberships)]


def new_user(db_connection: DbConnection, name: str) -> tuple[int, str]:
    """Add a user; return its id and token. Only a hash of the secret is
    kept, so this is the one chance to see the token."""
    secret = secrets.token_urlsafe(32)
    insert = "INSERT INTO users (name, token_sha256) VALUES (?, ?) RETURNING id"
    (user_id,) = db_connection.execute(insert, (name, sha256(secret))).fetchone()
    return user_id, f"{user_id}.{secret}"


def join(db_connection: DbConnection, user_id: int, sync_group: str) -> None:
    db_connection.execute("INSERT INTO memberships (user_id, sync_group) VALUES (?, ?) ON CONFLICT DO NOTHING", (user_id, sync_group))


def leave(db_connection: DbConnection, user_id: int, sync_group: str) -> None:
    db_connection.execute("DELETE FROM memberships WHERE user_id = ? AND sync_group = ?", (user_id, sync_group))


# --- 4. POST /mutate --------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One validated change; `data` uses column names, not wire names."""

    action: str  # create | update | delete
    model: SyncedModel
    model_id: str
    data: dict[str, Any]


class ChangeSchema(Schema):
    action = fields.String(required=True, validate=validate.OneOf(["create", "update", "delete"]))
    model_name = fields.String(data_key="modelName", required=True)
    model_id = model_id(data_key="modelId", required=True)
    data = fields.Dict(keys=fields.String())

    @post_load
    def to_change(self, change: dict[str, Any], **_) -> Change:
        action, name, row_id = change["action"], change["model_name"], change["model_id"]
        model = SYNCED_MODELS.get(name)
        if model is None:
            known = ", ".join(sorted(SYNCED_MODELS))
            raise ValidationError({"modelName": [f"Unknown model {name!r}. Known models: {known}."]})
        data = change.get("data")
        if action == "delete":
            if data is not None:
                raise ValidationError({"data": ["A delete change carries no data."]})
            return Change(action, model, row_id, {})
        if data is None:
            raise ValidationError({"data": [f"Missing data for required field (an {action} needs it)."]})
        try:
            # A create sends every field; an update only the ones it changes.
            row = model.schema.load(data, partial=action == "update")
        except ValidationError as error:
            raise ValidationError({"data": error.messages}) from error
        if action == "create" and row["id"] != row_id:
            raise ValidationError({"data": {"id": [f"data.id {row['id']!r} must equal modelId {row_id!r}."]}})
        if action == "update" and "id" in row:
            raise ValidationError({"data": {"id": ["An update cannot set id; the row is named by modelId."]}})
        return Change(action, model, row_id, row)


class MutateSchema(Schema):
    changes = fields.List(
        fields.Nested(ChangeSchema),
        required=True,
        validate=validate.Length(1, MAX_CHANGES, error="A transaction has {min} to {max} changes."),
    )
    transaction_id = fields.String(data_key="transactionId", validate=validate.Length(1, MAX_ID_LENGTH))


@api.post("/mutate")
def mutate():
    body = json_body()
    mutation = load(shared(MutateSchema), body)
    last_sync_id = commit_changes(mutation["changes"], g.user_id, mutation.get("transaction_id"), fingerprint(body["changes"]))
    return {"lastSyncId": last_sync_id}


def fingerprint(changes: Any) -> str:
    """Identifies a request body, so a reused transactionId with other changes is caught."""
    canonical = json.dumps(changes, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def commit_changes(changes: list[Change], user_id: int, transaction_id: str | None = None, changes_sha256: str = "") -> int:
    """Write the rows, one sync action per change and their group links in
    one transaction, as `user_id`, and return the greatest syncId it created.

    This is the only place rows and sync actions are written. The step that
    appends to the log holds the log's lock until COMMIT (lock_log), so
    transactions commit in syncId order and a poller can never see syncId
    n+1 before n.
    """
    last_sync_id = in_write_transaction(lambda db_connection: apply_transaction(db_connection, changes, user_id, transaction_id, changes_sha256))
    log_watcher().advance(last_sync_id)  # wake this process's held polls now, not at the next check
    return last_sync_id


def in_write_transaction(work: Callable[[DbConnection], T]) -> T:
    """Run `work` in a write transaction, commit it and return what it returned."""
    return current_app.extensions["writer"].run(work)


class Writer:
    """Commits the writes of this process, one transaction at a time.

    Writes that arrive while a transaction commits wait their turn together,
    then share the next transaction and its one fsync (group commit), each
    inside a savepoint of its own: a write that is refused or fails is rolled
    back alone, and each one still sees the writes committed before it, as
    if it ran alone. Whichever waiting thread gets the turn first commits
    them all; the others wait on a condition, not on a lock, so each one
    returns the moment its transaction has committed. Across processes,
    SQLite's writers queue on a file lock (WriteLock). A transaction the
    database could not run now (SQLite busy; on PostgreSQL a serialization
    failure or a deadlock) is retried whole, with backoff, then refused.
    """

    def __init__(self, sqlite_file: str | None, config: dict[str, Any], postgres: bool):
        self.lock = WriteLock(sqlite_file)
        # On SQLite only writers outside this server (the CLI) make it busy; on PostgreSQL
        # conflicting transactions retry at once, and jitter keeps them from colliding again.
        prefix = "SERIALIZATION" if postgres else "BUSY"
        self.retries, self.backoff_s, self.jitter = config[f"{prefix}_RETRIES"], config[f"{prefix}_BACKOFF_S"], postgres
        self.changed = threading.Condition()
        self.committing = False  # some thread is committing a transaction of this process
        self.queued: list[Write] = []

    def run(self, work: Callable[[DbConnection], T]) -> T:
        write = Write(work)
        with self.changed:
            self.queued.append(write)
            while self.committing and not write.done:
                self.changed.wait()
            if write.done:  # another thread committed it
                return write.outcome()
            self.committing = True
            batch, self.queued = self.queued, []
        try:
            self.commit(batch, connection())
        finally:
            with self.changed:
                for waiting in batch:  # never leave a thread without an answer
                    if not waiting.done:
                        waiting.fail(RuntimeError("the write transaction was interrupted"))
                self.committing = False
                self.changed.notify_all()
        return write.outcome()

    def commit(self, batch: list[Write], db_connection: DbConnection) -> None:
        for attempt in range(self.retries + 1):
            try:
                with self.lock:
                    db_connection.execute(flavour().begin_write)  # on SQLite the write lock is taken now, not at the first write
                    try:
                        for write in batch:
                            write.apply(db_connection)
                        db_connection.execute("COMMIT")
                    finally:
                        if db_connection.in_transaction:
                            db_connection.execute("ROLLBACK")
                for write in batch:
                    write.done = True
                return
            except Exception as error:
                if not is_retryable(error):
                    for write in batch:
                        write.fail(error)
                    return
            if attempt < self.retries:
                time.sleep(self.backoff_s * 2**attempt * (random.uniform(0.5, 1.5) if self.jitter else 1))
        for write in batch:
            write.fail(
                ApiError(
                    503,
                    "database_busy",
                    "The database stayed busy with other writers (locked, or in conflict with them); nothing was written. Retry shortly.",
                    type="network",
                    headers={"Retry-After": "1"},
                )
            )


class Write:
    """One caller's work in a shared write transaction, and what came of it."""

    def __init__(self, work: Callable[[DbConnection], Any]):
        self.work, self.done = work, False
        self.result: Any = None
        self.error: BaseException | None = None

    def apply(self, db_connection: DbConnection) -> None:
        db_connection.execute("SAVEPOINT write")
        try:
            self.result, self.error = self.work(db_connection), None
        except Exception as error:
            if is_retryable(error):
                raise  # the whole transaction is retried
            db_connection.execute("ROLLBACK TO SAVEPOINT write")  # undo this write, and only it
            self.result, self.error = None, error
        db_connection.execute("RELEASE SAVEPOINT write")

    def fail(self, error: BaseException) -> None:
        self.result, self.error, self.done = None, error, True

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


@dataclass
class Caller:
    user_id: int
    sync_groups: set[str]  # as they stand at this point of the transaction
    linked: set[str] = field(default_factory=set)  # sync groups this transaction's actions go to


@dataclass(frozen=True)
class PendingAction:
    """A sync action to append to the log once every change has been applied."""

    action: str  # insert | update | delete
    model_name: str
    model_id: str
    data: str | None  # the full row after the change, as compact JSON; None for delete
    sync_groups: list[str]


def apply_transaction(db_connection: DbConnection, changes: list[Change], user_id: int, transaction_id: str | None, changes_sha256: str) -> int:
    if transaction_id is not None:
        done = db_connection.execute(
            "SELECT changes_sha256, last_sync_id FROM client_transaction WHERE user_id = ? AND transaction_id = ?", (user_id, transaction_id)
        ).fetchone()
        if done is not None:
            if done[0] != changes_sha256:
                raise ApiError(
                    409,
                    "transaction_id_reused",
                    f"transactionId {transaction_id!r} was already committed with different changes.",
                )
            return done[1]  # a retry: answer it, write nothing
    # Read inside the write transaction, so a membership change is either wholly before it or after it.
    caller = Caller(user_id, set(caller_sync_groups(user_id, db_connection)))
    # Every row first, then the log: a refused change takes no syncId, and
    # the log's lock is held only from here to COMMIT.
    pending = [apply_change(db_connection, index, change, caller) for index, change in enumerate(changes)]
    last_sync_id = append_to_log(db_connection, pending)
    if transaction_id is not None:
        db_connection.execute(
            "INSERT INTO client_transaction (user_id, transaction_id, changes_sha256, last_sync_id) VALUES (?, ?, ?, ?)",
            (user_id, transaction_id, changes_sha256, last_sync_id),
        )
    return last_sync_id


def apply_change(db_connection: DbConnection, index: int, change: Change, caller: Caller) -> PendingAction:
    """Apply one change to its row; return the sync action that logs it."""
    model, sql, dialect = change.model, row_sql(change.model), flavour().dialect

    def reject(code: str, reason: str, status: int = 409):
        where = f"changes[{index}] ({change.action} {model.name} {change.model_id!r})"
        raise ApiError(status, code, f"{where}: {reason}", details={"change": index})

    def authorize(sync_groups: list[str], reason: str) -> None:
        # Type server, not auth: the client retries an auth error forever, but rolls back on server.
        if not set(sync_groups) <= caller.sync_groups:
            reject("forbidden", reason, status=403)

    found = db_connection.execute(sql.select, (change.model_id,))
    stored = found.fetchone()
    row = None if stored is None else model.reader(dialect, found.description).values(stored)
    if change.action == "create":
        if row is not None:
            reject("already_exists", f"{model.name} {change.model_id!r} already exists.")
        row = change.data
        sync_groups = model.sync_groups.groups_of(row)
        if model.owns_sync_group:
            if caller.linked.intersection(sync_groups) or has_history(db_connection, sync_groups):
                # Its actions are still linked to the group: a new owner would receive them.
                reject("sync_group_reused", f"{model.name} id {change.model_id!r} was used before; choose a new one.")
            for group in sync_groups:  # whoever creates a sync group is its first member
                join(db_connection, caller.user_id, group)
                caller.sync_groups.add(group)
        authorize(sync_groups, f"you are not a member of {', '.join(sync_groups)}.")
        check_references(db_connection, model, row, reject)
        written = db_connection.execute(sql.insert, model.stored(row, dialect))
    else:
        if row is None:
            reject("does_not_exist", f"{model.name} {change.model_id!r} does not exist.")
        sync_groups = model.sync_groups.groups_of(row)
        authorize(sync_groups, "the row is outside your sync groups.")  # without saying whose it is
        if change.action == "update":
            row.update(change.data)
            check_references(db_connection, model, row, reject)
            moved_to = model.sync_groups.groups_of(row)
            if moved_to != sync_groups:
                reject(
                    "sync_groups_changed",
                    f"this update would move the row from {sync_groups} to {moved_to}. A row keeps its sync "
                    "groups for its whole life, or clients of the old groups would never see it leave: "
                    "delete it and create a new one instead.",
                )
            written = db_connection.execute(sql.update, [*model.stored(row, dialect)[1:], change.model_id])
        else:
            # A deleted Group keeps its members, so that they receive this delete.
            check_not_referenced(db_connection, model, row, reject)
            db_connection.execute(sql.delete, (change.model_id,))

    caller.linked.update(sync_groups)
    data = None
    if change.action != "delete":
        # The row as the database stored it (RETURNING): exactly what a bootstrap reads.
        wire_row = model.reader(dialect, written.description).wire_row(written.fetchone())
        data = json.dumps(wire_row, separators=(",", ":"))
    return PendingAction(SYNC_ACTIONS[change.action], model.name, change.model_id, data, sync_groups)


def append_to_log(db_connection: DbConnection, pending: list[PendingAction]) -> int:
    """Append the sync actions and their group links; return the last syncId."""
    lock_log(db_connection)
    for action in pending:
        (sync_id,) = db_connection.execute(
            "INSERT INTO sync_action (action, model_name, model_id, data) VALUES (?, ?, ?, ?) RETURNING id",
            (action.action, action.model_name, action.model_id, action.data),
        ).fetchone()
        db_connection.executemany(
            "INSERT INTO sync_action_group (sync_group, sync_action_id) VALUES (?, ?)", [(group, sync_id) for group in action.sync_groups]
        )
    if flavour().postgres:
        # Delivered at COMMIT to every listener of the database, so it names its schema: see LogWatcher.
        db_connection.execute("SELECT pg_notify('sync_log', current_schema() || ' ' || ?)", (str(sync_id),))
    return sync_id


SYNC_ACTIONS = {"create": "insert", "update": "update", "delete": "delete"}  # a change's action, as its sync action names it


@dataclass(frozen=True)
class RowSql:
    """The statements that read and write one model's rows; columns in model.columns order, id first.
    An insert or update returns the row as stored."""

    select: str
    insert: str
    update: str
    delete: str


@functools.cache
def row_sql(model: SyncedModel) -> RowSql:
    table, columns = model.table.__tablename__, model.columns
    listed = ", ".join(columns)
    return RowSql(
        select=f"SELECT {listed} FROM {table} WHERE id = ?",
        insert=f"INSERT INTO {table} ({listed}) VALUES ({', '.join('?' * len(columns))}) RETURNING {listed}",
        update=f"UPDATE {table} SET {', '.join(f'{column} = ?' for column in columns[1:])} WHERE id = ? RETURNING {listed}",
        delete=f"DELETE FROM {table} WHERE id = ?",
    )


def has_history(db_connection: DbConnection, sync_groups: list[str]) -> bool:
    linked = f"SELECT 1 FROM sync_action_group WHERE sync_group IN ({', '.join('?' * len(sync_groups))}) LIMIT 1"
    return db_connection.execute(linked, sync_groups).fetchone() is not None


def check_references(db_connection: DbConnection, model: SyncedModel, row: dict[str, Any], reject) -> None:
    for attribute, target in model.references:
        value = row[attribute]
        if db_connection.execute(row_sql(target).select, (value,)).fetchone() is None:
            reject("unknown_reference", f"{model.wire_name(attribute)} {value!r} does not name an existing {target.name}.")


def check_not_referenced(db_connection: DbConnection, model: SyncedModel, row: dict[str, Any], reject) -> None:
    for other in SYNCED_MODELS.values():
        for attribute, target in other.references:
            referring = f"SELECT 1 FROM {other.table.__tablename__} WHERE {attribute} = ? LIMIT 1"
            # No count: some of those rows may be in groups the caller cannot see.
            if target is model and db_connection.execute(referring, (row["id"],)).fetchone() is not None:
                reject("still_referenced", f"{other.name} rows still name it in {other.wire_name(attribute)}; delete them first.")


# --- 5. GET /bootstrap ------------------------------------------------------


class CommaList(fields.Field):
    """A comma-separated query parameter; `item` checks and returns each entry."""

    def __init__(self, item, allow_empty: bool, **kwargs):
        super().__init__(**kwargs)
        self.item, self.allow_empty = item, allow_empty

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, str):
            raise ValidationError("Must be a comma-separated list.")
        entries = value.split(",") if value else []
        if not entries and not self.allow_empty:
            raise ValidationError("Must list at least one entry.")
        return list(dict.fromkeys(self.item(entry) for entry in entries))


def known_model(name: str) -> SyncedModel:
    if name not in SYNCED_MODELS:
        raise ValidationError(f"Unknown model {name!r}. Known models: {', '.join(sorted(SYNCED_MODELS))}.")
    return SYNCED_MODELS[name]


SYNC_GROUP = re.compile(rf"all|group:[^,]{{1,{MAX_ID_LENGTH}}}")


def well_formed_sync_group(name: str) -> str:
    if not SYNC_GROUP.fullmatch(name):
        raise ValidationError(f"Malformed sync group {name!r}: expected 'all' or 'group:<groupId>'.")
    return name


class BootstrapQuerySchema(Schema):
    type = fields.String(required=True, validate=validate.OneOf(["eager", "lazy"]))
    models = CommaList(known_model, allow_empty=True, required=True)
    sync_groups = CommaList(well_formed_sync_group, allow_empty=False, data_key="syncGroups")

    @validates_schema
    def sync_groups_go_with_lazy(self, query, **_):
        if query.get("type") == "lazy" and "sync_groups" not in query:
            raise ValidationError("A lazy bootstrap names the sync groups it loads.", "syncGroups")
        if query.get("type") == "eager" and "sync_groups" in query:
            raise ValidationError("Only a lazy bootstrap takes syncGroups.", "syncGroups")


@api.get("/bootstrap")
def bootstrap():
    query = load(shared(BootstrapQuerySchema), query_args())
    # The response is streamed a chunk of rows at a time, so a large bootstrap
    # never sits in memory whole. It reads everything on a connection of its
    # own, in one read transaction that lasts until the last chunk is sent:
    # the rows and firstSyncId come from the same snapshot.
    chosen = flavour()
    db_connection = speaking_sql(db.engine.raw_connection())
    try:
        db_connection.execute(chosen.begin_read)
        allowed = caller_sync_groups(g.user_id, db_connection)
        sync_groups = allowed if query["type"] == "eager" else query["sync_groups"]
        lacking = [group for group in sync_groups if group not in allowed]
        if lacking:
            raise ApiError(403, "forbidden", f"You are not a member of {', '.join(lacking)}.", type="auth")
        first_sync_id = read_head(db_connection)
    except BaseException:
        db_connection.close()
        raise

    def body() -> Iterator[str]:
        yield '{"bootstrap":{'
        for n, model in enumerate(query["models"]):
            yield ("," if n else "") + json.dumps(model.name) + ":["
            separator = ""
            with closing(read_rows(db_connection, chosen, model, sync_groups)) as chunks:
                for rows in chunks:
                    yield separator + json.dumps(rows, separators=(",", ":"))[1:-1]
                    separator = ","
            yield "]"
        yield f'}},"firstSyncId":{first_sync_id},"syncGroups":{json.dumps(sync_groups, separators=(",", ":"))}}}\n'

    response = current_app.response_class(body(), mimetype="application/json")
    # Once the answer is sent, or the client is gone, or it was a HEAD that never read the body:
    # back to the pool, which ends the read transaction.
    response.call_on_close(db_connection.close)
    return response


def read_rows(db_connection: DbConnection, chosen: Flavour, model: SyncedModel, sync_groups: list[str]) -> Iterator[list[dict]]:
    """The model's rows in those groups, in their wire form, a chunk at a time."""
    condition, params = model.sync_groups.rows_in(sync_groups)
    sql = f"SELECT {', '.join(model.columns)} FROM {model.table.__tablename__} WHERE {condition} ORDER BY id"
    with closing(db_connection.stream(sql, params) if chosen.postgres else db_connection.execute(sql, params)) as cursor:
        reader = model.reader(chosen.dialect, cursor.description)
        while rows := cursor.fetchmany(BOOTSTRAP_CHUNK):
            yield [reader.wire_row(row) for row in rows]


# --- 6. GET /sync -----------------------------------------------------------


class SyncId(fields.Field):
    """A syncId in a query string: decimal digits only, so "1.5", "-1" or " 1" are refused."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, str) or not re.fullmatch(r"[0-9]{1,19}", value) or int(value) > INT64[1]:
            raise ValidationError("Must be a non-negative integer, like 0 or 42.")
        return int(value)


class WaitSeconds(fields.Field):
    """Seconds in a query string: "25" or "0.5", from 0 to MAX_WAIT_S."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, str) or not re.fullmatch(r"[0-9]{1,2}(\.[0-9]{1,3})?", value) or float(value) > MAX_WAIT_S:
            raise ValidationError(f"Must be a number of seconds from 0 to {MAX_WAIT_S}, like 25 or 0.5.")
        return float(value)


class SyncQuerySchema(Schema):
    since = SyncId()
    until = SyncId()
    limit = SyncId(validate=validate.Range(1, MAX_LIMIT, error="Must be between {min} and {max}."))
    wait = WaitSeconds()

    @validates_schema
    def until_follows_since(self, query, **_):
        for needs_since in ("until", "limit", "wait"):
            if needs_since in query and "since" not in query:
                raise ValidationError(f"{needs_since} needs since.", needs_since)
        if "until" in query and query["until"] < query["since"]:
            raise ValidationError(f"until ({query['until']}) must not be less than since ({query['since']}).", "until")
        if "until" in query and "wait" in query:
            raise ValidationError("wait is for polls up to the newest action; it cannot go with until.", "wait")


@api.get("/sync")
def sync():
    query = load(shared(SyncQuerySchema), query_args())
    if "since" not in query:  # the handshake
        with read_transaction() as db_connection:
            head, sync_groups = read_head(db_connection), caller_sync_groups(g.user_id, db_connection)
        return {"sync": [], "lastSyncId": head, "syncGroups": sync_groups, "hasMore": False}

    since, limit = query["since"], query.get("limit", DEFAULT_LIMIT)
    # A long poll (wait=) holds an empty answer until an action the caller
    # may see arrives, or the wait ends; then it answers the page as usual.
    deadline = time.monotonic() + min(query.get("wait", 0), current_app.config["MAX_HOLD_S"])
    page = read_page(since, query.get("until"), limit)
    while "wait" in query and not page["sync"] and not page["hasMore"]:
        return_connection()  # a held poll holds no connection (and, between statements, no snapshot)
        if not log_watcher().wait_past(page["lastSyncId"], deadline):
            break
        # Much can happen during a wait: check the token and the cursor again,
        # or a poll held across `init-db` would serve the new database's log.
        user_for_token(request.headers.get("Authorization"))
        page = read_page(page["lastSyncId"], None, limit)
    return page_response(page)


def unknown_cursor(since: int, log_start: int, head: int) -> ApiError:
    return ApiError(
        409,
        "unknown_cursor",
        f"since={since} is not a cursor of this database, whose log runs from {log_start} to {head}: "
        "the database was reset after this client synced. Bootstrap again.",
    )


def read_page(since: int, until: int | None, limit: int) -> dict[str, Any]:
    """The caller's actions in (since, until], `until` at most the head: the
    cursor never moves past an action the page did not carry."""
    last = INT64[1] if until is None else until
    # The page scans at most `limit` syncIds; summed here, where integers do not overflow.
    params = {"user_id": g.user_id, "since": since, "until": min(last, since + limit)}
    log_start, head, cursor, sync_groups, actions = connection().execute(flavour().page, params).fetchone()
    if not log_start <= since <= head:
        raise unknown_cursor(since, log_start, head)
    return {"sync": actions, "lastSyncId": cursor, "syncGroups": sync_groups, "hasMore": cursor < min(head, last)}


# A poll is one statement, so it reads one snapshot without BEGIN and COMMIT:
# where the log starts and ends, the caller's sync groups, and the page of
# actions they may see, encoded as the wire's JSON by SQLite. A page scans
# `limit` syncIds and returns those the caller may see; the cursor moves past
# the ones it may not, so a long run of them can never make a request slow or
# stall a client. (Every statement a request runs hands the GIL to another
# thread and waits to get it back: one statement instead of six made a poll
# under gunicorn about twice as fast.)
PAGE_SQLITE = """
WITH log(log_start, head) AS (
    SELECT log_start, coalesce((SELECT max(id) FROM sync_action), log_start)
    FROM (SELECT coalesce((SELECT after_sync_id FROM sync_log_start), 0) AS log_start)
),
caller_groups(sync_group) AS (
    SELECT 'all' UNION ALL SELECT sync_group FROM memberships WHERE user_id = :user_id
),
page(cursor) AS (
    SELECT min(:until, head) FROM log
),
visible(wire) AS (
    SELECT CASE WHEN data IS NULL OR data = 'null'  -- a delete; 'null' as older versions stored it
        THEN json_object('syncId', id, 'action', action, 'modelName', model_name, 'modelId', model_id)
        ELSE json_object('syncId', id, 'action', action, 'modelName', model_name, 'modelId', model_id, 'data', json(data))
    END
    FROM sync_action
    WHERE id IN (
        SELECT sync_action_id FROM sync_action_group  -- an index range scan per group: see models.py
        WHERE sync_group IN caller_groups AND sync_action_id > :since AND sync_action_id <= (SELECT cursor FROM page)
    )
    ORDER BY id  -- kept by group_concat: SQLite never flattens an ordered subquery into an aggregate
)
SELECT log_start, head, cursor,
    (SELECT json_group_array(sync_group) FROM (SELECT sync_group FROM caller_groups ORDER BY sync_group != 'all', sync_group)),
    (SELECT coalesce(group_concat(wire, ','), '') FROM visible)
FROM log, page
"""

# The same on PostgreSQL, where a single statement also reads one snapshot.
PAGE_POSTGRESQL = """
WITH log AS (
    SELECT log_start, coalesce((SELECT max(id) FROM sync_action), log_start) AS head
    FROM (SELECT coalesce((SELECT after_sync_id FROM sync_log_start), 0) AS log_start) AS start
),
caller_groups(sync_group) AS (
    SELECT 'all' UNION ALL SELECT sync_group FROM memberships WHERE user_id = %(user_id)s
),
page AS (
    SELECT least(%(until)s, head) AS cursor FROM log
)
SELECT log_start, head, cursor,
    (SELECT array_to_json(array_agg(sync_group ORDER BY sync_group <> 'all', sync_group))::text FROM caller_groups),
    -- Written out, not json_build_object, whose text has spaces around every colon.
    (SELECT coalesce(string_agg(
        '{"syncId":' || id || ',"action":' || to_json(action) || ',"modelName":' || to_json(model_name)
            || ',"modelId":' || to_json(model_id) || coalesce(',"data":' || nullif(data, 'null'), '') || '}',
        ',' ORDER BY id), '')
     FROM sync_action
     WHERE id IN (
         SELECT sync_action_id FROM sync_action_group
         WHERE sync_group IN (SELECT sync_group FROM caller_groups)
           AND sync_action_id > %(since)s AND sync_action_id <= (SELECT cursor FROM page)
     ))
FROM log, page
"""


def page_response(page: dict[str, Any]):
    """`sync` and `syncGroups` arrive as JSON text already. Ends with a newline, as jsonify's answers do."""
    body = '{"sync":[%s],"lastSyncId":%d,"syncGroups":%s,"hasMore":%s}\n' % (
        page["sync"], page["lastSyncId"], page["syncGroups"], "true" if page["hasMore"] else "false"
    )
    return current_app.response_class(body, mimetype="application/json")


def log_watcher() -> LogWatcher:
    return current_app.extensions["log_watcher"]


class LogWatcher:
    """Tells held polls that the log grew, whichever process wrote to it.

    A commit in this process calls `advance` at once. Commits of other
    processes are seen by one thread per process, started by the first held
    poll. On SQLite it asks `PRAGMA data_version` (a counter that changes
    when another connection commits) every `interval_s`, and only while some
    poll is held; it sleeps otherwise. On PostgreSQL it listens for the
    notification every write transaction sends at COMMIT (append_to_log),
    blocked in the driver between them, and keeps those of its own schema.
    `close` releases every held poll, for a quick shutdown.
    """

    def __init__(self, engine: Engine, sqlite_file: str | None, interval_s: float):
        self.engine, self.sqlite_file, self.interval_s = engine, sqlite_file, interval_s
        self.changed = threading.Condition()
        self.head = 0
        self.waiting = 0
        self.closed = False
        self.thread: threading.Thread | None = None

    def wait_past(self, since: int, deadline: float) -> bool:
        """Wait until the head is past `since` (True), or the deadline or close comes first (False)."""
        with self.changed:
            if self.closed or time.monotonic() >= deadline:
                return False  # whatever the head says, a poll never outlives its wait
            if self.head > since:
                return True
            self.waiting += 1
            # An in-memory database has no other process to watch.
            watch = self.listen if self.engine.dialect.name == "postgresql" else self.watch if self.sqlite_file else None
            if watch and (self.thread is None or not self.thread.is_alive()):
                self.thread = threading.Thread(target=watch, name="log-watcher", daemon=True)
                self.thread.start()
            self.changed.notify_all()  # wake the watcher if it was idle
            try:
                while self.head <= since and not self.closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self.changed.wait(remaining)
                return self.head > since and not self.closed
            finally:
                self.waiting -= 1

    def advance(self, head: int) -> None:
        with self.changed:
            if head > self.head:
                self.head = head
                self.changed.notify_all()

    def close(self) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify_all()

    def listen(self) -> None:
        pooled = self.engine.raw_connection()
        listener = pooled.driver_connection
        pooled.detach()  # this one stays with the watcher
        try:
            listener.execute("LISTEN sync_log")
            schema, head = listener.execute("SELECT current_schema(), coalesce(max(id), 0) FROM sync_action").fetchone()
            self.advance(head)
            while not self.closed:
                for notification in listener.notifies(timeout=1.0):
                    # Another schema's syncIds are not this log's: counted, a held poll would spin.
                    of_schema, _, sync_id = notification.payload.rpartition(" ")
                    if of_schema == schema:
                        self.advance(int(sync_id))
        finally:
            listener.close()

    def watch(self) -> None:
        connection = sqlite3.connect(self.sqlite_file, isolation_level=None)
        try:
            version = None
            while True:
                with self.changed:
                    while not self.waiting and not self.closed:
                        self.changed.wait()
                    if self.closed:
                        return
                new_version = connection.execute("PRAGMA data_version").fetchone()[0]
                if new_version != version:
                    version = new_version
                    self.advance(connection.execute("SELECT coalesce(max(id), 0) FROM sync_action").fetchone()[0])
                with self.changed:
                    self.changed.wait(self.interval_s)  # or less, on close
        finally:
            connection.close()


# --- 7. OpenAPI and the demo page -------------------------------------------
# GET /openapi.json is built by apispec from the marshmallow schemas that
# validate requests, so it cannot drift from what the endpoints enforce.
# tests/test_fuzz.py generates requests from it. It needs no token.
# The endpoints build their answers as dicts or JSON text; the response
# schemas below only describe them (the tests check every response they
# receive against them: tests/contract.py).


def sync_id_field(**kwargs) -> fields.Integer:
    return fields.Integer(strict=True, validate=validate.Range(0, INT64[1]), **kwargs)


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def sync_action_schemas(model: SyncedModel) -> dict[str, type[Schema]]:
    """A model's sync actions: insert and update carry its full row after the change, delete no data."""

    def shape(actions: list[str], **data: fields.Field) -> type[Schema]:
        return Schema.from_dict(
            {
                "sync_id": sync_id_field(data_key="syncId", required=True),
                "action": fields.String(required=True, validate=validate.OneOf(actions)),
                "model_name": fields.String(data_key="modelName", required=True, validate=validate.OneOf([model.name])),
                "model_id": model_id(data_key="modelId", required=True),
                **data,
            }
        )

    row = fields.Nested(type(model.schema), required=True, metadata={"description": "The full row after the change."})
    return {f"{model.name}RowAction": shape(["insert", "update"], data=row), f"{model.name}DeleteAction": shape(["delete"])}


def one_of(property_name: str, mapping: dict[str, str]) -> dict[str, Any]:
    """One of the schemas in `mapping`, told apart by a property's value."""
    return {
        "oneOf": [ref(name) for name in dict.fromkeys(mapping.values())],
        "discriminator": {"propertyName": property_name, "mapping": {value: ref(name)["$ref"] for value, name in mapping.items()}},
    }


def response_schemas(models: tuple[SyncedModel, ...]) -> dict[str, type[Schema]]:
    """The answers of /sync and /bootstrap, which name every synced model."""
    sync = Schema.from_dict(
        {
            "sync": fields.List(fields.Raw(metadata={"allOf": [ref("SyncAction")]}), required=True),
            "last_sync_id": sync_id_field(data_key="lastSyncId", required=True),
            "sync_groups": fields.List(fields.String(), data_key="syncGroups", required=True),
            "has_more": fields.Boolean(data_key="hasMore", required=True),
        },
        name="SyncResponse",
    )
    # A key for each requested model, holding rows of that model's schema.
    rows = Schema.from_dict({model.name: fields.List(fields.Nested(type(model.schema))) for model in models}, name="BootstrapRows")
    bootstrap = Schema.from_dict(
        {
            "bootstrap": fields.Nested(rows, required=True),
            "first_sync_id": sync_id_field(data_key="firstSyncId", required=True),
            "sync_groups": fields.List(fields.String(), data_key="syncGroups", required=True),
        },
        name="BootstrapResponse",
    )
    return {"sync": sync, "bootstrap": bootstrap}


class MutateResponseSchema(Schema):
    last_sync_id = sync_id_field(data_key="lastSyncId", required=True)


class ErrorSchema(Schema):
    type = fields.String(required=True, validate=validate.OneOf(["server", "auth", "network"]))
    code = fields.String(required=True)
    message = fields.String(required=True)
    details = fields.Raw(required=True, allow_none=True)


class ErrorResponseSchema(Schema):
    error = fields.Nested(ErrorSchema, required=True)


def success(schema: type[Schema], description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def refusal(description: str, **headers: str) -> dict:
    """A documented error status: the one error shape, and the headers it always has."""
    response = success(ErrorResponseSchema, description)
    if headers:
        response["headers"] = {
            name: {"required": True, "schema": {"type": "string"}, "description": about} for name, about in headers.items()
        }
    return response


def api_operations(models: tuple[SyncedModel, ...]) -> dict[str, Any]:
    """Each path's operations, in apispec's input form (a new dict each time: apispec resolves it in place)."""
    answers = response_schemas(models)
    unauthorized = refusal(
        "unauthorized (type auth): a missing, malformed or unknown token.", **{"WWW-Authenticate": "Bearer: send a token."}
    )
    internal_error = refusal("internal_error: a bug; the transaction was rolled back.")
    return {
        "/mutate": {
            "post": {
                "summary": "Apply changes in one transaction, all or nothing (the client's sendTransaction).",
                "requestBody": {"required": True, "content": {"application/json": {"schema": MutateSchema}}},
                "responses": {
                    200: success(MutateResponseSchema, "Committed; lastSyncId is the greatest syncId it created."),
                    400: refusal("invalid_request (details has the messages per field) or invalid_json."),
                    401: unauthorized,
                    403: refusal("forbidden (type server): a change outside the caller's sync groups."),
                    409: refusal(
                        "already_exists, does_not_exist, unknown_reference, still_referenced, "
                        "sync_groups_changed, transaction_id_reused or sync_group_reused."
                    ),
                    413: refusal("payload_too_large: the body is over 1 MiB."),
                    415: refusal("unsupported_media_type: the body is not sent as application/json."),
                    500: internal_error,
                    503: refusal(
                        "database_busy (type network): nothing was written; retry.", **{"Retry-After": "Seconds to wait."}
                    ),
                },
            }
        },
        "/bootstrap": {
            "get": {
                "summary": "Rows of some models, and the firstSyncId they reflect, from one snapshot.",
                "parameters": [{"in": "query", "schema": BootstrapQuerySchema}],
                "responses": {
                    200: success(answers["bootstrap"], "A key per requested model; syncGroups are the groups served."),
                    400: refusal("invalid_request."),
                    401: unauthorized,
                    403: refusal("forbidden (type auth): a lazy bootstrap of a sync group the caller lacks."),
                    500: internal_error,
                },
            }
        },
        "/sync": {
            "get": {
                "summary": "The handshake (without since), or the caller's sync actions after since.",
                "parameters": [{"in": "query", "schema": SyncQuerySchema}],
                "responses": {
                    200: success(answers["sync"], "Pass lastSyncId as the next since; hasMore says a page follows."),
                    400: refusal("invalid_request."),
                    401: unauthorized,
                    409: refusal("unknown_cursor: since is not a cursor of this database; bootstrap again."),
                    500: internal_error,
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document.",
                "security": [],
                "responses": {
                    200: {"description": "OpenAPI 3.0.3.", "content": {"application/json": {"schema": {"type": "object"}}}},
                    500: internal_error,
                },
            }
        },
    }


def query_field_properties(models: tuple[SyncedModel, ...]):
    """SyncId, WaitSeconds and CommaList parse query strings; the document says what the strings may hold."""

    def properties(converter, field: fields.Field, ret: dict, **_) -> dict:
        if isinstance(field, SyncId):
            return {"minimum": ret.get("minimum", 0), "maximum": ret.get("maximum", INT64[1])}
        if isinstance(field, WaitSeconds):
            return {"pattern": r"^(?:[12]?[0-9](?:\.[0-9]{1,3})?|30(?:\.0{1,3})?)$"}
        if isinstance(field, CommaList):
            item = "|".join(re.escape(model.name) for model in models) if field.item is known_model else SYNC_GROUP.pattern
            items = "(?:{0})(?:,(?:{0}))*".format(item)
            return {"pattern": f"^(?:{items})?$" if field.allow_empty else f"^{items}$"}
        return {}

    return properties


def openapi_document() -> dict[str, Any]:
    return describe_api(tuple(SYNCED_MODELS.values()))


@functools.cache
def describe_api(models: tuple[SyncedModel, ...]) -> dict[str, Any]:
    """The OpenAPI document of the API serving these synced models (built once: apispec takes a while)."""
    plugin = MarshmallowPlugin()
    spec = APISpec(
        title="Loco Sync backend",
        version="1",
        openapi_version="3.0.3",
        plugins=[plugin],
        info={"description": "Mutate, bootstrap and sync for Loco Sync. Every non-2xx response is an ErrorResponse."},
        security=[{"bearer": []}],
    )
    plugin.map_to_openapi_type(SyncId, "integer", "int64")
    plugin.map_to_openapi_type(CommaList, "string", None)
    plugin.map_to_openapi_type(WaitSeconds, "string", None)
    plugin.converter.add_attribute_function(query_field_properties(models))
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer", "description": "<userId>.<secret>"})
    for model in models:  # rows are named as the client names their models
        spec.components.schema(model.name, schema=type(model.schema))
        actions = sync_action_schemas(model)
        for name, schema in actions.items():
            spec.components.schema(name, schema=schema)
        row_action, delete_action = actions
        spec.components.schema(
            f"{model.name}SyncAction", component=one_of("action", {"insert": row_action, "update": row_action, "delete": delete_action})
        )
    spec.components.schema("SyncAction", component=one_of("modelName", {model.name: f"{model.name}SyncAction" for model in models}))
    # Given for the paths and methods that are not listed.
    spec.components.response("NotFound", refusal("not_found: no such endpoint."))
    spec.components.response("MethodNotAllowed", refusal("method_not_allowed.", Allow="The methods the path takes."))
    for path, operations in api_operations(models).items():
        spec.path(path=path, operations=operations)
    return spec.to_dict()


def demo_page():
    """Two clients side by side, built on static/loco-network.js; the tokens come from the URL fragment."""
    return render_template("demo.html")


# --- 8. Errors --------------------------------------------------------------


class ApiError(Exception):
    """Any refusal. `type` is Loco Sync's NetworkErrorType: the client rolls
    a transaction back on "server" and retries on "auth" and "network"."""

    def __init__(self, status: int, code: str, message: str, *, type: str = "server", details: Any = None, headers=None):
        super().__init__(message)
        self.status, self.code, self.message, self.type = status, code, message, type
        self.details, self.headers = details, headers or {}


def error_response(error: ApiError):
    body = {"error": {"type": error.type, "code": error.code, "message": error.message, "details": error.details}}
    return body, error.status, error.headers


HTTP_ERROR_CODES = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def http_error(error: HTTPException):
    if error.code == 404:
        message = f"No endpoint at {request.path}. The API is POST /mutate, GET /bootstrap and GET /sync."
    elif error.code == 413:
        message = f"The body is over the limit of {current_app.config['MAX_CONTENT_LENGTH']} bytes."
    else:
        message = error.description
    code = HTTP_ERROR_CODES.get(error.code, re.sub(r"\W+", "_", (error.name or "error").lower()))
    headers = {k: v for k, v in error.get_headers() if k == "Allow"}
    return error_response(ApiError(error.code or 500, code, message, headers=headers))


def unexpected_error(error: Exception):
    current_app.logger.exception("unexpected error")
    return error_response(ApiError(500, "internal_error", "The server hit an unexpected error; see its log."))


def json_body() -> Any:
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", "Send a JSON body with Content-Type: application/json.")
    raw = request.get_data(cache=False)  # a Content-Length over the limit raises 413 here
    if request.content_length is None and len(raw) >= current_app.config["MAX_CONTENT_LENGTH"]:
        raise RequestEntityTooLarge()  # a chunked body is cut at the limit, not refused: refuse it
    try:
        body = json.loads(raw, parse_constant=reject_constant)
        # "\ud800" parses to a lone surrogate, which no database can store as text.
        json.dumps(body, ensure_ascii=False).encode()
        has_nul = holds_nul(body)
    except (ValueError, RecursionError) as error:
        raise ApiError(400, "invalid_json", f"The body is not valid JSON: {error}") from None
    if has_nul:
        # PostgreSQL cannot store it in text; refused on every engine, so that all behave alike.
        raise ApiError(400, "invalid_request", "Strings cannot hold the NUL character (\\u0000).")
    return body


def holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(holds_nul(key) or holds_nul(item) for key, item in value.items())
    if isinstance(value, list):
        return any(holds_nul(item) for item in value)
    return False


def reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def query_args() -> dict[str, str]:
    repeated = {key: len(values) for key, values in request.args.lists() if len(values) > 1}
    if repeated:
        messages = {key: [f"Given {count} times; give it once."] for key, count in repeated.items()}
        raise ApiError(400, "invalid_request", " ".join(f"{k}: {m[0]}" for k, m in messages.items()), details=messages)
    return request.args.to_dict()


@functools.cache
def shared(schema_class: type[Schema]) -> Schema:
    """One instance of each schema: building one costs more than a request's loading."""
    return schema_class()


def load(schema: Schema, data: Any) -> Any:
    try:
        return schema.load(data)
    except ValidationError as error:
        messages = error.normalized_messages()
        lines = [line.rstrip(".") for line in describe(messages)]
        if len(lines) > 5:
            lines[5:] = [f"and {len(lines) - 5} more (see details)"]
        message = "; ".join(lines) + "."
        raise ApiError(400, "invalid_request", message, details=messages) from None


def describe(messages: Any, path: str = "") -> list[str]:
    """Flatten marshmallow's nested messages into lines like 'changes.0.data.isDone: Not a valid boolean.'"""
    if isinstance(messages, dict):
        return [
            line
            for key, nested in messages.items()
            for line in describe(nested, path if key == "_schema" else f"{path}.{key}".lstrip("."))
        ]
    if isinstance(messages, list):
        return [line for message in messages for line in describe(message, path)]
    return [f"{path or 'body'}: {messages}"]


# --- 9. CLI -----------------------------------------------------------------


@click.command("init-db")
@with_appcontext
def init_db_command():
    """Drop every table and create them empty."""

    def reset(db_connection):
        old_head = read_head(db_connection)
        for statement in schema_statements(drop=True):
            db_connection.execute(statement)
        create_schema(db_connection)
        if old_head:
            # Start the new log above the old one, so /sync can tell a client
            # that still holds a cursor of the wiped database to bootstrap again.
            log_start = old_head + 1
            db_connection.execute("INSERT INTO sync_log_start (after_sync_id) VALUES (?)", (log_start,))
            start_log_after(db_connection, log_start)

    in_write_transaction(reset)
    click.echo(f"Initialized an empty database at {db.engine.url.database}")


SEED_CHANGES = [
    {"action": "create", "modelName": "Group", "modelId": "g1", "data": {"id": "g1", "name": "Kitchen"}},
    {"action": "create", "modelName": "Group", "modelId": "g2", "data": {"id": "g2", "name": "Garden"}},
    {"action": "create", "modelName": "Author", "modelId": "a1", "data": {"id": "a1", "name": "Ada"}},
    {"action": "create", "modelName": "Author", "modelId": "a2", "data": {"id": "a2", "name": "Grace"}},
    *(
        {
            "action": "create",
            "modelName": "Todo",
            "modelId": todo_id,
            "data": {"id": todo_id, "text": text, "authorId": author, "groupId": group, "isDone": False, "likeCount": 0},
        }
        for todo_id, text, author, group in [
            ("t1", "Buy coffee", "a1", "g1"),
            ("t2", "Descale the kettle", "a2", "g1"),
            ("t3", "Water the tomatoes", "a1", "g2"),
        ]
    ),
]


def seed_demo() -> tuple[dict[str, str], int]:
    """Create the demo users Ada and Grace and the demo rows; return their tokens."""
    changes = load(MutateSchema(), {"changes": SEED_CHANGES})["changes"]

    def seed(db_connection):
        if db_connection.execute("SELECT 1 FROM users LIMIT 1").fetchone():
            raise click.ClickException("The database already has users; run `flask --app app init-db` to start over.")
        (ada, ada_token), (grace, grace_token) = new_user(db_connection, "Ada"), new_user(db_connection, "Grace")
        last_sync_id = apply_transaction(db_connection, changes, ada, None, "")  # Ada creates g1 and g2, so joins both
        join(db_connection, grace, "group:g1")
        return {"Ada": ada_token, "Grace": grace_token}, last_sync_id

    return in_write_transaction(seed)


@click.command("seed")
@click.option("--url", default="http://127.0.0.1:5000", show_default=True, help="Where the server runs, for the demo link.")
@with_appcontext
def seed_command(url: str):
    """Load demo users and rows, the rows through the same path as /mutate."""
    tokens, last_sync_id = seed_demo()
    click.echo(f"Seeded {len(SEED_CHANGES)} rows; lastSyncId is {last_sync_id}.")
    click.echo("Demo users (send the token as Authorization: Bearer <token>):")
    click.echo(f"  Ada    all, group:g1, group:g2   {tokens['Ada']}")
    click.echo(f"  Grace  all, group:g1             {tokens['Grace']}")
    # The tokens ride in the fragment, which the browser never sends to a server.
    click.echo(f"Live demo, signed in as both: {url.rstrip('/')}/{demo_fragment(tokens)}")


def demo_fragment(tokens: dict[str, str]) -> str:
    return "#" + "&".join(f"{name}={token}" for name, token in tokens.items())


@click.command("create-user")
@click.argument("name")
@click.option("--group", "group_ids", multiple=True, help="Id of a Group to join; may be repeated.")
@with_appcontext
def create_user_command(name: str, group_ids: tuple[str, ...]):
    """Add a user and print its token (shown only now)."""

    def create(db_connection):
        require_groups(db_connection, group_ids)
        user_id, token = new_user(db_connection, name)
        for group_id in group_ids:
            join(db_connection, user_id, f"group:{group_id}")
        return user_id, token

    user_id, token = in_write_transaction(create)
    click.echo(f"User {user_id} ({name}) token: {token}")


@click.command("add-member")
@click.argument("user_id", type=int)
@click.argument("group_id")
@with_appcontext
def add_member_command(user_id: int, group_id: str):
    """Give a user the sync group of a Group; it takes effect on the user's next request."""

    def add(db_connection):
        require_user(db_connection, user_id)
        require_groups(db_connection, [group_id])
        join(db_connection, user_id, f"group:{group_id}")

    in_write_transaction(add)
    click.echo(f"User {user_id} is a member of group:{group_id}.")


@click.command("remove-member")
@click.argument("user_id", type=int)
@click.argument("group_id")
@with_appcontext
def remove_member_command(user_id: int, group_id: str):
    """Take a Group's sync group from a user; its next request no longer sees that group."""

    def remove(db_connection):
        require_user(db_connection, user_id)
        leave(db_connection, user_id, f"group:{group_id}")

    in_write_transaction(remove)
    click.echo(f"User {user_id} is not a member of group:{group_id}.")


def require_user(db_connection: DbConnection, user_id: int) -> None:
    if db_connection.execute("SELECT 1 FROM users WHERE id = ?", (user_id,)).fetchone() is None:
        raise click.ClickException(f"There is no user {user_id}.")


def require_groups(db_connection: DbConnection, group_ids) -> None:
    for group_id in group_ids:
        if db_connection.execute(row_sql(SYNCED_MODELS["Group"]).select, (group_id,)).fetchone() is None:
            raise click.ClickException(f"There is no Group {group_id!r}.")
