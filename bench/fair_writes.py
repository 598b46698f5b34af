"""Fair writes: how long one request may hold the write lock, and what that costs others' writes.

    python bench/fair_writes.py              # about a minute and a half; bench/run.py prints it as row 9
    python bench/fair_writes.py --smoke      # seconds long: only proves it works
    python bench/fair_writes.py --postgres   # on BENCH_DATABASE_URL or TEST_DATABASE_URL

Every write waits its turn for one lock: on SQLite the app's file lock, then BEGIN IMMEDIATE
(machinery/writer.py); on PostgreSQL the log's advisory lock (app.py's lock_log), from the moment
its rows are written (or its memberships announced) to COMMIT. The limits bound how long one request holds it:
MAX_CHANGES, the 1 MiB body, MAX_STRING_BYTES, MAX_ROW_BYTES, MAX_TRANSACTION_BYTES
(machinery/input.py); a refused request holds it until the change that passes a limit. On one
server started as bench/run.py starts its servers (tests/servers.py's gunicorn, gunicorn.conf.py),
on a database seeded as bench/connected.py seeds it:

(a) each of SHAPES, the largest requests the limits allow, is sent alone a few times while
    another process takes the lock again and again as a server process would: its longest
    wait is the longest the request held the lock (less the 1 ms it sleeps between turns);
(b) bench/connected.py's writer (20 one-change mutations a second to groups, 1 to `all`, each
    timed from when it was due) runs alone, then while HEAVY_SENDERS client(s) send the shape
    that held the lock longest (Group creates aside), back to back.
Measured, never asserted.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import multiprocessing
import os
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from app import MAX_CHANGES  # noqa: E402
from bench import connected  # noqa: E402
from bench.run import Client, add_postgres_option, drop_postgres_schemas, libpq, percentile, postgres_url  # noqa: E402
from machinery.input import LIMITS  # noqa: E402
from machinery.postgres import LOG_LOCK  # noqa: E402
from machinery.writer import WriteLock  # noqa: E402
from servers import WORKERS, Gunicorn  # noqa: E402

BODY_BYTES = LIMITS["MAX_CONTENT_LENGTH"]
HEAVY_SENDERS = 1  # one client sending the largest requests back to back (--senders N for more); sender k is
# connected.seed's client k, in group g<k>, writing Todos by its own Author heavy<k>


# --- The largest requests the limits allow ----------------------------------------------------


def todo(todo_id: str, k: int, text: str, like_count: int = 0) -> dict:
    data = {"id": todo_id, "text": text, "authorId": f"heavy{k}", "groupId": f"g{k}", "isDone": False, "likeCount": like_count}
    return {"action": "create", "modelName": "Todo", "modelId": todo_id, "data": data}


def todo_of_row_bytes(todo_id: str, k: int, size: int) -> dict:
    """A Todo whose row, as its sync action stores it, is `size` bytes while likeCount has 4 digits."""
    empty = len(json.dumps(todo(todo_id, k, "", 1000)["data"], separators=(",", ":")))
    return todo(todo_id, k, "x" * (size - empty), 1000)


def likes(todo_id: str) -> list[dict]:
    # 4-digit counts, so that every update's row is the same size
    return [{"action": "update", "modelName": "Todo", "modelId": todo_id, "data": {"likeCount": 1000 + n}} for n in range(MAX_CHANGES)]


PER_CHANGE = LIMITS["MAX_TRANSACTION_BYTES"] // MAX_CHANGES  # 1,048 bytes: 1,000 such rows just fit
STRING = LIMITS["MAX_STRING_BYTES"]
FILLER = BODY_BYTES // MAX_CHANGES - 200  # a create's other ~180 bytes of JSON take the rest of the body


def setup(k: int) -> list[dict]:
    """Sender k's Author, and its Todos for the update shapes. A Todo's row holds one free string
    (text, at most MAX_STRING_BYTES), so no row of this app comes near MAX_ROW_BYTES (64 KiB)."""
    author = {"action": "create", "modelName": "Author", "modelId": f"heavy{k}", "data": {"id": f"heavy{k}", "name": "Heavy"}}
    return [author, todo_of_row_bytes(f"fits{k}", k, PER_CHANGE), todo_of_row_bytes(f"over{k}", k, PER_CHANGE + 1), todo(f"big{k}", k, "x" * STRING)]


GROUP_CREATES = f"{MAX_CHANGES:,} creates of Groups (each a sync group its creator joins)"
# name: the changes of one request of sender k, given a prefix that keeps its ids unique
SHAPES = {
    f"{MAX_CHANGES:,} creates of small Todos": lambda p, k: [todo(f"{p}-{n}", k, "Small") for n in range(MAX_CHANGES)],
    f"{MAX_CHANGES:,} creates of {FILLER:,}-byte Todos (a body just under 1 MiB)":
        lambda p, k: [todo(f"{p}-{n}", k, "x" * FILLER) for n in range(MAX_CHANGES)],
    f"{MAX_CHANGES:,} updates of a {PER_CHANGE:,}-byte Todo (rows just under MAX_TRANSACTION_BYTES)": lambda p, k: likes(f"fits{k}"),
    f"{MAX_CHANGES:,} updates of a {PER_CHANGE + 1:,}-byte Todo (413 at the last change)": lambda p, k: likes(f"over{k}"),
    f"{MAX_CHANGES:,} updates of a {STRING // 1024} KiB Todo (413 at the 32nd change)": lambda p, k: likes(f"big{k}"),
    f"31 creates of {STRING // 1024} KiB Todos (a body just under 1 MiB)": lambda p, k: [todo(f"{p}-{n}", k, "x" * STRING) for n in range(31)],
    # last: its sender stays a member of every group it made, which later requests of its own read
    GROUP_CREATES: lambda p, k: [
        {"action": "create", "modelName": "Group", "modelId": f"{p}-{n}", "data": {"id": f"{p}-{n}", "name": "G"}} for n in range(MAX_CHANGES)
    ],
}


def body(changes: list[dict]) -> bytes:
    encoded = json.dumps({"changes": changes}, separators=(",", ":")).encode()
    assert len(encoded) <= BODY_BYTES, f"{len(encoded):,} bytes: over the body limit"
    return encoded


def post(client: Client, encoded: bytes) -> tuple[str, float]:
    """The answer's code ('200' or the error's) and the seconds it took."""
    started = time.perf_counter()
    try:
        client.connection.request("POST", "/mutate", body=encoded, headers=client.headers)
        response = client.connection.getresponse()
        answer = response.read()
    except OSError as error:
        client.connection.close()  # http.client reconnects on the next request
        return type(error).__name__, time.perf_counter() - started
    code = "200" if response.status == 200 else json.loads(answer)["error"]["code"]
    return code, time.perf_counter() - started


# --- The lock, watched from another process -------------------------------------------------


def take_lock(url: str):
    """A function that takes the write lock and lets it go, as a server process does."""
    if url.startswith("postgresql"):
        connection = psycopg.connect(libpq(url), autocommit=True)

        def once() -> None:
            try:
                with connection.transaction():
                    connection.execute("SELECT pg_advisory_xact_lock(%s)", (LOG_LOCK,))
            except psycopg.errors.DeadlockDetected:
                pass  # its turn came in a deadlock of the server's transactions (a row lock against the log's): it waited that long

        return once
    path = url.removeprefix("sqlite:///")
    lock_file, connection = os.open(WriteLock(path).path, os.O_RDWR | os.O_CREAT, 0o600), sqlite3.connect(path, isolation_level=None, timeout=60)

    def once() -> None:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # the app's file lock, then SQLite's
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("ROLLBACK")
        fcntl.flock(lock_file, fcntl.LOCK_UN)

    return once


def watch_lock(url: str, pipe) -> None:
    """Take the write lock again and again; answer each message with the longest wait since the last one."""
    once, longest = take_lock(url), 0.0
    while True:
        if pipe.poll():
            if pipe.recv() == "stop":
                return
            pipe.send(longest)
            longest = 0.0
        started = time.perf_counter()
        once()
        longest = max(longest, time.perf_counter() - started)
        time.sleep(0.001)  # a lock whose waiters do not queue (flock): a server process waiting gets its turn


def longest_wait(pipe) -> float:
    pipe.send("read")
    if not pipe.poll(120):
        raise RuntimeError("the lock watcher stopped answering")
    return pipe.recv()


# --- The measurement --------------------------------------------------------------------------


def postgres_schema(base_url: str) -> str:
    """A new, empty schema (bench/run.py's drop_postgres_schemas drops it); its URL."""
    schema = f"loco_bench_fair_{os.getpid()}"
    with psycopg.connect(libpq(base_url), autocommit=True) as admin:
        admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        admin.execute(f"CREATE SCHEMA {schema}")
    return make_url(base_url).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)


def measure(directory: Path, seconds: float = 30, tries: int = 3, postgres: str | None = None, senders: int = HEAVY_SENDERS) -> dict:
    """postgres: the URL of a PostgreSQL database to make a schema in, or None for a SQLite file in `directory`."""
    url = postgres_schema(postgres) if postgres else f"sqlite:///{directory / 'fair-writes.sqlite3'}"
    writer_token, users, _ = connected.seed(url, senders)
    server = Gunicorn(url, directory / "fair-writes.log", workers=WORKERS, app="app:create_app()")  # as bench/run.py's
    context = multiprocessing.get_context("spawn")  # the writer and the watcher: no GIL shared with the heavy senders' JSON
    pipe, watcher_end = context.Pipe()
    watcher = context.Process(target=watch_lock, args=(url, watcher_end))
    server.start()
    try:
        clients = [Client(server.url, token) for token, _ in users]
        for k, client in enumerate(clients):
            for change in setup(k):
                answer, _ = post(client, body([change]))
                assert answer == "200", f"setup refused: {answer}"
        watcher.start()
        shapes = {}
        for name, changes in SHAPES.items():  # (a): each alone, the server otherwise idle
            holds, times, answers = [], [], set()
            for n in range(tries):
                encoded = body(changes(f"alone{len(shapes)}-{n}", 0))
                longest_wait(pipe)
                answer, took = post(clients[0], encoded)
                time.sleep(0.05)  # the watcher's turn after the commit
                holds.append(longest_wait(pipe))
                times.append(took)
                answers.add(answer)
            shapes[name] = {"hold_ms": max(holds) * 1000, "request_ms": sorted(times)[len(times) // 2] * 1000, "answers": sorted(answers)}
        worst = max(shapes, key=lambda name: shapes[name]["hold_ms"])
        # Sent back to back, Group creates would measure how many groups their sender is in (each request adds
        # 1,000 memberships, which its later ones read under the lock) as much as the request itself.
        heavy = max((name for name in shapes if name != GROUP_CREATES), key=lambda name: shapes[name]["hold_ms"])

        def writes() -> dict:
            results = context.Queue()
            writer = context.Process(target=connected.write, args=(server.url, writer_token, seconds, connected.WRITES_PER_S["all"], results))
            writer.start()
            done = results.get(timeout=seconds + 120)
            writer.join()
            late = [answered - due for _, _, due, answered in done]
            return {"p50_ms": percentile(late, 50) * 1000, "p99_ms": percentile(late, 99) * 1000, "max_ms": max(late) * 1000,
                    "count": len(done), "failed": sum(sync_id is None for sync_id, *_ in done)}

        alone = writes()  # (b): the same writes, without and then with heavy senders
        stop, heavy_answers = threading.Event(), []

        def send_heavy(k: int) -> None:
            n = 0
            while not stop.is_set():
                heavy_answers.append(post(clients[k], body(SHAPES[heavy](f"heavy{k}-{n}", k)))[0])
                n += 1

        threads = [threading.Thread(target=send_heavy, args=(k,)) for k in range(senders)]
        for sender in threads:
            sender.start()
        time.sleep(1)  # every sender under way
        longest_wait(pipe)
        loaded = writes()
        loaded_hold = longest_wait(pipe)
        stop.set()
        for sender in threads:
            sender.join()
    finally:
        if watcher.is_alive():
            pipe.send("stop")
            watcher.join(timeout=10)
        server.stop()
    return {"shapes": shapes, "worst": worst, "heavy": heavy, "alone": alone, "loaded": loaded, "seconds": seconds, "loaded_hold_ms": loaded_hold * 1000,
            "senders": senders,
            "heavy_answers": {answer: heavy_answers.count(answer) for answer in sorted(set(heavy_answers))}}


def report(result: dict) -> str:
    lines = ["(a) Each shape alone on an idle server: the longest it held the write lock (another process's longest wait for it),"
             " and the median time of the request"]
    for name, shape in result["shapes"].items():
        lines.append(f"  {shape['hold_ms']:6,.0f} ms held, {shape['request_ms']:6,.0f} ms request ({', '.join(shape['answers'])}): {name}")
    lines.append(f"(b) bench/connected.py's writer, 21 one-change mutations a second for {result['seconds']:g} s, timed from when each was due")
    for label, key in (("alone", "alone"), (f"while {result['senders']} client(s) send '{result['heavy']}' back to back", "loaded")):
        figures = result[key]
        lines.append(f"  {label}: p50 {figures['p50_ms']:,.1f} ms, p99 {figures['p99_ms']:,.1f} ms, max {figures['max_ms']:,.1f} ms"
                     f" ({figures['count']:,} mutations, {figures['failed']} failed)")
    answers = ", ".join(f"{count:,} × {answer}" for answer, count in result["heavy_answers"].items())
    lines.append(f"  heavy requests answered: {answers}; the longest the lock was held meanwhile: {result['loaded_hold_ms']:,.0f} ms")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="seconds long: only proves the script works")
    add_postgres_option(parser)
    parser.add_argument("--senders", type=int, default=HEAVY_SENDERS, help="clients sending the heavy requests back to back")
    options = parser.parse_args()
    postgres = postgres_url(parser, options)
    with tempfile.TemporaryDirectory(prefix="loco-fair-") as directory:
        try:
            result = measure(Path(directory), *((2, 1) if options.smoke else (30, 3)), postgres, options.senders)
        finally:
            if postgres:
                drop_postgres_schemas(postgres)
    print(report(result))


if __name__ == "__main__":
    main()
