"""Every value on the wire in its true type, and every answer shaped alike.

A row has one wire form, whether a bootstrap serves it or a sync action
carries it, on every engine: SQLite, which keeps a boolean as 0 or 1 and a
date as text, must not show through. Compared as JSON text, where 0 is not
false and 1 is not 1.0.
"""

from datetime import date

import pytest
from flask import jsonify
from marshmallow import fields
from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from app import flavour
from machinery.database import speaking_sql
from helpers import create, delete, mutate, read_log, reader, update, wire
from models import MAX_ID_LENGTH, SYNCED_MODELS, InGroup, RowSchema, SyncedModel, db, model_id

TODO_FIELDS = {"text": "Renamed", "authorId": "a2", "isDone": True, "likeCount": 7}


def bootstrap_row(client, model: str, row_id: str) -> dict:
    rows = client.get(f"/bootstrap?type=eager&models={model}").get_json()["bootstrap"][model]
    [row] = [row for row in rows if row["id"] == row_id]
    return row


def test_an_update_that_leaves_a_boolean_alone_sends_it_as_a_boolean(seeded):
    """The bug as a user met it: an update of likeCount alone sent "isDone":0 on SQLite."""
    mutate(seeded, update("Todo", "t1", likeCount=1))
    page = seeded.get("/sync?since=5").get_data(as_text=True)
    assert '"isDone":false,"likeCount":1}' in page, page


@pytest.mark.parametrize("field", TODO_FIELDS)
def test_an_update_of_one_field_carries_the_row_exactly_as_a_bootstrap_serves_it(seeded, field):
    mutate(seeded, update("Todo", "t1", **{field: TODO_FIELDS[field]}))
    [action] = read_log(seeded, since=5)
    assert wire(action["data"]) == wire(bootstrap_row(seeded, "Todo", "t1"))
    assert wire(action["data"][field]) == wire(TODO_FIELDS[field])


# --- A model of other field types, registered only here ------------------------


class Note(db.Model):
    __tablename__ = "notes"
    id: Mapped[str] = mapped_column(String(MAX_ID_LENGTH), primary_key=True)
    group_id: Mapped[str] = mapped_column(ForeignKey("groups.id"))
    title: Mapped[str | None]
    weight: Mapped[float]
    due: Mapped[date]


# Not in the schema every other test's app creates: the fixture below makes its table.
db.metadata.remove(Note.__table__)


class NoteSchema(RowSchema):
    group_id = model_id(data_key="groupId", required=True)
    title = fields.String(required=True, allow_none=True)
    weight = fields.Float(required=True)
    due = fields.Date(required=True)


@pytest.fixture
def notes(app, seeded):
    """The model Note, registered as models.py would (one block there), with its table."""
    Note.__table__.create(reader(app))
    SYNCED_MODELS["Note"] = SyncedModel("Note", Note, NoteSchema(), InGroup("group_id"))
    try:
        yield seeded
    finally:
        del SYNCED_MODELS["Note"]


NOTE = {"id": "n1", "groupId": "g1", "title": None, "weight": 1.5, "due": "2026-12-02"}


def test_a_nullable_string_a_float_and_a_date_come_out_alike_everywhere(notes):
    mutate(notes, create("Note", "n1", **NOTE))
    inserted = bootstrap_row(notes, "Note", "n1")
    assert wire(inserted) == wire(NOTE)

    changes = [{"title": "Groceries"}, {"weight": 2}, {"due": "2027-01-31"}, {"title": None}]
    for change in changes:
        mutate(notes, update("Note", "n1", **change))
    actions = read_log(notes, since=5)
    rows = [action["data"] for action in actions]
    expected = [NOTE, {**NOTE, "title": "Groceries"}, {**NOTE, "title": "Groceries", "weight": 2.0}]
    expected += [{**expected[-1], "due": "2027-01-31"}, {**expected[-1], "due": "2027-01-31", "title": None}]
    assert wire(rows) == wire(expected)
    assert wire(rows[-1]) == wire(bootstrap_row(notes, "Note", "n1"))


def test_every_models_wire_row_is_what_its_schema_dumps(app, notes):
    """wire_row serializes field by field, for speed: it must equal the schema's own dump, model by model."""
    mutate(notes, create("Note", "n1", **NOTE), update("Note", "n1", title="x"))
    with app.app_context():
        db_connection = speaking_sql(db.engine.raw_connection())
        try:
            for name, model in SYNCED_MODELS.items():
                cursor = db_connection.execute(f"SELECT {', '.join(model.columns)} FROM {model.table.__tablename__}")
                stored = cursor.fetchall()
                read = model.reader(flavour().dialect, cursor.description)
                assert stored, name
                for row in stored:
                    assert wire(read.wire_row(row)) == wire(model.schema.dump(read.values(row))), name
        finally:
            db_connection.close()


# --- Answers end like Flask's own ---------------------------------------------


def answers(app, seeded) -> dict[str, object]:
    mutate(seeded, update("Todo", "t1", isDone=True))
    return {
        "POST /mutate": seeded.post("/mutate", json={"changes": [delete("Todo", "t1")]}),
        "GET /bootstrap eager": seeded.get("/bootstrap?type=eager&models=Group,Author,Todo"),
        "GET /bootstrap lazy": seeded.get("/bootstrap?type=lazy&models=Todo&syncGroups=group:g1"),
        "GET /sync handshake": seeded.get("/sync"),
        "GET /sync page": seeded.get("/sync?since=0"),
        "GET /sync empty long poll": seeded.get("/sync?since=7&wait=0.01"),
        "GET /openapi.json": seeded.get("/openapi.json"),
        "400": seeded.get("/sync?since=x"),
        "401": app.test_client().get("/sync"),
        "404": seeded.get("/nowhere"),
        "409": seeded.get("/sync?since=999"),
    }


def test_every_answer_is_written_as_jsonify_writes_it(app, seeded):
    """Content type, compact separators, final newline: pages and bootstraps are built by hand
    (SQL writes a page's actions), and must not differ from the answers jsonify builds."""
    for name, response in answers(app, seeded).items():
        with app.test_request_context():
            flasks_own = jsonify(response.get_json())
        assert response.headers["Content-Type"] == flasks_own.headers["Content-Type"], name
        assert response.get_data(as_text=True) == flasks_own.get_data(as_text=True), name
