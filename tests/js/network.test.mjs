// The network adapter (static/loco-network.js) against a live server on a
// freshly seeded database (tests/live_server.py: a SQLite file, or PostgreSQL
// with LOCO_TEST_ENGINE=postgresql). Node's own test runner, no npm packages:
// node --test tests/js/
//
// Seed: Groups g1, g2; Authors a1, a2; Todos t1, t2 (g1), t3 (g2); head 7.
// Ada has all, group:g1, group:g2; Grace has all, group:g1.
// The tests share one server, so each writes rows with fresh ids and computes
// expected syncIds from a head it reads first; none touches the seeded rows.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { readFile } from "node:fs/promises";
import net from "node:net";
import { after, before, test } from "node:test";
import { setTimeout as delay } from "node:timers/promises";
import { fileURLToPath } from "node:url";

const { createNetworkAdapter } = await importAdapter();

const POLL_MS = 50;
const SEEDED = {
  Group: [
    { id: "g1", name: "Kitchen" },
    { id: "g2", name: "Garden" },
  ],
  Author: [
    { id: "a1", name: "Ada" },
    { id: "a2", name: "Grace" },
  ],
  Todo: [
    { id: "t1", text: "Buy coffee", authorId: "a1", groupId: "g1", isDone: false, likeCount: 0 },
    { id: "t2", text: "Descale the kettle", authorId: "a2", groupId: "g1", isDone: false, likeCount: 0 },
    { id: "t3", text: "Water the tomatoes", authorId: "a1", groupId: "g2", isDone: false, likeCount: 0 },
  ],
};

/** @type {{baseUrl: string, tokens: Record<string, string>, stop: () => Promise<void>}} */
let server;
before(async () => {
  server = await startServer();
}, { timeout: 30_000 });
after(() => server?.stop());

// --- helpers ------------------------------------------------------------------

async function importAdapter() {
  const url = new URL("../../static/loco-network.js", import.meta.url);
  try {
    return await import(url.href);
  } catch {
    // Node before 20.19 reads a .js file outside a "type": "module" package as
    // CommonJS; a data: URL is always a module.
    const source = await readFile(url, "utf8");
    return import(`data:text/javascript;base64,${Buffer.from(source).toString("base64")}`);
  }
}

/** Spawns tests/live_server.py; it serves until its stdin closes. */
async function startServer() {
  const script = fileURLToPath(new URL("../live_server.py", import.meta.url));
  const child = spawn(process.env.PYTHON ?? "python3", [script], { stdio: ["pipe", "pipe", "inherit"] });
  child.stdin.on("error", () => {}); // an EPIPE if it died first; its exit code says more
  const exited = new Promise((resolve) => child.once("exit", resolve));
  const line = await new Promise((resolve, reject) => {
    let buffer = "";
    child.stdout.setEncoding("utf8");
    child.stdout.on("data", (chunk) => {
      buffer += chunk;
      if (buffer.includes("\n")) resolve(buffer.slice(0, buffer.indexOf("\n")));
    });
    child.once("error", reject); // e.g. no such interpreter
    child.once("exit", (code) => reject(new Error(`tests/live_server.py exited (${code}) before printing its address`)));
  });
  const { baseUrl, tokens } = JSON.parse(line);
  return {
    baseUrl,
    tokens,
    async stop() {
      child.stdin.end();
      await exited;
    },
  };
}

let counter = 0;
const runId = Math.random().toString(36).slice(2, 8);
/** A new id, so tests never collide on the shared server. */
const freshId = (prefix) => `${prefix}-${runId}-${++counter}`;

const todo = (id, groupId, authorId = "a1") => ({
  action: "create",
  modelName: "Todo",
  modelId: id,
  data: { id, text: `Todo ${id}`, authorId, groupId, isDone: false, likeCount: 0 },
});
const update = (modelName, id, data) => ({ action: "update", modelName, modelId: id, data });
const group = (id) => ({ action: "create", modelName: "Group", modelId: id, data: { id, name: `Group ${id}` } });

/** The API without the adapter, for setup and for checking what the adapter did. */
async function api(user, path, { method = "GET", body } = {}) {
  const headers = { Authorization: `Bearer ${server.tokens[user]}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(server.baseUrl + path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  return { status: response.status, body: await response.json() };
}

async function handshakeOf(user) {
  const { status, body } = await api(user, "/sync");
  assert.equal(status, 200, JSON.stringify(body));
  return body;
}

const headOf = async (user = "Ada") => (await handshakeOf(user)).lastSyncId;

/** Commits `changes` as `user`; returns the transaction's lastSyncId. */
async function mutate(user, ...changes) {
  const { status, body } = await api(user, "/mutate", { method: "POST", body: { changes } });
  assert.equal(status, 200, `setup mutation refused: ${JSON.stringify(body)}`);
  return body.lastSyncId;
}

/** Every action after `since` that `user` may see. */
async function logSince(user, since) {
  const { status, body } = await api(user, `/sync?since=${since}`);
  assert.equal(status, 200, JSON.stringify(body));
  assert.equal(body.hasMore, false);
  return body.sync;
}

// deltaSync's own retries are off unless a test is about them: failures then come back at once.
function adapterFor(user, options = {}) {
  return createNetworkAdapter({ baseUrl: server.baseUrl, token: server.tokens[user], pollMs: POLL_MS, longPoll: false, deltaSyncRetries: 0, ...options });
}

/** Polls `condition` every 20 ms; fails with `what` if it stays false for `timeoutMs`. */
async function waitFor(what, condition, timeoutMs = 5000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await condition();
    if (value) return value;
    if (Date.now() > deadline) assert.fail(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await delay(20);
  }
}

/** A fetch that records every request (and its status) and otherwise really fetches. */
function recordingFetch(inner = (url, init) => fetch(url, init)) {
  /** @type {{url: URL, method: string, body: any, signal: AbortSignal | undefined, status?: number}[]} */
  const requests = [];
  const wrapped = async (url, init = {}) => {
    const request = {
      url: new URL(url),
      method: init.method ?? "GET",
      body: init.body === undefined ? undefined : JSON.parse(init.body),
      signal: init.signal,
    };
    requests.push(request);
    const response = await inner(url, init);
    request.status = response.status;
    return response;
  };
  wrapped.requests = requests;
  wrapped.polls = () => requests.filter((r) => r.url.pathname === "/sync" && r.url.searchParams.has("since"));
  return wrapped;
}

/** A listener that keeps what it gets. */
function recorder() {
  /** @type {any[]} */
  const messages = [];
  const listener = (message) => {
    messages.push(message);
  };
  const ofType = (type) => messages.filter((m) => m.type === type);
  return { messages, listener, ofType, actions: () => ofType("sync").flatMap((m) => m.sync) };
}

/** Starts initSync and makes sure the test stops it, pass or fail. */
function listen(t, adapter, listener) {
  const unsubscribe = adapter.initSync(listener);
  t.after(unsubscribe);
  return unsubscribe;
}

function assertFailure(result, error, expected = {}) {
  assert.equal(result?.ok, false, `expected a failure, got ${JSON.stringify(result)}`);
  assert.equal(result.error, error, `wrong error type; reason: ${JSON.stringify(result.reason)}`);
  assert.equal(typeof result.reason.status, "number");
  assert.equal(typeof result.reason.code, "string");
  assert.equal(typeof result.reason.message, "string");
  for (const [key, value] of Object.entries(expected)) {
    assert.deepEqual(result.reason[key], value, `reason.${key} of ${JSON.stringify(result.reason)}`);
  }
}

async function closedPort() {
  const probe = net.createServer();
  await new Promise((resolve) => probe.listen(0, "127.0.0.1", resolve));
  const { port } = probe.address();
  await new Promise((resolve) => probe.close(resolve));
  return port;
}

const jsonResponse = (status, body, headers = {}) =>
  new Response(JSON.stringify(body), { status, headers: { "Content-Type": "application/json", ...headers } });

// --- sendTransaction ------------------------------------------------------------

test("sendTransaction returns the lastSyncId of the committed transaction", async () => {
  const head = await headOf();
  const id = freshId("send");
  const changes = [todo(id, "g1"), update("Todo", id, { isDone: true })];

  const result = await adapterFor("Ada").sendTransaction(changes);

  assert.deepEqual(result, { ok: true, value: { lastSyncId: head + 2 } });
  assert.equal(await headOf(), head + 2);
  const seen = await adapterFor("Ada").bootstrap({ type: "lazy", models: ["Todo"], syncGroups: ["group:g1"] });
  assert.equal(seen.ok, true, JSON.stringify(seen));
  assert.deepEqual(
    seen.value.bootstrap.Todo.find((row) => row.id === id),
    { ...changes[0].data, isDone: true },
  );
});

test("a retried transaction (same array) carries the same transactionId and is applied exactly once", async () => {
  let loseNextAnswer = true;
  const recording = recordingFetch(async (url, init) => {
    const response = await fetch(url, init);
    if (init.method === "POST" && loseNextAnswer) {
      loseNextAnswer = false;
      await response.arrayBuffer();
      throw new TypeError("fetch failed (the test dropped the answer)");
    }
    return response;
  });
  const adapter = adapterFor("Ada", { fetch: recording });
  const head = await headOf();
  const id = freshId("retry");
  const changes = [todo(id, "g1"), update("Todo", id, { likeCount: 3 })];

  const lost = await adapter.sendTransaction(changes);
  assertFailure(lost, "network", { status: 0 });
  assert.equal(await headOf(), head + 2, "the first attempt was committed; only its answer was lost");

  const retried = await adapter.sendTransaction(changes);
  assert.deepEqual(retried, { ok: true, value: { lastSyncId: head + 2 } });
  const sent = () => recording.requests.filter((r) => r.method === "POST").map((r) => r.body);
  const [first, second] = sent();
  assert.equal(typeof first.transactionId, "string");
  assert.ok(first.transactionId.length > 0);
  assert.equal(second.transactionId, first.transactionId);
  assert.deepEqual(second.changes, first.changes);

  assert.equal(await headOf(), head + 2, "the retry wrote nothing");
  const log = await adapter.deltaSync(head, head + 2);
  assert.equal(log.ok, true, JSON.stringify(log));
  assert.deepEqual(
    log.value.sync.map((a) => [a.syncId, a.action, a.modelId]),
    [
      [head + 1, "insert", id],
      [head + 2, "update", id],
    ],
  );
  assert.deepEqual(log.value.sync, await logSince("Ada", head));

  // Another array is another transaction, even with equal contents.
  const copy = structuredClone(changes);
  const again = await adapter.sendTransaction(copy);
  const third = sent()[2];
  assert.notEqual(third.transactionId, first.transactionId);
  assertFailure(again, "server", { status: 409, code: "already_exists" });
  assert.equal(await headOf(), head + 2);
});

// --- error mapping --------------------------------------------------------------

test("a refused mutation is a server error with the server's status and code", async () => {
  const head = await headOf();
  const id = freshId("dup");
  await mutate("Ada", todo(id, "g1"));

  const duplicate = await adapterFor("Ada").sendTransaction([todo(id, "g1")]);
  assertFailure(duplicate, "server", { status: 409, code: "already_exists" });

  // A 403 alone would read as auth: the body's type decides.
  const outside = await adapterFor("Grace").sendTransaction([todo(freshId("g2"), "g2")]);
  assertFailure(outside, "server", { status: 403, code: "forbidden" });
  assert.equal(await headOf(), head + 1, "refused transactions write nothing");
});

test("an unknown token is an auth error for every method", async () => {
  const adapter = createNetworkAdapter({ baseUrl: server.baseUrl, token: "1.not-the-secret", deltaSyncRetries: 0 });
  const head = await headOf();
  assertFailure(await adapter.sendTransaction([todo(freshId("anon"), "g1")]), "auth", { status: 401, code: "unauthorized" });
  assertFailure(await adapter.bootstrap({ type: "eager", models: ["Todo"] }), "auth", { status: 401, code: "unauthorized" });
  assertFailure(await adapter.deltaSync(0, head), "auth", { status: 401, code: "unauthorized" });
  assert.equal(await headOf(), head);
});

test("a lazy bootstrap of a sync group the caller lacks is an auth error", async () => {
  const result = await adapterFor("Grace").bootstrap({ type: "lazy", models: ["Todo"], syncGroups: ["group:g1", "group:g2"] });
  assertFailure(result, "auth", { status: 403, code: "forbidden" });
});

test("an unreachable server is a network error with status 0", async () => {
  const adapter = createNetworkAdapter({ baseUrl: `http://127.0.0.1:${await closedPort()}`, token: server.tokens.Ada, deltaSyncRetries: 0 });
  assertFailure(await adapter.sendTransaction([todo(freshId("void"), "g1")]), "network", { status: 0 });
  assertFailure(await adapter.bootstrap({ type: "eager", models: ["Todo"] }), "network", { status: 0 });
  assertFailure(await adapter.deltaSync(0, 1), "network", { status: 0 });
});

test("a 503 whose error body has type network is a network error", async () => {
  const busy = jsonResponse(
    503,
    { error: { type: "network", code: "database_busy", message: "The database is busy.", details: null } },
    { "Retry-After": "1" },
  );
  const adapter = adapterFor("Ada", { fetch: async () => busy });
  assertFailure(await adapter.sendTransaction([todo(freshId("busy"), "g1")]), "network", { status: 503, code: "database_busy" });
});

test("a proxy's non-JSON 502 is a network error", async () => {
  const fetchImpl = async () => new Response("<html>Bad Gateway</html>", { status: 502, statusText: "Bad Gateway" });
  const adapter = adapterFor("Ada", { fetch: fetchImpl });
  assertFailure(await adapter.sendTransaction([todo(freshId("gw"), "g1")]), "network", { status: 502, code: "http_502" });
  assertFailure(await adapter.bootstrap({ type: "eager", models: ["Todo"] }), "network", { status: 502 });
  assertFailure(await adapter.deltaSync(0, 1), "network", { status: 502 });
});

test("a 200 whose body is not JSON is a network error, so the mutation is retried under the same transactionId", async () => {
  let garble = true;
  const recording = recordingFetch(async (url, init) => {
    const response = await fetch(url, init);
    if (!garble) return response;
    garble = false;
    await response.arrayBuffer();
    return new Response('{"lastSyncId": ', { status: 200, headers: { "Content-Type": "application/json" } });
  });
  const adapter = adapterFor("Ada", { fetch: recording });
  const head = await headOf();
  const changes = [todo(freshId("cut"), "g1")];

  assertFailure(await adapter.sendTransaction(changes), "network", { status: 200, code: "unreadable_response" });
  assert.deepEqual(await adapter.sendTransaction(changes), { ok: true, value: { lastSyncId: head + 1 } });
  assert.equal(recording.requests[1].body.transactionId, recording.requests[0].body.transactionId);
  assert.equal(await headOf(), head + 1);
});

test("a 200 that is not this API's answer is a network error, so nothing is rolled back", async () => {
  for (const body of [null, {}, { lastSyncId: "7" }, []]) {
    const adapter = adapterFor("Ada", { fetch: async () => jsonResponse(200, body) });
    assertFailure(await adapter.sendTransaction([todo(freshId("odd"), "g1")]), "network", { status: 200, code: "unexpected_response" });
    assertFailure(await adapter.bootstrap({ type: "eager", models: ["Todo"] }), "network", { status: 200 });
    assertFailure(await adapter.deltaSync(1, 3), "network", { status: 200 });
  }
});

test("a malformed 200 answer to a poll is an outage, not the end of syncing", async (t) => {
  let garble = false;
  const grace = recorder();
  listen(t, adapterFor("Grace", {
    fetch: (url, init) => {
      if (!garble || !new URL(url).searchParams.has("since")) return fetch(url, init);
      garble = false;
      return Promise.resolve(jsonResponse(200, null));
    },
  }), grace.listener);
  await waitFor("Grace's handshake", () => grace.messages.length > 0);
  garble = true;
  await waitFor("the malformed answer", () => !garble);
  // Actions before the new handshake reach a Loco Sync client by its deltaSync, not by `sync`.
  await waitFor("a new handshake", () => grace.ofType("handshake").length === 2);
  const syncId = await mutate("Ada", todo(freshId("after-garble"), "g1"));
  await waitFor("a sync after the malformed answer", () => grace.actions().some((a) => a.syncId === syncId));
  assert.deepEqual(grace.messages.map((m) => m.type).slice(0, 3), ["handshake", "disconnected", "handshake"]);
});

test("toChanges turns custom mutation args into changes, and a retry of the same args keeps its transactionId", async () => {
  let loseNextAnswer = true;
  const recording = recordingFetch(async (url, init) => {
    const response = await fetch(url, init);
    if (loseNextAnswer) {
      loseNextAnswer = false;
      await response.arrayBuffer();
      throw new TypeError("fetch failed (the test dropped the answer)");
    }
    return response;
  });
  const toChanges = (args) => [todo(args.todoId, args.groupId)];
  const adapter = adapterFor("Ada", { fetch: recording, toChanges });
  const head = await headOf();
  const args = { type: "CreateTodo", todoId: freshId("custom"), groupId: "g1" };

  assertFailure(await adapter.sendTransaction(args), "network");
  assert.deepEqual(await adapter.sendTransaction(args), { ok: true, value: { lastSyncId: head + 1 } });
  const [first, second] = recording.requests.map((r) => r.body);
  assert.deepEqual(first.changes, toChanges(args));
  assert.equal(second.transactionId, first.transactionId);
  assert.equal(await headOf(), head + 1);
});

test("no method ever rejects, even when fetch throws synchronously or the arguments are garbage", async () => {
  const throwing = createNetworkAdapter({
    baseUrl: server.baseUrl,
    token: server.tokens.Ada,
    deltaSyncRetries: 0,
    fetch: () => {
      throw new TypeError("synchronous failure");
    },
  });
  assertFailure(await throwing.sendTransaction([todo(freshId("sync-throw"), "g1")]), "network", { status: 0 });
  assertFailure(await throwing.bootstrap({ type: "eager", models: ["Todo"] }), "network", { status: 0 });
  assertFailure(await throwing.deltaSync(0, 1), "network", { status: 0 });

  const adapter = adapterFor("Ada");
  const head = await headOf();
  const garbage = [
    () => adapter.sendTransaction(undefined),
    () => adapter.sendTransaction("changes"),
    () => adapter.sendTransaction([null]),
    () => adapter.bootstrap(null),
    () => adapter.bootstrap(undefined),
    () => adapter.bootstrap({ type: "lazy", models: ["Todo"] }),
    () => adapter.deltaSync("a", 3),
    () => adapter.deltaSync(undefined, undefined),
    () => adapter.deltaSync(1.5, 2),
    () => adapter.deltaSync(0, Infinity),
  ];
  for (const call of garbage) {
    const pending = call();
    assert.ok(pending instanceof Promise, `${call} returned no promise`);
    assertFailure(await pending, "server");
  }
  assert.equal(await headOf(), head);
});

// --- bootstrap ------------------------------------------------------------------

test("an eager bootstrap serves every requested model from the caller's groups, with firstSyncId and syncGroups", async () => {
  const head = await headOf();
  const result = await adapterFor("Ada").bootstrap({ type: "eager", models: ["Author", "Group"] });

  assert.equal(result.ok, true, JSON.stringify(result));
  assert.deepEqual(Object.keys(result.value).sort(), ["bootstrap", "firstSyncId", "syncGroups"]);
  assert.deepEqual(Object.keys(result.value.bootstrap).sort(), ["Author", "Group"]);
  for (const row of [...SEEDED.Author]) assert.deepEqual(result.value.bootstrap.Author.find((r) => r.id === row.id), row);
  for (const row of [...SEEDED.Group]) assert.deepEqual(result.value.bootstrap.Group.find((r) => r.id === row.id), row);
  assert.equal(result.value.firstSyncId, head);
  assert.deepEqual(result.value.syncGroups, (await handshakeOf("Ada")).syncGroups);
  assert.ok(result.value.syncGroups.includes("group:g2"));
});

test("a bootstrap serves only the rows of the caller's sync groups", async () => {
  const grace = adapterFor("Grace");
  const eager = await grace.bootstrap({ type: "eager", models: ["Todo", "Group"] });
  assert.equal(eager.ok, true, JSON.stringify(eager));
  const { Todo, Group } = eager.value.bootstrap;
  assert.ok(Todo.every((row) => row.groupId === "g1"), `Grace got another group's Todo: ${JSON.stringify(Todo)}`);
  assert.deepEqual(Todo.filter((row) => row.id === "t1" || row.id === "t2"), SEEDED.Todo.slice(0, 2));
  assert.equal(Group.find((row) => row.id === "g2"), undefined);
  assert.deepEqual(Group.find((row) => row.id === "g1"), SEEDED.Group[0]);
  assert.ok(!eager.value.syncGroups.includes("group:g2"));

  const lazy = await grace.bootstrap({ type: "lazy", models: ["Todo", "Author"], syncGroups: ["group:g1"] });
  assert.equal(lazy.ok, true, JSON.stringify(lazy));
  assert.deepEqual(lazy.value.syncGroups, ["group:g1"]);
  assert.ok(lazy.value.bootstrap.Todo.every((row) => row.groupId === "g1"));
  assert.deepEqual(lazy.value.bootstrap.Author, [], "Authors are in `all`, not in group:g1");

  const ada = await adapterFor("Ada").bootstrap({ type: "lazy", models: ["Todo"], syncGroups: ["group:g2"] });
  assert.equal(ada.ok, true, JSON.stringify(ada));
  assert.deepEqual(ada.value.syncGroups, ["group:g2"]);
  assert.ok(ada.value.bootstrap.Todo.every((row) => row.groupId === "g2"));
  assert.deepEqual(ada.value.bootstrap.Todo.find((row) => row.id === "t3"), SEEDED.Todo[2]);
});

// --- deltaSync ------------------------------------------------------------------

test("deltaSync follows hasMore through every page and returns each action once, in order", async () => {
  const head = await headOf();
  for (const groupId of ["g1", "g2", "g1", "g2", "g1"]) await mutate("Ada", todo(freshId("page"), groupId));
  const expected = await logSince("Ada", head);
  assert.equal(expected.length, 5);

  const recording = recordingFetch();
  const result = await adapterFor("Ada", { pageLimit: 2, fetch: recording }).deltaSync(head, head + 5);
  assert.equal(result.ok, true, JSON.stringify(result));
  assert.deepEqual(result.value.sync, expected);
  assert.equal(recording.requests.length, Math.ceil(5 / 2));
  for (const { url } of recording.requests) {
    assert.equal(url.searchParams.get("limit"), "2");
    assert.equal(url.searchParams.get("until"), String(head + 5));
  }

  // A page scans syncIds the caller cannot see too: Grace pages just as often.
  const graceRecording = recordingFetch();
  const grace = await adapterFor("Grace", { pageLimit: 2, fetch: graceRecording }).deltaSync(head, head + 5);
  assert.equal(grace.ok, true, JSON.stringify(grace));
  assert.deepEqual(grace.value.sync, expected.filter((a) => a.data.groupId === "g1"));
  assert.equal(graceRecording.requests.length, 3);
});

test("deltaSync retries network and auth failures with backoff, so a catch-up survives a blip", async () => {
  // The Loco Sync client retries a failed catch-up without awaiting it, and drops
  // `sync` messages meanwhile: the retry must happen inside deltaSync.
  const head = await headOf();
  await mutate("Ada", todo(freshId("blip"), "g1"));
  const failures = [new TypeError("fetch failed"), jsonResponse(401, { error: { type: "auth", code: "unauthorized", message: "x", details: null } })];
  const recording = recordingFetch((url, init) => {
    const next = failures.shift();
    if (next instanceof Error) return Promise.reject(next);
    return next ? Promise.resolve(next) : fetch(url, init);
  });
  const result = await adapterFor("Ada", { fetch: recording, deltaSyncRetries: 3 }).deltaSync(head, head + 1);
  assert.deepEqual(result, { ok: true, value: { sync: await logSince("Ada", head) } });
  assert.equal(recording.requests.length, 3);

  // A failure that lasts is answered after the retries; a server error at once.
  const down = recordingFetch(() => Promise.reject(new TypeError("fetch failed")));
  assertFailure(await adapterFor("Ada", { fetch: down, deltaSyncRetries: 2 }).deltaSync(head, head + 1), "network");
  assert.equal(down.requests.length, 3);
  const refused = recordingFetch(() => Promise.resolve(jsonResponse(409, { error: { type: "server", code: "unknown_cursor", message: "x", details: null } })));
  assertFailure(await adapterFor("Ada", { fetch: refused, deltaSyncRetries: 2 }).deltaSync(head, head + 1), "server", { code: "unknown_cursor" });
  assert.equal(refused.requests.length, 1);
});

test("deltaSync of an empty range is [] without a request, and of a reversed range a server error", async () => {
  const head = await headOf();
  const recording = recordingFetch();
  const adapter = adapterFor("Ada", { fetch: recording });
  assert.deepEqual(await adapter.deltaSync(head, head), { ok: true, value: { sync: [] } });
  assertFailure(await adapter.deltaSync(5, 3), "server");
  assert.equal(recording.requests.length, 0);
});

// --- initSync -------------------------------------------------------------------

test("initSync starts with a handshake of the server's head and the caller's syncGroups, then sends each new action", async (t) => {
  const { lastSyncId: head, syncGroups } = await handshakeOf("Grace");
  const grace = recorder();
  listen(t, adapterFor("Grace"), grace.listener);

  await waitFor("Grace's handshake", () => grace.messages.length > 0);
  assert.deepEqual(grace.messages[0], { type: "handshake", lastSyncId: head, syncGroups });

  const syncId = await mutate("Ada", todo(freshId("live"), "g1"));
  await waitFor("a sync message", () => grace.ofType("sync").length > 0);
  await delay(4 * POLL_MS); // room for a wrong extra message
  assert.deepEqual(grace.messages.slice(1), [{ type: "sync", lastSyncId: syncId, sync: await logSince("Grace", head) }]);
  assert.equal(grace.messages[1].sync.length, 1);
});

test("initSync sends only actions of the caller's sync groups, and its lastSyncId moves past the others", async (t) => {
  const grace = recorder();
  listen(t, adapterFor("Grace"), grace.listener);
  await waitFor("Grace's handshake", () => grace.messages.length > 0);

  const hidden = await mutate("Ada", todo(freshId("hidden"), "g2"));
  const shown = await mutate("Ada", todo(freshId("shown"), "g1"));
  assert.equal(shown, hidden + 1);
  await waitFor("the g1 action", () => grace.actions().some((a) => a.syncId === shown));
  await delay(4 * POLL_MS);

  assert.deepEqual(grace.actions().map((a) => a.syncId), [shown]);
  assert.ok(grace.ofType("sync").every((m) => m.sync.length > 0), "a sync message without actions");
  assert.equal(grace.messages.at(-1).lastSyncId, shown);
  assert.equal(grace.ofType("handshake").length, 1);
});

test("initSync delivers one message at a time, in syncId order, awaiting the listener", async (t) => {
  /** @type {{edge: "enter" | "exit", index: number, message?: any}[]} */
  const events = [];
  let calls = 0;
  listen(t, adapterFor("Grace"), async (message) => {
    const index = calls++;
    events.push({ edge: "enter", index, message });
    await delay(200);
    events.push({ edge: "exit", index });
  });
  const entered = (predicate) => events.some((e) => e.edge === "enter" && predicate(e.message));

  await waitFor("the handshake to reach the listener", () => entered((m) => m.type === "handshake"));
  // Each write lands while the listener still holds the previous message.
  const written = [];
  for (let i = 0; i < 3; i++) {
    const syncId = await mutate("Ada", todo(freshId("slow"), "g1"));
    written.push(syncId);
    await waitFor(`syncId ${syncId} to reach the listener`, () => entered((m) => m.type === "sync" && m.lastSyncId >= syncId));
  }
  await waitFor("the listener to return", () => events.at(-1).edge === "exit" && events.length === 2 * calls);

  events.forEach((event, n) => {
    const expected = { edge: n % 2 === 0 ? "enter" : "exit", index: Math.floor(n / 2) };
    assert.deepEqual({ edge: event.edge, index: event.index }, expected, `messages overlapped: ${JSON.stringify(events)}`);
  });
  const delivered = events.filter((e) => e.edge === "enter" && e.message.type === "sync").flatMap((e) => e.message.sync);
  assert.deepEqual(delivered.map((a) => a.syncId), written);
});

test("initSync sends a new handshake when the caller's syncGroups change, and only then", async (t) => {
  const recording = recordingFetch();
  const grace = recorder();
  listen(t, adapterFor("Grace", { fetch: recording }), grace.listener);
  await waitFor("Grace's handshake", () => grace.messages.length > 0);
  const [first] = grace.messages;

  await waitFor("five polls", () => recording.polls().length >= 5);
  assert.equal(grace.ofType("handshake").length, 1, "an ordinary poll sent a handshake");

  const head = await headOf("Grace");
  const groupId = freshId("shed");
  const syncId = await mutate("Grace", group(groupId)); // its creator joins it
  await waitFor("a second handshake", () => grace.ofType("handshake").length >= 2);
  await waitFor("the Group's insert", () => grace.actions().some((a) => a.modelId === groupId));

  const second = grace.ofType("handshake")[1];
  assert.deepEqual([...second.syncGroups].sort(), [...first.syncGroups, `group:${groupId}`].sort());
  // The handshake precedes the page that revealed the group, and covers up to it.
  assert.equal(second.lastSyncId, head);
  assert.deepEqual(grace.messages.slice(grace.messages.indexOf(second) + 1), [
    { type: "sync", lastSyncId: syncId, sync: await logSince("Grace", head) },
  ]);

  const polls = recording.polls().length;
  await waitFor("five more polls", () => recording.polls().length >= polls + 5);
  assert.equal(grace.ofType("handshake").length, 2, "an ordinary poll sent a handshake");
});

test("plain polling pauses pollMs between polls", async (t) => {
  const pollMs = 100;
  const starts = [];
  const grace = recorder();
  listen(t, adapterFor("Grace", {
    pollMs,
    fetch: (url, init) => {
      if (new URL(url).searchParams.has("since")) starts.push(performance.now());
      return fetch(url, init);
    },
  }), grace.listener);
  await waitFor("four polls", () => starts.length >= 4);
  const gaps = starts.slice(1).map((start, i) => start - starts[i]);
  // A timer may fire a millisecond early.
  assert.ok(gaps.every((gap) => gap >= pollMs - 5), `polls ${JSON.stringify(gaps)} ms apart`);
});

test("unsubscribing inside the listener stops the very next message", async (t) => {
  const recording = recordingFetch();
  const messages = [];
  const unsubscribe = listen(t, adapterFor("Grace", { fetch: recording }), (message) => {
    messages.push(message);
    if (message.type === "handshake" && messages.length > 1) unsubscribe();
  });
  await waitFor("Grace's handshake", () => messages.length > 0);

  // One page brings a new sync group and its Group's insert: two messages.
  const groupId = freshId("quiet");
  await mutate("Grace", group(groupId));
  await waitFor("a second handshake", () => messages.length > 1);
  const requests = recording.requests.length;
  await delay(10 * POLL_MS);
  assert.deepEqual(messages.map((m) => m.type), ["handshake", "handshake"]);
  assert.equal(recording.requests.length, requests, "a request after unsubscribe");
});

test("a listener that throws is logged, and messages keep coming", async (t) => {
  const logged = t.mock.method(console, "error", () => {});
  const received = [];
  listen(t, adapterFor("Grace"), (message) => {
    received.push(message);
    if (message.type === "handshake") throw new Error("the test's listener failed");
  });
  await waitFor("Grace's handshake", () => received.length > 0);

  const syncId = await mutate("Ada", todo(freshId("after-throw"), "g1"));
  await waitFor("a sync after the listener threw", () => received.some((m) => m.type === "sync" && m.lastSyncId === syncId));
  assert.equal(logged.mock.callCount(), 1);
  assert.match(String(logged.mock.calls[0].arguments[0]), /listener/);
});

test("initSync reports disconnected once per outage, then handshakes again and resumes", async (t) => {
  let failing = false;
  let failures = 0;
  const recording = recordingFetch(async (url, init) => {
    if (failing) {
      failures++;
      throw new TypeError("fetch failed (the test cut the network)");
    }
    return fetch(url, init);
  });
  const grace = recorder();
  listen(t, adapterFor("Grace", { fetch: recording }), grace.listener);
  await waitFor("Grace's handshake", () => grace.messages.length > 0);

  failing = true;
  await waitFor("disconnected", () => grace.ofType("disconnected").length > 0);
  await waitFor("three failed requests", () => failures >= 3);
  assert.equal(grace.ofType("disconnected").length, 1, "one outage, several disconnected messages");
  assert.deepEqual(grace.messages.map((m) => m.type), ["handshake", "disconnected"]);

  const head = await headOf("Grace");
  failing = false;
  await waitFor("a handshake after the outage", () => grace.ofType("handshake").length === 2);
  assert.deepEqual(grace.messages.at(-1), { type: "handshake", lastSyncId: head, syncGroups: (await handshakeOf("Grace")).syncGroups });

  const syncId = await mutate("Ada", todo(freshId("back"), "g1"));
  await waitFor("sync after the outage", () => grace.ofType("sync").length > 0);
  assert.deepEqual(grace.messages.slice(3), [{ type: "sync", lastSyncId: syncId, sync: await logSince("Grace", head) }]);
  assert.deepEqual(grace.messages.map((m) => m.type), ["handshake", "disconnected", "handshake", "sync"]);
});

test("initSync long-polls: each poll asks the server to hold it, and an action ends the hold", async (t) => {
  const head = await headOf("Grace");
  const recording = recordingFetch();
  const grace = recorder();
  listen(t, adapterFor("Grace", { longPoll: true, waitSeconds: 5, fetch: recording }), grace.listener);
  await waitFor("the first poll", () => recording.polls().length >= 1);
  await delay(1000);
  // Plain polling every 50 ms would have made about 20 polls by now.
  assert.equal(recording.polls().length, 1, "the poll was not held");

  const syncId = await mutate("Ada", todo(freshId("held"), "g1"));
  await waitFor("the held poll's answer", () => grace.ofType("sync").length > 0);
  assert.deepEqual(grace.ofType("sync"), [{ type: "sync", lastSyncId: syncId, sync: await logSince("Grace", head) }]);
  for (const poll of recording.polls()) assert.equal(poll.url.searchParams.get("wait"), "5");
});

test("polls that keep failing back off, even when each handshake works", async (t) => {
  // E.g. a proxy that cuts long requests: handshakes pass, polls get a 504.
  const recording = recordingFetch((url, init) =>
    new URL(url).searchParams.has("since") ? Promise.resolve(new Response("Gateway Timeout", { status: 504 })) : fetch(url, init),
  );
  const grace = recorder();
  listen(t, adapterFor("Grace", { fetch: recording }), grace.listener);
  await delay(1500);
  const handshakes = recording.requests.filter((r) => !r.url.searchParams.has("since")).length;
  // Backoff from 50 ms, doubling: about 5 handshakes in 1.5 s; without it, about 20.
  assert.ok(handshakes <= 8, `${handshakes} handshakes in 1.5 s`);
  assert.ok(grace.ofType("disconnected").length >= 2);
});

test("an empty long poll answered at once is followed by a pause, and waitSeconds is sent as the server reads it", async (t) => {
  const recording = recordingFetch(async (url, init) => {
    const page = new URL(url);
    if (!page.searchParams.has("wait")) return fetch(url, init);
    const since = Number(page.searchParams.get("since"));
    return jsonResponse(200, { sync: [], lastSyncId: since, syncGroups: ["all", "group:g1"], hasMore: false });
  });
  listen(t, adapterFor("Grace", { longPoll: true, waitSeconds: 0.1 + 0.2, pollMs: 100, fetch: recording }), () => {});
  await delay(600);
  const polls = recording.polls();
  assert.ok(polls.length >= 2 && polls.length <= 8, `${polls.length} polls in 600 ms`);
  for (const poll of polls) assert.equal(poll.url.searchParams.get("wait"), "0.3");
});

test("initSync falls back to plain polling when the server refuses wait=", async (t) => {
  // A server without long polls refuses the parameter it does not know.
  const head = await headOf("Grace");
  const recording = recordingFetch((url, init) =>
    new URL(url).searchParams.has("wait")
      ? Promise.resolve(jsonResponse(400, { error: { type: "server", code: "invalid_request", message: "wait: Unknown field.", details: { wait: ["Unknown field."] } } }))
      : fetch(url, init),
  );
  const grace = recorder();
  listen(t, adapterFor("Grace", { longPoll: true, waitSeconds: 5, fetch: recording }), grace.listener);
  await waitFor("three polls", () => recording.polls().length >= 3);

  const [asked, ...plain] = recording.polls();
  assert.equal(asked.url.searchParams.get("wait"), "5");
  assert.equal(asked.status, 400);
  for (const poll of plain) assert.ok(!poll.url.searchParams.has("wait"), `a poll after the refusal asked to wait: ${poll.url}`);
  assert.deepEqual(grace.messages.map((m) => m.type), ["handshake"], "a refused wait= is no outage");

  const syncId = await mutate("Ada", todo(freshId("fallback"), "g1"));
  await waitFor("sync without long polls", () => grace.ofType("sync").length > 0);
  assert.deepEqual(grace.ofType("sync"), [{ type: "sync", lastSyncId: syncId, sync: await logSince("Grace", head) }]);
});

test("after unsubscribe no request is made and the listener is never called again", async (t) => {
  const recording = recordingFetch();
  const grace = recorder();
  const unsubscribe = listen(t, adapterFor("Grace", { fetch: recording }), grace.listener);
  await waitFor("two polls", () => grace.messages.length > 0 && recording.polls().length >= 2);

  unsubscribe();
  const requests = recording.requests.length;
  const messages = grace.messages.length;
  await mutate("Ada", todo(freshId("unheard"), "g1"));
  await delay(10 * POLL_MS);
  assert.equal(recording.requests.length, requests, "a request after unsubscribe");
  assert.equal(grace.messages.length, messages, "a message after unsubscribe");
});

test("unsubscribing aborts the poll in flight and sends nothing more, not even disconnected", async (t) => {
  let hold = false;
  const recording = recordingFetch((url, init) => {
    if (!hold || !new URL(url).searchParams.has("since")) return fetch(url, init);
    // A poll the server holds: it ends only when its signal aborts.
    return new Promise((_, reject) => {
      init.signal.addEventListener("abort", () => reject(init.signal.reason), { once: true });
    });
  });
  const grace = recorder();
  const unsubscribe = listen(t, adapterFor("Grace", { fetch: recording }), grace.listener);
  await waitFor("Grace's handshake", () => grace.messages.length > 0);

  hold = true;
  const held = await waitFor("a held poll", () => recording.polls().find((r) => r.status === undefined && !r.signal.aborted));
  const requests = recording.requests.length;
  const messages = grace.messages.length;
  unsubscribe();
  assert.equal(held.signal.aborted, true, "the poll in flight was not aborted");

  await mutate("Ada", todo(freshId("unheard"), "g1"));
  await delay(10 * POLL_MS);
  assert.equal(recording.requests.length, requests, "a request after unsubscribe");
  assert.deepEqual(grace.messages.slice(messages), [], "a message after unsubscribe");
});
