"""The ceiling for request rates: a Flask app whose one endpoint does nothing
but answer JSON, served by gunicorn exactly as the real app is."""

from flask import Flask

app = Flask(__name__)


@app.get("/")
def noop():
    return {"ok": True}
