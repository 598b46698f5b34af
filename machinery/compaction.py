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
A retry of a transaction whose record was pruned: see app.py's apply_transaction.
Proved by tests/test_compaction.py; its cost is bench/compaction.py's.
"""

from __future__ import annotations

import time

import click
from flask.cli import with_appcontext

from app import in_write_transaction, log_start, read_head
from machinery.database import DbConnection, read_transaction
from machinery.long_poll import membership_changed

BATCH = 5000  # actions removed per write transaction (docs/performance.md: the longest write stall)


def raise_log_start(db_connection: DbConnection, floor: int) -> int:
    """The new start: `floor`, at most the head, never lower than the start already is."""
    start, head = log_start(db_connection)[0], read_head(db_connection)
    floor = min(floor, head)
    if floor > start:
        db_connection.execute("DELETE FROM sync_log_start")
        db_connection.execute("INSERT INTO sync_log_start (after_sync_id, reason) VALUES (?, 'compacted')", (floor,))
        membership_changed(db_connection, None)  # every held poll reads again, with this start
    return max(floor, start)


def remove_batch(db_connection: DbConnection, floor: int, batch: int) -> tuple[int, int]:
    """The oldest `batch` actions at or below the floor, their links and records; how many of each."""
    oldest = "SELECT max(id), count(*) FROM (SELECT id FROM sync_action WHERE id <= ? ORDER BY id LIMIT ?) AS oldest"
    upto, actions = db_connection.execute(oldest, (floor, batch)).fetchone()
    upto = floor if upto is None else upto  # none left: the records of the rest (say, of actions init-db dropped)
    db_connection.execute("DELETE FROM sync_action_group WHERE sync_action_id <= ?", (upto,))
    db_connection.execute("DELETE FROM sync_action WHERE id <= ?", (upto,))
    # Only records that carry the client's baseSyncId: a retry without one could not be told from a new transaction.
    pruned = db_connection.execute("DELETE FROM client_transaction WHERE last_sync_id <= ? AND base_sync_id IS NOT NULL", (upto,))
    return actions, pruned.rowcount


def compact_log(floor: int, batch: int = BATCH, after_batch=lambda: None) -> tuple[int, int, int]:
    """Removes the log at or below `floor`; returns the log's start, and how many actions and records went."""
    start = in_write_transaction(lambda db_connection: raise_log_start(db_connection, floor))
    removed = pruned = 0
    while True:
        actions, records = in_write_transaction(lambda db_connection: remove_batch(db_connection, start, batch))
        removed, pruned = removed + actions, pruned + records
        after_batch()
        if actions == 0:
            return start, removed, pruned


@click.command("compact-log")
@click.option("--before", type=click.IntRange(1), help="Remove the sync actions before this syncId.")
@click.option("--keep", type=click.FloatRange(0), help="Remove the sync actions older than this many days.")
@with_appcontext
def compact_log_command(before: int | None, keep: float | None):
    """Remove the oldest sync actions; clients whose cursor they held bootstrap again."""
    if (before is None) == (keep is None):
        raise click.UsageError("Give one of --before SYNCID or --keep DAYS.")
    if keep is not None:
        cutoff = int(time.time() - keep * 86400)
        # Actions written before the created_at column existed count as old.
        older = "SELECT coalesce(max(id), 0) FROM sync_action WHERE created_at < ? OR created_at IS NULL"
        with read_transaction() as db_connection:
            before = db_connection.execute(older, (cutoff,)).fetchone()[0] + 1
    start, removed, pruned = compact_log(before - 1)
    click.echo(f"Compacted the log: removed {removed:,} sync actions and {pruned:,} client transactions; "
               f"it now starts after syncId {start}.")
