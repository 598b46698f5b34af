"""Identity: every request names its user with a bearer token, or nothing is read or written."""

import hashlib

import pytest

import app as app_module
from helpers import assert_error, database_path, mutate, query, sign_in, snapshot, todo, wire

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
        app.test_client().get("/sync", headers={"Authorization": header})

    assert len(compared) == 3


def test_each_user_has_its_own_transaction_ids(app, seeded):
    grace = sign_in(app, "Grace", "group:g1")
    first = mutate(seeded, todo("t2", "g1"), transaction_id="tx-1")

    second = mutate(grace, todo("t3", "g1"), transaction_id="tx-1")

    assert wire(second["lastSyncId"]) == wire(first["lastSyncId"] + 1)  # applied, not taken for Ada's retry
    assert wire(mutate(grace, todo("t3", "g1"), transaction_id="tx-1")) == wire(second)  # and Grace's own retry is answered


def test_the_scheme_is_case_insensitive_and_the_token_exact(app, client):
    user_id, secret = client.token.split(".")
    anyone = app.test_client()
    assert anyone.get("/sync", headers={"Authorization": f"bearer {client.token}"}).status_code == 200
    assert anyone.get("/sync", headers={"Authorization": f"BEARER  {client.token}"}).status_code == 200
    for near_miss in (f"0{user_id}.{secret}", f"{user_id}.{secret}x", f"{user_id}.{secret[:-1]}"):
        assert_error(anyone.get("/sync", headers={"Authorization": f"Bearer {near_miss}"}), 401, "unauthorized", type="auth")
