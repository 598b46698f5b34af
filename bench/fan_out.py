"""Fan-out memory: many held polls, then one write to `all` of about 1 MB, which answers them all.

    python bench/fan_out.py [--polls 1000]    # bench/run.py prints it as row 10

One gunicorn worker (gunicorn.conf.py's settings otherwise, as bench/run.py starts its servers)
holds `polls` long polls, each a thread here on a connection of its own; the writer then updates
31 Authors of its own with 32,000-character names in one transaction (each row within
MAX_STRING_BYTES, the whole within MAX_TRANSACTION_BYTES), and every poll is answered with
the same 1 MB page. Reported: the worker's peak memory (VmHWM) before and after. Polls given
the same actions share one answer (machinery/long_poll.py); a copy each made 1,000 polls cost
about a gigabyte. Measured, never asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from bench import connected  # noqa: E402
from bench.run import Client, memory_kib, workers_of  # noqa: E402
from servers import Gunicorn  # noqa: E402

AUTHORS = 31  # × 32,000 characters: just under MAX_TRANSACTION_BYTES


def measure(directory: Path, polls: int) -> dict:
    url = f"sqlite:///{directory / 'fan-out.sqlite3'}"
    writer_token, users, _ = connected.seed(url, polls)
    server = Gunicorn(url, directory / "fan-out.log", workers=1, app="app:create_app()")
    server.start()
    try:
        writer = Client(server.url, writer_token)
        authors = [{"action": "create", "modelName": "Author", "modelId": f"w{k}", "data": {"id": f"w{k}", "name": "W"}} for k in range(AUTHORS)]
        status, answer = writer.request("POST", "/mutate", {"changes": authors})
        assert status == 200, answer
        head, answers = json.loads(answer)["lastSyncId"], []

        def hold(token: str) -> None:
            status, body = Client(server.url, token).request("GET", f"/sync?since={head}&wait=25")
            answers.append((status, len(body)))

        threads = [threading.Thread(target=hold, args=(token,)) for token, _ in users]
        for thread in threads:
            thread.start()
        time.sleep(2 + polls / 500)  # every poll held
        (worker,) = workers_of(server)
        before = memory_kib(worker, "VmHWM")
        names = [{"action": "update", "modelName": "Author", "modelId": f"w{k}", "data": {"name": "z" * 32_000}} for k in range(AUTHORS)]
        status, answer = writer.request("POST", "/mutate", {"changes": names})
        assert status == 200, answer
        for thread in threads:
            thread.join(60)
        after = memory_kib(worker, "VmHWM")
    finally:
        server.stop()
    return {"polls": polls, "answered": sum(status == 200 for status, _ in answers), "page_bytes": max((size for _, size in answers), default=0),
            "before_mib": before / 1024, "after_mib": after / 1024}


def report(result: dict) -> str:
    return (f"{result['answered']:,} of {result['polls']:,} held polls answered with a {result['page_bytes']:,}-byte page; "
            f"the worker's peak memory {result['before_mib']:,.0f} MiB before the write, {result['after_mib']:,.0f} MiB after")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--polls", type=int, default=1000)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="loco-fan-out-") as directory:
        print(report(measure(Path(directory), options.polls)))


if __name__ == "__main__":
    main()
