"""Identity: every request names its user with a bearer token, or nothing is read or written."""

import hashlib

import pytest

import app as app_module
from machinery.cli import new_token
from helpers import assert_error, database_path, mutate, query, sign_in, snapshot, todo, update, wire

REQUESTS = {
    "handshake": ("GET", "/sync", None),
    "poll": ("GET", "/sync?since=0", None),
    "eager bootstrap": ("GET", "/bootstrap?type=eager&models=Todo", None),
    "lazy bootstrap": ("GET", "/bootstrap?type=lazy&models=Todo&syncGroups=group:g1", None),
    "mutation": ("POST", "/mutate", {"changes": [todo("t2", "g1")]}),
}
BAD_HEADERS = {
    "missing": None,
    "empty": "",
    "another scheme": "Basic YWRhOnNlY3JldA==",
    "no token": "Bearer",
    "no secret": "Bearer 1.",
    "no user id": "Bearer .abc",
    "user id not a number": "Bearer ada.abc",
    "user id too long": "Bearer 1234567890123456789.abc",
    "characters a token never has": "Bearer 1.abc def",
    "wrong secret": "Bearer 1.not-the-secret",
    "unknown user": "Bearer 99.not-the-secret",
}


@pytest.mark.parametrize("method, path, body", REQUESTS.values(), ids=REQUESTS.keys())
@pytest.mark.parametrize("header", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
def test_a_request_without_a_valid_token_is_401_auth_and_reads_and_writes_nothing(app, seeded, method, path, body, header):
    before = snapshot(app)
    client = app.test_client()
    headers = {} if header is None else {"Authorization": header}

    response = client.open(path, method=method, json=body, headers=headers)

    error = assert_error(response, 401, "unauthorized", type="auth")
    assert set(error) == {"type", "code", "message", "details"} and error["details"] is None
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert snapshot(app) == before


def test_the_token_is_stored_only_as_a_hash_of_its_secret(app, client, engine):
    secret = client.token.split(".", 1)[1]
    [(stored,)] = query(app, "SELECT token_sha256 FROM users")
    assert stored == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in repr(snapshot(app))  # in no table
    if engine == "sqlite":  # nor anywhere in its files
        with open(database_path(app), "rb") as database, open(database_path(app) + "-wal", "rb") as wal:
            assert secret.encode() not in database.read() + wal.read()


def test_tokens_are_compared_in_constant_time_even_for_an_unknown_user(app, client, monkeypatch):
    compared = []
    compare_digest = app_module.hmac.compare_digest
    monkeypatch.setattr(app_module.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or compare_digest(a, b))

    for header in (f"Bearer {client.token}", "Bearer 1.wrong", "Bearer 99.wrong"):
        compared.clear()
        app.test_client().get("/sync", headers={"Authorization": header})
        assert compared, header


def test_each_user_has_its_own_transaction_ids(app, seeded):
    grace = sign_in(app, "Grace", "group:g1")
    first = mutate(seeded, todo("t2", "g1"), transaction_id="tx-1")

    second = mutate(grace, update("Todo", "t2", likeCount=1), transaction_id="tx-1")

    assert wire(second["lastSyncId"]) == wire(first["lastSyncId"] + 1)  # applied, not taken for Ada's retry
    assert wire(mutate(grace, update("Todo", "t2", likeCount=1), transaction_id="tx-1")) == wire(second)  # and Grace's own retry is answered


def test_the_scheme_is_case_insensitive_and_the_token_exact(app, client):
    user_id, secret = client.token.split(".")
    anyone = app.test_client()
    assert anyone.get("/sync", headers={"Authorization": f"bearer {client.token}"}).status_code == 200
    assert anyone.get("/sync", headers={"Authorization": f"BEARER  {client.token}"}).status_code == 200
    for near_miss in (f"0{user_id}.{secret}", f"{user_id}.{secret}x", f"{user_id}.{secret[:-1]}"):
        assert_error(anyone.get("/sync", headers={"Authorization": f"Bearer {near_miss}"}), 401, "unauthorized", type="auth")


def revoked_right_after_its_check(app, monkeypatch, user_id: int) -> None:
    """The race: the request's token passes authenticate(), then a revocation commits before the request reads or writes."""
    check = app_module.user_for_token

    def then_revoke(header):
        checked = check(header)
        app_module.in_write_transaction(lambda db_connection: new_token(db_connection, user_id, revoke=True))
        return checked

    monkeypatch.setattr(app_module, "user_for_token", then_revoke)


@pytest.mark.parametrize("path", ["/sync", "/sync?since=0", "/sync?since=0&wait=5", "/bootstrap?type=eager&models=Todo"])
def test_a_token_revoked_after_its_check_but_before_the_read_gets_401_not_data(app, seeded, monkeypatch, path):
    revoked_right_after_its_check(app, monkeypatch, int(seeded.token.split(".")[0]))

    response = seeded.get(path)

    assert_error(response, 401, "unauthorized", type="auth")


def test_a_token_revoked_after_its_check_but_before_the_write_commits_writes_nothing(app, seeded, monkeypatch):
    revoked_right_after_its_check(app, monkeypatch, int(seeded.token.split(".")[0]))
    before = {table: rows for table, rows in snapshot(app).items() if table != "users" and table != "membership_change"}

    response = seeded.post("/mutate", json={"changes": [todo("t2", "g1")]})

    assert_error(response, 401, "unauthorized", type="auth")
    assert {table: rows for table, rows in snapshot(app).items() if table != "users" and table != "membership_change"} == before
