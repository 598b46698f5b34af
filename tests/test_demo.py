"""The live demo at /, clicked through in a real browser: Debian's Chromium
driven by Playwright, against the app on a real HTTP server.

Skipped when Chromium or Playwright is missing, unless
LOCO_REQUIRE_TOOLS=1 (CI sets it, so a missing install fails).
"""

import json
import os
import re
from pathlib import Path

import pytest

from machinery.cli import demo_fragment, seed_demo
from helpers import read_log, wire

CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = Path(__file__).parent / "screenshots"
# As root, on a machine with no outside network: no sandbox, no background traffic.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def browser_or_skip():
    missing = []
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("Playwright for Python (pip install -r requirements-dev.txt)")
        sync_playwright = None
    if not os.path.exists(CHROMIUM):
        missing.append(f"Chromium at {CHROMIUM} (apt-get install chromium)")
    if missing:
        reason = "the browser test needs " + " and ".join(missing)
        if os.environ.get("LOCO_REQUIRE_TOOLS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return sync_playwright


@pytest.fixture
def browser_page():
    """A Chromium page that records console errors and warnings, and uncaught page errors."""
    sync_playwright = browser_or_skip()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.console_lines, page.page_errors = [], []
        page.on("console", lambda m: m.type in ("error", "warning") and page.console_lines.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda error: page.page_errors.append(str(error)))
        yield page
        browser.close()


@pytest.fixture
def demo(app, base_url, browser_page):
    """The demo page, signed in as Ada (left) and Grace (right)."""
    with app.app_context():
        tokens, _ = seed_demo()
    browser_page.goto(f"{base_url}/{demo_fragment(tokens)}")
    return Demo(browser_page, tokens)


class Demo:
    def __init__(self, page, tokens):
        self.page, self.tokens = page, tokens
        self.ada = page.locator("section[data-client=Ada]")
        self.grace = page.locator("section[data-client=Grace]")

    def todo(self, panel, text):
        return panel.locator("li.todo", has_text=text)

    def add(self, panel, text, group="Kitchen"):
        panel.get_by_label("New todo", exact=True).fill(text)
        panel.get_by_label("Group", exact=True).select_option(label=group)
        panel.get_by_role("button", name="Add").click()

    def edit(self, panel, old, new):
        self.todo(panel, old).get_by_role("button", name="Edit").click()
        field = panel.get_by_label(f"New text for {old}")
        field.fill(new)
        field.press("Enter")


def screenshot(page, name):
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=SCREENSHOTS / name, full_page=True)
    assert (SCREENSHOTS / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def log_of(app, tokens):
    with app.test_client() as client:
        client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {tokens['Ada']}"
        return read_log(client)


def test_the_demo_page_is_served_without_a_token(anonymous):
    page = anonymous.get("/")

    assert page.status_code == 200 and page.mimetype == "text/html"
    assert b'src="/static/demo.js"' in page.data
    assert anonymous.get("/static/loco-network.js").status_code == 200


def test_the_demo_page_shows_a_todos_life_in_both_clients_and_replays_offline_changes(app, demo):
    from playwright.sync_api import expect

    page, ada, grace = demo.page, demo.ada, demo.grace
    for panel in (ada, grace):
        expect(panel.get_by_role("status")).to_contain_text("Live")
    expect(grace.locator(".groups")).to_have_text("Sync groups: all, group:g1")
    expect(demo.todo(grace, "Buy coffee")).to_be_visible()
    expect(demo.todo(grace, "Water the tomatoes")).to_have_count(0)  # g2 is Ada's alone

    # A todo's life: created by Ada, ticked by Grace, renamed by Ada, deleted by Grace.
    demo.add(ada, "Bake bread")
    expect(demo.todo(grace, "Bake bread")).to_be_visible()
    todo_id = demo.todo(grace, "Bake bread").get_attribute("data-id")
    insert = next(a for a in log_of(app, demo.tokens) if a["modelId"] == todo_id)
    expect(grace.locator("ol.actions li").first.locator("summary")).to_have_text(re.compile(rf"^{insert['syncId']}\s*insert\s*Todo\s*{todo_id}$"))

    demo.todo(grace, "Bake bread").get_by_role("checkbox").check()
    expect(demo.todo(ada, "Bake bread").get_by_role("checkbox")).to_be_checked()
    demo.edit(ada, "Bake bread", "Bake sourdough")
    expect(demo.todo(grace, "Bake sourdough")).to_be_visible()
    demo.todo(grace, "Bake sourdough").get_by_role("button", name="Delete").click()
    expect(demo.todo(ada, "Bake sourdough")).to_have_count(0)
    history = [a["action"] for a in log_of(app, demo.tokens) if a["modelId"] == todo_id]
    assert history == ["insert", "update", "update", "delete"]
    head = log_of(app, demo.tokens)[-1]["syncId"]
    expect(ada.locator(".cursor")).to_have_text(f"Cursor (lastSyncId applied): {head}")
    expect(grace.locator(".cursor")).to_have_text(f"Cursor (lastSyncId applied): {head}")

    # Offline: Grace's changes queue up, visible to her only, and replay on reconnect.
    grace.get_by_label("Offline", exact=True).check()
    expect(grace.get_by_role("status")).to_contain_text("Offline")
    demo.add(grace, "Written offline")
    demo.edit(grace, "Buy coffee", "Buy decaf")
    expect(demo.todo(grace, "Written offline").locator(".badge")).to_have_text("queued")
    expect(demo.todo(grace, "Buy decaf").locator(".badge")).to_have_text("queued")
    expect(grace.get_by_role("status")).to_contain_text("2 queued")
    screenshot(page, "demo-offline.png")

    # Meanwhile Ada deletes the todo Grace renamed: the replayed rename must be refused.
    demo.todo(ada, "Buy coffee").get_by_role("button", name="Delete").click()
    page.wait_for_timeout(1500)  # several poll intervals: nothing may leak out of an offline client
    expect(demo.todo(ada, "Written offline")).to_have_count(0)
    expect(demo.todo(grace, "Buy decaf")).to_be_visible()

    grace.get_by_label("Offline", exact=True).uncheck()
    expect(demo.todo(ada, "Written offline")).to_be_visible()
    expect(demo.todo(grace, "Written offline").locator(".badge")).to_have_count(0)
    expect(grace.locator(".rejection")).to_contain_text("update Todo t1")
    expect(grace.locator(".rejection")).to_contain_text("409 does_not_exist")
    expect(demo.todo(grace, "Buy decaf")).to_have_count(0)  # rolled back, and t1 is gone
    expect(demo.todo(grace, "Buy coffee")).to_have_count(0)
    expect(grace.get_by_role("status")).to_contain_text("Live")
    expect(grace.get_by_role("status")).to_contain_text("0 unconfirmed")

    # Both clients end with exactly the server's rows.
    for panel in (ada, grace):
        expect(panel.locator(".cursor")).to_have_text(f"Cursor (lastSyncId applied): {log_of(app, demo.tokens)[-1]['syncId']}")
    expect(grace.locator("li.todo")).to_have_text(["Descale the kettle Edit Delete", "Written offline Edit Delete"], use_inner_text=True)

    screenshot(page, "demo.png")

    assert page.page_errors == []
    # The refused rename is a 409, which Chromium logs as a failed resource; nothing else may be logged.
    assert page.console_lines == ["error: Failed to load resource: the server responded with a status of 409 (CONFLICT)"]


def requests_of(panel) -> list[tuple[str, str, str, float | None]]:
    """The panel's request log, newest first: method, path, status, and seconds taken (None while pending)."""
    lines = panel.locator("ol.requests li").evaluate_all(
        "lines => lines.map(line => ['.method', '.path', '.code', '.took'].map(part => line.querySelector(part).textContent))"
    )
    return [(method, path, status, seconds(took)) for method, path, status, took in lines]


def seconds(took: str) -> float | None:
    if not took:
        return None
    number, unit = re.fullmatch(r"([0-9.]+) (ms|s)", took).groups()
    return float(number) / 1000 if unit == "ms" else float(number)


def test_each_client_shows_its_requests_and_the_row_each_action_carries(app, demo):
    from playwright.sync_api import expect

    page, ada, grace = demo.page, demo.ada, demo.grace
    for panel in (ada, grace):
        expect(panel.get_by_role("status")).to_contain_text("Live")
    head = log_of(app, demo.tokens)[-1]["syncId"]

    # Grace's start, oldest last: bootstrap, handshake, then a long poll from the head, held.
    poll = f"/sync?since={head}&wait=25"
    held = grace.locator("ol.requests li").first
    expect(held.locator(".path")).to_have_text(poll)
    expect(held.locator(".code")).to_have_text("…")
    _, handshake, bootstrap = requests_of(grace)
    assert handshake[:3] == ("GET", "/sync", "200") and handshake[3] < 5
    assert bootstrap[:3] == ("GET", "/bootstrap?type=eager&models=Group%2CAuthor%2CTodo", "200") and bootstrap[3] < 5

    page.wait_for_timeout(1500)
    demo.add(ada, "Bake bread")
    expect(demo.todo(grace, "Bake bread")).to_be_visible()
    todo_id = demo.todo(grace, "Bake bread").get_attribute("data-id")

    # The poll Grace held answered when Ada's insert committed: after the 1.5 s we waited, well before its 25.
    expect(grace.locator("ol.requests li").first.locator(".path")).to_have_text(f"/sync?since={head + 1}&wait=25")
    answered = [line for line in requests_of(grace) if line[1] == poll]
    assert len(answered) == 1 and answered[0][2] == "200" and 1.5 <= answered[0][3] < 10, answered
    assert requests_of(grace)[0][2:] == ("…", None)  # the next poll, held
    expect(ada.locator("ol.requests li", has_text="POST").locator(".code")).to_have_text("200")
    mutations = [line for line in requests_of(ada) if line[0] == "POST"]
    assert [line[1:3] for line in mutations] == [("/mutate", "200")] and mutations[0][3] < 5

    # Opening the insert shows the row Ada wrote, as JSON with its types.
    written = {"id": todo_id, "text": "Bake bread", "authorId": "a1", "groupId": "g1", "isDone": False, "likeCount": 0}
    insert = grace.locator("ol.actions li.action").first
    expect(insert.locator("summary")).to_have_text(re.compile(rf"^{head + 1}\s*insert\s*Todo\s*{todo_id}$"))
    expect(insert.locator("pre")).to_be_hidden()
    insert.locator("summary").click()
    expect(insert.locator("pre")).to_be_visible()
    shown = wire(json.loads(insert.locator("pre").text_content()))
    assert shown == wire(written) == wire(log_of(app, demo.tokens)[-1]["data"])

    # An update carries the whole row; a delete carries none, so it does not open.
    demo.todo(grace, "Bake bread").get_by_role("checkbox").check()
    update = ada.locator("ol.actions li.action").first
    expect(update.locator("summary")).to_have_text(re.compile(rf"^{head + 2}\s*update\s*Todo\s*{todo_id}$"))
    update.locator("summary").click()
    expect(update.locator("pre")).to_be_visible()
    assert wire(json.loads(update.locator("pre").text_content())) == wire({**written, "isDone": True})
    demo.todo(grace, "Bake bread").get_by_role("button", name="Delete").click()
    delete = ada.locator("ol.actions li.action").first
    expect(delete).to_have_text(re.compile(rf"^{head + 3}\s*delete\s*Todo\s*{todo_id}$"))
    expect(delete.locator("details, pre")).to_have_count(0)

    screenshot(page, "demo-wire.png")
    assert page.page_errors == [] and page.console_lines == []


def test_todos_keep_their_creation_order_live_and_after_a_reload(app, demo):
    from playwright.sync_api import expect

    page, ada, grace = demo.page, demo.ada, demo.grace
    expect(grace.get_by_role("status")).to_contain_text("Live")
    # Not alphabetical, and "Air the room" is written offline: created before "Wash up", it reaches the log after it.
    demo.add(ada, "Mop the floor")
    expect(demo.todo(grace, "Mop the floor")).to_be_visible()
    grace.get_by_label("Offline", exact=True).check()
    expect(grace.get_by_role("status")).to_contain_text("Offline")
    demo.add(grace, "Air the room")
    demo.add(ada, "Wash up")
    expect(demo.todo(ada, "Wash up")).to_be_visible()
    expect(ada.get_by_role("status")).to_contain_text("· 0 unconfirmed")  # committed before Grace reconnects
    grace.get_by_label("Offline", exact=True).uncheck()
    expect(demo.todo(ada, "Air the room")).to_be_visible()
    expect(demo.todo(grace, "Wash up")).to_be_visible()
    inserted = [a["data"]["text"] for a in log_of(app, demo.tokens) if a["modelName"] == "Todo" and a["action"] == "insert"]
    assert inserted[-3:] == ["Mop the floor", "Wash up", "Air the room"]

    kitchen = ["Buy coffee", "Descale the kettle", "Mop the floor", "Air the room", "Wash up"]
    for panel in (ada, grace):
        expect(panel.locator(".group", has_text="Kitchen").locator("li.todo .text")).to_have_text(kitchen)
    page.reload()
    for panel in (ada, grace):
        expect(panel.get_by_role("status")).to_contain_text("Live")
        expect(panel.locator(".group", has_text="Kitchen").locator("li.todo .text")).to_have_text(kitchen)
    assert page.page_errors == [] and page.console_lines == []


def test_the_demo_asks_for_two_tokens_and_says_plainly_when_one_is_refused(app, base_url, browser_page):
    from playwright.sync_api import expect

    page = browser_page
    with app.app_context():
        tokens, _ = seed_demo()
    page.goto(base_url)
    form = page.locator("form#sign-in")
    expect(form).to_be_visible()
    for legend, name, token in [("Left client", "Ada", tokens["Ada"]), ("Right client", "Grace", "2.not-the-secret")]:
        fieldset = form.locator("fieldset", has_text=legend)
        fieldset.get_by_label("Name").fill(name)
        fieldset.get_by_label("Token").fill(token)
    form.get_by_role("button", name="Start both clients").click()

    ada, grace = page.locator("section[data-client=Ada]"), page.locator("section[data-client=Grace]")
    expect(ada.get_by_role("status")).to_contain_text("Live")
    expect(grace.get_by_role("status")).to_contain_text("Signed out")
    expect(grace.locator(".rejection")).to_contain_text("The server refused Grace's token: 401 unauthorized")
    expect(form).to_be_hidden()
    screenshot(page, "demo-refused.png")

    grace.get_by_role("link", name="sign in again").click()
    expect(form).to_be_visible()
    assert page.page_errors == []
    assert page.console_lines == ["error: Failed to load resource: the server responded with a status of 401 (UNAUTHORIZED)"]


def flask(app, *args: str) -> str:
    """Runs `flask --app app ARGS...` on the demo's database, as an operator would while it runs."""
    result = app.test_cli_runner().invoke(args=list(args))
    assert result.exit_code == 0, result.output
    return result.output


def bootstraps(panel) -> list[str]:
    return [path for _, path, _, _ in requests_of(panel) if path.startswith("/bootstrap")]


def test_a_client_removed_from_a_group_starts_over_and_the_other_is_unaffected(app, demo):
    from playwright.sync_api import expect

    page, ada, grace = demo.page, demo.ada, demo.grace
    for panel in (ada, grace):
        expect(panel.get_by_role("status")).to_contain_text("Live")
    kitchen = ["Buy coffee", "Descale the kettle"]
    expect(grace.locator("li.todo .text")).to_have_text(kitchen)
    expect(grace.locator(".reset-notice")).to_be_hidden()

    # The Loco Sync client cannot drop a lost group's rows: the adapter says to start over.
    flask(app, "remove-member", demo.tokens["Grace"].split(".")[0], "g1")
    expect(grace.locator(".reset-notice")).to_have_text("Started over: removed from group:g1. Its store was emptied and bootstrapped again.")
    expect(grace.locator(".reset-notice")).to_be_visible()
    expect(grace.locator("ol.actions li.note").first).to_have_text(re.compile(r"^bootstrap: 2 rows as of syncId 7$"))
    expect(grace.locator("ol.actions li.note", has_text="starting over")).to_have_text(["starting over: removed from group:g1"])
    expect(grace.get_by_role("status")).to_contain_text("Live")
    expect(grace.locator(".groups")).to_have_text("Sync groups: all")
    expect(grace.locator("li.todo")).to_have_count(0)
    expect(grace.locator(".group")).to_have_count(0)  # not even the Kitchen's heading
    expect(grace.locator("form.add")).to_be_hidden()  # no group to add a todo to
    assert len(bootstraps(grace)) == 2

    # Ada's panel carries on: no notice, no new bootstrap, and her writes to the Kitchen never reach Grace.
    expect(ada.locator(".reset-notice")).to_be_hidden()
    expect(ada.locator(".groups")).to_have_text("Sync groups: all, group:g1, group:g2")
    expect(ada.get_by_role("status")).to_contain_text("Live")
    demo.add(ada, "Bake bread")
    expect(demo.todo(ada, "Bake bread")).to_be_visible()
    expect(ada.locator(".group", has_text="Kitchen").locator("li.todo .text")).to_have_text([*kitchen, "Bake bread"])
    head = log_of(app, demo.tokens)[-1]["syncId"]
    expect(ada.locator(".cursor")).to_have_text(f"Cursor (lastSyncId applied): {head}")
    page.wait_for_timeout(1000)  # had Grace's poll been answered with it, it would show by now
    expect(grace.locator("li.todo")).to_have_count(0)
    expect(grace.locator(".cursor")).to_have_text("Cursor (lastSyncId applied): 7")
    assert bootstraps(ada) == ["/bootstrap?type=eager&models=Group%2CAuthor%2CTodo"]

    screenshot(page, "demo-reset.png")
    assert page.page_errors == [] and page.console_lines == []


def test_a_client_behind_a_compacted_log_starts_over_and_says_what_it_dropped(app, demo):
    from playwright.sync_api import expect

    page, ada, grace = demo.page, demo.ada, demo.grace
    for panel in (ada, grace):
        expect(panel.get_by_role("status")).to_contain_text("Live")
    # Grace goes offline, at syncId 7, with a change queued; the log moves on and is compacted past her cursor.
    grace.get_by_label("Offline", exact=True).check()
    expect(grace.get_by_role("status")).to_contain_text("Offline")
    demo.add(grace, "Written offline")
    demo.add(ada, "Bake bread")
    demo.add(ada, "Wash up")
    head = 9  # the seed's 7, and Ada's two
    expect(ada.locator(".cursor")).to_have_text(f"Cursor (lastSyncId applied): {head}")
    expect(ada.get_by_role("status")).to_contain_text("· 0 unconfirmed")
    assert log_of(app, demo.tokens)[-1]["syncId"] == head
    expect(grace.locator(".cursor")).to_have_text("Cursor (lastSyncId applied): 7")
    assert "it now starts after syncId 8." in flask(app, "compact-log", "--before", str(head))

    # Ada's cursor is at the head, which the log still holds: nothing changes for her.
    page.wait_for_timeout(500)
    expect(ada.get_by_role("status")).to_contain_text("Live")
    expect(ada.locator(".reset-notice")).to_be_hidden()

    grace.get_by_label("Offline", exact=True).uncheck()
    expect(grace.locator(".reset-notice")).to_have_text(
        "Started over: the log was compacted past this client's cursor. Its store was emptied and bootstrapped again. "
        "1 unconfirmed change was dropped."
    )
    expect(grace.get_by_role("status")).to_contain_text("Live")
    expect(grace.get_by_role("status")).to_contain_text("· 0 unconfirmed")
    expect(grace.locator(".cursor")).to_have_text(f"Cursor (lastSyncId applied): {head}")
    expect(grace.locator("li.todo .text")).to_have_text(["Buy coffee", "Descale the kettle", "Bake bread", "Wash up"])
    refused = [line for line in requests_of(grace) if line[2] == "409"]
    assert refused and all(re.fullmatch(r"(/sync\?since=7&until=9|/mutate)", path) for _, path, _, _ in refused), refused
    assert bootstraps(grace) == ["/bootstrap?type=eager&models=Group%2CAuthor%2CTodo"] * 2

    expect(ada.locator(".reset-notice")).to_be_hidden()
    expect(ada.locator("li.todo .text")).to_have_text(["Buy coffee", "Descale the kettle", "Bake bread", "Wash up", "Water the tomatoes"])
    assert bootstraps(ada) == ["/bootstrap?type=eager&models=Group%2CAuthor%2CTodo"]
    with app.test_client() as client:  # the dropped change never reached the server
        client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {demo.tokens['Ada']}"
        stored = client.get("/bootstrap?type=eager&models=Todo").get_json()
    assert stored["firstSyncId"] == head
    assert sorted(row["text"] for row in stored["bootstrap"]["Todo"]) == ["Bake bread", "Buy coffee", "Descale the kettle", "Wash up", "Water the tomatoes"]

    screenshot(page, "demo-compacted.png")
    assert page.page_errors == []
    assert set(page.console_lines) == {"error: Failed to load resource: the server responded with a status of 409 (CONFLICT)"}
