"""Serve the app on a fresh, seeded database for the JavaScript tests.

    python tests/live_server.py [DIRECTORY]

A SQLite file in DIRECTORY, or with LOCO_TEST_ENGINE=postgresql a schema of
its own in TEST_DATABASE_URL, dropped at the end. Prints one JSON line,
{"baseUrl": ..., "tokens": {"Ada": ..., "Grace": ...}}, then serves on a
free port of 127.0.0.1 until its standard input closes, so it never outlives
the test process that started it.

Meanwhile each line it reads is a flask command to run on that database, as a
JSON array of its arguments (["remove-member", "2", "g1"], ["compact-log",
"--before", "9"]); it answers each with one JSON line, {"exitCode": ..., "output": ...}.
"""

import json
import logging
import os
import sys
import tempfile
import threading

from werkzeug.serving import make_server

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import contract  # noqa: E402
from app import create_app  # noqa: E402
from machinery.cli import seed_demo  # noqa: E402
from helpers import fresh_database  # noqa: E402
from models import db  # noqa: E402


def main() -> None:
    directory = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="loco-live-")
    os.makedirs(directory, exist_ok=True)
    contract.install(report=os.environ.get(contract.REPORT))  # every response checked, as in the tests' own process
    with fresh_database(os.environ.get("LOCO_TEST_ENGINE", "sqlite"), directory) as url:
        app = create_app({"SQLALCHEMY_DATABASE_URI": url})
        with app.app_context():
            tokens, _ = seed_demo()
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log on the test's stderr
        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        print(json.dumps({"baseUrl": f"http://127.0.0.1:{server.port}", "tokens": tokens}), flush=True)
        for line in sys.stdin:  # until stdin closes
            if line.strip():
                result = app.test_cli_runner().invoke(args=json.loads(line))
                print(json.dumps({"exitCode": result.exit_code, "output": result.output}), flush=True)
        app.extensions["held_polls"].close()  # answer held long polls at once
        server.shutdown()
        with app.app_context():
            db.engine.dispose()


if __name__ == "__main__":
    main()
