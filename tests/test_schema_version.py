"""Schema versions: models.py's SCHEMA_VERSION. A client may send the version it was built for in
the Loco-Schema-Version header; with another one, every endpoint answers bootstrap_again (reason
schema_changed) and writes nothing. The handshake tells the server's version."""

import pytest

from helpers import assert_error, mutate, snapshot, update, wire
from models import SCHEMA_VERSION

REQUESTS = [
    ("GET", "/sync", None),
    ("GET", "/sync?since=0", None),
    ("GET", "/bootstrap?type=eager&models=Todo", None),
    ("POST", "/mutate", {"changes": [update("Todo", "t1", likeCount=1)]}),
]


@pytest.mark.parametrize("method, path, body", REQUESTS)
def test_a_client_built_for_another_schema_version_is_told_to_bootstrap_again(app, seeded, method, path, body):
    before = snapshot(app)

    for other in (SCHEMA_VERSION + 1, SCHEMA_VERSION - 1):
        answer = seeded.open(path, method=method, json=body, headers={"Loco-Schema-Version": str(other)})
        error = assert_error(answer, 409, "bootstrap_again")
        assert wire(error["details"]) == wire({"reason": "schema_changed", "schemaVersion": SCHEMA_VERSION})
        assert f"built for schema version {other}" in error["message"]

    assert snapshot(app) == before


@pytest.mark.parametrize("method, path, body", REQUESTS)
def test_a_client_of_this_version_or_one_that_does_not_say_is_served(seeded, method, path, body):
    for headers in ({"Loco-Schema-Version": str(SCHEMA_VERSION)}, {}):
        assert seeded.open(path, method=method, json=body, headers=headers).status_code == 200


@pytest.mark.parametrize("sent", ["", "one", "1.0", "-1", " 1", "1" * 10])
def test_a_schema_version_that_is_not_an_integer_is_refused(seeded, sent):
    error = assert_error(seeded.get("/sync", headers={"Loco-Schema-Version": sent}), 400, "invalid_request")
    assert "Loco-Schema-Version" in error["details"]


def test_the_handshake_tells_the_servers_schema_version(seeded):
    assert wire(seeded.get("/sync").get_json()["schemaVersion"]) == wire(SCHEMA_VERSION)
    assert "schemaVersion" not in seeded.get("/sync?since=0").get_json()  # pages do not repeat it


def test_raising_the_version_refuses_old_clients_and_serves_new_ones(seeded, monkeypatch):
    """What a rollout does (docs/production.md): the server's version goes up with the change of models.py."""
    import app as app_module

    old = str(SCHEMA_VERSION)
    monkeypatch.setattr(app_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)

    assert_error(seeded.get("/sync?since=0", headers={"Loco-Schema-Version": old}), 409, "bootstrap_again")
    assert seeded.get("/sync?since=0", headers={"Loco-Schema-Version": str(SCHEMA_VERSION + 1)}).status_code == 200
    assert wire(seeded.get("/sync").get_json()["schemaVersion"]) == wire(SCHEMA_VERSION + 1)
    mutate(seeded, update("Todo", "t1", likeCount=2))  # a client that does not say is not checked
