"""The flask commands: init-db, seed, create-user, new-token, revoke-token, add-member, remove-member, log
(and compact-log, from machinery/compaction.py).

A sync server needs users, tokens and memberships before any client can
call it; these commands make them, and write through app.py's own write path
(in_write_transaction, apply_transaction), so that seeded rows get sync
actions exactly as a mutation's do. Registered by create_app.
Proved by tests/test_cli.py and the README's commands (tests/test_readme.py).
"""

from __future__ import annotations

import secrets

import click
from flask.cli import with_appcontext

from app import MutateSchema, applied, apply_transaction, caller_sync_groups, in_write_transaction, join, leave, load, read_head, sha256
from machinery.compaction import compact_log_command
from machinery.database import DbConnection, create_schema, read_transaction, schema_statements, start_log_after
from machinery.long_poll import membership_changed
from models import SYNCED_MODELS, db


# --- Users and tokens: this server's own way of knowing who is calling (app.py's authenticate) ---


def new_user(db_connection: DbConnection, name: str) -> tuple[int, str]:
    (user_id,) = db_connection.execute("INSERT INTO users (name, token_sha256) VALUES (?, '') RETURNING id", (name,)).fetchone()
    return user_id, new_token(db_connection, user_id, first=True)


def new_token(db_connection: DbConnection, user_id: int, revoke: bool = False, first: bool = False) -> str | None:
    """A new token for the user, or none; the old one stops at once, held polls included. Only a
    hash of the secret is kept (none hashes to ''), so this is the one chance to see the token."""
    secret = None if revoke else secrets.token_urlsafe(32)
    db_connection.execute("UPDATE users SET token_sha256 = ? WHERE id = ?", (sha256(secret) if secret else "", user_id))
    if not first:  # the old token's held polls, on every process, check it again (a new user has none)
        membership_changed(db_connection, user_id)
    return secret and f"{user_id}.{secret}"


@click.command("init-db")
@with_appcontext
def init_db_command():
    """Drop every table and create them empty."""

    def reset(db_connection):
        old_head = read_head(db_connection)
        (old_changes,) = db_connection.execute("SELECT coalesce(max(id), 0) FROM membership_change").fetchone()
        for statement in schema_statements(drop=True):
            db_connection.execute(statement)
        create_schema(db_connection)
        if old_head:
            # Start the new log above the old one, so /sync can tell a client
            # that still holds a cursor of the wiped database to bootstrap again.
            log_start = old_head + 1
            db_connection.execute("INSERT INTO sync_log_start (after_sync_id, reason) VALUES (?, 'reset')", (log_start,))
            start_log_after(db_connection, log_start)
        # Every held poll, on every process, reads again: its token and cursor are the old database's.
        membership_changed(db_connection, None, after=old_changes)

    in_write_transaction(reset)
    click.echo(f"Initialized an empty database at {db.engine.url.database}")


SEED_CHANGES = [
    {"action": "create", "modelName": "Group", "modelId": "g1", "data": {"id": "g1", "name": "Kitchen"}},
    {"action": "create", "modelName": "Group", "modelId": "g2", "data": {"id": "g2", "name": "Garden"}},
    {"action": "create", "modelName": "Author", "modelId": "a1", "data": {"id": "a1", "name": "Ada"}},
    {"action": "create", "modelName": "Author", "modelId": "a2", "data": {"id": "a2", "name": "Grace"}},  # Grace's, from here on
    *(
        {
            "action": "create",
            "modelName": "Todo",
            "modelId": todo_id,
            "data": {"id": todo_id, "text": text, "authorId": author, "groupId": group, "isDone": False, "likeCount": 0},
        }
        for todo_id, text, author, group in [
            ("t1", "Buy coffee", "a1", "g1"),
            ("t2", "Descale the kettle", "a2", "g1"),
            ("t3", "Water the tomatoes", "a1", "g2"),
        ]
    ),
]


def seed_demo() -> tuple[dict[str, str], int]:
    """Create the demo users Ada and Grace and the demo rows; return their tokens."""
    changes = load(MutateSchema(), {"changes": SEED_CHANGES})["changes"]
    graces = [change for change in changes if "a2" in (change.model_id, change.data.get("author_id"))]  # an Author is its writer's

    def seed(db_connection):
        if db_connection.execute("SELECT 1 FROM users LIMIT 1").fetchone():
            raise click.ClickException("The database already has users; run `flask --app app init-db` to start over.")
        (ada, ada_token), (grace, grace_token) = new_user(db_connection, "Ada"), new_user(db_connection, "Grace")
        applied(db_connection, apply_transaction(db_connection, [c for c in changes if c not in graces], ada, None, ""))  # Ada creates g1 and g2, so joins both
        join(db_connection, grace, "group:g1")
        last_sync_id = applied(db_connection, apply_transaction(db_connection, graces, grace, None, ""))
        return {"Ada": ada_token, "Grace": grace_token}, last_sync_id

    return in_write_transaction(seed)


@click.command("seed")
@click.option("--url", default="http://127.0.0.1:5000", show_default=True, help="Where the server runs, for the demo link.")
@with_appcontext
def seed_command(url: str):
    """Load demo users and rows, the rows through the same path as /mutate."""
    tokens, last_sync_id = seed_demo()
    click.echo(f"Seeded {len(SEED_CHANGES)} rows; lastSyncId is {last_sync_id}.")
    click.echo("Demo users (send the token as Authorization: Bearer <token>):")
    click.echo(f"  Ada    all, group:g1, group:g2   {tokens['Ada']}")
    click.echo(f"  Grace  all, group:g1             {tokens['Grace']}")
    # The tokens ride in the fragment, which the browser never sends to a server.
    click.echo(f"Live demo, signed in as both: {url.rstrip('/')}/{demo_fragment(tokens)}")


def demo_fragment(tokens: dict[str, str]) -> str:
    return "#" + "&".join(f"{name}={token}" for name, token in tokens.items())


@click.command("create-user")
@click.argument("name")
@click.option("--group", "group_ids", multiple=True, help="Id of a Group to join; may be repeated.")
@with_appcontext
def create_user_command(name: str, group_ids: tuple[str, ...]):
    """Add a user and print its token (shown only now)."""

    def create(db_connection):
        require_groups(db_connection, group_ids)
        user_id, token = new_user(db_connection, name)
        for group_id in group_ids:
            join(db_connection, user_id, f"group:{group_id}")
        return user_id, token

    user_id, token = in_write_transaction(create)
    click.echo(f"User {user_id} ({name}) token: {token}")


@click.command("new-token")
@click.argument("user_id", type=int)
@with_appcontext
def new_token_command(user_id: int):
    """Give a user a new token and print it; the old one stops at once, held polls included."""

    def rotate(db_connection):
        require_user(db_connection, user_id)
        return new_token(db_connection, user_id)

    click.echo(f"User {user_id} token: {in_write_transaction(rotate)}")


@click.command("revoke-token")
@click.argument("user_id", type=int)
@with_appcontext
def revoke_token_command(user_id: int):
    """Stop a user's token at once, held polls included; `new-token` gives it another."""

    def revoke(db_connection):
        require_user(db_connection, user_id)
        new_token(db_connection, user_id, revoke=True)

    in_write_transaction(revoke)
    click.echo(f"User {user_id} has no token now.")


@click.command("add-member")
@click.argument("user_id", type=int)
@click.argument("group_id")
@with_appcontext
def add_member_command(user_id: int, group_id: str):
    """Give a user the sync group of a Group; it takes effect on the user's next request."""

    def add(db_connection):
        require_user(db_connection, user_id)
        require_groups(db_connection, [group_id])
        join(db_connection, user_id, f"group:{group_id}")

    in_write_transaction(add)
    click.echo(f"User {user_id} is a member of group:{group_id}.")


@click.command("remove-member")
@click.argument("user_id", type=int)
@click.argument("group_id")
@with_appcontext
def remove_member_command(user_id: int, group_id: str):
    """Take a Group's sync group from a user; its next request no longer sees that group."""

    def remove(db_connection):
        require_user(db_connection, user_id)
        leave(db_connection, user_id, f"group:{group_id}")

    in_write_transaction(remove)
    click.echo(f"User {user_id} is not a member of group:{group_id}.")


@click.command("log")
@click.option("--as", "as_user", type=int, help="Also say whether this user sees each action.")
@click.option("--since", type=click.IntRange(0), default=0, show_default=True, help="Start after this syncId.")
@click.option("--limit", type=click.IntRange(1), default=50, show_default=True, help="Print at most this many actions.")
@with_appcontext
def log_command(as_user: int | None, since: int, limit: int):
    """Print the sync log, an action a line: its syncId, action, model, id and sync groups."""
    with read_transaction() as db_connection:  # one snapshot: the actions and the user's groups agree
        actions = db_connection.execute("SELECT id, action, model_name, model_id FROM sync_action WHERE id > ? ORDER BY id LIMIT ?",
                                        (since, limit)).fetchall()
        last = actions[-1][0] if actions else since
        groups: dict[int, list[str]] = {}
        for sync_id, sync_group in db_connection.execute("SELECT sync_action_id, sync_group FROM sync_action_group WHERE "
                                                         "sync_action_id > ? AND sync_action_id <= ? ORDER BY sync_group", (since, last)):
            groups.setdefault(sync_id, []).append(sync_group)
        if as_user is not None:
            require_user(db_connection, as_user)
            sees = set(caller_sync_groups(db_connection, as_user, None))
    header = ["syncId", "action", "model", "id", "sync groups", *([f"user {as_user} sees"] if as_user is not None else [])]
    rows = [[str(sync_id), action, model, model_id, ", ".join(groups[sync_id]),
             *(["yes" if sees.intersection(groups[sync_id]) else "no"] if as_user is not None else [])]
            for sync_id, action, model, model_id in actions]
    widths = [max(len(row[n]) for row in [header, *rows]) for n in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(cell.rjust(width) if n == 0 else cell.ljust(width) for n, (cell, width) in enumerate(zip(row, widths))).rstrip())


def require_user(db_connection: DbConnection, user_id: int) -> None:
    if db_connection.execute("SELECT 1 FROM users WHERE id = ?", (user_id,)).fetchone() is None:
        raise click.ClickException(f"There is no user {user_id}.")


def require_groups(db_connection: DbConnection, group_ids) -> None:
    for group_id in group_ids:
        if db_connection.execute(SYNCED_MODELS["Group"].sql.select, (group_id,)).fetchone() is None:
            raise click.ClickException(f"There is no Group {group_id!r}.")


COMMANDS = (init_db_command, seed_command, create_user_command, new_token_command, revoke_token_command, add_member_command,
            remove_member_command, log_command, compact_log_command)
