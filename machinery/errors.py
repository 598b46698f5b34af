"""The one error type every refusal is raised as; app.py's handlers turn it into JSON.

It lives here, not in app.py, so that the modules below app.py (the writer's
503, input's 400s) can raise it without importing app.py.
Proved by tests/test_errors.py and the contract check of every answer (tests/contract.py).
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """Any refusal. `type` is Loco Sync's NetworkErrorType: the client rolls
    a transaction back on "server" and retries on "auth" and "network"."""

    def __init__(self, status: int, code: str, message: str, *, type: str = "server", details: Any = None, headers=None):
        super().__init__(message)
        self.status, self.code, self.message, self.type = status, code, message, type
        self.details, self.headers = details, headers or {}


def database_busy(message: str) -> ApiError:
    """A transient fault of the database: type network, so the client retries the request later."""
    return ApiError(503, "database_busy", message, type="network", headers={"Retry-After": "1"})
