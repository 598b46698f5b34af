"""Writes on PostgreSQL run side by side at READ COMMITTED: each anomaly that allows, and the guard
that prevents it (docs/design.md, "Writes on PostgreSQL"). Each test sets up the race with a second
connection, as another app server's transaction would be, and fails without its guard. (SQLite's
writers take turns, so none of these races can happen there.) The log's lock, which keeps commits
in syncId order, is proved by tests/test_postgres.py. Skipped unless TEST_DATABASE_URL names a database."""

from __future__ import annotations

import os
import threading
import time

import psycopg
import pytest

import app as app_module
import machinery.writer as writer
from app import append_to_log, apply_transaction, flavour, load, MutateSchema
from helpers import assert_error, create, delete, give_author, group, mutate, query, same_user, sign_in, todo, update, url_of, wire
from machinery import postgres
from machinery.database import speaking_sql
from models import db

TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL")
pytestmark = pytest.mark.skipif(
    not TEST_DATABASE_URL, reason="PostgreSQL tests need TEST_DATABASE_URL, e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
WAITS_S = 1  # how long a request must stay blocked to count as waiting for the other transaction


@pytest.fixture
def ada(pg_app):
    ada = sign_in(pg_app, "Ada")
    mutate(ada, group("g1"), create("Author", "a1", name="Ada"))
    give_author(pg_app, ada, "a1")
    return ada


def other_server(pg_app) -> psycopg.Connection:
    """A connection of another app server: its own transactions, outside this app's writer."""
    return psycopg.connect(url_of(pg_app).replace("postgresql+psycopg://", "postgresql://"), autocommit=True)


def in_background(work) -> tuple[threading.Thread, dict]:
    """Runs `work` in a thread; whether it is still running after WAITS_S, and what it returned."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = work()
        except Exception as error:  # an exception of the other server's transaction, for the test to look at
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(WAITS_S)
    outcome["waited"] = thread.is_alive()
    return thread, outcome


class Transaction:
    """apply_transaction on a connection of its own, as another app server's writer runs it: first its rows, then its turn of the log."""

    def __init__(self, pg_app, user_id: int, changes: list[dict], transaction_id: str | None = None, base_sync_id: int | None = None):
        self.context = pg_app.app_context()
        self.context.push()
        self.connection = speaking_sql(db.engine.raw_connection())
        self.connection.execute(flavour().begin_write)
        loaded = load(MutateSchema(), {"changes": changes})["changes"]
        self.steps = apply_transaction(self.connection, loaded, user_id, transaction_id, app_module.fingerprint(changes), None, base_sync_id)
        self.pending = next(self.steps)

    def commit(self) -> int:
        try:
            self.steps.send(append_to_log(self.connection, [self.pending])[0])
        except StopIteration as finished:
            last_sync_id = finished.value
        self.connection.execute("COMMIT")
        self.connection.close()
        self.context.pop()
        return last_sync_id


def test_an_update_waits_for_a_concurrent_one_and_applies_on_top_of_it(pg_app, ada):
    """Lost update: read the row, another server updates it and commits, write the row back as read.
    Guard: the row is read FOR NO KEY UPDATE, which waits for the other's lock and returns its version."""
    mutate(ada, todo("t1", "g1"))
    with other_server(pg_app) as other:
        other.execute("BEGIN")
        other.execute("UPDATE todos SET like_count = 7 WHERE id = 't1'")
        thread, outcome = in_background(lambda: mutate(ada, update("Todo", "t1", text="Renamed"), transaction_id="rename"))
        assert outcome["waited"]  # for the other's row lock
        other.execute("COMMIT")
        thread.join(10)

    rows = ada.get("/bootstrap?type=eager&models=Todo").get_json()["bootstrap"]["Todo"]
    assert wire([(row["text"], row["likeCount"]) for row in rows]) == wire([("Renamed", 7)])  # on top of the other commit
    action = ada.get(f"/sync?since={outcome['value']['lastSyncId'] - 1}").get_json()["sync"][0]
    assert wire(action["data"]["likeCount"]) == wire(7) and wire(action["data"]["text"]) == wire("Renamed")


def test_a_create_racing_a_create_of_the_same_id_is_refused_as_already_exists(pg_app, ada):
    """Two servers create Todo t1: each saw no t1, the second insert fails on the primary key, a 500.
    Guard: INSERT ... ON CONFLICT (id) DO NOTHING, which waits for the other and then writes nothing."""
    with other_server(pg_app) as other:
        other.execute("BEGIN")
        other.execute("INSERT INTO todos (id, text, author_id, group_id, is_done, like_count) VALUES ('t1', 'Theirs', 'a1', 'g1', false, 0)")
        thread, outcome = in_background(lambda: ada.post("/mutate", json={"changes": [todo("t1", "g1", text="Mine")]}))
        assert outcome["waited"]
        other.execute("COMMIT")
        thread.join(10)

    assert_error(outcome["value"], 409, "already_exists")
    assert query(pg_app, "SELECT text FROM todos") == [("Theirs",)]


def test_a_row_a_change_names_cannot_be_deleted_until_it_commits(pg_app, ada, monkeypatch):
    """Ada creates a Todo naming Author a1; after her check that a1 exists, another server deletes a1 and commits;
    her insert then breaks the foreign key, a 500. Guard: the named row is read FOR KEY SHARE, so that delete waits."""
    deleting = {}
    check_references = app_module.check_references

    def and_then_deleted(*args, **kwargs):
        check_references(*args, **kwargs)
        if not deleting:  # the Author row is read by now: the other server deletes it
            deleting["other"] = other_server(pg_app)
            deleting["thread"], deleting["outcome"] = in_background(lambda: deleting["other"].execute("DELETE FROM authors WHERE id = 'a1'"))

    monkeypatch.setattr(app_module, "check_references", and_then_deleted)
    response = ada.post("/mutate", json={"changes": [todo("t1", "g1")]})
    deleting["thread"].join(10)
    deleting["other"].close()

    assert deleting["outcome"]["waited"]  # for Ada's commit
    assert response.status_code == 200, response.get_json()
    assert isinstance(deleting["outcome"]["error"], psycopg.errors.ForeignKeyViolation)  # then refused: t1 names a1
    assert query(pg_app, "SELECT id, author_id FROM todos") == [("t1", "a1")]


def test_a_delete_waits_for_a_row_being_made_to_reference_it(pg_app, ada):
    """Another server is creating a Todo that names Author a1; Ada deletes a1, sees no Todo naming it, and her delete
    then breaks the foreign key, a 500. Guard: the deleted row is read FOR UPDATE, so she waits and sees the Todo."""
    with other_server(pg_app) as other:
        other.execute("BEGIN")
        other.execute("INSERT INTO todos (id, text, author_id, group_id, is_done, like_count) VALUES ('t1', 'Theirs', 'a1', 'g1', false, 0)")
        thread, outcome = in_background(lambda: ada.post("/mutate", json={"changes": [delete("Author", "a1")]}))
        assert outcome["waited"]
        other.execute("COMMIT")
        thread.join(10)

    assert_error(outcome["value"], 409, "still_referenced")
    assert query(pg_app, "SELECT id FROM authors") == [("a1",)]


def test_groups_created_at_once_by_one_user_cannot_pass_the_limit(pg_app, ada):
    """Write skew: two of Ada's transactions each count her groups, each finds room for one more, and both create one.
    Guard: a transaction that creates a sync group locks its user's row FOR NO KEY UPDATE, so the second counts after the first."""
    pg_app.config["MAX_SYNC_GROUPS_PER_USER"] = 2  # `all`, g1 and one more
    first = Transaction(pg_app, ada.user_id, [group("g2")])
    thread, outcome = in_background(lambda: ada.post("/mutate", json={"changes": [group("g3")]}))
    assert outcome["waited"]
    first.commit()
    thread.join(10)

    assert_error(outcome["value"], 403, "too_many_sync_groups")
    assert query(pg_app, "SELECT sync_group FROM memberships ORDER BY sync_group") == [("group:g1",), ("group:g2",)]


def test_a_retry_racing_its_first_attempt_is_answered_not_applied_again(pg_app, ada):
    """The client's first attempt is still committing on another server when its retry arrives: neither sees the other's
    record, and the change is applied twice. Guard: the transactionId is claimed first (its record's key), so the retry waits."""
    mutate(ada, todo("t1", "g1"))
    body = {"transactionId": "like", "changes": [update("Todo", "t1", likeCount=1)]}
    head = query(pg_app, "SELECT max(id) FROM sync_action")[0][0]
    first = Transaction(pg_app, ada.user_id, body["changes"], "like")
    thread, outcome = in_background(lambda: ada.post("/mutate", json=body))
    assert outcome["waited"]
    last_sync_id = first.commit()
    thread.join(10)

    assert outcome["value"].status_code == 200, outcome["value"].get_json()
    assert wire(outcome["value"].get_json()) == wire({"lastSyncId": last_sync_id})
    assert query(pg_app, "SELECT id FROM sync_action WHERE id > :head", head=head) == [(last_sync_id,)]  # applied once


def test_a_retry_whose_record_is_pruned_while_it_waits_is_refused_not_applied_again(pg_app, ada):
    """compact-log raises the log's start, then prunes records. A retry that waits on its record while it is pruned
    must see the raised start, or it applies its changes a second time. Guard: the log's bounds are read in a
    statement after the claim, so they are as new as the claim's outcome."""
    mutate(ada, todo("t1", "g1"))
    body = {"transactionId": "like", "baseSyncId": 3, "changes": [update("Todo", "t1", likeCount=1)]}
    first = ada.post("/mutate", json=body).get_json()["lastSyncId"]  # its record kept, and its base below
    head = query(pg_app, "SELECT max(id) FROM sync_action")[0][0]
    with other_server(pg_app) as compaction:
        compaction.execute("BEGIN")  # as compact-log's two steps would, committed at the same moment
        compaction.execute("DELETE FROM sync_log_start")
        compaction.execute("INSERT INTO sync_log_start (after_sync_id, reason) VALUES (%s, 'compacted')", (first,))
        compaction.execute("DELETE FROM client_transaction WHERE transaction_id = 'like'")
        thread, outcome = in_background(lambda: ada.post("/mutate", json=body))
        assert outcome["waited"]  # on the record being pruned
        compaction.execute("COMMIT")
        thread.join(10)

    assert_error(outcome["value"], 409, "bootstrap_again")
    assert wire(outcome["value"].get_json()["error"]["details"]["reason"]) == wire("compacted")
    assert query(pg_app, "SELECT max(id) FROM sync_action") == [(head,)]  # nothing applied again


def test_a_batch_holds_the_log_lock_only_to_append_never_while_its_rows_wait(pg_app, ada):
    """A batch whose first write took the log's lock, and whose second waits for a row another server holds,
    deadlocks with that server the moment it wants the log (PostgreSQL breaks it after deadlock_timeout).
    Guard: every write of a batch applies its rows first; the batch takes the log's lock only to append."""
    mutate(ada, todo("t1", "g1"))
    changes = [load(MutateSchema(), {"changes": [c]})["changes"] for c in (todo("t2", "g1"), update("Todo", "t1", text="Mine"))]
    log_lock_held = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = :key AND granted"
    with other_server(pg_app) as other:
        other.execute("BEGIN")
        other.execute("UPDATE todos SET like_count = 7 WHERE id = 't1'")

        def batch():
            with pg_app.app_context():
                writes = [writer.Write(lambda c, ch=ch: apply_transaction(c, ch, ada.user_id, None, "")) for ch in changes]
                pg_app.extensions["writer"].commit(writes, app_module.connection())
                return [write.outcome() for write in writes]

        thread, outcome = in_background(batch)
        assert outcome["waited"]  # its second write, for t1
        held_while_waiting = query(pg_app, log_lock_held, key=postgres.LOG_LOCK)
        other.execute("COMMIT")
        thread.join(10)

    assert held_while_waiting == [(0,)]  # so the other server could take its turn of the log meanwhile
    assert "error" not in outcome, outcome
    assert [value > 0 for value in outcome["value"]] == [True, True]
    assert query(pg_app, "SELECT text, like_count FROM todos WHERE id = 't1'") == [("Mine", 7)]


def test_writes_that_queue_while_another_server_holds_the_log_share_its_turn(pg_app, ada, monkeypatch):
    """While another app server holds the log's lock, the writes that queue here join the batch waiting for it:
    one transaction, one turn of the lock, one commit for all of them (without it: one for the first, one for the rest)."""
    apply_change = app_module.apply_change
    first_applying = threading.Event()

    def slow_first(db_connection, index, change, caller):
        if change.model_id == "t0":
            first_applying.set()
            time.sleep(0.5)  # the others arrive meanwhile, and queue
        return apply_change(db_connection, index, change, caller)

    monkeypatch.setattr(app_module, "apply_change", slow_first)
    clients = [same_user(pg_app, ada) for _ in range(4)]
    head = query(pg_app, "SELECT max(id) FROM sync_action")[0][0]
    with other_server(pg_app) as other:
        other.execute("BEGIN")
        other.execute("SELECT pg_advisory_xact_lock(%s)", (postgres.LOG_LOCK,))
        answers = {}

        def send(n, client):
            answers[n] = client.post("/mutate", json={"changes": [todo(f"t{n}", "g1")]})

        threads = [threading.Thread(target=send, args=(0, ada))]
        threads[0].start()
        assert first_applying.wait(10)
        threads += [threading.Thread(target=send, args=(n + 1, client)) for n, client in enumerate(clients)]
        for thread in threads[1:]:
            thread.start()
        time.sleep(WAITS_S)
        other.execute("COMMIT")
        for thread in threads:
            thread.join(10)

    assert [answers[n].status_code for n in range(5)] == [200] * 5
    transactions = query(pg_app, "SELECT count(DISTINCT xmin::text), count(*) FROM sync_action WHERE id > :head", head=head)
    assert transactions == [(1, 5)]


def test_a_row_deleted_and_created_again_while_an_update_waited_for_it_is_updated_not_refused(pg_app, ada):
    """Another server deletes Todo t1 and creates it again; Ada's update waited for t1's lock, and its read, whose snapshot
    predates the wait, finds t1 deleted: a false 409, which makes her client roll a good change back.
    Guard: a locked read that finds nothing reads once more, in a new statement, which sees the new row."""
    mutate(ada, todo("t1", "g1"))
    with other_server(pg_app) as other:
        other.execute("BEGIN")
        other.execute("DELETE FROM todos WHERE id = 't1'")
        other.execute("INSERT INTO todos (id, text, author_id, group_id, is_done, like_count) VALUES ('t1', 'New', 'a1', 'g1', false, 0)")
        thread, outcome = in_background(lambda: ada.post("/mutate", json={"changes": [update("Todo", "t1", likeCount=5)]}))
        assert outcome["waited"]
        other.execute("COMMIT")
        thread.join(10)

    assert outcome["value"].status_code == 200, outcome["value"].get_json()
    assert query(pg_app, "SELECT text, like_count FROM todos WHERE id = 't1'") == [("New", 5)]


def test_a_retry_whose_record_is_pruned_after_its_claim_met_it_is_told_to_bootstrap_again(pg_app, ada, monkeypatch):
    """The claim finds the record; compact-log prunes it before the record is read. Not a 500 (type server: the client
    would roll back a committed change), but bootstrap_again, as for any retry whose record went with the log."""
    mutate(ada, todo("t1", "g1"))
    body = {"transactionId": "like", "baseSyncId": 3, "changes": [update("Todo", "t1", likeCount=1)]}
    first = ada.post("/mutate", json=body).get_json()["lastSyncId"]
    answer_retry = app_module.answer_retry

    def pruned_meanwhile(*args):
        with other_server(pg_app) as compaction:  # compact-log's raise and prune, between the claim and the read
            compaction.execute("INSERT INTO sync_log_start (after_sync_id, reason) VALUES (%s, 'compacted')", (first,))
            compaction.execute("DELETE FROM client_transaction WHERE transaction_id = 'like'")
        return answer_retry(*args)

    monkeypatch.setattr(app_module, "answer_retry", pruned_meanwhile)
    response = ada.post("/mutate", json=body)

    assert_error(response, 409, "bootstrap_again")
    assert wire(response.get_json()["error"]["details"]) == wire({"reason": "compacted"})


def test_a_group_id_another_server_is_deleting_is_not_reused(pg_app, ada):
    """Ada, on another server, creates and deletes Group gx, not yet committed; Grace creates gx. The row is gone and
    Ada's links are not committed, so a look at the links finds nothing; Ada, who keeps group:gx, would read Grace's
    group. Guard: creating a sync group claims its name in sync_group_history, so Grace waits and finds it taken."""
    grace = sign_in(pg_app, "Grace")
    first = Transaction(pg_app, ada.user_id, [group("gx", "Ada's"), delete("Group", "gx")])
    thread, outcome = in_background(lambda: grace.post("/mutate", json={"changes": [group("gx", "Grace's secret")]}))
    assert outcome["waited"]
    first.commit()
    thread.join(10)

    assert_error(outcome["value"], 409, "sync_group_reused")
    assert wire(ada.get("/bootstrap?type=eager&models=Group").get_json()["bootstrap"]) == wire({"Group": [{"id": "g1", "name": "Group g1"}]})
