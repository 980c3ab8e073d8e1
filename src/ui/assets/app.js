// The dcnet dashboard: one page per hash route (#/apps, #/apps/<id>, #/vips, #/dns, #/nodes,
// #/deployments), each drawn from the agent's own API routes, the same ones the CLI reads.
// It follows /v1/state/changes and draws the page again when the state moves; it never
// writes the DOM from strings (text goes in as text), so no answer can inject markup.
"use strict";

const TOKEN_KEY = "dcnet.token";
/// No line from /v1/state/changes for this long (it says the revision every 10 s): the agent
/// is taken as unreachable and the stream opened again.
const STALE_MS = 25000;
const MAX_RECORD_ROWS = 300;

const state = { revision: null, drawing: false, again: false, reachable: true };

// === DOM ===

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "onclick") node.addEventListener("click", v);
    else if (k === "onsubmit") node.addEventListener("submit", v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function table(headers, rows, emptyText) {
  const head = el("tr", {}, headers.map((h) => {
    const [text, cls] = Array.isArray(h) ? h : [h, undefined];
    return el("th", { class: cls }, text);
  }));
  const body = rows.length
    ? rows
    : [el("tr", {}, el("td", { class: "empty", colspan: headers.length }, emptyText))];
  return el("table", {}, el("thead", {}, head), el("tbody", {}, body));
}

function card(value, label) {
  return el("div", { class: "card" }, el("b", {}, value), el("span", {}, label));
}

function pill(text, kind) {
  return el("span", { class: "pill " + (kind || "") }, text);
}

function toast(text, bad) {
  const t = el("div", { class: "toast" + (bad ? " bad" : "") }, text);
  document.getElementById("toasts").append(t);
  setTimeout(() => t.remove(), bad ? 8000 : 4000);
}

function ago(rfc3339) {
  if (!rfc3339) return "";
  const s = Math.max(0, (Date.now() - Date.parse(rfc3339)) / 1000);
  if (s < 90) return Math.round(s) + " s ago";
  if (s < 5400) return Math.round(s / 60) + " min ago";
  if (s < 129600) return Math.round(s / 3600) + " h ago";
  return Math.round(s / 86400) + " d ago";
}

function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

// === API ===

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function headers(extra) {
  const h = Object.assign({}, extra);
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) h["Authorization"] = "Bearer " + token;
  return h;
}

async function api(path, opts) {
  opts = opts || {};
  const init = { method: opts.method || "GET", headers: headers(), cache: "no-store" };
  if (opts.body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(opts.body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    setReachable(false);
    throw new ApiError(0, "the agent is unreachable");
  }
  if (resp.status === 401) askToken();
  const text = await resp.text();
  let body = text;
  try { body = JSON.parse(text); } catch (e) { /* text, as /metrics is */ }
  if (!resp.ok) {
    const msg = body && body.message ? body.message : resp.status + " " + resp.statusText;
    throw new ApiError(resp.status, msg);
  }
  return body;
}

function askToken() {
  const dialog = document.getElementById("token");
  if (dialog.open) return;
  dialog.showModal();
}

function setupToken() {
  // A link may carry the token in its fragment (#/apps?token=..), which no server sees.
  const m = location.hash.match(/[?&]token=([^&]+)/);
  if (m) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.hash.replace(/[?&]token=[^&]+/, ""));
  }
  const dialog = document.getElementById("token");
  dialog.addEventListener("close", () => {
    const v = document.getElementById("token-input").value.trim();
    if (v) {
      sessionStorage.setItem(TOKEN_KEY, v);
      follow();
      draw();
    }
  });
}

// === confirmations ===

/// Asks before an action; resolves to the number typed (for `number`) or true, or null.
function confirmAction(text, number) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = text;
  const field = document.getElementById("confirm-field");
  const input = document.getElementById("confirm-input");
  field.hidden = !number;
  if (number) {
    document.getElementById("confirm-label").textContent = number.label;
    input.value = number.value;
  }
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      if (dialog.returnValue !== "ok") return resolve(null);
      if (!number) return resolve(true);
      const n = Number(input.value);
      resolve(Number.isInteger(n) && n >= 0 ? n : null);
    }, { once: true });
    dialog.returnValue = "cancel";
    dialog.showModal();
    if (number) input.select();
  });
}

async function act(label, f) {
  try {
    await f();
    toast(label);
  } catch (e) {
    toast(label + " failed: " + e.message, true);
  }
  draw();
}

function appPath(id) {
  return "/v2/apps/" + id.replace(/^\//, "").split("/").map(encodeURIComponent).join("/");
}

async function scaleApp(app) {
  const n = await confirmAction("Scale " + app.id + "?", { label: "Instances", value: app.instances });
  if (n === null) return;
  await act("Scaling " + app.id + " to " + n, () => api(appPath(app.id), { method: "PUT", body: { instances: n } }));
}

async function restartApp(app) {
  if (!await confirmAction("Restart every task of " + app.id + " (a rolling restart)?")) return;
  await act("Restarting " + app.id, () => api(appPath(app.id) + "/restart", { method: "POST" }));
}

async function killTask(app, task) {
  if (!await confirmAction("Kill task " + task.id + "? The app starts a replacement.")) return;
  await act("Killing " + task.id, () => api(appPath(app) + "/tasks/" + encodeURIComponent(task.id), { method: "DELETE" }));
}

// === pages ===

function appActions(app) {
  return el("div", { class: "actions" },
    el("button", { "data-action": "scale", onclick: () => scaleApp(app) }, "Scale"),
    el("button", { "data-action": "restart", onclick: () => restartApp(app) }, "Restart"));
}

function deploymentCell(d) {
  if (!d) return el("span", { class: "muted" }, "—");
  const target = Math.max(d.targetInstances, 1);
  const pct = Math.min(100, Math.round((100 * d.healthyNew) / target));
  const fill = el("i", {});
  fill.style.width = pct + "%"; // through the CSSOM, which the policy allows (an attribute it would not)
  const bar = el("div", { class: "bar" }, fill);
  return el("div", {}, pill(d.kind, "warn"), " ", d.healthyNew + "/" + d.targetInstances + " new",
    d.oldRemaining ? ", " + d.oldRemaining + " old left" : "", d.failedNew ? ", " + d.failedNew + " failed" : "", bar);
}

function healthCell(a) {
  if (!a.hasHealthChecks) return el("span", { class: "muted" }, "no checks");
  const kind = a.unhealthy ? "bad" : a.healthy >= a.instances ? "ok" : "warn";
  return pill(a.healthy + " healthy" + (a.unhealthy ? ", " + a.unhealthy + " unhealthy" : ""), kind);
}

function noteCell(a) {
  const out = [];
  if (a.waiting) out.push(el("div", { class: "why" }, "waits: " + a.waiting));
  const f = a.lastTaskFailure;
  if (f) out.push(el("div", { class: "fail" }, "last failure " + ago(f.timestamp) + ": " + f.message));
  return out.length ? out : el("span", { class: "muted" }, "—");
}

async function appsPage() {
  const { apps } = await api("/v1/apps");
  const running = apps.reduce((n, a) => n + a.running, 0);
  const wanted = apps.reduce((n, a) => n + a.instances, 0);
  const deploying = apps.filter((a) => a.deployment).length;
  const rows = apps.map((a) => el("tr", { "data-app": a.id },
    el("td", {}, el("a", { href: "#/apps" + a.id }, a.id)),
    el("td", { class: "num", "data-field": "instances" }, a.instances),
    el("td", { class: "num", "data-field": "running" }, a.running),
    el("td", {}, healthCell(a)),
    el("td", { class: "mono" }, a.version),
    el("td", {}, deploymentCell(a.deployment)),
    el("td", {}, noteCell(a)),
    el("td", {}, appActions(a))));
  return [
    el("h1", {}, "Apps", el("small", {}, apps.length + " apps")),
    el("div", { class: "cards" }, card(apps.length, "apps"), card(running + " / " + wanted, "tasks running / wanted"),
      card(deploying, "deployments in progress")),
    table(["App", ["Instances", "num"], ["Running", "num"], "Health", "Version", "Deployment", "Waits / last failure", ""],
      rows, "No apps yet: dcnet app deploy FILE"),
  ];
}

function taskAddress(t) {
  const ips = (t.ipAddresses || []).map((i) => i.ipAddress);
  return ips.length ? ips.join(", ") : t.host;
}

function taskState(t) {
  const s = (t.state || "").replace(/^TASK_/, "").toLowerCase();
  const kind = s === "running" ? (t.goal === "kill" ? "warn" : "ok") : ["failed", "lost", "error"].includes(s) ? "bad" : "";
  if (s === "running" && t.goal !== "kill" && t.ready === false) return pill("not ready", "warn");
  // What a staging task waits for: its image's pull (layers, bytes), its artifacts.
  if (s === "staging" && t.staging) return el("span", {}, pill("staging", ""), " ", el("span", { class: "muted" }, t.staging));
  return pill(t.goal === "kill" && s === "running" ? "killing" : s, kind);
}

function taskHealth(t, hasChecks) {
  if (!hasChecks) return el("span", { class: "muted" }, "—");
  const alive = t.health && t.health.alive;
  if (alive === true) return pill("healthy", "ok");
  if (alive === false) return pill("unhealthy", "bad");
  return pill("unknown");
}

function exitCell(t) {
  const out = [];
  if (t.killReason) out.push("killed: " + t.killReason);
  if (t.exit) out.push(t.exit.reason);
  return out.length ? out.join("; ") : el("span", { class: "muted" }, "—");
}

async function appPage(id) {
  const [{ apps }, { tasks }] = await Promise.all([api("/v1/apps"), api("/v1/tasks?app=" + encodeURIComponent(id))]);
  const a = apps.find((x) => x.id === id);
  if (!a) return [el("h1", {}, id), el("p", { class: "empty" }, "No app " + id)];
  const rows = tasks.map((t) => el("tr", { "data-task": t.id },
    el("td", { class: "mono" }, t.id),
    el("td", {}, t.nodeId || ""),
    el("td", { class: "mono" }, taskAddress(t)),
    el("td", { class: "mono" }, (t.ports || []).join(", ")),
    el("td", {}, taskHealth(t, a.hasHealthChecks)),
    el("td", { "data-field": "state" }, taskState(t)),
    el("td", {}, ago(t.startedAt || t.stagedAt)),
    el("td", {}, exitCell(t)),
    el("td", {}, t.goal === "kill" ? "" : el("button", { class: "danger", "data-action": "kill", onclick: () => killTask(a.id, t) }, "Kill"))));
  return [
    el("h1", {}, a.id, el("small", {}, "version " + a.version)),
    el("div", { class: "cards" }, card(a.running + " / " + a.instances, "running / wanted"), card(a.staged, "staging"),
      card(a.hasHealthChecks ? a.healthy : "—", "healthy"), card(a.killing, "being killed")),
    el("div", { class: "actions" }, appActions(a)),
    a.deployment ? el("h2", {}, "Deployment in progress") : null,
    a.deployment ? deploymentCell(a.deployment) : null,
    a.waiting || a.lastTaskFailure ? el("div", {}, noteCell(a)) : null,
    el("h2", {}, "Tasks"),
    table(["Task", "Node", "Address", "Ports", "Health", "State", "Started", "Exit / reason", ""], rows, "No tasks"),
  ];
}

async function vipsPage() {
  const vips = await api("/v1/vips");
  const rows = vips.map((v) => el("tr", { "data-vip": v.vip },
    el("td", {}, v.name ? el("div", {}, v.name) : null, el("div", { class: "mono muted" }, v.vip)),
    el("td", { class: "mono" }, v.ip + ":" + v.port + "/" + v.protocol),
    el("td", {}, v.lb),
    el("td", {}, pill(v.dataPlane)),
    el("td", {}, v.backends.length ? table(["Backend", "Node", "State", ["Weight", "num"], ["Active", "num"], ["Total", "num"]],
      v.backends.map((b) => el("tr", {},
        el("td", { class: "mono" }, b.ip + ":" + b.port),
        el("td", {}, b.node || ""),
        el("td", {}, pill(b.state, b.state === "healthy" ? "ok" : b.state === "unhealthy" ? "bad" : "warn")),
        el("td", { class: "num" }, b.weight),
        el("td", { class: "num" }, b.active ?? "—"),
        el("td", { class: "num" }, b.total))), "") : el("span", { class: "muted" }, "no backends"))));
  return [
    el("h1", {}, "VIPs", el("small", {}, vips.length + " served by this node")),
    table(["Name", "Address", "Balancing", "Data plane", "Backends"], rows, "No VIPs: give a port the label VIP_0"),
  ];
}

/// Prometheus text: the samples of `name`, as [{labels, value}].
function samples(text, name) {
  const out = [];
  for (const line of text.split("\n")) {
    if (!line.startsWith(name)) continue;
    const m = line.match(/^([a-z_:]+)(\{([^}]*)\})?\s+([0-9.eE+-]+|NaN)$/);
    if (!m || m[1] !== name) continue;
    const labels = {};
    for (const kv of (m[3] || "").matchAll(/([a-z_]+)="([^"]*)"/g)) labels[kv[1]] = kv[2];
    out.push({ labels, value: Number(m[4]) });
  }
  return out;
}

const dnsForm = { name: "", type: "A", result: null };

async function lookup(ev) {
  ev.preventDefault();
  const form = ev.target;
  dnsForm.name = form.elements.name.value.trim();
  dnsForm.type = form.elements.type.value;
  if (!dnsForm.name) return;
  try {
    dnsForm.result = await api("/v1/dns/lookup?name=" + encodeURIComponent(dnsForm.name) + "&type=" + dnsForm.type);
  } catch (e) {
    dnsForm.result = { error: e.message };
  }
  draw();
}

function lookupResult(r) {
  if (!r) return null;
  if (r.error) return el("p", { class: "fail", id: "lookup-result" }, r.error);
  const rows = r.answers.concat(r.authority).map((x) => el("tr", {},
    el("td", { class: "mono" }, x.name), el("td", {}, x.type), el("td", { class: "num" }, x.ttl), el("td", { class: "mono" }, x.data)));
  return el("div", { id: "lookup-result" },
    el("p", {}, pill(r.rcode, r.rcode === "No Error" || r.rcode === "NoError" ? "ok" : "warn"), " ",
      r.authoritative ? "authoritative" : "forwarded", " · " + r.ms.toFixed(1) + " ms from " + r.server),
    table(["Name", "Type", ["TTL", "num"], "Data"], rows, "no records"));
}

async function dnsPage() {
  const [records, metrics] = await Promise.all([api("/v1/records"), api("/metrics")]);
  const queries = samples(metrics, "dcnet_dns_queries_total");
  const total = queries.reduce((n, s) => n + s.value, 0);
  const byZone = {};
  const byRcode = {};
  for (const s of queries) {
    byZone[s.labels.zone] = (byZone[s.labels.zone] || 0) + s.value;
    byRcode[s.labels.rcode] = (byRcode[s.labels.rcode] || 0) + s.value;
  }
  const forwards = samples(metrics, "dcnet_dns_forwarded_total");
  const forwarded = forwards.reduce((n, s) => n + s.value, 0);
  const filter = (document.getElementById("record-filter") || {}).value || "";
  // /v1/records: {name: ["A 10.0.0.1", "SRV 0 0 80 web.", ..]}
  const all = Object.entries(records.records).flatMap(([name, lines]) => lines.map((line) => {
    const at = line.indexOf(" ");
    return { name, type: line.slice(0, at), data: line.slice(at + 1) };
  }));
  const shown = all.filter((r) => !filter || r.name.includes(filter));
  const rows = shown.slice(0, MAX_RECORD_ROWS).map((r) => el("tr", {},
    el("td", { class: "mono" }, r.name), el("td", {}, r.type), el("td", { class: "mono" }, r.data)));
  const form = el("form", { class: "inline", id: "lookup", onsubmit: lookup },
    el("input", { name: "name", placeholder: "web.marathon.l4lb", size: 40, value: dnsForm.name }),
    el("select", { name: "type" }, ["A", "AAAA", "SRV", "PTR", "TXT", "SOA", "NS"].map((t) =>
      el("option", { value: t, selected: t === dnsForm.type }, t))),
    el("button", { class: "primary", type: "submit" }, "Look up"));
  const counts = (obj) => Object.entries(obj).sort((a, b) => b[1] - a[1]).map(([k, v]) => k + " " + v).join(", ") || "none";
  const filterInput = el("input", { id: "record-filter", placeholder: "filter names", value: filter });
  filterInput.addEventListener("input", () => draw());
  return [
    el("h1", {}, "DNS", el("small", {}, "revision " + records.revision)),
    el("div", { class: "cards" }, card(records.count, "records served"), card(total, "queries answered"),
      card(forwarded, "forwarded upstream")),
    el("p", { class: "muted" }, "By zone: " + counts(byZone) + ". By response: " + counts(byRcode) + ". Forwarded: " +
      counts(Object.fromEntries(forwards.map((s) => [s.labels.result, s.value]))) + "."),
    el("h2", {}, "Look up a name as this agent answers it"),
    form,
    lookupResult(dnsForm.result),
    el("h2", {}, "Records"),
    el("form", { class: "inline", onsubmit: (e) => e.preventDefault() }, filterInput,
      el("span", { class: "muted" }, shown.length > MAX_RECORD_ROWS ? "first " + MAX_RECORD_ROWS + " of " + shown.length : shown.length + " records")),
    table(["Name", "Type", "Data"], rows, "No records"),
  ];
}

async function nodesPage() {
  const [{ nodes }, overlay] = await Promise.all([api("/v1/nodes"), api("/v1/overlay").catch((e) => ({ off: e.message }))]);
  const rows = nodes.map((n) => el("tr", { "data-node": n.id },
    el("td", {}, n.id, n.leader ? [" ", pill("leader", "ok")] : null),
    el("td", {}, pill(n.status, n.status === "active" ? "ok" : "warn"), el("div", { class: "muted" }, "registered " + ago(n.registeredAt))),
    el("td", { class: "mono" }, n.ip),
    el("td", { class: "mono" }, n.subnet || ""),
    el("td", { class: "num" }, n.used.cpus.toFixed(2) + " / " + n.resources.cpus),
    el("td", { class: "num" }, Math.round(n.used.mem) + " / " + n.resources.mem + " MB"),
    el("td", { class: "num" }, n.used.tasks),
    el("td", {}, n.overlay ? el("span", { class: "mono" }, n.overlay.publicKey.slice(0, 12) + "… :" + n.overlay.port) : el("span", { class: "muted" }, "—"))));
  const out = [
    el("h1", {}, "Nodes", el("small", {}, nodes.length + " registered")),
    table(["Node", "Status", "Address", "Container subnet", ["CPUs used / total", "num"], ["Memory used / total", "num"], ["Tasks", "num"], "Overlay key"], rows, "No nodes"),
    el("h2", {}, "Overlay on this node"),
  ];
  if (overlay.off) {
    out.push(el("p", { class: "muted" }, "The overlay does not run on this node."));
    return out;
  }
  out.push(el("p", {}, "Device ", el("code", {}, overlay.device), ", port " + overlay.listenPort + ", key ", el("code", {}, overlay.publicKey)));
  out.push(table(["Peer", "Endpoint", "Allowed IPs", ["Last handshake", "num"], ["Received", "num"], ["Sent", "num"]],
    overlay.peers.map((p) => el("tr", { "data-peer": p.node || p.publicKey },
      el("td", {}, p.node || el("code", {}, p.publicKey)),
      el("td", { class: "mono" }, p.endpoint || ""),
      el("td", { class: "mono" }, p.allowedIps.join(", ")),
      el("td", { class: "num" }, p.lastHandshakeSecs === null ? "never" : p.lastHandshakeSecs + " s ago"),
      el("td", { class: "num" }, bytes(p.rxBytes)),
      el("td", { class: "num" }, bytes(p.txBytes)))), "No peers"));
  return out;
}

async function deploymentsPage() {
  const [deps, { apps }] = await Promise.all([api("/v1/deployments?all=true"), api("/v1/apps")]);
  const waits = Object.fromEntries(apps.map((a) => [a.id, a.waiting]));
  deps.reverse();
  const rows = deps.map((d) => {
    const running = d.status === "running";
    return el("tr", { "data-deployment": d.id },
      el("td", { class: "mono" }, d.id),
      el("td", {}, el("a", { href: "#/apps" + d.appId }, d.appId)),
      el("td", {}, d.kind),
      el("td", {}, pill(d.status, running ? "warn" : d.status === "succeeded" ? "ok" : d.status === "failed" ? "bad" : "")),
      el("td", {}, running ? deploymentCell(d) : d.healthyNew + "/" + d.targetInstances),
      el("td", {}, ago(d.startedAt)),
      el("td", {}, d.finishedAt ? ago(d.finishedAt) : ""),
      el("td", {}, d.reason ? el("span", { class: "fail" }, d.reason) : running && waits[d.appId] ? el("span", { class: "why" }, "waits: " + waits[d.appId]) : ""));
  });
  return [
    el("h1", {}, "Deployments", el("small", {}, deps.filter((d) => d.status === "running").length + " in progress")),
    table(["Deployment", "App", "Kind", "Status", "Progress", "Started", "Finished", "Why"], rows, "No deployments"),
  ];
}

// === routing and live updates ===

function route() {
  const hash = location.hash.replace(/^#/, "").split("?")[0] || "/apps";
  if (hash.startsWith("/apps/")) return { page: "apps", draw: () => appPage(hash.slice("/apps".length)) };
  const pages = { "/apps": appsPage, "/vips": vipsPage, "/dns": dnsPage, "/nodes": nodesPage, "/deployments": deploymentsPage };
  const f = pages[hash] || appsPage;
  return { page: (hash in pages ? hash : "/apps").slice(1), draw: f };
}

/// Draws the current page; a draw asked for while one runs happens once after it.
async function draw() {
  if (state.drawing) { state.again = true; return; }
  state.drawing = true;
  const r = route();
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.page === r.page) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  try {
    const nodes = await r.draw();
    const main = document.getElementById("main");
    // A field being typed in keeps the focus across the redraw (the filter, the lookup).
    const active = document.activeElement;
    const focused = active && main.contains(active) && active.tagName === "INPUT" ? active.id || active.name : null;
    main.replaceChildren(...nodes.filter((n) => n));
    main.dataset.revision = state.revision === null ? "" : state.revision;
    if (focused) {
      const again = document.getElementById(focused) || main.querySelector("input[name='" + focused + "']");
      if (again) {
        again.focus();
        if (again.type === "text" || again.type === "search") again.setSelectionRange(again.value.length, again.value.length);
      }
    }
  } catch (e) {
    // Unreachable: the banner says so; refused for the token: its dialog asks.
    if (e.status !== 401 && e.status !== 0) toast(e.message, true);
  } finally {
    state.drawing = false;
    if (state.again) { state.again = false; draw(); }
  }
}

function setReachable(ok, text) {
  state.reachable = ok;
  const live = document.getElementById("live");
  const banner = document.getElementById("banner");
  live.dataset.state = ok ? "live" : "down";
  live.textContent = ok ? "live · revision " + state.revision : "unreachable";
  banner.hidden = ok;
  banner.textContent = ok ? "" : text || "The agent is unreachable; what you see is as it was. Trying again…";
}

let following = null;

/// Follows /v1/state/changes: every new revision draws the page again; a broken or silent
/// stream marks the agent unreachable and is opened again after a pause.
async function follow() {
  if (following) following.abort();
  const ctl = new AbortController();
  following = ctl;
  let watchdog = null;
  const kick = () => { clearTimeout(watchdog); watchdog = setTimeout(() => ctl.abort(), STALE_MS); };
  try {
    kick();
    const resp = await fetch("/v1/state/changes", { headers: headers(), signal: ctl.signal, cache: "no-store" });
    if (resp.status === 401) { askToken(); return; }
    if (!resp.ok) throw new Error("status " + resp.status);
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      kick();
      buf += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        if (!line.trim()) continue;
        const { revision } = JSON.parse(line);
        const wasDown = !state.reachable;
        const moved = revision !== state.revision;
        state.revision = revision;
        setReachable(true);
        if (moved || wasDown) draw();
      }
    }
  } catch (e) {
    /* aborted, reset or refused: said below */
  } finally {
    clearTimeout(watchdog);
  }
  if (following !== ctl) return;
  setReachable(false);
  setTimeout(follow, 2000);
}

document.addEventListener("DOMContentLoaded", () => {
  setupToken();
  window.addEventListener("hashchange", () => { dnsForm.result = null; draw(); });
  draw();
  follow();
});
