"""Every production setting: `gunicorn 'app:create_app()'` from the project root reads
this file from the directory it starts in (docs/production.md). Flags given on the
command line, or in GUNICORN_CMD_ARGS, override it.

Held long polls (GET /sync?wait=) would make a graceful shutdown wait for
them; on SIGTERM each worker answers them at once, then shuts down as usual.
"""

import multiprocessing
import signal
import sys

bind = "127.0.0.1:8000"
workers = 2 * multiprocessing.cpu_count()  # a keep-alive connection stays on its worker: two a core keep cores busy
worker_class = "gthread"
threads = 4  # each held long poll holds one of them
# Browsers and Node's http agent reuse an idle connection for seconds after its last answer
# (gunicorn's default of 2 s was shorter, and clients saw ECONNRESET on reuse): keep it
# open longer than any of them, as nginx does by default.
keepalive = 75
timeout = 60  # a worker silent this long is restarted; it answers between requests, not per poll
graceful_timeout = 10


def post_worker_init(worker):
    # A thread that waits on SQLite or a socket gives up the GIL, and getting
    # it back takes up to the switch interval (5 ms by default) while another
    # thread computes. With 8 threads a worker, requests then queued behind one
    # another: the same load ran at 350 or 1,650 requests/s, by chance.
    sys.setswitchinterval(0.0005)

    graceful_exit = signal.getsignal(signal.SIGTERM)

    def release_held_polls_then_exit(signum, frame):
        log_watcher = getattr(worker.wsgi, "extensions", {}).get("log_watcher")
        if log_watcher is not None:
            log_watcher.close()
        graceful_exit(signum, frame)

    signal.signal(signal.SIGTERM, release_held_polls_then_exit)
