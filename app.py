"""A Loco Sync backend: mutate, bootstrap and sync over JSON, on SQLite or PostgreSQL.

Read top to bottom, this file is the protocol:
  1. configuration                      create_app
  2. who is calling                     authenticate, caller_sync_groups
  3. POST /mutate    (sendTransaction)  one write transaction: rows + one sync action per change
  4. GET /bootstrap  (bootstrap)        rows and firstSyncId from one snapshot
  5. GET /sync       (deltaSync, poll)  the sync actions after a syncId, in order, no gaps
  6. errors                             one error type, one JSON shape
Tables, wire schemas and sync-group rules live in models.py. What makes this
fast and durable (group commit, long-poll wake-ups, PostgreSQL, strict input,
the OpenAPI document, the CLI) lives in machinery/, one module per concern.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any, TypeVar

from flask import Blueprint, Flask, current_app, g, request
from marshmallow import Schema, ValidationError, fields, post_load, validate, validates_schema
from werkzeug.exceptions import HTTPException

from machinery import browser, postgres, sqlite
from machinery.database import DbConnection, Flavour, configure_database, connection, create_schema, flavour, read_transaction
from machinery.database import as_fault, engine_options, own_connection, read_in_time, return_connection, schema_is_complete
from machinery.errors import ApiError, database_busy
from machinery.input import LIMITS, CommaList, SyncId, WaitSeconds, from_http_error, json_body, known_model, load, query_args, shared, short
from machinery.input import well_formed_sync_group, within_limits
from machinery.long_poll import REREAD, HeldPolls, held_polls, membership_changed
from machinery.writer import Writer
from models import INT64, MAX_ID_LENGTH, SCHEMA_VERSION, SYNCED_MODELS, Int64, SyncedModel, db, model_id

api = Blueprint("api", __name__)
T = TypeVar("T")

MAX_CHANGES = 1000
DEFAULT_LIMIT = 1000
MAX_LIMIT = 5000
MAX_WAIT_S = 30
BOOTSTRAP_CHUNK = 1000  # rows encoded and sent at a time
IN_FLIGHT = 0  # a claimed transactionId's last_sync_id until its transaction appends its sync actions


# --- 1. Configuration -------------------------------------------------------


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__, instance_relative_config=True)
    app.config.from_mapping(
        SQLALCHEMY_DATABASE_URI=os.environ.get("DATABASE_URL") or "sqlite:///" + os.path.join(app.instance_path, "loco.sqlite3"),
        SQLITE_BUSY_TIMEOUT_MS=2000,  # how long one attempt waits for the write lock
        BUSY_RETRIES=3,  # SQLite: further attempts, with backoff, before answering 503
        BUSY_BACKOFF_S=0.05,
        # PostgreSQL: two writers whose row locks deadlock; the one PostgreSQL stops is retried at once.
        SERIALIZATION_RETRIES=10,
        SERIALIZATION_BACKOFF_S=0.001,
        CORS_ORIGIN="*",  # which browser origins may call the API
        MAX_HOLD_S=MAX_WAIT_S,  # the longest a poll is held, whatever its wait=
        LOG_CHECK_INTERVAL_S=0.005,  # without inotify: how often a process looks for others' commits while polls are held
        POOL_SIZE=10,  # connections a process may use at once; a held poll uses none (docs/production.md)
        POOL_TIMEOUT_S=5,  # then a request waiting for one is answered 503, type network
        BOOTSTRAP_MAX_S=60,  # a bootstrap not read by then is cut off (the client retries), so its snapshot ends
        **LIMITS,  # the largest body, string, row, transaction, page and groups of a user (machinery/input.py)
    )
    if test_config is None:
        app.config.from_pyfile("config.py", silent=True)
        if os.environ.get("DATABASE_URL"):  # the environment wins over the file, as a one-off command expects
            app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["DATABASE_URL"]
    else:
        app.config.from_mapping(test_config)
    app.json.sort_keys = False
    os.makedirs(app.instance_path, exist_ok=True)

    app.config.setdefault("SQLALCHEMY_ENGINE_OPTIONS", engine_options(app.config))
    db.init_app(app)
    with app.app_context():
        chosen = app.extensions["flavour"] = configure_database(db.engine, app.config)
        sqlite_file = None if chosen.postgres else db.engine.url.database
        writer = app.extensions["writer"] = Writer(sqlite_file, app.config, chosen.postgres, append_to_log, app.logger)
        app.extensions["held_polls"] = HeldPolls(db.engine, sqlite_file, writer.lock.path, app.config)
        if not schema_is_complete(db.engine):
            # Under the write lock, with busy retries, so server processes starting together do not race.
            in_write_transaction(create_schema)
    app.teardown_appcontext(return_connection)

    from machinery import cli, openapi  # they describe and drive this module, so they import it

    app.register_blueprint(api)
    app.add_url_rule("/openapi.json", view_func=openapi.openapi_document)  # not on `api`: it needs no token
    app.add_url_rule("/", view_func=browser.demo_page)  # and CORS: what a client in a browser needs
    app.after_request(browser.allow_cross_origin)
    app.register_error_handler(ApiError, error_response)
    app.register_error_handler(HTTPException, lambda error: error_response(from_http_error(error)))  # Werkzeug's 404, 405, 413
    app.register_error_handler(Exception, unexpected_error)
    for command in cli.COMMANDS:
        app.cli.add_command(command)
    return app


# --- 2. Who is calling -----------------------------------------------------


@api.before_request
def authenticate() -> None:
    """Every API request names its user with `Authorization: Bearer <token>`."""
    if request.method == "OPTIONS":
        return  # a CORS preflight carries no credentials
    g.user_id, g.token_sha256 = user_for_token(request.headers.get("Authorization"))
    check_schema_version(request.headers.get("Loco-Schema-Version"))


TOKEN = re.compile(r"(?i:bearer) +([1-9][0-9]{0,17})\.([A-Za-z0-9_-]{1,100})")
NO_SUCH_TOKEN = hashlib.sha256(b"").hexdigest()
USER_TOKEN = "SELECT token_sha256 FROM users WHERE id = ?"


def user_for_token(header: str | None) -> tuple[int, str]:
    if not header:
        raise unauthorized("Send the header Authorization: Bearer <token>.")
    match = TOKEN.fullmatch(header.strip())
    if match is None:
        raise unauthorized("The Authorization header must be 'Bearer <token>', with a token as printed by "
                           "`flask --app app create-user` or `seed`.")
    user_id, token_sha256 = int(match[1]), sha256(match[2])
    check_token(stored_token(connection(), user_id), token_sha256)
    return user_id, token_sha256


def stored_token(db_connection: DbConnection, user_id: int) -> str | None:
    stored = db_connection.execute(USER_TOKEN, (user_id,)).fetchone()
    return stored and stored[0]


def check_token(stored_sha256: str | None, token_sha256: str) -> None:  # in constant time, even when there is no such user
    if not hmac.compare_digest(token_sha256, stored_sha256 or NO_SUCH_TOKEN) or not stored_sha256:
        raise unauthorized("Unknown token.")


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, type="auth", headers={"WWW-Authenticate": "Bearer"})


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def check_schema_version(sent: str | None) -> None:
    """A client built for another version of models.py (if it says) must load the new one and start over."""
    if sent is not None and not re.fullmatch(r"[0-9]{1,9}", sent):
        raise ApiError(400, "invalid_request", "Loco-Schema-Version must be an integer.", details={"Loco-Schema-Version": ["Must be an integer, like 1."]})
    if sent is not None and int(sent) != SCHEMA_VERSION:
        raise bootstrap_again("schema_changed", f"This client was built for schema version {int(sent)}; "
                              f"the server's is {SCHEMA_VERSION}.", schemaVersion=SCHEMA_VERSION)


def bootstrap_again(reason: str, message: str, **details) -> ApiError:
    """The one answer that tells a client its local state cannot be continued: reset (init-db, or another
    database), compacted (the log no longer reaches its cursor), schema_changed. It drops its store and bootstraps."""
    return ApiError(409, "bootstrap_again", f"{message} Bootstrap again.", details={"reason": reason, **details})


def caller_sync_groups(db_connection: DbConnection, user_id: int, token_sha256: str | None, lock: str = "") -> list[str]:
    """The caller's groups, read where they are used, and its token checked again there: one revoked since authenticate() is
    refused, not served (or let write) from a snapshot after it. A write locks the user's row (`lock`) until COMMIT."""
    token = db_connection.execute(USER_TOKEN + lock, (user_id,))  # both sent, then read
    memberships = db_connection.execute("SELECT sync_group FROM memberships WHERE user_id = ? ORDER BY sync_group", (user_id,))
    stored = token.fetchone()
    if token_sha256 is not None:
        check_token(stored and stored[0], token_sha256)
    return ["all", *(sync_group for (sync_group,) in memberships)]


def row_lock(kind: str) -> str:
    """A read's lock on PostgreSQL (postgres.ROW_LOCKS; docs/design.md, "Writes on PostgreSQL"); SQLite's writers take turns."""
    return postgres.ROW_LOCKS[kind] if flavour().postgres else ""


def join(db_connection: DbConnection, user_id: int, sync_group: str, announce: bool = True) -> None:
    db_connection.execute("INSERT INTO memberships (user_id, sync_group) VALUES (?, ?) ON CONFLICT DO NOTHING", (user_id, sync_group))
    if announce:  # its held polls end, on every process, with its new groups (a mutation announces once, at its end)
        membership_changed(db_connection, user_id)


def leave(db_connection: DbConnection, user_id: int, sync_group: str) -> None:
    db_connection.execute("DELETE FROM memberships WHERE user_id = ? AND sync_group = ?", (user_id, sync_group))
    membership_changed(db_connection, user_id)


# --- 3. POST /mutate --------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One validated change; `data` uses column names, not wire names."""

    action: str  # create | update | delete
    model: SyncedModel
    model_id: str
    data: dict[str, Any]

    def where(self, index: int) -> str:
        """How a refusal names the change: changes[2] (update Todo 't1')."""
        return f"changes[{index}] ({self.action} {self.model.name} {short(self.model_id)})"


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
            raise ValidationError({"modelName": [f"Unknown model {short(name)}. Known models: {known}."]})
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
    length = validate.Length(1, MAX_CHANGES, error="A transaction has {min} to {max} changes.")
    changes = fields.List(fields.Nested(ChangeSchema), required=True, validate=length)
    transaction_id = fields.String(data_key="transactionId", validate=validate.Length(1, MAX_ID_LENGTH))
    base_sync_id = Int64(validate.Range(0), data_key="baseSyncId")  # the newest syncId its client had seen when it first sent it


@api.post("/mutate")
def mutate():
    body = json_body()
    mutation = load(shared(MutateSchema), body)
    transaction = (mutation["changes"], g.user_id, mutation.get("transaction_id"), fingerprint(body["changes"]), g.token_sha256,
                   mutation.get("base_sync_id"))
    last_sync_id = in_write_transaction(lambda db_connection: apply_transaction(db_connection, *transaction), len(mutation["changes"]))
    held_polls().log_may_have_grown()  # this process's held polls see it now, not at their next check
    return {"lastSyncId": last_sync_id}


def fingerprint(changes: Any) -> str:
    """Identifies a request body, so a reused transactionId with other changes is caught."""
    canonical = json.dumps(changes, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def in_write_transaction(work: Callable[[DbConnection], T], changes: int = 1) -> T:
    """BEGIN IMMEDIATE; work(db_connection); COMMIT; and return what `work` returned (a `work` that yields, apply_transaction,
    is sent the last syncId append_to_log gave what it yielded, and returns then). That is all it is, in essence (READ
    COMMITTED with row locks on PostgreSQL), and the only way anything is written. machinery/writer.py runs it faster:
    writes arriving together share one transaction and its fsync (group commit), each in a savepoint of its own, unless
    it has many `changes` and others need not wait for it; a transaction the database is too busy for is retried, then 503."""
    return current_app.extensions["writer"].run(work, changes)


@dataclass
class Caller:
    user_id: int
    sync_groups: set[str]  # as they stand at this point of the transaction
    joined: bool = False  # it created a Group, so joined it


@dataclass(frozen=True)
class PendingAction:
    """A sync action to append to the log once every change has been applied."""

    action: str  # insert | update | delete
    model_name: str
    model_id: str
    data: str | None  # the full row after the change, as compact JSON; None for delete
    sync_groups: list[str]


def apply_transaction(db_connection: DbConnection, changes: list[Change], user_id: int, transaction_id: str | None,
                      changes_sha256: str, token_sha256: str | None = None, base_sync_id: int | None = None
                      ) -> Generator[list[PendingAction], int, int]:
    """Inside one write transaction, as `user_id`, whose token a request gives (a command, such as seed, gives none). In two
    steps, so that group commit appends many transactions' sync actions in one turn of the log's lock (machinery/writer.py;
    `applied` runs one alone): it checks and applies each change, yields one sync action per change, and is sent the last
    syncId the log gave them. A retried transactionId is answered, not applied again. Each read that a write depends on
    holds what it read until COMMIT (docs/design.md, "Writes on PostgreSQL")."""
    # 1. Claim the transactionId (its record's key): a retry of it in flight elsewhere waits here until that one ends.
    claim = None if transaction_id is None else db_connection.execute(
        f"INSERT INTO client_transaction (user_id, transaction_id, changes_sha256, last_sync_id, base_sync_id) VALUES (?, ?, ?, "
        f"{IN_FLIGHT}, ?) ON CONFLICT DO NOTHING RETURNING 1", (user_id, transaction_id, changes_sha256, base_sync_id))
    # 2. In statements after the claim (before it, a retry whose record compact-log prunes meanwhile would apply again),
    # sent now and read below: the log's bounds, the caller's token and groups, its user's row locked until COMMIT.
    bounds = db_connection.execute(LOG_BOUNDS)
    joining = any(change.action == "create" and change.model.owns_sync_group for change in changes)
    caller = Caller(user_id, set(caller_sync_groups(db_connection, user_id, token_sha256, row_lock("caller_joining" if joining else "caller"))))
    if claim is not None and claim.fetchone() is None:  # taken: by a committed transaction, or one in this batch
        return answer_retry(db_connection, user_id, transaction_id, changes_sha256)
    start, why, head = log_bounds(bounds)
    if base_sync_id is not None and base_sync_id < start:  # its record, if it committed, went with the log
        raise bootstrap_again(why or "reset", f"baseSyncId={base_sync_id} is older than the log, which starts after {start}.")
    if base_sync_id is not None and base_sync_id > head:  # a syncId this database never gave: another one's
        raise bootstrap_again("reset", f"baseSyncId={base_sync_id} is not a syncId of this database.")
    # 3. Every row, checked and written; a refused change takes no syncId, and the log's lock is not held meanwhile.
    written = (apply_change(db_connection, index, change, caller) for index, change in enumerate(changes))
    pending = list(within_limits(changes, written))  # every row small enough to be served, and the whole too (413)
    # 4. The log: whoever runs this transaction appends `pending` (append_to_log) and sends back the last syncId.
    last_sync_id = yield pending
    # 5. What remains holds the log's lock: nothing here may refuse.
    if caller.joined:
        membership_changed(db_connection, user_id)
    if transaction_id is not None:
        db_connection.execute("UPDATE client_transaction SET last_sync_id = ? WHERE user_id = ? AND transaction_id = ?",
                              (last_sync_id, user_id, transaction_id))
    return last_sync_id


def answer_retry(db_connection: DbConnection, user_id: int, transaction_id: str, changes_sha256: str) -> int:
    committed = "SELECT changes_sha256, last_sync_id FROM client_transaction WHERE user_id = ? AND transaction_id = ?"
    if (record := db_connection.execute(committed, (user_id, transaction_id)).fetchone()) is None:  # pruned since the claim
        raise bootstrap_again("compacted", f"transactionId {transaction_id!r} was committed, and its record went with the log.")
    done_sha256, last_sync_id = record
    if done_sha256 != changes_sha256:
        raise ApiError(409, "transaction_id_reused", f"transactionId {transaction_id!r} was already committed with different changes.")
    if last_sync_id == IN_FLIGHT:  # claimed by a write of this very transaction (group commit), not yet appended
        raise database_busy(f"transactionId {transaction_id!r} is being committed by another request; retry shortly.")
    return last_sync_id


def applied(db_connection: DbConnection, transaction: Generator[list[PendingAction], int, int]) -> int:
    """Runs apply_transaction's two steps at once, for a command or a test: the transaction's own turn of the log."""
    try:
        transaction.send(append_to_log(db_connection, [next(transaction)])[0])
    except StopIteration as done:  # answered from its record, or finished
        return done.value
    raise RuntimeError("apply_transaction yields once")


def apply_change(db_connection: DbConnection, index: int, change: Change, caller: Caller) -> PendingAction:
    """Apply one change to its row; return the sync action that logs it."""
    model, sql, dialect = change.model, change.model.sql, flavour().dialect

    def reject(code: str, reason: str, status: int = 409):
        raise ApiError(status, code, f"{change.where(index)}: {reason}", details={"change": index})

    def authorize(sync_groups: list[str], reason: str) -> None:
        # Type server, not auth: the client retries an auth error forever, but rolls back on server.
        if not set(sync_groups) <= caller.sync_groups:
            reject("forbidden", reason, status=403)

    if change.action == "create":  # its row is inserted unless one exists (ON CONFLICT DO NOTHING): see below
        row = change.data | ({model.writers.owner: caller.user_id} if model.writers.owner else {})  # tied to its writer
        sync_groups = model.sync_groups.groups_of(row)
        if model.owns_sync_group:
            if len(caller.sync_groups) > current_app.config["MAX_SYNC_GROUPS_PER_USER"]:  # `all` and the rest
                reject("too_many_sync_groups", f"you are in {len(caller.sync_groups) - 1:,} groups, as many as MAX_SYNC_GROUPS_PER_USER allows.", 403)
            for group in sync_groups:  # whoever creates a sync group is its first member
                join(db_connection, caller.user_id, group, announce=False)
                caller.sync_groups.add(group)
                caller.joined = True
        authorize(sync_groups, f"you are not a member of {', '.join(sync_groups)}.")
        check_references(db_connection, model, row, reject, caller.user_id, change.data)
        written = db_connection.execute(sql.insert, model.stored(row, dialect))  # and a create of the same id elsewhere waits
        if (stored := written.fetchone()) is None:
            reject("already_exists", f"{model.name} {change.model_id!r} already exists.")
        if model.owns_sync_group and not claim_sync_groups(db_connection, sync_groups):
            # A deleted one's members, who keep it, would see the new one's rows, and its new members its old actions.
            reject("sync_group_reused", f"{model.name} id {change.model_id!r} was used before; choose a new one.")
    else:
        stored, found = fetch_locked(db_connection, sql.select + row_lock(change.action), (change.model_id,))  # locked until COMMIT
        row = None if stored is None else model.reader(dialect, found.description).values(stored)
        if row is None:
            reject("does_not_exist", f"{model.name} {change.model_id!r} does not exist.")
        sync_groups = model.sync_groups.groups_of(row)
        authorize(sync_groups, "the row is outside your sync groups.")  # without saying whose it is
        if not model.writers.allow(row, caller.user_id):
            reject("forbidden", f"only the user who created this {model.name} may change it.", status=403)
        if change.action == "update":
            changed = {name: value for name, value in change.data.items() if row[name] != value}
            row.update(changed)
            check_references(db_connection, model, row, reject, caller.user_id, changed)
            moved_to = model.sync_groups.groups_of(row)
            if moved_to != sync_groups:
                reject("sync_groups_changed", f"this update would move the row from {sync_groups} to {moved_to}. A row keeps its "
                       "sync groups for its whole life, or clients of the old groups would never see it leave: delete it and create a new one instead.")
            written = db_connection.execute(sql.update, [*model.stored(row, dialect)[1:], change.model_id])
            stored = written.fetchone()
        else:
            # A deleted Group keeps its members, so that they receive this delete.
            check_not_referenced(db_connection, model, row, reject)
            db_connection.execute(sql.delete, (change.model_id,)).fetchone()  # read: its error, if any, is this write's

    data = None
    if change.action != "delete":
        # The row as the database stored it (RETURNING): exactly what a bootstrap reads.
        wire_row = model.reader(dialect, written.description).wire_row(stored)
        data = json.dumps(wire_row, separators=(",", ":"))
    return PendingAction(SYNC_ACTIONS[change.action], model.name, change.model_id, data, sync_groups)


def append_to_log(db_connection: DbConnection, transactions: list[list[PendingAction]]) -> list[int]:
    """Append each transaction's sync actions, in order, and their group links; return each one's last syncId.
    Group commit gives it the transactions of a whole batch at once: one turn of the log's lock for them all."""
    lock_log(db_connection)
    now = int(time.time())
    insert = "INSERT INTO sync_action (action, model_name, model_id, data, created_at) VALUES (?, ?, ?, ?, ?) RETURNING id"
    actions = [action for pending in transactions for action in pending]
    inserted = [db_connection.execute(insert, (a.action, a.model_name, a.model_id, a.data, now)) for a in actions]  # sent, then read
    sync_ids = [cursor.fetchone()[0] for cursor in inserted]
    links = [(group, sync_id) for action, sync_id in zip(actions, sync_ids) for group in action.sync_groups]
    db_connection.executemany("INSERT INTO sync_action_group (sync_group, sync_action_id) VALUES (?, ?)", links)
    if flavour().postgres:
        postgres.notify_log(db_connection)  # wakes held polls on every app server (machinery/long_poll.py)
    last = iter(sync_ids)
    return [[next(last) for _ in pending][-1] for pending in transactions]  # each transaction's last: every one has an action


def lock_log(db_connection: DbConnection) -> None:
    """Take the log's tail until COMMIT, so that transactions commit in the order of their syncIds and a poller never
    skips one (SQLite's write lock already does). On PostgreSQL a syncId is drawn at insert and seen at commit: A takes 10,
    B takes 11 and commits, a poller reads past 11, then A commits 10, which it never sees (docs/design.md)."""
    if flavour().postgres:
        postgres.lock_log(db_connection)


SYNC_ACTIONS = {"create": "insert", "update": "update", "delete": "delete"}  # a change's action, as its sync action names it


def claim_sync_groups(db_connection: DbConnection, sync_groups: list[str]) -> bool:
    """Whether the sync groups are new, and now taken for good: each name is claimed in sync_group_history, whose key makes
    a creator elsewhere wait and then find it taken, and none has links from before names were kept there."""
    listed = ", ".join("?" * len(sync_groups))
    claims = [db_connection.execute("INSERT INTO sync_group_history (sync_group) VALUES (?) ON CONFLICT DO NOTHING RETURNING 1",
                                    (sync_group,)) for sync_group in sync_groups]
    linked = db_connection.execute(f"SELECT 1 FROM sync_action_group WHERE sync_group IN ({listed}) LIMIT 1", sync_groups)
    return all([claim.fetchone() for claim in claims]) and linked.fetchone() is None  # every claim read (SQLite)


def check_references(db_connection: DbConnection, model: SyncedModel, row: dict, reject, user_id: int, changed: dict) -> None:
    """The rows a change names, where it sets them (a reference it keeps is held by its foreign key), locked until COMMIT."""
    named = [(attribute, target, db_connection.execute(target.sql.select + row_lock("reference"), (row[attribute],)))  # sent, then read
             for attribute, target in model.references if attribute in changed]
    for attribute, target, found in named:
        value = row[attribute]
        if (referenced := fetch_locked(db_connection, target.sql.select + row_lock("reference"), (value,), found)[0]) is None:
            reject("unknown_reference", f"{model.wire_name(attribute)} {value!r} does not name an existing {target.name}.")
        if attribute in model.writers.own and not target.writers.allow(dict(zip(target.columns, referenced)), user_id):
            reject("forbidden", f"{model.wire_name(attribute)} {value!r} names another user's {target.name}.", status=403)


def fetch_locked(db_connection: DbConnection, sql: str, params: tuple, found=None) -> tuple[Any, Any]:
    """The row of a select with a row lock (`found`, if sent already), and the cursor it came from. On PostgreSQL a row
    deleted while the select waited for its lock reads as none, though its deleter may have created it again: read anew."""
    found = db_connection.execute(sql, params) if found is None else found
    if (stored := found.fetchone()) is None and flavour().postgres:
        stored = (found := db_connection.execute(sql, params)).fetchone()
    return stored, found


def check_not_referenced(db_connection: DbConnection, model: SyncedModel, row: dict[str, Any], reject) -> None:
    for other in SYNCED_MODELS.values():
        for attribute, target in other.references:
            referring = f"SELECT 1 FROM {other.table.__tablename__} WHERE {attribute} = ? LIMIT 1"
            # No count: some of those rows may be in groups the caller cannot see.
            if target is model and db_connection.execute(referring, (row["id"],)).fetchone() is not None:
                reject("still_referenced", f"{other.name} rows still name it in {other.wire_name(attribute)}; delete them first.")


# --- 4. GET /bootstrap ------------------------------------------------------


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
    # Streamed a chunk of rows at a time, so a large bootstrap never sits in memory whole, and read on a
    # connection of its own, in one read transaction that lasts until the last chunk is sent (at most
    # BOOTSTRAP_MAX_S: machinery/database.py): the rows and firstSyncId share one snapshot.
    chosen = flavour()
    db_connection = own_connection()
    try:
        db_connection.execute(chosen.begin_read)
        allowed = caller_sync_groups(db_connection, g.user_id, g.token_sha256)
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

    response = current_app.response_class(read_in_time(body(), request.environ), mimetype="application/json")
    # Once the answer is sent, cut off, or never read (a HEAD): back to the pool, ending the transaction.
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


LOG_BOUNDS = "SELECT (SELECT after_sync_id FROM sync_log_start), (SELECT reason FROM sync_log_start), (SELECT max(id) FROM sync_action)"


def log_bounds(found) -> tuple[int, str, int]:
    """From LOG_BOUNDS's cursor: where the log starts, why there (reset: init-db; compacted: compact-log), and its head,
    the greatest syncId, as that statement's snapshot sees them; an empty log's head is where it starts."""
    start, why, newest = found.fetchone()
    return start or 0, why or "reset", newest or start or 0


def read_head(db_connection: DbConnection) -> int:
    return log_bounds(db_connection.execute(LOG_BOUNDS))[2]


# --- 5. GET /sync -----------------------------------------------------------


class SyncQuerySchema(Schema):
    since = SyncId()
    until = SyncId()
    limit = SyncId(validate=validate.Range(1, MAX_LIMIT, error="Must be between {min} and {max}."))
    wait = WaitSeconds(MAX_WAIT_S)

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
            head, sync_groups = read_head(db_connection), caller_sync_groups(db_connection, g.user_id, g.token_sha256)
        return {"sync": [], "lastSyncId": head, "syncGroups": sync_groups, "hasMore": False, "schemaVersion": SCHEMA_VERSION}

    since, limit = query["since"], query.get("limit", DEFAULT_LIMIT)
    # A long poll (wait=) holds an empty page until an action the caller may see arrives, or the wait ends.
    deadline = time.monotonic() + min(query.get("wait", 0), current_app.config["MAX_HOLD_S"])
    page = read_page(since, query.get("until"), limit)
    if "wait" in query and not page["sync"] and not page["hasMore"]:
        return_connection()  # a held poll holds no connection, and no snapshot
        woken = held_polls().hold(g.user_id, page, limit, deadline, request.environ)  # machinery/long_poll.py
        if woken is REREAD:  # its user's groups or token changed, or init-db ran: its token and cursor are checked again
            page = read_page(page["lastSyncId"], None, limit)
        elif woken is not None:  # answered from the one read its process made of the new actions
            page = woken
    return page_response(page)


def read_page(since: int, until: int | None, limit: int) -> dict[str, Any]:
    """The caller's actions in (since, until], `until` at most the head: the cursor never moves past an action the page did not carry."""
    last = INT64[1] if until is None else until
    # The page scans at most `limit` syncIds; summed here, where integers do not overflow.
    params = {"user_id": g.user_id, "since": since, "until": min(last, since + limit), "max_bytes": current_app.config["MAX_PAGE_BYTES"]}
    # One statement, so one snapshot without BEGIN: the log's bounds, the caller's groups and token, and the page as the
    # wire's JSON. It scans `limit` syncIds, stops after MAX_PAGE_BYTES, and moves the cursor past actions the caller may
    # not see, so a long run of them never makes a request slow (machinery/sqlite.py says why one statement).
    statement = postgres.PAGE if flavour().postgres else sqlite.PAGE  # one statement, in each engine's dialect
    start, why, head, cursor, sync_groups, actions, changes, token_sha256 = connection().execute(statement, params).fetchone()
    check_token(token_sha256, g.token_sha256)  # in the page's snapshot: see caller_sync_groups
    if since < start:  # compacted past it, or from before an init-db
        raise bootstrap_again(why or "reset", f"since={since} is older than the log, which starts after {start}.")
    if since > head:
        raise bootstrap_again("reset", f"since={since} is not a cursor of this database, whose log ends at {head}.")
    return {"sync": actions, "lastSyncId": cursor, "syncGroups": sync_groups, "hasMore": cursor < min(head, last),
            "membershipChanges": changes}  # for a long poll: how far this snapshot saw memberships change


def page_response(page: dict[str, Any]):
    """`sync` (text, or bytes that long polls share) and `syncGroups` are JSON already. Ends with a newline, as jsonify's do."""
    sync = page["sync"] if isinstance(page["sync"], bytes) else page["sync"].encode()
    tail = ('],"lastSyncId":%d,"syncGroups":%s,"hasMore":%s}\n' % (page["lastSyncId"], page["syncGroups"], "true" if page["hasMore"] else "false")).encode()
    # A large page is sent as it is, not copied into a body per poll: a write to `all` may answer thousands.
    head = b'{"sync":['
    body = [head, sync, tail] if len(sync) > 65_536 else head + sync + tail
    response = current_app.response_class(body, mimetype="application/json")
    response.content_length = len(head) + len(sync) + len(tail)
    return response


# --- 6. Errors --------------------------------------------------------------
# Every refusal is an ApiError (machinery/errors.py): status, Loco Sync's error type, a code.


def error_response(error: ApiError):
    body = {"error": {"type": error.type, "code": error.code, "message": error.message, "details": error.details}}
    return body, error.status, error.headers


def unexpected_error(error: Exception):
    if (fault := as_fault(error)) is None:  # one that may pass (a full disk, a lost connection) is 503 type network
        current_app.logger.exception("unexpected error")
    return error_response(fault or ApiError(500, "internal_error", "The server hit an unexpected error; see its log."))
