"""What the gevent worker (gunicorn.conf.py) needs of the app, and nothing else does.

Under gunicorn's gevent worker every request is a greenlet on one event loop
per process, so a held poll costs a socket and a few kilobytes, not a thread.
gevent's monkey-patching makes sockets, locks, sleeps and psycopg (3.1.14 and
later) give way to other greenlets while they wait. A SQLite write transaction
would still stop the whole loop while it waits for the cross-process write lock
(flock), the busy handler or fsync, so it runs in gevent's thread pool instead
(writer.py). SQLite reads stay on the loop: in WAL mode they never wait for a
lock. The rest: a signal handler's work moved out of it, turns given to waiting
requests, a client's leaving noticed, a stopping worker's last answers. Under
the threaded servers (`flask run`, gthread) they run work directly, or do nothing.
Proved by tests/test_connected.py (a client that leaves frees its poll; thousands
of held polls never delay a mutation; shutdown) and tests/test_gunicorn.py.
"""

from __future__ import annotations

import contextvars
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def patched() -> bool:
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and monkey.is_module_patched("threading")


def off_the_loop(work: Callable[..., T], *args: Any) -> T:
    """Run `work` in a thread of gevent's pool, in this greenlet's context (Flask's app and request),
    this greenlet waiting and the loop going on."""
    if not patched():
        return work(*args)
    import gevent

    return gevent.get_hub().threadpool.apply(contextvars.copy_context().run, (work, *args))


def outside_signal_handler(work: Callable[[], None]) -> None:
    """Run `work` soon, in a greenlet (or thread) of its own. A signal handler runs inside whatever
    was running, the event loop included, where waiting for a lock fails; and a second SIGTERM
    (gunicorn's master sends one of its own) would find the first holding it."""
    if patched():
        import gevent

        gevent.spawn(work)
    else:
        threading.Thread(target=work, daemon=True).start()


def after_waiting_requests() -> None:
    """Wait until the loop has served what already waits on it (requests that arrived, commits
    that finished): a long run of work does not hold them all, and goes on only as fast as the
    loop keeps up. (A timer's turn instead let 10,000 woken clients' next polls empty the pool.)"""
    if patched():
        import gevent

        gevent.idle()


def when_client_leaves(environ: dict, callback: Callable[[], None]) -> Callable[[], None]:
    """Call `callback` once if the client closes its connection; returns what stops watching.

    A client waiting for its answer sends nothing, so its socket turning readable
    means it closed (or, rarely, pipelined its next request: then watching stops)."""
    client = environ.get("gunicorn.socket")
    if client is None or not patched():
        return lambda: None
    import gevent
    from gevent.monkey import get_original

    fileno = client.fileno()
    watcher = gevent.get_hub().loop.io(fileno, 1)  # 1: readable

    def readable() -> None:
        # In the loop's own callback nothing may wait: peek through the unpatched socket.
        watcher.stop()
        peek = get_original("socket", "socket")(fileno=fileno)
        try:
            gone = peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            watcher.start(readable)  # nothing there after all
            return
        except OSError:
            gone = True
        finally:
            peek.detach()  # the fd stays the server's
        if gone:
            callback()

    watcher.start(readable)
    return watcher.close


def last_answer(environ: dict) -> None:
    """The connection closes once this answer is sent: its client will reconnect to a running server.
    (A keep-alive connection waiting for its next request would hold a stopping worker for
    gunicorn's graceful_timeout.)"""
    client = environ.get("gunicorn.socket")
    if client is not None:
        try:
            client.shutdown(socket.SHUT_RD)  # the next read finds the end: gunicorn closes the connection
        except OSError:
            pass
