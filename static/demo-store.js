// The demo's client: an in-memory store on top of the network adapter. It does
// what a Loco Sync client does, in little code: bootstrap, catch up on each
// handshake, apply sync actions in order, send transactions one at a time,
// show them optimistically until the log contains them, roll back refusals.
// When the adapter says to start over (its onReset), the page stops this
// store and starts a new one, on a new adapter.

/** @typedef {import("./loco-network.js").NetworkAdapter} NetworkAdapter */
/** @typedef {import("./loco-network.js").LocalChange} LocalChange */
/** @typedef {import("./loco-network.js").SyncAction} SyncAction */
/** @typedef {import("./loco-network.js").FailureReason} FailureReason */

/**
 * A transaction the server has not confirmed yet. "queued" waits to be sent,
 * "sent" was committed (at `lastSyncId`) but its actions have not arrived.
 * @typedef {{changes: LocalChange[], state: "queued" | "sending" | "sent", lastSyncId?: number}} PendingTransaction
 */

/**
 * What the page is told about.
 * @typedef {{type: "change"}
 *   | {type: "bootstrap", firstSyncId: number, rows: number}
 *   | {type: "action", action: SyncAction}
 *   | {type: "rejected", changes: LocalChange[], reason: FailureReason}
 *   | {type: "refused", reason: FailureReason}} StoreEvent
 */

const RETRY_MS = 1000;

export class LocalStore {
  /**
   * @param {{network: NetworkAdapter, models: string[], onEvent: (event: StoreEvent) => void}} options
   */
  constructor({ network, models, onEvent }) {
    this.network = network;
    this.models = models;
    this.onEvent = onEvent;
    /** @type {Map<string, Map<string, Record<string, any>>>} rows as the server's log says they are */
    this.confirmed = new Map(models.map((name) => [name, new Map()]));
    /** The syncId the confirmed rows reflect. */
    this.cursor = 0;
    /** @type {string[]} */
    this.syncGroups = [];
    /** @type {PendingTransaction[]} */
    this.pending = [];
    this.online = true;
    this.started = false;
    /** "starting" | "live" | "reconnecting" | "offline" | "refused" */
    this.connection = "starting";
    this.sending = false;
    /** @type {(() => void) | undefined} */
    this.unsubscribe = undefined;
    // Bumped on every (re)connection, so a catch-up left over from an old one stops.
    this.generation = 0;
    this.stopped = false;
  }

  async start() {
    for (;;) {
      const result = await this.bootstrap(this.generation);
      if (this.stopped) return;
      if (result.ok) break;
      if (result.error === "auth") {
        this.connection = "refused"; // a wrong token stays wrong: do not retry
        this.onEvent({ type: "refused", reason: result.reason });
        return;
      }
      await delay(RETRY_MS);
    }
    this.started = true;
    if (this.online) this.connect();
    else this.setOffline();
  }

  /**
   * Replace every row with a fresh eager bootstrap, unless the connection
   * that asked for it has been closed meanwhile: a newer one may have
   * applied newer actions, which these older rows must not overwrite.
   * @param {number} generation
   */
  async bootstrap(generation) {
    const result = await this.network.bootstrap({ type: "eager", models: this.models });
    if (generation !== this.generation) return { ok: false, error: "stale" };
    if (!result.ok) return result;
    const { bootstrap, firstSyncId, syncGroups } = result.value;
    for (const name of this.models) {
      this.confirmed.set(name, new Map((bootstrap[name] ?? []).map((row) => [row.id, row])));
    }
    this.cursor = firstSyncId;
    this.syncGroups = syncGroups;
    this.settle();
    const rows = this.models.reduce((sum, name) => sum + this.confirmed.get(name).size, 0);
    this.onEvent({ type: "bootstrap", firstSyncId, rows });
    this.onEvent({ type: "change" });
    return result;
  }

  /** For good: no more requests or events (the page has started over with a new store). */
  stop() {
    this.stopped = true;
    this.onEvent = () => {};
    this.setOffline();
  }

  /** @param {boolean} online */
  setOnline(online) {
    if (online === this.online) return;
    this.online = online;
    if (!this.started) return; // start() connects, or not, when its bootstrap is done
    if (online) this.connect();
    else this.setOffline();
  }

  setOffline() {
    this.unsubscribe?.();
    this.unsubscribe = undefined;
    this.generation += 1;
    this.connection = "offline";
    this.onEvent({ type: "change" });
  }

  connect() {
    this.unsubscribe?.();
    const generation = ++this.generation;
    this.connection = "reconnecting";
    this.unsubscribe = this.network.initSync((message) => this.receive(message, generation));
    this.pump();
    this.onEvent({ type: "change" });
  }

  /** @param {import("./loco-network.js").SyncMessage} message @param {number} generation */
  async receive(message, generation) {
    if (generation !== this.generation) return;
    if (message.type === "disconnected") {
      this.connection = "reconnecting";
    } else if (message.type === "handshake") {
      if (!sameGroups(message.syncGroups, this.syncGroups)) {
        // We gained a group (losing one resets the adapter instead): a fresh bootstrap is the simplest correct answer.
        while (!(await this.bootstrap(generation)).ok) if (!(await this.pause(generation))) return;
      }
      // Catch up to the handshake before any `sync` message: the adapter
      // waits for this promise, so nothing can slip in between.
      while (this.cursor < message.lastSyncId) {
        const delta = await this.network.deltaSync(this.cursor, message.lastSyncId);
        if (generation !== this.generation) return;
        if (delta.ok) {
          this.apply(delta.value.sync, message.lastSyncId);
        } else if (delta.error === "server") {
          // A "bootstrap again" has reset the adapter, and the page starts over (the generation
          // changed, so this stops); any other refusal: a fresh bootstrap.
          while (!(await this.bootstrap(generation)).ok) if (!(await this.pause(generation))) return;
        } else if (!(await this.pause(generation))) {
          return;
        }
      }
      this.connection = "live";
    } else {
      this.apply(message.sync, message.lastSyncId);
    }
    this.onEvent({ type: "change" });
  }

  /** @param {SyncAction[]} actions @param {number} lastSyncId */
  apply(actions, lastSyncId) {
    for (const action of actions) {
      if (action.syncId <= this.cursor) continue; // already in a bootstrap we loaded
      const rows = this.confirmed.get(action.modelName);
      if (!rows) continue;
      if (action.action === "delete") rows.delete(action.modelId);
      else rows.set(action.modelId, action.data);
      this.onEvent({ type: "action", action });
    }
    this.cursor = Math.max(this.cursor, lastSyncId);
    this.settle();
  }

  /** Drop sent transactions whose actions the confirmed rows now hold. */
  settle() {
    this.pending = this.pending.filter((tx) => !(tx.state === "sent" && tx.lastSyncId <= this.cursor));
  }

  /** Queue a transaction; it shows at once, and is sent when online. @param {LocalChange[]} changes */
  mutate(changes) {
    this.pending.push({ changes, state: "queued" });
    this.onEvent({ type: "change" });
    this.pump();
  }

  /** Send queued transactions one at a time, in order. */
  async pump() {
    if (this.sending) return;
    this.sending = true;
    try {
      while (this.online && !this.stopped) {
        const tx = this.pending.find((each) => each.state === "queued");
        if (!tx) break;
        tx.state = "sending";
        // The same array on every retry, so the adapter resends the same transactionId.
        const result = await this.network.sendTransaction(tx.changes);
        if (this.stopped) return;
        if (result.ok) {
          tx.state = "sent";
          tx.lastSyncId = result.value.lastSyncId;
          this.settle();
        } else if (result.error === "server") {
          this.pending = this.pending.filter((each) => each !== tx); // roll back
          this.onEvent({ type: "rejected", changes: tx.changes, reason: result.reason });
        } else {
          tx.state = "queued";
          this.onEvent({ type: "change" });
          await delay(RETRY_MS);
          continue;
        }
        this.onEvent({ type: "change" });
      }
    } finally {
      this.sending = false;
    }
  }

  /**
   * The rows of a model as the user should see them: the confirmed rows with
   * every unconfirmed transaction applied on top, in order.
   * @param {string} modelName
   * @returns {{row: Record<string, any>, pending: PendingTransaction["state"] | undefined}[]}
   */
  view(modelName) {
    const rows = new Map([...this.confirmed.get(modelName)].map(([id, row]) => [id, { row, pending: undefined }]));
    for (const tx of this.pending) {
      for (const change of tx.changes) {
        if (change.modelName !== modelName) continue;
        const current = rows.get(change.modelId);
        if (change.action === "create") rows.set(change.modelId, { row: { ...change.data }, pending: tx.state });
        else if (change.action === "update" && current) rows.set(change.modelId, { row: { ...current.row, ...change.data }, pending: tx.state });
        else if (change.action === "delete") rows.delete(change.modelId);
      }
    }
    return [...rows.values()];
  }

  /** Wait before a retry; false if this connection was closed meanwhile. @param {number} generation */
  async pause(generation) {
    await delay(RETRY_MS);
    return generation === this.generation;
  }
}

function delay(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function sameGroups(a, b) {
  return a.length === b.length && [...a].sort().join("\n") === [...b].sort().join("\n");
}
