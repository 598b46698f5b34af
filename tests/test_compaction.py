"""Compaction: `flask --app app compact-log` shrinks the log while servers run. A cursor at or
above the new start is served exactly as before, one below it is told to bootstrap again
(reason compacted), bootstraps do not change, and a retried transaction is answered or
refused, never applied twice."""

import threading
import time

import pytest

from sqlalchemy import text

from app import create_app
from helpers import as_store, assert_error, create, delete, group, mutate, query, read_log, reader, replay, shut_down, sign_in, snapshot, todo, update, wire
from machinery.compaction import compact_log
from test_long_poll import finished, poll_in_background


def query_write(app, sql: str, **params) -> None:
    with reader(app).begin() as connection:
        connection.execute(text(sql), params)


def compact(runner, *args: str) -> str:
    result = runner.invoke(args=["compact-log", *args])
    assert result.exit_code == 0, result.output
    return result.output


def like(client, times: int, transaction_id: str | None = None, **body) -> int:
    """`times` updates of t1, each its own transaction; returns the last syncId."""
    for n in range(times):
        answer = client.post("/mutate", json={"changes": [update("Todo", "t1", likeCount=n + 1)], **body})
        assert answer.status_code == 200, answer.get_json()
    return answer.get_json()["lastSyncId"]


def pages(client, cursors) -> dict[int, str]:
    """Each cursor's page, as JSON text."""
    return {since: client.get(f"/sync?since={since}").get_data(as_text=True) for since in cursors}


def test_compaction_removes_the_actions_before_the_syncid_with_their_group_links(app, seeded, runner):
    like(seeded, 5)  # syncIds 6 to 10

    output = compact(runner, "--before", "8")

    assert output == "Compacted the log: removed 7 sync actions and 0 client transactions; it now starts after syncId 7.\n"
    assert query(app, "SELECT id FROM sync_action ORDER BY id") == [(8,), (9,), (10,)]
    assert query(app, "SELECT DISTINCT sync_action_id FROM sync_action_group ORDER BY sync_action_id") == [(8,), (9,), (10,)]


def test_a_cursor_below_the_start_is_told_to_bootstrap_again_because_the_log_was_compacted(seeded, runner):
    like(seeded, 5)
    compact(runner, "--before", "8")

    for since in (0, 5, 6):
        error = assert_error(seeded.get(f"/sync?since={since}"), 409, "bootstrap_again")
        assert wire(error["details"]) == wire({"reason": "compacted"})
        assert "starts after 7" in error["message"]


def test_cursors_at_or_above_the_start_get_exactly_the_pages_they_got_before(app, seeded, runner):
    other = sign_in(app, "Grace", "group:g2")  # sees some actions, not others
    head = like(seeded, 5)
    mutate(seeded, todo("t9", "g2"))
    before = pages(seeded, range(7, head + 2)), pages(other, range(7, head + 2))

    compact(runner, "--before", "8")

    assert (pages(seeded, range(7, head + 2)), pages(other, range(7, head + 2))) == before


def test_bootstraps_and_handshakes_are_the_same_after_compaction(seeded, runner):
    like(seeded, 3)
    urls = ["/bootstrap?type=eager&models=Group,Author,Todo", "/bootstrap?type=lazy&models=Todo&syncGroups=group:g1", "/sync"]
    before = [seeded.get(url).get_data(as_text=True) for url in urls]

    compact(runner, "--before", "1000")  # the whole log

    assert [seeded.get(url).get_data(as_text=True) for url in urls] == before
    # And the log goes on from its head: a client that bootstraps now follows it as before.
    first_sync_id = seeded.get("/sync").get_json()["lastSyncId"]
    last_sync_id = like(seeded, 1)
    assert wire([a["syncId"] for a in read_log(seeded, since=first_sync_id)]) == wire([last_sync_id])


def test_the_start_never_moves_past_the_head_nor_back(app, seeded, runner):
    assert compact(runner, "--before", "1000").endswith("it now starts after syncId 5.\n")
    assert compact(runner, "--before", "3").endswith("removed 0 sync actions and 0 client transactions; it now starts after syncId 5.\n")

    assert wire(seeded.get("/sync?since=5").get_json()["sync"]) == wire([])
    assert wire(like(seeded, 1)) == wire(6)  # syncIds are never handed out twice


def test_at_every_step_of_a_compaction_each_cursor_is_served_whole_or_refused(app, seeded):
    """Removal goes a batch at a time while clients read. After the start is raised and after every
    batch, every cursor gets either its page as it was, or bootstrap_again: never a page with a hole."""
    other = sign_in(app, "Grace", "group:g2")
    for n in range(4):
        mutate(seeded, update("Todo", "t1", likeCount=n), todo(f"t{n + 10}", "g2"))
    head = seeded.get("/sync").get_json()["lastSyncId"]
    floor = 9
    before = pages(seeded, range(head + 1)), pages(other, range(head + 1))
    checks = []

    def check():
        for client, expected in zip((seeded, other), before):
            for since, page in pages(client, range(head + 1)).items():
                if since < floor:
                    assert wire(assert_error(client.get(f"/sync?since={since}"), 409, "bootstrap_again")["details"]) == wire({"reason": "compacted"})
                else:
                    assert page == expected[since], since
        checks.append(query(app, "SELECT count(*) FROM sync_action")[0][0])

    with app.app_context():
        start, removed, pruned = compact_log(floor, batch=2, after_batch=check)

    assert wire((start, removed, pruned)) == wire((floor, floor, 0))
    assert checks == [11, 9, 7, 5, 4, 4]  # a step after each batch, the last one finding nothing left


def test_a_poll_held_below_the_new_start_ends_at_once_with_bootstrap_again(app, seeded, runner, base_url):
    grace = sign_in(app, "Grace", "group:g1")
    held_from = seeded.get("/sync").get_json()["lastSyncId"]
    poll = poll_in_background(base_url, grace.token, f"since={held_from}&wait=20")
    time.sleep(0.3)
    mutate(seeded, todo("t2", "g2"), todo("t3", "g2"))  # actions Grace may not see: her poll stays held
    time.sleep(0.3)
    assert poll["thread"].is_alive()

    compact(runner, "--before", str(held_from + 3))

    finished(poll, 10)
    assert poll["status"] == 409 and poll["seconds"] < 10
    assert wire(poll["body"]["error"]["details"]) == wire({"reason": "compacted"})


def test_polls_that_follow_the_log_while_it_is_compacted_and_written_miss_nothing(app, seeded, base_url):
    """Two writers and a poller above the floor, against a compaction of many batches: the poller reads
    every action it may see exactly once, in order, as a log read afterwards has them."""
    start = like(seeded, 40)
    writers = [sign_in(app, f"Writer {n}", "group:g1") for n in range(2)]
    reader = sign_in(app, "Reader", "group:g1")
    received, cursor = [], start

    def write(client, n):
        for k in range(60):
            mutate(client, update("Todo", "t1", text=f"writer {n}, {k}"))

    def read(finished):  # as a client polls, from the floor up, while the log is compacted below it
        nonlocal cursor
        while True:
            page = reader.get(f"/sync?since={cursor}&limit=7").get_json()
            received.extend(page["sync"])
            cursor = page["lastSyncId"]
            if not page["hasMore"] and finished():
                return

    threads = [threading.Thread(target=write, args=(client, n)) for n, client in enumerate(writers)]
    for thread in threads:
        thread.start()
    polling = threading.Thread(target=read, args=(lambda: not any(thread.is_alive() for thread in threads),))
    polling.start()
    with app.app_context():
        compact_log(start, batch=5)
    for thread in [*threads, polling]:
        thread.join()

    assert query(app, "SELECT min(id) FROM sync_action") == [(start + 1,)]
    assert [a["syncId"] for a in received] == [sync_id for (sync_id,) in query(app, "SELECT id FROM sync_action ORDER BY id")]
    assert len(received) == 120


def test_keep_days_removes_the_actions_older_than_that(app, seeded, runner):
    like(seeded, 3)  # 6 to 8
    day, now = 86400, int(time.time())
    query_write(app, "UPDATE sync_action SET created_at = NULL")  # written before the column existed: their age is unknown
    assert compact(runner, "--keep", "5").endswith("removed 0 sync actions and 0 client transactions; it now starts after syncId 0.\n")
    query_write(app, "UPDATE sync_action SET created_at = :at WHERE id <= 4 AND id > 1", at=now - 10 * day)

    assert compact(runner, "--keep", "5").endswith("it now starts after syncId 4.\n")
    assert compact(runner, "--keep", "5").endswith("removed 0 sync actions and 0 client transactions; it now starts after syncId 4.\n")
    assert query(app, "SELECT min(id), max(id) FROM sync_action") == [(5, 8)]


def test_compact_log_needs_exactly_one_of_before_and_keep(app, seeded, runner):
    before = snapshot(app)
    for args in ([], ["--before", "3", "--keep", "1"], ["--before", "0"], ["--keep", "-1"]):
        result = runner.invoke(args=["compact-log", *args])
        assert result.exit_code == 2, (args, result.output)
    assert snapshot(app) == before


def test_a_deleted_groups_id_stays_retired_after_its_actions_are_compacted(app, seeded, runner):
    """Its members keep their membership (to receive its delete): a new Group under its id would show them its rows."""
    grace = sign_in(app, "Grace", "group:g2")
    mutate(seeded, delete("Todo", "t1"), delete("Group", "g1"), delete("Group", "g2"))
    refused = {"changes": [create("Group", "g2", name="Reused")]}
    assert_error(grace.post("/mutate", json=refused), 409, "sync_group_reused")

    compact(runner, "--before", "1000")

    assert_error(grace.post("/mutate", json=refused), 409, "sync_group_reused")
    assert_error(sign_in(app, "Linus").post("/mutate", json={"changes": [group("g1")]}), 409, "sync_group_reused")
    assert query(app, "SELECT sync_group FROM sync_group_history ORDER BY sync_group") == [("group:g1",), ("group:g2",)]


# --- Retries of transactions whose records went with the log ---


def test_a_retry_of_a_transaction_whose_record_was_pruned_is_refused_and_writes_nothing(app, seeded, runner):
    body = {"transactionId": "tx-1", "baseSyncId": 5, "changes": [update("Todo", "t1", likeCount=1)]}
    assert wire(seeded.post("/mutate", json=body).get_json()) == wire({"lastSyncId": 6})
    like(seeded, 2)
    assert "and 1 client transactions" in compact(runner, "--before", "8")
    before = snapshot(app)

    error = assert_error(seeded.post("/mutate", json=body), 409, "bootstrap_again")

    assert wire(error["details"]) == wire({"reason": "compacted"}) and "baseSyncId=5" in error["message"]
    assert snapshot(app) == before


def test_a_retry_whose_record_is_kept_is_answered_as_before(app, seeded, runner):
    like(seeded, 2)  # 6, 7
    body = {"transactionId": "tx-2", "baseSyncId": 5, "changes": [update("Todo", "t1", likeCount=9)]}
    assert wire(seeded.post("/mutate", json=body).get_json()) == wire({"lastSyncId": 8})
    compact(runner, "--before", "8")  # below its base, but not its record: that is kept, at 8
    before = snapshot(app)

    assert wire(seeded.post("/mutate", json=body).get_json()) == wire({"lastSyncId": 8})
    assert snapshot(app) == before


def test_records_without_a_base_sync_id_are_kept_so_their_retries_are_always_recognised(app, seeded, runner):
    body = {"transactionId": "tx-3", "changes": [update("Todo", "t1", likeCount=3)]}
    assert wire(seeded.post("/mutate", json=body).get_json()) == wire({"lastSyncId": 6})
    compact(runner, "--before", "1000")
    before = snapshot(app)

    assert wire(seeded.post("/mutate", json=body).get_json()) == wire({"lastSyncId": 6})
    assert snapshot(app) == before


def test_a_base_sync_id_this_database_never_handed_out_is_refused_as_a_reset(app, seeded):
    before = snapshot(app)

    error = assert_error(seeded.post("/mutate", json={"baseSyncId": 6, "changes": [update("Todo", "t1", likeCount=1)]}), 409, "bootstrap_again")

    assert wire(error["details"]) == wire({"reason": "reset"})
    assert snapshot(app) == before


@pytest.mark.parametrize("base", [-1, True, 1.5, "5"])
def test_base_sync_id_must_be_a_syncid(seeded, base):
    error = assert_error(seeded.post("/mutate", json={"baseSyncId": base, "changes": [update("Todo", "t1", likeCount=1)]}), 400, "invalid_request")
    assert "baseSyncId" in error["details"]


def test_a_database_made_before_these_columns_gets_them_when_a_server_starts(app, seeded, database_url):
    for table, column in [("sync_action", "created_at"), ("sync_log_start", "reason"), ("client_transaction", "base_sync_id")]:
        query_write(app, f"ALTER TABLE {table} DROP COLUMN {column}")
    again = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": database_url})
    try:
        client = again.test_client()
        client.environ_base.update(seeded.environ_base)
        assert wire(client.post("/mutate", json={"transactionId": "t", "baseSyncId": 5, "changes": [group("g9")]}).get_json()) == wire({"lastSyncId": 6})
        assert query(again, "SELECT count(*) FROM sync_action WHERE created_at IS NOT NULL") == [(1,)]
        assert wire(replay(read_log(client))) == wire(as_store(client.get("/bootstrap?type=eager&models=Group,Author,Todo").get_json()["bootstrap"]))
    finally:
        shut_down(again)

