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

// What the signed-in subject's roles allow (as the controller decides:
// the API checks every request regardless of what the page offers).
function allows(resource, verb) {
  return (session ? session.rules : []).some((r) =>
    r.resources.some((x) => x === "*" || x === resource || resource.startsWith(x + "/")) &&
    r.verbs.some((v) => v === "*" || v === verb));
}

// Hides every control whose change (data-change="RESOURCE:VERB") the
// roles do not allow, and every view they may not read
// (data-needs="RESOURCE:VERB"); a join token is allowed if either kind is.
function gate() {
  for (const el of document.querySelectorAll("[data-needs]")) {
    const [resource, verb] = el.dataset.needs.split(":");
    el.hidden = !allows(resource, verb);
  }
  for (const el of document.querySelectorAll("[data-change]")) {
    const [resource, verb] = el.dataset.change.split(":");
    const ok = resource === "tokens"
      ? allows("tokens/agent", verb) || allows("tokens/relay", verb)
      : allows(resource, verb);
    el.hidden = !ok;
  }
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
  const draining = relays.filter((r) => r.healthy && r.load.draining).length;
  $("relays-detail").textContent = healthy + " healthy, " + (relays.length - healthy) + " down" +
    (draining ? ", " + draining + " draining" : "");
  $("agents-count").textContent = agents.length;
  $("agents-detail").textContent = unseen.length + " not seen for 5 min";
  $("links-count").textContent = links.length;
  $("links-detail").textContent = ready + " ready, " + (links.length - ready) + " not";

  const attention = [];
  for (const r of relays) if (!r.healthy) attention.push("Relay " + r.name + " is down (last heartbeat " + ago(r.last_heartbeat) + ")");
  for (const r of relays) if (r.healthy && r.load.draining) attention.push("Relay " + r.name + " is draining: its links are moving to other relays");
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
    cell(r.name), state(!r.healthy ? "down" : r.load.draining ? "draining" : "healthy"), cell(r.public_addr),
    cell(r.links, "num"), cell(r.load.connections, "num"), cell(bytes(r.load.buffered_bytes), "num"),
    cell(r.version || "–"), cell(ago(r.last_heartbeat)),
  ]), "No relays yet: create a join token for one.", 8);
  fill("agents", agents.map((a) => [cell(a.name), cell(a.links, "num"), cell(a.version || "–"), cell(ago(a.last_seen))]),
    "No agents yet: create a join token for one.", 4);
  if (!editing) {
    fill("links", links.map((l) => [
      cell(l.name), state(l.status.state), cell(l.from + " " + l.listen), cell(l.to + " " + l.target),
      cell(l.relays.join(", ")), traffic(l), cell(limits(l)), cell(l.status.reason || ""), actions(l),
    ]), "No links yet: create one below.", 9);
  }
  agentChoices(agents);
  gate();
  $("updated").textContent = "Updated " + new Date().toLocaleTimeString();
}

let editing = false;

// Each link's recent rates (both directions together), oldest first, for
// its sparkline: one point a refresh, the last 60 (two minutes).
const history = new Map();

function traffic(l) {
  const t = l.traffic;
  const td = cell("", "traffic");
  const rate = t ? t.bytes_per_sec_a_to_b + t.bytes_per_sec_b_to_a : 0;
  const points = history.get(l.name) || [];
  points.push(rate);
  if (points.length > 60) points.shift();
  history.set(l.name, points);
  if (!t) {
    td.textContent = "nothing yet";
    return td;
  }
  const text = document.createElement("span");
  text.className = "rate";
  text.textContent = "↑ " + bytes(t.bytes_per_sec_a_to_b) + "/s ↓ " + bytes(t.bytes_per_sec_b_to_a) +
    "/s · " + t.flows_open + (t.flows_open === 1 ? " flow" : " flows");
  text.title = bytes(t.bytes_a_to_b) + " from " + l.from + ", " + bytes(t.bytes_b_to_a) +
    " from " + l.to + " through " + t.relay;
  td.append(text, sparkline(points));
  return td;
}

function sparkline(points) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  const w = 90, h = 18;
  svg.setAttribute("class", "spark");
  svg.setAttribute("width", w);
  svg.setAttribute("height", h);
  svg.setAttribute("viewBox", "0 0 " + w + " " + h);
  const top = Math.max(1, ...points);
  const step = w / 59;
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", points.map((p, i) =>
    (w - (points.length - 1 - i) * step).toFixed(1) + "," + (h - 1 - (p / top) * (h - 2)).toFixed(1)).join(" "));
  svg.append(line);
  return svg;
}

function limits(l) {
  const parts = [];
  if (l.max_flows) parts.push(l.max_flows + " flows");
  if (l.rate_limit_bytes_per_sec) parts.push(bytes(l.rate_limit_bytes_per_sec) + "/s");
  return parts.length ? parts.join(", ") : "none";
}

function button(text, change, onclick, cls) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.dataset.change = change;
  if (cls) b.className = cls;
  b.addEventListener("click", onclick);
  return b;
}

function actions(l) {
  const td = document.createElement("td");
  td.className = "actions";
  td.append(
    button("Limits", "links:update", () => editLimits(l, td)),
    button("Delete", "links:delete", () => deleteLink(l), "danger"),
  );
  return td;
}

function editLimits(l, td) {
  editing = true;
  const form = document.createElement("form");
  form.className = "inline limits";
  form.innerHTML =
    '<label>Max flows <input name="max_flows" type="number" min="0"></label>' +
    '<label>Bytes/s <input name="rate" type="number" min="0"></label>' +
    '<button type="submit">Save</button><button type="button" name="cancel">Cancel</button>';
  el(form, "max_flows").value = l.max_flows || 0;
  el(form, "rate").value = l.rate_limit_bytes_per_sec || 0;
  el(form, "cancel").addEventListener("click", () => { editing = false; refresh().catch(() => {}); });
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      await call("PATCH", "/v1/links/" + encodeURIComponent(l.name), {
        max_flows: Number(el(form, "max_flows").value), rate_limit_bytes_per_sec: Number(el(form, "rate").value),
      });
      editing = false;
      await refresh();
    } catch (err) { alert("Not changed: " + err.message); }
  });
  td.replaceChildren(form);
}

async function deleteLink(l) {
  if (!confirm("Delete link " + l.name + "? Its listener closes and open flows are reset.")) return;
  try { await call("DELETE", "/v1/links/" + encodeURIComponent(l.name)); } catch (err) { alert("Not deleted: " + err.message); }
  await refresh().catch(() => {});
}

// A form's control by name (never a property of the form itself).
function el(form, name) {
  return form.elements.namedItem(name);
}

function agentChoices(agents) {
  const form = $("new-link-form");
  for (const field of [el(form, "from"), el(form, "to")]) {
    const chosen = field.value;
    const names = agents.map((a) => a.name);
    if ([...field.options].map((o) => o.value).join() === names.join()) continue;
    field.replaceChildren(...names.map((n) => new Option(n, n)));
    if (names.includes(chosen)) field.value = chosen;
  }
}

$("new-link-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const f = e.target;
  $("new-link-error").textContent = "";
  try {
    await call("POST", "/v1/links", {
      name: el(f, "name").value.trim(), from: el(f, "from").value, listen: el(f, "listen").value.trim(),
      to: el(f, "to").value, target: el(f, "target").value.trim(),
    });
    f.reset();
    await refresh();
  } catch (err) { $("new-link-error").textContent = err.message; }
});

$("new-token-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const f = e.target;
  const kind = el(f, "kind").value, name = el(f, "name").value.trim();
  $("new-token-error").textContent = "";
  try {
    const t = await call("POST", "/v1/tokens", { kind, name });
    const extra = kind === "relay" ? " --public-addr HOST:4433" : "";
    $("token-command").textContent =
      "comsat " + kind + " enrol --token-file " + name + ".token --data-dir /var/lib/comsat/" + kind + extra;
    $("token-value").textContent = t.token;
    $("token-shown").hidden = false;
    f.reset();
  } catch (err) { $("new-token-error").textContent = err.message; }
});

async function showAudit() {
  const f = $("audit-form");
  const q = new URLSearchParams({ limit: "200" });
  const subject = el(f, "subject").value.trim();
  const result = el(f, "result").value;
  if (subject) q.set("subject", subject);
  if (result) q.set("result", result);
  const records = await call("GET", "/v1/audit?" + q.toString());
  records.reverse();
  fill("audit-log", records.map((r) => [
    cell(new Date(r.at_ms).toLocaleString()), cell(r.subject), cell(r.action), cell(r.resource),
    state(r.result), cell(r.reason || ""),
  ]), "No records match.", 6);
}

$("audit-form").addEventListener("submit", (e) => {
  e.preventDefault();
  showAudit().catch((err) => { $("updated").textContent = "Audit log: " + err.message; });
});

$("token-copy").addEventListener("click", () => {
  navigator.clipboard.writeText($("token-value").textContent).catch(() => {});
});

function showSignIn() {
  session = null;
  editing = false;
  $("token-shown").hidden = true;
  $("token-value").textContent = "";
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
  gate();
  if (allows("audit", "list")) showAudit().catch(() => {});
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
