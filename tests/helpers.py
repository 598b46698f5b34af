"""Change builders, the database under test, and log checks shared by the tests."""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy import text
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.pool import NullPool

from app import in_write_transaction, join, leave
from machinery.cli import new_user
from models import SYNCED_MODELS, db

# --- The database under test: SQLite always, PostgreSQL when TEST_DATABASE_URL is set ---

POSTGRESQL_EXAMPLE = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
ENGINES = ["sqlite", "postgresql"]  # conftest's engine fixture skips postgresql without TEST_DATABASE_URL


def postgresql_url() -> URL:
    url = make_url(os.environ["TEST_DATABASE_URL"])
    return url.set(drivername="postgresql+psycopg") if url.drivername == "postgresql" else url  # psycopg 3, not psycopg2


@contextmanager
def fresh_database(engine: str, directory: str | Path) -> Iterator[str]:
    """The SQLAlchemy URL of a new, empty database of `engine` ("sqlite" or
    "postgresql"): a file in `directory`, or a schema of its own in
    TEST_DATABASE_URL, so that runs and tests never share tables. The schema
    is dropped afterwards; dispose of the app's engine first."""
    if engine == "sqlite":
        url = f"sqlite:///{Path(directory) / 'loco.sqlite3'}"
        try:
            yield url
        finally:
            forget_reader(url)
        return
    base = postgresql_url()
    schema = f"loco_{secrets.token_hex(8)}"
    admin = sqlalchemy.create_engine(base, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"CREATE SCHEMA {schema}"))
    # libpq's options set the search path of every connection; the
    # application_name finds any connection left open at the end.
    url = base.update_query_dict({"options": f"-csearch_path={schema}", "application_name": schema})
    url = url.render_as_string(hide_password=False)
    try:
        yield url
    finally:
        forget_reader(url)
        with admin.connect() as connection:
            # A connection left idle in a transaction would make DROP SCHEMA wait forever.
            connection.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :schema AND pid <> pg_backend_pid()"),
                {"schema": schema},
            )
            connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def shut_down(app) -> None:
    """Release what an app holds, so that its database can be dropped: its
    watcher's thread, if a held poll started one, ends and lets go of its
    connection, and the pool closes the rest."""
    held_polls = app.extensions["held_polls"]
    held_polls.close()
    for thread in held_polls.threads:
        thread.join(timeout=5)
    with app.app_context():
        db.engine.dispose()


READERS: dict[str, Engine] = {}


def url_of(app_or_url) -> str:
    return app_or_url if isinstance(app_or_url, str) else app_or_url.config["SQLALCHEMY_DATABASE_URI"]


def reader(app_or_url) -> Engine:
    """An engine of the tests' own on the app's database (not the app's pool),
    to read and write its tables directly, on either engine."""
    url = url_of(app_or_url)
    if url not in READERS:
        READERS[url] = sqlalchemy.create_engine(url)
    return READERS[url]


def forget_reader(url: str) -> None:
    engine = READERS.pop(url, None)
    if engine is not None:
        engine.dispose()


def query(app_or_url, sql: str, **params: Any) -> list[tuple]:
    with reader(app_or_url).connect() as connection:
        return [tuple(row) for row in connection.execute(text(sql), params)]


def database_path(app) -> str:
    """The SQLite file, for the tests that are about SQLite itself."""
    return app.config["SQLALCHEMY_DATABASE_URI"].removeprefix("sqlite:///")


def sign_in(app, name: str = "Ada", *sync_groups: str):
    """A test client that sends a new user's token; the user has `all` and `sync_groups`."""

    def create(db_connection):
        user_id, token = new_user(db_connection, name)
        for sync_group in sync_groups:
            join(db_connection, user_id, sync_group)
        return user_id, token

    with app.app_context():
        user_id, token = in_write_transaction(create)
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    client.user_id, client.token = user_id, token
    return client


def same_user(app, client):
    """Another test client with `client`'s token, for use from another thread."""
    other = app.test_client()
    other.environ_base.update(client.environ_base)
    return other


def give_author(app, client, author_id: str) -> None:
    """Make an Author the client's user's, as if it had created it: who owns an Author is not on the wire,
    so this takes no syncId, and the seeded log stays as it was."""
    with app.app_context():
        in_write_transaction(lambda db_connection: db_connection.execute("UPDATE authors SET user_id = ? WHERE id = ?", (client.user_id, author_id)))


def set_member(app, client, sync_group: str, member: bool = True) -> None:
    with app.app_context():
        in_write_transaction(lambda db_connection: (join if member else leave)(db_connection, client.user_id, sync_group))


def create(model: str, model_id: str, **fields: Any) -> dict:
    return {"action": "create", "modelName": model, "modelId": model_id, "data": {"id": model_id, **fields}}


def update(model: str, model_id: str, **fields: Any) -> dict:
    return {"action": "update", "modelName": model, "modelId": model_id, "data": fields}


def delete(model: str, model_id: str) -> dict:
    return {"action": "delete", "modelName": model, "modelId": model_id}


def group(group_id: str, name: str | None = None) -> dict:
    return create("Group", group_id, name=name or f"Group {group_id}")


def todo(todo_id: str, group_id: str, author_id: str = "a1", **fields: Any) -> dict:
    row = {"text": f"Todo {todo_id}", "authorId": author_id, "groupId": group_id, "isDone": False, "likeCount": 0}
    return create("Todo", todo_id, **{**row, **fields})


def mutate(client, *changes: dict, transaction_id: str | None = None, expect: int = 200) -> dict:
    body: dict[str, Any] = {"changes": list(changes)}
    if transaction_id is not None:
        body["transactionId"] = transaction_id
    response = client.post("/mutate", json=body)
    assert response.status_code == expect, response.get_json()
    return response.get_json()


def assert_error(response, status: int, code: str, type: str = "server") -> dict:
    """Every refusal has the one error shape; returns the error object."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"type", "code", "message", "details"}
    assert (error["type"], error["code"]) == (type, code), error
    assert isinstance(error["message"], str) and error["message"]
    return error


def snapshot(app) -> dict[str, list[tuple]]:
    """Every table's rows, read straight from the database: compare two to prove nothing was written.
    Sorted here, not by ORDER BY, so that no collation decides the order."""
    tables = [m.table.__tablename__ for m in SYNCED_MODELS.values()]
    tables += ["sync_action", "sync_action_group", "client_transaction", "users", "memberships"]
    with reader(app).connect() as connection:
        return {table: sorted((tuple(row) for row in connection.execute(text(f"SELECT * FROM {table}"))), key=repr) for table in tables}


def replay(actions: list[dict], rows: dict[str, dict[str, dict]] | None = None) -> dict[str, dict[str, dict]]:
    """Apply sync actions as a client would: {modelName: {modelId: row}}."""
    rows = {name: dict(found) for name, found in (rows or {}).items()}
    for action in actions:
        table = rows.setdefault(action["modelName"], {})
        if action["action"] == "insert":
            assert action["modelId"] not in table, f"insert of a row the client has: {action}"
            table[action["modelId"]] = action["data"]
        elif action["action"] == "update":
            assert action["modelId"] in table, f"update of a row the client lacks: {action}"
            table[action["modelId"]] = action["data"]
        else:
            assert action["modelId"] in table, f"delete of a row the client lacks: {action}"
            del table[action["modelId"]]
    return {name: found for name, found in rows.items() if found}


def wire(value: Any) -> str:
    """Wire data as canonical JSON text, to compare with its types: in Python 0 == False and 1 == 1.0, in JSON text they differ."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def as_store(bootstrap: dict[str, list[dict]]) -> dict[str, dict[str, dict]]:
    return {name: {row["id"]: row for row in found} for name, found in bootstrap.items() if found}


def read_log(client, since: int = 0, limit: int = 5000) -> list[dict]:
    """Every sync action after `since` a test client may see, following pages."""
    return read_log_with(lambda path: client.get(path).get_json(), since, limit)


def read_log_with(fetch, since: int = 0, limit: int = 5000) -> list[dict]:
    """The same over any transport: `fetch(path)` returns a /sync page."""
    actions: list[dict] = []
    while True:
        page = fetch(f"/sync?since={since}&limit={limit}")
        actions += page["sync"]
        since = page["lastSyncId"]
        if not page["hasMore"]:
            return actions


def random_transaction(rng, writer: int, number: int, groups: list[str], alive: list[str], author_id: str) -> list[dict]:
    """1 to 3 changes to the writer's own todos: creates in its groups (by its user's Author), updates and deletes of live ones."""
    changes = []
    for position in range(rng.choice([1, 1, 2, 3])):
        roll = rng.random()
        if alive and roll < 0.35:
            changes.append(update("Todo", rng.choice(alive), likeCount=rng.randint(0, 99), isDone=rng.random() < 0.5))
        elif alive and roll < 0.5:
            changes.append(delete("Todo", alive.pop(rng.randrange(len(alive)))))
        else:
            todo_id = f"w{writer}-{number}-{position}"
            alive.append(todo_id)
            changes.append(todo(todo_id, rng.choice(groups), author_id, text=f"written by {writer}"))
    return changes


def transaction_sync_ids(last_sync_id: int, changes: list[dict]) -> range:
    """The syncIds of a transaction: one per change, contiguous, ending at its lastSyncId."""
    return range(last_sync_id - len(changes) + 1, last_sync_id + 1)


def assert_acknowledged_in_log(log: list[dict], acknowledged) -> None:
    """Each (lastSyncId, changes) is in the log, whole and contiguous, ending at its lastSyncId.
    Looked up by syncId, not by position: a PostgreSQL log may have holes."""
    by_sync_id = {action["syncId"]: action for action in log}
    for last_sync_id, changes in acknowledged:
        mine = [by_sync_id.get(sync_id) for sync_id in transaction_sync_ids(last_sync_id, changes)]
        assert [a and (a["modelId"], a["action"]) for a in mine] == [
            (c["modelId"], {"create": "insert"}.get(c["action"], c["action"])) for c in changes
        ], f"transaction ending at {last_sync_id} is not in the log as acknowledged"


def assert_log_holds_exactly(log: list[dict], transactions, engine: str) -> None:
    """The log is the actions of these (lastSyncId, changes) and nothing else,
    in ascending syncId order, none repeated: each transaction whole and
    contiguous, ending at its lastSyncId. SQLite never leaves a hole between
    syncIds; a PostgreSQL sequence may (a transaction rolled back after taking
    ids), so there only each transaction's own syncIds must be contiguous."""
    sync_ids = [action["syncId"] for action in log]
    assert wire(sync_ids) == wire(sorted(set(sync_ids))), "syncIds repeated or out of order"
    assert_acknowledged_in_log(log, transactions)
    claimed = sorted(sync_id for last_sync_id, changes in transactions for sync_id in transaction_sync_ids(last_sync_id, changes))
    assert wire(sync_ids) == wire(claimed), "the log holds actions no acknowledged transaction wrote, or two claim one syncId"
    if engine == "sqlite":
        assert wire(sync_ids) == wire(list(range(1, len(sync_ids) + 1))), "the log has a hole"


def stored_rows(source) -> dict[str, list[dict]]:
    """Every synced row, read straight from the database (of an app or URL, or on a connection), as the wire shows it."""
    if not isinstance(source, sqlalchemy.Connection):
        with reader(source).connect() as connection:
            return stored_rows(connection)
    rows = {}
    for name, model in SYNCED_MODELS.items():
        # Through SQLAlchemy's Core, not the app's reader: the column types give each value its Python type back.
        found = source.execute(sqlalchemy.select(model.table.__table__))
        rows[name] = model.schema.dump([row._asdict() for row in found], many=True)
    return rows


def action_groups(app_or_url) -> dict[int, set[str]]:
    """syncId -> its sync groups, read straight from the database."""
    groups: dict[int, set[str]] = {}
    for sync_action_id, sync_group in query(app_or_url, "SELECT sync_action_id, sync_group FROM sync_action_group"):
        groups.setdefault(sync_action_id, set()).add(sync_group)
    return groups


def run_clients(writer, writers: int, poller, pollers: int) -> float:
    """Run writer(n) and poller(n, writers_done) in threads at once; pollers
    finish once every writer has. Returns the writers' seconds; raises the
    first failure of any thread."""
    errors: list[BaseException] = []
    writers_done = threading.Event()

    def guarded(target, *args):
        try:
            target(*args)
        except BaseException as error:  # surfaced in the calling thread below
            errors.append(error)
            writers_done.set()

    polling = [threading.Thread(target=guarded, args=(poller, n, writers_done)) for n in range(pollers)]
    writing = [threading.Thread(target=guarded, args=(writer, n)) for n in range(writers)]
    started = time.monotonic()
    for thread in polling + writing:
        thread.start()
    for thread in writing:
        thread.join()
    seconds = time.monotonic() - started
    writers_done.set()
    for thread in polling:
        thread.join()
    assert not errors, errors
    return seconds
