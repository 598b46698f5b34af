"""Tables, wire schemas and sync-group rules.

Every synced model is declared in one place: its table, its marshmallow
schema (the row as the client sees it, camelCase on the wire) and the rule
that says which sync groups a row belongs to. `SYNCED_MODELS` is what the
endpoints look models up in, so adding a model means adding one block here.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from flask_sqlalchemy import SQLAlchemy
from marshmallow import Schema, fields, validate
from sqlalchemy import BigInteger, Column, ForeignKey, Index, String, Text
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)

MAX_ID_LENGTH = 255
# The wire shape of the models below. Raise it when a change of theirs would break a client built for the
# old one: a client that sends another version is told to bootstrap again (docs/production.md, "Changing a model").
SCHEMA_VERSION = 1
SYNC_GROUP_LENGTH = len("group:") + MAX_ID_LENGTH
INT64 = (-(2**63), 2**63 - 1)


# --- Sync-group rules --------------------------------------------------------
# A rule works both ways: which groups a row belongs to (to link each sync
# action it causes) and which rows are in some groups (a WHERE condition with
# its parameters, to serve a bootstrap).


class Everyone:
    """Rows in the sync group `all`, which every user has."""

    def groups_of(self, row: dict[str, Any]) -> list[str]:
        return ["all"]

    def rows_in(self, sync_groups: list[str]) -> tuple[str, list[str]]:
        return ("1 = 1" if "all" in sync_groups else "1 = 0"), []


@dataclass(frozen=True)
class InGroup:
    """Rows in the sync group `group:<value of column>`."""

    column: str

    def groups_of(self, row: dict[str, Any]) -> list[str]:
        return [f"group:{row[self.column]}"]

    def rows_in(self, sync_groups: list[str]) -> tuple[str, list[str]]:
        ids = [g.removeprefix("group:") for g in sync_groups if g.startswith("group:")]
        return (f"{self.column} IN ({', '.join('?' * len(ids))})" if ids else "1 = 0"), ids


@dataclass(frozen=True)
class Writers:
    """Who may write a model's rows beyond being in their sync groups: where an application puts its
    own rules (docs/contract.md). app.py's apply_change checks them in the write transaction; a change
    they refuse is 403 `forbidden`, type server."""

    owner: str | None = None  # a column that the server sets to the creating user: only it may change or delete the row
    own: tuple[str, ...] = ()  # reference columns that, when a change sets them, must name a row the writer owns

    def allow(self, row: dict[str, Any], user_id: int) -> bool:
        return self.owner is None or row[self.owner] == user_id


@dataclass(frozen=True)
class SyncedModel:
    name: str
    table: type[db.Model]
    schema: Schema
    sync_groups: Everyone | InGroup
    # The row *is* a sync group: creating it makes the creator a member,
    # deleting it ends every membership of it.
    owns_sync_group: bool = False
    writers: Writers = Writers()

    def wire_name(self, attribute: str) -> str:
        return self.schema.fields[attribute].data_key or attribute

    @functools.cached_property
    def columns(self) -> list[str]:
        """The table's columns, id first; a row is a dict keyed by them (they are also its attribute names)."""
        names = [column.name for column in self.table.__table__.columns]
        return ["id", *(name for name in names if name != "id")]

    def stored(self, row: dict[str, Any], dialect: Dialect) -> list[Any]:
        """The row's values in `columns` order, as the engine's driver stores them."""
        if dialect not in self.binders:
            self.binders[dialect] = [column.type.dialect_impl(dialect).bind_processor(dialect) for column in self.table_columns]
        return [row[name] if store is None else store(row[name]) for name, store in zip(self.columns, self.binders[dialect])]

    def reader(self, dialect: Dialect, description: Sequence[Sequence[Any]]) -> RowReader:
        """Reads the rows of a cursor that selected `columns`, by the types its driver reports."""
        type_codes = tuple(column[1] for column in description)
        readers = self.readers.setdefault(dialect, {})
        if type_codes not in readers:
            readers[type_codes] = RowReader.of(self, dialect, type_codes)
        return readers[type_codes]

    @functools.cached_property
    def sql(self) -> RowSql:
        """The statements that read and write one row by id, columns in `columns` order;
        an insert or update returns the row as stored."""
        table, listed = self.table.__tablename__, ", ".join(self.columns)
        return RowSql(
            select=f"SELECT {listed} FROM {table} WHERE id = ?",
            # No row back when the id exists: the check and the write in one statement, which waits for a create of the same id elsewhere.
            insert=f"INSERT INTO {table} ({listed}) VALUES ({', '.join('?' * len(self.columns))}) ON CONFLICT (id) DO NOTHING RETURNING {listed}",
            update=f"UPDATE {table} SET {', '.join(f'{column} = ?' for column in self.columns[1:])} WHERE id = ? RETURNING {listed}",
            delete=f"DELETE FROM {table} WHERE id = ? RETURNING id",
        )

    @functools.cached_property
    def table_columns(self) -> list[Column]:
        return [self.table.__table__.columns[name] for name in self.columns]

    # Built once per engine (its dialect) and dropped with it.
    @functools.cached_property
    def binders(self) -> weakref.WeakKeyDictionary[Dialect, list[Callable[[Any], Any] | None]]:
        return weakref.WeakKeyDictionary()

    @functools.cached_property
    def readers(self) -> weakref.WeakKeyDictionary[Dialect, dict[tuple[Any, ...], RowReader]]:
        return weakref.WeakKeyDictionary()

    @functools.cached_property
    def references(self) -> list[tuple[str, SyncedModel]]:
        """(attribute, referenced model) for each foreign key to a synced model; read once, after every model is registered."""
        by_table = {m.table.__table__: m for m in SYNCED_MODELS.values()}
        return [
            (column.key, by_table[fk.column.table])
            for column in self.table.__table__.columns
            for fk in column.foreign_keys
            if fk.column.table in by_table  # not an owner's users.id
        ]


class RowSql(NamedTuple):
    select: str
    insert: str
    update: str
    delete: str


@dataclass(frozen=True)
class RowReader:
    """Turns one model's stored rows into Python values and into their wire form.

    A value has three forms. SQLite has no boolean or date type: its driver
    returns True as 1 and a date as '2026-12-02'. Each column's SQLAlchemy
    type gives the Python value back (True, date(2026, 12, 2)) on whichever
    engine, as the ORM would, and the model's schema field gives the wire
    form (true, "2026-12-02"). Bootstraps and sync actions both take their
    rows through `wire_row`, so the wire shows a row the same way everywhere.
    """

    columns: tuple[tuple[str, Callable[[Any], Any] | None], ...]  # (column, driver value -> Python value)
    fields: tuple[WireField, ...]  # the schema's dumped fields

    @classmethod
    def of(cls, model: SyncedModel, dialect: Dialect, type_codes: tuple[Any, ...]) -> RowReader:
        columns = tuple(
            (name, column.type.dialect_impl(dialect).result_processor(dialect, type_code))
            for name, column, type_code in zip(model.columns, model.table_columns, type_codes)
        )
        index = {name: n for n, name in enumerate(model.columns)}
        fields = []
        for name, field in model.schema.dump_fields.items():
            column = index[field.attribute or name]
            fields.append(WireField(field.data_key or name, column, columns[column][1], field._serialize, name))
        return cls(columns, tuple(fields))

    def values(self, stored: Sequence[Any]) -> dict[str, Any]:
        """The row as Python values, keyed by column."""
        return {name: value if load is None else load(value) for (name, load), value in zip(self.columns, stored)}

    def wire_row(self, stored: Sequence[Any]) -> dict[str, Any]:
        """The one place a stored row becomes its wire form: what the model's
        schema dumps from the row's Python values, field by field, each field
        seeing its own value only (a schema's dump hooks, or a field that
        reads others, would not work; tests/test_wire.py holds every model to
        its schema's dump). Bootstraps run every row through here: it is kept
        to one pass."""
        return {
            wire_name: serialize(stored[column] if load is None else load(stored[column]), name, None)
            for wire_name, column, load, serialize, name in self.fields
        }


class WireField(NamedTuple):
    wire_name: str
    column: int  # its index in a stored row
    load: Callable[[Any], Any] | None  # the driver's value -> the Python value
    serialize: Callable[..., Any]  # the schema field's: the Python value -> the wire's
    name: str  # in the schema


SYNCED_MODELS: dict[str, SyncedModel] = {}


def synced(name: str, schema: type[Schema], sync_groups: Everyone | InGroup, owns_sync_group: bool = False, writers: Writers = Writers()):
    """Register a table as a synced model under its wire name."""

    def register(table: type[db.Model]) -> type[db.Model]:
        SYNCED_MODELS[name] = SyncedModel(name, table, schema(), sync_groups, owns_sync_group, writers)
        return table

    return register


# --- Wire field types -------------------------------------------------------
# Strict on purpose: "true", 1 or "3" are client bugs, not values to coerce.


class Int64(fields.Integer):
    def __init__(self, *checks, **kwargs):
        super().__init__(strict=True, validate=[validate.Range(*INT64), *checks], **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, bool):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


def model_id(*checks, **kwargs) -> fields.String:
    return fields.String(validate=[validate.Length(1, MAX_ID_LENGTH), *checks], **kwargs)


class StrictBoolean(fields.Boolean):
    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, bool):  # a plain Boolean takes 1 and "yes"
            raise self.make_error("invalid", input=value)
        return value


class RowSchema(Schema):
    """A model row on the wire. Loading a create needs every field."""

    id = model_id(required=True)


# --- Example domain ---------------------------------------------------------
# Who may write what: a Group's members change it and its Todos (its sync group); anyone may
# create a Group, and so join it, up to MAX_SYNC_GROUPS_PER_USER groups. An Author, in `all`,
# is its creator's: only that user may rename or delete it, and a Todo names one of its
# writer's own Authors when it sets authorId (any member may still update the Todo).


class GroupSchema(RowSchema):
    # Sync group names travel comma-separated in query strings.
    id = model_id(validate.Regexp(r"^[^,]*$", error="A Group id cannot contain a comma."), required=True)
    name = fields.String(required=True)


@synced("Group", GroupSchema, InGroup("id"), owns_sync_group=True)
class Group(db.Model):
    __tablename__ = "groups"
    id: Mapped[str] = mapped_column(String(MAX_ID_LENGTH), primary_key=True)
    name: Mapped[str]


class AuthorSchema(RowSchema):
    name = fields.String(required=True)


@synced("Author", AuthorSchema, Everyone(), writers=Writers(owner="user_id"))
class Author(db.Model):
    __tablename__ = "authors"
    id: Mapped[str] = mapped_column(String(MAX_ID_LENGTH), primary_key=True)
    name: Mapped[str]
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)  # its writer; not on the wire


class TodoSchema(RowSchema):
    text = fields.String(required=True)
    author_id = model_id(data_key="authorId", required=True)
    group_id = model_id(data_key="groupId", required=True)
    is_done = StrictBoolean(data_key="isDone", required=True)
    like_count = Int64(data_key="likeCount", required=True)


@synced("Todo", TodoSchema, InGroup("group_id"), writers=Writers(own=("author_id",)))
class Todo(db.Model):
    __tablename__ = "todos"
    id: Mapped[str] = mapped_column(String(MAX_ID_LENGTH), primary_key=True)
    text: Mapped[str]
    author_id: Mapped[str] = mapped_column(ForeignKey("authors.id"), index=True)
    group_id: Mapped[str] = mapped_column(ForeignKey("groups.id"), index=True)
    is_done: Mapped[bool]
    like_count: Mapped[int] = mapped_column(BigInteger)  # the wire's Int64, also on PostgreSQL


# --- Who may see what -------------------------------------------------------


class User(db.Model):
    """Someone with an API token. Only a hash of the token's secret is kept."""

    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    token_sha256: Mapped[str] = mapped_column(String(64))


class Membership(db.Model):
    """A user's sync group beyond `all`, which every user has."""

    __tablename__ = "memberships"
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True)
    sync_group: Mapped[str] = mapped_column(String(SYNC_GROUP_LENGTH), primary_key=True, index=True)


class MembershipChange(db.Model):
    """One for each change of a user's memberships, numbered in commit order, so that each
    process can end the held polls of that user (machinery/long_poll.py). No user: every
    user's, as after init-db, whose first change continues the old numbering."""

    __tablename__ = "membership_change"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    user_id: Mapped[int | None]


# --- The sync log -----------------------------------------------------------


class SyncAction(db.Model):
    """One entry of the log clients replay. Its id is the syncId."""

    __tablename__ = "sync_action"
    # AUTOINCREMENT: a syncId is never handed out twice, even after the
    # newest action is deleted, so a client cursor can never be reused.
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(primary_key=True)
    action: Mapped[str] = mapped_column(String(6))  # insert | update | delete
    model_name: Mapped[str] = mapped_column(String(MAX_ID_LENGTH))
    model_id: Mapped[str] = mapped_column(String(MAX_ID_LENGTH))
    data: Mapped[str | None] = mapped_column(Text)  # the full row as compact JSON, sent as stored; None for delete
    created_at: Mapped[int | None] = mapped_column(BigInteger)  # Unix seconds, for `compact-log --keep DAYS`


class SyncActionGroup(db.Model):
    """Links a sync action to each sync group that may see it."""

    __tablename__ = "sync_action_group"
    # Primary key order serves `WHERE sync_group IN (...) AND sync_action_id > ?`.
    sync_group: Mapped[str] = mapped_column(String(SYNC_GROUP_LENGTH), primary_key=True)
    sync_action_id: Mapped[int] = mapped_column(ForeignKey("sync_action.id"), primary_key=True)
    __table_args__ = (Index("ix_sync_action_group_action", "sync_action_id"),)


class SyncLogStart(db.Model):
    """At most one row: where the log starts, after `init-db` wiped a used database (its new log
    starts above the old one) or `compact-log` removed its oldest actions. A cursor below it is
    answered "bootstrap again", with this reason."""

    __tablename__ = "sync_log_start"
    after_sync_id: Mapped[int] = mapped_column(primary_key=True)
    reason: Mapped[str | None] = mapped_column(String(16))  # reset | compacted; None (older databases) is reset


class SyncGroupHistory(db.Model):
    """Every sync group ever created, claimed by its creation (app.py's claim_sync_groups): a deleted Group's id is never
    used again, or its members, who keep it, would see the new one's rows. Also those whose actions compact-log removed."""

    __tablename__ = "sync_group_history"
    sync_group: Mapped[str] = mapped_column(String(SYNC_GROUP_LENGTH), primary_key=True)


class ClientTransaction(db.Model):
    """A committed client transaction, so that a retry is answered, not re-applied."""

    __tablename__ = "client_transaction"
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True)  # each user has its own ids
    transaction_id: Mapped[str] = mapped_column(String(MAX_ID_LENGTH), primary_key=True)
    changes_sha256: Mapped[str] = mapped_column(String(64))
    last_sync_id: Mapped[int] = mapped_column(index=True)
    # The newest syncId its client had seen when it first sent it. Only records that have one are pruned with
    # the log: a retry whose base is below the log's start may be of a pruned record, so it is refused, never applied again.
    base_sync_id: Mapped[int | None]

