"""The benchmark (bench/run.py) in its smoke size, so that it cannot rot.

This checks that every measurement runs and lands in the table; it asserts
nothing about speed (the figures of a smoke run mean nothing). Skipped
without wrk, unless LOCO_REQUIRE_TOOLS=1 (as in CI).
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROWS = ["1a", "1b", "1c", "1d", "2", "3a", "3b", "4a", "4b", "5a", "5b", "6"]
POSTGRES_ROWS = ["7", "7a", "7b", "7c", "7d", "7e", "7f", "7g"]  # when TEST_DATABASE_URL names a PostgreSQL database
CONNECTED_ROWS = ["8a"]  # at the smoke size, one crowd of connected clients
FAIR_ROWS = ["9", "10"]  # bench/fair_writes.py, bench/fan_out.py
COMPACTION_ROWS = ["11a", "11b"]  # bench/compaction.py on SQLite; 11c and 11d on PostgreSQL with TEST_DATABASE_URL


def test_the_benchmark_measures_every_row_of_its_table():
    if shutil.which("wrk") is None:
        reason = "the benchmark needs wrk (apt-get install wrk)"
        if os.environ.get("LOCO_REQUIRE_TOOLS") == "1":
            pytest.fail(f"{reason} (LOCO_REQUIRE_TOOLS=1)")
        pytest.skip(reason)

    result = subprocess.run([sys.executable, "bench/run.py", "--smoke"], cwd=ROOT, capture_output=True, text=True, timeout=300)

    assert result.returncode == 0, result.stderr
    table = {line.split("|")[1].strip(): line for line in result.stdout.splitlines() if re.match(r"\| \d+[a-g]? \|", line)}
    postgres = bool(os.environ.get("TEST_DATABASE_URL"))
    compaction_rows = COMPACTION_ROWS + (["11c", "11d"] if postgres else [])
    assert list(table) == ROWS + (POSTGRES_ROWS if postgres else []) + CONNECTED_ROWS + FAIR_ROWS + compaction_rows, result.stdout
    for row, line in table.items():
        figure = line.split("|")[3]
        assert re.search(r"\d", figure), f"row {row} has no figure: {line}"
        # No rate may be zero: a row that completed nothing in its run stalled (as a server
        # starting beside busy ones once made every mutation wait for a deadlock to time out).
        rates = re.findall(r"([\d,]+(?:\.\d+)?) (?=vs |tx/s|req/s|rows/s|mutations/s)", figure)
        assert all(float(rate.replace(",", "")) > 0 for rate in rates), f"row {row} stalled: {line}"
        # On PostgreSQL a mutation whose transaction keeps deadlocking is answered
        # 503 after its retries, as the protocol allows (the client retries); the row counts them.
        if row not in POSTGRES_ROWS:
            assert "failed)" not in line, f"row {row} had failed requests: {line}"
    # Compaction under writes and polls finished and lost nothing: every poller got each acknowledged syncId of its groups
    # once, in order, and the log holds exactly the actions above its new start (a correctness check, not a timing).
    for row in ("11a", "11c") if postgres else ("11a",):
        assert "compacted, nothing lost: met" in table[row], table[row]
    assert re.search(r"on \d+ cores", result.stdout)


def test_round_trips_per_mutation_are_counted_statement_by_statement(engine):
    """bench/round_trips.py, for issue 18's "round trips per mutation": each kind's total is the sum of its
    statements, among them the row's write, its sync action and the COMMIT; on PostgreSQL, whose write
    transactions are pipelined, those statements take a few round trips, far fewer than one each."""
    args = [sys.executable, "bench/round_trips.py", "--mutations", "3", *(["--postgres"] if engine == "postgresql" else [])]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    kinds = re.findall(r"^  (create|update): (?:([\d.]+) round trips, )?([\d.]+) statements\n((?:    .*\n?)+)", result.stdout, re.MULTILINE)
    assert [kind for kind, _, _, _ in kinds] == ["create", "update"], result.stdout
    for kind, trips, total, block in kinds:
        statements = dict((sql, float(count)) for count, sql in re.findall(r"^ +([\d.]+)  (.+)$", block, re.MULTILINE))
        assert abs(sum(statements.values()) - float(total)) < 0.1, block
        write = "INSERT INTO todos (id," if kind == "create" else "UPDATE todos SET text"
        assert statements[write] == statements["INSERT INTO sync_action (action,"] == statements["COMMIT"] == 1.0, block
        assert (trips != "") == (engine == "postgresql")
        if trips:
            assert 1 <= float(trips) <= 7 < float(total), result.stdout  # the door's token check, then the pipelined transaction
