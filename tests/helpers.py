"""Change builders and log checks shared by the tests."""

from __future__ import annotations

import sqlite3
import threading
import time
from typing import Any

from app import in_write_transaction, join, leave, new_user
from models import SYNCED_MODELS


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


def database_path(app) -> str:
    return app.config["SQLALCHEMY_DATABASE_URI"].removeprefix("sqlite:///")


def snapshot(app) -> dict[str, list[tuple]]:
    """Every table's rows, read straight from the file: compare two to prove nothing was written."""
    tables = [m.table.__tablename__ for m in SYNCED_MODELS.values()]
    tables += ["sync_action", "sync_action_group", "client_transaction", "users", "memberships"]
    with sqlite3.connect(database_path(app)) as connection:
        return {table: connection.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall() for table in tables}


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


def random_transaction(rng, writer: int, number: int, groups: list[str], alive: list[str]) -> list[dict]:
    """1 to 3 changes to the writer's own todos: creates in its groups, updates and deletes of live ones."""
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
            changes.append(todo(todo_id, rng.choice(groups), text=f"written by {writer}"))
    return changes


def assert_acknowledged_in_log(log: list[dict], acknowledged) -> None:
    """Each (lastSyncId, changes) is in the log, whole and contiguous, ending at its lastSyncId."""
    for last_sync_id, changes in acknowledged:
        mine = log[last_sync_id - len(changes) : last_sync_id]
        assert [(a["modelId"], a["action"]) for a in mine] == [
            (c["modelId"], {"create": "insert"}.get(c["action"], c["action"])) for c in changes
        ], f"transaction ending at {last_sync_id} is not in the log as acknowledged"


def file_rows(database: str) -> dict[str, list[dict]]:
    """Every synced row, read straight from the file, as the wire shows it."""
    rows = {}
    with sqlite3.connect(database) as connection:
        for name, model in SYNCED_MODELS.items():
            columns = model.table.__table__.columns
            found = connection.execute(f"SELECT {', '.join(c.name for c in columns)} FROM {model.table.__tablename__}")
            # SQLite stores a boolean as 0 or 1: give each value its column's Python type back.
            typed = [{c.key: c.type.python_type(v) for c, v in zip(columns, values)} for values in found]
            rows[name] = model.schema.dump(typed, many=True)
    return rows


def action_groups(database: str) -> dict[int, set[str]]:
    """syncId -> its sync groups, read from the file."""
    groups: dict[int, set[str]] = {}
    with sqlite3.connect(database) as connection:
        for sync_action_id, sync_group in connection.execute("SELECT sync_action_id, sync_group FROM sync_action_group"):
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
