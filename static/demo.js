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

  const network = createNetworkAdapter({ token });  // long polls: actions arrive as soon as they commit
  /** @type {{id: string, draft: string} | undefined} */
  let editing;

  const store = new LocalStore({
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

  $("input[name=offline]").addEventListener("change", (event) => store.setOnline(!event.target.checked));

  $("form.add").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = event.target;
    const text = form.elements.text.value.trim();
    const groupId = form.elements.group.value;
    const author = pickAuthor();
    if (!text || !groupId || !author) return;
    const id = newId("t");
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
    $("form.add").hidden = store.connection === "refused";
    $(".groups").textContent = `Sync groups: ${store.syncGroups.join(", ") || "none yet"}`;
    $(".cursor").textContent = `Cursor (lastSyncId applied): ${store.cursor}`;
    panel.dataset.cursor = String(store.cursor);

    const groups = store.view("Group").map(({ row }) => row).sort((a, b) => a.id.localeCompare(b.id));
    const select = $("select[name=group]");
    const chosen = select.value;
    select.replaceChildren(...groups.map((group) => new Option(group.name, group.id, false, group.id === chosen)));

    const focused = document.activeElement?.classList.contains("edit-text");
    const todos = store.view("Todo");
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

  function logAction(action) {
    const row = el("tr", { className: `action ${action.action}` }, [
      el("td", {}, [String(action.syncId)]),
      el("td", {}, [action.action]),
      el("td", {}, [action.modelName]),
      el("td", {}, [action.modelId]),
    ]);
    addLogRow(row);
  }

  function logLine(text) {
    addLogRow(el("tr", { className: "note" }, [el("td", { colSpan: 4 }, [text])]));
  }

  function addLogRow(row) {
    const body = $("tbody.actions");
    body.prepend(row);
    while (body.children.length > LOG_LENGTH) body.lastElementChild.remove();
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

function newId(prefix) {
  const bytes = crypto.getRandomValues(new Uint8Array(6));
  return `${prefix}-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}
