"""The flask commands: init-db resets the database, seed loads demo data through /mutate's path."""

from helpers import as_store, assert_error, group, mutate, read_log, replay


def test_seed_loads_demo_rows_with_their_sync_actions(runner, client):
    result = runner.invoke(args=["seed"])

    assert result.exit_code == 0, result.output
    assert "lastSyncId is 7" in result.output
    rows = client.get("/bootstrap?type=eager&models=Group,Author,Todo").get_json()
    assert [len(rows["bootstrap"][m]) for m in ("Group", "Author", "Todo")] == [2, 2, 3]
    assert rows["firstSyncId"] == 7
    # Seeded rows are in the log too, so a client syncing from 0 gets them.
    assert replay(read_log(client)) == as_store(rows["bootstrap"])


def test_seeding_twice_fails_with_a_hint_and_writes_nothing(runner, client):
    runner.invoke(args=["seed"])
    result = runner.invoke(args=["seed"])

    assert result.exit_code != 0
    assert "already exists" in result.output and "init-db" in result.output
    assert client.get("/sync").get_json()["lastSyncId"] == 7


def test_init_db_on_a_new_database_starts_the_log_at_zero(runner, client):
    result = runner.invoke(args=["init-db"])

    assert result.exit_code == 0 and "Initialized an empty database" in result.output
    assert client.get("/sync").get_json()["lastSyncId"] == 0
    assert mutate(client, group("g1")) == {"lastSyncId": 1}


def test_init_db_empties_a_used_database_and_starts_its_log_above_the_old_one(runner, client):
    runner.invoke(args=["seed"])
    mutate(client, group("g9"))  # the old log ends at 8

    result = runner.invoke(args=["init-db"])

    assert result.exit_code == 0 and "Initialized an empty database" in result.output
    assert client.get("/bootstrap?type=eager&models=Group,Todo").get_json() == {
        "bootstrap": {"Group": [], "Todo": []},
        "firstSyncId": 9,
        "syncGroups": ["all"],
    }
    assert client.get("/sync?since=9").get_json()["sync"] == []
    assert mutate(client, group("g1")) == {"lastSyncId": 10}
    assert [a["modelId"] for a in read_log(client, since=9)] == ["g1"]


def test_a_client_of_the_wiped_database_is_told_to_bootstrap_again(runner, client):
    runner.invoke(args=["seed"])
    runner.invoke(args=["init-db"])
    runner.invoke(args=["seed"])  # the new log runs 8 to 15

    for stale_cursor in (0, 5, 7):  # any cursor the old database handed out
        error = assert_error(client.get(f"/sync?since={stale_cursor}"), 409, "unknown_cursor")
        assert "Bootstrap again" in error["message"]
    assert len(read_log(client, since=8)) == 7
