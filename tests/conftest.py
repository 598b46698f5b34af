import os
import threading

import pytest
from werkzeug.serving import make_server

import contract
from app import create_app
from helpers import ENGINES, POSTGRESQL_EXAMPLE, create, fresh_database, group, mutate, shut_down, sign_in, todo


NO_POSTGRESQL = f"the PostgreSQL half of the tests needs TEST_DATABASE_URL, e.g. {POSTGRESQL_EXAMPLE}"


def pytest_configure(config):
    config.addinivalue_line("markers", "sqlite_only(reason): the test is about SQLite itself; skipped on other engines")


@pytest.fixture(scope="session", autouse=True)
def checked_against_the_contract(tmp_path_factory):
    """Every Flask app of this process checks its responses against the
    contract (tests/contract.py), and so do the servers the tests start in
    processes of their own, which report to a file named in the environment."""
    report = tmp_path_factory.mktemp("contract") / "responses.jsonl"
    report.touch()
    with pytest.MonkeyPatch.context() as environment:
        environment.setenv(contract.REPORT, str(report))
        contract.install(reports_from=str(report))
        yield
        contract.uninstall()
    late = contract.TALLY.claim()
    if late:
        pytest.fail("responses received after the last test ended broke the contract:\n" + "\n".join(late), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.contract_call_failed = report.failed
    if report.skipped and isinstance(report.longrepr, tuple) and report.longrepr[2].startswith(f"Skipped: {NO_POSTGRESQL}"):
        report.longrepr = (__file__, None, report.longrepr[2])  # one line for the whole half in -rs, not one per test
    return report


@pytest.fixture(autouse=True)
def responses_keep_the_contract(request, checked_against_the_contract):
    """Fails the test if a response it received, from any server, broke the contract."""
    late = contract.TALLY.claim()
    if late:
        pytest.fail("responses received after an earlier test ended broke the contract:\n" + "\n".join(late), pytrace=False)
    yield
    violations = contract.TALLY.claim()
    if not violations:
        return
    text = "responses that break the contract of /openapi.json:\n" + "\n".join(violations)
    if getattr(request.node, "contract_call_failed", False):
        request.node.add_report_section("teardown", "contract", text)  # the test failed already, most likely on these
    else:
        pytest.fail(text, pytrace=False)


def pytest_terminal_summary(terminalreporter):
    here, servers = contract.TALLY.counts["here"], contract.TALLY.counts["servers"]
    unfinished = here["unfinished"] + servers["unfinished"]
    terminalreporter.write_line(
        f"{here['ok'] + servers['ok']} responses validated against /openapi.json "
        f"({here['ok']} in this process, {servers['ok']} by servers in processes of their own)"
        + (f"; {unfinished} streamed answers not read to their end by their client, so not checked" if unfinished else "")
    )


@pytest.fixture(params=ENGINES)
def engine(request) -> str:
    """Every test that touches a database runs on each engine: sqlite, and
    postgresql when TEST_DATABASE_URL is set."""
    if request.param == "postgresql" and not os.environ.get("TEST_DATABASE_URL"):
        pytest.skip(NO_POSTGRESQL)
    sqlite_only = request.node.get_closest_marker("sqlite_only")
    if sqlite_only and request.param != "sqlite":
        pytest.skip(f"SQLite only: {sqlite_only.args[0]}")
    return request.param


@pytest.fixture
def database_url(engine, tmp_path):
    """A new, empty database of the engine: a SQLite file, or a PostgreSQL schema of its own."""
    with fresh_database(engine, tmp_path) as url:
        yield url


@pytest.fixture
def app(database_url):
    """An app on its own fresh database."""
    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": database_url})
    yield app
    shut_down(app)


@pytest.fixture
def pg_app(tmp_path):
    """An app on a PostgreSQL schema of its own, for the tests about PostgreSQL alone (they skip without TEST_DATABASE_URL)."""
    with fresh_database("postgresql", tmp_path) as url:
        app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": url})
        yield app
        shut_down(app)


@pytest.fixture
def client(app):
    """Signed in as Ada, who has only `all` until she creates or joins a Group."""
    return sign_in(app, "Ada")


@pytest.fixture
def anonymous(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def seeded(client):
    """Ada creates groups g1 and g2 (so is a member of both), authors a1 and
    a2, and Todo t1 in g1: syncIds 1 to 5."""
    mutate(
        client,
        group("g1"),
        group("g2"),
        create("Author", "a1", name="Ada"),
        create("Author", "a2", name="Grace"),
        todo("t1", "g1"),
    )
    return client


@pytest.fixture
def base_url(app):
    """The app on a real threaded HTTP server on 127.0.0.1."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.port}"
    app.extensions["held_polls"].close()  # answer held long polls now, not after their wait
    server.shutdown()
    thread.join()
