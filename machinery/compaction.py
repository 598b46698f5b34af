"""Compaction: `flask --app app compact-log --before SYNCID | --keep DAYS`, so the log stops growing.

A bootstrap reads rows, not the log, so the log is only needed by clients that
follow it from a cursor. Compaction removes the sync actions at or below a floor,
with their group links and the client_transaction records they answer, and
raises the log's start: a cursor below it is then answered "bootstrap again"
(reason compacted), one at or above it is served exactly as before.

Safe while servers run, in this order:
  1. One short write transaction raises the start and ends every held poll,
     on every process (as a membership change does), so each reads its page
     again: no poll is answered from a read that misses a removed action.
  2. Short write transactions then remove the oldest BATCH actions each, so
     writers wait at most one batch. Every read that could see a removed action
     is one snapshot (a page is one statement) taken before it was removed, or
     after the start was raised, when its cursor is refused.
On PostgreSQL each runs alone, one at a time across app servers, as large writes do
(writer.py), at READ COMMITTED as every write there does. A retry of a transaction whose
record was pruned reads the start in a statement after its claim of the record, so after
the raise (app.py's apply_transaction; docs/design.md, "Writes on PostgreSQL").
Proved by tests/test_compaction.py; its cost is bench/compaction.py's.
"""

from __future__ import annotations

import time

import click
from flask import current_app
from flask.cli import with_appcontext

from app import LOG_BOUNDS, in_write_transaction, log_bounds
from machinery.database import DbConnection, flavour, read_transaction
from machinery.long_poll import membership_changed

BATCH = 5000  # actions removed per write transaction, and their rows' bytes: docs/performance.md, the longest write stall
MAX_BATCH_BYTES = 2 << 20
PAUSE_S = 0.005  # between batches, so that writers waiting get the write lock (a file lock is not first come, first served)


def raise_log_start(db_connection: DbConnection, floor: int) -> int:
    """The new start: `floor`, at most the head, never lower than the start already is."""
    start, _, head = log_bounds(db_connection.execute(LOG_BOUNDS))
    floor = min(floor, head)
    if floor > start:
        db_connection.execute("DELETE FROM sync_log_start")
        db_connection.execute("INSERT INTO sync_log_start (after_sync_id, reason) VALUES (?, 'compacted')", (floor,))
        membership_changed(db_connection, None)  # every held poll reads again, with this start
    return max(floor, start)


# The oldest actions above `after`, up to the floor: at most `batch` of them, and about MAX_BATCH_BYTES (the first always).
OLDEST = """SELECT max(id), count(*) FROM (
    SELECT id, sum(size) OVER (ORDER BY id) - size AS before FROM (
        SELECT id, coalesce(length(data), 0) + 100 AS size FROM sync_action WHERE id > ? AND id <= ? ORDER BY id LIMIT ?
    ) AS oldest
) AS sized WHERE before < ?"""


def remove_batch(db_connection: DbConnection, after: int, floor: int, batch: int) -> tuple[int, int, int]:
    """The oldest actions above `after` and at or below the floor, their links and records; where it ended, how many of each."""
    upto, actions = db_connection.execute(OLDEST, (after, floor, batch, MAX_BATCH_BYTES)).fetchone()
    upto = floor if upto is None else upto  # none left: a last sweep, up to the floor
    # A group's links kept its id from being used again by a new Group, which its old members would see: keep the name.
    remembered = "INSERT INTO sync_group_history (sync_group) SELECT DISTINCT sync_group FROM sync_action_group"
    db_connection.execute(f"{remembered} WHERE sync_action_id > ? AND sync_action_id <= ? AND sync_group <> 'all' ON CONFLICT DO NOTHING",
                          (after, upto))
    db_connection.execute("DELETE FROM sync_action_group WHERE sync_action_id > ? AND sync_action_id <= ?", (after, upto))
    db_connection.execute("DELETE FROM sync_action WHERE id > ? AND id <= ?", (after, upto))
    # Only records that carry the client's baseSyncId: a retry without one could not be told from a new transaction.
    pruned = "DELETE FROM client_transaction WHERE last_sync_id > ? AND last_sync_id <= ? AND base_sync_id IS NOT NULL RETURNING 1"
    return upto, actions, len(db_connection.execute(pruned, (after, upto)).fetchall())  # a count read, not a rowcount not yet in


def compact_log(floor: int, batch: int = BATCH, after_batch=lambda: None) -> tuple[int, int, int]:
    """Removes the log at or below `floor`; returns the log's start, and how many actions and records went."""
    start = in_batch_transaction(lambda db_connection: raise_log_start(db_connection, floor))
    done = removed = pruned = 0  # each batch starts where the last ended: rows removed may linger in an index until vacuumed
    while True:
        done, actions, records = in_batch_transaction(lambda db_connection: remove_batch(db_connection, done, start, batch))
        removed, pruned = removed + actions, pruned + records
        after_batch()
        if actions == 0:
            return start, removed, pruned
        time.sleep(PAUSE_S)


def in_batch_transaction(work):
    if flavour().postgres:  # one at a time across processes, as large writes are (writer.py)
        return current_app.extensions["writer"].run(work, alone=True)
    return in_write_transaction(work)


@click.command("compact-log")
@click.option("--before", type=click.IntRange(1), help="Remove the sync actions before this syncId.")
@click.option("--keep", type=click.IntRange(0), help="Remove the sync actions older than this many days.")
@with_appcontext
def compact_log_command(before: int | None, keep: int | None):
    """Remove the oldest sync actions; clients whose cursor they held bootstrap again."""
    if (before is None) == (keep is None):
        raise click.UsageError("Give one of --before SYNCID or --keep DAYS.")
    if keep is not None:
        cutoff = int(time.time() - keep * 86400)
        # Actions written before the created_at column existed count as new: their age is unknown.
        older = "SELECT coalesce(max(id), 0) FROM sync_action WHERE created_at < ?"
        with read_transaction() as db_connection:
            before = db_connection.execute(older, (cutoff,)).fetchone()[0] + 1
    start, removed, pruned = compact_log(before - 1)
    click.echo(f"Compacted the log: removed {removed:,} sync actions and {pruned:,} client transactions; "
               f"it now starts after syncId {start}.")
