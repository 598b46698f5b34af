"""gunicorn reads this file from the directory it starts in.

Held long polls (GET /sync?wait=) would make a graceful shutdown wait for
them; on SIGTERM each worker answers them at once, then shuts down as usual.
"""

import signal


def post_worker_init(worker):
    graceful_exit = signal.getsignal(signal.SIGTERM)

    def release_held_polls_then_exit(signum, frame):
        worker.wsgi.extensions["log_watcher"].close()
        graceful_exit(signum, frame)

    signal.signal(signal.SIGTERM, release_held_polls_then_exit)
