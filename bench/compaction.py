"""Compaction: `flask compact-log` shortening a long log under load, and what a client far behind gets.

    python bench/compaction.py                # a 1,000,000-action log, about a minute and a half; bench/run.py's rows 11a and 11b
    python bench/compaction.py --postgres     # on BENCH_DATABASE_URL or TEST_DATABASE_URL; bench/run.py's rows 11c and 11d
    python bench/compaction.py --smoke        # a 20,000-action log, seconds long: only proves it works

One server, started as bench/run.py starts its servers (tests/servers.py's gunicorn, 4 gevent workers,
gunicorn.conf.py), on a database seeded with the app's own functions (machinery/cli.py's seed_demo: Ada
in group:g1 and group:g2, Grace in group:g1; new_user and join for the pollers), then given a long history
by direct inserts, as bench/run.py's add_history does: `todos` Todos in g1 and g2, each inserted and then
updated again and again, one sync action and one client transaction (with its baseSyncId) per change,
the todos table holding each Todo as its last action left it.

(a) A client whose cursor is `behind` actions behind the head makes its handshake (GET /sync) and
    reads every action up to the head by pages (GET /sync?since=N&until=head, following hasMore):
    time, requests, bytes.
(b) 16 clients write one-change updates of a Todo of their own (each with a transactionId and a
    baseSyncId, the newest syncId the client has seen), each as soon as its last was answered; a 503
    or a cut connection is retried under the same transactionId, its latency counted from the first
    try. 8 clients poll (GET /sync?since=N&wait=25, each following the log from its cursor: 3 in g1,
    3 in g2, 2 in both). After a warm-up and a baseline, `flask --app app compact-log --before F`
    runs as an operator runs it, a process of its own, F the head less `keep` - 1 (the log keeps its
    last `keep` actions, and what is written meanwhile); the writes go on a little, then stop.
    Reported: how long the command took; the longest mutation latency while it ran against the
    longest before it in the same run (and p99, the rate, and the longest time in which no mutation
    at all was answered: every writer waiting at once); and whether nothing was lost: each poller
    received exactly the syncIds answered 200 of its groups, in order, once each, and the log then
    holds exactly the actions above its new start (counted), with their group links, and none of
    the client transactions at or below it.
(c) The same client, same cursor, after: its handshake and delta (now a 409 bootstrap_again, reason
    compacted), then an eager bootstrap of Author, Group and Todo: time and bytes.
Measured, never asserted.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from app import create_app, in_write_transaction, join  # noqa: E402
from bench.run import Client, add_postgres_option, drop_postgres_schemas, libpq, percentile, postgres_url  # noqa: E402
from machinery.cli import new_user, seed_demo  # noqa: E402
from models import db  # noqa: E402
from servers import WORKERS, Gunicorn  # noqa: E402

WRITERS, POLLERS = 16, 8
POLLER_GROUPS = [["group:g1"]] * 3 + [["group:g2"]] * 3 + [["group:g1", "group:g2"]] * 2
WAIT_S = 25
FULL = dict(actions=1_000_000, todos=100_000, behind=100_000, keep=1_000, warm_up_s=1, baseline_s=10, after_s=3, tries=3)
SMOKE = dict(actions=20_000, todos=2_000, behind=2_000, keep=1_000, warm_up_s=0.5, baseline_s=2, after_s=1, tries=1)


# --- The database: the app's own seed, then a long history by direct inserts -------------------


def postgres_schema(base_url: str) -> str:
    """A new, empty schema (bench/run.py's drop_postgres_schemas drops it); its URL."""
    schema = f"loco_bench_compaction_{os.getpid()}"
    with psycopg.connect(libpq(base_url), autocommit=True) as admin:
        admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        admin.execute(f"CREATE SCHEMA {schema}")
    return make_url(base_url).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)


def seed(url: str) -> dict:
    """The demo's users and rows (Ada writes and catches up), and a poller user for each of POLLER_GROUPS."""
    app = create_app({"SQLALCHEMY_DATABASE_URI": url})

    def pollers(db_connection):
        made = []
        for n, groups in enumerate(POLLER_GROUPS):
            user_id, token = new_user(db_connection, f"poller {n}")
            for group in groups:
                join(db_connection, user_id, group)
            made.append((token, groups))
        return made

    with app.app_context():
        tokens, _ = seed_demo()
        users = in_write_transaction(pollers)
        db.engine.dispose()
    (ada,) = Database(url).query("SELECT id FROM users WHERE name = 'Ada'")[0]
    return {"ada": tokens["Ada"], "ada_id": ada, "pollers": users}


def todo_group(n: int) -> str:
    return f"g{1 + n % 2}"


def history_rows(first: int, actions: int, todos: int, ada: int):
    """The todos table's rows; and per action, its sync_action row, its group link and its client_transaction row
    (a transaction of Ada's, whose client had seen the action before). Action n < todos inserts Todo b<n>; later
    ones update Todo b<n % todos>, its likeCount the round n // todos. One action a second, up to now."""
    now = int(time.time())

    def todo(n: int, like_count: int) -> dict:
        return {"id": f"b{n}", "text": f"Todo number {n}", "authorId": "a1", "groupId": todo_group(n), "isDone": False, "likeCount": like_count}

    todo_rows = [(f"b{n}", f"Todo number {n}", "a1", todo_group(n), False, (actions - 1 - n) // todos) for n in range(todos)]

    def actions_of():
        for n in range(actions):
            sync_id, k = first + n, n % todos
            data = json.dumps(todo(k, n // todos), separators=(",", ":"))
            yield ((sync_id, "insert" if n < todos else "update", "Todo", f"b{k}", data, now - actions + n),
                   (f"group:{todo_group(k)}", sync_id), (ada, f"h{n}", "0" * 64, sync_id, sync_id - 1))

    return todo_rows, actions_of()


COLUMNS = {  # of each table the history fills, in history_rows's order
    "todos": ["id", "text", "author_id", "group_id", "is_done", "like_count"],
    "sync_action": ["id", "action", "model_name", "model_id", "data", "created_at"],
    "sync_action_group": ["sync_group", "sync_action_id"],
    "client_transaction": ["user_id", "transaction_id", "changes_sha256", "last_sync_id", "base_sync_id"],
}
LOG_TABLES = ("sync_action", "sync_action_group", "client_transaction")


def add_history_sqlite(path: str, actions: int, todos: int, ada: int) -> int:
    """Append the history straight to the log, as bench/run.py's add_history does; returns the head."""
    connection = sqlite3.connect(path, isolation_level=None)
    insert = {table: f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})" for table, names in COLUMNS.items()}
    connection.execute("BEGIN IMMEDIATE")
    (first,) = connection.execute("SELECT coalesce(max(id), 0) + 1 FROM sync_action").fetchone()
    todo_rows, rows = history_rows(first, actions, todos, ada)
    connection.executemany(insert["todos"], todo_rows)
    while batch := [row for _, row in zip(range(50_000), rows)]:
        for n, table in enumerate(LOG_TABLES):
            connection.executemany(insert[table], [row[n] for row in batch])
    connection.execute("COMMIT")
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # as a server that ran a while would have it
    connection.close()
    return first + actions - 1


def add_history_postgres(url: str, actions: int, todos: int, ada: int) -> int:
    """The same with COPY; then the id sequence moved past it, VACUUM ANALYZE as autovacuum would have it, and a
    CHECKPOINT, so that the seed's writes are not flushed in the middle of the measurement."""
    with psycopg.connect(libpq(url), autocommit=True) as connection:
        (first,) = connection.execute("SELECT coalesce(max(id), 0) + 1 FROM sync_action").fetchone()
        todo_rows, rows = history_rows(first, actions, todos, ada)
        rows = list(rows)
        with connection.transaction(), connection.cursor() as cursor:
            for table, table_rows in [("todos", todo_rows), *((table, [row[n] for row in rows]) for n, table in enumerate(LOG_TABLES))]:
                with cursor.copy(f"COPY {table} ({', '.join(COLUMNS[table])}) FROM STDIN") as copy:
                    for row in table_rows:
                        copy.write_row(row)
            head = first + actions - 1
            cursor.execute("SELECT setval(pg_get_serial_sequence('sync_action', 'id'), %s)", (head,))
        for table in COLUMNS:
            connection.execute(f"VACUUM ANALYZE {table}")
        try:
            connection.execute("CHECKPOINT")
        except psycopg.errors.InsufficientPrivilege:
            pass
    return head


class Database:
    """Reads of the database behind the server's back: the head, and what the log holds after compaction."""

    def __init__(self, url: str):
        self.postgres = url.startswith("postgresql")
        self.url = url

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        if self.postgres:
            with psycopg.connect(libpq(self.url), autocommit=True) as connection:
                return connection.execute(sql.replace("?", "%s"), params).fetchall()
        with sqlite3.connect(self.url.removeprefix("sqlite:///"), timeout=30) as connection:
            return connection.execute(sql, params).fetchall()

    def head(self) -> int:
        return self.query("SELECT coalesce(max(id), 0) FROM sync_action")[0][0]


# --- The clients: writers and pollers, each set a process of its own -----------------------------


def writers_process(url: str, token: str, todo_ids: list[str], since: int, stop, results) -> None:
    """WRITERS clients, one a thread: each updates its own Todo in a loop, each as soon as its last was
    answered. Puts, per mutation: (first sent, answered 200, syncId, Todo id, tries, codes of the tries refused)."""
    done: list[list[tuple]] = [[] for _ in todo_ids]

    def write(k: int) -> None:
        client, n, seen = Client(url, token), 0, since
        while not stop.is_set():
            n += 1
            change = {"action": "update", "modelName": "Todo", "modelId": todo_ids[k], "data": {"likeCount": 1_000_000 + n}}
            # baseSyncId: the newest syncId this client has seen, as a client sends it (its record is then pruned with the log)
            body = {"transactionId": f"w{k}-{n}", "baseSyncId": seen, "changes": [change]}
            sent, tries, refused = time.monotonic(), 0, []
            while True:
                tries += 1
                try:
                    status, answer = client.request("POST", "/mutate", body)
                except (OSError, http.client.HTTPException) as error:
                    client.connection.close()  # http.client connects again on the next request
                    status, answer = type(error).__name__, b""
                if status == 200:
                    seen = json.loads(answer)["lastSyncId"]
                    done[k].append((sent, time.monotonic(), seen, todo_ids[k], tries, refused))
                    break
                refused.append(json.loads(answer)["error"]["code"] if status == 503 else str(status))
                if (status != 503 and not isinstance(status, str)) or tries == 100:  # a refusal that retrying cannot mend
                    done[k].append((sent, time.monotonic(), None, todo_ids[k], tries, refused))
                    break
                time.sleep(0.05)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(len(todo_ids))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    times = os.times()
    results.put((done, times.user + times.system))


def pollers_process(url: str, users: list[tuple[str, list[str]]], since: int, cursors, ending, final_head, results) -> None:
    """POLLERS clients, one a thread: each holds GET /sync?since=N&wait=25 and polls again as soon as it is
    answered, until `ending` is set and its cursor has reached `final_head` (then without wait=). Puts,
    per poller: the syncIds it received, in the order received; its pages; the refusals it got."""
    received: list[list[int]] = [[] for _ in users]
    pages, refusals = [0] * len(users), [dict() for _ in users]

    def poll(j: int) -> None:
        client, cursor = Client(url, users[j][0]), since
        while not (ending.is_set() and final_head.value and cursor >= final_head.value):
            path = f"/sync?since={cursor}" + ("" if ending.is_set() else f"&wait={WAIT_S}")
            try:
                status, body = client.request("GET", path)
            except (OSError, http.client.HTTPException) as error:
                client.connection.close()
                refusals[j][type(error).__name__] = refusals[j].get(type(error).__name__, 0) + 1
                time.sleep(0.05)
                continue
            if status != 200:
                code = json.loads(body)["error"]["code"]
                refusals[j][code] = refusals[j].get(code, 0) + 1
                if status == 503:
                    time.sleep(0.05)
                    continue
                break  # a 409 (bootstrap_again) or worse: this client would start over; the row says so
            page = json.loads(body)
            received[j].extend(action["syncId"] for action in page["sync"])
            cursor = cursors[j] = page["lastSyncId"]
            pages[j] += 1

    threads = [threading.Thread(target=poll, args=(j,)) for j in range(len(users))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    times = os.times()
    results.put((received, pages, refusals, times.user + times.system))


# --- Catch-up: a client far behind ------------------------------------------------------------------


def catch_up(url: str, token: str, cursor: int) -> dict:
    """The handshake, then every action from `cursor` to the head by pages; or, when the log no longer
    reaches back that far, the refusal and an eager bootstrap."""
    client, requests, size = Client(url, token), 0, 0

    def get(path: str) -> tuple[int, bytes]:
        nonlocal requests, size
        status, body = client.request("GET", path)
        requests, size = requests + 1, size + len(body)
        return status, body

    started = time.perf_counter()
    status, body = get("/sync")
    assert status == 200, body
    head, since, actions = json.loads(body)["lastSyncId"], cursor, 0
    while True:
        status, body = get(f"/sync?since={since}&until={head}")
        if status != 200:
            break
        page = json.loads(body)
        actions += len(page["sync"])
        since = page["lastSyncId"]
        if not page["hasMore"]:
            return {"kind": "delta", "seconds": time.perf_counter() - started, "requests": requests, "bytes": size, "actions": actions}
    refused = {"seconds": time.perf_counter() - started, "requests": requests, "bytes": size, "status": status,
               "error": json.loads(body)["error"]}
    started, requests, size = time.perf_counter(), 0, 0
    status, body = get("/bootstrap?type=eager&models=Author,Group,Todo")
    assert status == 200, body[:300]
    rows = sum(len(model_rows) for model_rows in json.loads(body)["bootstrap"].values())
    return {"kind": "bootstrap", "refused": refused, "seconds": time.perf_counter() - started, "bytes": size, "rows": rows}


def median_of(tries: int, measure) -> dict:
    """The try of median time."""
    results = sorted((measure() for _ in range(tries)), key=lambda result: result["seconds"])
    return results[len(results) // 2]


# --- The measurement --------------------------------------------------------------------------------


def compact_command(url: str, before: int) -> tuple[float, str, bool]:
    """`flask --app app compact-log --before F` as an operator runs it: its own process, DATABASE_URL naming the
    database. Returns when it started, what it said (or its error's last line), and whether it succeeded."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "flask", "--app", "app", "compact-log", "--before", str(before)], cwd=ROOT,
                          env={**os.environ, "DATABASE_URL": url}, capture_output=True, text=True)
    if done.returncode:  # measured as it is: the row says so, and "nothing lost" is then missed
        print(f"compact-log failed:\n{done.stdout}{done.stderr}", file=sys.stderr)
        error = [line for line in done.stderr.splitlines() if "Error" in line or "error" in line]
        return started, f"compact-log FAILED: {(error or done.stderr.splitlines() or ['exit ' + str(done.returncode)])[-1].strip()}", False
    return started, done.stdout.strip(), True


def start_up_seconds(url: str) -> float:
    """What any flask command pays before it works: Python, the app's imports, create_app."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "flask", "--app", "app", "compact-log", "--help"], cwd=ROOT,
                   env={**os.environ, "DATABASE_URL": url}, capture_output=True, check=True)
    return time.monotonic() - started


def measure(directory: Path, size: dict, postgres: str | None = None, progress=lambda text: None) -> dict:
    """postgres: the URL of a PostgreSQL database to make a schema in, or None for a SQLite file in `directory`."""
    url = postgres_schema(postgres) if postgres else f"sqlite:///{directory / 'compaction.sqlite3'}"
    progress(f"compaction ({'PostgreSQL' if postgres else 'SQLite'}): seeding a log of {size['actions']:,} actions")
    seeded = seed(url)
    database = Database(url)
    seeding = time.monotonic()
    if postgres:
        head = add_history_postgres(url, size["actions"], size["todos"], seeded["ada_id"])
    else:
        head = add_history_sqlite(url.removeprefix("sqlite:///"), size["actions"], size["todos"], seeded["ada_id"])
    seeding = time.monotonic() - seeding
    (count,) = database.query("SELECT count(*) FROM sync_action")[0]
    assert count == head, f"the seeded log has gaps: {count:,} actions up to {head:,}"
    cursor = head - size["behind"]

    server = Gunicorn(url, directory / "compaction.log", workers=WORKERS, app="app:create_app()")  # as bench/run.py's
    context = multiprocessing.get_context("spawn")  # the writers and pollers: no GIL shared with each other, or with this process
    stop_writing, ending = context.Event(), context.Event()
    cursors, final_head = context.Array("q", [head] * POLLERS), context.Value("q", 0)
    written, polled = context.Queue(), context.Queue()
    # Writer k's Todo, in g1 for even k and g2 for odd: spread over the table, as different clients' rows are (on
    # PostgreSQL, neighbours on one index page make serializable transactions conflict far more often)
    todo_ids = [f"b{k * (size['todos'] // WRITERS) // 2 * 2 + k % 2}" for k in range(WRITERS)]
    server.start()
    writers = context.Process(target=writers_process, args=(server.url, seeded["ada"], todo_ids, head, stop_writing, written))
    pollers = context.Process(target=pollers_process, args=(server.url, seeded["pollers"], head, cursors, ending, final_head, polled))
    try:
        progress(f"compaction: a client {size['behind']:,} actions behind catches up; then {WRITERS} writers and {POLLERS} pollers")
        caught_up = median_of(size["tries"], lambda: catch_up(server.url, seeded["ada"], cursor))
        pollers.start()
        time.sleep(1)  # every poll held
        writers.start()
        started = time.monotonic()
        time.sleep(size["warm_up_s"] + size["baseline_s"])
        at_start = database.head()
        # Keep the last KEEP actions; never compact past a poller (it would have to bootstrap again), as an operator would not
        before = min(at_start - size["keep"] + 1, min(cursors) + 1)
        progress(f"compaction: compact-log --before {before:,} while they run")
        compaction_started, output, compacted = compact_command(url, before)
        compaction_ended = time.monotonic()
        time.sleep(size["after_s"])
        stop_writing.set()
        stopped = time.monotonic()
        done, writers_cpu = written.get(timeout=120)
        mutations = [record for records in done for record in records]
        writers.join()
        ending.set()  # no poll waits from here on; these wake those held
        closing = Client(server.url, seeded["ada"])
        for k in (0, 1):  # b0 is in g1, b1 in g2
            change = {"action": "update", "modelName": "Todo", "modelId": f"b{k}", "data": {"likeCount": 7}}
            sent = time.monotonic()
            status, answer = closing.request("POST", "/mutate", {"changes": [change]})
            assert status == 200, answer
            mutations.append((sent, time.monotonic(), json.loads(answer)["lastSyncId"], f"b{k}", 1, []))
        final_head.value = database.head()
        received, pages, poll_refusals, pollers_cpu = polled.get(timeout=120)
        pollers.join()
        log = check_log(database, before - 1, head, mutations)
        startup = start_up_seconds(url)
        progress("compaction: the same client, after")
        bootstrapped = median_of(size["tries"], lambda: catch_up(server.url, seeded["ada"], cursor))
    finally:
        stop_writing.set()
        ending.set()
        server.stop()
        for process in (writers, pollers):
            if process.pid is not None and process.is_alive():
                process.kill()
    result = summarize(size, seeding, head, at_start, before, output, started, compaction_started, compaction_ended, startup,
                       mutations, received, pages, poll_refusals, log, caught_up, bootstrapped, postgres is not None)
    # the verdict: compacted, and nothing lost (by the clients, nor in the log, which holds exactly the actions above its start)
    result["nothing_lost"] = compacted and result["clients_intact"] and result["log"]["exact"]
    return result | {"compacted": compacted, "load_generator_cpu_s": writers_cpu + pollers_cpu, "load_s": stopped - started}


def check_log(database: Database, floor: int, seeded_head: int, mutations: list[tuple]) -> dict:
    """What the log holds after compaction to `floor` (its new start): nothing at or below it, and exactly the
    actions above it: the seeded ones (syncIds up to seeded_head, none missing) and every acknowledged one."""
    acknowledged = {sync_id for _, _, sync_id, *_ in mutations if sync_id is not None and sync_id > floor}
    written = {sync_id for (sync_id,) in database.query("SELECT id FROM sync_action WHERE id > ?", (max(floor, seeded_head),))}
    (below,), (held,), (links_below,), (links,), (start,) = (database.query(sql, params)[0] for sql, params in [
        ("SELECT count(*) FROM sync_action WHERE id <= ?", (floor,)),
        ("SELECT count(*) FROM sync_action WHERE id > ?", (floor,)),
        ("SELECT count(*) FROM sync_action_group WHERE sync_action_id <= ?", (floor,)),
        ("SELECT count(*) FROM sync_action_group WHERE sync_action_id > ?", (floor,)),
        ("SELECT coalesce((SELECT after_sync_id FROM sync_log_start), 0)", ()),
    ])
    # compact-log prunes the records that carry a baseSyncId (every one here); those without are kept, for their retries
    at_or_below = "SELECT count(*) FROM client_transaction WHERE last_sync_id <= ? AND base_sync_id IS NOT NULL"
    (transactions_at_or_below,) = database.query(at_or_below, (floor,))[0]
    expected = max(0, seeded_head - floor) + len(acknowledged)  # the seeded log has no gap (measure checks it)
    exact = below == links_below == transactions_at_or_below == 0 and held == expected == links and start == floor and written == acknowledged
    return {"below": below, "held": held, "expected": expected, "links_below": links_below, "links": links, "start": start,
            "transactions_at_or_below": transactions_at_or_below, "exact": exact}


def summarize(size, seeding, head, at_start, before, output, started, compaction_started, compaction_ended, startup,
              mutations, received, pages, poll_refusals, log, caught_up, bootstrapped, postgres) -> dict:
    answered = [m for m in mutations if m[2] is not None]
    measured_from = started + size["warm_up_s"]  # a new server's first requests are slow, in every run alike

    answers = sorted(m[1] for m in answered)

    def window(records: list[tuple], since: float, until: float) -> dict:
        latencies = [answered_at - sent for sent, answered_at, *_ in records]
        # The longest time in the window in which no mutation at all was answered: every writer waiting at once
        moments = [since, *(t for t in answers if since < t < until), until]
        return {"count": len(records), "per_s": len(records) / (until - since) if until > since else 0.0,
                "max_ms": max(latencies, default=0) * 1000, "p99_ms": percentile(latencies, 99) * 1000 if latencies else 0.0,
                "p50_ms": percentile(latencies, 50) * 1000 if latencies else 0.0,
                "silence_ms": max(b - a for a, b in zip(moments, moments[1:])) * 1000}

    # Before: answered before the command started. During: waiting at any moment while it ran.
    baseline = window([m for m in answered if m[0] >= measured_from and m[1] <= compaction_started], measured_from, compaction_started)
    during = window([m for m in answered if m[1] > compaction_started and m[0] < compaction_ended], compaction_started, compaction_ended)
    # Each poller should have received exactly the acknowledged syncIds of its groups, in order, each once.
    group_of = {m[2]: f"group:{todo_group(int(m[3][1:]))}" for m in answered}
    pollers_exact, problems = 0, []
    for n, (got, groups) in enumerate(zip(received, POLLER_GROUPS)):
        expected = sorted(sync_id for sync_id, group in group_of.items() if group in groups)
        if got == expected:
            pollers_exact += 1
            continue
        missing, extra = set(expected) - set(got), set(got) - set(expected)
        problems.append(f"poller {n}: {len(missing)} missing, {len(extra)} not its own, {len(got) - len(set(got))} twice, "
                        f"{'in order' if got == sorted(got) else 'out of order'}")
    refused: dict[str, int] = {}
    for m in mutations:
        for code in m[5]:
            refused[code] = refused.get(code, 0) + 1
    return {
        "engine": "PostgreSQL" if postgres else "SQLite", "actions": size["actions"], "todos": size["todos"], "behind": size["behind"],
        "keep": size["keep"], "seeding_s": seeding, "seeded_head": head, "head_at_start": at_start, "before": before, "command_output": output,
        "compaction_s": compaction_ended - compaction_started, "start_up_s": startup, "baseline": baseline, "during": during,
        "mutations": len(mutations), "not_answered": len(mutations) - len(answered), "retried": sum(m[4] > 1 for m in mutations),
        "refused_then_retried": refused, "pollers": len(received), "pollers_exact": pollers_exact, "poller_problems": problems,
        "poll_pages": sum(pages), "poll_refusals": {k: v for r in poll_refusals for k, v in r.items()}, "log": log,
        # nothing lost by the clients: each poller got exactly what it may see, and every mutation was answered 200
        "clients_intact": pollers_exact == len(received) and len(answered) == len(mutations),
        "caught_up": caught_up, "bootstrapped": bootstrapped,
    }


# --- What it prints: bench/run.py's rows 11a to 11d, and more ------------------------------------------


def compaction_row(result: dict) -> tuple[str, str, str]:
    """Row 11a (SQLite) or 11c (PostgreSQL): the measurement, its result, and the ratio of the longest write stall."""
    baseline, during, log = result["baseline"], result["during"], result["log"]
    removed = re.search(r"removed ([\d,]+) sync actions and ([\d,]+) client transactions", result["command_output"])
    what = (f"Compaction of a {result['actions']:,}-action log to its last {result['keep']:,} (`flask compact-log`, its own process) while "
            f"{WRITERS} clients write one-change mutations as fast as they are answered and {POLLERS} hold long polls (`bench/compaction.py`)")
    retried = ", ".join(f"{n:,} × {code}" for code, n in result["refused_then_retried"].items())
    took = (f"{result['compaction_s']:,.1f} s ({result['start_up_s']:,.1f} s of it start-up), removing {removed[1]} actions and "
            f"{removed[2]} client transactions") if removed else f"{result['command_output'].replace('|', '/')} after {result['compaction_s']:,.1f} s"
    figure = (took + f"; longest mutation {during['max_ms']:,.0f} ms while it ran (p99 {during['p99_ms']:,.0f} ms, {during['per_s']:,.0f} tx/s, "
              f"none answered for up to {during['silence_ms']:,.0f} ms), {baseline['max_ms']:,.0f} ms before it (p99 {baseline['p99_ms']:,.0f} ms, "
              f"{baseline['per_s']:,.0f} tx/s, none answered for up to {baseline['silence_ms']:,.0f} ms); "
              f"{result['pollers_exact']} of {result['pollers']} pollers received each acknowledged syncId of their groups once, in order "
              f"({result['mutations']:,} mutations" + (f", retried after {retried}" if retried else "") + "); the log then held "
              f"{log['held']:,} actions above its new start (expected {log['expected']:,}), {log['below']:,} at or below it")
    return what, figure, f"longest × {during['max_ms'] / baseline['max_ms']:,.1f}" if baseline["max_ms"] else ""


def catch_up_row(result: dict) -> tuple[str, str, str]:
    """Row 11b or 11d: a client far behind, before and after compaction."""
    before, after = result["caught_up"], result["bootstrapped"]
    refused = after.get("refused") or {"status": "no refusal", "error": {}, "requests": 0, "seconds": 0}
    reason = (refused["error"].get("details") or {}).get("reason")
    what = (f"A client {result['behind']:,} actions behind: handshake and catch-up by pages before compaction; after it, the same client, "
            f"then its eager bootstrap (Author, Group, Todo)")
    figure = (f"before: {before['requests']:,} requests, {before['bytes'] / 1e6:,.1f} MB, {before['seconds']:,.2f} s; after: "
              f"{refused['status']} {refused['error'].get('code', '')} ({reason}) in {refused['requests']} requests, "
              f"{refused['seconds'] * 1000:,.0f} ms, then {after.get('rows', 0):,} rows in 1 request, {after.get('bytes', 0) / 1e6:,.1f} MB, "
              f"{after['seconds']:,.2f} s")
    total = after["seconds"] + refused["seconds"]
    return what, figure, f"time × {total / before['seconds']:,.2f}, bytes × {(after.get('bytes', 0) + refused.get('bytes', 0)) / before['bytes']:,.2f}"


def report(result: dict) -> str:
    log = result["log"]
    lines = [f"{result['engine']}: a log of {result['actions']:,} actions over {result['todos']:,} Todos (seeded in {result['seeding_s']:,.0f} s); "
             f"{WRITERS} writers and {POLLERS} pollers for {result['load_s']:,.0f} s, the load generator using {result['load_generator_cpu_s']:,.0f} CPU s",
             f"  flask --app app compact-log --before {result['before']:,} (the head was {result['head_at_start']:,}): "
             f"{result['compaction_s']:,.2f} s, {result['start_up_s']:,.2f} s of it Python's start-up; it said: {result['command_output']}"]
    for label, key in (("before it", "baseline"), ("while it ran", "during")):
        w = result[key]
        lines.append(f"  mutations {label}: {w['count']:,}, {w['per_s']:,.0f} tx/s; latency p50 {w['p50_ms']:,.0f} ms, p99 {w['p99_ms']:,.0f} ms, "
                     f"max {w['max_ms']:,.0f} ms; the longest time with no mutation answered {w['silence_ms']:,.0f} ms")
    lines.append(f"  compacted, nothing lost: {'yes' if result['nothing_lost'] else 'NO'}; the clients: {result['pollers_exact']} of {result['pollers']} pollers "
                 f"received exactly the acknowledged syncIds of their groups, in order, once ({result['poll_pages']:,} pages; refusals "
                 f"{result['poll_refusals'] or 'none'}); {result['mutations'] - result['not_answered']:,} of {result['mutations']:,} mutations "
                 f"answered 200 ({result['retried']:,} after retries: {result['refused_then_retried'] or 'none'})"
                 + "".join(f"; {problem}" for problem in result["poller_problems"]))
    lines.append(f"  the log after: {log['held']:,} actions above its start {log['start']:,} (expected {log['expected']:,}), {log['below']:,} at "
                 f"or below it; {log['links']:,} group links above, {log['links_below']:,} below; {log['transactions_at_or_below']:,} client "
                 f"transactions with a baseSyncId at or below it")
    what, figure, ratio = catch_up_row(result)
    lines.append(f"  {what}: {figure} ({ratio})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a 20,000-action log, seconds long: only proves the script works")
    add_postgres_option(parser)
    options = parser.parse_args()
    postgres = postgres_url(parser, options)
    with tempfile.TemporaryDirectory(prefix="loco-compaction-") as directory:
        try:
            result = measure(Path(directory), SMOKE if options.smoke else FULL, postgres,
                             lambda text: print(f"... {text}", file=sys.stderr, flush=True))
        finally:
            if postgres:
                drop_postgres_schemas(postgres)
    print(report(result))


if __name__ == "__main__":
    main()
