// The fleet dashboard: hash routes over the fleet's JSON API, redrawn every REFRESH_MS.
//
//   #/                 overview: device counts, versions served, failed updates, recent reports, running rollouts
//   #/devices          every device: state, groups, version, last seen
//   #/devices/<id>     one device: its facts, telemetry plots over a chosen window, its last status reports
//   #/rollouts         rollouts (or "no rollouts" where the fleet has no rollout API yet)
//   #/rollouts/<id>    one rollout: per-wave progress bars with counts, thresholds and the measured scores
//
// The API token is asked for once, kept in sessionStorage (this tab only) and sent as `Authorization: Bearer`; a 401
// forgets it and shows the sign-in form again. Everything the API returns reaches the page through textContent or
// setAttribute, never as HTML. Failures are shown on the page, never logged by the browser.

import { fmt, lineChart } from "./plot.js";

const TOKEN_KEY = "slmops-token";
const REFRESH_MS = 5000;
const ID_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/; // device and rollout ids, as the fleet checks them
const COUNT_KEYS = ["succeeded", "failed", "timed_out", "rolled_back", "updating", "sent", "pending"];
const BAD_KEYS = ["failed", "timed_out", "rolled_back"];
const RANGES = { // window -> [seconds, step_s]; at most 1,000 points each, as the API requires
  "15m": [900, 10], "1h": [3600, 60], "6h": [21600, 300], "24h": [86400, 900], "7d": [604800, 3600],
};
const PLOTS = [
  ["cpu_percent", "CPU", "%"], ["memory_rss_mb", "Memory (RSS)", "MB"],
  ["memory_percent", "Memory", "%"], ["tokens_per_s", "Tokens per second", "tok/s"],
];

class Unauthorized extends Error {}
class NotFound extends Error {}

const $ = (id) => document.getElementById(id);
let features = null; // what the fleet's overview said it serves ({rollouts: bool}); null until known
let range = "15m";
let generation = 0; // a slower, older redraw never replaces a newer one

function token() { return sessionStorage.getItem(TOKEN_KEY); }

async function api(path) {
  const r = await fetch(path, { headers: { Authorization: `Bearer ${token()}`, Accept: "application/json" }, cache: "no-store" });
  if (r.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    throw new Unauthorized("the fleet refused this token");
  }
  if (r.status === 404) throw new NotFound(path);
  if (!r.ok) {
    let detail = "";
    try { detail = (await r.json()).detail || ""; } catch { /* not JSON */ }
    throw new Error(`${path} answered HTTP ${r.status} ${String(detail).slice(0, 200)}`);
  }
  return r.json();
}

// h("td", {class: "x"}, "text", node, ...) -> element; attributes through setAttribute, text through text nodes
function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) if (v !== null && v !== undefined) node.setAttribute(k, String(v));
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  return node;
}

function table(headers, rows, attrs = {}) {
  return h("table", attrs, headers.length ? h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))) : null,
    h("tbody", {}, rows.map((cells) => h("tr", {}, cells.map((c) => h("td", {}, c))))));
}

function card(label, value, tone = "", id = null) {
  return h("div", { class: `card ${tone}`, id }, h("div", { class: "value" }, value), h("div", { class: "muted" }, label));
}

const state = (s) => h("span", { class: `state-${s}` }, s);
const when = (iso) => (iso ? new Date(iso).toISOString().replace("T", " ").slice(0, 19) + " UTC" : "never");
const deviceLink = (id) => h("a", { href: `#/devices/${encodeURIComponent(id)}` }, id);
const deviceState = (d) => (d.revoked_at ? "revoked" : d.online ? "online" : "offline");
const served = (a) => (a ? `${a.name} v${a.version}` : "nothing yet");

// ---- pages --------------------------------------------------------------------------------------------------

async function overviewPage() {
  const o = await api("/api/v1/overview");
  features = { rollouts: o.rollouts_api };
  const d = o.devices;
  const page = h("div", { id: "overview" }, h("h1", {}, "Fleet overview"),
    h("div", { class: "cards" },
      card("devices", d.total, "", "count-total"), card("online", d.online, "ok", "count-online"),
      card("offline", d.offline, "", "count-offline"), card("revoked", d.revoked, d.revoked ? "bad" : "", "count-revoked"),
      card("last update failed", o.failed_count, o.failed_count ? "bad" : "ok", "count-failed"),
      card("MQTT", o.mqtt_connected ? "connected" : "down", o.mqtt_connected ? "ok" : "bad", "mqtt")),
    h("h2", {}, "Versions served"),
    table(["bundle", "version", "devices"], o.versions.map((v) => [v.name ?? "nothing yet", v.version ?? "-", v.devices]),
      { id: "versions" }),
    h("h2", {}, "Devices whose last update failed"),
    o.failed.length
      ? table(["device", "bundle", "state", "error", "detail", "at"], o.failed.map((r) => [deviceLink(r.device_id),
          `${r.bundle_name} v${r.bundle_version}`, state(r.state), r.error_code ?? "", r.detail, when(r.received_at)]),
        { id: "failed" })
      : h("p", { class: "muted", id: "failed" }, "none"));
  if (o.rollouts_api) page.append(h("h2", {}, "Rollouts"), await rolloutsTable(true));
  page.append(h("h2", {}, "Recent status reports"),
    table(["device", "bundle", "state", "error", "at"], o.recent_reports.map((r) => [deviceLink(r.device_id),
      `${r.bundle_name} v${r.bundle_version}`, state(r.state), r.error_code ?? "", when(r.received_at)]),
    { id: "recent" }));
  return page;
}

async function devicesPage() {
  const list = await api("/api/v1/devices");
  return h("div", { id: "devices" }, h("h1", {}, `Devices (${list.length})`),
    table(["device", "state", "groups", "serving", "agent", "last seen"], list.map((d) => [deviceLink(d.id),
      state(deviceState(d)), d.groups.join(", "), served(d.active), d.agent_version, when(d.last_seen)]),
    { id: "device-table" }));
}

async function devicePage(id) {
  if (!ID_RE.test(id)) return h("p", { class: "error" }, "That is not a device id.");
  const d = await api(`/api/v1/devices/${encodeURIComponent(id)}`);
  const [seconds, step] = RANGES[range];
  const until = new Date();
  const since = new Date(until.getTime() - seconds * 1000);
  const q = new URLSearchParams({ since: since.toISOString(), until: until.toISOString(), step_s: String(step) });
  const series = await api(`/api/v1/devices/${encodeURIComponent(id)}/telemetry?${q}`);
  const pick = h("select", { id: "range" }, Object.keys(RANGES).map((k) => {
    const o = h("option", { value: k }, `last ${k}`);
    o.selected = k === range;
    return o;
  }));
  pick.addEventListener("change", () => { range = pick.value; render(); });
  const facts = [["state", state(deviceState(d))], ["groups", d.groups.join(", ") || "none"], ["serving", served(d.active)],
    ["desired", d.desired ? `${d.desired.bundle_name} v${d.desired.bundle_version} (${d.desired.state})` : "none"],
    ["agent", d.agent_version || "unknown"], ["last seen", when(d.last_seen)], ["registered", when(d.registered_at)]];
  return h("div", { id: "device", "data-device": d.id }, h("h1", {}, `Device ${d.id}`),
    table([], facts, { id: "facts" }),
    h("h2", {}, "Telemetry ", pick, h("span", { class: "muted" }, ` ${series.points.length} point${series.points.length === 1 ? "" : "s"} of ${series.step_s} s`)),
    h("div", { class: "plots", id: "plots" }, PLOTS.map(([key, title, unit]) => lineChart(series.points,
      { key, title, unit, since: since.getTime(), until: until.getTime() }))),
    h("h2", {}, "Status reports"),
    table(["deployment", "bundle", "state", "error", "detail", "at"], d.history.slice(-20).reverse().map((r) => [
      r.deployment_id, `${r.bundle_name} v${r.bundle_version}`, state(r.state), r.error_code ?? "", r.detail,
      when(r.received_at)]), { id: "history" }));
}

function bar(counts, size) {
  const b = h("div", { class: "bar", title: COUNT_KEYS.map((k) => `${k} ${counts[k] ?? 0}`).join(", ") });
  for (const k of COUNT_KEYS) {
    const n = counts[k] ?? 0;
    if (!n || !size) continue;
    const seg = h("span", { class: `seg-${k}`, "data-count": n });
    seg.style.width = `${Math.min(100, (100 * n) / size)}%`; // CSSOM, which the CSP allows (no style attribute)
    b.append(seg);
  }
  return b;
}

const total = (counts) => COUNT_KEYS.reduce((a, k) => a + (counts[k] ?? 0), 0);
const pct = (x) => `${(100 * x).toFixed(0)}%`;

async function rolloutsTable(onlyLive = false) {
  if (features && !features.rollouts) return h("p", { id: "no-rollouts", class: "muted" }, "no rollouts");
  let list;
  try {
    list = (await api("/api/v1/rollouts")).rollouts;
  } catch (e) {
    if (e instanceof NotFound) return h("p", { id: "no-rollouts", class: "muted" }, "no rollouts");
    throw e;
  }
  if (onlyLive) list = list.filter((r) => r.state === "running" || r.state === "paused");
  if (!list.length) return h("p", { id: "no-rollouts", class: "muted" }, onlyLive ? "no rollout running" : "no rollouts");
  return table(["rollout", "state", "bundle", "target", "progress", "updated"], list.map((r) => [
    h("a", { href: `#/rollouts/${encodeURIComponent(r.id)}` }, r.id), state(r.state),
    `${r.bundle.name} v${r.bundle.version}`, target(r.target), bar(r.counts, total(r.counts)),
    when(r.updated_at)]), { id: "rollout-table" });
}

function target(t) {
  if (!t) return "";
  if (t.group) return `group ${t.group}`;
  if (t.query) return `query ${t.query}`;
  return Object.entries(t).map(([k, v]) => `${k} ${v}`).join(", ");
}

function gateText(r) {
  const parts = [];
  const s = r.strategy || {};
  if (s.success_threshold !== undefined) parts.push(`a wave succeeds at ${pct(s.success_threshold)} succeeded`);
  if (s.error_threshold !== undefined) parts.push(`aborts at ${pct(s.error_threshold)} failed`);
  const g = r.gate || {};
  for (const [metric, min] of Object.entries(g.min || {})) parts.push(`${metric} at least ${fmt(min)}`);
  if (g.no_regression) parts.push("no regression against the bundle it replaces");
  return parts.length ? `Gate: ${parts.join("; ")}.` : "";
}

function scoreText(score, r) {
  if (!score) return "no score yet";
  const min = ((r.gate || {}).min || {})[score.metric];
  const gate = min === undefined ? "" : ` (gate ${fmt(min)}: ${score.min >= min ? "met" : "missed"})`;
  return `${score.metric} mean ${fmt(score.mean)}, min ${fmt(score.min)}, n=${score.n}${gate}`;
}

async function rolloutPage(id) {
  if (!ID_RE.test(id)) return h("p", { class: "error" }, "That is not a rollout id.");
  const r = await api(`/api/v1/rollouts/${encodeURIComponent(id)}`);
  const s = r.strategy || {};
  const rows = r.waves.map((w) => {
    const bad = BAD_KEYS.reduce((a, k) => a + (w.counts[k] ?? 0), 0);
    const done = w.counts.succeeded ?? 0;
    const share = w.size ? done / w.size : 0;
    const errors = w.size ? bad / w.size : 0;
    return [w.name || `wave ${w.index}`, state(w.state), w.size, bar(w.counts, w.size),
      COUNT_KEYS.filter((k) => w.counts[k]).map((k) => `${k} ${w.counts[k]}`).join(", ") || "nothing sent yet",
      `${pct(share)} succeeded${s.success_threshold !== undefined ? ` (needs ${pct(s.success_threshold)})` : ""}; ` +
        `${pct(errors)} failed${s.error_threshold !== undefined ? ` (aborts at ${pct(s.error_threshold)})` : ""}`,
      scoreText(w.score, r)];
  });
  return h("div", { id: "rollout", "data-rollout": r.id }, h("h1", {}, `Rollout ${r.id}`),
    h("p", {}, state(r.state), ` ${r.bundle.name} v${r.bundle.version} to ${target(r.target)}`,
      r.reason ? ` - ${r.reason}` : ""),
    h("p", { class: "muted" }, gateText(r)),
    bar(r.counts, total(r.counts)),
    h("h2", {}, "Waves"),
    table(["wave", "state", "devices", "progress", "counts", "thresholds", "measured score"], rows, { id: "waves" }),
    h("p", { class: "muted legend" }, COUNT_KEYS.map((k) => h("span", { class: `state-${k}` }, k))));
}

async function rolloutsPage() {
  return h("div", { id: "rollouts" }, h("h1", {}, "Rollouts"), await rolloutsTable(false));
}

// ---- routing, sign-in, refresh ------------------------------------------------------------------------------

function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").map((p) => { try { return decodeURIComponent(p); } catch { return ""; } });
  if (parts[0] === "devices" && parts[1]) return () => devicePage(parts[1]);
  if (parts[0] === "devices") return devicesPage;
  if (parts[0] === "rollouts" && parts[1]) return () => rolloutPage(parts[1]);
  if (parts[0] === "rollouts") return rolloutsPage;
  return overviewPage;
}

function showLogin(message = "") {
  $("nav").hidden = true;
  $("view").replaceChildren();
  $("error").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message;
  $("login-error").hidden = !message;
  $("token").focus();
}

async function render() {
  if (!token()) return showLogin();
  $("login").hidden = true;
  $("nav").hidden = false;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("current", a.getAttribute("href") === (location.hash || "#/"));
  const mine = ++generation;
  try {
    if (features === null && route() !== overviewPage) {
      const o = await api("/api/v1/overview");
      features = { rollouts: o.rollouts_api };
    }
    const page = await route()();
    if (mine !== generation) return;
    if ($("range") && document.activeElement === $("range")) return; // the user is choosing a window: wait
    $("view").replaceChildren(page);
    $("error").hidden = true;
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    if (mine !== generation) return;
    if (e instanceof Unauthorized) return showLogin("The fleet refused that token; paste a valid API token (viewer or above).");
    $("error").textContent = e instanceof NotFound ? "Not found: the fleet does not know that." : `Could not load: ${e.message}`;
    $("error").hidden = false;
    if (e instanceof NotFound) $("view").replaceChildren();
  }
}

function start() {
  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = $("token").value.trim();
    if (!t) return;
    sessionStorage.setItem(TOKEN_KEY, t);
    $("token").value = "";
    render();
  });
  $("logout").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); features = null; showLogin(); });
  window.addEventListener("hashchange", render);
  setInterval(() => { if (token() && !document.hidden) render(); }, REFRESH_MS);
  render();
}

start();
