// The comsat console: every number on the page comes from the controller's
// API (/v1/...), read with the session cookie; a change carries the
// session's CSRF token, which lives in this page's memory only.
"use strict";

let session = null;
let timer = null;

const $ = (id) => document.getElementById(id);

async function call(method, path, body) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && session) headers["X-CSRF-Token"] = session.csrf;
  const r = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (r.status === 401) { showSignIn(); throw new Error("signed out"); }
  if (!r.ok) {
    let msg = r.status + "";
    try { msg = (await r.json()).error || msg; } catch (_) { /* not JSON */ }
    throw new Error(msg);
  }
  return r.status === 204 ? null : r.json();
}

function ago(unix) {
  if (!unix) return "never";
  const s = Math.max(0, Math.round(Date.now() / 1000 - unix));
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return Math.round(s / 3600) + " h ago";
  return Math.round(s / 86400) + " d ago";
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function state(text) {
  return cell(text, "state state-" + text);
}

function fill(table, rows, empty, columns) {
  const body = $(table).querySelector("tbody");
  body.replaceChildren();
  if (rows.length === 0) {
    const tr = document.createElement("tr");
    tr.className = "empty";
    const td = cell(empty);
    td.colSpan = columns;
    tr.append(td);
    body.append(tr);
    return;
  }
  for (const cells of rows) {
    const tr = document.createElement("tr");
    tr.append(...cells);
    body.append(tr);
  }
}

async function refresh() {
  const [relays, agents, links] = await Promise.all([
    call("GET", "/v1/relays"), call("GET", "/v1/agents"), call("GET", "/v1/links"),
  ]);
  const healthy = relays.filter((r) => r.healthy).length;
  const ready = links.filter((l) => l.status.state === "ready").length;
  const stale = Date.now() / 1000 - 300;
  const unseen = agents.filter((a) => !a.last_seen || a.last_seen < stale);
  $("relays-count").textContent = relays.length;
  $("relays-detail").textContent = healthy + " healthy, " + (relays.length - healthy) + " down";
  $("agents-count").textContent = agents.length;
  $("agents-detail").textContent = unseen.length + " not seen for 5 min";
  $("links-count").textContent = links.length;
  $("links-detail").textContent = ready + " ready, " + (links.length - ready) + " not";

  const attention = [];
  for (const r of relays) if (!r.healthy) attention.push("Relay " + r.name + " is down (last heartbeat " + ago(r.last_heartbeat) + ")");
  for (const l of links) if (["failed", "refused"].includes(l.status.state)) attention.push("Link " + l.name + " is " + l.status.state + ": " + (l.status.reason || ""));
  for (const a of unseen) attention.push("Agent " + a.name + " not seen " + ago(a.last_seen));
  if (relays.length === 0) attention.push("No relays yet: create a join token (comsat ctl token create --kind relay --name NAME) and enrol one.");
  if (agents.length === 0) attention.push("No agents yet: create a join token (comsat ctl token create --kind agent --name NAME) and enrol one.");
  const list = $("attention");
  list.replaceChildren(...(attention.length ? attention : ["Nothing: every relay is healthy and every link ready."]).map((t) => {
    const li = document.createElement("li");
    li.textContent = t;
    return li;
  }));

  fill("relays", relays.map((r) => [
    cell(r.name), state(r.healthy ? "healthy" : "down"), cell(r.public_addr),
    cell(r.links, "num"), cell(r.load.connections, "num"), cell(bytes(r.load.buffered_bytes), "num"),
    cell(ago(r.last_heartbeat)),
  ]), "No relays yet: create a join token for one.", 7);
  fill("agents", agents.map((a) => [cell(a.name), cell(a.links, "num"), cell(ago(a.last_seen))]),
    "No agents yet: create a join token for one.", 3);
  fill("links", links.map((l) => [
    cell(l.name), state(l.status.state), cell(l.from + " " + l.listen), cell(l.to + " " + l.target),
    cell(l.relays.join(", ")), cell(l.status.reason || ""),
  ]), "No links yet.", 6);
  $("updated").textContent = "Updated " + new Date().toLocaleTimeString();
}

function showSignIn() {
  session = null;
  if (timer) { clearInterval(timer); timer = null; }
  $("overview").hidden = true;
  $("sign-out").hidden = true;
  $("who").textContent = "";
  $("sign-in").hidden = false;
}

function showConsole(info) {
  session = info;
  $("sign-in").hidden = true;
  $("who").textContent = info.subject;
  $("sign-out").hidden = false;
  $("overview").hidden = false;
  refresh().catch(() => {});
  if (!timer) timer = setInterval(() => refresh().catch(() => {}), 2000);
}

$("sign-in-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  $("sign-in-error").textContent = "";
  const field = $("token");
  const r = await fetch("/ui/session", {
    method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ token: field.value.trim() }),
  });
  field.value = "";
  if (r.ok) {
    showConsole(await r.json());
  } else {
    $("sign-in-error").textContent = r.status === 429
      ? "Too many failed sign-ins from here: wait a moment."
      : "That token is not valid here.";
  }
});

$("sign-out").addEventListener("click", async () => {
  try { await call("DELETE", "/ui/session"); } catch (_) { /* signed out anyway */ }
  showSignIn();
});

fetch("/ui/session", { credentials: "same-origin" })
  .then((r) => (r.ok ? r.json().then(showConsole) : showSignIn()))
  .catch(showSignIn);
