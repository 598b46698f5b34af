"""The flask commands: seed and create-user hand out tokens, add-member and
remove-member change sync groups, init-db resets the database."""

from flask import Flask

from app import create_app
from helpers import as_store, assert_error, group, mutate, read_log, replay, shut_down, sign_in, snapshot, wire


def seed(runner) -> dict[str, str]:
    """Run `seed`; return the token it printed for each demo user."""
    result = runner.invoke(args=["seed"])
    assert result.exit_code == 0, result.output
    return {line.split()[0]: line.split()[-1] for line in result.output.splitlines() if line.startswith("  ")}


def with_token(app, token: str):
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    return client


def test_seed_loads_demo_users_in_different_groups(app, runner):
    tokens = seed(runner)

    assert set(tokens) == {"Ada", "Grace"}
    assert with_token(app, tokens["Ada"]).get("/sync").get_json()["syncGroups"] == ["all", "group:g1", "group:g2"]
    assert with_token(app, tokens["Grace"]).get("/sync").get_json()["syncGroups"] == ["all", "group:g1"]


def test_seed_prints_a_demo_link_that_carries_both_tokens_in_the_fragment(runner):
    result = runner.invoke(args=["seed", "--url", "http://localhost:8000/"])
    tokens = {line.split()[0]: line.split()[-1] for line in result.output.splitlines() if line.startswith("  ")}

    link = result.output.splitlines()[-1].split()[-1]
    assert link == f"http://localhost:8000/#Ada={tokens['Ada']}&Grace={tokens['Grace']}"


def test_seed_loads_rows_with_their_sync_actions(app, runner):
    ada = with_token(app, seed(runner)["Ada"])

    rows = ada.get("/bootstrap?type=eager&models=Group,Author,Todo").get_json()
    assert [len(rows["bootstrap"][m]) for m in ("Group", "Author", "Todo")] == [2, 2, 3]
    assert wire(rows["firstSyncId"]) == wire(7)
    # Seeded rows are in the log too, so a client syncing from 0 gets them.
    assert wire(replay(read_log(ada))) == wire(as_store(rows["bootstrap"]))


def test_seeding_twice_fails_with_a_hint_and_writes_nothing(app, runner):
    seed(runner)
    before = snapshot(app)

    result = runner.invoke(args=["seed"])

    assert result.exit_code != 0
    assert "already has users" in result.output and "init-db" in result.output
    assert snapshot(app) == before


def test_create_user_prints_a_token_that_works(app, runner):
    seed(runner)

    result = runner.invoke(args=["create-user", "Zed", "--group", "g2"])

    assert result.exit_code == 0, result.output
    token = result.output.split()[-1]
    assert with_token(app, token).get("/sync").get_json()["syncGroups"] == ["all", "group:g2"]


def test_create_user_refuses_an_unknown_group_and_creates_nobody(app, runner):
    before = snapshot(app)
    result = runner.invoke(args=["create-user", "Zed", "--group", "g9"])
    assert result.exit_code != 0 and "There is no Group 'g9'" in result.output
    assert snapshot(app) == before


def test_add_member_and_remove_member_change_the_groups_of_the_next_request(app, runner):
    tokens = seed(runner)
    grace = with_token(app, tokens["Grace"])
    grace_id = tokens["Grace"].split(".")[0]

    assert runner.invoke(args=["add-member", grace_id, "g2"]).exit_code == 0
    assert grace.get("/sync").get_json()["syncGroups"] == ["all", "group:g1", "group:g2"]

    assert runner.invoke(args=["remove-member", grace_id, "g1"]).exit_code == 0
    assert grace.get("/sync").get_json()["syncGroups"] == ["all", "group:g2"]


def test_new_token_replaces_a_users_token_and_revoke_token_stops_it(app, runner):
    tokens = seed(runner)
    grace_id = tokens["Grace"].split(".")[0]

    result = runner.invoke(args=["new-token", grace_id])

    assert result.exit_code == 0, result.output
    rotated = result.output.split()[-1]
    assert rotated != tokens["Grace"] and rotated.startswith(f"{grace_id}.")
    assert_error(with_token(app, tokens["Grace"]).get("/sync"), 401, "unauthorized", type="auth")
    assert with_token(app, rotated).get("/sync").status_code == 200
    assert with_token(app, tokens["Ada"]).get("/sync").status_code == 200  # nobody else's

    result = runner.invoke(args=["revoke-token", grace_id])

    assert result.exit_code == 0, result.output
    assert_error(with_token(app, rotated).get("/sync"), 401, "unauthorized", type="auth")
    for command in ("new-token", "revoke-token"):
        result = runner.invoke(args=[command, "99"])
        assert result.exit_code != 0 and "There is no user 99" in result.output


def test_membership_commands_refuse_unknown_users_and_groups(app, runner):
    seed(runner)
    before = snapshot(app)
    for args, says in [
        (["add-member", "99", "g1"], "There is no user 99"),
        (["add-member", "1", "g9"], "There is no Group 'g9'"),
        (["remove-member", "99", "g1"], "There is no user 99"),
    ]:
        result = runner.invoke(args=args)
        assert result.exit_code != 0 and says in result.output
    assert snapshot(app) == before


def test_init_db_on_a_new_database_starts_the_log_at_zero(app, runner):
    result = runner.invoke(args=["init-db"])

    assert result.exit_code == 0 and "Initialized an empty database" in result.output
    client = sign_in(app)
    assert wire(client.get("/sync").get_json()["lastSyncId"]) == wire(0)
    assert wire(mutate(client, group("g1"))) == wire({"lastSyncId": 1})


def test_init_db_empties_a_used_database_and_starts_its_log_above_the_old_one(app, runner):
    ada = with_token(app, seed(runner)["Ada"])
    mutate(ada, group("g9"))  # the old log ends at 8

    result = runner.invoke(args=["init-db"])

    assert result.exit_code == 0 and "Initialized an empty database" in result.output
    assert_error(ada.get("/sync"), 401, "unauthorized", type="auth")  # users are gone too
    client = sign_in(app)
    assert wire(client.get("/bootstrap?type=eager&models=Group,Todo").get_json()) == wire({
        "bootstrap": {"Group": [], "Todo": []},
        "firstSyncId": 9,
        "syncGroups": ["all"],
    })
    assert client.get("/sync?since=9").get_json()["sync"] == []
    assert wire(mutate(client, group("g1"))) == wire({"lastSyncId": 10})
    assert [a["modelId"] for a in read_log(client, since=9)] == ["g1"]


def test_a_client_of_the_wiped_database_is_told_to_bootstrap_again(app, runner):
    seed(runner)
    runner.invoke(args=["init-db"])
    ada = with_token(app, seed(runner)["Ada"])  # the new log runs from 8 to 15

    for stale_cursor in (0, 5, 7):  # any cursor the old database handed out
        error = assert_error(ada.get(f"/sync?since={stale_cursor}"), 409, "bootstrap_again")
        assert "Bootstrap again" in error["message"] and wire(error["details"]) == wire({"reason": "reset"})
    assert len(read_log(ada, since=8)) == 7


def test_database_url_wins_over_instance_config(tmp_path, monkeypatch):
    """A server or command started with DATABASE_URL uses that database, whatever instance/config.py says."""
    (tmp_path / "config.py").write_text(f"SQLALCHEMY_DATABASE_URI = 'sqlite:///{tmp_path / 'from-config.sqlite3'}'\nCORS_ORIGIN = 'https://example.org'\n")
    monkeypatch.setattr(Flask, "auto_find_instance_path", lambda self: str(tmp_path))
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'from-environment.sqlite3'}")
    app = create_app()
    try:
        assert app.config["SQLALCHEMY_DATABASE_URI"].endswith("from-environment.sqlite3")
        assert app.config["CORS_ORIGIN"] == "https://example.org"  # the file's other settings still apply
        assert (tmp_path / "from-environment.sqlite3").exists() and not (tmp_path / "from-config.sqlite3").exists()
    finally:
        shut_down(app)


def test_log_prints_each_action_with_its_sync_groups_and_whether_a_user_sees_it(app, runner):
    seed(runner)

    result = runner.invoke(args=["log", "--as", "2", "--since", "4", "--limit", "3"])

    assert result.exit_code == 0, result.output
    assert result.output == (
        "syncId  action  model   id  sync groups  user 2 sees\n"
        "     5  insert  Todo    t3  group:g2     no\n"
        "     6  insert  Author  a2  all          yes\n"
        "     7  insert  Todo    t2  group:g1     yes\n"
    )
    assert runner.invoke(args=["log", "--since", "6"]).output == "syncId  action  model  id  sync groups\n     7  insert  Todo   t2  group:g1\n"
    assert runner.invoke(args=["log", "--since", "7"]).output == "syncId  action  model  id  sync groups\n"
    result = runner.invoke(args=["log", "--as", "99"])
    assert result.exit_code != 0 and "There is no user 99" in result.output
    for bad in (["--limit", "0"], ["--since", "-1"]):
        result = runner.invoke(args=["log", *bad])
        assert result.exit_code == 2 and "Invalid value" in result.output
