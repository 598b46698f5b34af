"""Group commit: many requests' write transactions share one COMMIT and its fsync.

In essence app.py's in_write_transaction is BEGIN IMMEDIATE; work; COMMIT.
Run that way, each mutation waits for its own fsync while every other writer
queues behind it. Here the writes that arrive while a transaction commits
wait their turn together, then share the next transaction, each inside a
savepoint of its own: a write that is refused or fails is rolled back alone,
and each one still sees the writes committed before it, as if it ran alone.
A mutation's work comes in two steps (app.py's apply_transaction): its rows,
then its sync actions. Every write of a batch applies its rows first; then
the batch takes one turn of the log's lock and appends every write's actions
at once, so the lock is held only to append and commit, never while rows wait
for their locks. On PostgreSQL, if another app server holds the log's turn when
the batch reaches it, the writes queued here by then join the batch and its turn.
Across processes, SQLite's writers queue on a file lock (WriteLock). A
transaction the database could not run now (SQLite busy; on PostgreSQL a
deadlock) is retried whole, with backoff, then refused with 503 type network,
so the client retries it later. On PostgreSQL a write of more than ALONE_OVER
changes runs in a transaction of its own, one at a time across every app
server, so that small writes neither queue behind it nor are crowded out by
several (bench/fair_writes.py).
Proved by tests/test_mutate.py (writes that wait together share one commit, a
refused one rolled back alone), tests/test_sqlite.py (the write lock at BEGIN),
tests/test_concurrency.py, tests/test_crash.py, tests/test_errors.py (busy),
tests/test_postgres.py (retries, large writes, a turn shared across processes),
tests/test_isolation.py and tests/test_portability.py (without fcntl).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import random
import threading
import time
import traceback
from collections.abc import Callable, Generator
from typing import Any, TypeVar

from machinery import postgres
from machinery.database import DbConnection, connection, flavour, is_retryable
from machinery.errors import database_busy
from machinery.event_loop import off_the_loop

try:
    import fcntl
except ImportError:  # Windows: see WriteLock
    fcntl = None

T = TypeVar("T")
ALONE_OVER = 100  # changes: on PostgreSQL a larger write takes no turn in the shared transaction (Writer.run)
MAX_BATCH = 256  # writes in one transaction, those taken in before its turn of the log included


class Writer:
    """Commits the writes of this process, one transaction at a time.

    Whichever waiting thread gets the turn first commits the whole batch; the
    others wait on a condition, not on a lock, so each one returns the moment
    its transaction has committed.
    """

    def __init__(self, sqlite_file: str | None, config: dict[str, Any], postgres: bool, append: Callable, logger):
        """`append(db_connection, [pending, ...])`: app.py's append_to_log, which returns each write's last syncId."""
        self.lock, self.append, self.logger = WriteLock(sqlite_file), append, logger
        # On SQLite only writers outside this app (a sqlite3 shell, another tool) make it busy; on PostgreSQL
        # conflicting transactions retry at once, and jitter keeps them from colliding again.
        self.postgres = postgres
        prefix = "SERIALIZATION" if postgres else "BUSY"
        self.retries, self.backoff_s, self.jitter = config[f"{prefix}_RETRIES"], config[f"{prefix}_BACKOFF_S"], postgres
        self.changed = threading.Condition()
        self.committing = False  # some thread is committing a transaction of this process
        self.queued: list[Write] = []

    def run(self, work: Callable[[DbConnection], T], changes: int = 1, alone: bool = False) -> T:
        """`alone`, on PostgreSQL: in a transaction of its own, as a large write is (compaction's batches)."""
        write = Write(work)
        if self.postgres and (changes > ALONE_OVER or alone):
            # A transaction of its own, beside the shared one: the small writes of this process neither wait for it
            # (a 1,000-change one took 0.9 s) nor share its retries. One at a time across every app server, so that
            # large writes cannot crowd the small ones out.
            with postgres.large_write_turn(connection()):
                self.commit([write], connection(), take_in=False)
            return write.outcome()
        with self.changed:
            self.queued.append(write)
            while self.committing and not write.done:
                self.changed.wait()
            if write.done:  # another thread committed it
                return write.outcome()
            self.committing = True
            batch, self.queued = self.queued[:MAX_BATCH], self.queued[MAX_BATCH:]
        try:
            if self.postgres:
                self.commit(batch, connection())  # psycopg waits for the server cooperatively
            else:  # the write lock, the busy handler and fsync would stop an event loop (event_loop.py)
                off_the_loop(self.commit, batch, connection())
        finally:
            with self.changed:
                for waiting in batch:  # never leave a thread without an answer
                    if not waiting.done:
                        waiting.fail(RuntimeError("the write transaction was interrupted"))
                self.committing = False
                self.changed.notify_all()
        return write.outcome()

    def commit(self, batch: list[Write], db_connection: DbConnection, take_in: bool = True) -> None:
        """Commits the batch, and the writes it takes in while it waits for the log (added to `batch`)."""
        for attempt in range(self.retries + 1):
            try:
                with self.lock, db_connection.pipelined() if self.postgres else contextlib.nullcontext():
                    db_connection.execute(flavour().begin_write)  # on SQLite the write lock is taken now, not at the first write
                    try:
                        for write in batch:
                            write.apply(db_connection)
                        if self.postgres and take_in:
                            self.take_in_while_waiting(batch, db_connection)
                        self.append_to_log(batch, db_connection)
                        db_connection.execute("COMMIT")  # PostgreSQL: its answer, or its error, is read as the pipeline ends
                    except BaseException:
                        if self.postgres:
                            with contextlib.suppress(Exception):
                                db_connection.settle()
                        if db_connection.in_transaction:
                            db_connection.execute("ROLLBACK")
                        raise
                for write in batch:
                    write.done = True
                return
            except Exception as error:
                if self.postgres:  # an error read as the pipeline ended, after its ROLLBACK could be sent
                    with contextlib.suppress(Exception):
                        if db_connection.in_transaction:
                            db_connection.execute("ROLLBACK")
                if not is_retryable(error):
                    for write in batch:
                        write.fail(error)
                    return
                if attempt < self.retries:
                    self.logger.warning("write transaction retried (retry %d of %d): %s", attempt + 1, self.retries, error)
            if attempt < self.retries:
                time.sleep(self.backoff_s * 2**attempt * (random.uniform(0.5, 1.5) if self.jitter else 1))
        for write in batch:
            write.fail(
                database_busy(
                    "The database stayed busy with other writers (locked, or in conflict with them); nothing was written. Retry shortly."
                )
            )

    def take_in_while_waiting(self, batch: list[Write], db_connection: DbConnection) -> None:
        """While another app server holds the log's turn, the writes queued here since this batch began apply
        their rows in it, and share its turn, rather than wait for a turn of their own after it."""
        while self.queued and len(batch) < MAX_BATCH and not postgres.try_lock_log(db_connection):
            with self.changed:
                arrived, self.queued = self.queued[: MAX_BATCH - len(batch)], self.queued[MAX_BATCH - len(batch):]
            for write in arrived:
                write.apply(db_connection)
            batch += arrived

    def append_to_log(self, batch: list[Write], db_connection: DbConnection) -> None:
        """One turn of the log's lock for the whole batch: every write's sync actions, in the order of the batch."""
        logged = [write for write in batch if write.rest is not None]
        if logged:
            for write, last_sync_id in zip(logged, self.append(db_connection, [write.pending for write in logged])):
                write.finish(last_sync_id)


class Write:
    """One caller's work in a shared write transaction, and what came of it."""

    def __init__(self, work: Callable[[DbConnection], Any]):
        self.work, self.done = work, False
        self.context = contextvars.copy_context()  # its request's, wherever the batch is committed
        self.result: Any = None
        self.error: BaseException | None = None
        self.rest: Generator | None = None  # a two-step work's second step, waiting for its syncId
        self.pending: Any = None  # what its first step gave to append to the log

    def apply(self, db_connection: DbConnection) -> None:
        """Its first step (its rows), in a savepoint; a work that is not two-step is done then."""
        db_connection.execute("SAVEPOINT write")
        self.rest = None
        try:
            outcome = self.context.run(self.work, db_connection)
            if isinstance(outcome, Generator):  # app.py's apply_transaction: its rows now, its sync actions with the batch's
                try:
                    self.pending, self.rest = self.context.run(next, outcome), outcome
                except StopIteration as answered:  # a retry, answered from its record
                    outcome = answered.value
            self.result, self.error = outcome, None
        except Exception as error:
            if settle := getattr(db_connection, "settle", None):  # PostgreSQL's pipeline: every result in, ready for ROLLBACK TO
                with contextlib.suppress(Exception):
                    settle()
            if is_retryable(error) or not db_connection.in_transaction:
                raise  # the whole transaction is retried, or SQLite rolled it back (a full disk, an I/O error)
            # Its frames let go of their cursors: on SQLite a write statement not read to its end (say, a claim
            # made before a refusal) keeps RELEASE and COMMIT from running ("SQL statements in progress").
            traceback.clear_frames(error.__traceback__)
            db_connection.execute("ROLLBACK TO SAVEPOINT write")  # undo this write, and only it
            self.result, self.error, self.rest = None, error, None
        db_connection.execute("RELEASE SAVEPOINT write")

    def finish(self, last_sync_id: int) -> None:
        """Its second step, once the log gave its actions their syncIds. It refuses nothing: its rows are applied."""
        try:
            self.context.run(self.rest.send, last_sync_id)
        except StopIteration as finished:
            self.result = finished.value
        else:
            raise RuntimeError("a two-step work yields once")

    def fail(self, error: BaseException) -> None:
        self.result, self.error, self.done = None, error, True

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


class WriteLock:
    """One writer at a time, across the processes of this server, on SQLite.

    SQLite lets only one transaction write; a second one waits in SQLite's
    busy handler, which sleeps up to 100 ms between tries, so writers of two
    processes spent most of their time asleep. Queueing on a file lock
    instead hands the turn over the moment it is free. Where there is no
    fcntl (Windows) there is no such lock: writers of several processes then
    queue in SQLite's busy handler, which is as correct, only slower. (The
    busy timeout also covers writers outside this app, like a sqlite3
    shell.) PostgreSQL needs no such lock: its writers run side by side, and
    only the step that appends to the log takes turns (app.py's lock_log).
    """

    def __init__(self, database: str | None):
        # None: in memory, or not SQLite, or no fcntl.
        self.path = f"{database}-writer.lock" if database and fcntl is not None else None
        self.file, self.pid = -1, 0

    def __enter__(self) -> None:
        if self.path is None:
            return
        if self.pid != os.getpid():  # opened after a fork, so that processes do not share it
            self.file, self.pid = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600), os.getpid()
        fcntl.flock(self.file, fcntl.LOCK_EX)

    def __exit__(self, *_) -> None:
        if self.path is not None:
            os.utime(self.file)  # after the transaction ends: the bell other processes' held polls listen for (long_poll.py)
            fcntl.flock(self.file, fcntl.LOCK_UN)


def commit_bell(bell: str | None):
    """inotify on the file that WriteLock touches after each commit, or None where there is none.
    (The write-ahead log itself is written before its commit is visible.) Imported here, after the
    gevent worker patched `select`, so that waiting for it cooperates."""
    if bell is None:
        return None
    try:
        from inotify_simple import INotify, flags
    except (ImportError, OSError, AttributeError):  # not installed, or no inotify in this C library
        return None
    os.close(os.open(bell, os.O_RDWR | os.O_CREAT, 0o600))
    inotify = INotify(nonblocking=True)
    inotify.add_watch(bell, flags.ATTRIB)
    return inotify
