// The live demo at /: two clients, each a LocalStore on the network adapter,
// drawn from the store's state on every change. The tokens come from the URL
// fragment (#Ada=<token>&Grace=<token>, as `flask --app app seed` prints),
// which the browser never sends to the server.

import { createNetworkAdapter } from "./loco-network.js";
import { LocalStore } from "./demo-store.js";

const MODELS = ["Group", "Author", "Todo"];
const LOG_LENGTH = 50;

const users = [...new URLSearchParams(location.hash.slice(1))].filter(([name, token]) => name && token);
if (users.length >= 2) {
  for (const [name, token] of users.slice(0, 2)) startClient(name, token);
} else {
  showSignIn();
}

function showSignIn() {
  const form = /** @type {HTMLFormElement} */ (document.getElementById("sign-in"));
  form.hidden = false;
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const data = new FormData(form);
    const fragment = new URLSearchParams();
    for (const i of [0, 1]) fragment.append(String(data.get(`name${i}`)).trim(), String(data.get(`token${i}`)).trim());
    location.hash = fragment.toString();
    location.reload();
  });
}

/** @param {string} name @param {string} token */
function startClient(name, token) {
  const template = /** @type {HTMLTemplateElement} */ (document.getElementById("client-template"));
  const panel = /** @type {HTMLElement} */ (template.content.firstElementChild.cloneNode(true));
  panel.dataset.client = name;
  panel.setAttribute("aria-label", `${name}'s client`);
  document.getElementById("clients").append(panel);
  const $ = (selector) => panel.querySelector(selector);
  $(".client-name").textContent = name;

  /** @type {{id: string, draft: string} | undefined} */
  let editing;
  const offline = /** @type {HTMLInputElement} */ ($("input[name=offline]"));
  let store = newStore();

  /** A store on a new adapter. */
  function newStore() {
    // Long polls: actions arrive as soon as they commit. The adapter calls our
    // fetch, so every request it makes shows in the panel's request log.
    const network = createNetworkAdapter({ token, fetch: loggedFetch, onReset: startOver });
    const created = new LocalStore({
      network,
      models: MODELS,
      onEvent(event) {
        if (event.type === "action") logAction(event.action);
        else if (event.type === "bootstrap") logLine(`bootstrap: ${event.rows} rows as of syncId ${event.firstSyncId}`);
        else if (event.type === "rejected") showRejection(event.changes, event.reason);
        else if (event.type === "refused") showRefusal(event.reason);
        render();
      },
    });
    created.setOnline(!offline.checked);
    return created;
  }

  /**
   * The server said this client must start over: drop the store, rows, cursor
   * and unsent changes alike, and bootstrap a new one, as an app drops its
   * IndexedDB database and starts a new Loco Sync client.
   * @param {import("./loco-network.js").ResetInfo} info
   */
  function startOver(info) {
    const dropped = store.pending.length;
    store.stop();
    editing = undefined;
    const why = {
      reset: "the server's database was reset",
      compacted: "the log was compacted past this client's cursor",
      schema_changed: "the server's schema changed",
      sync_group_removed: `removed from ${info.syncGroups?.join(", ")}`,
    }[info.reason] ?? info.reason;
    const lost = dropped ? ` ${dropped} unconfirmed ${dropped === 1 ? "change was" : "changes were"} dropped.` : "";
    const notice = $(".reset-notice");
    notice.textContent = `Started over: ${why}. Its store was emptied and bootstrapped again.${lost}`;
    notice.hidden = false;
    logLine(`starting over: ${why}`);
    store = newStore();
    render();
    store.start();
  }

  offline.addEventListener("change", () => store.setOnline(!offline.checked));

  $("form.add").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = event.target;
    const text = form.elements.text.value.trim();
    const groupId = form.elements.group.value;
    const author = pickAuthor();
    if (!text || !groupId || !author) return;
    const id = newTodoId();
    const data = { id, text, authorId: author.id, groupId, isDone: false, likeCount: 0 };
    store.mutate([{ action: "create", modelName: "Todo", modelId: id, data }]);
    form.elements.text.value = "";
  });

  function pickAuthor() {
    const authors = store.view("Author").map(({ row }) => row);
    return authors.find((author) => author.name === name) ?? authors[0];
  }

  function update(id, data) {
    store.mutate([{ action: "update", modelName: "Todo", modelId: id, data }]);
  }

  function render() {
    const unsent = store.pending.length;
    const state = { starting: "Starting…", live: "Live", reconnecting: "Reconnecting…", offline: "Offline", refused: "Signed out" }[store.connection];
    const unsentLabel = store.online ? `${unsent} unconfirmed` : `${unsent} queued`;
    $(".status").textContent = `${state} · cursor ${store.cursor} · ${unsentLabel}`;
    $(".status").dataset.connection = store.connection;
    $(".groups").textContent = `Sync groups: ${store.syncGroups.join(", ") || "none yet"}`;
    $(".cursor").textContent = `Cursor (lastSyncId applied): ${store.cursor}`;
    panel.dataset.cursor = String(store.cursor);

    const groups = store.view("Group").map(({ row }) => row).sort((a, b) => a.id.localeCompare(b.id));
    $("form.add").hidden = store.connection === "refused" || groups.length === 0; // nowhere to add a todo
    const select = $("select[name=group]");
    const chosen = select.value;
    select.replaceChildren(...groups.map((group) => new Option(group.name, group.id, false, group.id === chosen)));

    const focused = document.activeElement?.classList.contains("edit-text");
    // Sorted by id (see newTodoId), so live and reloaded lists agree: the store
    // keeps rows in the order their actions arrived, a reload in the bootstrap's
    // (by id), and a todo written offline arrives after todos created later.
    const todos = store.view("Todo").sort((a, b) => (a.row.id < b.row.id ? -1 : a.row.id > b.row.id ? 1 : 0));
    const sections = groups.map((group) => {
      const items = todos.filter(({ row }) => row.groupId === group.id).map(renderTodo);
      return el("section", { className: "group" }, [
        el("h3", {}, [group.name]),
        items.length ? el("ul", {}, items) : el("p", { className: "empty" }, ["Nothing to do."]),
      ]);
    });
    $(".todos").replaceChildren(...sections);
    if (focused) panel.querySelector(".edit-text")?.focus();
  }

  function renderTodo({ row, pending }) {
    const item = el("li", { className: `todo${pending ? ` pending ${pending}` : ""}${row.isDone ? " done" : ""}` });
    item.dataset.id = row.id;
    const tick = el("input", { type: "checkbox", checked: row.isDone });
    tick.setAttribute("aria-label", `Done: ${row.text}`);
    tick.addEventListener("change", () => update(row.id, { isDone: tick.checked }));
    item.append(tick);

    if (editing?.id === row.id) {
      const input = el("input", { className: "edit-text", value: editing.draft, maxLength: 255 });
      input.setAttribute("aria-label", `New text for ${row.text}`);
      input.addEventListener("input", () => (editing.draft = input.value));
      const form = el("form", { className: "edit" }, [input, el("button", { type: "submit" }, ["Save"]), button("Cancel", stopEditing)]);
      form.addEventListener("submit", (event) => {
        event.preventDefault();
        const text = input.value.trim();
        editing = undefined;
        if (text && text !== row.text) update(row.id, { text });
        else render();
      });
      item.append(form);
    } else {
      item.append(el("span", { className: "text" }, [row.text]));
      if (pending) item.append(el("span", { className: "badge" }, [pending === "queued" ? "queued" : "unconfirmed"]));
      item.append(
        button("Edit", () => {
          editing = { id: row.id, draft: row.text };
          render();
          panel.querySelector(".edit-text")?.focus();
        }),
        button("Delete", () => store.mutate([{ action: "delete", modelName: "Todo", modelId: row.id }])),
      );
    }
    return item;
  }

  function stopEditing() {
    editing = undefined;
    render();
  }

  /** An action's line; inserts and updates open to show the row they carry (deletes carry none). */
  function logAction(action) {
    const cells = [action.syncId, action.action, action.modelName, action.modelId].map((text) => el("span", {}, [String(text)]));
    const entry = "data" in action
      ? el("details", {}, [el("summary", { className: "line" }, cells), el("pre", {}, [JSON.stringify(action.data, null, 2)])])
      : el("div", { className: "line" }, cells);
    addLogEntry($("ol.actions"), el("li", { className: `action ${action.action}` }, [entry]));
  }

  function logLine(text) {
    addLogEntry($("ol.actions"), el("li", { className: "note" }, [text]));
  }

  /** The adapter's fetch: the real one, with a line in the request log that it completes. */
  async function loggedFetch(url, init) {
    const { pathname, search } = new URL(url, location.href);
    const code = el("span", { className: "code" }, ["…"]);
    const took = el("span", { className: "took" });
    const method = el("span", { className: "method" }, [init?.method ?? "GET"]);
    const line = el("li", { className: "pending" }, [method, el("span", { className: "path" }, [pathname + search]), code, took]);
    addLogEntry($("ol.requests"), line);
    const started = performance.now();
    const finish = (outcome, className) => {
      // Until the answer's headers: this server sends them once a held poll ends, so it is the hold.
      const ms = performance.now() - started;
      took.textContent = ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
      code.textContent = outcome;
      line.className = className;
    };
    try {
      const response = await fetch(url, init);
      finish(String(response.status), response.ok ? "ok" : "error");
      return response;
    } catch (error) {
      const outcome = error?.name === "AbortError" ? "aborted" : "failed"; // aborted: gone offline, or timed out
      finish(outcome, outcome);
      throw error;
    }
  }

  /** Newest first, and only the last LOG_LENGTH. */
  function addLogEntry(list, entry) {
    list.prepend(entry);
    while (list.children.length > LOG_LENGTH) list.lastElementChild.remove();
  }

  function showRejection(changes, reason) {
    const what = changes.map((change) => `${change.action} ${change.modelName} ${change.modelId}`).join(", ");
    const item = el("li", { className: "rejection" }, [
      el("strong", {}, ["Refused and rolled back: "]),
      `${what}. The server said ${reason.status} ${reason.code}: ${reason.message}`,
    ]);
    const list = $(".rejections");
    list.prepend(item);
    while (list.children.length > 5) list.lastElementChild.remove();
  }

  function showRefusal(reason) {
    const again = el("a", { href: location.pathname }, ["sign in again"]);
    $(".rejections").replaceChildren(
      el("li", { className: "rejection" }, [
        el("strong", {}, [`The server refused ${name}'s token: `]),
        `${reason.status} ${reason.code}: ${reason.message} Open the link \`flask --app app seed\` prints, or `,
        again,
        ".",
      ]),
    );
  }

  render();
  store.start();
}

/** Build an element: properties, then children (nodes or strings). */
function el(tag, properties = {}, children = []) {
  const node = Object.assign(document.createElement(tag), properties);
  node.append(...children);
  return node;
}

function button(label, onClick) {
  const node = el("button", { type: "button" }, [label]);
  node.addEventListener("click", onClick);
  return node;
}

/**
 * An id that sorts in creation order, so a new todo stays below older ones
 * live and after a reload: the creating client's time in ms, zero-padded to a
 * fixed width, then random hex so that ids made in the same ms differ. "todo-"
 * sorts after the seed rows' "t1" to "t3" ("o" comes after every digit), made first.
 */
function newTodoId() {
  const bytes = crypto.getRandomValues(new Uint8Array(6));
  return `todo-${String(Date.now()).padStart(15, "0")}-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}
