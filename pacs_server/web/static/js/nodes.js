// DICOM nodes page (admin): list, add, edit, remove, and "Test (C-ECHO)" with the round trip.

import { api, el, loginIfExpired, show } from "./page.js";

const tbody = document.querySelector("#nodes tbody");
const message = document.getElementById("nodes-message");
const form = document.getElementById("node-form");
const formMessage = document.getElementById("form-message");
const title = document.getElementById("form-title");
const saveButton = document.getElementById("save-node");
const cancelButton = document.getElementById("cancel-edit");
const enc = encodeURIComponent;

function fail(err, where) {
  if (!loginIfExpired(err)) show(where, err.message, "error");
}

async function refresh() {
  let nodes;
  try {
    nodes = await api("GET", "/api/ui/nodes");
  } catch (err) {
    fail(err, message);
    return;
  }
  tbody.replaceChildren(
    ...nodes.map((n) => {
      const result = el("span", { class: "echo-result muted" });
      const test = el("button", { type: "button", class: "test", textContent: "Test (C-ECHO)" });
      test.addEventListener("click", async () => {
        test.disabled = true;
        result.textContent = "testing…";
        result.className = "echo-result muted";
        try {
          const r = await api("POST", `/api/ui/nodes/${enc(n.name)}/echo`);
          result.textContent = r.ok ? `OK, ${r.ms.toFixed(1)} ms` : r.message;
          result.className = `echo-result ${r.ok ? "ok" : "warn"}`;
        } catch (err) {
          result.textContent = err.message;
          result.className = "echo-result warn";
        } finally {
          test.disabled = false;
        }
      });
      const actions = [test];
      if (n.status === "pending") {
        actions.push(el("button", { type: "button", textContent: "Approve", onclick: () => save(n.name, { status: "active" }) }));
      }
      actions.push(el("button", { type: "button", textContent: "Edit", onclick: () => edit(n) }));
      actions.push(el("button", { type: "button", class: "danger", textContent: "Remove", onclick: () => remove(n) }));
      return el(
        "tr",
        { "data-node": n.name },
        el("td", {}, n.name),
        el("td", {}, n.ae_title),
        el("td", {}, n.host),
        el("td", { class: "num" }, String(n.port)),
        el("td", {}, n.rights),
        el("td", {}, el("span", { class: `badge ${n.status}` }, n.status)),
        el("td", {}, n.description),
        el("td", {}, el("div", { class: "row" }, ...actions, result)),
      );
    }),
  );
  if (!nodes.length) tbody.replaceChildren(el("tr", {}, el("td", { colSpan: 8, class: "muted" }, "No node yet: add one below.")));
}

function values() {
  const f = form.elements;
  return {
    name: f.name.value,
    ae_title: f.ae_title.value,
    host: f.host.value,
    port: Number(f.port.value),
    status: f.status.value,
    description: f.description.value,
    allow_store: f.allow_store.checked,
    allow_query: f.allow_query.checked,
    allow_retrieve: f.allow_retrieve.checked,
  };
}

function edit(n) {
  const f = form.elements;
  f.original.value = n.name;
  for (const key of ["name", "ae_title", "host", "port", "status", "description"]) f[key].value = n[key];
  for (const key of ["allow_store", "allow_query", "allow_retrieve"]) f[key].checked = n[key];
  title.textContent = `Edit node ${n.name}`;
  saveButton.textContent = "Save changes";
  cancelButton.hidden = false;
  show(formMessage, "");
  form.scrollIntoView({ behavior: "smooth" });
}

function resetForm() {
  form.reset();
  form.elements.original.value = "";
  title.textContent = "Add a node";
  saveButton.textContent = "Add node";
  cancelButton.hidden = true;
}

async function save(original, changes) {
  try {
    if (original) await api("PUT", `/api/ui/nodes/${enc(original)}`, changes);
    else await api("POST", "/api/ui/nodes", changes);
    show(message, original ? `Node ${changes.name || original} saved.` : `Node ${changes.name} added.`, "ok");
    show(formMessage, "");
    resetForm();
    await refresh();
  } catch (err) {
    fail(err, formMessage);
  }
}

async function remove(n) {
  if (!confirm(`Remove node ${n.name} (${n.ae_title})? It will no longer receive or send images.`)) return;
  try {
    await api("DELETE", `/api/ui/nodes/${enc(n.name)}`);
    show(message, `Node ${n.name} removed.`, "ok");
    await refresh();
  } catch (err) {
    fail(err, message);
  }
}

form.addEventListener("submit", (e) => {
  e.preventDefault();
  save(form.elements.original.value, values());
});
cancelButton.addEventListener("click", resetForm);
refresh();
