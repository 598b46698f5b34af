"""gunicorn reads this file from the directory it starts in.

Held long polls (GET /sync?wait=) would make a graceful shutdown wait for
them; on SIGTERM each worker answers them at once, then shuts down as usual.
"""

import signal
import sys


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
