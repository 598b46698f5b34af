"""What SQLite needs said its own way: GET /sync's statement in SQLite's dialect.

A poll is one statement (app.py's read_page says what it reads), written once
for each engine: here for SQLite, whose JSON functions build the wire's text
in the database, and in machinery/postgres.py for PostgreSQL. Long polls read
new actions with the same wire expressions (machinery/long_poll.py). One statement, not
six: every statement hands the GIL to another thread and waits to get it back, and one
made a poll twice as fast.
Proved by tests/test_sync.py (one snapshot, a page's bytes and its cursor) and
tests/test_wire.py (the wire form of a sync action).
"""

WIRE_ACTION = """CASE WHEN data IS NULL OR data = 'null'  -- a delete; 'null' as older versions stored it
        THEN json_object('syncId', id, 'action', action, 'modelName', model_name, 'modelId', model_id)
        ELSE json_object('syncId', id, 'action', action, 'modelName', model_name, 'modelId', model_id, 'data', json(data))
    END"""
ACTION_BYTES = "coalesce(length(data), 0) + length(model_id) + 100"  # an action's wire, near enough, without building it
PAGE = f"""
WITH log(log_start, head) AS (
    SELECT log_start, coalesce((SELECT max(id) FROM sync_action), log_start)
    FROM (SELECT coalesce((SELECT after_sync_id FROM sync_log_start), 0) AS log_start)
),
caller_groups(sync_group) AS (
    SELECT 'all' UNION ALL SELECT sync_group FROM memberships WHERE user_id = :user_id
),
page(cursor) AS (
    SELECT min(:until, head) FROM log
),
visible(id, size) AS (  -- the wire is built below, for the page's actions only
    SELECT id, {ACTION_BYTES}
    FROM sync_action
    WHERE id IN (
        SELECT sync_action_id FROM sync_action_group  -- an index range scan per group: see models.py
        WHERE sync_group IN caller_groups AND sync_action_id > :since AND sync_action_id <= (SELECT cursor FROM page)
    )
),
sized(id, before) AS (  -- before: the page's bytes before this action; the first always fits
    SELECT id, sum(size) OVER (ORDER BY id) - size FROM visible
),
fitting(wire) AS (
    SELECT {WIRE_ACTION} FROM sync_action WHERE id IN (SELECT id FROM sized WHERE before < :max_bytes)
    ORDER BY id  -- kept by group_concat: SQLite never flattens an ordered subquery into an aggregate
)
SELECT log_start, (SELECT reason FROM sync_log_start), head,
    CASE WHEN EXISTS (SELECT 1 FROM sized WHERE before >= :max_bytes) THEN (SELECT max(id) FROM sized WHERE before < :max_bytes)
        ELSE cursor END,
    (SELECT json_group_array(sync_group) FROM (SELECT sync_group FROM caller_groups ORDER BY sync_group != 'all', sync_group)),
    (SELECT coalesce(group_concat(wire, ','), '') FROM fitting),
    (SELECT coalesce(max(id), 0) FROM membership_change),
    (SELECT token_sha256 FROM users WHERE id = :user_id)
FROM log, page
"""
