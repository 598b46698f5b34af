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

/** @type {{baseUrl: string, tokens: Record<string, string>, flask: (...args: string[]) => Promise<string>, stop: () => Promise<void>}} */
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

/** Spawns tests/live_server.py; it serves until its stdin closes, and runs the flask commands it is sent. */
async function startServer() {
  const script = fileURLToPath(new URL("../live_server.py", import.meta.url));
  const child = spawn(process.env.PYTHON ?? "python3", [script], { stdio: ["pipe", "pipe", "inherit"] });
  child.stdin.on("error", () => {}); // an EPIPE if it died first; its exit code says more
  const exited = new Promise((resolve) => child.once("exit", resolve));
  // Its stdout, a line at a time: first its address, then one answer per command.
  /** @type {string[]} */
  const lines = [];
  /** @type {{resolve: (line: string) => void, reject: (error: Error) => void}[]} */
  const readers = [];
  /** @type {Error | undefined} */
  let gone;
  const fail = (error) => {
    gone = error;
    for (const reader of readers.splice(0)) reader.reject(error);
  };
  child.once("error", fail); // e.g. no such interpreter
  child.once("exit", (code) => fail(new Error(`tests/live_server.py exited (${code})`)));
  let buffer = "";
  child.stdout.setEncoding("utf8");
  child.stdout.on("data", (chunk) => {
    buffer += chunk;
    for (let end = buffer.indexOf("\n"); end >= 0; end = buffer.indexOf("\n")) {
      const line = buffer.slice(0, end);
      buffer = buffer.slice(end + 1);
      if (readers.length > 0) readers.shift().resolve(line);
      else lines.push(line);
    }
  });
  /** @returns {Promise<string>} */
  const nextLine = () =>
    new Promise((resolve, reject) => {
      if (lines.length > 0) resolve(lines.shift());
      else if (gone) reject(gone);
      else readers.push({ resolve, reject });
    });
  const { baseUrl, tokens } = JSON.parse(await nextLine()); // an exit first: it died before printing its address
  let commands = Promise.resolve();
  return {
    baseUrl,
    tokens,
    /** Runs `flask --app app ARGS...` on the server's database; its output. @param {string[]} args */
    flask(...args) {
      const run = commands.then(async () => {
        child.stdin.write(`${JSON.stringify(args)}\n`);
        const { exitCode, output } = JSON.parse(await nextLine());
        assert.equal(exitCode, 0, `flask ${args.join(" ")} failed: ${output}`);
        return output;
      });
      commands = run.catch(() => {});
      return run;
    },
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

// deltaSync's and bootstrap's own retries are off unless a test is about them: failures then come back at once.
function adapterFor(user, options = {}) {
  return createNetworkAdapter({
    baseUrl: server.baseUrl,
    token: server.tokens[user],
    pollMs: POLL_MS,
    longPoll: false,
    deltaSyncRetries: 0,
    bootstrapRetries: 0,
    ...options,
  });
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
  /** @type {{url: URL, method: string, headers: Record<string, string>, text: string | undefined, body: any, signal: AbortSignal | undefined, at: number, status?: number}[]} */
  const requests = [];
  const wrapped = async (url, init = {}) => {
    const request = {
      url: new URL(url),
      method: init.method ?? "GET",
      headers: { ...init.headers },
      text: init.body, // the wire, as sent
      body: init.body === undefined ? undefined : JSON.parse(init.body),
      signal: init.signal,
      at: performance.now(),
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
/** A fetch that drops the answer of the next POST after it is committed, while `lose` is set (it clears itself). */
function losingFetch(lose) {
  const state = {
    lose,
    async fetch(url, init) {
      const response = await fetch(url, init);
      if (init.method === "POST" && state.lose) {
        state.lose = false;
        await response.arrayBuffer();
        throw new TypeError("fetch failed (the test dropped the answer)");
      }
      return response;
    },
  };
  return state;
}

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
  const losing = losingFetch(true);
  const recording = recordingFetch(losing.fetch);
  const adapter = adapterFor("Ada", { fetch: recording });
  const head = await headOf();
  const id = freshId("retry");
  const changes = [todo(id, "g1"), update("Todo", id, { likeCount: 3 })];

  const lost = await adapter.sendTransaction(changes);
  assertFailure(lost, "network", { status: 0 });
  assert.equal(await headOf(), head + 2, "the first attempt was committed; only its answer was lost");
  // The Loco Sync client retries it, in order: the adapter does not.
  assert.equal(recording.requests.length, 1);

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

test("a lazy bootstrap of a sync group the caller lacks is an auth error, and resets the adapter: the user lost that group", async () => {
  // The Loco Sync client lazily bootstraps only groups the server gave it: a refusal means the user has lost one since.
  const resets = [];
  const recording = recordingFetch();
  const adapter = adapterFor("Grace", { fetch: recording, onReset: (info) => resets.push(JSON.stringify(info)) });
  const result = await adapter.bootstrap({ type: "lazy", models: ["Todo"], syncGroups: ["group:g2"] });
  assertFailure(result, "auth", { status: 403, code: "forbidden" });
  assert.deepEqual(resets, ['{"reason":"sync_group_removed","syncGroups":["group:g2"]}']);
  assertFailure(await adapter.bootstrap({ type: "lazy", models: ["Todo"], syncGroups: ["group:g1"] }), "server", { code: "adapter_reset" });
  assert.equal(recording.requests.length, 1);
});

test("an unreachable server is a network error with status 0", async () => {
  const adapter = createNetworkAdapter({ baseUrl: `http://127.0.0.1:${await closedPort()}`, token: server.tokens.Ada, deltaSyncRetries: 0, bootstrapRetries: 0 });
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
    bootstrapRetries: 0,
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
  const refused = recordingFetch(() => Promise.resolve(jsonResponse(400, { error: { type: "server", code: "invalid_request", message: "x", details: null } })));
  assertFailure(await adapterFor("Ada", { fetch: refused, deltaSyncRetries: 2 }).deltaSync(head, head + 1), "server", { code: "invalid_request" });
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
  const { syncGroups } = await handshakeOf("Grace");
  const recording = recordingFetch(async (url, init) => {
    const page = new URL(url);
    if (!page.searchParams.has("wait")) return fetch(url, init);
    const since = Number(page.searchParams.get("since"));
    return jsonResponse(200, { sync: [], lastSyncId: since, syncGroups, hasMore: false });
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

// --- retries ----------------------------------------------------------------------

const busy = () =>
  jsonResponse(503, { error: { type: "network", code: "database_busy", message: "The database is busy.", details: null } }, { "Retry-After": "1" });

/** A fetch that answers each of `failures` in turn (an Error is thrown), then really fetches. */
function failingFirst(failures) {
  return recordingFetch((url, init) => {
    const next = failures.shift();
    if (next instanceof Error) return Promise.reject(next);
    return next ? Promise.resolve(next()) : fetch(url, init);
  });
}

test("bootstrap retries network failures with backoff, eager and lazy, until one gets through, but not auth or server failures", async () => {
  // The Loco Sync client never retries a bootstrap: a failed eager one leaves it
  // "failed", a failed lazy one loses that group's rows for good.
  const transient = () => [
    new TypeError("fetch failed"),
    busy,
    () => new Response("<html>Bad Gateway</html>", { status: 502 }),
    () => new Response('{"bootstrap": ', { status: 200, headers: { "Content-Type": "application/json" } }),
  ];
  const pollMs = 20;
  const expected = JSON.stringify(SEEDED.Todo.slice(0, 2));
  for (const args of [{ type: "eager", models: ["Todo"] }, { type: "lazy", models: ["Todo"], syncGroups: ["group:g1"] }]) {
    const recording = failingFirst(transient());
    const result = await adapterFor("Grace", { fetch: recording, pollMs, bootstrapRetries: Infinity }).bootstrap(args);
    assert.equal(result.ok, true, JSON.stringify(result));
    assert.equal(JSON.stringify(result.value.bootstrap.Todo.filter((row) => row.id === "t1" || row.id === "t2")), expected);
    assert.deepEqual(recording.requests.map((r) => r.status), [undefined, 503, 502, 200, 200]);
    // Each pause at least half of pollMs * 2^n.
    const gaps = recording.requests.slice(1).map((r, n) => r.at - recording.requests[n].at);
    gaps.forEach((gap, n) => assert.ok(gap >= (pollMs * 2 ** n) / 2 - 2, `pauses ${JSON.stringify(gaps)} ms`));
  }

  const unauthorized = () => jsonResponse(401, { error: { type: "auth", code: "unauthorized", message: "Unknown token.", details: null } });
  const invalid = () => jsonResponse(400, { error: { type: "server", code: "invalid_request", message: "x", details: null } });
  for (const answer of [unauthorized, invalid]) {
    const recording = failingFirst([answer, answer]);
    const result = await adapterFor("Grace", { fetch: recording, bootstrapRetries: Infinity }).bootstrap({ type: "eager", models: ["Todo"] });
    assert.equal(result.ok, false);
    assert.equal(recording.requests.length, 1, `${result.reason.code} was retried`);
  }
});

test("retries back off to at most maxBackoffMs, and give up after bootstrapRetries or deltaSyncRetries", async () => {
  const head = await headOf();
  const options = { pollMs: 100, maxBackoffMs: 150, bootstrapRetries: 5, deltaSyncRetries: 5 };
  const down = recordingFetch(() => Promise.reject(new TypeError("fetch failed")));
  const adapter = adapterFor("Ada", { ...options, fetch: down });
  assertFailure(await adapter.bootstrap({ type: "eager", models: ["Todo"] }), "network", { status: 0 });
  assert.equal(down.requests.length, 6);
  assertFailure(await adapter.deltaSync(head - 1, head), "network", { status: 0 });
  assert.equal(down.requests.length, 12);
  for (const requests of [down.requests.slice(0, 6), down.requests.slice(6)]) {
    const gaps = requests.slice(1).map((r, n) => r.at - requests[n].at);
    // 100, 200, 400, ... capped at 150, each 50 to 100% of that; a timer may fire late.
    assert.ok(gaps.every((gap) => gap >= 48 && gap <= 150 + 40), `pauses ${JSON.stringify(gaps)} ms`);
    assert.ok(gaps.slice(1).every((gap) => gap >= 73), `pauses ${JSON.stringify(gaps)} ms`);
  }
});

/**
 * A TCP proxy to the live server that closes the connection (as a server closes
 * an idle keep-alive connection) when a request's first bytes match `pattern`, `times` times.
 */
async function cuttingProxy(t, pattern, times = 1) {
  const target = new URL(server.baseUrl);
  const sockets = new Set();
  const proxy = net.createServer((client) => {
    const upstream = net.connect(Number(target.port), target.hostname);
    sockets.add(client).add(upstream);
    client.on("error", () => {});
    upstream.on("error", () => {});
    client.on("close", () => upstream.destroy());
    upstream.on("close", () => client.destroy());
    upstream.pipe(client);
    client.on("data", (chunk) => {
      if (proxy.cuts < times && pattern.test(chunk.toString("latin1"))) {
        proxy.cuts++;
        client.destroy();
      } else {
        upstream.write(chunk);
      }
    });
  });
  proxy.cuts = 0;
  await new Promise((resolve) => proxy.listen(0, "127.0.0.1", resolve));
  t.after(() => {
    proxy.close();
    for (const socket of sockets) socket.destroy(); // kept alive by fetch's pool
  });
  return { proxy, baseUrl: `http://127.0.0.1:${proxy.address().port}` };
}

test("a lazy bootstrap whose connection closes under it is retried, so the group's rows arrive", async (t) => {
  const { proxy, baseUrl } = await cuttingProxy(t, /^GET \/bootstrap\?type=lazy/, 2);
  const recording = recordingFetch();
  const adapter = adapterFor("Grace", { baseUrl, fetch: recording, bootstrapRetries: Infinity });
  // One request over the connection first, so the lazy bootstrap may reuse it.
  assert.equal((await adapter.bootstrap({ type: "eager", models: ["Author"] })).ok, true);

  const result = await adapter.bootstrap({ type: "lazy", models: ["Group", "Todo"], syncGroups: ["group:g1"] });
  assert.equal(result.ok, true, JSON.stringify(result));
  assert.equal(proxy.cuts, 2);
  assert.equal(JSON.stringify(result.value.bootstrap.Group), JSON.stringify([SEEDED.Group[0]]));
  assert.equal(JSON.stringify(result.value.bootstrap.Todo.filter((row) => row.id === "t1" || row.id === "t2")), JSON.stringify(SEEDED.Todo.slice(0, 2)));
  assert.equal(JSON.stringify(result.value.syncGroups), '["group:g1"]');
  assert.deepEqual(recording.requests.map((r) => r.url.searchParams.get("type")), ["eager", "lazy", "lazy", "lazy"]);
});

// --- starting over ------------------------------------------------------------------

/** A new user in `groupIds`, whose token the helpers know by `name`; its id. */
async function newUser(name, ...groupIds) {
  const output = await server.flask("create-user", name, ...groupIds.flatMap((id) => ["--group", id]));
  const [, id, token] = output.match(/^User (\d+) \(.*\) token: (\S+)$/m);
  server.tokens[name] = token;
  return id;
}

/** Resets an adapter reports, as JSON text. */
function resets() {
  /** @type {string[]} */
  const seen = [];
  const onReset = (info) => {
    seen.push(JSON.stringify(info));
  };
  return { seen, onReset };
}

/** Asserts every method now answers adapter_reset with `info`, without a request, and initSync does nothing. */
async function assertStopped(t, adapter, recording, info) {
  const requests = recording.requests.length;
  const calls = [
    adapter.sendTransaction([todo(freshId("after-reset"), "g1")]),
    adapter.bootstrap({ type: "eager", models: ["Todo"] }),
    adapter.deltaSync(0, 1),
  ];
  for (const result of await Promise.all(calls)) {
    assertFailure(result, "server", { status: 0, code: "adapter_reset" });
    assert.equal(JSON.stringify(result.reason.details), info);
  }
  const messages = [];
  listen(t, adapter, (message) => messages.push(message));
  await delay(5 * POLL_MS);
  assert.deepEqual(messages, []);
  assert.equal(recording.requests.length, requests, "a request after the reset");
}

test("a transaction carries baseSyncId, the greatest syncId the adapter had seen when it first sent it, and keeps it for its retries", async (t) => {
  const losing = losingFetch(false);
  const recording = recordingFetch(losing.fetch);
  const adapter = adapterFor("Ada", { fetch: recording });
  const posts = () => recording.requests.filter((r) => r.method === "POST");
  const wire = (request, baseSyncId, changes) =>
    JSON.stringify(baseSyncId === undefined ? { transactionId: request.body.transactionId, changes } : { transactionId: request.body.transactionId, baseSyncId, changes });

  // None seen yet: no baseSyncId.
  const first = [todo(freshId("base"), "g1")];
  const { value: { lastSyncId: committed } } = await adapter.sendTransaction(first);
  assert.equal(posts()[0].text, wire(posts()[0], undefined, first));

  // Its answer's lastSyncId; then a bootstrap's firstSyncId.
  const second = [todo(freshId("base"), "g1")];
  assert.equal((await adapter.sendTransaction(second)).ok, true);
  assert.equal(posts()[1].text, wire(posts()[1], committed, second));
  await mutate("Ada", todo(freshId("base"), "g2"));
  const { value: { firstSyncId: bootstrapped } } = await adapter.bootstrap({ type: "eager", models: ["Author"] });
  losing.lose = true;
  const lost = [todo(freshId("base"), "g1")];
  assertFailure(await adapter.sendTransaction(lost), "network");
  assert.equal(posts()[2].text, wire(posts()[2], bootstrapped, lost));

  // A deltaSync page's lastSyncId; the retry keeps its first base.
  const written = await mutate("Ada", todo(freshId("base"), "g1"));
  assert.equal((await adapter.deltaSync(written - 1, written)).ok, true);
  assert.deepEqual(await adapter.sendTransaction(lost), { ok: true, value: { lastSyncId: bootstrapped + 1 } });
  assert.equal(posts()[3].text, posts()[2].text);
  const next = [todo(freshId("base"), "g1")];
  assert.equal((await adapter.sendTransaction(next)).ok, true);
  assert.equal(posts()[4].text, wire(posts()[4], written, next));

  // A handshake's, and a poll's, lastSyncId.
  const listening = recordingFetch();
  const other = adapterFor("Ada", { fetch: listening });
  const messages = [];
  listen(t, other, (message) => messages.push(message));
  await waitFor("the handshake", () => messages.length > 0);
  const third = [todo(freshId("base"), "g1")];
  await other.sendTransaction(third);
  const sentByOther = () => listening.requests.filter((r) => r.method === "POST");
  assert.equal(sentByOther()[0].text, wire(sentByOther()[0], messages[0].lastSyncId, third));
  const polled = await mutate("Ada", todo(freshId("base"), "g1")); // not through this adapter
  await waitFor("the poll that brings it", () => messages.some((m) => m.type === "sync" && m.lastSyncId === polled));
  const fourth = [todo(freshId("base"), "g1")];
  await other.sendTransaction(fourth);
  assert.equal(sentByOther()[1].text, wire(sentByOther()[1], polled, fourth));
});

/** A fetch whose polls (/sync?since=) wait, while `held` is true, until release() is called. */
function holdingFetch() {
  let open;
  let gate = Promise.resolve();
  const recording = recordingFetch(async (url, init) => {
    if (new URL(url).searchParams.has("since")) await gate;
    return fetch(url, init);
  });
  recording.hold = () => {
    gate = new Promise((resolve) => (open = resolve));
  };
  recording.release = () => open();
  return recording;
}

test("a poll answered bootstrap_again (the log was compacted past its cursor) calls onReset once, and the adapter stops", async (t) => {
  const recording = holdingFetch();
  const { seen, onReset } = resets();
  const adapter = adapterFor("Grace", { fetch: recording, onReset });
  const grace = recorder();
  listen(t, adapter, grace.listener);
  await waitFor("Grace's handshake", () => grace.messages.length > 0);

  // Her next poll waits while the log moves on and is compacted past her cursor.
  recording.hold();
  const polls = recording.polls().length;
  await waitFor("a poll on hold", () => recording.polls().length > polls);
  const cursor = Number(recording.polls().at(-1).url.searchParams.get("since"));
  await mutate("Ada", todo(freshId("compacted"), "g1"));
  const head = await mutate("Ada", todo(freshId("compacted"), "g1"));
  await server.flask("compact-log", "--before", String(head));
  assert.ok(cursor < head - 1);
  recording.release();

  await waitFor("onReset", () => seen.length > 0);
  assert.deepEqual(seen, ['{"reason":"compacted"}']);
  const refused = recording.polls().at(-1);
  assert.equal(refused.status, 409);
  assert.equal(refused.url.searchParams.get("since"), String(cursor));
  await delay(5 * POLL_MS);
  assert.deepEqual(grace.messages.map((m) => m.type), ["handshake"], "nothing after the reset, not even disconnected");
  await assertStopped(t, adapter, recording, '{"reason":"compacted"}');
  assert.equal(seen.length, 1);
});

test("deltaSync answered bootstrap_again (a cursor this database never gave) calls onReset once, however many requests are refused", async () => {
  const head = await headOf("Grace");
  const recording = recordingFetch();
  const { seen, onReset } = resets();
  const adapter = adapterFor("Grace", { fetch: recording, onReset });

  const [one, two] = await Promise.all([adapter.deltaSync(head + 5, head + 6), adapter.deltaSync(head + 7, head + 8)]);
  for (const result of [one, two]) {
    assert.equal(result.ok, false);
    if (result.reason.code === "adapter_reset") continue; // the second, if it was still in flight
    assertFailure(result, "server", { status: 409, code: "bootstrap_again" });
    assert.equal(JSON.stringify(result.reason.details), '{"reason":"reset"}');
  }
  assert.deepEqual(seen, ['{"reason":"reset"}']);
  assertFailure(await adapter.deltaSync(head - 1, head), "server", { code: "adapter_reset" });
  assert.deepEqual(seen, ['{"reason":"reset"}']);

  // Answers read before the reset could abort them: each is a "bootstrap again", onReset is still called once.
  const again = (reason) => jsonResponse(409, { error: { type: "server", code: "bootstrap_again", message: "x", details: { reason } } });
  const answers = [again("compacted"), again("reset"), again("compacted")];
  const twice = resets();
  const mocked = adapterFor("Grace", { fetch: async () => answers.shift(), onReset: twice.onReset });
  const results = await Promise.all([mocked.deltaSync(1, 2), mocked.bootstrap({ type: "eager", models: ["Todo"] }), mocked.sendTransaction([todo(freshId("x"), "g1")])]);
  for (const result of results) assertFailure(result, "server", { status: 409, code: "bootstrap_again" });
  assert.deepEqual(twice.seen, ['{"reason":"compacted"}']);
});

test("sendTransaction answered bootstrap_again (a retry whose base the log no longer holds) calls onReset, aborts the held poll, and is a server failure", async (t) => {
  const losing = losingFetch(true);
  let hold = false;
  /** @type {AbortSignal[]} */
  const held = [];
  const recording = recordingFetch(async (url, init) => {
    if (hold && new URL(url).searchParams.has("since")) {
      // A poll the server holds: it ends only when its signal aborts.
      held.push(init.signal);
      return new Promise((_, reject) => init.signal.addEventListener("abort", () => reject(init.signal.reason), { once: true }));
    }
    return losing.fetch(url, init);
  });
  const { seen, onReset } = resets();
  const adapter = adapterFor("Ada", { fetch: recording, onReset });
  const ada = recorder();
  listen(t, adapter, ada.listener);
  await waitFor("Ada's handshake", () => ada.messages.length > 0);
  hold = true;
  await waitFor("a held poll", () => held.length > 0);

  const base = ada.messages[0].lastSyncId;
  const changes = [todo(freshId("pruned"), "g1")];
  assertFailure(await adapter.sendTransaction(changes), "network");
  const committed = await headOf();
  assert.equal(committed, base + 1, "the first attempt was committed; only its answer was lost");
  // The log moves on and is compacted past the transaction's base: its record goes with it.
  await mutate("Ada", todo(freshId("pruned"), "g2"));
  const head = await mutate("Ada", todo(freshId("pruned"), "g2"));
  await server.flask("compact-log", "--before", String(head));

  const retried = await adapter.sendTransaction(changes);
  assertFailure(retried, "server", { status: 409, code: "bootstrap_again" });
  assert.equal(JSON.stringify(retried.reason.details), '{"reason":"compacted"}');
  assert.deepEqual(seen, ['{"reason":"compacted"}']);
  const [first, second] = recording.requests.filter((r) => r.method === "POST");
  assert.equal(second.text, first.text);
  assert.equal(first.text, JSON.stringify({ transactionId: first.body.transactionId, baseSyncId: base, changes }));
  assert.equal(await headOf(), head, "the retry wrote nothing");

  assert.deepEqual(held.map((signal) => signal.aborted), [true], "the held poll was not aborted");
  await delay(5 * POLL_MS);
  assert.deepEqual(ada.messages.map((m) => m.type), ["handshake"], "nothing after the reset, not even disconnected");
  await assertStopped(t, adapter, recording, '{"reason":"compacted"}');
});

test("schemaVersion is sent as Loco-Schema-Version on every request; another version resets with schema_changed", async (t) => {
  const { schemaVersion } = await handshakeOf("Ada");
  assert.equal(Number.isInteger(schemaVersion), true, `the handshake has no schemaVersion: ${schemaVersion}`);

  const recording = recordingFetch();
  const adapter = adapterFor("Ada", { fetch: recording, schemaVersion });
  const head = await headOf("Ada");
  assert.equal((await adapter.bootstrap({ type: "eager", models: ["Todo"] })).ok, true);
  assert.equal((await adapter.deltaSync(head - 1, head)).ok, true);
  assert.equal((await adapter.sendTransaction([todo(freshId("schema"), "g1")])).ok, true);
  listen(t, adapter, () => {});
  await waitFor("a poll", () => recording.polls().some((r) => r.status === 200 && !r.url.searchParams.has("until")));
  assert.ok(recording.requests.length >= 5);
  for (const request of recording.requests) assert.equal(request.headers["Loco-Schema-Version"], String(schemaVersion), request.url.href);
  const plain = recordingFetch();
  await adapterFor("Ada", { fetch: plain }).bootstrap({ type: "eager", models: ["Author"] });
  assert.equal("Loco-Schema-Version" in plain.requests[0].headers, false);

  const newer = recordingFetch();
  const { seen, onReset } = resets();
  const outdated = adapterFor("Ada", { fetch: newer, schemaVersion: schemaVersion + 1, onReset });
  const messages = [];
  listen(t, outdated, (message) => messages.push(message));
  await waitFor("onReset", () => seen.length > 0);
  assert.deepEqual(seen, [JSON.stringify({ reason: "schema_changed", schemaVersion })]);
  assert.deepEqual(newer.requests.map((r) => [r.url.pathname + r.url.search, r.status]), [["/sync", 409]]);
  await delay(5 * POLL_MS);
  assert.deepEqual(messages, [], "a handshake of a server of another schema");
  await assertStopped(t, outdated, newer, JSON.stringify({ reason: "schema_changed", schemaVersion }));
});

test("a poll whose syncGroups lose a group calls onReset with the groups lost, and delivers nothing more", async (t) => {
  // The Loco Sync client cannot drop a lost group's rows ("Removing sync groups isn't supported yet").
  const name = freshId("Linus");
  const id = await newUser(name, "g2");
  const recording = recordingFetch();
  const { seen, onReset } = resets();
  const adapter = adapterFor(name, { fetch: recording, onReset, longPoll: true, waitSeconds: 5 });
  const linus = recorder();
  listen(t, adapter, linus.listener);
  await waitFor("Linus's handshake", () => linus.messages.length > 0);
  assert.equal(JSON.stringify(linus.messages[0].syncGroups), '["all","group:g2"]');
  const held = await waitFor("a held poll", () => recording.polls().find((r) => r.status === undefined));

  await server.flask("remove-member", id, "g2");
  await waitFor("onReset", () => seen.length > 0);
  assert.deepEqual(seen, ['{"reason":"sync_group_removed","syncGroups":["group:g2"]}']);
  assert.equal(held.status, 200, "the held poll answered the change");
  await delay(5 * POLL_MS);
  assert.deepEqual(linus.messages.map((m) => m.type), ["handshake"]);
  await assertStopped(t, adapter, recording, '{"reason":"sync_group_removed","syncGroups":["group:g2"]}');
});

test("a handshake that lacks a group the client holds resets: one an eager bootstrap gave, or one the syncGroups option names", async (t) => {
  const name = freshId("Mary");
  const id = await newUser(name, "g1");
  const bootstrapped = resets();
  const first = adapterFor(name, { onReset: bootstrapped.onReset });
  assert.equal(JSON.stringify((await first.bootstrap({ type: "eager", models: ["Author"] })).value.syncGroups), '["all","group:g1"]');
  const stored = resets();
  const reloaded = adapterFor(name, { onReset: stored.onReset, syncGroups: ["all", "group:g1"] });
  await server.flask("remove-member", id, "g1");

  const messages = [];
  listen(t, first, (message) => messages.push(message));
  listen(t, reloaded, (message) => messages.push(message));
  await waitFor("two resets", () => bootstrapped.seen.length > 0 && stored.seen.length > 0);
  assert.deepEqual(bootstrapped.seen, ['{"reason":"sync_group_removed","syncGroups":["group:g1"]}']);
  assert.deepEqual(stored.seen, ['{"reason":"sync_group_removed","syncGroups":["group:g1"]}']);
  await delay(5 * POLL_MS);
  assert.deepEqual(messages, []);

  // A new client has lost nothing: its first handshake is where it starts.
  const fresh = resets();
  const newcomer = recorder();
  listen(t, adapterFor(name, { onReset: fresh.onReset }), newcomer.listener);
  await waitFor("the handshake", () => newcomer.messages.length > 0);
  assert.equal(JSON.stringify(newcomer.messages[0].syncGroups), '["all"]');
  assert.deepEqual(fresh.seen, []);
});

test("without onReset the adapter stops all the same, and says so with console.error", async (t) => {
  const logged = t.mock.method(console, "error", () => {});
  const head = await headOf();
  const recording = recordingFetch();
  const adapter = adapterFor("Ada", { fetch: recording });
  assertFailure(await adapter.deltaSync(head + 1, head + 2), "server", { status: 409, code: "bootstrap_again" });
  assert.equal(logged.mock.callCount(), 1);
  assert.match(String(logged.mock.calls[0].arguments[0]), /start over \(reset\).*onReset/);
  await assertStopped(t, adapter, recording, '{"reason":"reset"}');
  assert.equal(logged.mock.callCount(), 1);
});

test("an onReset that throws or rejects is logged, and the adapter is stopped all the same", async (t) => {
  const logged = t.mock.method(console, "error", () => {});
  const head = await headOf();
  for (const onReset of [() => { throw new Error("the test's onReset failed"); }, async () => { throw new Error("the test's onReset failed"); }]) {
    const recording = recordingFetch();
    const adapter = adapterFor("Ada", { fetch: recording, onReset });
    assertFailure(await adapter.deltaSync(head + 1, head + 2), "server", { code: "bootstrap_again" });
    await delay(0);
    await assertStopped(t, adapter, recording, '{"reason":"reset"}');
  }
  assert.equal(logged.mock.callCount(), 2);
  assert.match(String(logged.mock.calls[0].arguments[0]), /onReset/);
});

test("the README's onReset lines stop the client, drop its store and start a new one when the user loses a group", async (t) => {
  const readme = await readFile(new URL("../../README.md", import.meta.url), "utf8");
  const [, lines] = readme.match(/```js\n([\s\S]*?)```/);
  // What the lines use besides the adapter, recorded: a client that follows initSync, and a store that is deleted.
  const clients = [];
  class LocoSyncClient {
    constructor({ network, storage }) {
      Object.assign(this, { network, storage, messages: [], stopped: false });
      clients.push(this);
    }
    start() {
      this.unsubscribe = this.network.initSync((message) => void this.messages.push(message));
    }
    stop() {
      this.stopped = true;
      this.unsubscribe();
    }
  }
  const deleted = [];
  const indexedDB = {
    deleteDatabase(name) {
      const request = {};
      deleted.push(name);
      setTimeout(() => request.onsuccess?.(), 0);
      return request;
    },
  };
  const createLocoSyncIdbAdapter = (name, config, { onBlocking }) => ({ name, config, onBlocking });
  const name = freshId("Ruth");
  const id = await newUser(name, "g2");
  const start = new Function(
    "createNetworkAdapter", "createLocoSyncIdbAdapter", "LocoSyncClient", "indexedDB", "namespace", "config", "baseUrl", "token",
    `${lines}\nreturn start;`,
  )(
    // Polls held 1 s, not 25: a removal that commits before a poll's page is read shows in the answer after the wait.
    (options) => createNetworkAdapter({ ...options, waitSeconds: 1, pollMs: POLL_MS }),
    createLocoSyncIdbAdapter, LocoSyncClient, indexedDB, `todos-${name}`, {}, server.baseUrl, server.tokens[name],
  );
  t.after(() => clients.forEach((client) => client.stopped || client.stop()));

  start();
  await waitFor("the first client's handshake", () => clients[0]?.messages.length > 0);
  assert.equal(JSON.stringify(clients[0].messages[0].syncGroups), '["all","group:g2"]');
  await server.flask("remove-member", id, "g2");

  await waitFor("a second client's handshake", () => clients[1]?.messages.length > 0, 10_000);
  assert.equal(clients.length, 2);
  assert.ok(clients[0].stopped && !clients[1].stopped);
  assert.deepEqual(deleted, [`todos-${name}`]);
  assert.equal(JSON.stringify(clients[1].messages[0].syncGroups), '["all"]');
  assert.equal(typeof clients[1].storage.onBlocking, "function");
});
