"""What a client in a browser needs beyond the protocol: CORS headers, and the demo page.

Client prototypes often run on another origin (a dev server), so every answer
allows it. The API uses no cookies, so a page can only send what it could send
anyway. The demo page at / is two clients side by side, built on
static/loco-network.js, with their tokens in the URL fragment.
Proved by tests/test_cors.py and tests/test_demo.py.
"""

from __future__ import annotations

from flask import current_app, render_template


def allow_cross_origin(response):
    response.headers["Access-Control-Allow-Origin"] = current_app.config["CORS_ORIGIN"]
    response.headers["Access-Control-Allow-Methods"] = "GET, POST"
    response.headers["Access-Control-Allow-Headers"] = "Content-Type, Authorization, Loco-Schema-Version"
    response.headers["Access-Control-Expose-Headers"] = "Retry-After"
    response.headers["Access-Control-Max-Age"] = "600"
    return response


def demo_page():
    return render_template("demo.html")
