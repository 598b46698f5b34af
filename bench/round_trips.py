"""Round trips to the database per one-change mutation, statement by statement.

    python bench/round_trips.py               # SQLite
    python bench/round_trips.py --postgres    # on BENCH_DATABASE_URL or TEST_DATABASE_URL

In this process, through the app's own write path (a test client, as a request from the
network adapter is: a transactionId and a baseSyncId), every statement the app's connections
send is counted: a create of a Todo, then an update of it, `mutations` of each. On PostgreSQL
each statement is a round trip to the server; SQLite's are calls into the library. Counted,
not timed: the same on any machine, so a change that saves a round trip shows exactly.
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


def report(engine: str, result: dict[str, collections.Counter]) -> str:
    lines = [f"{'PostgreSQL' if engine == 'postgresql' else 'SQLite'}: statements per one-change mutation (a transactionId and a baseSyncId)"]
    for kind, counts in result.items():
        lines.append(f"  {kind}: {sum(counts.values()):.1f}")
        lines += [f"    {count:5.2f}  {sql}" for sql, count in counts.most_common()]
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
