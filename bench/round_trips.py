"""Round trips to the database per one-change mutation, and its statements one by one.

    python bench/round_trips.py               # SQLite
    python bench/round_trips.py --postgres    # on BENCH_DATABASE_URL or TEST_DATABASE_URL

In this process, through the app's own write path (a test client, as a request from the
network adapter is: a transactionId and a baseSyncId), every statement the app's connections
send is counted: a create of a Todo, then an update of it, `mutations` of each. On PostgreSQL
a round trip is each time the app waits for the server's answer: a statement outside a
pipeline, or, in the pipeline a write transaction runs in, a read of results not yet in (the
statements sent before it share that wait). SQLite's statements are calls into the library,
and there is no round trip. Counted, not timed: a change that saves a round trip shows exactly.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from app import create_app  # noqa: E402
from bench.run import add_postgres_option, postgres_url  # noqa: E402
from helpers import create, fresh_database, give_author, group, mutate, shut_down, sign_in, todo, update  # noqa: E402
from machinery import postgres  # noqa: E402
from models import db  # noqa: E402
from sqlalchemy import event  # noqa: E402
import psycopg  # noqa: E402
from psycopg._pipeline_base import BasePipeline  # noqa: E402  (where psycopg waits for a pipeline's results)

ROUND_TRIPS = "round trips"


def first_words(sql: str) -> str:
    return " ".join(sql.split()[:4])


def counted(connection_class, counts: collections.Counter) -> None:
    """PostgreSQL: counts each statement by its first words, and an executemany as one per row it sends."""
    execute, executemany = connection_class.execute, connection_class.executemany

    def counting_execute(self, sql, params=()):
        counts[first_words(sql)] += 1
        return execute(self, sql, params)

    def counting_executemany(self, sql, rows):
        counts[first_words(sql)] += max(1, len(rows))
        return executemany(self, sql, rows)

    connection_class.execute, connection_class.executemany = counting_execute, counting_executemany
    wait, fetch = psycopg.Connection.wait, BasePipeline._fetch_gen

    def counting_wait(self, generator, *args, **kwargs):
        return wait(self, generator if self._pipeline else counted_if_it_waits(generator), *args, **kwargs)

    def counted_if_it_waits(generator):
        """A statement sent alone, and its answer; not a ROLLBACK that psycopg knows it need not send (it never waits)."""
        try:
            state = next(generator)
            counts[ROUND_TRIPS] += 1
            while True:
                state = generator.send((yield state))
        except StopIteration as done:
            return done.value

    def counting_fetch(self, *, flush):
        if self.result_queue:  # results sent for and not yet in: the app waits for them
            counts[ROUND_TRIPS] += 1
        return (yield from fetch(self, flush=flush))

    psycopg.Connection.wait, BasePipeline._fetch_gen = counting_wait, counting_fetch


def traced(app, counts: collections.Counter) -> None:
    """SQLite: sqlite3 reports every statement its connections run; the pool is emptied so that all of them are traced."""
    with app.app_context():
        event.listen(db.engine, "connect", lambda connection, _: connection.set_trace_callback(lambda sql: counts.update([first_words(sql)])))
        db.engine.dispose()


def measure(engine: str, mutations: int) -> dict[str, collections.Counter]:
    """Statements per mutation, by kind of change."""
    counts: collections.Counter = collections.Counter()
    if engine == "postgresql":
        counted(postgres.PostgresConnection, counts)
    with tempfile.TemporaryDirectory() as directory, fresh_database(engine, directory) as url:
        app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": url})
        try:
            if engine == "sqlite":
                traced(app, counts)
            client = sign_in(app, "Ada")
            mutate(client, group("g1"), create("Author", "a1", name="Ada"))
            give_author(app, client, "a1")
            head = mutate(client, todo("t0", "g1"))["lastSyncId"]
            result = {}
            for kind, change in [("create", lambda n: todo(f"t{n + 1}", "g1")), ("update", lambda n: update("Todo", "t0", likeCount=n))]:
                counts.clear()
                for n in range(mutations):
                    answer = client.post("/mutate", json={"transactionId": f"{kind}-{n}", "baseSyncId": head, "changes": [change(n)]})
                    assert answer.status_code == 200, answer.get_json()
                result[kind] = collections.Counter({sql: count / mutations for sql, count in counts.items()})
            return result
        finally:
            shut_down(app)


def per_mutation(engine: str, mutations: int = 20) -> dict[str, float]:
    """Round trips per one-change mutation on PostgreSQL, statements on SQLite: {"create": ..., "update": ...}."""
    return {kind: counts[ROUND_TRIPS] if engine == "postgresql" else statements(counts) for kind, counts in measure(engine, mutations).items()}


def statements(counts: collections.Counter) -> float:
    return sum(count for sql, count in counts.items() if sql != ROUND_TRIPS)


def report(engine: str, result: dict[str, collections.Counter]) -> str:
    lines = [f"{'PostgreSQL' if engine == 'postgresql' else 'SQLite'}: per one-change mutation (a transactionId and a baseSyncId)"]
    for kind, counts in result.items():
        trips = f"{counts[ROUND_TRIPS]:.1f} round trips, " if engine == "postgresql" else ""
        lines.append(f"  {kind}: {trips}{statements(counts):.1f} statements")
        lines += [f"    {count:5.2f}  {sql}" for sql, count in counts.most_common() if sql != ROUND_TRIPS]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_postgres_option(parser)
    parser.add_argument("--mutations", type=int, default=50, help="of each kind")
    options = parser.parse_args()
    if url := postgres_url(parser, options):
        os.environ["TEST_DATABASE_URL"] = url  # where fresh_database makes its schema
    engine = "postgresql" if options.postgres else "sqlite"
    print(report(engine, measure(engine, options.mutations)))


if __name__ == "__main__":
    main()
