"""Random multi-user workloads (hypothesis): users write across groups, join
and leave groups, delete and re-create Groups, and poll with random cursors
and limits. Whatever happens:

- no user ever receives a row or action outside its sync groups, and every
  page returns exactly the actions the user may see in the range it covers;
- each user's replay of its own /sync stream, from its bootstrap, equals the
  server's rows filtered to that user's groups, and the replay is strict: no
  insert of a row it has, no update or delete of a row it lacks, except for
  actions a lazy bootstrap of a newly joined group already contained;
- cursors only move forward;
- a write is accepted only inside the writer's groups, and a refused one
  writes nothing.

PROPERTY_EXAMPLES sets how many workloads are tried (200 by default).
"""

import os
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test

from flask import Flask

from app import create_app
from helpers import (
    as_store,
    create,
    delete,
    fresh_database,
    group,
    mutate,
    query,
    read_log,
    replay,
    set_member,
    shut_down,
    sign_in,
    snapshot,
    stored_rows,
    todo,
    update,
    wire,
)

USERS = 3
GROUP_IDS = ["g1", "g2", "g3"]
TODO_IDS = ["t1", "t2", "t3", "t4", "t5"]
MODELS = "Group,Author,Todo"


def changes_for(groups: st.SearchStrategy, new_todo_ids: st.SearchStrategy, todo_ids: st.SearchStrategy) -> st.SearchStrategy:
    """Changes of every kind, valid or not, allowed or not, drawing groups and todos from the given strategies."""
    return st.one_of(
        st.builds(lambda i, g, a: todo(i, g, author_id=a), new_todo_ids, groups, st.sampled_from(["a1", "a2", "a2", "a9"])),
        st.builds(lambda i, n, done: update("Todo", i, likeCount=n, isDone=done), todo_ids, st.integers(0, 9), st.booleans()),
        st.builds(lambda i, g: update("Todo", i, groupId=g), todo_ids, groups),
        st.builds(lambda i: delete("Todo", i), todo_ids),
        st.builds(group, groups),
        st.builds(lambda i, n: update("Group", i, name=n), groups, st.sampled_from(["Red", "Blue"])),
        st.builds(lambda i: delete("Group", i), groups),
        st.builds(lambda i, n: update("Author", i, name=n), st.sampled_from(["a1", "a2"]), st.sampled_from(["Ada", "Ada L."])),
    )


def sync_group_of(model: str, row: dict) -> str:
    """The client's own copy of the sync-group rules, to drop the rows of a group it left."""
    return "all" if model == "Author" else f"group:{row['id'] if model == 'Group' else row['groupId']}"


class Database:
    """Reads the server's tables directly: the truth the responses are checked against."""

    def __init__(self, url: str):
        self.url = url

    def query(self, sql: str, **params) -> list[tuple]:
        return query(self.url, sql, **params)

    def sync_groups(self, user_id: int) -> list[str]:
        joined = self.query("SELECT sync_group FROM memberships WHERE user_id = :user_id", user_id=user_id)
        return ["all", *sorted(g for (g,) in joined)]  # sorted here: the database's collation must not decide

    def head(self) -> int:
        return self.query("SELECT max(id) FROM sync_action")[0][0] or 0

    def visible_sync_ids(self, since: int, until: int, sync_groups: list[str]) -> list[int]:
        links = self.query(
            "SELECT sync_action_id, sync_group FROM sync_action_group WHERE sync_action_id > :since AND sync_action_id <= :until",
            since=since,
            until=until,
        )
        return sorted({sync_id for sync_id, g in links if g in sync_groups})

    def rows(self, sync_groups: list[str]) -> dict[tuple[str, str], dict]:
        rows = {(model, row["id"]): row for model, found in stored_rows(self.url).items() for row in found}
        return {key: row for key, row in rows.items() if sync_group_of(key[0], row) in sync_groups}


def as_text(rows: dict[tuple[str, str], dict]) -> str:
    """Rows keyed by (model, id) as JSON text, to compare with their types."""
    return wire(sorted(rows.items()))


def check_page(http, database: Database, since: int, limit: int, until: int | None = None) -> dict:
    path = f"/sync?since={since}&limit={limit}" + (f"&until={until}" if until is not None else "")
    response = http.get(path)
    assert response.status_code == 200, response.get_json()
    page = response.get_json()
    assert page["syncGroups"] == database.sync_groups(http.user_id)
    assert since <= page["lastSyncId"] <= (database.head() if until is None else until), "cursor out of range"
    # Exactly the actions this user may see in (since, lastSyncId], in order: nothing leaked, skipped or repeated.
    expected = database.visible_sync_ids(since, page["lastSyncId"], page["syncGroups"])
    assert wire([a["syncId"] for a in page["sync"]]) == wire(expected)
    return page


class ReplayingClient:
    """What a careful Loco Sync client does with the API: bootstrap, then
    apply each poll. When a group appears in syncGroups it lazy-bootstraps it
    first, and skips the group's actions that bootstrap already contained;
    when a group disappears it drops the group's rows."""

    def __init__(self, http, database: Database):
        self.http, self.database = http, database
        body = http.get(f"/bootstrap?type=eager&models={MODELS}").get_json()
        self.rows = {(model, row["id"]): row for model, found in body["bootstrap"].items() for row in found}
        self.cursor, self.sync_groups = body["firstSyncId"], body["syncGroups"]
        self.loaded_at: dict[str, int] = {}  # group -> firstSyncId of its lazy bootstrap
        # row -> firstSyncId of the lazy bootstrap that returned it. Ids are the client's
        # choice, so a row may be deleted in one group and created again in another: the
        # old delete still arrives, in the old group, and must not touch the new row.
        self.row_loaded_at: dict[tuple[str, str], int] = {}

    def poll(self, limit: int, until: int | None = None) -> bool:
        """One page; returns whether another follows."""
        page = check_page(self.http, self.database, self.cursor, limit, until)
        if page["syncGroups"] != self.sync_groups:
            event("poll: the client's sync groups changed")
            self.change_sync_groups(page["syncGroups"])
        for action in page["sync"]:
            self.apply(action)
        self.cursor = page["lastSyncId"]
        outside = [key for key, row in self.rows.items() if sync_group_of(key[0], row) not in self.sync_groups]
        assert not outside, f"rows outside {self.sync_groups}: {outside}"
        return page["hasMore"]

    def apply(self, action: dict) -> None:
        key, sync_id = (action["modelName"], action["modelId"]), action["syncId"]
        if sync_id <= self.row_loaded_at.get(key, 0):
            return  # the lazy bootstrap that returned this row already reflects it
        if action["action"] == "delete":
            if key in self.rows:
                del self.rows[key]
            else:  # only a lazy bootstrap taken after this delete can explain the row's absence
                assert sync_id <= max(self.loaded_at.values(), default=0), f"delete of a row the client lacks: {action}"
            return
        if sync_id <= self.loaded_at.get(sync_group_of(key[0], action["data"]), 0):
            return  # the lazy bootstrap of this group already reflects it
        if action["action"] == "insert":
            assert key not in self.rows, f"insert of a row the client has: {action}"
        else:
            assert key in self.rows, f"update of a row the client lacks: {action}"
        self.rows[key] = action["data"]

    def change_sync_groups(self, sync_groups: list[str]) -> None:
        left = set(self.sync_groups) - set(sync_groups)
        self.rows = {key: row for key, row in self.rows.items() if sync_group_of(key[0], row) not in left}
        for group_left in left:
            self.loaded_at.pop(group_left, None)
        joined = [g for g in sync_groups if g not in self.sync_groups]
        if joined:
            response = self.http.get(f"/bootstrap?type=lazy&models={MODELS}&syncGroups={','.join(joined)}")
            assert response.status_code == 200, response.get_json()
            body = response.get_json()
            for model, found in body["bootstrap"].items():
                self.rows.update({(model, row["id"]): row for row in found})
                self.row_loaded_at.update({(model, row["id"]): body["firstSyncId"] for row in found})
            self.loaded_at.update(dict.fromkeys(joined, body["firstSyncId"]))
        self.sync_groups = sync_groups

    def catch_up(self, limit: int) -> None:
        """The client's catch-up after a handshake: deltaSync(cursor, head), page by page."""
        head = self.http.get("/sync").get_json()["lastSyncId"]
        while self.poll(limit, until=head):
            pass

    def check_replay(self) -> None:
        assert as_text(self.rows) == as_text(self.database.rows(self.sync_groups)), "the replay differs from the server's rows"


def target_group(change: dict, todo_groups: dict[str, str | None]) -> str | None:
    """The sync group a change writes in: its new row's for a create, its row's otherwise."""
    model, row_id = change["modelName"], change["modelId"]
    if model == "Author":
        return "all"
    if model == "Group":
        return f"group:{row_id}"
    return f"group:{change['data']['groupId']}" if change["action"] == "create" else todo_groups.get(row_id)


def writers_allow(change: dict, writer: int, owners: dict[str, int]) -> bool:
    """models.py's Writers, said again: an Author is changed by its creator only, and a Todo that sets
    authorId names one of its writer's own Authors."""
    if change["modelName"] == "Author" and change["action"] != "create":
        return owners.get(change["modelId"]) == writer
    if change["modelName"] == "Todo" and "authorId" in change.get("data", {}):
        return owners.get(change["data"]["authorId"], writer) == writer  # an unknown one is refused otherwise (409)
    return True


@contextmanager
def three_users(engine: str) -> Iterator[tuple[Flask, str, list]]:
    """An app on a new database of the engine, with its URL and three signed-in users: user 0 created
    Author a1, Groups g1 and g2 (so is in both) and Todos t1 in g1 and t2 in g2; user 1 created Author a2
    and is in group:g1; user 2 is in group:g2."""
    with tempfile.TemporaryDirectory() as directory, fresh_database(engine, directory) as url:
        app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": url})
        try:
            users = [sign_in(app, f"user {n}") for n in range(USERS)]
            mutate(users[0], create("Author", "a1", name="Ada"), group("g1"), group("g2"))
            mutate(users[1], create("Author", "a2", name="Grace"))
            mutate(users[0], todo("t1", "g1"), todo("t2", "g2"))
            for user, sync_group in zip(users[1:], ["group:g1", "group:g2"]):
                set_member(app, user, sync_group)
            yield app, url, users
        finally:
            shut_down(app)


class MultiUserWorkload(RuleBasedStateMachine):
    def __init__(self, engine: str):
        super().__init__()
        self.cleanup = ExitStack()  # each workload on a new database of the engine
        try:
            self.app, url, self.users = self.cleanup.enter_context(three_users(engine))
            self.database = Database(url)
            self.clients = [ReplayingClient(user, self.database) for user in self.users]
            self.committed: dict[tuple[int, str], tuple[list, dict]] = {}
        except BaseException:
            self.cleanup.close()
            raise

    @rule(user=st.integers(0, USERS - 1), data=st.data(), transaction_id=st.none() | st.sampled_from(["tx-1", "tx-2"]))
    def write(self, user, data, transaction_id):
        http = self.users[user]
        allowed = set(self.database.sync_groups(http.user_id))
        todo_groups = {todo_id: f"group:{g}" for todo_id, g in self.database.query("SELECT id, group_id FROM todos")}
        owners = dict(self.database.query("SELECT id, user_id FROM authors"))
        # Mostly the writer's own groups and todos, and new ids for creates, so that many writes
        # are accepted; sometimes anything.
        own_groups = [g for g in GROUP_IDS if f"group:{g}" in allowed]
        own_todos = [t for t, g in todo_groups.items() if g in allowed]
        new_todos = [t for t in TODO_IDS if t not in todo_groups]
        choices = changes_for(
            st.sampled_from(own_groups * 4 + GROUP_IDS),
            st.sampled_from(new_todos * 4 + TODO_IDS),
            st.sampled_from(own_todos * 4 + TODO_IDS),
        )
        changes = data.draw(st.lists(choices, min_size=1, max_size=3))
        before = snapshot(self.app)

        body = {"changes": changes, **({"transactionId": transaction_id} if transaction_id else {})}
        response = http.post("/mutate", json=body)
        answer = response.get_json()
        event(f"write: {response.status_code} {answer.get('error', {}).get('code', '')}".strip())

        if (user, transaction_id) in self.committed:  # a retry: answered as before, or refused if it differs
            earlier_changes, earlier_answer = self.committed[user, transaction_id]
            if wire(changes) == wire(earlier_changes):  # as the server tells them apart
                assert wire(answer) == wire(earlier_answer)
            else:
                assert answer["error"]["code"] == "transaction_id_reused"
            assert snapshot(self.app) == before
            return
        if response.status_code == 200:
            accepted, refused = changes, None
            if transaction_id:
                self.committed[user, transaction_id] = (changes, answer)
        else:
            assert response.status_code in (403, 409), answer
            assert snapshot(self.app) == before, "a refused write changed the database"
            index = answer["error"]["details"]["change"]
            accepted, refused = changes[:index], changes[index] if answer["error"]["code"] == "forbidden" else None
        # Walk the changes the server got through: each was inside the writer's groups as they stood then.
        for change in accepted:
            target = target_group(change, todo_groups)
            if change["modelName"] == "Group" and change["action"] == "create":
                allowed.add(target)  # its creator joins it
            assert target in allowed, f"accepted a change outside the writer's groups: {change}"
            assert writers_allow(change, http.user_id, owners), f"accepted a change its Writers refuse: {change}"
            if change["modelName"] == "Todo" and change["action"] in ("create", "delete"):
                todo_groups[change["modelId"]] = target if change["action"] == "create" else None
        if refused is not None:
            inside = target_group(refused, todo_groups) in allowed and writers_allow(refused, http.user_id, owners)
            assert not inside, f"refused a change inside the writer's groups, that its Writers allow: {refused}"

    @rule(user=st.integers(0, USERS - 1), group_id=st.sampled_from(GROUP_IDS), member=st.booleans())
    def change_membership(self, user, group_id, member):
        set_member(self.app, self.users[user], f"group:{group_id}", member)

    @rule(user=st.integers(0, USERS - 1), limit=st.integers(1, 8))
    def poll(self, user, limit):
        self.clients[user].poll(limit)

    @rule(user=st.integers(0, USERS - 1), data=st.data(), limit=st.integers(1, 8))
    def poll_from_a_random_cursor(self, user, data, limit):
        since = data.draw(st.integers(0, self.database.head()))
        until = data.draw(st.none() | st.integers(since, self.database.head()))
        check_page(self.users[user], self.database, since, limit, until)

    @rule(user=st.integers(0, USERS - 1), sync_groups=st.lists(st.sampled_from(["all", *(f"group:{g}" for g in GROUP_IDS)]), min_size=1, max_size=2, unique=True))
    def lazy_bootstrap(self, user, sync_groups):
        http = self.users[user]
        response = http.get(f"/bootstrap?type=lazy&models={MODELS}&syncGroups={','.join(sync_groups)}")
        member_of = self.database.sync_groups(http.user_id)
        event(f"lazy bootstrap: {response.status_code}")
        if not set(sync_groups) <= set(member_of):
            assert response.status_code == 403 and "bootstrap" not in response.get_json()
            return
        served = {(model, row["id"]): row for model, found in response.get_json()["bootstrap"].items() for row in found}
        assert as_text(served) == as_text(self.database.rows(sync_groups))

    @rule(user=st.integers(0, USERS - 1), limit=st.integers(1, 8))
    def catch_up_and_compare(self, user, limit):
        self.clients[user].catch_up(limit)
        self.clients[user].check_replay()

    def teardown(self):
        try:
            for client in self.clients:
                client.catch_up(limit=5000)
                client.check_replay()
        finally:
            self.cleanup.close()


def test_random_multi_user_workloads(engine):
    run_state_machine_as_test(
        lambda: MultiUserWorkload(engine),
        settings=settings(
            max_examples=int(os.environ.get("PROPERTY_EXAMPLES", 200)),
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


# --- Replay equals bootstrap, as JSON text --------------------------------------

TODO_VALUES = {
    "text": st.sampled_from(["", "Buy coffee", "café ☕", "0", "false"]),
    "authorId": st.sampled_from(["a1", "a2"]),
    "groupId": st.sampled_from(["g1", "g2"]),
    "isDone": st.booleans(),
    "likeCount": st.sampled_from([0, 1, 2, -1, 2**53 + 1, 2**63 - 1]),
}
# Each field in turn, set alone by an update (the explicit example below), and at random.
EACH_FIELD = [("text", "text alone"), ("authorId", "a2"), ("groupId", "g2"), ("isDone", True), ("likeCount", 1)]
# An update that sets a single field, the others left as stored.
one_field_update = st.sampled_from(sorted(TODO_VALUES)).flatmap(
    lambda field: st.builds(lambda i, value: update("Todo", i, **{field: value}), st.sampled_from(TODO_IDS), TODO_VALUES[field])
)
replay_changes = st.one_of(
    st.builds(lambda i, row: create("Todo", i, **row), st.sampled_from(TODO_IDS), st.fixed_dictionaries(TODO_VALUES)),
    one_field_update,
    st.builds(lambda i: delete("Todo", i), st.sampled_from(TODO_IDS)),
    st.builds(lambda i, n: update("Group", i, name=n), st.sampled_from(["g1", "g2"]), st.sampled_from(["Kitchen", "Garden"])),
    st.builds(lambda i, n: update("Author", i, name=n), st.sampled_from(["a1", "a2"]), st.sampled_from(["Ada", "Grace"])),
)
writes = st.lists(st.tuples(st.integers(0, USERS - 1), st.lists(replay_changes, min_size=1, max_size=2)), max_size=12)


def test_each_users_replay_of_sync_from_0_equals_its_eager_bootstrap_as_json_text(engine):
    """Writes by several users (many refused: rows of other groups, missing ones); then each user's
    /sync from 0, replayed, is exactly that user's bootstrap: every value in the same type."""

    @given(writes)
    @example([(writer, [update("Todo", "t1" if writer < 2 else "t2", **{field: value})]) for writer in range(USERS) for field, value in EACH_FIELD])
    @settings(max_examples=int(os.environ.get("PROPERTY_EXAMPLES", 200)) // 2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def replay_equals_bootstrap(sequence):
        with three_users(engine) as (_, _, users):
            for writer, changes in sequence:
                response = users[writer].post("/mutate", json={"changes": changes})
                event(f"replay: write {response.status_code}")
                assert response.status_code in (200, 403, 409), response.get_json()
            for user in users:
                bootstrap = user.get(f"/bootstrap?type=eager&models={MODELS}").get_json()["bootstrap"]
                assert wire(replay(read_log(user))) == wire(as_store(bootstrap)), f"{user.user_id}'s replay differs from its bootstrap"

    replay_equals_bootstrap()
