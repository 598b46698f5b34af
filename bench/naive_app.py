"""The app with the log's lock taken out (lock_log in app.py): the naive
design, which lets a poller skip an action committed out of syncId order
(tests/test_postgres.py shows how). For the benchmark's comparison only."""

import app as app_module
from machinery import postgres

app_module.lock_log = lambda db_connection: None
postgres.try_lock_log = lambda db_connection: True  # nor does group commit take it to see whether it is free
app = app_module.create_app()
