// A Loco Sync NetworkAdapter for this server: a dependency-free ES module that
// runs in browsers and in Node 18+. Plug it into `new LocoSyncClient({network})`.
//
// Every method resolves to Loco Sync's Result shape and never throws or
// rejects: the Loco Sync client silently drops a transaction whose
// sendTransaction throws.
//
// It retries bootstraps, which the Loco Sync client never does, and when the
// server says to start over (a reset database, a compacted log, another schema)
// or the user loses a sync group, which the client cannot undo in place, it
// stops and calls onReset: the app then drops its store and starts a new client.

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
 * Why the app must start over, as onReset gets it: the server's "bootstrap again"
 * details ("reset": the database was reset; "compacted": the log no longer reaches
 * this client's cursor; "schema_changed": the server's schema version differs), or
 * "sync_group_removed" with the groups the user lost.
 * @typedef {{reason: "reset" | "compacted"}
 *   | {reason: "schema_changed", schemaVersion: number}
 *   | {reason: "sync_group_removed", syncGroups: string[]}} ResetInfo
 */

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
 *   with backoff, before it answers with the failure (default 5).
 * @property {number} [bootstrapRetries] How often bootstrap retries a network failure, with
 *   backoff, before it answers with it (default Infinity: until it works, or the adapter resets).
 * @property {number} [maxBackoffMs] The longest pause between retries; they start at pollMs
 *   and double, each a random 50 to 100% of that (default 10000).
 * @property {(info: ResetInfo) => void | Promise<void>} [onReset] Called once when this client
 *   must start over: drop the local store and start a new client (with a new adapter). The adapter
 *   has stopped by then: its methods answer an `adapter_reset` failure without a request.
 *   Without onReset it stops all the same, and says so with console.error.
 * @property {number} [schemaVersion] The schema version the app was built for, sent as the
 *   Loco-Schema-Version header; a server of another version answers "bootstrap again".
 * @property {string[]} [syncGroups] The sync groups the local store already holds (its
 *   metadata's syncGroups), so that a group lost while the app was closed is noticed at the
 *   first handshake. Groups the adapter is given later are tracked by the adapter itself.
 * @property {number} [timeoutMs] Give up on a request after this long (default 30000).
 * @property {(args: any) => readonly LocalChange[]} [toChanges] For a Loco Sync config with custom
 *   mutations (`mutationDefs`): turns the mutation args the client sends into this server's changes.
 *   By default the args are the changes.
 * @property {typeof fetch} [fetch] The fetch to use (tests wrap it).
 */

const ERROR_TYPES = ["server", "auth", "network"];

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
  bootstrapRetries = Infinity,
  maxBackoffMs = 10_000,
  timeoutMs = 30_000,
  onReset,
  schemaVersion,
  syncGroups: storedSyncGroups = [],
  toChanges = (args) => args,
  fetch: fetchImpl = (...args) => globalThis.fetch(...args),
} = /** @type {NetworkOptions} */ ({})) {
  // The transactionId and baseSyncId of each transaction, keyed by the very args
  // object the client passes: the Loco Sync client retries a transaction with the
  // same object, so a retry of a request whose answer was lost is recognised by the server.
  /** @type {WeakMap<object, {transactionId: string, baseSyncId: number | undefined}>} */
  const transactions = new WeakMap();
  let serverHoldsPolls = longPoll;
  const holdSeconds = Math.min(30, Math.max(0.001, Math.round(waitSeconds * 1000) / 1000)); // as the server parses it
  /** The greatest syncId seen from this server: a new transaction's baseSyncId. @type {number | undefined} */
  let seenSyncId;
  // Every group the client was given: the Loco Sync client cannot drop a lost
  // group's rows ("Removing sync groups isn't supported yet"), so losing one resets.
  const knownGroups = new Set(storedSyncGroups);
  /** Set once, when the server says to start over. @type {ResetInfo | undefined} */
  let resetInfo;
  const closed = new AbortController(); // aborts every request and pause when the adapter resets

  /** @param {number} syncId */
  function see(syncId) {
    if (seenSyncId === undefined || syncId > seenSyncId) seenSyncId = syncId;
  }

  /** Stop everything and tell the app, once. @param {ResetInfo} info */
  function reset(info) {
    if (resetInfo) return;
    resetInfo = info;
    closed.abort();
    if (typeof onReset !== "function") {
      console.error(`Loco Sync must start over (${info.reason}), and this adapter has stopped; pass onReset to createNetworkAdapter to start a new client.`);
      return;
    }
    try {
      Promise.resolve(onReset(info)).catch((error) => console.error("Loco Sync onReset failed", error));
    } catch (error) {
      console.error("Loco Sync onReset failed", error);
    }
  }

  function resetFailure() {
    const info = /** @type {ResetInfo} */ (resetInfo);
    const message = `This adapter has stopped: the client must start over (${info.reason}) with a new store and adapter.`;
    return failure("server", 0, "adapter_reset", message, info);
  }

  /** False, after a reset, if `groups` lacks one the client was given. @param {string[]} groups */
  function keepsGroups(groups) {
    const lost = [...knownGroups].filter((group) => !groups.includes(group));
    if (lost.length > 0) {
      reset({ reason: "sync_group_removed", syncGroups: lost });
      return false;
    }
    for (const group of groups) knownGroups.add(group);
    return true;
  }

  /** The pause before retry `n` (from 0): doubling from pollMs, capped, jittered so clients spread out. @param {number} n */
  const backoff = (n) => Math.min(maxBackoffMs, pollMs * 2 ** n) * (0.5 + Math.random() / 2);

  /**
   * One request, its outcome as a Result. Never throws.
   * @param {string} path
   * @param {{method?: string, body?: unknown, signal?: AbortSignal, extraMs?: number, valid: (payload: any) => boolean}} init
   * @returns {Promise<Result<any>>}
   */
  async function call(path, { method = "GET", body, signal, extraMs = 0, valid }) {
    if (resetInfo) return resetFailure();
    const headers = { Authorization: `Bearer ${token}` };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (schemaVersion !== undefined) headers["Loco-Schema-Version"] = String(schemaVersion);
    const deadline = withTimeout([signal, closed.signal], timeoutMs + extraMs);
    let response;
    try {
      response = await fetchImpl(baseUrl + path, {
        method,
        headers,
        // Past the HTTP cache: Chromium holds a GET back while another of the same URL
        // is in flight, to share its answer, so two users' polls from one cursor took turns.
        cache: "no-store",
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: deadline.signal,
      });
    } catch (error) {
      deadline.clear();
      return resetInfo ? resetFailure() : failure("network", 0, "unreachable", describe(error));
    }
    let payload;
    try {
      payload = await response.json();
    } catch (error) {
      if (resetInfo) return resetFailure(); // cut off by the reset
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
    const refusal = failure(type, response.status, error?.code ?? `http_${response.status}`, error?.message ?? response.statusText, error?.details);
    if (response.status === 409 && error?.code === "bootstrap_again") {
      // The database was reset, the log compacted past this client, or the schema changed.
      reset(isObject(error.details) && typeof error.details.reason === "string" ? { ...error.details } : { reason: "reset" });
    }
    return refusal;
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
    // Not retried here: the Loco Sync client retries a network or auth failure itself,
    // one transaction at a time and in order, with the same args.
    let sent = transactions.get(args);
    if (sent === undefined) {
      // The base is kept for retries: the server refuses one whose base its log no
      // longer holds, since the record that the first attempt committed may be pruned.
      sent = { transactionId: newTransactionId(), baseSyncId: seenSyncId };
      if (typeof args === "object" && args !== null) transactions.set(args, sent);
    }
    const { transactionId, baseSyncId } = sent;
    const wire = changes.map(toWireChange);
    const body = baseSyncId === undefined ? { transactionId, changes: wire } : { transactionId, baseSyncId, changes: wire };
    const result = await call("/mutate", { method: "POST", body, valid: (p) => isSyncId(p?.lastSyncId) });
    if (!result.ok) return result;
    see(result.value.lastSyncId);
    return { ok: true, value: { lastSyncId: result.value.lastSyncId } };
  }

  /** @type {NetworkAdapter["bootstrap"]} */
  async function bootstrap(args) {
    const query = new URLSearchParams({ type: args.type, models: args.models.join(",") });
    if (args.type === "lazy") query.set("syncGroups", args.syncGroups.join(","));
    // Retried here: the Loco Sync client never retries a bootstrap. A failed eager one
    // leaves it "failed", and a failed lazy one loses that group's rows for good.
    for (let retries = 0; ; retries++) {
      // As long as the server streams one (its BOOTSTRAP_MAX_S, 60 s): a cut-off one is retried, and would be again.
      const result = await call(`/bootstrap?${query}`, { valid: isBootstrap, extraMs: 30_000 });
      if (result.ok) {
        const { bootstrap, firstSyncId, syncGroups } = result.value;
        see(firstSyncId);
        for (const group of syncGroups) knownGroups.add(group);
        return { ok: true, value: { bootstrap, firstSyncId, syncGroups } };
      }
      if (args.type === "lazy" && result.error === "auth" && result.reason.status === 403) {
        // Refused a group the client was given: the user has lost it since.
        reset({ reason: "sync_group_removed", syncGroups: [...args.syncGroups] });
        return result;
      }
      if (result.error !== "network" || retries >= bootstrapRetries || resetInfo) return result;
      await sleep(backoff(retries), closed.signal);
    }
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
        // catch-up at once, without waiting for it, and meanwhile drops `sync` messages.
        if (page.error === "server" || retries >= deltaSyncRetries || resetInfo) return page;
        await sleep(backoff(retries++), closed.signal);
        continue;
      }
      see(page.value.lastSyncId);
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
    const stopped = () => stop.signal.aborted || resetInfo !== undefined;
    const abort = () => stop.abort();
    closed.signal.addEventListener("abort", abort, { once: true }); // a reset ends a held poll and a pause

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
      let failures = 0;
      let connected = false;
      while (!stopped()) {
        // Handshakes are rare on purpose: at start, after an outage and when
        // the sync groups change. Each one makes the client re-read the log
        // since its previous handshake.
        const handshake = await call("/sync", { signal: stop.signal, valid: isPage });
        if (stopped()) return;
        if (handshake.ok) {
          let { lastSyncId: cursor, syncGroups } = handshake.value;
          see(cursor);
          if (!keepsGroups(syncGroups)) return;
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
              break; // an outage (a "bootstrap again" has reset the adapter: stopped)
            }
            failures = 0; // reset only by a poll that worked, so an outage of polls backs off
            const { sync, lastSyncId, hasMore } = page.value;
            see(lastSyncId);
            if (!sameGroups(page.value.syncGroups, syncGroups)) {
              if (!keepsGroups(page.value.syncGroups)) return;
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
        await sleep(backoff(failures++), stop.signal);
      }
    }

    run().catch((error) => console.error("Loco Sync polling stopped", error));
    return () => {
      stop.abort();
      closed.signal.removeEventListener("abort", abort);
    };
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

/**
 * An AbortSignal that fires on any of `signals` or after `ms`, and a way to drop the timer.
 * @param {(AbortSignal | undefined)[]} signals @param {number} ms
 */
function withTimeout(signals, ms) {
  const controller = new AbortController();
  const abort = () => controller.abort();
  const timer = setTimeout(abort, ms);
  const given = signals.filter((signal) => signal !== undefined);
  for (const signal of given) {
    if (signal.aborted) abort();
    signal.addEventListener("abort", abort, { once: true });
  }
  return {
    signal: controller.signal,
    clear() {
      clearTimeout(timer);
      for (const signal of given) signal.removeEventListener("abort", abort);
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
