// Candela admin console: plain DOM, no build step, nothing loaded from elsewhere.
// Every read and change goes through /admin/v1 with the signed-in key, so the admin API's
// roles and audit trail apply; this page holds no data of its own.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const KEY = "candela.console.key";
const COLORS = ["#d9822b", "#3b6fb6", "#2e8540", "#9c4dcc", "#c53030", "#148f8f", "#7a6a00", "#596273"];

const state = {
  me: null, users: new Map(), grantUser: null, pending: null, keyPending: null, audit: [], auditNext: null,
};

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.code = body && body.error;
  }
}

async function api(path, options) {
  const key = sessionStorage.getItem(KEY);
  const headers = Object.assign({ Accept: "application/json" }, (options && options.headers) || {});
  if (key) headers.Authorization = `Bearer ${key}`;
  const r = await fetch(path, Object.assign({}, options, { headers }));
  let body = null;
  try { body = await r.json(); } catch (_) { /* not JSON: keep null */ }
  if (!r.ok) throw new ApiError(r.status, body);
  return body;
}

function usd(v) {
  if (v === null || v === undefined) return "–";
  if (v >= 0.01 || v <= 0) return `$${v.toFixed(2)}`;
  return `$${v.toFixed(Math.min(10, 1 - Math.floor(Math.log10(v))))}`;
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) {
    if (c instanceof Node) {
      const td = document.createElement("td");
      td.appendChild(c);
      tr.appendChild(td);
    } else if (Array.isArray(c)) {
      tr.appendChild(el("td", c[0], c[1]));
    } else {
      tr.appendChild(el("td", c));
    }
  }
  return tr;
}

function say(id, text, ok) {
  const m = $(id);
  m.textContent = text;
  m.className = "msg " + (ok ? "ok" : "bad");
}

function fill(tbodyOf, rows) {
  const tb = $(tbodyOf).querySelector("tbody");
  tb.replaceChildren(...rows);
}

// UTC days, oldest first: the ledger counts spend per UTC day.
function lastDays(n) {
  const out = [];
  const today = new Date();
  for (let i = n - 1; i >= 0; i--) {
    const d = new Date(Date.UTC(today.getUTCFullYear(), today.getUTCMonth(), today.getUTCDate() - i));
    out.push(d.toISOString().slice(0, 10));
  }
  return out;
}

function isAdmin() { return state.me && state.me.role === "admin"; }
// admins, and tenant admins for their tenants: they act for other users (keys, grants)
function isManager() { return state.me && (state.me.role === "admin" || state.me.role === "tenant_admin"); }

// -- sign in ----------------------------------------------------------------------------------

async function signIn(key) {
  sessionStorage.setItem(KEY, key);
  try {
    state.me = await api("/admin/v1/me");
  } catch (e) {
    sessionStorage.removeItem(KEY);
    throw e;
  }
  $("signin").hidden = true;
  $("app").hidden = false;
  $("signout").hidden = false;
  $("who").textContent = `Signed in as ${state.me.user_id} (${state.me.role}).`;
  for (const n of document.querySelectorAll("[data-admin]")) n.hidden = !isAdmin();
  for (const n of document.querySelectorAll("[data-manager]")) n.hidden = !isManager();
  if (!isManager()) $("spend-by").value = "model";
  if (state.me.role === "tenant_admin") {
    // the API scopes every answer to these tenants; the page says so
    $("tenant-view").textContent = `Tenant view: ${(state.me.tenants || []).join(", ") || "no tenants"}. ` +
      "Users, spend, leaderboard, grants, keys and audit entries are limited to these tenants.";
    $("tenant-view").hidden = false;
  }
  await refresh();
}

function signOut() {
  sessionStorage.removeItem(KEY);
  location.reload();
}

async function refresh() {
  if (isManager()) await loadTenants();
  const jobs = [loadMe(), loadSpend(), loadKeys(), loadPolicy()];
  if (isManager()) jobs.push(loadLeaderboard(), loadUsers(), loadAudit(false));
  await Promise.all(jobs);
}

// -- my budget --------------------------------------------------------------------------------

async function loadMe() {
  const me = state.me = await api("/admin/v1/me");
  $("me-spent").textContent = usd(me.spent_today_usd);
  $("me-budget").textContent = usd(me.daily_budget_usd);
  $("me-remaining").textContent = usd(me.remaining_usd);
  $("me-resets").textContent = me.resets_at || "–";
  $("me-user").textContent = me.user_id;
  $("me-role").textContent = me.role;
  $("me-tenants").textContent = (me.tenants || []).join(", ") || "–";
  const grants = me.grants || [];
  $("me-grants").textContent = grants.length
    ? grants.map((g) => `${usd(g.remaining_usd)} until ${g.expires_at}`).join("; ")
    : "none";
  $("me-meter").value = me.daily_budget_usd > 0 ? Math.min(1, me.spent_today_usd / me.daily_budget_usd) : 0;
}

// -- spend over time --------------------------------------------------------------------------

function tenantParam() {
  const t = isManager() ? $("spend-tenant").value : "";
  return t ? `&tenant=${encodeURIComponent(t)}` : "";
}

// The tenants that spent in the last 30 days, for the tenant view (kept when still listed); for
// a tenant admin the API answers only its own.
async function loadTenants() {
  const lb = await api(`/admin/v1/leaderboard?by=tenant&since=${lastDays(30)[0]}&limit=100`);
  const sel = $("spend-tenant");
  const keep = sel.value;
  const names = lb.rows.map((r) => r.key).filter((k) => k);
  sel.replaceChildren(el("option", "all tenants"), ...names.map((n) => el("option", n)));
  sel.options[0].value = "";
  sel.value = names.includes(keep) ? keep : "";
}

// One call per day: the API sums a range, so a day is a range of one. A tenant narrows the
// per-model view (the usage route filters by tenant; the leaderboard does not).
async function spendSeries(by, days) {
  const per = await Promise.all(days.map(async (day) => {
    const q = `since=${day}&until=${day}`;
    if (by === "model") {
      const u = await api(`/admin/v1/usage?${q}${tenantParam()}`);
      return u.models.map((m) => [m.model, m.spend_usd, m.requests]);
    }
    const lb = await api(`/admin/v1/leaderboard?by=${by}&${q}&limit=100`);
    return lb.rows.map((r) => [r.key || "(none)", r.spend_usd, r.requests]);
  }));
  const series = new Map();
  per.forEach((rows, i) => {
    for (const [key, spend] of rows) {
      if (!series.has(key)) series.set(key, days.map(() => 0));
      series.get(key)[i] += spend;
    }
  });
  return series;
}

async function loadSpend() {
  const by = $("spend-by").value;
  if (by !== "model") $("spend-tenant").value = "";
  $("spend-tenant").disabled = by !== "model";
  const days = lastDays(Number($("spend-days").value));
  try {
    const series = await spendSeries(by, days);
    drawChart(days, series, by);
    $("spend-msg").textContent = "";
    await loadModels(days);
  } catch (e) {
    say("spend-msg", e.message, false);
  }
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

// Stacked bars: one column per day, one segment per key (largest spenders first).
function drawChart(days, series, by) {
  const chart = $("chart");
  const W = 640, H = 220, L = 48, B = 24, T = 8;
  const keys = [...series.keys()].sort(
    (a, b) => series.get(b).reduce((x, y) => x + y, 0) - series.get(a).reduce((x, y) => x + y, 0));
  const totals = days.map((_, i) => keys.reduce((s, k) => s + series.get(k)[i], 0));
  const max = Math.max(...totals, 0);
  const top = max > 0 ? max * 1.1 : 1;
  const nodes = [];
  for (let g = 0; g <= 4; g++) {
    const y = T + (H - B - T) * (1 - g / 4);
    nodes.push(svg("line", { x1: L, x2: W, y1: y, y2: y, class: "axis" }));
    nodes.push(svg("text", { x: L - 4, y: y + 3, "text-anchor": "end" }, usd(top * g / 4)));
  }
  const slot = (W - L) / days.length;
  const barW = Math.max(2, slot * 0.7);
  days.forEach((day, i) => {
    const x = L + i * slot + (slot - barW) / 2;
    let y = H - B;
    keys.forEach((key, k) => {
      const v = series.get(key)[i];
      if (v <= 0) return;
      const h = (H - B - T) * (v / top);
      y -= h;
      const r = svg("rect", {
        x: x.toFixed(1), y: y.toFixed(1), width: barW.toFixed(1), height: Math.max(h, 0.5).toFixed(1),
        fill: COLORS[k % COLORS.length], class: "bar", "data-key": key, "data-day": day, "data-usd": v,
      });
      r.appendChild(svg("title", {}, `${day} · ${key}: ${usd(v)}`));
      nodes.push(r);
    });
    if (days.length <= 14 || i % Math.ceil(days.length / 10) === 0) {
      nodes.push(svg("text", { x: L + i * slot + slot / 2, y: H - 8, "text-anchor": "middle" }, day.slice(5)));
    }
  });
  chart.replaceChildren(...nodes);
  chart.setAttribute("aria-label", `Spend per day by ${by}`);
  chart.dataset.total = totals.reduce((a, b) => a + b, 0);
  $("legend").replaceChildren(...keys.map((key, k) => {
    const s = el("span", `${key} ${usd(series.get(key).reduce((a, b) => a + b, 0))}`);
    s.style.setProperty("--swatch", COLORS[k % COLORS.length]);
    return s;
  }));
}

async function loadModels(days) {
  const u = await api(`/admin/v1/usage?since=${days[0]}&until=${days[days.length - 1]}${tenantParam()}`);
  const t = tenantParam() ? ` · ${$("spend-tenant").value}` : "";
  $("models-range").textContent = `${days[0]} – ${days[days.length - 1]}${t}`;
  fill("models", u.models.map((m) => row([
    m.model, m.provider || "–", [m.requests, "num"], [m.tokens_in, "num"], [m.tokens_out, "num"],
    [usd(m.spend_usd), "num"],
  ])));
}

// -- leaderboard ------------------------------------------------------------------------------

async function loadLeaderboard() {
  const since = $("lb-since").value || lastDays(30)[0];
  $("lb-since").value = since;
  const lb = await api(`/admin/v1/leaderboard?by=${$("lb-by").value}&since=${since}&limit=50`);
  fill("leaderboard", lb.rows.map((r) => row([
    [r.rank, "num"], r.key || "(none)", [r.requests, "num"], [usd(r.spend_usd), "num"],
  ])));
}

// -- users, budgets, grants -------------------------------------------------------------------

async function loadUsers() {
  const u = await api("/admin/v1/users");
  $("users-day").textContent = `(${u.day})`;
  state.users = new Map(u.users.map((x) => [x.user_id, x]));
  fill("users", u.users.map((x) => {
    const m = document.createElement("meter");
    m.min = 0; m.max = 1; m.low = 0.7; m.high = 0.9; m.optimum = 0;
    m.value = x.daily_budget_usd > 0 ? Math.min(1, x.spent_today_usd / x.daily_budget_usd) : 0;
    m.title = x.daily_budget_usd > 0
      ? `${Math.round(100 * x.spent_today_usd / x.daily_budget_usd)}% of the daily budget` : "no budget";
    const pick = el("button", "Select", "secondary");
    pick.addEventListener("click", () => pickUser(x.user_id));
    const tr = row([
      x.user_id, x.role, (x.tenants || []).join(", ") || "–", [usd(x.daily_budget_usd), "num"],
      [usd(x.spent_today_usd), "num"], m, [x.requests_per_minute ?? "–", "num"], pick,
    ]);
    tr.dataset.user = x.user_id;
    if (x.user_id === state.grantUser) tr.classList.add("picked");
    return tr;
  }));
}

async function pickUser(user) {
  state.grantUser = user;
  for (const tr of $("users").querySelectorAll("tbody tr")) {
    tr.classList.toggle("picked", tr.dataset.user === user);
  }
  $("grants-user").textContent = `for ${user}`;
  const x = state.users.get(user);
  if (x) {
    $("u-id").value = x.user_id;
    $("u-role").value = x.role;
    $("u-tenants").value = (x.tenants || []).join(", ");
    $("u-budget").value = x.daily_budget_usd ?? "";
    $("u-rpm").value = x.requests_per_minute ?? "";
  }
  $("grant-create").disabled = false;
  $("grant-confirm").hidden = true;
  await loadGrants();
}

async function loadGrants() {
  const user = state.grantUser;
  const g = await api(`/admin/v1/users/${encodeURIComponent(user)}/grants`);
  fill("grants", g.grants.map((x) => {
    const tr = row([
      x.id, [usd(x.amount_usd), "num"], [usd(x.remaining_usd), "num"],
      x.expires_at + (x.expired ? " (expired)" : ""), x.reason, x.actor,
    ]);
    tr.dataset.grant = x.id;
    return tr;
  }));
}

function grantDraft() {
  const amount = Number($("grant-amount").value);
  const day = $("grant-expires").value;
  const reason = $("grant-reason").value.trim();
  if (!(amount > 0) || !day || !reason) return null;
  return { amount_usd: amount, expires_at: `${day}T00:00:00Z`, reason };
}

function askGrant(ev) {
  ev.preventDefault();
  const draft = grantDraft();
  if (!draft || !state.grantUser) {
    say("grant-msg", "Amount, expiry day and reason are all needed.", false);
    return;
  }
  $("grant-summary").textContent =
    `Grant ${usd(draft.amount_usd)} to ${state.grantUser} until ${draft.expires_at} ` +
    `("${draft.reason}")? This is written to the audit log.`;
  $("grant-confirm").hidden = false;
  $("grant-msg").textContent = "";
}

async function confirmGrant() {
  const draft = grantDraft();
  $("grant-confirm").hidden = true;
  if (!draft) return;
  try {
    const g = await api(`/admin/v1/users/${encodeURIComponent(state.grantUser)}/grants`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(draft),
    });
    say("grant-msg", `Created ${g.id}.`, true);
    $("grant-form").reset();
    await Promise.all([loadGrants(), loadMe(), loadAudit(false)]);
  } catch (e) {
    say("grant-msg", e.code ? `${e.code}: ${e.message}` : e.message, false);
  }
}

// A change to a user: shown, confirmed, then sent (PUT or DELETE); the API audits it.
function userDraft() {
  const body = { role: $("u-role").value };
  body.tenants = $("u-tenants").value.split(",").map((t) => t.trim()).filter((t) => t);
  if ($("u-budget").value !== "") body.daily_budget_usd = Number($("u-budget").value);
  if ($("u-rpm").value !== "") body.requests_per_minute = Number($("u-rpm").value);
  return body;
}

function askUser(remove) {
  const user = $("u-id").value.trim();
  if (!user) {
    say("user-msg", "Name the user first.", false);
    return;
  }
  const path = `/admin/v1/users/${encodeURIComponent(user)}`;
  if (remove) {
    state.pending = { method: "DELETE", path, done: `Removed ${user}.` };
    $("user-summary").textContent =
      `Remove ${user}? Their audit entries and spend history stay. This is written to the audit log.`;
  } else {
    const body = userDraft();
    const known = state.users.has(user);
    state.pending = { method: "PUT", path, body, done: `${known ? "Changed" : "Added"} ${user}.` };
    $("user-summary").textContent =
      `${known ? "Change" : "Add"} ${user}: ${body.role}, tenants ${body.tenants.join(", ") || "none"}, ` +
      `daily budget ${"daily_budget_usd" in body ? usd(body.daily_budget_usd) : "unchanged"}, ` +
      `${"requests_per_minute" in body ? body.requests_per_minute : "unchanged"} requests/min? ` +
      "This is written to the audit log.";
  }
  $("user-confirm").hidden = false;
  $("user-msg").textContent = "";
}

async function confirmUser() {
  const p = state.pending;
  state.pending = null;
  $("user-confirm").hidden = true;
  if (!p) return;
  try {
    const opts = { method: p.method };
    if (p.body) {
      opts.headers = { "Content-Type": "application/json" };
      opts.body = JSON.stringify(p.body);
    }
    await api(p.path, opts);
    say("user-msg", p.done, true);
    await Promise.all([loadUsers(), loadAudit(false), loadPolicy()]);
  } catch (e) {
    say("user-msg", e.code ? `${e.code}: ${e.message}` : e.message, false);
  }
}

// -- API keys ---------------------------------------------------------------------------------
// Listed, created, rotated and revoked through /admin/v1/keys: an admin sees every key, a
// developer only their own (the API filters; this page only asks). A new key is shown once.

function keyDay(t) { return t ? t.slice(0, 16).replace("T", " ") : "–"; }

async function loadKeys() {
  const k = await api("/admin/v1/keys");
  const whose = state.me.role === "tenant_admin" ? "yours and your developers'" : "every user";
  $("keys-scope").textContent = k.user_id ? `(${k.user_id})` : `(${k.count}, ${whose})`;
  fill("keys", k.keys.map((x) => {
    const cells = [
      x.id, x.user_id, x.name || "–", x.fingerprint, el("span", x.state, `pill ${x.state}`),
      keyDay(x.created_at), keyDay(x.expires_at || x.revoked_at),
    ];
    const actions = document.createElement("span");
    if (x.state === "active") {
      const rot = el("button", "Rotate…", "secondary");
      rot.dataset.act = "rotate";
      rot.addEventListener("click", () => askKey("rotate", x));
      const rev = el("button", "Revoke…", "secondary");
      rev.dataset.act = "revoke";
      rev.addEventListener("click", () => askKey("revoke", x));
      actions.append(rot, rev);
    }
    const tr = row([...cells, actions]);
    tr.dataset.key = x.id;
    return tr;
  }));
}

function showSecret(secret, what) {
  $("key-secret").textContent = secret;
  $("key-new").hidden = false;
  say("key-msg", what, true);
}

function hideSecret() {
  $("key-secret").textContent = "";
  $("key-new").hidden = true;
}

async function copySecret() {
  const text = $("key-secret").textContent;
  try {
    await navigator.clipboard.writeText(text);
    say("key-msg", "Copied to the clipboard.", true);
  } catch (_) {
    // no clipboard permission (an insecure origin): select it for Ctrl+C instead
    const r = document.createRange();
    r.selectNodeContents($("key-secret"));
    const sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(r);
    say("key-msg", "Selected: press Ctrl+C (or Cmd+C) to copy it.", true);
  }
}

async function createKey(ev) {
  ev.preventDefault();
  const body = {};
  const user = isManager() ? $("k-user").value.trim() : "";
  if (user) body.user_id = user;
  if ($("k-name").value.trim()) body.name = $("k-name").value.trim();
  if ($("k-expires").value) body.expires_at = `${$("k-expires").value}T00:00:00Z`;
  hideSecret();
  try {
    const k = await api("/admin/v1/keys", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    $("key-form").reset();
    showSecret(k.key, `Created ${k.id} for ${k.user_id}.`);
    await Promise.all([loadKeys(), isManager() ? loadAudit(false) : null]);
  } catch (e) {
    say("key-msg", e.code ? `${e.code}: ${e.message}` : e.message, false);
  }
}

function askKey(kind, k) {
  state.keyPending = { kind, id: k.id };
  $("key-summary").textContent = kind === "revoke"
    ? `Revoke ${k.id} (${k.name || "no name"}, ${k.user_id})? It is refused at once, everywhere. ` +
      "This is written to the audit log."
    : `Rotate ${k.id} (${k.name || "no name"}, ${k.user_id})? A new key replaces it; the old one ` +
      "keeps working for one more hour. This is written to the audit log.";
  $("key-confirm").hidden = false;
  $("key-msg").textContent = "";
}

async function confirmKey() {
  const p = state.keyPending;
  state.keyPending = null;
  $("key-confirm").hidden = true;
  if (!p) return;
  const path = `/admin/v1/keys/${encodeURIComponent(p.id)}`;
  hideSecret();
  try {
    if (p.kind === "revoke") {
      await api(path, { method: "DELETE" });
      say("key-msg", `Revoked ${p.id}.`, true);
    } else {
      const k = await api(`${path}/rotate`, {
        method: "POST", headers: { "Content-Type": "application/json" }, body: "{}",
      });
      showSecret(k.key, `Rotated ${p.id}: the new key is ${k.id}; the old one ends ${keyDay(k.replaces.expires_at)}.`);
    }
    await Promise.all([loadKeys(), isManager() ? loadAudit(false) : null]);
  } catch (e) {
    say("key-msg", e.code ? `${e.code}: ${e.message}` : e.message, false);
  }
}

// -- the policy in force (read-only) ---------------------------------------------------------

function limit(v) { return v === null || v === undefined ? "–" : String(v); }
function tokenLimits(x, prefix) {
  return ["input", "output", "total"].map((k) => limit(x[`${prefix}${k}_tokens_per_minute`])).join(" · ");
}

async function loadPolicy() {
  try {
    const p = await api("/admin/v1/policy");
    $("policy-scope").textContent = {
      all: "(every tenant and user)", tenants: "(your tenants)", self: "(yours)",
    }[p.scope] || "";
    const b = p.budgets, r = p.rate_limits;
    const kv = [
      ["Default budget", `${usd(b.default_budget_usd)} per ${b.period} period (${b.time_zone})`],
      ["Default rate", `${r.default_requests_per_minute} requests/min, ${limit(r.default_max_concurrent_requests)} concurrent, ` +
        `tokens/min ${tokenLimits(r, "default_")}`],
      ["Unpriced models", p.models.unknown_model_price === "deny" ? "refused (402)" : "counted at $0"],
      ["Max output tokens", String(b.default_max_output_tokens)],
    ];
    $("policy-defaults").replaceChildren(...kv.flatMap(([k, v]) => [el("dt", k), el("dd", v)]));
    const models = [["every request (global)", p.models.global], ...p.models.tenants.map((t) => [t.tenant_id, t])];
    fill("policy-models", models.map(([who, m]) => {
      const tr = row([
        who, el("span", m.mode, "pill"), m.entries.length ? m.entries.join(", ") : (m.mode === "none" ? "every model" : "none"),
        m.scope === "tenant" ? "the tenant's own list" : "the global list",
      ]);
      tr.dataset.policy = who;
      return tr;
    }));
    fill("policy-tenants", p.tenants.map((t) => {
      const tr = row([
        t.tenant_id, [t.budget_usd === null ? "none" : usd(t.budget_usd), "num"], t.period,
        [usd(t.spent_usd), "num"], [t.remaining_usd === null ? "–" : usd(t.remaining_usd), "num"],
        t.resets_at, [tokenLimits(t, ""), "num"],
      ]);
      tr.dataset.tenant = t.tenant_id;
      return tr;
    }));
    fill("policy-users", p.users.map((u) => {
      const tr = row([
        u.user_id, u.role, u.tenants.join(", ") || "–", [usd(u.daily_budget_usd), "num"], u.budget_period,
        [u.requests_per_minute, "num"], [limit(u.max_concurrent_requests), "num"], [tokenLimits(u, ""), "num"],
      ]);
      tr.dataset.user = u.user_id;
      return tr;
    }));
    $("policy-msg").textContent = "";
  } catch (e) {
    say("policy-msg", e.message, false);
  }
}

// -- audit ------------------------------------------------------------------------------------

function auditQuery(older) {
  const q = new URLSearchParams();
  for (const [id, name] of [["audit-action", "action"], ["audit-user", "user"], ["audit-since", "since"]]) {
    const v = $(id).value.trim();
    if (v) q.set(name, v);
  }
  q.set("limit", $("audit-limit").value);
  if (older && state.auditNext) q.set("before_seq", state.auditNext);
  return q.toString();
}

async function loadAudit(older) {
  try {
    const a = await api(`/admin/v1/audit?${auditQuery(older)}`);
    state.audit = older ? state.audit.concat(a.entries) : a.entries;
    state.auditNext = a.next_before_seq;
    fill("audit", state.audit.map((e) => {
      const tr = row([
        [e.seq, "num"], e.ts, e.action, e.user_id || "–", e.tenant_id || "–",
        [JSON.stringify(e.fields), "details"],
      ]);
      tr.dataset.seq = e.seq;
      return tr;
    }));
    $("audit-older").disabled = !state.auditNext;
    $("audit-csv").disabled = state.audit.length === 0;
    $("audit-msg").textContent = `${state.audit.length} entries`;
    $("audit-msg").className = "msg";
  } catch (e) {
    say("audit-msg", e.message, false);
  }
}

function csvCell(v) {
  const s = v === null || v === undefined ? "" : typeof v === "string" ? v : JSON.stringify(v);
  return /[",\r\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

function auditCsv(entries) {
  const cols = ["seq", "ts", "action", "user_id", "tenant_id", "fields", "prev_hash", "hash"];
  return [cols.join(","), ...entries.map((e) => cols.map((c) => csvCell(e[c])).join(","))].join("\r\n") + "\r\n";
}

function exportCsv() {
  const blob = new Blob([auditCsv(state.audit)], { type: "text/csv" });
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = `candela-audit-${new Date().toISOString().slice(0, 19).replace(/:/g, "")}.csv`;
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

// -- wiring -----------------------------------------------------------------------------------

function guard(fn, msgId) {
  return async (...args) => {
    try { await fn(...args); } catch (e) { if (msgId) say(msgId, e.message, false); }
  };
}

document.addEventListener("DOMContentLoaded", () => {
  $("signin-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      await signIn($("key").value.trim());
      $("key").value = "";
    } catch (e) {
      say("signin-msg", e.status === 401 ? "That key is not valid here." : e.message, false);
    }
  });
  $("signout").addEventListener("click", signOut);
  $("spend-by").addEventListener("change", loadSpend);
  $("spend-days").addEventListener("change", loadSpend);
  $("spend-tenant").addEventListener("change", loadSpend);
  $("lb-by").addEventListener("change", guard(loadLeaderboard, "spend-msg"));
  $("lb-since").addEventListener("change", guard(loadLeaderboard, "spend-msg"));
  $("grant-form").addEventListener("submit", askGrant);
  $("grant-yes").addEventListener("click", confirmGrant);
  $("grant-no").addEventListener("click", () => { $("grant-confirm").hidden = true; });
  $("user-form").addEventListener("submit", (ev) => { ev.preventDefault(); askUser(false); });
  $("u-remove").addEventListener("click", () => askUser(true));
  $("user-yes").addEventListener("click", confirmUser);
  $("user-no").addEventListener("click", () => { state.pending = null; $("user-confirm").hidden = true; });
  $("audit-form").addEventListener("submit", (ev) => { ev.preventDefault(); loadAudit(false); });
  $("audit-older").addEventListener("click", () => loadAudit(true));
  $("audit-csv").addEventListener("click", exportCsv);
  $("key-form").addEventListener("submit", createKey);
  $("key-yes").addEventListener("click", confirmKey);
  $("key-no").addEventListener("click", () => { state.keyPending = null; $("key-confirm").hidden = true; });
  $("key-copy").addEventListener("click", copySecret);
  $("key-done").addEventListener("click", () => { hideSecret(); $("key-msg").textContent = ""; });
  const key = sessionStorage.getItem(KEY);
  if (key) signIn(key).catch(() => { $("signin").hidden = false; });
});
