"""Every production setting: `gunicorn 'app:create_app()'` from the project root reads
this file from the directory it starts in (docs/production.md). Flags given on the
command line, or in GUNICORN_CMD_ARGS, override it.

Clients stay connected: each holds a long poll (GET /sync?wait=) most of the
time. gevent's worker serves every connection of a process as a greenlet on
one event loop, so a held poll costs a socket and a little memory, not a
thread (machinery/event_loop.py says what the app does for it). On SIGTERM
each worker answers its held polls at once, then shuts down as usual.
"""

import multiprocessing
import signal

bind = "127.0.0.1:8000"
# Two event loops a core: a keep-alive connection stays on the worker that accepted it, and with
# one a core all of a client's connections sometimes landed on one, leaving a core idle.
workers = 2 * multiprocessing.cpu_count()
worker_class = "gevent"
worker_connections = 10_000  # a process's open connections, held polls included; each needs a file descriptor
backlog = 4096  # connections waiting to be accepted, as after a restart, when every client reconnects at once
# Browsers and Node's http agent reuse an idle connection for seconds after its last answer
# (gunicorn's default of 2 s was shorter, and clients saw ECONNRESET on reuse): keep it
# open longer than any of them, as nginx does by default.
keepalive = 75
timeout = 60  # a worker whose loop is stuck this long is restarted
graceful_timeout = 10


def post_worker_init(worker):
    graceful_exit = signal.getsignal(signal.SIGTERM)

    from machinery import event_loop

    def release_held_polls_then_exit(signum, frame):
        graceful_exit(signum, frame)  # marks the worker as stopping, nothing more
        held_polls = getattr(worker.wsgi, "extensions", {}).get("held_polls")
        if held_polls is not None:
            event_loop.outside_signal_handler(held_polls.close)

    signal.signal(signal.SIGTERM, release_held_polls_then_exit)
