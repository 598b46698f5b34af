"""Strict reading of what a client sends: JSON bodies and query strings.

The endpoints in app.py validate with marshmallow; this module makes sure
what reaches marshmallow is what JSON and a query string can honestly mean,
and that every refusal is a 400 with a readable message: no NaN or Infinity,
no lone surrogates or NUL characters that a database cannot store as text, no
repeated query parameters, no chunked body past the size limit, numbers in
query strings written only as digits. Found by fuzzing the API from its
OpenAPI document. Proved by tests/test_fuzz.py and tests/test_errors.py.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from typing import Any

from flask import current_app, request
from marshmallow import Schema, ValidationError, fields
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from machinery.errors import ApiError
from models import INT64, MAX_ID_LENGTH, SYNCED_MODELS, SyncedModel


class SyncId(fields.Field):
    """A syncId in a query string: decimal digits only, so "1.5", "-1" or " 1" are refused."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, str) or not re.fullmatch(r"[0-9]{1,19}", value) or int(value) > INT64[1]:
            raise ValidationError("Must be a non-negative integer, like 0 or 42.")
        return int(value)


class WaitSeconds(fields.Field):
    """Seconds in a query string: "25" or "0.5", from 0 to `maximum`."""

    def __init__(self, maximum: int, **kwargs):
        super().__init__(**kwargs)
        self.maximum = maximum

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, str) or not re.fullmatch(r"[0-9]{1,2}(\.[0-9]{1,3})?", value) or float(value) > self.maximum:
            raise ValidationError(f"Must be a number of seconds from 0 to {self.maximum}, like 25 or 0.5.")
        return float(value)


class CommaList(fields.Field):
    """A comma-separated query parameter; `item` checks and returns each entry."""

    def __init__(self, item, allow_empty: bool, **kwargs):
        super().__init__(**kwargs)
        self.item, self.allow_empty = item, allow_empty

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, str):
            raise ValidationError("Must be a comma-separated list.")
        entries = value.split(",") if value else []
        if not entries and not self.allow_empty:
            raise ValidationError("Must list at least one entry.")
        return list(dict.fromkeys(self.item(entry) for entry in entries))


def json_body() -> Any:
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", "Send a JSON body with Content-Type: application/json.")
    raw = request.get_data(cache=False)  # a Content-Length over the limit raises 413 here
    if request.content_length is None and len(raw) >= current_app.config["MAX_CONTENT_LENGTH"]:
        raise RequestEntityTooLarge()  # a chunked body is cut at the limit, not refused: refuse it
    try:
        body = json.loads(raw, parse_constant=reject_constant)
        # "\ud800" parses to a lone surrogate, which no database can store as text.
        json.dumps(body, ensure_ascii=False).encode()
        has_nul = holds_nul(body)
    except (ValueError, RecursionError) as error:
        raise ApiError(400, "invalid_json", f"The body is not valid JSON: {error}") from None
    if has_nul:
        # PostgreSQL cannot store it in text; refused on every engine, so that all behave alike.
        raise ApiError(400, "invalid_request", "Strings cannot hold the NUL character (\\u0000).")
    return body


def holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(holds_nul(key) or holds_nul(item) for key, item in value.items())
    if isinstance(value, list):
        return any(holds_nul(item) for item in value)
    return False


def reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def query_args() -> dict[str, str]:
    repeated = {key: len(values) for key, values in request.args.lists() if len(values) > 1}
    if repeated:
        messages = {key: [f"Given {count} times; give it once."] for key, count in repeated.items()}
        raise ApiError(400, "invalid_request", " ".join(f"{k}: {m[0]}" for k, m in messages.items()), details=messages)
    return request.args.to_dict()


@functools.cache
def shared(schema_class: type[Schema]) -> Schema:
    """One instance of each schema: building one costs more than a request's loading."""
    return schema_class()


LIMITS = dict(  # create_app's settings, in /openapi.json's x-limits; a refusal names its limit, type server
    MAX_CONTENT_LENGTH=1_048_576,  # a request body (Flask's own setting: 413 payload_too_large)
    MAX_STRING_BYTES=32_768,  # a string field of a row, as stored: JSON, non-ASCII escaped (413)
    MAX_ROW_BYTES=65_536,  # a row as its sync action carries it (413)
    MAX_TRANSACTION_BYTES=1_048_576,  # the rows of one transaction's sync actions, summed (413)
    # Not a refusal: a GET /sync page stops at the action that passes it (hasMore: true); its first always fits.
    MAX_PAGE_BYTES=1_048_576,
    MAX_SYNC_GROUPS_PER_USER=100,  # creating a Group past it is 403 too_many_sync_groups: each group costs every poll
)
QUOTED = 60  # characters of what a client sent that an error message quotes


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= QUOTED else f"{text[:QUOTED]}… ({len(text):,} characters)"


def bounded(messages: Any) -> Any:
    """marshmallow's messages, with what the client sent (unknown keys, say) cut to a short prefix."""
    if isinstance(messages, dict):
        return {(short(key) if isinstance(key, str) and len(key) > QUOTED else key): bounded(nested) for key, nested in messages.items()}
    if isinstance(messages, list):
        return [bounded(message) for message in messages]
    return short(messages) if isinstance(messages, str) and len(messages) > 4 * QUOTED else messages


def within_limits(changes: list, applied: Iterator) -> Iterator:
    """Inside the write transaction, each change's sync action as `applied` applies it, until a
    string, its row or the transaction's rows pass their limits: then 413, nothing written, and
    the write lock held only until that change, not for the rest of the transaction."""
    config, total, applied = current_app.config, 0, iter(applied)
    for index, change in enumerate(changes):
        for name, value in change.data.items():
            # Measured as the log stores it: JSON in ASCII, other characters escaped (\u00e9: 6 bytes).
            size = len(json.dumps(value)) - 2 if isinstance(value, str) and len(value) * 12 > config["MAX_STRING_BYTES"] else 0
            if size > config["MAX_STRING_BYTES"]:
                field = change.model.wire_name(name)
                raise ApiError(413, "string_too_large", f"{change.where(index)}: {field} is {size:,} bytes as stored, over MAX_STRING_BYTES "
                               f"({config['MAX_STRING_BYTES']:,}).", details={"change": index})
        action = next(applied)
        size = len(action.data.encode()) if action.data else 0
        if size > config["MAX_ROW_BYTES"]:
            raise ApiError(413, "row_too_large", f"{change.where(index)}: the row would be {size:,} bytes, over MAX_ROW_BYTES "
                           f"({config['MAX_ROW_BYTES']:,}).", details={"change": index})
        total += size
        if total > config["MAX_TRANSACTION_BYTES"]:
            raise ApiError(413, "transaction_too_large", f"The transaction's rows would be over MAX_TRANSACTION_BYTES "
                           f"({config['MAX_TRANSACTION_BYTES']:,}) at {change.where(index)}: send it in smaller transactions.")
        yield action


def load(schema: Schema, data: Any) -> Any:
    try:
        return schema.load(data)
    except ValidationError as error:
        messages = bounded(error.normalized_messages())
        lines = [line.rstrip(".") for line in describe(messages)]
        if len(lines) > 5:
            lines[5:] = [f"and {len(lines) - 5} more (see details)"]
        message = "; ".join(lines) + "."
        raise ApiError(400, "invalid_request", message, details=messages) from None


def describe(messages: Any, path: str = "") -> list[str]:
    """Flatten marshmallow's nested messages into lines like 'changes.0.data.isDone: Not a valid boolean.'"""
    if isinstance(messages, dict):
        return [
            line
            for key, nested in messages.items()
            for line in describe(nested, path if key == "_schema" else f"{path}.{key}".lstrip("."))
        ]
    if isinstance(messages, list):
        return [line for message in messages for line in describe(message, path)]
    return [f"{path or 'body'}: {messages}"]


HTTP_ERROR_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
                    415: "unsupported_media_type"}


def from_http_error(error: HTTPException) -> ApiError:
    """Werkzeug's refusals (no such endpoint, wrong method, a body too large), as every other refusal."""
    if error.code == 404:
        message = f"No endpoint at {short(request.path)}. The API is POST /mutate, GET /bootstrap and GET /sync."
    elif error.code == 413:
        message = f"The body is over the limit of {current_app.config['MAX_CONTENT_LENGTH']} bytes."
    else:
        message = error.description
    code = HTTP_ERROR_CODES.get(error.code, re.sub(r"\W+", "_", (error.name or "error").lower()))
    headers = {k: v for k, v in error.get_headers() if k == "Allow"}
    return ApiError(error.code or 500, code, message, headers=headers)


def known_model(name: str) -> SyncedModel:
    if name not in SYNCED_MODELS:
        raise ValidationError(f"Unknown model {name!r}. Known models: {', '.join(sorted(SYNCED_MODELS))}.")
    return SYNCED_MODELS[name]


SYNC_GROUP = re.compile(rf"all|group:[^,]{{1,{MAX_ID_LENGTH}}}")


def well_formed_sync_group(name: str) -> str:
    if not SYNC_GROUP.fullmatch(name):
        raise ValidationError(f"Malformed sync group {name!r}: expected 'all' or 'group:<groupId>'.")
    return name
