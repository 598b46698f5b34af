import threading

import pytest
from werkzeug.serving import make_server

from app import create_app
from helpers import create, group, mutate, sign_in, todo
from models import db


@pytest.fixture
def app(tmp_path):
    """An app on its own fresh SQLite file."""
    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'loco.sqlite3'}"})
    yield app
    with app.app_context():
        db.engine.dispose()


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
    app.extensions["log_watcher"].close()  # answer held long polls now, not after their wait
    server.shutdown()
    thread.join()
