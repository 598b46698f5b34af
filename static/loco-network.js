// A Loco Sync NetworkAdapter for this server: a dependency-free ES module that
// runs in browsers and in Node 18+. Plug it into `new LocoSyncClient({network})`.
//
// Every method resolves to Loco Sync's Result shape and never throws or
// rejects: the Loco Sync client silently drops a transaction whose
// sendTransaction throws.

/** @typedef {"server" | "auth" | "network"} NetworkErrorType */

/**
 * Why a call failed, from the server's error body when there was one.
 * @typedef {{status: number, code: string, message: string, details?: unknown}} FailureReason
 */

/**
 * @template T
 * @typedef {{ok: true, value: T} | {ok: false, error: NetworkErrorType, reason: FailureReason}} Result
 */

/**
 * A change as the Loco Sync client sends it (LocalChange).
 * @typedef {{action: "create" | "update" | "delete", modelName: string, modelId: string, data?: Record<string, unknown>}} LocalChange
 */

/**
 * A sync action; `insert` and `update` carry the full row. modelName and data
 * are `any` so that TypeScript accepts the adapter as a NetworkAdapter of your models.
 * @typedef {{syncId: number, modelName: any, modelId: string} & ({action: "insert" | "update", data: any} | {action: "delete"})} SyncAction
 */

/**
 * @typedef {{type: "eager", models: string[]} | {type: "lazy", models: string[], syncGroups: string[]}} BootstrapArgs
 */

/**
 * @typedef {{bootstrap: Record<string, Record<string, unknown>[]>, firstSyncId: number, syncGroups: string[]}} BootstrapValue
 */

/**
 * @typedef {{type: "handshake", lastSyncId: number, syncGroups: string[]}
 *   | {type: "sync", lastSyncId: number, sync: SyncAction[]}
 *   | {type: "disconnected"}} SyncMessage
 */

/** @typedef {(message: SyncMessage) => void | Promise<void>} SyncListener */

/**
 * @typedef {object} NetworkAdapter
 * @property {(args: readonly LocalChange[] | any) => Promise<Result<{lastSyncId: number}>>} sendTransaction
 * @property {(args: BootstrapArgs) => Promise<Result<BootstrapValue>>} bootstrap
 * @property {(fromSyncId: number, toSyncId: number) => Promise<Result<{sync: SyncAction[]}>>} deltaSync
 * @property {(listener: SyncListener) => () => void} initSync
 */

/**
 * @typedef {object} NetworkOptions
 * @property {string} [baseUrl] Where the API is; "" (the default) is the page's own origin.
 * @property {string} token A user's token, as printed by `flask --app app seed` or `create-user`.
 * @property {number} [pollMs] Pause between polls when not long-polling (default 1000).
 * @property {boolean} [longPoll] Ask the server to hold empty polls (`wait=`); falls back to
 *   plain polling if the server does not know the parameter (default true).
 * @property {number} [waitSeconds] How long a long poll may be held (default 25, at most 30).
 * @property {number} [pageLimit] `limit` per /sync page; the server's default when unset.
 * @property {number} [deltaSyncRetries] How often deltaSync retries a network or auth failure,
 *   with backoff from pollMs, before it answers with the failure (default 5).
 * @property {number} [timeoutMs] Give up on a request after this long (default 30000).
 * @property {(args: any) => readonly LocalChange[]} [toChanges] For a Loco Sync config with custom
 *   mutations (`mutationDefs`): turns the mutation args the client sends into this server's changes.
 *   By default the args are the changes.
 * @property {typeof fetch} [fetch] The fetch to use (tests wrap it).
 */

const ERROR_TYPES = ["server", "auth", "network"];
const MAX_BACKOFF_MS = 10_000;

/**
 * @param {NetworkOptions} options
 * @returns {NetworkAdapter}
 */
export function createNetworkAdapter({
  baseUrl = "",
  token,
  pollMs = 1000,
  longPoll = true,
  waitSeconds = 25,
  pageLimit,
  deltaSyncRetries = 5,
  timeoutMs = 30_000,
  toChanges = (args) => args,
  fetch: fetchImpl = (...args) => globalThis.fetch(...args),
} = /** @type {NetworkOptions} */ ({})) {
  // The transactionId of each transaction, keyed by the very args object the
  // client passes: the Loco Sync client retries a transaction with the same
  // object, so a retry of a request whose answer was lost is recognised by the server.
  /** @type {WeakMap<object, string>} */
  const transactionIds = new WeakMap();
  let serverHoldsPolls = longPoll;
  const holdSeconds = Math.min(30, Math.max(0.001, Math.round(waitSeconds * 1000) / 1000)); // as the server parses it

  /**
   * One request, its outcome as a Result. Never throws.
   * @param {string} path
   * @param {{method?: string, body?: unknown, signal?: AbortSignal, extraMs?: number, valid: (payload: any) => boolean}} init
   * @returns {Promise<Result<any>>}
   */
  async function call(path, { method = "GET", body, signal, extraMs = 0, valid }) {
    const headers = { Authorization: `Bearer ${token}` };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const deadline = withTimeout(signal, timeoutMs + extraMs);
    let response;
    try {
      response = await fetchImpl(baseUrl + path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: deadline.signal,
      });
    } catch (error) {
      deadline.clear();
      return failure("network", 0, "unreachable", describe(error));
    }
    let payload;
    try {
      payload = await response.json();
    } catch (error) {
      // A body cut off mid-way is a network failure even after a 200: for a
      // mutation the retry carries the same transactionId, so it is safe.
      if (response.ok) return failure("network", response.status, "unreadable_response", describe(error));
    } finally {
      deadline.clear();
    }
    if (response.ok) {
      // Not what this API answers (a proxy's page, say): retrying is safe, a rollback might not be.
      if (!valid(payload)) return failure("network", response.status, "unexpected_response", "the answer does not have the expected shape");
      return { ok: true, value: payload };
    }
    const error = payload && typeof payload === "object" ? payload.error : undefined;
    const type = ERROR_TYPES.includes(error?.type) ? error.type : typeForStatus(response.status);
    return failure(type, response.status, error?.code ?? `http_${response.status}`, error?.message ?? response.statusText, error?.details);
  }

  /** @param {number} since @param {{until?: number, wait?: number, signal?: AbortSignal}} [opts] */
  function readPage(since, { until, wait, signal } = {}) {
    const query = new URLSearchParams({ since: String(since) });
    if (until !== undefined) query.set("until", String(until));
    if (pageLimit !== undefined) query.set("limit", String(pageLimit));
    if (wait !== undefined) query.set("wait", String(wait));
    return call(`/sync?${query}`, { signal, extraMs: (wait ?? 0) * 1000, valid: isPage });
  }

  /** @type {NetworkAdapter["sendTransaction"]} */
  async function sendTransaction(args) {
    const changes = toChanges(args);
    if (!Array.isArray(changes) || changes.length === 0) {
      return failure("server", 0, "invalid_changes", "sendTransaction needs a non-empty array of changes (see the toChanges option)");
    }
    let transactionId = transactionIds.get(args);
    if (transactionId === undefined) {
      transactionId = newTransactionId();
      if (typeof args === "object" && args !== null) transactionIds.set(args, transactionId);
    }
    const body = { transactionId, changes: changes.map(toWireChange) };
    const result = await call("/mutate", { method: "POST", body, valid: (p) => isSyncId(p?.lastSyncId) });
    return result.ok ? { ok: true, value: { lastSyncId: result.value.lastSyncId } } : result;
  }

  /** @type {NetworkAdapter["bootstrap"]} */
  async function bootstrap(args) {
    const query = new URLSearchParams({ type: args.type, models: args.models.join(",") });
    if (args.type === "lazy") query.set("syncGroups", args.syncGroups.join(","));
    const result = await call(`/bootstrap?${query}`, { valid: isBootstrap });
    if (!result.ok) return result;
    const { bootstrap, firstSyncId, syncGroups } = result.value;
    return { ok: true, value: { bootstrap, firstSyncId, syncGroups } };
  }

  /** @type {NetworkAdapter["deltaSync"]} */
  async function deltaSync(fromSyncId, toSyncId) {
    if (!Number.isInteger(fromSyncId) || !Number.isInteger(toSyncId) || fromSyncId > toSyncId) {
      return failure("server", 0, "invalid_range", `deltaSync(${fromSyncId}, ${toSyncId}) is not a range of syncIds`);
    }
    /** @type {SyncAction[]} */
    const sync = [];
    let since = fromSyncId;
    let retries = 0;
    while (since < toSyncId) {
      const page = await readPage(since, { until: toSyncId });
      if (!page.ok) {
        // Retried here, not by the caller: the Loco Sync client retries a failed
        // catch-up without waiting for it, and meanwhile drops `sync` messages.
        if (page.error === "server" || retries >= deltaSyncRetries) return page;
        await sleep(pollMs * 2 ** retries++ * (0.75 + Math.random() / 2));
        continue;
      }
      sync.push(...page.value.sync);
      if (!page.value.hasMore) break;
      if (!(page.value.lastSyncId > since)) return failure("server", 200, "stalled_cursor", "the server's cursor did not move");
      since = page.value.lastSyncId;
    }
    return { ok: true, value: { sync } };
  }

  /** @type {NetworkAdapter["initSync"]} */
  function initSync(listener) {
    const stop = new AbortController();
    const stopped = () => stop.signal.aborted;

    // One message at a time, in order: the Loco Sync client drops a `sync`
    // that arrives while it is still storing an earlier delta sync.
    /** @param {SyncMessage} message */
    async function deliver(message) {
      if (stopped()) return;
      try {
        await listener(message);
      } catch (error) {
        console.error("Loco Sync listener failed", error);
      }
    }

    async function run() {
      let backoffMs = pollMs;
      let connected = false;
      while (!stopped()) {
        // Handshakes are rare on purpose: at start, after an outage and when
        // the sync groups change. Each one makes the client re-read the log
        // since its previous handshake.
        const handshake = await call("/sync", { signal: stop.signal, valid: isPage });
        if (stopped()) return;
        if (handshake.ok) {
          let { lastSyncId: cursor, syncGroups } = handshake.value;
          connected = true;
          await deliver({ type: "handshake", lastSyncId: cursor, syncGroups });
          while (!stopped()) {
            const wait = serverHoldsPolls ? holdSeconds : undefined;
            const asked = Date.now();
            const page = await readPage(cursor, { wait, signal: stop.signal });
            if (stopped()) return;
            if (!page.ok) {
              if (wait !== undefined && page.reason.status === 400 && mentions(page.reason.details, "wait")) {
                serverHoldsPolls = false; // this server cannot hold polls
                continue;
              }
              break;
            }
            backoffMs = pollMs; // reset only by a poll that worked, so an outage of polls backs off
            const { sync, lastSyncId, hasMore } = page.value;
            if (!sameGroups(page.value.syncGroups, syncGroups)) {
              syncGroups = page.value.syncGroups;
              await deliver({ type: "handshake", lastSyncId: cursor, syncGroups });
            }
            if (sync.length > 0) await deliver({ type: "sync", lastSyncId, sync });
            cursor = lastSyncId;
            // Pause unless the server held the poll: an empty long poll answered
            // early means this server does not hold polls after all.
            const held = serverHoldsPolls && (sync.length > 0 || Date.now() - asked >= holdSeconds * 500);
            if (!hasMore && !held) await sleep(pollMs, stop.signal);
          }
        }
        if (stopped()) return;
        if (connected) {
          connected = false;
          await deliver({ type: "disconnected" });
        }
        await sleep(backoffMs * (0.75 + Math.random() / 2), stop.signal);
        backoffMs = Math.min(backoffMs * 2, MAX_BACKOFF_MS);
      }
    }

    run().catch((error) => console.error("Loco Sync polling stopped", error));
    return () => stop.abort();
  }

  return {
    sendTransaction: neverThrows(sendTransaction),
    bootstrap: neverThrows(bootstrap),
    deltaSync: neverThrows(deltaSync),
    initSync,
  };
}

/** @param {number} status @returns {NetworkErrorType} */
function typeForStatus(status) {
  if (status === 401 || status === 403) return "auth";
  if (status === 408 || status === 429 || status >= 502) return "network";
  return "server";
}

/** @returns {{ok: false, error: NetworkErrorType, reason: FailureReason}} */
function failure(error, status, code, message, details) {
  /** @type {FailureReason} */
  const reason = { status, code, message };
  if (details !== undefined) reason.details = details;
  return { ok: false, error, reason };
}

/** @template {(...args: any[]) => Promise<any>} F @param {F} method @returns {F} */
function neverThrows(method) {
  return /** @type {F} */ (
    async (...args) => {
      try {
        return await method(...args);
      } catch (error) {
        return failure("server", 0, "client_error", describe(error));
      }
    }
  );
}

/** @param {LocalChange} change */
function toWireChange({ action, modelName, modelId, data }) {
  return data === undefined ? { action, modelName, modelId } : { action, modelName, modelId, data };
}

function newTransactionId() {
  const bytes = new Uint8Array(16);
  if (globalThis.crypto?.getRandomValues) globalThis.crypto.getRandomValues(bytes);
  else for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** An AbortSignal that fires on `signal` or after `ms`, and a way to drop the timer. */
function withTimeout(signal, ms) {
  const controller = new AbortController();
  const abort = () => controller.abort();
  const timer = setTimeout(abort, ms);
  if (signal?.aborted) abort();
  signal?.addEventListener("abort", abort, { once: true });
  return {
    signal: controller.signal,
    clear() {
      clearTimeout(timer);
      signal?.removeEventListener("abort", abort);
    },
  };
}

/** @param {number} ms @param {AbortSignal} [signal] ends the sleep early */
function sleep(ms, signal) {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve(undefined);
    const timer = setTimeout(done, ms);
    signal?.addEventListener("abort", done, { once: true });
    function done() {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve(undefined);
    }
  });
}

const isSyncId = (value) => Number.isSafeInteger(value) && value >= 0;
const isObject = (value) => value !== null && typeof value === "object" && !Array.isArray(value);
const isPage = (p) => isObject(p) && Array.isArray(p.sync) && isSyncId(p.lastSyncId) && Array.isArray(p.syncGroups) && typeof p.hasMore === "boolean";
const isBootstrap = (p) => isObject(p) && isObject(p.bootstrap) && isSyncId(p.firstSyncId) && Array.isArray(p.syncGroups);

function sameGroups(a, b) {
  return a.length === b.length && [...a].sort().join("\n") === [...b].sort().join("\n");
}

function mentions(details, key) {
  return details !== null && typeof details === "object" && key in details;
}

function describe(error) {
  return error instanceof Error ? `${error.name}: ${error.message}` : String(error);
}
