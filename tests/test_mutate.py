"""POST /mutate: rows and sync actions written together, all or nothing."""

import threading
import time

import pytest
from sqlalchemy import event, text

import app as app_module

from helpers import (
    assert_error,
    create,
    delete,
    group,
    mutate,
    query,
    read_log,
    reader,
    same_user,
    sign_in,
    snapshot,
    todo,
    update,
    wire,
)
from models import db


def test_create_writes_the_row_and_an_insert_action_with_the_full_row(seeded):
    result = mutate(seeded, todo("t2", "g2", text="Buy milk", likeCount=3))

    assert wire(result) == wire({"lastSyncId": 6})
    [action] = read_log(seeded, since=5)
    assert wire(action) == wire({
        "syncId": 6,
        "action": "insert",
        "modelName": "Todo",
        "modelId": "t2",
        "data": {"id": "t2", "text": "Buy milk", "authorId": "a1", "groupId": "g2", "isDone": False, "likeCount": 3},
    })
    rows = seeded.get("/bootstrap?type=eager&models=Todo").get_json()["bootstrap"]["Todo"]
    assert wire(action["data"]) in [wire(row) for row in rows]


def test_last_sync_id_is_the_greatest_sync_id_the_transaction_created(seeded):
    result = mutate(seeded, todo("t2", "g1"), todo("t3", "g1"), update("Todo", "t1", isDone=True))

    assert wire(result) == wire({"lastSyncId": 8})
    assert wire([a["syncId"] for a in read_log(seeded, since=5)]) == wire([6, 7, 8])


def test_a_sync_id_is_never_handed_out_twice(app, seeded):
    with reader(app).begin() as connection:  # the newest action is gone, but a client may hold its syncId
        connection.execute(text("DELETE FROM sync_action_group WHERE sync_action_id = 5"))
        connection.execute(text("DELETE FROM sync_action WHERE id = 5"))
    assert wire(mutate(seeded, todo("t2", "g1"))) == wire({"lastSyncId": 6})


def test_update_action_carries_the_full_row_after_the_change(seeded):
    mutate(seeded, update("Todo", "t1", isDone=True, likeCount=2))

    [action] = read_log(seeded, since=5)
    assert action["action"] == "update"
    assert wire(action["data"]) == wire({
        "id": "t1",
        "text": "Todo t1",
        "authorId": "a1",
        "groupId": "g1",
        "isDone": True,
        "likeCount": 2,
    })


def test_delete_action_carries_no_data(seeded):
    mutate(seeded, delete("Todo", "t1"))

    [action] = read_log(seeded, since=5)
    assert wire(action) == wire({"syncId": 6, "action": "delete", "modelName": "Todo", "modelId": "t1"})
    assert seeded.get("/bootstrap?type=eager&models=Todo").get_json()["bootstrap"]["Todo"] == []


def test_changes_apply_in_order_inside_one_transaction(seeded):
    mutate(seeded, todo("t2", "g1"), update("Todo", "t2", text="renamed"), delete("Todo", "t2"), todo("t2", "g2"))

    actions = read_log(seeded, since=5)
    assert [(a["action"], a.get("data", {}).get("groupId")) for a in actions] == [
        ("insert", "g1"),
        ("update", "g1"),
        ("delete", None),
        ("insert", "g2"),
    ]
    assert actions[1]["data"]["text"] == "renamed"


def test_each_sync_action_is_linked_to_the_sync_groups_of_its_row(app, seeded):
    mutate(seeded, update("Author", "a1", name="Ada L."), delete("Todo", "t1"))

    links = query(
        app,
        "SELECT a.model_name, a.model_id, a.action, g.sync_group FROM sync_action a "
        "JOIN sync_action_group g ON g.sync_action_id = a.id ORDER BY a.id",
    )
    assert links == [
        ("Group", "g1", "insert", "group:g1"),
        ("Group", "g2", "insert", "group:g2"),
        ("Author", "a1", "insert", "all"),
        ("Author", "a2", "insert", "all"),
        ("Todo", "t1", "insert", "group:g1"),
        ("Author", "a1", "update", "all"),
        ("Todo", "t1", "delete", "group:g1"),  # a delete reaches the groups that had the row
    ]


# --- Conflicts: 409, and the whole transaction writes nothing ---------------

CONFLICTS = {
    "create of an existing id": ([todo("t1", "g1")], "already_exists", "already exists"),
    "update of a missing row": ([update("Todo", "nope", isDone=True)], "does_not_exist", "does not exist"),
    "delete of a missing row": ([delete("Author", "nope")], "does_not_exist", "does not exist"),
    "todo naming a missing author": ([todo("t2", "g1", author_id="a9")], "unknown_reference", "authorId 'a9'"),
    "update to a missing author": ([update("Todo", "t1", authorId="a9")], "unknown_reference", "authorId 'a9'"),
    "delete of a group its todos name": ([delete("Group", "g1")], "still_referenced", "Todo rows still name it in groupId"),
    "delete of an author its todos name": ([delete("Author", "a1")], "still_referenced", "authorId"),
    "moving a todo to another group": ([update("Todo", "t1", groupId="g2")], "sync_groups_changed", "sync groups"),
}


@pytest.mark.parametrize("changes, code, says", CONFLICTS.values(), ids=CONFLICTS.keys())
def test_a_conflicting_change_is_409_and_rejects_the_whole_transaction(app, seeded, changes, code, says):
    before = snapshot(app)
    # Valid changes first: they must be undone with the failing one.
    good = [group("g3"), todo("t5", "g3"), update("Todo", "t1", text="changed")]
    response = seeded.post("/mutate", json={"changes": good + changes, "transactionId": "tx-1"})

    error = assert_error(response, 409, code)
    assert says in error["message"]
    assert f"changes[{len(good)}]" in error["message"]
    assert wire(error["details"]) == wire({"change": len(good)})
    assert snapshot(app) == before


def test_moving_a_todo_says_why_it_is_refused(seeded):
    error = assert_error(seeded.post("/mutate", json={"changes": [update("Todo", "t1", groupId="g2")]}), 409, "sync_groups_changed")
    assert "group:g1" in error["message"] and "group:g2" in error["message"]
    assert "delete it and create a new one" in error["message"]


def test_an_update_that_keeps_the_group_is_allowed(seeded):
    assert wire(mutate(seeded, update("Todo", "t1", groupId="g1", text="same group"))) == wire({"lastSyncId": 6})


# --- Idempotent retries -----------------------------------------------------


def test_a_retried_transaction_id_returns_the_original_last_sync_id_and_writes_nothing(app, seeded):
    changes = [todo("t2", "g1"), update("Todo", "t1", likeCount=1)]
    first = mutate(seeded, *changes, transaction_id="tx-42")
    after_first = snapshot(app)

    retry = mutate(seeded, *changes, transaction_id="tx-42")

    assert wire(retry) == wire(first) == wire({"lastSyncId": 7})
    assert snapshot(app) == after_first


def test_a_retry_is_answered_even_after_other_transactions(seeded):
    first = mutate(seeded, todo("t2", "g1"), transaction_id="tx-1")
    mutate(seeded, todo("t3", "g1"))
    assert wire(mutate(seeded, todo("t2", "g1"), transaction_id="tx-1")) == wire(first)


def test_a_reused_transaction_id_with_other_changes_is_409(app, seeded):
    mutate(seeded, todo("t2", "g1"), transaction_id="tx-1")
    before = snapshot(app)

    response = seeded.post("/mutate", json={"changes": [todo("t3", "g1")], "transactionId": "tx-1"})

    assert "tx-1" in assert_error(response, 409, "transaction_id_reused")["message"]
    assert snapshot(app) == before


def test_a_rejected_transaction_id_is_not_spent(seeded):
    rejected = {"changes": [todo("t2", "g1", author_id="a9")], "transactionId": "tx-1"}
    assert_error(seeded.post("/mutate", json=rejected), 409, "unknown_reference")
    assert wire(mutate(seeded, todo("t2", "g1"), transaction_id="tx-1")) == wire({"lastSyncId": 6})


# --- Validation: 400, with a message that names the problem -----------------

TODO = todo("t2", "g1")
INVALID = {
    "unknown model": ([create("Robot", "r1", name="x")], "changes.0.modelName: Unknown model 'Robot'. Known models: Author, Group, Todo"),
    "unknown action": ([{**update("Todo", "t1"), "action": "upsert"}], "changes.0.action: Must be one of: create, update, delete"),
    "unknown field": ([update("Todo", "t1", colour="red")], "changes.0.data.colour: Unknown field"),
    "unknown change key": ([{**delete("Todo", "t1"), "extra": 1}], "changes.0.extra: Unknown field"),
    "missing field on create": ([create("Todo", "t2", text="x")], "changes.0.data.authorId: Missing data for required field"),
    "boolean as a string": ([update("Todo", "t1", isDone="true")], "changes.0.data.isDone: Not a valid boolean"),
    "boolean as a number": ([update("Todo", "t1", isDone=1)], "changes.0.data.isDone: Not a valid boolean"),
    "integer as a string": ([update("Todo", "t1", likeCount="3")], "changes.0.data.likeCount: Not a valid integer"),
    "integer as a float": ([update("Todo", "t1", likeCount=1.5)], "changes.0.data.likeCount: Not a valid integer"),
    "integer as a boolean": ([update("Todo", "t1", likeCount=True)], "changes.0.data.likeCount: Not a valid integer"),
    "integer over 64 bits": ([update("Todo", "t1", likeCount=2**63)], "changes.0.data.likeCount: Must be greater than or equal to"),
    "text as a number": ([update("Todo", "t1", text=5)], "changes.0.data.text: Not a valid string"),
    "null field": ([update("Todo", "t1", text=None)], "changes.0.data.text: Field may not be null"),
    "data.id differs from modelId": ([create("Group", "g3", name="x") | {"modelId": "g4"}], "changes.0.data.id: data.id 'g3' must equal modelId 'g4'"),
    "update that sets id": ([update("Todo", "t1", id="t1")], "changes.0.data.id: An update cannot set id"),
    "update without data": ([{"action": "update", "modelName": "Todo", "modelId": "t1"}], "changes.0.data: Missing data"),
    "delete with data": ([{**delete("Todo", "t1"), "data": {}}], "changes.0.data: A delete change carries no data"),
    "group id with a comma": ([group("g,3")], "changes.0.data.id: A Group id cannot contain a comma"),
    "empty modelId": ([create("Group", "", name="x")], "changes.0.modelId: Length must be between 1 and 255"),
    "modelId over 255 characters": ([delete("Todo", "x" * 256)], "changes.0.modelId: Length must be between 1 and 255"),
    "change that is not an object": (["create t1"], "changes.0: Invalid input type"),
    "empty changes": ([], "changes: A transaction has 1 to 1000 changes"),
    "more than 1000 changes": ([TODO] * 1001, "changes: A transaction has 1 to 1000 changes"),
}


@pytest.mark.parametrize("changes, says", INVALID.values(), ids=INVALID.keys())
def test_an_invalid_change_is_400_and_writes_nothing(app, seeded, changes, says):
    before = snapshot(app)
    response = seeded.post("/mutate", json={"changes": changes})

    error = assert_error(response, 400, "invalid_request")
    assert says in error["message"]
    assert snapshot(app) == before


INVALID_BODIES = {
    "a list": ([TODO], "body: Invalid input type"),
    "no changes": ({}, "changes: Missing data for required field"),
    "changes not a list": ({"changes": TODO}, "changes: Not a valid list"),
    "empty transactionId": ({"changes": [todo("t2", "g1")], "transactionId": ""}, "transactionId: Length must be"),
    "numeric transactionId": ({"changes": [todo("t2", "g1")], "transactionId": 7}, "transactionId: Not a valid string"),
    "unknown top-level key": ({"changes": [todo("t2", "g1")], "lastSyncId": 3}, "lastSyncId: Unknown field"),
}


@pytest.mark.parametrize("body, says", INVALID_BODIES.values(), ids=INVALID_BODIES.keys())
def test_an_invalid_body_is_400_and_writes_nothing(app, seeded, body, says):
    before = snapshot(app)
    error = assert_error(seeded.post("/mutate", json=body), 400, "invalid_request")
    assert says in error["message"]
    assert snapshot(app) == before


def test_every_invalid_change_is_reported_and_the_valid_ones_are_not_written(app, seeded):
    before = snapshot(app)
    changes = [todo("t2", "g1"), update("Todo", "t1", isDone="no"), todo("t3", "g1"), delete("Robot", "r")]

    error = assert_error(seeded.post("/mutate", json={"changes": changes}), 400, "invalid_request")

    assert set(error["details"]["changes"]) == {"1", "3"}
    assert "changes.1.data.isDone" in error["message"] and "changes.3.modelName" in error["message"]
    assert snapshot(app) == before


def test_writes_that_wait_together_share_one_commit_and_a_refused_one_is_rolled_back_alone(app, seeded, engine):
    """Group commit: while a transaction commits, the writes that arrive wait;
    then one of them commits them all in one transaction, each in a savepoint."""
    writer = app.extensions["writer"]
    statements = []
    if engine == "sqlite":  # the statements are counted with sqlite3's trace callback, which psycopg lacks
        with app.app_context():
            db.engine.dispose()  # new connections from now on, traced
            event.listen(db.engine, "connect", lambda dbapi_connection, _: dbapi_connection.set_trace_callback(statements.append))
    answers = {}

    def send(name, *changes):
        response = same_user(app, seeded).post("/mutate", json={"changes": list(changes)})
        answers[name] = (response.status_code, response.get_json())

    with writer.changed:
        writer.committing = True  # as if a transaction were committing
    threads = [
        threading.Thread(target=send, args=("t2", todo("t2", "g1"))),
        threading.Thread(target=send, args=("t1 again", todo("t1", "g1"))),  # already exists: refused
        threading.Thread(target=send, args=("t3 and t4", todo("t3", "g2"), todo("t4", "g2"))),
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while len(writer.queued) < len(threads) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(writer.queued) == len(threads)
    statements.clear()
    with writer.changed:
        writer.committing = False
        writer.changed.notify_all()
    for thread in threads:
        thread.join()

    if engine == "sqlite":
        writes = [s.split()[0] for s in statements if s.split()[0] in ("BEGIN", "SAVEPOINT", "ROLLBACK", "RELEASE", "COMMIT")]
        assert writes.count("BEGIN") == writes.count("COMMIT") == 1  # one transaction, one fsync
        assert writes.count("SAVEPOINT") == 3 and writes.count("ROLLBACK") == 1  # the refused write alone undone
    assert answers["t1 again"][0] == 409 and answers["t1 again"][1]["error"]["code"] == "already_exists"
    assert answers["t2"][0] == answers["t3 and t4"][0] == 200
    # The two accepted writes got syncIds 6 to 8 in some order, each one's own contiguous.
    last = sorted(answer[1]["lastSyncId"] for name, answer in answers.items() if name != "t1 again")
    assert wire(last) in (wire([6, 8]), wire([7, 8]))
    log = read_log(seeded, since=5)
    assert wire([a["syncId"] for a in log]) == wire([6, 7, 8])
    assert sorted(a["modelId"] for a in log) == ["t2", "t3", "t4"]
    assert [a["modelId"] for a in log if a["modelId"] != "t2"] == ["t3", "t4"]


def test_a_retry_that_shares_a_transaction_with_its_first_attempt_is_503_network_then_answered(app, seeded):
    """Group commit can put a retry in the very transaction of its first attempt, whose syncIds are not taken yet:
    it is told to retry shortly (type network), and that retry is answered from the record, never applied twice."""
    writer = app.extensions["writer"]
    body = {"transactionId": "twice", "changes": [todo("t2", "g1")]}
    answers = []
    with writer.changed:
        writer.committing = True  # as if a transaction were committing: both wait, then share the next
    threads = [threading.Thread(target=lambda: answers.append(same_user(app, seeded).post("/mutate", json=body))) for _ in range(2)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while len(writer.queued) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(writer.queued) == 2
    with writer.changed:
        writer.committing = False
        writer.changed.notify_all()
    for thread in threads:
        thread.join()

    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [200, 503]
    assert_error(next(a for a in answers if a.status_code == 503), 503, "database_busy", type="network")
    first = next(a for a in answers if a.status_code == 200).get_json()
    assert wire(seeded.post("/mutate", json=body).get_json()) == wire(first)  # the client's retry
    assert [action["modelId"] for action in read_log(seeded, since=5)] == ["t2"]


def test_a_write_refused_after_it_claimed_its_transaction_id_is_refused_alone_and_spends_nothing(app, seeded, monkeypatch):
    """Its token revoked between the door and its transaction: the claim it already made is undone with it,
    and it is answered 401, not held up (SQLite kept a claim not read to its end from being released: 503)."""
    check_groups = app_module.caller_sync_groups
    monkeypatch.setattr(app_module, "caller_sync_groups", lambda db_connection, user_id, token, lock="": check_groups(db_connection, user_id, "0" * 64, lock))
    assert_error(seeded.post("/mutate", json={"transactionId": "claimed", "changes": [todo("t9", "g1")]}), 401, "unauthorized", type="auth")
    monkeypatch.undo()

    assert wire(mutate(seeded, todo("t9", "g1"), transaction_id="claimed")) == wire({"lastSyncId": 6})


def queued_together(app, *sends):
    """Runs each send (a function) in a thread of its own, held until all wait for the same group-commit batch."""
    writer = app.extensions["writer"]
    with writer.changed:
        writer.committing = True
    threads = []
    for send in sends:
        threads.append(threading.Thread(target=send))
        threads[-1].start()
        deadline = time.monotonic() + 10
        while len(writer.queued) < len(threads) and time.monotonic() < deadline:  # in this order
            time.sleep(0.01)
    assert len(writer.queued) == len(sends)
    with writer.changed:
        writer.committing = False
        writer.changed.notify_all()
    for thread in threads:
        thread.join()


def test_a_group_id_deleted_earlier_in_the_same_batch_is_not_reused(app, client):
    """Ada creates and deletes Group gx; Grace's create of gx shares their transaction. Ada keeps group:gx (a deleted
    Group keeps its members), so Grace must be refused, or Ada would read Grace's group. Names are claimed, not looked up."""
    grace = sign_in(app, "Grace")
    answers = {}
    queued_together(app, lambda: answers.update(ada=same_user(app, client).post("/mutate", json={"changes": [group("gx"), delete("Group", "gx")]})),
                    lambda: answers.update(grace=same_user(app, grace).post("/mutate", json={"changes": [group("gx", "Grace's secret")]})))

    assert answers["ada"].status_code == 200
    assert_error(answers["grace"], 409, "sync_group_reused")
    assert wire(client.get("/bootstrap?type=eager&models=Group").get_json()["bootstrap"]) == wire({"Group": []})


def test_a_write_whose_last_statement_fails_is_refused_alone_and_the_next_in_its_batch_is_not_blamed(app, seeded, monkeypatch):
    """On PostgreSQL a write's statements are pipelined: an error of one whose result it never read would surface in the
    next write. Here the foreign key refuses a delete the app's own check would have stopped (taken out): that write fails,
    with nothing of it kept, and the write after it in the batch commits."""
    monkeypatch.setattr(app_module, "check_not_referenced", lambda *args: None)
    answers = {}
    queued_together(app, lambda: answers.update(delete=same_user(app, seeded).post("/mutate", json={"changes": [delete("Author", "a1")]})),
                    lambda: answers.update(create=same_user(app, seeded).post("/mutate", json={"changes": [todo("t2", "g1", author_id="a2")]})))

    assert answers["delete"].status_code == 500 and answers["create"].status_code == 200, (answers["delete"].get_json(), answers["create"].get_json())
    assert [(action["action"], action["modelId"]) for action in read_log(seeded, since=5)] == [("insert", "t2")]
    assert [row["id"] for row in seeded.get("/bootstrap?type=eager&models=Author").get_json()["bootstrap"]["Author"]] == ["a1", "a2"]
