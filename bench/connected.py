"""Connected clients: thousands of held long polls and a steady trickle of writes.

    python bench/connected.py --clients 1000 --seconds 60     # one row; bench/run.py runs 1,000, 5,000, 10,000

A sync server's clients stay connected. This starts the server as production
runs it (tests/servers.py's gunicorn), on a fresh SQLite file holding 100
groups of clients/100 users, each user in `all` and one group, and a process
of asyncio clients, one connection each, every one holding
GET /sync?since=N&wait=25 and polling again the moment it is answered. A writer
process sends 20 mutations a second to random groups and 1 to `all`
(`--writes-to-all`: each wakes every client). Measured,
never asserted: whether every client received each action it may see exactly
once and nothing else; propagation from a mutation's 200 to each client that
holds it; mutation latency; the server's memory and CPU, with and without
writes; and the CPU the load generator itself used on the shared cores.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import http.client
import json
import multiprocessing
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from app import applied, apply_transaction, create_app, in_write_transaction, join, load, MutateSchema  # noqa: E402
from machinery.cli import new_user  # noqa: E402
from bench.run import Client, cpu_seconds, memory_kib, percentile, workers_of  # noqa: E402
from models import db  # noqa: E402
from servers import Gunicorn  # noqa: E402

GROUPS = 100
WAIT_S = 25
WRITES_PER_S = {"group": 20, "all": 1}
GIVE_UP_S = 30  # a mutation not answered by then, or not yet sent by then after the last one was due, failed


def seed(url: str, clients: int) -> tuple[str, list[tuple[str, int]], int]:
    """Groups g0..g99 with a Todo each, Author a1, a writer in every group, and `clients` users,
    user n in `all` and group:g<n % 100>. Returns the writer's token, (token, group) per client, the head."""
    app = create_app({"SQLALCHEMY_DATABASE_URI": url})
    changes = [{"action": "create", "modelName": "Author", "modelId": "a1", "data": {"id": "a1", "name": "Ada"}}]
    for n in range(GROUPS):
        changes.append({"action": "create", "modelName": "Group", "modelId": f"g{n}", "data": {"id": f"g{n}", "name": f"Group {n}"}})
        todo = {"id": f"t{n}", "text": "Water", "authorId": "a1", "groupId": f"g{n}", "isDone": False, "likeCount": 0}
        changes.append({"action": "create", "modelName": "Todo", "modelId": f"t{n}", "data": todo})

    def users(db_connection):
        writer, writer_token = new_user(db_connection, "writer")
        head = applied(db_connection, apply_transaction(db_connection, load(MutateSchema(), {"changes": changes})["changes"], writer, None, ""))
        made = []
        for n in range(clients):
            user_id, token = new_user(db_connection, f"client {n}")
            join(db_connection, user_id, f"group:g{n % GROUPS}")
            made.append((token, n % GROUPS))
        return writer_token, made, head

    with app.app_context():
        seeded = in_write_transaction(users)
        db.engine.dispose()
    return seeded


# --- The writer: its own process, so that the clients' work does not delay its clock ----------


def write(url: str, token: str, seconds: float, to_all: float, results) -> None:
    """20 one-change mutations a second to groups and `to_all` to `all`, each sent on time however slow
    the others are answered; puts (syncId or None, sync group, sent, answered) for each."""
    rate = WRITES_PER_S["group"] + to_all
    local = threading.local()

    def one(n: int):
        scheduled = started + n / rate  # latency counts from here: a write held up by others is late
        if time.monotonic() > started + seconds + GIVE_UP_S:
            return None, "not sent", scheduled, time.monotonic()
        if not hasattr(local, "client"):
            local.client = Client(url, token)
            local.client.connection.timeout = GIVE_UP_S
        if random.random() < to_all / rate:
            group, change = "all", {"action": "update", "modelName": "Author", "modelId": "a1", "data": {"name": f"Ada {n}"}}
        else:
            k = random.randrange(GROUPS)
            group, change = f"group:g{k}", {"action": "update", "modelName": "Todo", "modelId": f"t{k}", "data": {"likeCount": n}}
        try:
            status, body = local.client.request("POST", "/mutate", {"changes": [change]})
            sync_id = json.loads(body)["lastSyncId"] if status == 200 else None
        except (OSError, http.client.HTTPException):
            local.client, sync_id = Client(url, token), None
        return sync_id, group, scheduled, time.monotonic()

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        futures = []
        for n in range(int(seconds * rate)):
            time.sleep(max(0.0, started + n / rate - time.monotonic()))
            futures.append(pool.submit(one, n))
        results.put([future.result() for future in futures])


# --- The clients: one asyncio process, a connection each ----------------------------------------


class Clients:
    def __init__(self, host: str, port: int, clients: list[tuple[str, int]], since: int):
        self.host, self.port, self.clients, self.since = host, port, clients, since
        self.received: list[list[tuple[int, float]]] = [[] for _ in clients]
        self.errors: dict[str, int] = {}
        self.stopping = False

    async def poll_forever(self, n: int) -> None:
        token, _ = self.clients[n]
        cursor, reader, writer = self.since, None, None
        while not self.stopping:
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(self.host, self.port)
                writer.write(
                    f"GET /sync?since={cursor}&wait={WAIT_S} HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
                )
                status, headers = await read_head(reader)
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if headers.get("connection", "").lower() == "close":
                    writer.close()
                    writer = None
                if status != 200:
                    self.errors[str(status)] = self.errors.get(str(status), 0) + 1
                    await asyncio.sleep(1)
                    continue
                arrived = time.monotonic()
                page = json.loads(body)
                self.received[n].extend((action["syncId"], arrived) for action in page["sync"])
                cursor = page["lastSyncId"]
            except (OSError, asyncio.IncompleteReadError, ValueError) as error:
                self.errors[type(error).__name__] = self.errors.get(type(error).__name__, 0) + 1
                if writer is not None:
                    writer.close()
                reader = writer = None
                await asyncio.sleep(0.5)

    async def run(self, connected: asyncio.Event, stop: asyncio.Event) -> None:
        tasks = []
        for start in range(0, len(self.clients), 500):  # connect in batches: the listen backlog is finite
            tasks += [asyncio.create_task(self.poll_forever(n)) for n in range(start, min(start + 500, len(self.clients)))]
            await asyncio.sleep(0.05)
        connected.set()
        await stop.wait()
        self.stopping = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = await reader.readuntil(b"\r\n")
    headers = {}
    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers


def clients_process(address: str, clients: list[tuple[str, int]], since: int, finish, results) -> None:
    """Connects every client and keeps them polling until `finish` is set."""
    host, port = address.rsplit(":", 1)

    async def main():
        crowd = Clients(host, int(port), clients, since)
        connected, stop = asyncio.Event(), asyncio.Event()
        running = asyncio.create_task(crowd.run(connected, stop))
        await connected.wait()
        results.put(("connected", time.monotonic()))
        while not finish.is_set():
            await asyncio.sleep(0.1)
        stop.set()
        await running
        times = os.times()
        results.put(("done", crowd.received, crowd.errors, times.user + times.system))

    asyncio.run(main())


# --- One row ---------------------------------------------------------------------------------------


def measure(clients: int, seconds: float, directory: Path, to_all: float = WRITES_PER_S["all"], settle_s: float = 5, idle_s: float = 10, drain_s: float = 5) -> dict:
    url = f"sqlite:///{directory / f'connected-{clients}.sqlite3'}"
    writer_token, users, head = seed(url, clients)
    # The production command: every setting from gunicorn.conf.py, whose workers are two a core.
    server = Gunicorn(url, directory / f"connected-{clients}.log", workers=2 * os.cpu_count(), app="app:create_app()", flags=False)
    server.start()
    context = multiprocessing.get_context("spawn")
    crowd_results, writer_results, finish = context.Queue(), context.Queue(), context.Event()
    crowd = context.Process(target=clients_process, args=(server.url.removeprefix("http://"), users, head, finish, crowd_results))
    try:
        crowd.start()
        crowd_results.get(timeout=300)  # ("connected", when)
        time.sleep(settle_s)
        pids = [server.process.pid, *workers_of(server)]
        idle_cpu = sum(cpu_seconds(pid) for pid in pids)
        time.sleep(idle_s)
        idle_cpu = (sum(cpu_seconds(pid) for pid in pids) - idle_cpu) / idle_s
        busy_cpu, writing_since = sum(cpu_seconds(pid) for pid in pids), time.monotonic()
        writer = context.Process(target=write, args=(server.url, writer_token, seconds, to_all, writer_results))
        writer.start()
        writes = writer_results.get(timeout=seconds + 120)
        writer.join()
        busy_cpu = (sum(cpu_seconds(pid) for pid in pids) - busy_cpu) / (time.monotonic() - writing_since)
        rss_mib = sum(memory_kib(pid, "VmRSS") for pid in pids) / 1024
        time.sleep(drain_s)  # polls in flight deliver the last writes
        finish.set()
        _, received, errors, generator_cpu = crowd_results.get(timeout=300)
        crowd.join()
    finally:
        server.stop()
        if crowd.is_alive():
            crowd.kill()
    return summarize(clients, users, writes, received, errors, idle_cpu, busy_cpu, rss_mib, generator_cpu)


def summarize(clients, users, writes, received, errors, idle_cpu, busy_cpu, rss_mib, generator_cpu) -> dict:
    committed = {sync_id: (group, answered) for sync_id, group, _, answered in writes if sync_id is not None}
    latencies = [answered - sent for _, _, sent, answered in writes]
    exact, missing, doubled, foreign, delays = 0, 0, 0, 0, []
    for (_, k), got in zip(users, received):
        expected = {sync_id for sync_id, (group, _) in committed.items() if group in ("all", f"group:g{k}")}
        ids = [sync_id for sync_id, _ in got]
        missing += bool(expected - set(ids))
        doubled += len(ids) != len(set(ids))
        foreign += bool(set(ids) - expected)
        exact += set(ids) == expected and len(ids) == len(set(ids))
        delays += [arrived - committed[sync_id][1] for sync_id, arrived in got if sync_id in committed]
    return {
        "clients": clients,
        "exactly_once": exact,
        "clients_missing_some": missing,
        "clients_with_doubles": doubled,
        "clients_with_others_actions": foreign,
        "writes": len(writes),
        "failed_writes": len(writes) - len(committed),
        "propagation_ms": (percentile(delays, 50) * 1000, percentile(delays, 99) * 1000) if delays else None,
        "mutation_p99_ms": percentile(latencies, 99) * 1000 if latencies else None,
        "rss_mib": rss_mib,
        "idle_cpu": idle_cpu,
        "busy_cpu": busy_cpu,
        "generator_cpu_s": generator_cpu,
        "client_errors": errors,
    }


def row(result: dict) -> str:
    propagation, failed, writes = result["propagation_ms"], result["failed_writes"], result["writes"]
    parts = [
        f"{result['clients']:,} clients: {result['exactly_once']:,} received exactly what they may see, once "
        f"({result['clients_missing_some']:,} missed some, {result['clients_with_doubles']:,} got one twice, "
        f"{result['clients_with_others_actions']:,} got another group's)",
        f"propagation p50 {propagation[0]:,.0f} ms, p99 {propagation[1]:,.0f} ms" if propagation else "no action arrived",
        f"mutation p99 {result['mutation_p99_ms']:,.0f} ms " + (f"({failed} of {writes} failed)" if failed else f"({writes:,} mutations)"),
        f"server RSS {result['rss_mib']:,.0f} MiB, CPU {result['idle_cpu']:.0%} of a core idle, {result['busy_cpu']:.0%} writing",
        f"load generator {result['generator_cpu_s']:,.0f} CPU s; client errors {result['client_errors'] or 'none'}",
    ]
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--writes-to-all", type=float, default=WRITES_PER_S["all"], help="a second (each wakes every client)")
    options = parser.parse_args()
    result = measure(options.clients, options.seconds, Path(tempfile.mkdtemp(prefix="loco-connected-")), options.writes_to_all)
    print(row(result))
    print(json.dumps(result), file=sys.stderr)


if __name__ == "__main__":
    main()
