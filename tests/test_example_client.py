"""examples/client.py, the README's client, against `flask run` on a seeded database: after
each answer its store must be exactly the rows the database holds in its user's sync groups,
through another user's writes, a group joined and left, and the database reset under it."""

from __future__ import annotations

import http.server
import importlib.util
import json
import queue
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from helpers import delete, query, stored_rows, todo, update, wire
from readers import ROOT, flask_command, flask_run, seeded_tokens

CLIENT = ROOT / "examples" / "client.py"
spec = importlib.util.spec_from_file_location("example_client", CLIENT)
client = importlib.util.module_from_spec(spec)
spec.loader.exec_module(client)


@pytest.fixture
def served(database_url, tmp_path):
    """flask run, then flask --app app seed, as the README's quick start says."""
    with flask_run(database_url, tmp_path) as address:
        tokens = seeded_tokens(flask_command(database_url, "seed"))
        yield f"http://{address}", tokens


def seen_by(database_url: str, user_name: str) -> str:
    """The rows of the database in the user's sync groups, read from its tables, as wire JSON text.
    A Group is in group:<id>, a Todo in group:<groupId>, an Author in all (models.py)."""
    members = "SELECT m.sync_group FROM memberships m JOIN users u ON u.id = m.user_id WHERE u.name = :name"
    groups = {"all"} | {group for (group,) in query(database_url, members, name=user_name)}
    group_of = {
        "Author": lambda row: "all",
        "Group": lambda row: f"group:{row['id']}",
        "Todo": lambda row: f"group:{row['groupId']}",
    }
    rows = stored_rows(database_url)
    return as_text({model: {row["id"]: row for row in found if group_of[model](row) in groups} for model, found in rows.items()})


def as_text(store: dict[str, dict[str, dict]]) -> str:
    return wire({model: rows for model, rows in store.items() if rows})


def mutate(base: str, token: str, *changes: dict) -> int:
    request = urllib.request.Request(
        f"{base}/mutate",
        data=json.dumps({"changes": list(changes)}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)["lastSyncId"]


def test_the_client_keeps_its_store_equal_to_the_server(served, database_url):
    base, tokens = served
    headers = {"Authorization": f"Bearer {tokens['Grace']}"}
    stores = client.sync(base, headers)
    try:
        # Eager bootstrap: Grace's rows (all and group:g1), never the Garden.
        store = next(stores)
        assert as_text(store) == seen_by(database_url, "Grace")
        assert set(store["Group"]) == {"g1"} and set(store["Todo"]) == {"t1", "t2"}

        # Ada writes while Grace's poll is held: the poll answers with it at once.
        threading.Timer(0.5, mutate, (base, tokens["Ada"], update("Todo", "t1", isDone=True, text="Buy beans"))).start()
        started = time.monotonic()
        store = next(stores)
        assert time.monotonic() - started < 10, "the long poll was not woken by the commit"
        assert wire(store["Todo"]["t1"]) == wire(
            {"id": "t1", "text": "Buy beans", "authorId": "a1", "groupId": "g1", "isDone": True, "likeCount": 0}
        )
        assert as_text(store) == seen_by(database_url, "Grace")

        # An insert adds a row, a delete removes one.
        mutate(base, tokens["Ada"], todo("t4", "g1", text="Mop the floor"), delete("Todo", "t2"))
        store = next(stores)
        assert "t4" in store["Todo"] and "t2" not in store["Todo"]
        assert as_text(store) == seen_by(database_url, "Grace")

        # Grace joins the Garden. Before that, Ada writes 1,000 actions there, so that the poll
        # that brings group:g2 is a full page (hasMore), then one in the Kitchen and one more in
        # the Garden: the lazy bootstrap reflects both, and the stream re-applies them after it.
        mutate(base, tokens["Ada"], *(update("Todo", "t3", likeCount=n) for n in range(1, 1001)))
        mutate(base, tokens["Ada"], update("Todo", "t1", likeCount=7))
        mutate(base, tokens["Ada"], update("Todo", "t3", text="Water the roses"))
        assert "is a member of group:g2" in flask_command(database_url, "add-member", "2", "g2")
        store = next(stores)
        assert "g2" in store["Group"], "the newly joined group was not bootstrapped"
        assert store["Todo"]["t3"]["text"] == "Water the roses"
        store = next(stores)
        assert as_text(store) == seen_by(database_url, "Grace")
        assert wire([store["Todo"]["t1"]["likeCount"], store["Todo"]["t3"]["likeCount"]]) == wire([7, 1000])

        # Grace leaves it: the next answer (Ada's write wakes the poll) drops its rows.
        assert "is not a member of group:g2" in flask_command(database_url, "remove-member", "2", "g2")
        mutate(base, tokens["Ada"], update("Todo", "t1", isDone=False))
        store = next(stores)
        assert "g2" not in store["Group"] and "t3" not in store["Todo"]
        assert as_text(store) == seen_by(database_url, "Grace")

        # The database is reset and seeded again. Grace's token is gone (401: the client retries)
        # until she signs in again; then her cursor is unknown (409) and the client bootstraps anew.
        flask_command(database_url, "init-db")
        new_tokens = seeded_tokens(flask_command(database_url, "seed"))
        threading.Timer(1.5, headers.update, ({"Authorization": f"Bearer {new_tokens['Grace']}"},)).start()
        store = next(stores)
        assert as_text(store) == seen_by(database_url, "Grace")
        assert set(store["Todo"]) == {"t1", "t2"} and store["Todo"]["t1"]["text"] == "Buy coffee"
    finally:
        stores.close()


def test_run_from_the_command_line_it_prints_the_store_after_each_answer(served, database_url):
    base, tokens = served
    running = subprocess.Popen([sys.executable, str(CLIENT), base, tokens["Ada"]], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in running.stdout], daemon=True).start()
    try:
        assert as_text(json.loads(lines.get(timeout=30))) == seen_by(database_url, "Ada")
        mutate(base, tokens["Grace"], update("Todo", "t2", likeCount=1))
        store = json.loads(lines.get(timeout=30))
        assert wire(store["Todo"]["t2"]["likeCount"]) == wire(1)
        assert as_text(store) == seen_by(database_url, "Ada")
    finally:
        running.terminate()
        running.wait(timeout=10)


@pytest.fixture
def flaky_front(served):
    """A stand-in for a proxy in front of the server: its first answer is a 502 page of its own,
    its second is cut short mid-body; every later request is passed through."""
    base, tokens = served
    faults = ["bad gateway", "cut short"]

    class Front(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            fault = faults.pop(0) if faults else None
            if fault == "bad gateway":
                self.send_response(502)
                self.send_header("Content-Type", "text/html")
                self.end_headers()
                self.wfile.write(b"<html><body>502 Bad Gateway</body></html>")
                return
            if fault == "cut short":
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "4096")
                self.end_headers()
                self.wfile.write(b'{"bootstrap":{"Group":[')
                self.close_connection = True
                return
            forwarded = urllib.request.Request(base + self.path, headers={"Authorization": self.headers["Authorization"]})
            try:
                with urllib.request.urlopen(forwarded, timeout=60) as answer:
                    status, body = answer.status, answer.read()
            except urllib.error.HTTPError as error:
                status, body = error.code, error.read()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    front = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Front)
    threading.Thread(target=front.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{front.server_port}", tokens, faults
    front.shutdown()
    front.server_close()


def test_answers_not_from_the_server_or_cut_short_are_retried_as_network_faults(flaky_front, database_url):
    """Loco Sync retries a network fault; only the server's own type server refusal ends the client."""
    front, tokens, faults = flaky_front
    stores = client.sync(front, {"Authorization": f"Bearer {tokens['Grace']}"})
    try:
        store = next(stores)
        assert faults == []  # both faults were met on the way to this store
        assert as_text(store) == seen_by(database_url, "Grace")
    finally:
        stores.close()
