"""The server runs where Python runs: what a SQLite server does not need, it
does not load, and where a platform lacks the file lock, writers still take
turns. Each check runs in a fresh interpreter, so that nothing the test
process loaded earlier can hide an import."""

import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, *, timeout: float = 120) -> subprocess.CompletedProcess:
    ran = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert ran.returncode == 0, ran.stderr
    return ran


SERVE_EVERY_ENDPOINT = """
    from app import create_app
    from machinery.cli import seed_demo

    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": "sqlite:///" + DATABASE})
    with app.app_context():
        tokens, _ = seed_demo()
    client = app.test_client()
    ada = {"Authorization": "Bearer " + tokens["Ada"]}
    change = {"action": "update", "modelName": "Todo", "modelId": "t1", "data": {"isDone": True}}
    answers = [
        client.post("/mutate", json={"changes": [change]}, headers=ada),
        client.get("/bootstrap?type=eager&models=Group,Author,Todo", headers=ada),
        client.get("/sync?since=0", headers=ada),
        client.get("/openapi.json"),
    ]
    assert [answer.status_code for answer in answers] == [200, 200, 200, 200], [answer.get_data(as_text=True) for answer in answers]
"""


def test_a_sqlite_server_never_imports_psycopg(tmp_path):
    ran = run_python(
        f"DATABASE = {str(tmp_path / 'loco.sqlite3')!r}\n"
        + textwrap.dedent(SERVE_EVERY_ENDPOINT)
        + "import sys, json\nprint(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('psycopg', 'psycopg_binary'))))\n"
    )
    assert json.loads(ran.stdout) == []


def test_without_fcntl_writers_of_several_processes_still_take_turns(tmp_path):
    """As on Windows: `import fcntl` fails, the file lock steps aside, and SQLite's own
    lock (its busy handler, with the app's retries) orders the writers of two processes."""
    database, writers = str(tmp_path / "loco.sqlite3"), 3
    run_python(f"DATABASE = {database!r}\n" + textwrap.dedent(SERVE_EVERY_ENDPOINT))  # seeds, and proves one process serves
    writer = f"""
        import sys
        sys.modules["fcntl"] = None  # what a platform without it gives: ImportError
        from app import create_app, in_write_transaction
        from machinery.cli import new_user
        import machinery.writer

        assert machinery.writer.fcntl is None
        app = create_app({{"TESTING": True, "SQLALCHEMY_DATABASE_URI": "sqlite:///{database}"}})
        assert app.extensions["writer"].lock.path is None
        with app.app_context():
            user_id, token = in_write_transaction(lambda db_connection: new_user(db_connection, "Writer " + sys.argv[1]))
        client = app.test_client()
        me = {{"Authorization": "Bearer " + token}}
        for n in range(40):
            change = {{"action": "create", "modelName": "Author", "modelId": f"p{{sys.argv[1]}}-{{n}}", "data": {{"id": f"p{{sys.argv[1]}}-{{n}}", "name": "x"}}}}
            answer = client.post("/mutate", json={{"changes": [change]}}, headers=me)
            assert answer.status_code == 200, answer.get_data(as_text=True)
    """
    processes = [
        subprocess.Popen([sys.executable, "-c", textwrap.dedent(writer), str(n)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        for n in range(writers)
    ]
    for process in processes:
        _, errors = process.communicate(timeout=120)
        assert process.returncode == 0, errors
    with sqlite3.connect(database) as reader:
        ids = [sync_id for (sync_id,) in reader.execute("SELECT id FROM sync_action ORDER BY id")]
        authors = reader.execute("SELECT count(*) FROM authors WHERE id LIKE 'p%'").fetchone()[0]
    assert authors == 40 * writers
    assert ids == list(range(1, len(ids) + 1))  # one contiguous log: nothing lost, nothing doubled
