"""Long polls: thousands held per process, woken by sync group, answered from one read.

A poll with wait= (app.py's sync) holds an empty answer until an action the
caller may see commits. Each process keeps its held polls indexed by sync
group and by user. When the log may have grown (a commit of this process;
another process's, seen by one watcher per process), one reader reads the new
actions with their sync groups, and the membership changes, in one snapshot,
and answers every poll one of them concerns from that read: no statement and
no token check per poll. A poll whose user's memberships changed (or every
poll, after init-db) is told to read again, so that its answer carries the
user's new groups and its token and cursor are checked again.
A held poll costs no thread under the gevent worker (gunicorn.conf.py), no
connection, and no snapshot. Proved by tests/test_connected.py (two app servers, wake-ups
counted, membership changes, disconnects, shutdown) and tests/test_long_poll.py.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import defaultdict
from typing import Any

from flask import current_app
from sqlalchemy.engine import Engine

from machinery import event_loop, postgres, sqlite
from machinery.database import flavour
from machinery.writer import commit_bell

REREAD = "reread"  # hold's answer when the poll must read its page again: its user's groups changed, or init-db ran
WAKE_AT_ONCE = 50  # polls answered between two turns of the event loop
MAX_READ = 5000  # actions read at a time, as app.py's MAX_LIMIT; and MAX_PAGE_BYTES, as its pages: an answer is part of a read

BOUNDS = """SELECT coalesce((SELECT max(id) FROM sync_action), (SELECT after_sync_id FROM sync_log_start), 0),
    (SELECT coalesce(max(id), 0) FROM membership_change)"""
MEMBERSHIP_CHANGES = "SELECT id, user_id FROM membership_change WHERE id > ? AND id <= ? ORDER BY id"
NEW_ACTIONS = """SELECT id, {wire_action}, (SELECT {concat_groups} FROM sync_action_group WHERE sync_action_id = sync_action.id), upto
FROM sync_action JOIN (SELECT * FROM (SELECT id AS sized_id, {size} AS size, sum({size}) OVER (ORDER BY id) AS upto
    FROM sync_action WHERE id > ? AND id <= ?) AS new WHERE upto - size < ?) AS sized ON sized_id = id ORDER BY id"""  # as pages count


def held_polls() -> HeldPolls:
    return current_app.extensions["held_polls"]


def membership_changed(db_connection, user_id: int | None, after: int = 0) -> None:
    """Inside the write transaction that changed `user_id`'s memberships (None: every user's):
    its held polls, on every process, end with its new groups. Numbered after `after` in an empty table."""
    if flavour().postgres:
        postgres.lock_log(db_connection)  # so that changes commit in the order of their ids, as the log's actions do
        postgres.notify_log(db_connection)
    next_id = "SELECT coalesce(max(id), ?) + 1, ? FROM membership_change"
    db_connection.execute(f"INSERT INTO membership_change (id, user_id) {next_id}", (after, user_id))


class HeldPoll:
    __slots__ = ("user_id", "cursor", "limit", "sync_groups", "sync_groups_json", "changes_seen", "reads_before", "answer", "woken")

    def __init__(self, user_id: int, page: dict[str, Any], limit: int, reads_before: int):
        self.user_id, self.cursor, self.limit = user_id, page["lastSyncId"], limit
        self.sync_groups_json, self.sync_groups = page["syncGroups"], json.loads(page["syncGroups"])
        self.changes_seen = page["membershipChanges"]  # the newest membership change its page's snapshot saw
        self.reads_before, self.answer = reads_before, None  # answer: a page, or REREAD, set by a read
        self.woken = threading.Event()


class HeldPolls:
    """This process's held polls, and the one reader that answers them."""

    def __init__(self, engine: Engine, sqlite_file: str | None, bell: str | None, config: dict):
        self.engine, self.sqlite_file, self.bell, self.config = engine, sqlite_file, bell, config
        wire_action, size = (postgres.WIRE_ACTION, postgres.ACTION_BYTES) if sqlite_file is None else (sqlite.WIRE_ACTION, sqlite.ACTION_BYTES)
        concat = "string_agg" if sqlite_file is None else "group_concat"
        self.new_actions_sql = NEW_ACTIONS.format(wire_action=wire_action, concat_groups=f"{concat}(sync_group, ',')", size=size)
        self.lock = threading.Lock()
        self.by_group: dict[str, set[HeldPoll]] = defaultdict(set)
        self.by_user: dict[int, set[HeldPoll]] = defaultdict(set)
        self.count = 0
        self.earliest_end = math.inf  # at most the smallest cursor + limit of the polls held: where a page fills up
        # Where the next read starts: at most the cursor of every poll held since the last read began.
        self.next_from: int | None = None
        self.next_changes_from: int | None = None
        self.reads_begun = self.reads_done = 0
        self.head = self.log_head = self.changes_head = 0  # as the last finished read saw them: where it ended, the log's head
        self.read_due = False  # read even if no commit was seen since the last read
        self.log_changed = threading.Event()  # the log or the memberships may have changed
        self.closed = False
        self.threads: list[threading.Thread] = []
        self.inotify = None
        self.page_reads = 0  # reads of new actions so far, for tests

    def hold(self, user_id: int, page: dict[str, Any], limit: int, deadline: float, environ: dict) -> Any:
        """Hold an empty page until something its user may see arrives. Returns the answer's page,
        REREAD, or None when the wait ends, the client goes or the server stops: then answer `page`,
        whose cursor this moves past the actions read meanwhile, none of them the user's."""
        with self.lock:
            if self.closed:
                event_loop.last_answer(environ)
                return None
            poll = HeldPoll(user_id, page, limit, self.reads_begun)
            self.start_threads()
            idle = self.count == 0
            if idle:  # what was read before is no guide: commits went unwatched
                self.next_from = self.next_changes_from = None
            self.next_read_from(poll.cursor, poll.changes_seen)
            self.count += 1
            self.earliest_end = min(self.earliest_end, poll.cursor + limit)
            for sync_group in poll.sync_groups:
                self.by_group[sync_group].add(poll)
            self.by_user[user_id].add(poll)
            if idle or poll.cursor < self.head or poll.changes_seen < self.changes_head:
                # With no poll held, commits go unwatched; or the last read went past its page's snapshot.
                self.read_again()
        stop_watching = event_loop.when_client_leaves(environ, poll.woken.set)
        try:
            poll.woken.wait(max(0.0, deadline - time.monotonic()))
        finally:
            stop_watching()
            if self.closed:
                event_loop.last_answer(environ)
            with self.lock:
                self.forget(poll)
                answer = poll.answer  # set by a read under this lock, maybe not yet told (read_forever)
                if answer is None and self.reads_done > poll.reads_before and self.head > poll.cursor:
                    # Every read since it was held covered it, and none concerned it: its cursor moves past them.
                    page["lastSyncId"] = min(self.head, poll.cursor + poll.limit)
                    page["hasMore"] = page["lastSyncId"] < self.log_head
        return answer

    def forget(self, poll: HeldPoll) -> None:
        if poll not in self.by_user.get(poll.user_id, ()):
            return
        self.count -= 1
        if self.count == 0:
            self.earliest_end = math.inf
        for key, index in ((poll.user_id, self.by_user), *((group, self.by_group) for group in poll.sync_groups)):
            index[key].discard(poll)
            if not index[key]:
                del index[key]

    def log_may_have_grown(self) -> None:
        """A commit of this process calls it: its reader reads now, not at the next signal."""
        self.log_changed.set()

    def close(self) -> None:
        """Answer every held poll now, for a quick shutdown."""
        with self.lock:
            self.closed = True
            polls = {poll for user_polls in self.by_user.values() for poll in user_polls}
        for poll in polls:
            poll.woken.set()  # its answer stays what a read gave it, if one did
        self.log_changed.set()

    # --- The reader: one per process ------------------------------------------------------------

    def read_again(self) -> None:
        self.read_due = True
        self.log_changed.set()

    def start_threads(self) -> None:
        if self.threads:
            return
        self.inotify = self.sqlite_file and commit_bell(self.bell)  # writer.py
        targets = [self.read_forever] + ([self.watch] if self.sqlite_file is None or self.inotify else [])
        self.threads = [threading.Thread(target=self.keep_running, args=(target,), name=target.__name__, daemon=True)
                        for target in targets]
        for thread in self.threads:
            thread.start()

    def keep_running(self, target) -> None:
        """Run `target` until the server stops, again if the database fails it (restarted, pool empty)."""
        while not self.closed:
            try:
                target()
            except Exception:
                logging.getLogger(__name__).exception("%s failed; it starts again in 1 s", target.__name__)
                time.sleep(1)
                self.read_again()  # what it may have missed meanwhile

    def read_forever(self) -> None:
        connection, data_version = self.connect(), None
        # Without inotify (not Linux), another process's commit is seen by asking SQLite every
        # interval_s. With it, only this app's writers ring: a sqlite3 shell's commit waits for the next.
        interval_s = self.config["LOG_CHECK_INTERVAL_S"] if self.sqlite_file and not self.inotify else None
        try:
            while not self.closed:
                self.log_changed.wait(interval_s if self.count else None)
                self.log_changed.clear()
                if self.sqlite_file and self.count:
                    # Changed by every commit of another connection since this one last asked.
                    version = connection.execute("PRAGMA data_version").fetchone()[0]
                    if version == data_version and not self.read_due:
                        continue
                    data_version = version
                with self.lock:
                    if self.closed or not self.count:
                        continue
                    self.read_due = False
                    start, changes_start = self.next_from, self.next_changes_from
                    self.next_from = self.next_changes_from = None
                    self.reads_begun += 1
                try:
                    head, log_head, changes_head, changes, actions = self.read(connection, start, changes_start)
                except Exception:
                    with self.lock:
                        self.next_read_from(start, changes_start)  # this one, again
                    raise
                with self.lock:
                    answered = self.dispatch(start, head, log_head, changes_start, changes, actions)
                    self.next_read_from(head, changes_head)
                    self.reads_done, self.head, self.log_head, self.changes_head = self.reads_begun, head, log_head, changes_head
                    if self.next_from < head or self.next_changes_from < changes_head or head < log_head:
                        self.read_again()  # for polls held during the read, or for the rest of a long run
                for first in range(0, len(answered), WAKE_AT_ONCE):
                    if first:  # a write to `all` wakes every poll: requests already waiting (a mutation's) go first
                        event_loop.after_waiting_requests()
                    for poll in answered[first:first + WAKE_AT_ONCE]:
                        poll.woken.set()
        finally:
            connection.close()

    def next_read_from(self, start: int, changes_start: int) -> None:  # under the lock: the next read starts at or below these
        self.next_from = start if self.next_from is None else min(self.next_from, start)
        self.next_changes_from = changes_start if self.next_changes_from is None else min(self.next_changes_from, changes_start)

    def connect(self):
        """A connection of the reader's own, set up as the pool's are (database.configure_database)."""
        pooled = self.engine.raw_connection()
        connection = pooled.driver_connection if self.sqlite_file else postgres.PostgresConnection(pooled)
        pooled.detach()  # this one stays with the reader
        return connection

    def read(self, connection, start: int, changes_start: int) -> tuple[int, int, int, list, list]:
        """In one snapshot: where the read ends, the log's head, the membership changes, the new actions with their groups."""
        connection.execute("BEGIN" if self.sqlite_file else postgres.BEGIN_READ)
        try:
            log_head, changes_head = connection.execute(BOUNDS).fetchone()
            end = min(log_head, start + MAX_READ)
            changes = connection.execute(MEMBERSHIP_CHANGES, (changes_start, changes_head)).fetchall()
            actions = connection.execute(self.new_actions_sql, (start, end, self.config["MAX_PAGE_BYTES"])).fetchall() if end > start else []
        finally:
            connection.execute("COMMIT")
        if actions and actions[-1][3] >= self.config["MAX_PAGE_BYTES"]:
            end = actions[-1][0]  # maybe cut there: the rest is the next read's
        self.page_reads += 1
        return end, log_head, changes_head, changes, actions

    def dispatch(self, start: int, head: int, log_head: int, changes_start: int, changes: list, actions: list) -> list:
        """Answer each poll that the read concerns; returns them, to be told outside the lock. A poll held
        during the read, from a cursor before its start or changes it did not cover, waits for the next."""
        answered = []

        def covered(poll: HeldPoll) -> bool:
            # Held before this read began: every read since then started where the last ended, the first
            # at or below its cursor. Held during it: only if the read started at or below its cursor.
            held_before = poll.reads_before < self.reads_begun
            return (held_before or poll.cursor >= start and poll.changes_seen >= changes_start) and poll.answer is None

        for change_id, user_id in changes:
            for user_polls in list(self.by_user.values()) if user_id is None else [self.by_user.get(user_id, ())]:
                for poll in user_polls:
                    if covered(poll) and poll.changes_seen < change_id:
                        poll.answer = REREAD
                        answered.append(poll)
        found: dict[HeldPoll, list[str]] = {}
        for sync_id, wire, sync_groups, _ in actions:
            groups = sync_groups.split(",")  # sync group names hold no comma (models.py)
            concerned = self.by_group.get(groups[0], ()) if len(groups) == 1 else set().union(*(self.by_group.get(g, ()) for g in groups))
            for poll in concerned:
                if sync_id > poll.cursor and sync_id <= poll.cursor + poll.limit and covered(poll):
                    found.setdefault(poll, []).append(wire)
        if head > self.earliest_end:  # polls whose pages fill up with actions they may not see
            self.earliest_end = math.inf
            for poll in (poll for polls in self.by_user.values() for poll in polls if poll.answer is None):
                if head > poll.cursor + poll.limit and covered(poll):
                    found.setdefault(poll, [])
                elif poll not in found:
                    self.earliest_end = min(self.earliest_end, poll.cursor + poll.limit)
        joined: dict[tuple, bytes] = {}  # polls given the same actions share one answer: a 1 MB write to `all` is not copied per poll
        for poll, wires in found.items():
            last_sync_id, key = min(head, poll.cursor + poll.limit), tuple(map(id, wires))
            sync = joined.get(key) or joined.setdefault(key, ",".join(wires).encode())
            poll.answer = {"sync": sync, "lastSyncId": last_sync_id, "syncGroups": poll.sync_groups_json, "hasMore": last_sync_id < log_head}
        return answered + list(found)

    def watch(self) -> None:
        """For other processes' commits. PostgreSQL: every write transaction notifies at COMMIT (postgres.notify_log),
        on every app server. SQLite on Linux: after each commit writer.py touches a file; inotify tells every process."""
        if self.sqlite_file is None:
            return postgres.listen_for_commits(self.engine, lambda: self.closed, self.log_changed.set)
        try:
            while not self.closed:
                if self.inotify.read(timeout=1000) and self.count:
                    self.log_changed.set()
        finally:
            self.inotify.close()
