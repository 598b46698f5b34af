"""Limits that keep the log servable whatever a member sends: a string field, a row, the rows
of one transaction's sync actions. Each refusal is 413 type server naming its limit, writes
nothing, and quotes at most a short prefix of what was sent; each limit is a setting."""

import json

import app as app_module

from helpers import assert_error, create, mutate, read_log, snapshot, todo, update, wire


def big_todo(todo_id: str, size: int) -> dict:
    change = todo(todo_id, "g1")
    return change | {"data": change["data"] | {"text": "x" * size}}


def test_a_string_over_max_string_bytes_is_413_and_writes_nothing(app, seeded):
    before = snapshot(app)
    response = seeded.post("/mutate", json={"changes": [big_todo("t9", app.config["MAX_STRING_BYTES"] + 1)]})
    error = assert_error(response, 413, "string_too_large")
    assert "MAX_STRING_BYTES" in error["message"] and "text" in error["message"] and error["details"] == {"change": 0}
    assert snapshot(app) == before
    mutate(seeded, big_todo("t9", app.config["MAX_STRING_BYTES"]))  # at the limit: allowed


def test_a_string_is_measured_as_the_log_stores_it_so_one_within_its_limit_fits_a_row(app, seeded):
    limit = app.config["MAX_STRING_BYTES"]
    accented = todo("t9", "g1") | {"data": todo("t9", "g1")["data"] | {"text": "é" * (limit // 6)}}  # \u00e9 each
    mutate(seeded, accented)
    accented["data"]["id"] = accented["modelId"] = "t10"
    accented["data"]["text"] += "é"
    assert_error(seeded.post("/mutate", json={"changes": [accented]}), 413, "string_too_large")


def test_a_row_over_max_row_bytes_is_413_and_writes_nothing(app, seeded):
    app.config["MAX_ROW_BYTES"] = 1_000
    before = snapshot(app)
    response = seeded.post("/mutate", json={"changes": [todo("t8", "g1"), big_todo("t9", 1_000)]})
    error = assert_error(response, 413, "row_too_large")
    assert "MAX_ROW_BYTES (1,000)" in error["message"] and error["details"] == {"change": 1}
    assert snapshot(app) == before


def test_a_transaction_over_its_limit_is_refused_at_the_change_that_passes_it_not_after_the_last(app, seeded, monkeypatch):
    """The write lock is held while changes are applied: a refused transaction stops at once."""
    mutate(seeded, big_todo("t9", 30_000))
    applied = []
    real_apply_change = app_module.apply_change
    monkeypatch.setattr(app_module, "apply_change", lambda *args: applied.append(args[1]) or real_apply_change(*args))

    response = seeded.post("/mutate", json={"changes": [update("Todo", "t9", likeCount=n) for n in range(1_000)]})

    error = assert_error(response, 413, "transaction_too_large")
    assert f"at changes[{applied[-1]}]" in error["message"] and len(applied) < 100, len(applied)


def test_many_updates_of_a_large_row_are_413_and_the_groups_sync_keeps_working(app, seeded):
    """The attack: one large row, then 1,000 updates of it in one request, each sync action
    carrying the whole row. Before the limits it grew the log by a gigabyte, and every page
    over it failed."""
    mutate(seeded, big_todo("t9", 30_000))
    since = seeded.get("/sync").get_json()["lastSyncId"]
    before = snapshot(app)
    likes = [update("Todo", "t9", likeCount=n) for n in range(1_000)]

    response = seeded.post("/mutate", json={"changes": likes})

    error = assert_error(response, 413, "transaction_too_large")
    assert "MAX_TRANSACTION_BYTES (1,048,576)" in error["message"]
    assert snapshot(app) == before
    page = seeded.get(f"/sync?since={since - 1}")
    assert page.status_code == 200 and len(page.get_data()) < 40_000
    mutate(seeded, *likes[:30])  # as many as fit: allowed


def test_an_error_quotes_at_most_a_short_prefix_of_what_was_sent(app, seeded):
    huge = "M" * 500_000
    for body in (
        {"changes": [{"action": "create", "modelName": huge, "modelId": "x", "data": {}}]},
        {"changes": [create("Todo", "t9") | {"data": {huge: 1}}]},
    ):
        response = seeded.post("/mutate", data=json.dumps(body), content_type="application/json")
        error = assert_error(response, 400, "invalid_request")
        assert len(response.get_data()) < 2_000, len(response.get_data())
        assert "characters)" in json.dumps(error)  # says how long it was



def test_a_page_stops_early_at_max_page_bytes_and_the_next_pages_carry_the_rest_once(app, seeded):
    app.config["MAX_PAGE_BYTES"] = 10_000
    since = seeded.get("/sync").get_json()["lastSyncId"]
    mutate(seeded, *(big_todo(f"t{n}", 3_000) for n in range(10, 20)))  # 10 actions of about 3.2 KB

    first = seeded.get(f"/sync?since={since}&limit=1000")

    page = first.get_json()
    assert first.status_code == 200 and len(first.get_data()) < 14_000, len(first.get_data())
    assert len(page["sync"]) == 4 and wire(page["hasMore"]) == "true"  # the fourth starts under the limit
    assert wire(page["lastSyncId"]) == wire(page["sync"][-1]["syncId"])  # no further: nothing skipped
    rest = read_log(seeded, since=page["lastSyncId"], limit=1000)
    assert wire([a["modelId"] for a in page["sync"] + rest]) == wire([f"t{n}" for n in range(10, 20)])


def test_an_action_larger_than_max_page_bytes_still_comes_alone_in_its_page(app, seeded):
    app.config["MAX_PAGE_BYTES"] = 1_000
    since = seeded.get("/sync").get_json()["lastSyncId"]
    mutate(seeded, big_todo("t9", 3_000), big_todo("t10", 3_000))

    pages = [seeded.get(f"/sync?since={since}").get_json()]
    pages.append(seeded.get(f"/sync?since={pages[0]['lastSyncId']}").get_json())

    assert wire([[a["modelId"] for a in page["sync"]] for page in pages]) == wire([["t9"], ["t10"]])
    assert wire([page["hasMore"] for page in pages]) == wire([True, False])
