"""Long polls: telling held polls that the log grew, whichever process wrote to it.

A poll with wait= (app.py's sync) holds an empty answer until an action the
caller may see commits. Asking the database in a loop would cost a statement
per held poll per tick; instead every held poll of a process waits on one
condition, advanced at once by a commit of this process (app.py's mutate)
and, for other processes' commits, by one watcher thread per process.
Proved by tests/test_long_poll.py (across processes and across app servers on
PostgreSQL) and the walkthrough's long poll (tests/test_readme.py).
"""

from __future__ import annotations

import sqlite3
import threading
import time

from flask import current_app
from sqlalchemy.engine import Engine


def log_watcher() -> LogWatcher:
    return current_app.extensions["log_watcher"]


class LogWatcher:
    """Tells held polls that the log grew, whichever process wrote to it.

    A commit in this process calls `advance` at once. Commits of other
    processes are seen by one thread per process, started by the first held
    poll. On SQLite it asks `PRAGMA data_version` (a counter that changes
    when another connection commits) every `interval_s`, and only while some
    poll is held; it sleeps otherwise. On PostgreSQL it listens for the
    notification every write transaction sends at COMMIT (postgres.notify_log),
    blocked in the driver between them, and keeps those of its own schema.
    `close` releases every held poll, for a quick shutdown.
    """

    def __init__(self, engine: Engine, sqlite_file: str | None, interval_s: float):
        self.engine, self.sqlite_file, self.interval_s = engine, sqlite_file, interval_s
        self.changed = threading.Condition()
        self.head = 0
        self.waiting = 0
        self.closed = False
        self.thread: threading.Thread | None = None

    def wait_past(self, since: int, deadline: float) -> bool:
        """Wait until the head is past `since` (True), or the deadline or close comes first (False)."""
        with self.changed:
            if self.closed or time.monotonic() >= deadline:
                return False  # whatever the head says, a poll never outlives its wait
            if self.head > since:
                return True
            self.waiting += 1
            # An in-memory database has no other process to watch.
            watch = self.listen if self.engine.dialect.name == "postgresql" else self.watch if self.sqlite_file else None
            if watch and (self.thread is None or not self.thread.is_alive()):
                self.thread = threading.Thread(target=watch, name="log-watcher", daemon=True)
                self.thread.start()
            self.changed.notify_all()  # wake the watcher if it was idle
            try:
                while self.head <= since and not self.closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self.changed.wait(remaining)
                return self.head > since and not self.closed
            finally:
                self.waiting -= 1

    def advance(self, head: int) -> None:
        with self.changed:
            if head > self.head:
                self.head = head
                self.changed.notify_all()

    def close(self) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify_all()

    def listen(self) -> None:
        pooled = self.engine.raw_connection()
        listener = pooled.driver_connection
        pooled.detach()  # this one stays with the watcher
        try:
            listener.execute("LISTEN sync_log")
            schema, head = listener.execute("SELECT current_schema(), coalesce(max(id), 0) FROM sync_action").fetchone()
            self.advance(head)
            while not self.closed:
                for notification in listener.notifies(timeout=1.0):
                    # Another schema's syncIds are not this log's: counted, a held poll would spin.
                    of_schema, _, sync_id = notification.payload.rpartition(" ")
                    if of_schema == schema:
                        self.advance(int(sync_id))
        finally:
            listener.close()

    def watch(self) -> None:
        connection = sqlite3.connect(self.sqlite_file, isolation_level=None)
        try:
            version = None
            while True:
                with self.changed:
                    while not self.waiting and not self.closed:
                        self.changed.wait()
                    if self.closed:
                        return
                new_version = connection.execute("PRAGMA data_version").fetchone()[0]
                if new_version != version:
                    version = new_version
                    self.advance(connection.execute("SELECT coalesce(max(id), 0) FROM sync_action").fetchone()[0])
                with self.changed:
                    self.changed.wait(self.interval_s)  # or less, on close
        finally:
            connection.close()
