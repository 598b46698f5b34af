"""Hostile input: nothing a client sends makes the server fail, or write a
rejected request's changes.

- schemathesis generates requests from the OpenAPI document the server
  publishes at GET /openapi.json: valid and invalid ones, its boundary
  ("coverage") cases, wrong methods, and requests without the token. It sends
  them, with a valid bearer token, to the app on a real HTTP server, and checks
  each response against the documented status codes, headers and schemas.
- hypothesis sends straight to the app what no schema describes: random JSON,
  broken JSON bytes, wrong content types, bodies over 1 MiB, deep nesting,
  huge integers, unicode edge cases (lone surrogates, NUL, RTL marks, emoji),
  SQL-looking ids and text, random query strings and Authorization headers.

Whatever is sent: never a 5xx (a 503 would be allowed with Retry-After), every
non-2xx body has exactly the error shape, a rejected request leaves every table
as it was, and an accepted mutation stores exactly what was sent.

FUZZ_EXAMPLES sets how many examples each hypothesis test tries (300 by
default); schemathesis tries a quarter of that per operation, besides its
boundary cases.
"""

from __future__ import annotations

import json
import os
import re
from urllib.parse import parse_qsl, quote
from urllib.request import urlopen

import pytest
import schemathesis
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from schemathesis.core.parameters import ParameterLocation
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from machinery.openapi import openapi_document
from helpers import create, group, read_log, snapshot, todo, update, wire

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 300))
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    # The database of one test is shared by its examples on purpose: each example compares it before and after.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
MIB = 1024 * 1024


@pytest.fixture
def app(app):
    app.config["MAX_HOLD_S"] = 0.01  # fuzzed long polls answer at once
    return app


# --- The invariants -----------------------------------------------------------


def check_response(method: str, status: int, headers, body: bytes, content_type: str | None) -> bool:
    """Never a 5xx but a 503 to retry; every refusal in the one error shape. Returns whether it was accepted."""
    if method in ("OPTIONS", "HEAD") and status < 400:
        return True  # a CORS preflight, or a GET without its body
    assert content_type is not None and content_type.split(";")[0] == "application/json", (status, body[:300])
    if status < 400:
        return True
    assert status < 500 or (status == 503 and headers.get("Retry-After")), (status, body[:300])
    decoded = json.loads(body)
    assert isinstance(decoded, dict) and set(decoded) == {"error"}, decoded
    error = decoded["error"]
    assert isinstance(error, dict) and set(error) == {"type", "code", "message", "details"}, error
    expected_types = {401: {"auth"}, 403: {"auth", "server"}, 503: {"network"}}.get(status, {"server"})
    assert error["type"] in expected_types, (status, error)
    assert isinstance(error["code"], str) and re.fullmatch(r"[a-z_]+", error["code"]), error
    assert isinstance(error["message"], str) and error["message"], error
    return False


def send(app, client, method: str, path: str, **kwargs):
    """One request through the test client, checked; a refused one must leave the database as it was."""
    before = snapshot(app)
    response = client.open(path, method=method, **kwargs)
    accepted = check_response(method, response.status_code, response.headers, response.get_data(), response.content_type)
    # Counted by pytest --hypothesis-show-statistics.
    event(f"{response.status_code} {'' if accepted else response.get_json()['error']['code']}")
    if not accepted or method != "POST":
        assert snapshot(app) == before, (method, path, response.status_code)
    return response


# --- schemathesis, against the published document -----------------------------

# schemathesis.pytest.from_fixture, which could load the live URL, fails under
# pytest 9 (schemathesis 4.32 sets request.node._nodeid, which pytest 9 lacks).
# So the schema is loaded from the function the server calls, and
# test_the_fuzzed_document_is_the_one_served proves GET /openapi.json serves it.
DOCUMENT = json.loads(json.dumps(openapi_document()))
schema = schemathesis.openapi.from_dict(DOCUMENT)


def test_the_fuzzed_document_is_the_one_served(base_url):
    with urlopen(f"{base_url}/openapi.json", timeout=10) as response:  # no token
        assert wire(json.load(response)) == wire(DOCUMENT)


@schema.parametrize()
@settings(FUZZ, max_examples=max(1, FUZZ_EXAMPLES // 4))
def test_schemathesis_finds_no_server_error_and_only_documented_responses(case, app, seeded, base_url):
    before = snapshot(app)
    # Its default checks: no 5xx; documented status codes, content types,
    # headers and response schemas (so every refusal is an ErrorResponse);
    # invalid data refused with a 4xx; wrong methods 405; no token 401.
    # Not positive_data_acceptance: rules across fields (until >= since,
    # syncGroups only with type=lazy, existing rows) are outside the schema,
    # so schema-valid requests may rightly be refused.
    # The token goes with every case but those whose headers are generated to be invalid (the
    # Authorization header left out): sent with it anyway, such a case is valid and rightly answered 200.
    headers_component = case.meta.components.get(ParameterLocation.HEADER) if case.meta else None
    invalid_headers = headers_component is not None and headers_component.mode == GenerationMode.NEGATIVE
    response = case.call_and_validate(
        base_url=base_url,
        headers={} if invalid_headers else {"Authorization": f"Bearer {seeded.token}"},
        excluded_checks=[positive_data_acceptance],
    )
    headers = {name: values[0] for name, values in response.headers.items()}
    content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), None)
    headers["Retry-After"] = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    accepted = check_response(case.method.upper(), response.status_code, headers, response.content, content_type)
    if not accepted or case.method.upper() != "POST":
        assert snapshot(app) == before, case.as_curl_command()


# --- hypothesis, straight to the app ---------------------------------------------

NASTY_STRINGS = [
    # unicode edge cases
    "", " ", "\x00", "a\x00b", "\ud800", "\udfff", "a\udc80b", "\u202e", "\u200f", "\u202egnp.exe", "\ufeff",
    "\uffff", "\U0010ffff", "🦄", "👩‍👩‍👧‍👦", "🇺🇳", "e\u0301", "Z̴̡̪̅̄", "\r\n", "\t", "٣", "１",
    # SQL and other injections
    "' OR '1'='1", "'; DROP TABLE todos; --", '" OR ""="', "1; DELETE FROM sync_action", "g1' --", "g1\x00' OR 1=1",
    "%' OR 1=1 --", "*/ SELECT * FROM users /*", "' UNION SELECT token_sha256 FROM users --", "<script>x</script>",
    "../../etc/passwd", "${jndi:ldap://x}", "{{7*7}}", "%s%n", "%00", "\\", '"', "'", "%", "_",
    # look like other things
    "{}", "[]", "null", "true", "NaN", "Infinity", "-0", "1e400", "0x10",
    # look like ids, groups and models of this app
    "all", "group:g1", "group:g1,group:g2", "group:", "g1,g2", "g1", "g2", "a1", "t1", "Todo", "todo", "Todo,Group",
    # at and over the length limits
    "x" * 255, "x" * 256, "é" * 255, "🦄" * 256,
]
HUGE_INTEGERS = [2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 10**100, -(10**100), 10**4000]

nasty_text = st.one_of(
    st.sampled_from(NASTY_STRINGS),
    st.text(max_size=30),
    st.text(st.characters(codec=None, categories=["Cs", "Cc", "Cf", "Mn", "So", "Co"]), max_size=10),
)
huge_integers = st.one_of(st.sampled_from(HUGE_INTEGERS), st.integers())
json_leaves = st.one_of(
    st.none(), st.booleans(), huge_integers, st.floats(allow_nan=False, allow_infinity=False), nasty_text
)
json_values = st.recursive(
    json_leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(nasty_text, inner, max_size=4), max_leaves=12
)

GROUP_IDS = ["g1", "g2", "g3"]
ids = st.one_of(st.sampled_from(["g1", "g2", "g3", "a1", "a2", "t1", "t2", "t3"]), nasty_text)
wire_fields = st.sampled_from(["id", "name", "text", "authorId", "groupId", "isDone", "likeCount"])
field_values = st.one_of(nasty_text, huge_integers, st.booleans(), st.none(), json_values)


def with_nasty_field(change: dict, field: str, value) -> dict:
    return {**change, "data": {**change.get("data", {}), field: value}}  # a delete gets data it must not have


# Valid changes, some carrying unicode and SQL-looking text that must be stored
# as is; and the same with one field made hostile.
valid_changes = st.one_of(
    st.builds(group, st.sampled_from(GROUP_IDS), nasty_text),
    st.builds(lambda i, n: create("Author", i, name=n), ids, nasty_text),
    st.builds(lambda i, g, t: todo(i, g, text=t), ids, st.sampled_from(GROUP_IDS), nasty_text),
    st.builds(lambda i, t, n: update("Todo", i, text=t, likeCount=n), ids, nasty_text, huge_integers),
    st.builds(lambda i: {"action": "delete", "modelName": "Todo", "modelId": i}, ids),
)
changes = st.one_of(
    valid_changes,
    st.builds(with_nasty_field, valid_changes, wire_fields | nasty_text, field_values),
    st.fixed_dictionaries(
        {
            "action": st.sampled_from(["create", "update", "delete"]) | nasty_text,
            "modelName": st.sampled_from(["Group", "Author", "Todo"]) | nasty_text,
            "modelId": ids,
        },
        optional={"data": st.dictionaries(wire_fields | nasty_text, field_values, max_size=7) | field_values},
    ),
)
transaction_ids = st.sampled_from(["tx-1", "tx-2"]) | nasty_text
mutations = st.one_of(
    # mostly valid: these reach the database, with hostile text in ids and fields
    st.fixed_dictionaries(
        {"changes": st.lists(valid_changes, min_size=1, max_size=3)}, optional={"transactionId": transaction_ids}
    ),
    st.fixed_dictionaries(
        {"changes": st.lists(changes, min_size=1, max_size=4) | field_values},
        optional={"transactionId": transaction_ids | field_values, "extra": field_values},
    ),
)


def encode(body, ensure_ascii: bool) -> bytes | None:
    """JSON bytes as a client might send them, lone surrogates included (as escapes or as raw invalid UTF-8)."""
    try:
        return json.dumps(body, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")
    except ValueError:  # an integer over Python's 4300-digit str limit
        return None


def check_stored_as_sent(client, sent: list[dict], since: int) -> None:
    """An accepted mutation's actions carry what was sent, and the rows read back equal them."""
    actions = read_log(client, since)
    assert [(a["modelName"], a["modelId"]) for a in actions] == [(c["modelName"], c["modelId"]) for c in sent]
    final = {}
    for action, change in zip(actions, sent):
        if change["action"] == "create":
            assert wire(action["data"]) == wire(change["data"])
        elif change["action"] == "update":
            assert wire({k: action["data"][k] for k in change["data"]}) == wire(change["data"])
        final[(action["modelName"], action["modelId"])] = action.get("data")
    rows = client.get("/bootstrap?type=eager&models=Group,Author,Todo").get_json()["bootstrap"]
    for (model, model_id), row in final.items():
        assert wire(next((r for r in rows[model] if r["id"] == model_id), None)) == wire(row)


@given(body=st.one_of(mutations, json_values), ensure_ascii=st.booleans())
@FUZZ
def test_random_json_bodies_never_fail_and_a_refused_one_writes_nothing(app, seeded, body, ensure_ascii):
    raw = encode(body, ensure_ascii)
    assume(raw is not None)
    head, before = seeded.get("/sync").get_json()["lastSyncId"], snapshot(app)
    response = send(app, seeded, "POST", "/mutate", data=raw, content_type="application/json")
    if response.status_code != 200:
        return
    if response.get_json()["lastSyncId"] <= head:  # a retry of a committed transactionId: answered, not applied
        assert "transactionId" in body and snapshot(app) == before
    else:
        check_stored_as_sent(seeded, body["changes"], head)


NESTINGS = ["array", "object", "field"]


def deeply_nested(depth: int, kind: str) -> bytes:
    if kind == "array":
        return b"[" * depth + b"]" * depth
    if kind == "object":
        return b'{"a":' * depth + b"1" + b"}" * depth
    inner = b"[" * depth + b"]" * depth  # as the value of a field of a valid change
    return b'{"changes":[{"action":"create","modelName":"Author","modelId":"x","data":{"id":"x","name":' + inner + b"}}]}"


def huge_body(size: int, kind: str) -> bytes:
    if kind == "padding":  # valid JSON, only too big
        return json.dumps({"changes": [group("g3")]}).encode() + b" " * size
    if kind == "text":
        return json.dumps({"changes": [todo("t9", "g1", text="x" * size)]}).encode()
    return json.dumps({"changes": [group(f"g{n}") for n in range(size // 80)]}).encode()


def valid_mutation_bytes() -> st.SearchStrategy[bytes]:
    return st.builds(lambda c: json.dumps({"changes": [c]}).encode(), valid_changes)


malformed_bodies = st.one_of(
    st.binary(max_size=200),
    # valid bodies cut short, or with a byte flipped to one that is invalid UTF-8 or a stray character
    st.builds(lambda raw, cut: raw[:cut], valid_mutation_bytes(), st.integers(0, 200)),
    st.builds(
        lambda raw, at, byte: raw[: at % len(raw)] + byte + raw[at % len(raw) + 1 :],
        valid_mutation_bytes(),
        st.integers(0, 10_000),
        st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\\", b'"', b"{", b"]", b"\n"]),
    ),
    st.builds(lambda bom, raw: bom + raw, st.sampled_from([b"\xef\xbb\xbf", b"\xff\xfe"]), valid_mutation_bytes()),
    st.builds(lambda raw: raw.decode().encode("utf-16"), valid_mutation_bytes()),
    st.sampled_from(
        [
            b"", b" ", b"null", b"0", b'"changes"', b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-0",
            b'{"changes": NaN}', b'{"changes": [], "transactionId": Infinity}', b'{"changes": ' + b"9" * 5000 + b"}",
            b'{"changes": [], "changes": [1]}', b"{'changes': []}", b'{"changes": [],}', b"\x00" * 10,
        ]
    ),
    st.builds(deeply_nested, st.sampled_from([50, 500, 900, 990, 1000, 1100, 5000, 100_000]), st.sampled_from(NESTINGS)),
    st.builds(huge_body, st.sampled_from([MIB - 100, MIB + 1, 2 * MIB]), st.sampled_from(["padding", "text", "changes"])),
)
content_types = st.just("application/json") | st.sampled_from(
    [
        "application/json; charset=utf-8", "application/json; charset=latin-1", "APPLICATION/JSON",
        "application/vnd.api+json", "application/jsonx", "text/json", "text/plain", "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x", "application/octet-stream", "*/*", "json", "", None,
    ]
)


@given(raw=malformed_bodies, content_type=content_types)
@FUZZ
def test_malformed_bytes_and_wrong_content_types_never_fail(app, seeded, raw, content_type):
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = send(app, seeded, "POST", "/mutate", data=raw, headers=headers)
    if len(raw) > MIB:
        assert response.status_code in (413, 415)


hostile_values = st.one_of(
    huge_integers.map(str),
    st.sampled_from(["-1", "1.5", "1e3", " 1", "1 ", "+1", "0x1", "٣", "１", "1\x00", "00000000000000000001", "9" * 20]),
    nasty_text,
)


def comma_list(items: list[str]) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(items), max_size=4).map(",".join)


# Known parameters absent or plausible; or, when hostile, also hostile, repeated or joined by unknown ones.
QUERIES = {
    "/sync": {
        "since": st.integers(0, 12).map(str),
        "until": st.integers(0, 12).map(str),
        "limit": st.integers(0, 6).map(str),
        "wait": st.sampled_from(["0", "0.001", "30", "30.5", "31"]),
    },
    "/bootstrap": {
        "type": st.sampled_from(["eager", "lazy"]),
        "models": comma_list(["Group", "Author", "Todo"]),
        "syncGroups": comma_list(["all", "group:g1", "group:g2", "group:g3", "group:"]),
    },
}
unknown_keys = st.sampled_from(["sinse", "", "since[]", "Since", "type "]) | nasty_text
unknown_pairs = st.lists(st.tuples(unknown_keys, hostile_values), max_size=2)


@st.composite
def query_pairs(draw, path: str, hostile: bool) -> list[tuple[str, str]]:
    pairs = []
    for key, plausible in QUERIES[path].items():
        value = draw(st.one_of(st.none(), plausible, hostile_values) if hostile else st.none() | plausible)
        if value is not None:
            pairs += [(key, value)] * (draw(st.integers(1, 2)) if hostile else 1)
    return draw(st.permutations(pairs + draw(unknown_pairs))) if hostile else pairs


def query_string(pairs: list[tuple[str, str]], raw_tail: str) -> str:
    """Percent-encoded as a browser would (lone surrogates as their bytes), then a raw tail that may be malformed."""
    def encode(text: str, safe: str) -> str:
        return quote(text, safe=safe, errors="surrogatepass")

    return "&".join(f"{encode(k, '')}={encode(v, ',:')}" for k, v in pairs) + raw_tail


@given(
    data=st.data(),
    path=st.sampled_from(["/sync", "/bootstrap"]),
    raw_tail=st.sampled_from(["&", "&&", "&since", "&since=%ff", "&%zz=1", "&since=%00", "&syncGroups=group%3Ag1"]),
)
@FUZZ
def test_random_query_strings_never_fail_nor_write(app, seeded, data, path, raw_tail):
    hostile = data.draw(st.booleans(), label="hostile")
    pairs = data.draw(query_pairs(path, hostile), label="query")
    raw_tail = data.draw(st.sampled_from(["", raw_tail]), label="raw tail") if hostile else ""
    sent = query_string(pairs, raw_tail)
    response = send(app, seeded, "GET", path, query_string=sent)
    if response.status_code == 200:
        sync, bootstrap = {"sync", "lastSyncId", "syncGroups", "hasMore"}, {"bootstrap", "firstSyncId", "syncGroups"}
        handshake = path == "/sync" and "since" not in dict(parse_qsl(sent))  # it tells the schema version too
        assert set(response.get_json()) == (sync | {"schemaVersion"} if handshake else sync if path == "/sync" else bootstrap)


latin_1 = st.characters(codec="latin-1", exclude_characters="\r\n")  # what an HTTP header can carry


def token_variants(token: str) -> st.SearchStrategy[str]:
    user_id, secret = token.split(".")
    return st.one_of(
        st.sampled_from(
            [
                f"Bearer {token}", f"bearer {token}", f"BEARER  {token}", f" Bearer {token} ", f"Bearer\t{token}",
                f"Bearer {token}x", f"Bearer {token[:-1]}", f"Bearer {user_id}.", f"Bearer .{secret}", f"Bearer {secret}",
                f"Bearer 0{token}", f"Bearer 0.{secret}", f"Bearer {int(user_id) + 1}.{secret}", f"Basic {token}",
                f"Bearer 999999999999999999.{secret}", f"Bearer 9999999999999999999999.{secret}", f"Token {token}",
                token, "Bearer", "Bearer ", f"Bearer {token},Bearer {token}", f"Bearer {user_id}.{secret.upper()}",
                f"Bearer {user_id}.{secret}' OR '1'='1",
            ]
        ),
        # one character of the token changed
        st.builds(lambda i, c: f"Bearer {token[:i]}{c}{token[i + 1:]}", st.integers(0, len(token) - 1), latin_1),
        st.text(latin_1, max_size=120),
        st.builds(lambda s: f"Bearer {s}", st.text(latin_1, max_size=120)),
    )


@given(data=st.data(), endpoint=st.sampled_from(["mutate", "sync", "bootstrap", "openapi"]))
@FUZZ
def test_random_authorization_headers_are_401_and_read_or_write_nothing(app, seeded, data, endpoint):
    header = data.draw(st.none() | token_variants(seeded.token), label="Authorization")
    client = app.test_client()
    if header is not None:
        client.environ_base["HTTP_AUTHORIZATION"] = header
    if endpoint == "mutate":
        # Accepted once, then answered as a retry: only a valid token may get that far.
        body = {"changes": [update("Author", "a1", name="Ada L.")], "transactionId": "auth-fuzz"}
        response = send(app, client, "POST", "/mutate", json=body)
    else:
        paths = {"sync": "/sync?since=0", "bootstrap": "/bootstrap?type=eager&models=Todo", "openapi": "/openapi.json"}
        response = send(app, client, "GET", paths[endpoint])
    valid = header is not None and re.fullmatch(rf"(?i:bearer) +{re.escape(seeded.token)}", header.strip())
    if endpoint == "openapi" or valid:
        assert response.status_code == 200, response.get_json()
    else:
        assert response.status_code == 401, response.get_json()
        assert response.get_json()["error"]["type"] == "auth"
