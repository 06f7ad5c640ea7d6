// Candela local management page: plain DOM, no build step, nothing loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";

async function api(path, options) {
  const r = await fetch(path, options);
  let body = null;
  try { body = await r.json(); } catch (_) { /* not JSON: keep null */ }
  if (!r.ok) {
    throw new Error((body && body.message) || `${r.status} ${r.statusText}`);
  }
  return body;
}

// The management API's writes carry the per-install token this page was served with.
const TOKEN = (document.querySelector('meta[name="candela-local-token"]') || {}).content || "";

function postJSON(path, obj) {
  return fetch(path, {
    method: "POST",
    headers: {
      "Content-Type": "application/json",
      Accept: "application/json",
      "X-Candela-Local-Token": TOKEN,
    },
    body: JSON.stringify(obj || {}),
  });
}

function usd(v) {
  if (v === null || v === undefined) return "–";
  if (v >= 0.01 || v <= 0) return `$${v.toFixed(2)}`;
  // fractions of a cent: two significant digits ($0.0043), never exponent notation
  return `$${v.toFixed(Math.min(10, 1 - Math.floor(Math.log10(v))))}`;
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function say(id, text, ok) {
  const m = $(id);
  m.textContent = text;
  m.className = "msg " + (ok ? "ok" : "bad");
}

// Poll `fn` every `ms`, one call at a time; a failure shows in the header, not the console.
function every(ms, fn) {
  const tick = async () => {
    try {
      await fn();
      setConn(true);
    } catch (e) {
      setConn(false, e.message);
    }
    setTimeout(tick, ms);
  };
  tick();
}

function setConn(ok, why) {
  const c = $("conn");
  c.textContent = ok ? "live" : `offline: ${why || "no answer"}`;
  c.className = "pill " + (ok ? "ok" : "bad");
}

// -- traces --------------------------------------------------------------------------------

const seen = new Set();

async function loadTraces() {
  const data = await api("/_local/api/traces?limit=50");
  const body = $("traces").tBodies[0];
  const rows = [];
  for (const s of data.spans) {
    const tr = el("tr");
    tr.dataset.spanId = s.span_id;
    if (seen.size && !seen.has(s.span_id)) tr.className = "fresh";
    const when = new Date(s.timestamp);
    tr.append(
      el("td", isNaN(when) ? s.timestamp : when.toLocaleTimeString()),
      el("td", s.model || "–", "model"),
      el("td", s.provider || "–"),
      el("td", `${s.input_tokens} / ${s.output_tokens}` + (s.cached_tokens ? ` (${s.cached_tokens} cached)` : ""), "num tokens"),
      el("td", usd(s.cost_usd), "num cost"),
      el("td", `${Math.round(s.duration_ms)} ms`, "num latency"),
    );
    const st = el("td");
    const pill = el("span", s.status, `pill ${s.status}`);
    if (s.error) pill.title = s.error;
    st.append(pill);
    if (s.error) st.append(" ", el("span", s.error, "muted small"));
    tr.append(st);
    rows.push(tr);
  }
  for (const s of data.spans) seen.add(s.span_id);
  if (!seen.size) seen.add("");  // later rows count as new
  body.replaceChildren(...rows);
  $("traces-empty").hidden = data.count > 0;
}

// -- spend ---------------------------------------------------------------------------------

async function loadSpend() {
  const s = await api("/_local/api/spend");
  $("spend-spent").textContent = usd(s.spent_usd);
  $("spend-budget").textContent = usd(s.budget_usd);
  $("spend-remaining").textContent = usd(s.remaining_usd);
  $("spend-user").textContent = s.user;
  $("spend-resets").textContent = new Date(s.resets_at).toLocaleString();
  const m = $("spend-meter");
  m.max = s.budget_usd > 0 ? s.budget_usd : 1;
  m.low = m.max * 0.7;
  m.high = m.max * 0.9;
  m.value = Math.min(s.spent_usd, m.max);
  drawChart(s.hourly_usd);
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function drawChart(hourly) {
  const chart = $("chart");
  const W = 520, H = 170, left = 58, bottom = 20, top = 8;
  const plotW = W - left - 6, plotH = H - bottom - top;
  const max = Math.max(...hourly, 0);
  const scale = max > 0 ? plotH / max : 0;
  const bw = plotW / 24;
  const nowHour = new Date().getUTCHours();
  const parts = [
    svg("line", { x1: left, y1: top + plotH, x2: W - 6, y2: top + plotH, class: "axis" }),
    svg("line", { x1: left, y1: top, x2: left, y2: top + plotH, class: "axis" }),
    svg("text", { x: left - 4, y: top + 8, "text-anchor": "end" }, usd(max)),
    svg("text", { x: left - 4, y: top + plotH, "text-anchor": "end" }, "$0"),
  ];
  hourly.forEach((v, h) => {
    const bh = v * scale;
    const bar = svg("rect", {
      x: (left + h * bw + 1).toFixed(1), y: (top + plotH - bh).toFixed(1),
      width: (bw - 2).toFixed(1), height: bh.toFixed(1),
      class: h === nowHour ? "bar now" : "bar",
    });
    bar.append(svg("title", {}, `${String(h).padStart(2, "0")}:00 UTC: ${usd(v)}`));
    parts.push(bar);
    if (h % 3 === 0) {
      parts.push(svg("text", { x: (left + h * bw + bw / 2).toFixed(1), y: H - 6, "text-anchor": "middle" }, `${h}h`));
    }
  });
  chart.replaceChildren(...parts);
}

// -- runtime and models --------------------------------------------------------------------

async function loadHealth() {
  const h = await api("/_local/api/health");
  $("rt-name").textContent = h.runtime;
  const st = $("rt-status");
  st.textContent = h.reachable ? "running" : "not reachable";
  st.className = "pill " + (h.reachable ? "ok" : "bad");
  $("rt-version").textContent = h.version || "–";
  $("rt-url").textContent = h.base_url || "–";
  // Ollama says which models are in memory (/api/ps); otherwise show the ones it serves
  const inMemory = Array.isArray(h.loaded);
  const names = inMemory ? h.loaded : h.models;
  $("rt-loaded-label").textContent = inMemory ? "In memory" : "Models";
  $("rt-loaded").textContent = names.length ? names.join(", ") : "none";
  const p = h.process;
  $("rt-process").textContent = p.managed
    ? (p.running ? `started by Candela (pid ${p.pid})` : `exited (${p.exit_code})`)
    : (h.reachable ? "started outside Candela" : `not running · start runs: ${p.command.join(" ")}`);
  $("rt-start").disabled = h.reachable;
  $("rt-stop").disabled = !(p.managed && p.running);
}

async function loadModels() {
  const data = await api("/v1/models");
  const local = new Set(["ollama", "lmstudio"]);
  const rows = data.data.map((m) => {
    const tr = el("tr");
    tr.dataset.model = m.id;
    tr.append(el("td", m.id), el("td", m.provider || "–"),
      el("td", local.has(m.provider) ? "local" : "cloud"));
    return tr;
  });
  $("models").tBodies[0].replaceChildren(...rows);
  const n = data.data.filter((m) => local.has(m.provider)).length;
  $("models-count").textContent = `(${n} local, ${data.data.length - n} cloud)`;
}

async function runtimeAction(action) {
  const btn = $(`rt-${action}`);
  btn.disabled = true;
  say("rt-msg", action === "start" ? "starting…" : "stopping…", true);
  try {
    const r = await postJSON(`/_local/api/${action}`, {});
    const body = await r.json();
    if (!r.ok) throw new Error(body.message || r.status);
    const done = action === "start" ? body.started : body.stopped;
    say("rt-msg", done ? `${action === "start" ? "started" : "stopped"}` : (body.reason || "nothing to do"), true);
  } catch (e) {
    say("rt-msg", e.message, false);
  }
  await Promise.allSettled([loadHealth(), loadModels()]);
}

// -- pull ----------------------------------------------------------------------------------

async function pull(ev) {
  ev.preventDefault();
  const model = $("pull-model").value.trim();
  if (!model) return;
  const bar = $("pull-progress"), pct = $("pull-pct"), status = $("pull-status");
  const btn = $("pull-btn");
  btn.disabled = true;
  bar.value = 0;
  pct.textContent = "0%";
  status.textContent = `pulling ${model}…`;
  const layers = new Map();  // digest -> [completed, total]: Ollama reports each layer
  const show = (v) => { bar.value = v; pct.textContent = `${Math.floor(v)}%`; };
  try {
    const r = await postJSON("/_local/api/pull", { model });
    if (!r.ok) {
      let msg = `${r.status}`;
      try { msg = (await r.json()).message || msg; } catch (_) { /* keep status */ }
      throw new Error(msg);
    }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "", last = null;
    for (;;) {
      const { done, value } = await reader.read();
      if (value) buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, i).trim();
        buf = buf.slice(i + 1);
        if (!line) continue;
        const msg = JSON.parse(line);
        last = msg;
        if (msg.error) throw new Error(msg.error);
        if (msg.digest && msg.total) layers.set(msg.digest, [msg.completed || 0, msg.total]);
        let c = 0, t = 0;
        for (const [lc, lt] of layers.values()) { c += lc; t += lt; }
        if (t > 0) show(Math.min(100, (100 * c) / t));
        if (msg.status) status.textContent = msg.status;
        if (msg.status === "success") show(100);
      }
      if (done) break;
    }
    if (!last || last.status !== "success") throw new Error("the pull ended before it succeeded");
    status.textContent = `${model}: pulled`;
    loadModels().catch(() => {});
    loadHealth().catch(() => {});
  } catch (e) {
    status.textContent = `failed: ${e.message}`;
  } finally {
    btn.disabled = false;
  }
}

// -- settings ------------------------------------------------------------------------------

async function loadConfig() {
  const c = await api("/_local/api/config");
  $("cfg-ttl").value = c.cache_ttl_s;
  $("cfg-mult").value = c.gemini_cache_price_multiplier;
}

async function saveConfig(ev) {
  ev.preventDefault();
  const change = {
    cache_ttl_s: Number.parseInt($("cfg-ttl").value, 10),
    gemini_cache_price_multiplier: Number.parseFloat($("cfg-mult").value),
  };
  try {
    const r = await postJSON("/_local/api/config", change);
    const body = await r.json();
    if (!r.ok) throw new Error(body.message || r.status);
    $("cfg-ttl").value = body.cache_ttl_s;
    $("cfg-mult").value = body.gemini_cache_price_multiplier;
    say("cfg-msg", "Saved.", true);
  } catch (e) {
    say("cfg-msg", e.message, false);
  }
}

// -- start ---------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("base-url").textContent = `${location.origin}/v1`;
  $("pull-form").addEventListener("submit", pull);
  $("cfg-form").addEventListener("submit", saveConfig);
  $("rt-start").addEventListener("click", () => runtimeAction("start"));
  $("rt-stop").addEventListener("click", () => runtimeAction("stop"));
  loadConfig().catch((e) => say("cfg-msg", e.message, false));
  every(2000, loadTraces);
  every(5000, loadSpend);
  every(10000, loadHealth);
  every(30000, loadModels);
});
