"""The benchmark: every figure of the performance table in docs/performance.md, in one run.

    python bench/run.py            # full sizes: seven to ten minutes on two cores, and about three more for row 11
    python bench/run.py --smoke    # tiny sizes, to prove the script works (the tests run this)
    python bench/run.py --only mutations [--smoke]   # rows 1a, 2 and 7 alone: writes on SQLite and PostgreSQL, about four minutes

It starts its own servers on 127.0.0.1 under the configuration docs/production.md gives
for production (gunicorn, 4 gevent workers, gunicorn.conf.py), drives every request-rate row
with the same load generator (wrk, `apt-get install wrk`) at 16 connections,
and prints a markdown table: each figure beside its ceiling, measured in the
same run, and the ratio each target is about. Request rates also give
the CPU time the server's workers spent on each request (user + system, from
/proc), a cost that does not depend on what else shares the cores.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import psycopg
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from app import applied, apply_transaction, create_app, in_write_transaction, join, load, MutateSchema  # noqa: E402
from machinery.cli import new_user  # noqa: E402
from models import db  # noqa: E402
from servers import WORKERS, Gunicorn  # noqa: E402

CONNECTIONS = 16
# Each request-rate figure is the median of `rounds` runs of `seconds`, taken turn about with its ceiling.
FULL = dict(seconds=3, rounds=6, history=(1_000, 1_000_000), todos=100_000, latency_samples=1_000, raw_transactions=5_000,
            connected=(1_000, 5_000, 10_000), connected_seconds=60, fair_seconds=30, fair_tries=3, fan_out_polls=1_000,
            compaction="FULL", round_trip_mutations=50)  # bench/compaction.py's sizes: a 1,000,000-action log
SMOKE = dict(seconds=1, rounds=1, history=(1_000, 5_000), todos=2_000, latency_samples=30, raw_transactions=200,
             connected=(3,), connected_seconds=2,  # 3: fewer than a worker's threads, which held polls can exhaust today
             fair_seconds=2, fair_tries=1, fan_out_polls=20, compaction="SMOKE", round_trip_mutations=3)  # a 20,000-action log
GROUPS = 100  # for the history rows: a user in all of them, and one in just group:g0
RETRIED = "write transaction retried"  # the app's WARNING, in its server's log, for each write transaction it retries


# --- Databases ----------------------------------------------------------------


def new_database(directory: Path, name: str) -> tuple[str, str, dict[str, str]]:
    """A fresh SQLite file, seeded; returns its URL, path and tokens."""
    path = directory / f"{name}.sqlite3"
    url = f"sqlite:///{path}"
    return url, str(path), seed(url)


def new_postgres_database(base_url: str, name: str) -> tuple[str, dict[str, str]]:
    """A fresh schema in the PostgreSQL database at base_url, seeded; returns its URL and tokens."""
    schema = f"loco_bench_{name}_{os.getpid()}"
    with psycopg.connect(libpq(base_url), autocommit=True) as admin:
        admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        admin.execute(f"CREATE SCHEMA {schema}")
    url = make_url(base_url).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    return url, seed(url)


def drop_postgres_schemas(base_url: str) -> None:
    with psycopg.connect(libpq(base_url), autocommit=True) as admin:
        for (schema,) in admin.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE %s", (f"loco_bench_%_{os.getpid()}",)).fetchall():
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


def add_postgres_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--postgres", action="store_true", help="on BENCH_DATABASE_URL or TEST_DATABASE_URL, a postgresql+psycopg:// URL")


def postgres_url(parser: argparse.ArgumentParser, options: argparse.Namespace) -> str | None:
    """With --postgres, the database the scripts of bench/ measure PostgreSQL on; without it, None."""
    if not options.postgres:
        return None
    url = os.environ.get("BENCH_DATABASE_URL") or os.environ.get("TEST_DATABASE_URL")
    if not url:
        parser.error("--postgres needs BENCH_DATABASE_URL or TEST_DATABASE_URL")
    return url


def libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def seed(url: str) -> dict[str, str]:
    """Groups g0 to g99 and three users: in every group, in group:g0 only, and in group:g0 and
    group:g1 (typical, who wrote Author a1, so may write Todos by it); returns their tokens."""
    app = create_app({"SQLALCHEMY_DATABASE_URI": url})
    author = [{"action": "create", "modelName": "Author", "modelId": "a1", "data": {"id": "a1", "name": "Ada"}}]
    changes = [{"action": "create", "modelName": "Group", "modelId": f"g{n}", "data": {"id": f"g{n}", "name": f"Group {n}"}} for n in range(GROUPS)]

    def users_and_groups(db_connection):
        (everyone, everyone_token), (one, one_token) = new_user(db_connection, "in every group"), new_user(db_connection, "in group:g0 only")
        typical, typical_token = new_user(db_connection, "in group:g0 and group:g1")
        applied(db_connection, apply_transaction(db_connection, load(MutateSchema(), {"changes": changes})["changes"], everyone, None, ""))  # joins every group
        join(db_connection, one, "group:g0")
        join(db_connection, typical, "group:g0")
        join(db_connection, typical, "group:g1")
        applied(db_connection, apply_transaction(db_connection, load(MutateSchema(), {"changes": author})["changes"], typical, None, ""))
        return {"every": everyone_token, "one": one_token, "typical": typical_token}

    with app.app_context():
        tokens = in_write_transaction(users_and_groups)
        db.engine.dispose()
    return tokens


def add_history(path: str, actions: int) -> None:
    """Append `actions` sync actions straight to the log: all but the last 1,000
    spread over the 100 groups; of the last 1,000, every tenth in group:g0."""
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("BEGIN IMMEDIATE")
    (first,) = connection.execute("SELECT coalesce(max(id), 0) + 1 FROM sync_action").fetchone()
    rows, links = [], []
    for n in range(actions):
        sync_id = first + n
        if n < actions - 1000:
            group = f"group:g{n % GROUPS}"
        else:  # the last 1,000: a 100-action page for the user in group:g0 alone
            group = "group:g0" if n % 10 == 0 else f"group:g{n % (GROUPS - 1) + 1}"
        data = json.dumps({"id": f"h{n}", "text": "History", "authorId": "a1", "groupId": group[6:], "isDone": False, "likeCount": 0})
        rows.append((sync_id, "insert", "Todo", f"h{n}", data))
        links.append((group, sync_id))
        if len(rows) == 50_000 or n == actions - 1:
            connection.executemany("INSERT INTO sync_action (id, action, model_name, model_id, data) VALUES (?, ?, ?, ?, ?)", rows)
            connection.executemany("INSERT INTO sync_action_group (sync_group, sync_action_id) VALUES (?, ?)", links)
            rows, links = [], []
    connection.execute("COMMIT")
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # as a server that ran a while would have it
    connection.close()


def add_todos(path: str, count: int) -> None:
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("BEGIN IMMEDIATE")
    connection.executemany(
        "INSERT INTO todos (id, text, author_id, group_id, is_done, like_count) VALUES (?, ?, 'a1', 'g1', ?, ?)",
        ((f"b{n}", f"Todo number {n}", n % 2, n % 7) for n in range(count)),
    )
    connection.execute("COMMIT")
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    connection.close()


def head_of(path: str) -> int:
    with sqlite3.connect(path) as connection:
        return connection.execute("SELECT coalesce(max(id), 0) FROM sync_action").fetchone()[0]


# --- Load and clients ---------------------------------------------------------


@dataclass
class Rate:
    per_second: float
    requests: int
    failed: int  # answered neither 2xx nor 3xx (503 aside, when counted), or lost to a socket error
    cpu_us: float = 0.0  # CPU time of the server's workers (user + system) per request
    unavailable: int = 0  # answered 503 (busy: the client retries later), counted by bench/mutate.lua
    retries: int = 0  # write transactions the server retried, from its log
    database_cpu_us: float | None = None  # PostgreSQL's own processes' CPU per request, when it runs on this machine

    @property
    def done_per_second(self) -> float:
        """The requests answered 2xx or 3xx a second: of mutations, those written."""
        return self.per_second * (self.requests - self.failed - self.unavailable) / self.requests if self.requests else 0.0


def wrk(server: Gunicorn, path: str, seconds: float, token: str | None = None, script: str | None = None, args: list[str] = (),
        warm_up: bool = True) -> Rate:
    """Requests per second at CONNECTIONS connections, after a warm-up run whose figure is dropped
    (a server's first seconds are much slower, in every row alike)."""
    if warm_up:
        wrk(server, path, max(1, round(seconds / 3)), token, script, [f"{args[0]}-warm-up", *args[1:]] if args else [], warm_up=False)
    command = ["wrk", "--threads", "2", "--connections", str(CONNECTIONS), "--duration", f"{seconds:g}s", "--timeout", "10s"]
    if token:
        command += ["--header", f"Authorization: Bearer {token}", "--header", "Content-Type: application/json"]
    if script:
        command += ["--script", str(ROOT / "bench" / script)]
    workers, on_postgres = workers_of(server), server.database_url.startswith("postgresql")
    log_start = server.log_path.stat().st_size
    database_before = postgres_cpu_seconds() if on_postgres else {}
    cpu_before = sum(map(cpu_seconds, workers))
    output = subprocess.run([*command, server.url + path, *(["--", *args] if args else [])], capture_output=True, text=True, check=True).stdout
    spent = sum(map(cpu_seconds, workers)) - cpu_before
    database_after = postgres_cpu_seconds() if on_postgres else {}
    with open(server.log_path, "rb") as log:
        log.seek(log_start)
        retries = log.read().decode(errors="replace").count(RETRIED)
    unavailable = sum(int(n) for n in re.findall(r"^Status 503: (\d+)$", output, re.M))
    failed = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", output)) - unavailable
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if errors:
        failed += sum(map(int, errors.groups()))
    requests = int(re.search(r"(\d+) requests in", output)[1])
    us_each = 1e6 / requests if requests else 0.0
    # A process started during the run counts whole; one that ended during it is lost (a backend that lived less than the run).
    database_spent = sum(after - database_before.get(pid, 0.0) for pid, after in database_after.items())
    return Rate(float(re.search(r"Requests/sec:\s+([\d.]+)", output)[1]), requests, failed, spent * us_each, unavailable, retries,
                database_spent * us_each if database_after else None)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process, all its threads."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_cpu_seconds() -> dict[int, float]:
    """CPU time of every PostgreSQL process on this machine (backends, WAL writer, checkpointer...), by pid:
    whatever else uses the server meanwhile counts too."""
    seconds = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as comm:
                if comm.read().strip() == "postgres":
                    seconds[int(pid)] = cpu_seconds(int(pid))
        except OSError:  # it ended meanwhile
            pass
    return seconds


class Client:
    """One keep-alive HTTP connection."""

    def __init__(self, url: str, token: str = ""):
        self.connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def request(self, method: str, path: str, body=None) -> tuple[int, bytes]:
        self.connection.request(method, path, body=None if body is None else json.dumps(body), headers=self.headers)
        response = self.connection.getresponse()
        return response.status, response.read()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def workers_of(server: Gunicorn) -> list[int]:
    pid = server.process.pid
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return [int(child) for child in children.read().split()]


def memory_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.M)[1])


# --- The measurements -----------------------------------------------------------


def raw_sqlite_transactions(directory: Path, count: int) -> float:
    """One mutation's writes (the row, its sync action, its group link, the
    transactionId), one transaction each, as the app configures SQLite."""
    connection = sqlite3.connect(directory / "raw.sqlite3", isolation_level=None)
    for pragma in ("journal_mode = WAL", "synchronous = FULL", "foreign_keys = ON"):
        connection.execute(f"PRAGMA {pragma}")
    connection.executescript(
        """
        CREATE TABLE todos (id TEXT PRIMARY KEY, text TEXT, author_id TEXT, group_id TEXT, is_done INT, like_count INT);
        CREATE TABLE sync_action (id INTEGER PRIMARY KEY AUTOINCREMENT, action TEXT, model_name TEXT, model_id TEXT, data TEXT);
        CREATE TABLE sync_action_group (sync_group TEXT, sync_action_id INT, PRIMARY KEY (sync_group, sync_action_id));
        CREATE TABLE client_transaction (user_id INT, transaction_id TEXT, changes_sha256 TEXT, last_sync_id INT, PRIMARY KEY (user_id, transaction_id));
        """
    )
    started = time.perf_counter()
    for n in range(count):
        row = {"id": f"t{n}", "text": "Benchmark", "authorId": "a1", "groupId": "g1", "isDone": False, "likeCount": 0}
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("INSERT INTO todos VALUES (?, 'Benchmark', 'a1', 'g1', 0, 0)", (row["id"],))
        sync_id = connection.execute("INSERT INTO sync_action (action, model_name, model_id, data) VALUES ('insert', 'Todo', ?, ?)", (row["id"], json.dumps(row))).lastrowid
        connection.execute("INSERT INTO sync_action_group VALUES ('group:g1', ?)", (sync_id,))
        connection.execute("INSERT INTO client_transaction (user_id, transaction_id, changes_sha256, last_sync_id) VALUES (1, ?, '', ?)", (row["id"], sync_id))
        connection.execute("COMMIT")
    rate = count / (time.perf_counter() - started)
    connection.close()
    return rate


def raw_bootstrap_rows(path: str) -> float:
    """Read every Todo with sqlite3 and encode it as JSON, in one process: what a bootstrap cannot beat."""
    connection = sqlite3.connect(path)
    started = time.perf_counter()
    rows = connection.execute("SELECT id, text, author_id, group_id, is_done, like_count FROM todos")
    keys = ("id", "text", "authorId", "groupId", "isDone", "likeCount")
    count = len(json.dumps([dict(zip(keys, (i, t, a, g, bool(d), n))) for i, t, a, g, d, n in rows]))
    elapsed = time.perf_counter() - started
    total = connection.execute("SELECT count(*) FROM todos").fetchone()[0]
    connection.close()
    assert count
    return total / elapsed


def round_trips(url: str, count: int) -> list[float]:
    client = Client(url)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        status, _ = client.request("GET", "/")
        times.append(time.perf_counter() - started)
        assert status == 200
    return times


def propagation(poll_url: str, write_url: str, token: str, write_token: str, samples: int) -> list[float]:
    """Seconds from a mutation's 200 (read by the writer, the typical user, by its Author a1) to a
    long-polling client holding its action; the poller and the writer use different servers."""
    seen: dict[int, float] = {}
    cursor = json.loads(Client(poll_url, token).request("GET", "/sync")[1])["lastSyncId"]
    stop = threading.Event()

    def poll():
        nonlocal cursor
        client = Client(poll_url, token)
        while not stop.is_set():
            status, body = client.request("GET", f"/sync?since={cursor}&wait=5")
            arrived = time.perf_counter()
            page = json.loads(body)
            for action in page["sync"]:
                seen[action["syncId"]] = arrived
            cursor = page["lastSyncId"]

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    time.sleep(0.5)
    writer, delays = Client(write_url, write_token), []
    for n in range(samples):
        body = {"changes": [{"action": "create", "modelName": "Todo", "modelId": f"lat{n}",
                             "data": {"id": f"lat{n}", "text": "Latency", "authorId": "a1", "groupId": "g1", "isDone": False, "likeCount": 0}}]}
        status, answer = writer.request("POST", "/mutate", body)
        acknowledged = time.perf_counter()
        assert status == 200, answer
        sync_id = json.loads(answer)["lastSyncId"]
        deadline = acknowledged + 10
        while sync_id not in seen and time.perf_counter() < deadline:
            time.sleep(0.0002)
        assert sync_id in seen, f"action {sync_id} never reached the long poll"
        delays.append(max(0.0, seen[sync_id] - acknowledged))  # a poll can beat the writer's own read of its 200
        time.sleep(0.002)
    stop.set()
    return delays


# --- The run ----------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds long: only proves the script works")
    parser.add_argument("--only", choices=["mutations"], help="mutations: rows 1a, 2 and 7 alone (writes on SQLite and PostgreSQL)")
    options = parser.parse_args()
    everything = options.only is None
    size = SMOKE if options.smoke else FULL
    if shutil.which("wrk") is None:
        sys.exit("The benchmark needs wrk: apt-get install wrk")

    directory = Path(tempfile.mkdtemp(prefix="loco-bench-"))
    servers: list[Gunicorn] = []

    def serve(url: str, name: str, app: str = "app:create_app()", workers: int = WORKERS) -> Gunicorn:
        server = Gunicorn(url, directory / f"{name}.log", workers=workers, app=app)
        server.start()
        servers.append(server)
        return server

    def progress(text: str) -> None:
        print(f"... {text}", file=sys.stderr, flush=True)

    rows: list[tuple[str, str, str, str, str, str]] = []
    postgres = None
    try:
        progress("ceilings: the no-op endpoint" + (" and raw sqlite3" if everything else ""))
        noop = serve("sqlite://", "noop", app="bench.noop_app:app")
        if everything:
            noop_trips = round_trips(noop.url, 1000 if not options.smoke else 50)
            raw_rate = raw_sqlite_transactions(directory, size["raw_transactions"])
        ceilings: list[Rate] = []

        def against_noop(measure) -> tuple[Rate, float]:
            """The median rate of `measure` and its median ratio to the no-op endpoint, measured turn about."""
            pairs = []
            for _ in range(size["rounds"]):
                ceilings.append(wrk(noop, "/", size["seconds"]))
                pairs.append((measure(), ceilings[-1]))
            return merged([rate for rate, _ in pairs]), statistics.median(rate.per_second / ceiling.per_second for rate, ceiling in pairs)

        url, path, tokens = new_database(directory, "main")
        if everything:
            progress("floors: the token check alone, and a mutation checked but not written")
            floor_server = serve(url, "floor", app="bench.floor_app:app")
            auth_floor, auth_ratio = against_noop(lambda: wrk(floor_server, "/floor/auth", size["seconds"], tokens["typical"]))
            validate_floor, validate_ratio = against_noop(
                lambda: wrk(floor_server, "/floor/validate", size["seconds"], tokens["typical"], "mutate.lua", [f"floor{time.monotonic_ns()}", "/floor/validate"])
            )
            floor_server.stop()

        progress("POST /mutate and GET /sync" if everything else "POST /mutate")
        app_server = serve(url, "main")
        mutate, ratio = against_noop(lambda: wrk(app_server, "/mutate", size["seconds"], tokens["typical"], "mutate.lua", [f"run{time.monotonic_ns()}"]))
        of_floors = f" (of 1b: {mutate.per_second / raw_rate:.2f}; of 1d: {mutate.per_second / validate_floor.per_second:.2f})" if everything else ""
        rows.append(("2", f"POST /mutate, one-change create, {CONNECTIONS} clients", measured(mutate, "tx/s"), "1a", f"{ratio:.2f}{of_floors}",
                     verdict(ratio >= 0.5, "≥ 0.5")))
        if everything:
            head = head_of(path)
            empty, ratio = against_noop(lambda: wrk(app_server, f"/sync?since={head}", size["seconds"], tokens["typical"]))
            rows.append(("3a", "GET /sync, nothing new", measured(empty, "req/s"), "1a",
                         f"{ratio:.2f} (of 1c: {empty.per_second / auth_floor.per_second:.2f})", verdict(ratio >= 0.7, "≥ 0.7")))
            page, ratio = against_noop(lambda: wrk(app_server, f"/sync?since={head - 100}", size["seconds"], tokens["typical"]))
            rows.append(("3b", "GET /sync, a 100-action page", measured(page, "req/s"), "1a", f"{ratio:.2f}", verdict(ratio >= 0.3, "≥ 0.3")))
        app_server.stop()
        rows.insert(0, ("1a", "No-op JSON endpoint (ceiling)", measured(merged(ceilings), "req/s"), "", "", ""))
        if everything:
            rows[1:1] = [
                ("1b", "Raw sqlite3: one mutation's writes per transaction (ceiling)", f"{raw_rate:,.0f} tx/s", "", "", ""),
                ("1c", "Floor of a poll: the token check alone (`bench/floor_app.py`)", measured(auth_floor, "req/s"),
                 "1a", f"{auth_ratio:.2f}", ""),
                ("1d", "Floor of a mutation: checked (token, JSON, schema, fingerprint), not written", measured(validate_floor, "req/s"),
                 "1a", f"{validate_ratio:.2f}", ""),
            ]

            progress("delta cost versus history")
            history = {}
            for actions in size["history"]:
                url, path, tokens = new_database(directory, f"history{actions}")
                add_history(path, actions)
                history[actions] = (serve(url, f"history{actions}"), head_of(path), tokens)
            small, large = size["history"]
            for n, (who, since_back, token) in enumerate([("a user in all 100 groups", 100, "every"), ("a user in 1 of 100 groups", 1000, "one")]):
                rates = {actions: [] for actions in history}
                for _ in range(size["rounds"]):  # turn about, as for the ratios to the no-op endpoint
                    for actions, (server, head, tokens) in history.items():
                        rates[actions].append(wrk(server, f"/sync?since={head - since_back}", size["seconds"], tokens[token]))
                cost = statistics.median(s.per_second / l.per_second for s, l in zip(rates[small], rates[large]))  # time per request, large over small
                large_rate, small_rate = merged(rates[large]), merged(rates[small])
                rows.append((f"4{'ab'[n]}", f"GET /sync, a 100-action page, {who}: {large:,} vs {small:,} actions of history",
                             f"{large_rate.per_second:,.0f} vs {small_rate.per_second:,.0f} req/s" + failures(large_rate, small_rate),
                             f"{small:,}-action log", f"cost × {cost:.2f}", verdict(cost <= 1.2, "≤ 1.2")))
            for server, _, _ in history.values():
                server.stop()

            progress("eager bootstrap")
            url, path, tokens = new_database(directory, "bootstrap")
            add_todos(path, size["todos"])
            server = serve(url, "bootstrap")
            before = {pid: memory_kib(pid, "VmRSS") for pid in workers_of(server)}
            client, times = Client(server.url, tokens["every"]), []
            for _ in range(3):
                started = time.perf_counter()
                status, body = client.request("GET", "/bootstrap?type=eager&models=Todo")
                times.append(time.perf_counter() - started)
                assert status == 200 and len(json.loads(body)["bootstrap"]["Todo"]) == size["todos"]
            growth_mib = max(memory_kib(pid, "VmHWM") - before[pid] for pid in before) / 1024
            rows_per_second = size["todos"] / statistics.median(times)
            ceiling = raw_bootstrap_rows(path)
            rows.append(("5a", f"Eager bootstrap of {size['todos']:,} Todos", f"{rows_per_second:,.0f} rows/s",
                         f"sqlite3 + json: {ceiling:,.0f} rows/s", f"{rows_per_second / ceiling:.2f}", verdict(rows_per_second >= 100_000, "≥ 100,000 rows/s")))
            rows.append(("5b", "… the server process's peak memory growth", f"{growth_mib:.0f} MiB", "", "", verdict(growth_mib <= 64, "≤ 64 MiB")))
            server.stop()

            progress("propagation latency")
            url, path, tokens = new_database(directory, "latency")
            poll_server, write_server = serve(url, "latency-poll"), serve(url, "latency-write")
            delays = propagation(poll_server.url, write_server.url, tokens["every"], tokens["typical"], size["latency_samples"])
            p50, p99 = percentile(delays, 50) * 1000, percentile(delays, 99) * 1000
            trip50, trip99 = percentile(noop_trips, 50) * 1000, percentile(noop_trips, 99) * 1000
            rows.append(("6", f"Mutation's 200 → long-polling client has the action (other process), {len(delays):,} mutations",
                         f"p50 {p50:.1f} ms, p99 {p99:.1f} ms", f"no-op round trip: p50 {trip50:.1f} ms, p99 {trip99:.1f} ms", "",
                         verdict(p50 <= 20 and p99 <= 100, "p50 ≤ 20 ms, p99 ≤ 100 ms")))
        postgres = os.environ.get("BENCH_DATABASE_URL") or os.environ.get("TEST_DATABASE_URL")
        if postgres:
            rows += mutation_rows(postgres, size, directory, serve, progress)
        else:
            progress("no PostgreSQL rows: set BENCH_DATABASE_URL (or TEST_DATABASE_URL) to a postgresql+psycopg:// URL")
        if everything:
            rows += connected_rows(size, directory, progress)
            rows += fair_writes_rows(size, directory, progress)
            rows += fan_out_rows(size, directory, progress)
            rows += compaction_rows(size, directory, progress, postgres)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(directory, ignore_errors=True)
        if postgres:
            drop_postgres_schemas(postgres)

    print(table(rows, options.smoke))


def mutation_rows(base_url: str, size: dict, directory: Path, serve, progress) -> list[tuple[str, ...]]:
    """Row 7 (issue 18): one-change mutations on SQLite and on PostgreSQL with 1, 2 and 4 app processes (gunicorn
    workers sharing the database), turn about in every round, since only figures measured together compare on shared
    cores; and the cost of the log lock that keeps polls gap-free, against the naive design (bench/naive_app.py)."""
    progress(f"mutations: SQLite with {WORKERS} app processes and PostgreSQL with 1, 2 and 4, turn about")
    url, _, tokens = new_database(directory, "mutations")
    servers = {("sqlite", WORKERS): (serve(url, "mutations-sqlite"), tokens)}
    urls = {}
    for workers in (1, 2, 4):
        urls[workers], tokens = new_postgres_database(base_url, f"w{workers}")
        servers["postgresql", workers] = (serve(urls[workers], f"postgres-{workers}", workers=workers), tokens)
    runs: dict[tuple[str, int], list[Rate]] = {setup: [] for setup in servers}
    for n in range(size["rounds"]):
        for (engine, workers), (server, tokens) in servers.items():
            runs[engine, workers].append(
                wrk(server, "/mutate", size["seconds"], tokens["typical"], "mutate.lua", [f"{engine}{workers}-{n}-{time.monotonic_ns()}"])
            )
    for server, _ in servers.values():
        server.stop()
    trips = round_trips_per_create(base_url, size["round_trip_mutations"])
    sqlite, postgres = merged(runs["sqlite", WORKERS]), {workers: merged(runs["postgresql", workers]) for workers in (1, 2, 4)}

    rows = [("7", f"SQLite: POST /mutate, one-change create, {CONNECTIONS} clients, {processes(WORKERS)} (turn about with 7a to 7c)",
             mutation_figures(sqlite, f"{trips['sqlite']:.1f} statements"), "", "", "")]
    for letter, workers in zip("abc", (1, 2, 4)):
        rows.append((f"7{letter}", f"PostgreSQL: POST /mutate, one-change create, {CONNECTIONS} clients, {processes(workers)}",
                     mutation_figures(postgres[workers], f"{trips['postgresql']:.1f} round trips") + f"; {per_turn(urls[workers])}", "7",
                     f"{median_ratio(runs['postgresql', workers], runs['sqlite', WORKERS]):.2f}", ""))

    progress("PostgreSQL: mutations with and without the log lock")
    url, tokens = new_postgres_database(base_url, "lock")
    locked, naive = serve(url, "postgres-locked", workers=4), serve(url, "postgres-naive", workers=4, app="bench.naive_app:app")
    pairs = []
    for n in range(size["rounds"]):
        pairs.append((wrk(locked, "/mutate", size["seconds"], tokens["typical"], "mutate.lua", [f"locked-{n}-{time.monotonic_ns()}"]),
                      wrk(naive, "/mutate", size["seconds"], tokens["typical"], "mutate.lua", [f"naive-{n}-{time.monotonic_ns()}"])))
    locked.stop()
    naive.stop()
    with_lock, without = merged([p[0] for p in pairs]), merged([p[1] for p in pairs])
    # Time per mutation, with the lock over without; a run that completed nothing (a stall) counts as infinite.
    cost = statistics.median(b.per_second / a.per_second if a.per_second else float("inf") for a, b in pairs)
    rows.append(("7d", "PostgreSQL: the same, 4 app processes, with the log lock vs without it (the naive design, which can skip actions)",
                 f"{with_lock.per_second:,.0f} vs {without.per_second:,.0f} tx/s" + failures(with_lock, without), "without the lock", f"cost × {cost:.2f}", ""))

    versus_sqlite = median_ratio(runs["postgresql", 4], runs["sqlite", WORKERS])
    rows.append(("7e", f"PostgreSQL over SQLite, {processes(4)} each (7c / 7)",
                 f"{postgres[4].done_per_second:,.0f} vs {sqlite.done_per_second:,.0f} mutations/s", "7", f"{versus_sqlite:.2f}",
                 verdict(versus_sqlite >= 0.8, "≥ 0.8")))
    busy = ", ".join(f"{busy_cores(postgres[workers])} at {processes(workers)}" for workers in (1, 4))
    scaling = median_ratio(runs["postgresql", 4], runs["postgresql", 1])
    rows.append(("7f", f"PostgreSQL: {processes(4)} over 1 (7c / 7a)",
                 f"{postgres[4].done_per_second:,.0f} vs {postgres[1].done_per_second:,.0f} mutations/s; "
                 f"cores busy, app + PostgreSQL, of {os.cpu_count()}: {busy}", "7a", f"{scaling:.2f}", verdict(scaling >= 1.3, "≥ 1.3 where the cores allow")))
    retries, unavailable = [retries_per_100(postgres[w]) for w in (1, 2, 4)], [postgres[w].unavailable for w in (1, 2, 4)]
    rows.append(("7g", f"PostgreSQL: write transactions retried (a serialization failure, a deadlock) and 503s at {CONNECTIONS} clients, 7a to 7c",
                 f"{', '.join(f'{r:.2f}' for r in retries)} retries per 100 mutations; {', '.join(f'{u:,}' for u in unavailable)} answered 503",
                 "", "", verdict(max(retries) < 1 and not any(unavailable), "< 1 retry per 100 mutations, no 503")))
    return rows


def round_trips_per_create(postgres: str, mutations: int) -> dict[str, float]:
    """By engine, the round trips of a one-change create (on SQLite, statements: calls into the library), counted in this
    process by bench/round_trips.py."""
    from bench.round_trips import per_mutation  # it patches psycopg to count: imported only when it is used

    with mock.patch.dict(os.environ, {"TEST_DATABASE_URL": postgres}):  # where it makes its schema, as its --postgres does
        return {engine: per_mutation(engine, mutations)["create"] for engine in ("sqlite", "postgresql")}


def per_turn(url: str) -> str:
    """How many mutations each turn of the log carried: the sync actions a transaction appended share its xmin."""
    with psycopg.connect(libpq(url), autocommit=True) as connection:
        actions, turns = connection.execute("SELECT count(*), count(DISTINCT xmin::text) FROM sync_action WHERE model_name = 'Todo'").fetchone()
    return f"{actions / turns:.1f} mutations per turn of the log (per commit)" if turns else "no turn of the log"


def mutation_figures(rate: Rate, trips: str) -> str:
    """Issue 18's figures for one engine and number of app processes."""
    database = "" if rate.database_cpu_us is None else f", PostgreSQL {rate.database_cpu_us:,.0f} µs"
    other = f" ({rate.failed:,} failed otherwise)" if rate.failed else ""
    return (f"{rate.done_per_second:,.0f} mutations/s; CPU per mutation: app {rate.cpu_us:,.0f} µs{database}; {trips} each; "
            f"{retries_per_100(rate):.2f} retries per 100 mutations; {rate.unavailable:,} of {rate.requests:,} answered 503{other}")


def retries_per_100(rate: Rate) -> float:
    return 100 * rate.retries / rate.requests if rate.requests else 0.0


def median_ratio(rates: list[Rate], references: list[Rate]) -> float:
    """The median, over rounds measured turn about, of a rate over its reference's in the same round."""
    return statistics.median(
        rate.done_per_second / reference.done_per_second if reference.done_per_second else float("nan") for rate, reference in zip(rates, references)
    )


def busy_cores(rate: Rate) -> str:
    """What the cores allowed: those the app's processes and PostgreSQL's kept busy (CPU per mutation × mutations/s)."""
    database = "?" if rate.database_cpu_us is None else f"{rate.database_cpu_us * rate.per_second / 1e6:.2f}"
    return f"{rate.cpu_us * rate.per_second / 1e6:.2f} + {database}"


def processes(workers: int) -> str:
    return f"{workers} app process{'es' if workers > 1 else ''}"


def connected_rows(size: dict, directory: Path, progress) -> list[tuple[str, ...]]:
    """Row 8: clients that stay connected, each holding a long poll (bench/connected.py)."""
    from bench import connected

    rows = []
    for letter, clients in zip("abc", size["connected"]):
        progress(f"{clients:,} connected clients, {size['connected_seconds']} s of writes")
        result = connected.measure(clients, size["connected_seconds"], directory)
        propagation = result["propagation_ms"] or (float("inf"), float("inf"))
        met = (
            result["exactly_once"] == clients and propagation[0] <= 50 and propagation[1] <= 500 and (result["mutation_p99_ms"] or 0) <= 100
            and result["rss_mib"] <= 1024 and result["idle_cpu"] <= 0.05
        )
        rows.append((f"8{letter}", f"{clients:,} connected clients, each in `all` and 1 of 100 groups; 21 writes/s for "
                     f"{size['connected_seconds']} s (`bench/connected.py`)", connected.row(result), "", "",
                     verdict(met, "all exactly once; propagation p50 ≤ 50 ms, p99 ≤ 500 ms; mutation p99 ≤ 100 ms; RSS ≤ 1 GiB; idle CPU ≤ 5 %")))
    return rows


def fan_out_rows(size: dict, directory: Path, progress) -> list[tuple[str, ...]]:
    """Row 10: a worker's memory when one write to `all` answers every held poll (bench/fan_out.py)."""
    from bench import fan_out

    progress("fan-out: held polls, then one 1 MB write to `all`")
    result = fan_out.measure(directory, size["fan_out_polls"])
    growth = result["after_mib"] - result["before_mib"]
    return [("10", f"{result['polls']:,} polls held by one worker, then one write to `all` of about 1 MB (`bench/fan_out.py`)",
             fan_out.report(result), "", "", verdict(growth <= 64, "worker growth ≤ 64 MiB"))]


def fair_writes_rows(size: dict, directory: Path, progress) -> list[tuple[str, ...]]:
    """Row 9: one-change mutations while some clients send the largest allowed requests, and the
    longest one such request holds the write lock (bench/fair_writes.py)."""
    from bench import fair_writes

    progress("fair writes: the largest allowed requests, alone and beside one-change mutations")
    result = fair_writes.measure(directory, size["fair_seconds"], size["fair_tries"])
    alone, loaded, worst = result["alone"], result["loaded"], result["worst"]
    holds = "; ".join(f"{name}: {shape['hold_ms']:,.0f} ms" for name, shape in result["shapes"].items())
    failed = alone["failed"] + loaded["failed"]
    return [("9", f"Fair writes: `bench/connected.py`'s writer (21 one-change mutations a second, timed from when each was due) "
             f"while {result['senders']} client(s) send back to back the largest allowed request that holds the write lock "
             f"longest, Group creates aside; {size['fair_seconds']} s each (`bench/fair_writes.py`)",
             f"others' p50 {loaded['p50_ms']:,.0f} ms, p99 {loaded['p99_ms']:,.0f} ms, max {loaded['max_ms']:,.0f} ms "
             + (f"({failed} of {alone['count'] + loaded['count']:,} failed)" if failed else f"({loaded['count']:,} mutations)")
             + f" beside {result['heavy']}; the write lock held by one request alone up to {result['shapes'][worst]['hold_ms']:,.0f} ms "
             f"({worst}), timed as the longest wait of another process taking it ({holds}); under the load, up to "
             f"{result['loaded_hold_ms']:,.0f} ms",
             f"no heavy senders: p50 {alone['p50_ms']:,.0f} ms, p99 {alone['p99_ms']:,.0f} ms, max {alone['max_ms']:,.0f} ms",
             f"p99 × {loaded['p99_ms'] / alone['p99_ms']:,.0f}",
             verdict(loaded["p99_ms"] <= 100, "others' p99 ≤ 100 ms"))]


def compaction_rows(size: dict, directory: Path, progress, postgres: str | None) -> list[tuple[str, ...]]:
    """Rows 11a and 11b on SQLite, 11c and 11d on PostgreSQL when there is one: `flask compact-log` shortening a
    long log while clients write and poll, and a client far behind before and after it (bench/compaction.py)."""
    from bench import compaction

    rows = []
    for letters, engine in (("ab", None), ("cd", postgres)) if postgres else (("ab", None),):
        result = compaction.measure(directory, getattr(compaction, size["compaction"]), engine, progress)
        prefix = "PostgreSQL: " if engine else ""
        what, figure, ratio = compaction.compaction_row(result)
        rows.append((f"11{letters[0]}", prefix + what, figure, "before compaction, same run", ratio, verdict(result["nothing_lost"], "compacted, nothing lost")))
        what, figure, ratio = compaction.catch_up_row(result)
        rows.append((f"11{letters[1]}", prefix + what, figure, "catch-up before compaction", ratio, ""))
    return rows


def merged(rates: list[Rate]) -> Rate:
    database = [rate.database_cpu_us for rate in rates]
    return Rate(statistics.median(rate.per_second for rate in rates), sum(r.requests for r in rates), sum(r.failed for r in rates),
                statistics.median(rate.cpu_us for rate in rates), sum(r.unavailable for r in rates), sum(r.retries for r in rates),
                None if None in database else statistics.median(database))


def measured(rate: Rate, unit: str) -> str:
    """A rate, what each request cost the server's processes (whatever else shared the cores), and any failures."""
    return f"{rate.per_second:,.0f} {unit}; {rate.cpu_us:,.0f} µs of server CPU each" + failures(rate)


def failures(*rates: Rate) -> str:
    failed = sum(rate.failed + rate.unavailable for rate in rates)
    return f" ({failed:,} of {sum(rate.requests for rate in rates):,} failed)" if failed else ""


def verdict(met: bool, target: str) -> str:
    return f"{target}: {'met' if met else '**missed**'}"


def table(rows, smoke: bool) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    lines = [
        f"{'Smoke run (tiny sizes; the figures mean nothing)' if smoke else 'Benchmark'} of {datetime.date.today()} on "
        f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}; "
        f"gunicorn {WORKERS} gevent workers, wrk at {CONNECTIONS} connections.",
        "",
        "| | measurement | result | ceiling | ratio | target |",
        "|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
