"""Every JSON response the tests receive is checked against the contract.

The app publishes its contract at GET /openapi.json. Each response of a
Flask app, through the test client or from a live server, is validated
against the schema documented for its path, method and status, with the
headers that status promises; a JSON answer must also have the content type
and the trailing newline of Flask's own. The hook is Flask's
`request_finished` signal, connected for the whole test session (conftest.py)
and in every server the tests start in a process of its own (`checked_app`
for gunicorn, tests/live_server.py for the Node tests), so no test has to
remember to call it.

A response that does not match fails the test that received it: every
violation is recorded, for conftest.py to fail the test when it ends, and in
the test's own thread (a testing app, called through the test client) the
check also raises at once. The test client reads every answer whole, so a
streamed one is checked before the test sees it; a server counts a streamed
answer its client stopped reading as unfinished, not as checked.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

from flask import Flask, request, request_finished
from flask.testing import FlaskClient
from jsonschema.exceptions import best_match
from openapi_schema_validator import OAS30Validator, oas30_format_checker

from machinery.openapi import openapi_document

# Names the file a server in a process of its own appends one line to per
# response: "ok" or the violation, as JSON text.
REPORT = "LOCO_CONTRACT_REPORT"


class ContractViolation(AssertionError):
    pass


class Tally:
    """The responses checked, and the violations not yet claimed by a test.

    In the tests' process, outcomes are kept here, and servers in processes
    of their own append theirs to the file `reports_from`, read at each
    claim; in such a server's process, `report` names that file."""

    def __init__(self):
        self.lock = threading.Lock()
        # "ok" (checked) and "unfinished", in this process and by servers in processes of their own
        self.counts = {where: {"ok": 0, "unfinished": 0} for where in ("here", "servers")}
        self.violations: list[str] = []
        self.report: str | None = None
        self.reports_from: str | None = None
        self.read_to = 0

    def record(self, outcome: str) -> None:
        """"ok", "unfinished", or a violation."""
        if self.report:
            with open(self.report, "a") as file:  # one short write: concurrent workers' lines do not interleave
                file.write(json.dumps(outcome) + "\n")
            return
        with self.lock:
            self.add("here", [outcome])

    def add(self, where: str, outcomes: list[str]) -> None:
        for outcome in outcomes:
            if outcome in self.counts[where]:
                self.counts[where][outcome] += 1
            else:
                self.violations.append(outcome)

    def claim(self) -> list[str]:
        """The violations found since the last claim, in this process and by servers."""
        with self.lock:
            if self.reports_from:
                with open(self.reports_from, "rb") as file:
                    file.seek(self.read_to)
                    written = file.read()
                whole = written[: written.rfind(b"\n") + 1]  # a line still being written waits for the next claim
                self.read_to += len(whole)
                self.add("servers", [json.loads(line) for line in whole.splitlines()])
            found, self.violations = self.violations, []
        return found


TALLY = Tally()


def documented_response(document: dict, method: str, path: str, status: int) -> dict | None:
    """The response object the document gives for this answer; None for a success it does not describe."""
    operations = document["paths"].get(path)
    if operations is not None and method.lower() in operations:
        responses = operations[method.lower()]["responses"]
        if str(status) not in responses:
            raise ContractViolation(f"{method} {path} answered {status}, which the document does not list")
        return responses[str(status)]
    # Any path and method the document does not list: "Every non-2xx response is an ErrorResponse."
    shared = {404: "NotFound", 405: "MethodNotAllowed"}.get(status)
    if shared:
        return document["components"]["responses"][shared]
    return ANY_REFUSAL if status >= 400 else None


ANY_REFUSAL = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}


VALIDATORS: dict[tuple[int, str], OAS30Validator] = {}


def validator(document: dict, key: str, schema: dict) -> OAS30Validator:
    """Built once per document and response: references resolve against the document's components."""
    cache_key = (id(document), key)
    if cache_key not in VALIDATORS:
        VALIDATORS[cache_key] = OAS30Validator({**schema, "components": document["components"]}, format_checker=oas30_format_checker)
    return VALIDATORS[cache_key]


def check(method: str, path: str, status: int, headers, body: bytes) -> None:
    """Raises ContractViolation if this answer is not the one the document describes."""
    document = openapi_document()
    documented = documented_response(document, method, path, status)
    if documented is None:
        raise ContractViolation(f"{method} {path} answered {status}, which the document does not describe")
    where = f"{method} {path} {status}"
    if headers.get("Content-Type") != "application/json":
        raise ContractViolation(f"{where}: Content-Type {headers.get('Content-Type')!r}, not 'application/json'")
    if not body.endswith(b"\n"):
        raise ContractViolation(f"{where}: the body does not end with a newline, as Flask's JSON answers do: {body[-80:]!r}")
    for name, header in documented.get("headers", {}).items():
        if header.get("required") and name not in headers:
            raise ContractViolation(f"{where}: no {name} header, which the document promises")
    schema = documented["content"]["application/json"]["schema"]
    try:
        value = json.loads(body, parse_constant=not_json)
    except ValueError as error:
        raise ContractViolation(f"{where}: the body is not JSON ({error}): {body[:200]!r}") from None
    error = best_match(validator(document, where, schema).iter_errors(value))
    if error is not None:
        error = deepest(error)
        at = "/".join(map(str, error.absolute_path)) or "the body"
        raise ContractViolation(f"{where}: at {at}: {error.message}; body: {body[:500]!r}")


def not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


def deepest(error):
    """Of an error and those under it (the branches of a oneOf), the one deepest in the body: a sync action
    fails every model's schema, but only its own model's says which field is wrong."""
    return max([error, *map(deepest, error.context)], key=lambda found: len(found.absolute_path))


def on_response(app: Flask, response, **_: Any) -> None:
    """Checks an answer once its body is whole: at once, or when a streamed body has been sent to its end."""
    method, path = request.method, request.path
    status, headers = response.status_code, response.headers
    if method in ("HEAD", "OPTIONS") or not (response.mimetype == "application/json" or path in openapi_document()["paths"]):
        return  # no body, a CORS preflight, or outside the API: the demo page, a static file
    # Only there does an exception reach the test: elsewhere it would turn the answer into a 500.
    in_the_tests_thread = app.testing and threading.current_thread() is threading.main_thread()

    def verify(body: bytes) -> None:
        try:
            check(method, path, status, headers, body)
        except Exception as error:  # a ContractViolation, or a check that could not even run
            violation = str(error) if isinstance(error, ContractViolation) else f"{method} {path} {status}: {error!r}"
            TALLY.record(violation)
            if in_the_tests_thread:
                raise ContractViolation(violation) from error
        else:
            TALLY.record("ok")

    if response.is_streamed:
        response.response = CheckedStream(response.response, verify)
    else:
        verify(response.get_data())


class CheckedStream:
    """A streamed body passed through as it is sent, and checked whole after its last chunk."""

    def __init__(self, body, verify):
        self.body, self.verify, self.finished = body, verify, False

    def __iter__(self):
        parts = []
        for part in self.body:
            parts.append(part if isinstance(part, bytes) else part.encode())
            yield part
        self.finished = True
        self.verify(b"".join(parts))

    def close(self) -> None:
        if not self.finished:
            TALLY.record("unfinished")  # its client stopped reading it: there is no whole body to check
        close = getattr(self.body, "close", None)
        if close is not None:
            close()


class WholeBodyClient(FlaskClient):
    """Flask's test client, reading every answer whole before handing it to the test, so that a streamed
    answer is checked too, even where the test only looks at its status."""

    def open(self, *args: Any, **kwargs: Any):
        return super().open(*args, **{**kwargs, "buffered": True})


def install(report: str | None = None, reports_from: str | None = None) -> None:
    """Check every response of every Flask app in this process from now on. A
    server's process appends its outcomes to `report`; the tests' process
    reads its servers' from `reports_from`."""
    TALLY.report, TALLY.reports_from = report, reports_from
    request_finished.connect(on_response)
    Flask.test_client_class = WholeBodyClient


def uninstall() -> None:
    request_finished.disconnect(on_response)
    Flask.test_client_class = None


def checked_app() -> Flask:
    """What `gunicorn 'app:create_app()'` serves, each response checked: for the servers the tests start."""
    from app import create_app

    install(report=os.environ[REPORT])
    return create_app()
