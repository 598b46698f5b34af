"""GET /openapi.json: the API described, from the very schemas that validate requests.

A client author reads the contract here, and tools generate clients and
tests from it. apispec builds the document from app.py's marshmallow schemas,
so it cannot drift from what the endpoints enforce; the answers, which app.py
builds as dicts or JSON text, are described by the response schemas below,
and the tests check every response they receive against them.
Proved by tests/test_openapi.py, tests/test_fuzz.py (requests generated from
this document) and tests/contract.py (every answer of every test).
"""

from __future__ import annotations

import functools
import re
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from marshmallow import Schema, fields, validate

from flask import current_app, has_app_context

from app import MAX_CHANGES, BootstrapQuerySchema, MutateSchema, SyncQuerySchema
from machinery.input import LIMITS, SYNC_GROUP, CommaList, SyncId, WaitSeconds, known_model
from models import INT64, SYNCED_MODELS, SyncedModel, model_id


def sync_id_field(**kwargs) -> fields.Integer:
    return fields.Integer(strict=True, validate=validate.Range(0, INT64[1]), **kwargs)


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def sync_action_schemas(model: SyncedModel) -> dict[str, type[Schema]]:
    """A model's sync actions: insert and update carry its full row after the change, delete no data."""

    def shape(actions: list[str], **data: fields.Field) -> type[Schema]:
        return Schema.from_dict(
            {
                "sync_id": sync_id_field(data_key="syncId", required=True),
                "action": fields.String(required=True, validate=validate.OneOf(actions)),
                "model_name": fields.String(data_key="modelName", required=True, validate=validate.OneOf([model.name])),
                "model_id": model_id(data_key="modelId", required=True),
                **data,
            }
        )

    row = fields.Nested(type(model.schema), required=True, metadata={"description": "The full row after the change."})
    return {f"{model.name}RowAction": shape(["insert", "update"], data=row), f"{model.name}DeleteAction": shape(["delete"])}


def one_of(property_name: str, mapping: dict[str, str]) -> dict[str, Any]:
    """One of the schemas in `mapping`, told apart by a property's value."""
    return {
        "oneOf": [ref(name) for name in dict.fromkeys(mapping.values())],
        "discriminator": {"propertyName": property_name, "mapping": {value: ref(name)["$ref"] for value, name in mapping.items()}},
    }


def response_schemas(models: tuple[SyncedModel, ...]) -> dict[str, type[Schema]]:
    """The answers of /sync and /bootstrap, which name every synced model."""
    sync = Schema.from_dict(
        {
            "sync": fields.List(fields.Raw(metadata={"allOf": [ref("SyncAction")]}), required=True),
            "last_sync_id": sync_id_field(data_key="lastSyncId", required=True),
            "sync_groups": fields.List(fields.String(), data_key="syncGroups", required=True),
            "has_more": fields.Boolean(data_key="hasMore", required=True),
            "schema_version": fields.Integer(data_key="schemaVersion", metadata={"description": "The handshake's only: models.py's SCHEMA_VERSION."}),
        },
        name="SyncResponse",
    )
    # A key for each requested model, holding rows of that model's schema.
    rows = Schema.from_dict({model.name: fields.List(fields.Nested(type(model.schema))) for model in models}, name="BootstrapRows")
    bootstrap = Schema.from_dict(
        {
            "bootstrap": fields.Nested(rows, required=True),
            "first_sync_id": sync_id_field(data_key="firstSyncId", required=True),
            "sync_groups": fields.List(fields.String(), data_key="syncGroups", required=True),
        },
        name="BootstrapResponse",
    )
    return {"sync": sync, "bootstrap": bootstrap}


class MutateResponseSchema(Schema):
    last_sync_id = sync_id_field(data_key="lastSyncId", required=True)


class ErrorSchema(Schema):
    type = fields.String(required=True, validate=validate.OneOf(["server", "auth", "network"]))
    code = fields.String(required=True)
    message = fields.String(required=True)
    details = fields.Raw(required=True, allow_none=True)


class ErrorResponseSchema(Schema):
    error = fields.Nested(ErrorSchema, required=True)


def success(schema: type[Schema], description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def refusal(description: str, **headers: str) -> dict:
    """A documented error status: the one error shape, and the headers it always has."""
    response = success(ErrorResponseSchema, description)
    if headers:
        response["headers"] = {
            name: {"required": True, "schema": {"type": "string"}, "description": about} for name, about in headers.items()
        }
    return response


def api_operations(models: tuple[SyncedModel, ...]) -> dict[str, Any]:
    """Each path's operations, in apispec's input form (a new dict each time: apispec resolves it in place)."""
    answers = response_schemas(models)
    unauthorized = refusal(
        "unauthorized (type auth): a missing, malformed or unknown token.", **{"WWW-Authenticate": "Bearer: send a token."}
    )
    internal_error = refusal("internal_error: a bug; the transaction was rolled back.")
    busy = refusal(
        "database_busy (type network): the database stayed busy, or every connection of this server was in use; "
        "nothing was written; retry. database_unavailable (type network): a fault that may pass (a read-only or "
        "full disk, an I/O error, a lost connection to PostgreSQL); retry.", **{"Retry-After": "Seconds to wait."}
    )
    again = ("bootstrap_again: details.reason says why the client must drop its store and bootstrap: reset, "
             "compacted, or schema_changed (Loco-Schema-Version is not the server's, details.schemaVersion).")
    version = [{"in": "header", "name": "Loco-Schema-Version", "required": False, "schema": {"type": "integer", "minimum": 0, "maximum": 999_999_999},
                "description": "The models.py version the client was built for; another one is answered bootstrap_again."}]
    return {
        "/mutate": {
            "post": {
                "summary": "Apply changes in one transaction, all or nothing (the client's sendTransaction).",
                "parameters": version,
                "requestBody": {"required": True, "content": {"application/json": {"schema": MutateSchema}}},
                "responses": {
                    200: success(MutateResponseSchema, "Committed; lastSyncId is the greatest syncId it created."),
                    400: refusal("invalid_request (details has the messages per field) or invalid_json."),
                    401: unauthorized,
                    403: refusal("forbidden (type server): a change outside the caller's sync groups."),
                    409: refusal(
                        "already_exists, does_not_exist, unknown_reference, still_referenced, "
                        "sync_groups_changed, transaction_id_reused or sync_group_reused. " + again + " A baseSyncId "
                        "below the log's start (its record may be pruned) or never handed out is answered so too."
                    ),
                    413: refusal("payload_too_large: the body is over 1 MiB. string_too_large, row_too_large, "
                                 "transaction_too_large: a string field, a row or the transaction's rows over "
                                 "MAX_STRING_BYTES, MAX_ROW_BYTES or MAX_TRANSACTION_BYTES; nothing was written."),
                    415: refusal("unsupported_media_type: the body is not sent as application/json."),
                    500: internal_error,
                    503: busy,
                },
            }
        },
        "/bootstrap": {
            "get": {
                "summary": "Rows of some models, and the firstSyncId they reflect, from one snapshot.",
                "parameters": [{"in": "query", "schema": BootstrapQuerySchema}, *version],
                "responses": {
                    200: success(answers["bootstrap"], "A key per requested model; syncGroups are the groups served."),
                    400: refusal("invalid_request."),
                    401: unauthorized,
                    403: refusal("forbidden (type auth): a lazy bootstrap of a sync group the caller lacks."),
                    409: refusal(again),
                    500: internal_error,
                    503: busy,
                },
            }
        },
        "/sync": {
            "get": {
                "summary": "The handshake (without since), or the caller's sync actions after since.",
                "parameters": [{"in": "query", "schema": SyncQuerySchema}, *version],
                "responses": {
                    200: success(answers["sync"], "Pass lastSyncId as the next since; hasMore says a page follows. "
                                 "A page stops early after MAX_PAGE_BYTES (x-limits), at the last action it carries."),
                    400: refusal("invalid_request."),
                    401: unauthorized,
                    409: refusal(again + " Reset: since is above the head, or below a log init-db wiped; compacted: "
                                 "below the start compact-log raised."),
                    500: internal_error,
                    503: busy,
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document.",
                "security": [],
                "responses": {
                    200: {"description": "OpenAPI 3.0.3.", "content": {"application/json": {"schema": {"type": "object"}}}},
                    500: internal_error,
                },
            }
        },
    }


def query_field_properties(models: tuple[SyncedModel, ...]):
    """SyncId, WaitSeconds and CommaList parse query strings; the document says what the strings may hold."""

    def properties(converter, field: fields.Field, ret: dict, **_) -> dict:
        if isinstance(field, SyncId):
            return {"minimum": ret.get("minimum", 0), "maximum": ret.get("maximum", INT64[1])}
        if isinstance(field, WaitSeconds):
            return {"pattern": r"^(?:[12]?[0-9](?:\.[0-9]{1,3})?|30(?:\.0{1,3})?)$"}
        if isinstance(field, CommaList):
            item = "|".join(re.escape(model.name) for model in models) if field.item is known_model else SYNC_GROUP.pattern
            items = "(?:{0})(?:,(?:{0}))*".format(item)
            return {"pattern": f"^(?:{items})?$" if field.allow_empty else f"^{items}$"}
        return {}

    return properties


def openapi_document() -> dict[str, Any]:
    config = current_app.config if has_app_context() else LIMITS  # outside a request (tests check answers against it): the defaults
    limits = {"MAX_CHANGES": MAX_CHANGES, **{name: config[name] for name in LIMITS}}
    return describe_api(tuple(SYNCED_MODELS.values()), tuple(limits.items()))


@functools.cache
def describe_api(models: tuple[SyncedModel, ...], limits: tuple[tuple[str, int], ...]) -> dict[str, Any]:
    """The OpenAPI document of the API serving these synced models, with its limits in `x-limits`
    (built once: apispec takes a while)."""
    plugin = MarshmallowPlugin()
    spec = APISpec(
        title="Loco Sync backend",
        version="1",
        openapi_version="3.0.3",
        plugins=[plugin],
        info={"description": "Mutate, bootstrap and sync for Loco Sync. Every non-2xx response is an ErrorResponse."},
        security=[{"bearer": []}],
        **{"x-limits": dict(limits)},  # bytes, but MAX_CHANGES: docs/contract.md says what each bounds
    )
    plugin.map_to_openapi_type(SyncId, "integer", "int64")
    plugin.map_to_openapi_type(CommaList, "string", None)
    plugin.map_to_openapi_type(WaitSeconds, "string", None)
    plugin.converter.add_attribute_function(query_field_properties(models))
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer", "description": "<userId>.<secret>"})
    for model in models:  # rows are named as the client names their models
        spec.components.schema(model.name, schema=type(model.schema))
        actions = sync_action_schemas(model)
        for name, schema in actions.items():
            spec.components.schema(name, schema=schema)
        row_action, delete_action = actions
        spec.components.schema(
            f"{model.name}SyncAction", component=one_of("action", {"insert": row_action, "update": row_action, "delete": delete_action})
        )
    spec.components.schema("SyncAction", component=one_of("modelName", {model.name: f"{model.name}SyncAction" for model in models}))
    # Given for the paths and methods that are not listed.
    spec.components.response("NotFound", refusal("not_found: no such endpoint."))
    spec.components.response("MethodNotAllowed", refusal("method_not_allowed.", Allow="The methods the path takes."))
    for path, operations in api_operations(models).items():
        spec.path(path=path, operations=operations)
    return spec.to_dict()
