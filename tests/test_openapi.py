"""GET /openapi.json: an OpenAPI 3 description of the API, generated from the
app's marshmallow schemas, that validates, lists every endpoint and status,
describes the responses the app really gives, and is served without a token."""

import json
import re
import threading
from pathlib import Path
from urllib.request import Request, urlopen

import pytest
from openapi_spec_validator import validate
from sqlalchemy import text
from werkzeug.serving import make_server

import contract
from helpers import create, delete, group, mutate, reader, sign_in, todo, wire
from models import SYNCED_MODELS
from servers import Api, Gunicorn

README = Path(__file__).resolve().parent.parent / "README.md"
OPERATIONS = {
    ("POST", "/mutate"): {200, 400, 401, 403, 409, 413, 415, 500, 503},
    ("GET", "/bootstrap"): {200, 400, 401, 403, 409, 500, 503},  # 409: another schema version; 503: every pooled connection stayed in use
    ("GET", "/sync"): {200, 400, 401, 409, 500, 503},
    ("GET", "/openapi.json"): {200, 500},
}
# Given for paths and methods the document does not list, so not under any operation.
COMPONENT_RESPONSES = {"NotFound": 404, "MethodNotAllowed": 405}
ERROR_RESPONSE = {"$ref": "#/components/schemas/ErrorResponse"}


@pytest.fixture
def document(anonymous):
    response = anonymous.get("/openapi.json")
    assert response.status_code == 200
    return response.get_json()


def documented_responses(document) -> list[tuple[int, dict]]:
    """(status, response object) for every operation's responses and the reusable ones."""
    found = [
        (int(status), response)
        for operations in document["paths"].values()
        for operation in operations.values()
        for status, response in operation["responses"].items()
    ]
    return found + [(COMPONENT_RESPONSES[name], r) for name, r in document["components"]["responses"].items()]


def test_it_is_served_as_json_without_a_token(anonymous):
    for headers in ({}, {"Authorization": "Bearer 1.wrong"}, {"Authorization": "nonsense"}):
        response = anonymous.get("/openapi.json", headers=headers)
        assert response.status_code == 200, response.get_data(as_text=True)
        assert response.mimetype == "application/json"
        assert response.get_json()["openapi"] == "3.0.3"


def test_the_document_is_valid_openapi_3(document):
    validate(document)  # raises on the first violation of the OpenAPI 3.0 specification


def test_every_endpoint_of_the_app_is_described_and_nothing_else(app, document):
    served = {
        (method, rule.rule)
        for rule in app.url_map.iter_rules()
        if rule.endpoint not in ("static", "demo_page")  # files and the demo page, not the API
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    described = {(method.upper(), path) for path, operations in document["paths"].items() for method in operations}
    assert described == served == set(OPERATIONS)


def test_every_status_an_endpoint_gives_is_documented_with_the_error_shape(document):
    for (method, path), statuses in OPERATIONS.items():
        responses = document["paths"][path][method.lower()]["responses"]
        assert {int(status) for status in responses} == statuses, (method, path)
    for status, response in documented_responses(document):
        if status >= 400:
            assert response["content"]["application/json"]["schema"] == ERROR_RESPONSE, status
    for path, method in (("/mutate", "post"), ("/bootstrap", "get"), ("/sync", "get")):
        assert document["paths"][path][method]["responses"]["503"]["headers"]["Retry-After"]["required"]
    assert document["components"]["responses"]["MethodNotAllowed"]["headers"]["Allow"]["required"]


def test_every_row_of_the_readmes_error_table_is_documented(document):
    """The README's table is the contract: each status is documented, and each of its codes named there."""
    rows = re.findall(r"^\| (\d{3}) \| \w+ \| (.+?) \|", README.read_text(), re.MULTILINE)
    assert len(rows) >= 15
    descriptions: dict[int, str] = {}
    for status, response in documented_responses(document):
        descriptions[status] = descriptions.get(status, "") + response["description"]
    for status, codes in rows:
        for code in re.findall(r"`(\w+)`", codes):
            assert code in descriptions.get(int(status), ""), (status, code)


def test_the_error_schema_is_exactly_the_error_shape(document):
    schemas = document["components"]["schemas"]
    assert schemas["ErrorResponse"]["required"] == ["error"]
    assert schemas["ErrorResponse"]["additionalProperties"] is False
    error = schemas["Error"]
    assert set(error["properties"]) == set(error["required"]) == {"type", "code", "message", "details"}
    assert error["additionalProperties"] is False
    assert error["properties"]["type"]["enum"] == ["server", "auth", "network"]


def test_the_bearer_token_is_required_everywhere_but_here(document):
    assert document["components"]["securitySchemes"]["bearer"]["type"] == "http"
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert document["security"] == [{"bearer": []}]
    assert document["paths"]["/openapi.json"]["get"]["security"] == []
    for path in ("/mutate", "/bootstrap", "/sync"):
        assert "security" not in next(iter(document["paths"][path].values()))  # the global requirement applies


def test_query_parameters_are_typed(document):
    def parameters(path):
        found = [p for p in document["paths"][path]["get"]["parameters"] if p["in"] != "header"]
        assert all(p["in"] == "query" for p in found)
        return {p["name"]: (p["required"], p["schema"]) for p in found}

    sync = parameters("/sync")
    assert set(sync) == {"since", "until", "limit", "wait"}
    required, wait = sync.pop("wait")
    assert not required and wait["type"] == "string"
    assert [bool(re.fullmatch(wait["pattern"], s)) for s in ("0", "0.5", "25", "30", "30.000", "31", "30.5", "1e1", "-1", "")] == [True] * 5 + [False] * 5
    for name, (required, schema) in sync.items():
        assert not required and schema["type"] == "integer" and schema["minimum"] >= 0, name
    assert (sync["limit"][1]["minimum"], sync["limit"][1]["maximum"]) == (1, 5000)

    bootstrap = parameters("/bootstrap")
    assert bootstrap["type"] == (True, {"type": "string", "enum": ["eager", "lazy"]})
    assert bootstrap["models"][0] and not bootstrap["syncGroups"][0]
    assert bootstrap["models"][1]["type"] == bootstrap["syncGroups"][1]["type"] == "string"


def test_every_endpoint_takes_the_schema_version_header(document):
    for path, method in [("/sync", "get"), ("/bootstrap", "get"), ("/mutate", "post")]:
        (header,) = [p for p in document["paths"][path][method]["parameters"] if p["in"] == "header"]
        assert (header["name"], header["required"], header["schema"]) == ("Loco-Schema-Version", False, {"type": "integer", "minimum": 0, "maximum": 999_999_999})


def test_the_limits_a_client_must_keep_are_in_the_document_as_this_server_sets_them(app, anonymous):
    app.config["MAX_PAGE_BYTES"] = 12_345
    limits = anonymous.get("/openapi.json").get_json()["x-limits"]
    expected = {"MAX_CONTENT_LENGTH": 1_048_576, "MAX_CHANGES": 1000, "MAX_STRING_BYTES": 32_768, "MAX_ROW_BYTES": 65_536,
                "MAX_TRANSACTION_BYTES": 1_048_576, "MAX_PAGE_BYTES": 12_345, "MAX_SYNC_GROUPS_PER_USER": 100}
    assert json.dumps(limits, sort_keys=True) == json.dumps(expected, sort_keys=True)


MODELS_LISTS = ["", "Todo", "Todo,Group,Author", "Todo,Todo", "Todo,", ",Todo", "todo", "Todo Group", "Todo,,Group"]
SYNC_GROUP_LISTS = ["all", "group:g1", "group:g1,all", "", "group:", "group:g1,", "al", "group:a,b", "group:" + "x" * 256]


def test_the_query_patterns_accept_exactly_what_the_app_accepts(seeded, document):
    parameters = {p["name"]: p["schema"] for p in document["paths"]["/bootstrap"]["get"]["parameters"]}
    for models in MODELS_LISTS:
        accepted = seeded.get("/bootstrap", query_string={"type": "eager", "models": models}).status_code == 200
        assert accepted == bool(re.fullmatch(parameters["models"]["pattern"], models)), models
    for sync_groups in SYNC_GROUP_LISTS:
        response = seeded.get("/bootstrap", query_string={"type": "lazy", "models": "", "syncGroups": sync_groups})
        assert (response.status_code != 400) == bool(re.fullmatch(parameters["syncGroups"]["pattern"], sync_groups))


def test_row_schemas_are_the_models_wire_shapes(document):
    for name, model in SYNCED_MODELS.items():
        row = document["components"]["schemas"][name]
        wire_names = {field.data_key or attribute for attribute, field in model.schema.fields.items()}
        assert set(row["properties"]) == set(row["required"]) == wire_names, name
    assert document["components"]["schemas"]["Todo"]["properties"]["likeCount"]["type"] == "integer"
    assert document["components"]["schemas"]["Todo"]["properties"]["isDone"]["type"] == "boolean"


def test_the_app_gives_every_documented_refusal_and_each_conforms(app, seeded, anonymous):
    """Every response is checked against the document by the hook in tests/contract.py; these requests
    reach each status the endpoints give."""
    mutate(seeded, todo("t2", "g2"), delete("Todo", "t2"))
    grace = sign_in(app, "Grace", "group:g1")
    requests = [
        (seeded, "POST", "/mutate", {"json": {"changes": [group("g3")], "transactionId": "tx-1"}}),  # 200
        (seeded, "POST", "/mutate", {"json": {"changes": []}}),  # 400 invalid_request
        (seeded, "POST", "/mutate", {"data": b"{", "content_type": "application/json"}),  # 400 invalid_json
        (anonymous, "POST", "/mutate", {"json": {"changes": [group("g4")]}}),  # 401
        (grace, "POST", "/mutate", {"json": {"changes": [todo("t3", "g2")]}}),  # 403 server
        (seeded, "POST", "/mutate", {"json": {"changes": [create("Author", "a1", name="A")]}}),  # 409
        (seeded, "POST", "/mutate", {"data": b" " * (1024 * 1024 + 1), "content_type": "application/json"}),  # 413
        (seeded, "POST", "/mutate", {"data": b"{}", "content_type": "text/plain"}),  # 415
        (seeded, "GET", "/bootstrap?type=eager&models=Group,Author,Todo", {}),  # 200
        (grace, "GET", "/bootstrap?type=lazy&models=Todo&syncGroups=group:g2", {}),  # 403 auth
        (seeded, "GET", "/bootstrap?type=lazy&models=Todo", {}),  # 400
        (seeded, "GET", "/sync", {}),  # 200, the handshake
        (seeded, "GET", "/sync?since=0&limit=2", {}),  # 200, a page
        (seeded, "GET", "/sync?since=0", {}),  # 200, with an insert, an update and a delete
        (seeded, "GET", "/sync?since=999", {}),  # 409
        (seeded, "GET", "/sync?since=x", {}),  # 400
        (anonymous, "GET", "/sync", {}),  # 401
        (anonymous, "GET", "/openapi.json", {}),  # 200
        (seeded, "GET", "/nowhere", {}),  # 404
        (seeded, "DELETE", "/sync", {}),  # 405
    ]
    statuses = {client.open(path, method=method, **kwargs).status_code for client, method, path, kwargs in requests}
    assert statuses == {200, 400, 401, 403, 404, 405, 409, 413, 415}


def add_stored_action(app, data: str) -> None:
    """A sync action written straight into the log, past every check of the app."""
    with reader(app).begin() as connection:
        (sync_id,) = connection.execute(
            text("INSERT INTO sync_action (action, model_name, model_id, data) VALUES ('update', 'Todo', 't1', :data) RETURNING id"),
            {"data": data},
        ).one()
        connection.execute(text("INSERT INTO sync_action_group (sync_group, sync_action_id) VALUES ('group:g1', :id)"), {"id": sync_id})


BOOLEAN_AS_INTEGER = '{"id":"t1","text":"x","authorId":"a1","groupId":"g1","isDone":0,"likeCount":0}'


BROKEN = "GET /sync 200: at sync/0/data/isDone: 0 is not of type 'boolean'"


def test_a_response_that_breaks_the_contract_fails_the_test_that_received_it(app, seeded):
    add_stored_action(app, BOOLEAN_AS_INTEGER)
    with pytest.raises(contract.ContractViolation, match=BROKEN):
        seeded.get("/sync?since=5")
    # Recorded too, for the fixture that fails the test when it ends; claimed here, so that it does not fail this one.
    assert [violation.split(";")[0] for violation in contract.TALLY.claim()] == [BROKEN]


def test_a_bootstrap_is_checked_whole_even_when_the_test_reads_only_its_status(app, seeded):
    with reader(app).begin() as connection:  # a row the schema refuses, past every check of the app
        connection.execute(text("UPDATE todos SET id = '' WHERE id = 't1'"))
    with pytest.raises(contract.ContractViolation, match="GET /bootstrap 200: at bootstrap/Todo/0/id: '' should be non-empty"):
        seeded.get("/bootstrap?type=eager&models=Todo").status_code
    assert len(contract.TALLY.claim()) == 1


@pytest.mark.parametrize("server", ["thread", "process"])
def test_a_live_server_reports_what_breaks_the_contract_and_answers_as_it_would(app, seeded, database_url, tmp_path, server):
    add_stored_action(app, BOOLEAN_AS_INTEGER)
    if server == "thread":  # the app on werkzeug's server, in a thread of the tests' process
        live = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=live.serve_forever, daemon=True).start()
        with urlopen(Request(f"http://127.0.0.1:{live.port}/sync?since=5", headers={"Authorization": f"Bearer {seeded.token}"})) as answer:
            status, body = answer.status, json.load(answer)
        live.shutdown()
    else:  # gunicorn, in processes of its own
        gunicorn = Gunicorn(database_url, tmp_path / "gunicorn.log", workers=1)
        gunicorn.start()
        try:
            status, _, body = Api(gunicorn, seeded.token).request("GET", "/sync?since=5")
        finally:
            gunicorn.stop()
    assert status == 200 and wire(body["sync"][0]["data"]["isDone"]) == "0"  # served as it is, the violation reported
    assert [violation.split(";")[0] for violation in contract.TALLY.claim()] == [BROKEN]


def test_the_check_tells_a_wrong_type_from_the_right_one(document):
    good = json.dumps({"sync": [], "lastSyncId": 5, "syncGroups": ["all"], "hasMore": False}) + "\n"
    headers = {"Content-Type": "application/json"}
    contract.check("GET", "/sync", 200, headers, good.encode())
    for wrong in (good.replace("false", "0"), good.replace("5", "5.0"), good.rstrip("\n")):
        with pytest.raises(contract.ContractViolation):
            contract.check("GET", "/sync", 200, headers, wrong.encode())
    with pytest.raises(contract.ContractViolation, match="Content-Type"):
        contract.check("GET", "/sync", 200, {"Content-Type": "text/html"}, good.encode())
    with pytest.raises(contract.ContractViolation, match="does not list"):
        contract.check("GET", "/sync", 418, headers, good.encode())
