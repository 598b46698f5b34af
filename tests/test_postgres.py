"""What only PostgreSQL needs: commits that land out of syncId order, and
transactions retried (deadlocks, serialization failures). The anomalies of its
READ COMMITTED writes are tests/test_isolation.py's. Skipped unless TEST_DATABASE_URL names a database."""

from __future__ import annotations

import os
import threading
import time

import psycopg
import pytest
from sqlalchemy import text

import app as app_module
import machinery.writer as writer
from app import applied, apply_transaction, create_app, flavour, load, MutateSchema, read_page
from machinery.database import speaking_sql
from helpers import assert_error, create, fresh_database, group, mutate, reader, same_user, shut_down, sign_in, snapshot, todo, wire
from models import db

TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL")
pytestmark = pytest.mark.skipif(
    not TEST_DATABASE_URL, reason="PostgreSQL tests need TEST_DATABASE_URL, e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def changes(*raw: dict):
    return load(MutateSchema(), {"changes": list(raw)})["changes"]


def race(app, ada) -> tuple[dict, dict]:
    """Transaction A appends a sync action and stays open; B appends one after
    it and tries to commit; a poller reads; then A commits. Returns the two
    pages the poller read: before A's commit, and from its cursor after."""
    head = ada.get("/sync").get_json()["lastSyncId"]
    with app.app_context():
        a = speaking_sql(db.engine.raw_connection())
        try:
            a.execute(flavour().begin_write)
            applied(a, apply_transaction(a, changes(todo("ta", "g1")), ada.user_id, None, ""))  # takes syncId head + 1

            def b_writes():
                with app.app_context():
                    b = speaking_sql(db.engine.raw_connection())
                    try:
                        b.execute(flavour().begin_write)
                        applied(b, apply_transaction(b, changes(todo("tb", "g1")), ada.user_id, None, ""))
                        b.execute("COMMIT")
                    finally:
                        b.close()

            b_thread = threading.Thread(target=b_writes)
            b_thread.start()
            b_thread.join(timeout=1)  # B commits now, unless it waits for A
            before = ada.get(f"/sync?since={head}").get_json()
            a.execute("COMMIT")
        finally:
            a.close()  # back to the pool, rolled back if still open
        b_thread.join()
    after = ada.get(f"/sync?since={before['lastSyncId']}").get_json()
    return before, after


def seen(*pages: dict) -> list[str]:
    return [action["modelId"] for page in pages for action in page["sync"]]


def test_a_poller_never_skips_an_action_whose_transaction_commits_late(pg_app):
    ada = sign_in(pg_app, "Ada")
    mutate(ada, group("g1"), create("Author", "a1", name="Ada"))

    before, after = race(pg_app, ada)

    assert seen(before) == []  # B waited for A: nothing of either was visible yet
    assert seen(before, after) == ["ta", "tb"]  # both, in syncId order
    syncIds = [action["syncId"] for action in after["sync"]]
    assert syncIds == sorted(syncIds) and len(set(syncIds)) == 2


def test_without_the_log_lock_the_same_race_skips_an_action(pg_app, monkeypatch):
    """The naive design, to show the race above is real: without lock_log, B
    commits syncId n+2 first, the poller moves its cursor past n+1, and n+1,
    committed afterwards, is never served to it."""
    monkeypatch.setattr(app_module, "lock_log", lambda db_connection: None)
    ada = sign_in(pg_app, "Ada")
    mutate(ada, group("g1"), create("Author", "a1", name="Ada"))

    before, after = race(pg_app, ada)

    assert seen(before) == ["tb"]
    assert seen(after) == []
    assert "ta" not in seen(before, after)  # lost for this poller, though committed
    assert [row["id"] for row in ada.get("/bootstrap?type=eager&models=Todo").get_json()["bootstrap"]["Todo"]] == ["ta", "tb"]


def test_serialization_failures_that_persist_are_503_and_write_nothing(pg_app, monkeypatch):
    ada = sign_in(pg_app, "Ada")
    mutate(ada, group("g1"))
    attempts = []

    def always_conflicting(db_connection, *args):
        attempts.append(1)
        raise psycopg.errors.SerializationFailure("could not serialize access")

    monkeypatch.setattr(app_module, "apply_transaction", always_conflicting)
    monkeypatch.setattr(writer.time, "sleep", lambda seconds: None)
    response = ada.post("/mutate", json={"changes": [todo("t9", "g1")]})

    error = assert_error(response, 503, "database_busy", type="network")
    assert response.headers["Retry-After"] == "1" and "nothing was written" in error["message"]
    assert len(attempts) == pg_app.config["SERIALIZATION_RETRIES"] + 1
    monkeypatch.undo()
    assert ada.get("/bootstrap?type=eager&models=Todo").get_json()["bootstrap"]["Todo"] == []


def test_a_held_poll_is_not_woken_by_the_log_of_another_schema(tmp_path, monkeypatch):
    """Two apps on two schemas of one database share PostgreSQL's notifications.
    One's syncIds must not count as the other's: a poll held on the first, told
    of a higher syncId by the second, would read, find nothing, and read again
    at once until its wait ended, a busy loop."""
    with fresh_database("postgresql", tmp_path / "a") as url_a, fresh_database("postgresql", tmp_path / "b") as url_b:
        apps = [create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": url}) for url in (url_a, url_b)]
        try:
            ada, bob = sign_in(apps[0], "Ada"), sign_in(apps[1], "Bob")
            mutate(ada, group("g1"))
            head = ada.get("/sync").get_json()["lastSyncId"]
            reads = []
            monkeypatch.setattr(app_module, "read_page", lambda *args: reads.append(args) or read_page(*args))
            held = {}
            poll = threading.Thread(target=lambda: held.update(page=ada.get(f"/sync?since={head}&wait=2").get_json()))
            poll.start()
            time.sleep(0.5)  # the poll is held, and the listener of Ada's app listens
            mutate(bob, group("h1"), *(group(f"h{n}") for n in range(2, 12)))  # syncIds above Ada's head, in the other schema
            poll.join()

            assert held["page"]["sync"] == [] and wire(held["page"]["lastSyncId"]) == wire(head)
            assert len(reads) <= 2, f"the held poll read its page {len(reads)} times"
        finally:
            for app in apps:
                shut_down(app)


def test_a_large_write_takes_no_turn_so_small_writes_of_its_process_do_not_wait_for_it(pg_app, monkeypatch):
    """Writes of one process share one transaction at a time; a 1,000-change one held the turn (0.9 s),
    and every small write that came meanwhile waited for it."""
    ada = sign_in(pg_app, "Ada")
    mutate(ada, group("g1"), create("Author", "a1", name="Ada"))
    large_started, release = threading.Event(), threading.Event()
    apply_change = app_module.apply_change

    def slowly(db_connection, index, change, caller):
        if change.model_id == "slow-0":
            large_started.set()
            release.wait(10)
        return apply_change(db_connection, index, change, caller)

    monkeypatch.setattr(app_module, "apply_change", slowly)
    large = [todo(f"slow-{n}", "g1") for n in range(writer.ALONE_OVER + 1)]
    answers = {}
    sender = threading.Thread(target=lambda: answers.update(large=mutate(same_user(pg_app, ada), *large)), daemon=True)
    sender.start()
    assert large_started.wait(10)

    small = mutate(ada, todo("quick", "g1"))  # while the large one is still applying its changes

    release.set()
    sender.join(10)
    assert wire(answers["large"]["lastSyncId"]) == wire(small["lastSyncId"] + writer.ALONE_OVER + 1)  # it committed after


def test_large_writes_take_their_own_turn_one_at_a_time(pg_app, monkeypatch):
    """Side by side, four clients sending 1,000-change writes crowded the small ones out (their p99 21 s,
    some 503 after ten retries): large ones queue for one turn of their own, on every app server."""
    ada = sign_in(pg_app, "Ada")
    mutate(ada, group("g1"), create("Author", "a1", name="Ada"))
    first_started, release, second_started = threading.Event(), threading.Event(), threading.Event()
    apply_change = app_module.apply_change

    def slowly(db_connection, index, change, caller):
        if change.model_id == "first-0":
            first_started.set()
            release.wait(10)
        if change.model_id == "second-0":
            second_started.set()
        return apply_change(db_connection, index, change, caller)

    monkeypatch.setattr(app_module, "apply_change", slowly)
    senders = [threading.Thread(target=mutate, args=(same_user(pg_app, ada), *(todo(f"{name}-{n}", "g1") for n in range(writer.ALONE_OVER + 1))),
                                daemon=True) for name in ("first", "second")]
    senders[0].start()
    assert first_started.wait(10)
    senders[1].start()

    assert not second_started.wait(1)  # it waits for the first's turn to end

    release.set()
    for sender in senders:
        sender.join(10)
    assert second_started.is_set() and wire(ada.get("/sync").get_json()["lastSyncId"]) == wire(2 + 2 * (writer.ALONE_OVER + 1))


def test_a_revocation_during_a_write_commits_after_it_never_before_it(pg_app, monkeypatch):
    """Writers run side by side here: a revocation that committed while a write applied its changes
    let the write commit after it. The write now holds its user's row (FOR SHARE) until it commits."""
    ada = sign_in(pg_app, "Ada")
    mutate(ada, group("g1"), create("Author", "a1", name="Ada"))
    revoked, revoked_before_commit = threading.Event(), []
    apply_change = app_module.apply_change

    def revoke():
        with reader(pg_app).begin() as other:  # another server's connection, outside this one's writer
            other.execute(text("UPDATE users SET token_sha256 = '' WHERE id = :id"), {"id": ada.user_id})
        revoked.set()

    def during(db_connection, index, change, caller):
        threading.Thread(target=revoke, daemon=True).start()
        revoked_before_commit.append(revoked.wait(1))
        return apply_change(db_connection, index, change, caller)

    monkeypatch.setattr(app_module, "apply_change", during)
    response = ada.post("/mutate", json={"changes": [todo("t1", "g1")]})

    assert revoked.wait(10)
    assert revoked_before_commit == [False] and response.status_code == 200  # the revocation waited for the write
    assert_error(ada.get("/sync"), 401, "unauthorized", type="auth")


def test_a_large_write_that_waits_too_long_for_its_turn_is_503_network_and_writes_nothing(pg_app, monkeypatch):
    ada = sign_in(pg_app, "Ada")
    mutate(ada, group("g1"), create("Author", "a1", name="Ada"))
    monkeypatch.setattr(app_module.postgres, "LARGE_WRITE_WAIT_S", 0.5)
    with reader(pg_app).connect() as other:  # another server's large write, holding the turn
        other.execute(text("SELECT pg_advisory_lock(:key)"), {"key": app_module.postgres.LARGE_WRITE_LOCK})
        before = snapshot(pg_app)

        response = ada.post("/mutate", json={"changes": [todo(f"t{n}", "g1") for n in range(writer.ALONE_OVER + 1)]})

        assert_error(response, 503, "database_unavailable", type="network")
        assert snapshot(pg_app) == before
        other.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": app_module.postgres.LARGE_WRITE_LOCK})
    mutate(ada, *(todo(f"t{n}", "g1") for n in range(writer.ALONE_OVER + 1)))  # its turn free: written


def test_a_deadlock_met_after_the_last_read_of_a_transaction_is_retried_not_left_open(pg_app):
    """A pipelined transaction's last statements are read only as the pipeline ends: an error there comes after the
    ROLLBACK could be sent. The transaction must still be rolled back, so that its retry can begin (not a 500)."""
    ada = sign_in(pg_app, "Ada")
    mutate(ada, group("g1"), create("Author", "a1", name="Ada"))
    with reader(pg_app).begin() as admin:  # the link insert, never read, meets a deadlock once
        admin.execute(text("CREATE SEQUENCE fail_seq"))
        admin.execute(text("""CREATE FUNCTION fail_once() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN IF nextval('fail_seq') = 1 THEN RAISE EXCEPTION 'a deadlock' USING ERRCODE = '40P01'; END IF; RETURN NEW; END $$"""))
        admin.execute(text("CREATE TRIGGER fail_once BEFORE INSERT ON sync_action_group FOR EACH ROW EXECUTE FUNCTION fail_once()"))

    last_sync_id = mutate(ada, todo("t1", "g1"))["lastSyncId"]  # the first attempt's syncId is not reused: a gap, as any rollback leaves
    assert [(action["syncId"], action["modelId"]) for action in ada.get("/sync?since=2").get_json()["sync"]] == [(last_sync_id, "t1")]
