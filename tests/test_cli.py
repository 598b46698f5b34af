"""The flask commands: init-db resets the database, seed loads demo data through /mutate's path."""

from helpers import as_store, group, mutate, read_log, replay


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


def test_init_db_resets_rows_and_the_log(runner, client):
    runner.invoke(args=["seed"])
    mutate(client, group("g9"))

    result = runner.invoke(args=["init-db"])

    assert result.exit_code == 0 and "Initialized an empty database" in result.output
    assert client.get("/bootstrap?type=eager&models=Group,Todo").get_json() == {
        "bootstrap": {"Group": [], "Todo": []},
        "firstSyncId": 0,
        "syncGroups": ["all"],
    }
    assert mutate(client, group("g1")) == {"lastSyncId": 1}
