// Ripen's dashboard (docs/dashboard.md): one page over the public API.
// Every view has a hash route. Text from the API reaches the page only as
// text nodes and attribute values, never as markup.
"use strict";

const main = document.getElementById("main");
const alertBox = document.getElementById("alert");
const notice = document.getElementById("notice");
const liveState = document.getElementById("live");

const STEP_KINDS = ["created", "status_changed", "step_started", "step_succeeded", "attempt_failed",
  "retry_scheduled", "step_failed", "step_skipped", "step_requeued", "degraded"];
const FEED_KINDS = ["entity.created", "entity.pending", "entity.ready", "entity.failed",
  "entity.cancelled", "entity.degraded"];
const STATUSES = ["pending", "ready", "failed", "cancelled"];
const SETTLED_STEPS = ["succeeded", "failed", "skipped"];
const SVG_TAGS = new Set(["svg", "g", "rect", "text", "path", "title", "line"]);
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

// ---- DOM and API helpers

/** An element with attributes (on* are listeners) and children (text or nodes). */
function h(tag, attrs, ...kids) {
  const el = SVG_TAGS.has(tag)
    ? document.createElementNS("http://www.w3.org/2000/svg", tag)
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const kid of kids.flat(Infinity)) {
    if (kid == null || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}

function fill(el, ...kids) { el.replaceChildren(); el.append(h("div", null, ...kids)); return el; }
function badge(status) { return h("span", {class: `badge st-${status}`}, status); }
function entityLink(id) { return h("a", {href: `#/entities/${encodeURIComponent(id)}`}, h("code", null, id)); }
function time(t) { return t ? h("time", {datetime: t}, t.replace("T", " ").replace(/\.\d+Z$/, "Z")) : "—"; }
function ms(n) {
  if (n < 10) return `${n.toFixed(1)} ms`;
  if (n < 1000) return `${Math.round(n)} ms`;
  return n % 1000 === 0 ? `${n / 1000} s` : `${(n / 1000).toFixed(n < 10000 ? 2 : 1)} s`;
}
/** Microseconds since 1970 of an RFC 3339 time in UTC, to the microsecond (Date.parse stops at the millisecond). */
function micros(t) {
  const m = /^(.{19})(?:\.(\d+))?Z$/.exec(t || "");
  return m ? Date.parse(m[1] + "Z") * 1000 + Number((m[2] || "").padEnd(6, "0").slice(0, 6)) : NaN;
}
function settled(e) {
  return e.status !== "pending" && e.steps.every(s => SETTLED_STEPS.includes(s.status))
    && !(e.compensation && e.compensation.status === "running");
}

/** The answer's JSON; a refusal throws an Error saying the problem's title and detail. */
async function api(path, init) {
  const opts = Object.assign({headers: Object.assign({accept: "application/json"}, authHeaders())}, init || {});
  if (opts.json !== undefined) {
    opts.body = JSON.stringify(opts.json);
    opts.headers["content-type"] = "application/json";
    opts.method = opts.method || "POST";
  }
  const r = await fetch(path, opts);
  const text = await r.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = null; }
  if (r.status === 401) {
    askKey(apiKey() ? "The server refused the key this tab used." : "This server needs an API key.");
    const e = new Error("an API key is needed");
    e.status = 401;
    throw e;
  }
  if (!r.ok) {
    const e = new Error(body && body.title
      ? (body.detail ? `${body.title}: ${body.detail}` : body.title)
      : `the server answered HTTP ${r.status}`);
    e.status = r.status;
    throw e;
  }
  return body;
}

function say(text) { alertBox.textContent = ""; notice.textContent = text; }
function warn(text) { notice.textContent = ""; alertBox.textContent = text; }

/** Runs `fn` at most once per `gap` ms, after the calls of a burst. */
function throttle(fn, gap) {
  let timer = null, last = 0;
  const t = () => {
    if (timer) return;
    timer = setTimeout(() => { timer = null; last = Date.now(); fn(); }, Math.max(150, last + gap - Date.now()));
  };
  t.cancel = () => { clearTimeout(timer); timer = null; };
  return t;
}

/** An SSE subscription to `url` with a listener per event kind, read with
 *  fetch so that it carries the API key. A stream that ends is opened again
 *  with Last-Event-ID, as a browser's EventSource would; a refused one is
 *  tried again every 5 s. `state` hears "live", "reconnecting" or
 *  "unavailable". */
function subscribe(url, listeners, state) {
  let closed = false, retry = null, lastId = null, control = null;
  const again = (ms) => { if (!closed) retry = setTimeout(open, ms); };
  const dispatch = (block) => {
    let kind = "message", data = [];
    for (const line of block.split("\n")) {
      const colon = line.indexOf(":");
      if (colon === 0) continue;
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") kind = value;
      else if (field === "data") data.push(value);
      else if (field === "id") lastId = value;
    }
    const fn = listeners[kind];
    if (!fn || !data.length) return;
    let parsed = null;
    try { parsed = JSON.parse(data.join("\n")); } catch (_) { return; }
    fn(parsed, {lastEventId: lastId});
  };
  const open = async () => {
    control = new AbortController();
    const headers = Object.assign({accept: "text/event-stream"}, authHeaders());
    if (lastId !== null) headers["last-event-id"] = lastId;
    let r;
    try { r = await fetch(url, {headers, signal: control.signal}); }
    catch (_) { if (!closed) { state("reconnecting"); again(1000); } return; }
    if (r.status === 401) { askKey("The server needs an API key to stream changes."); return; }
    if (!r.ok || !r.body) { state("unavailable"); again(5000); return; }
    state("live");
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, {stream: true}).replace(/\r\n?/g, "\n");
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          dispatch(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
        }
      }
    } catch (_) { /* the connection broke, or the view closed it */ }
    if (!closed) { state("reconnecting"); again(3000); }
  };
  open();
  return { close() { closed = true; clearTimeout(retry); if (control) control.abort(); } };
}

// ---- The API key: kept in this browser tab's session only.

const KEY_SLOT = "ripen.apiKey";
function apiKey() { try { return sessionStorage.getItem(KEY_SLOT); } catch (_) { return null; } }
function authHeaders() { const k = apiKey(); return k ? {authorization: `Bearer ${k}`} : {}; }

/** Shows the key form in place of the view; a key given is kept for the
 *  session and the view is opened again. */
function askKey(why) {
  if (current) current.stop();
  showLive("");
  document.title = "API key · Ripen";
  const input = h("input", {id: "api-key", type: "password", autocomplete: "off", required: true,
    spellcheck: "false", "aria-describedby": "api-key-why"});
  const form = h("form", {id: "key-form", class: "key-form", onsubmit: (e) => {
    e.preventDefault();
    const k = input.value.trim();
    if (!k) return;
    try { sessionStorage.setItem(KEY_SLOT, k); } catch (_) { /* private mode: asked again next time */ }
    showKey();
    route(true);
  }},
    h("label", {for: "api-key"}, "API key"), input,
    h("button", {type: "submit"}, "Use this key"));
  fill(main, h("h1", null, "An API key is needed"),
    h("p", {id: "api-key-why"}, why, " It is kept in this tab only, until the tab is closed."), form);
  input.focus();
}

function showKey() {
  const slot = document.getElementById("key-state");
  if (!slot) return;
  slot.replaceChildren();
  if (apiKey()) {
    slot.append(h("button", {type: "button", id: "forget-key", onclick: () => {
      try { sessionStorage.removeItem(KEY_SLOT); } catch (_) { /* nothing kept */ }
      showKey();
      route(true);
    }}, "Forget key"));
  }
}

function showLive(s) {
  liveState.textContent = {live: "● live", reconnecting: "reconnecting…", unavailable: "live updates unavailable"}[s] || "";
}

// ---- The router

let current = null;

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/";
  const q = raw.indexOf("?");
  return q < 0 ? {path: raw, params: new URLSearchParams()}
    : {path: raw.slice(0, q), params: new URLSearchParams(raw.slice(q + 1))};
}

function route(focus) {
  if (current) current.stop();
  alertBox.textContent = ""; notice.textContent = ""; showLive("");
  const {path, params} = parseHash();
  for (const a of document.querySelectorAll("[data-nav]")) {
    const here = a.dataset.nav === path || (a.dataset.nav === "/entities" && path.startsWith("/entities/"));
    if (here) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  const view = {alive: true, cleanups: [], stop() { this.alive = false; this.cleanups.forEach(f => f()); }};
  current = view;
  const m = path.match(/^\/entities\/([^/]+)$/);
  if (path === "/") overview(view);
  else if (path === "/entities") entityList(view, params);
  else if (m) entityPage(view, decodeURIComponent(m[1]));
  else if (path === "/types") typesPage(view);
  else { document.title = "Not found · Ripen"; fill(main, h("h1", null, "No such view"), h("p", null, "Try the ", h("a", {href: "#/"}, "overview"), ".")); }
  if (focus) main.focus();
}

window.addEventListener("hashchange", () => route(true));
document.getElementById("skip").addEventListener("click", () => main.focus());

// ---- Overview

function overview(view) {
  document.title = "Overview · Ripen";
  const countsBox = h("div", {"aria-live": "polite"}, h("p", {class: "muted"}, "Counting…"));
  const ratesBox = h("div", null);
  const log = h("ul", {class: "log", role: "log", "aria-label": "Recent status changes"},
    h("li", {class: "muted"}, "Status changes appear here as they happen."));
  fill(main,
    h("h1", null, "Overview"),
    h("div", {class: "grid"},
      h("section", {"aria-labelledby": "h-counts"}, h("h2", {id: "h-counts"}, "Entities by type and status"), countsBox),
      h("section", {"aria-labelledby": "h-rates"}, h("h2", {id: "h-rates"}, "Intake and ready rates"), ratesBox)),
    h("section", {"aria-labelledby": "h-log"}, h("h2", {id: "h-log"}, "Recent status changes"), log));
  // The counts are the last ones read plus the status changes heard since
  // they were counted: `heard` keeps the changes of the last minute.
  let stats = null, countedAt = 0, heard = [];

  const draw = () => {
    const rows = stats.types.map(t => {
      const total = STATUSES.reduce((n, s) => n + t.counts[s], 0);
      return h("tr", {"data-type": t.type},
        h("th", {scope: "row", "data-label": "type"}, h("a", {href: `#/entities?type=${encodeURIComponent(t.type)}`}, t.type)),
        STATUSES.map(s => h("td", {class: "num", "data-label": s, "data-status": s},
          h("a", {href: `#/entities?type=${encodeURIComponent(t.type)}&status=${s}`, "aria-label": `${t.counts[s]} ${s} ${t.type}`}, t.counts[s]))),
        h("td", {class: "num", "data-label": "total"}, total));
    });
    const sum = s => stats.types.reduce((n, t) => n + t.counts[s], 0);
    fill(countsBox,
      h("table", {class: "cards", id: "counts"},
        h("thead", null, h("tr", null, h("th", {scope: "col"}, "type"),
          STATUSES.map(s => h("th", {scope: "col", class: "num"}, s)), h("th", {scope: "col", class: "num"}, "total"))),
        h("tbody", null, rows)),
      h("p", {class: "muted", id: "counts-summary"}, STATUSES.map(s => `${sum(s)} ${s}`).join(", ")));
    const r = stats.rates;
    if (!r) {
      // The node's rates cover every tenant: only the default tenant sees them.
      fill(ratesBox, h("p", {class: "muted", id: "rates-summary"}, "This node's rates are shown to the default tenant only."));
      return;
    }
    const total = a => a.reduce((x, y) => x + y, 0);
    const minutes = Math.round(r.bucket_seconds * r.created.length / 60);
    fill(ratesBox,
      bars("created", r.created, r.bucket_seconds), bars("ready", r.ready, r.bucket_seconds),
      h("p", {id: "rates-summary"}, `Last ${minutes} minutes on this node: ${total(r.created)} created, ${total(r.ready)} ready. `,
        `Last ${r.bucket_seconds} s: ${r.created[r.created.length - 1]} created, ${r.ready[r.ready.length - 1]} ready.`));
  };

  const refresh = async () => {
    try {
      const s = await api("/v1/stats");
      if (!view.alive) return;
      stats = s; countedAt = micros(s.counted_at) || Date.now() * 1000;
      heard = heard.filter(ev => ev.at > Date.now() * 1000 - 60e6);
      for (const ev of heard) if (ev.at > countedAt) move(ev, false);
      draw();
      // Counts older than the last change heard are read again.
      if (heard.length && heard[heard.length - 1].at > countedAt) soon();
    } catch (e) { if (view.alive) fill(countsBox, h("p", null, `The counts could not be read: ${e.message}`)); }
  };
  const soon = throttle(refresh, 3000);
  view.cleanups.push(soon.cancel);

  // A status change moves one entity between two counts until the next
  // count corrects whatever this page could not see.
  const moves = {"entity.created": [null, "pending"], "entity.pending": ["failed", "pending"],
    "entity.ready": ["pending", "ready"], "entity.failed": ["pending", "failed"], "entity.cancelled": ["pending", "cancelled"]};
  const move = (ev, rates) => {
    if (!moves[ev.kind]) return;
    let t = stats.types.find(x => x.type === ev.type);
    if (!t) { t = {type: ev.type, counts: {pending: 0, ready: 0, failed: 0, cancelled: 0}}; stats.types.push(t); }
    const [from, to] = moves[ev.kind];
    if (from && t.counts[from] > 0) t.counts[from] -= 1;
    t.counts[to] += 1;
    // The rates are read fresh with every count; only a change heard after
    // that is added to the bucket in progress.
    if (!rates || !stats.rates) return;
    const last = stats.rates.created.length - 1;
    if (ev.kind === "entity.created") stats.rates.created[last] += 1;
    if (ev.kind === "entity.ready") stats.rates.ready[last] += 1;
  };
  const onEvent = (ev) => {
    const d = ev.data || {};
    const change = {kind: ev.type, type: d.type, at: micros(ev.timestamp)};
    heard.push(change);
    if (heard.length > 5000) heard.shift();
    if (stats && change.at > countedAt) { move(change, true); draw(); }
    if (log.firstChild && log.firstChild.classList.contains("muted")) log.firstChild.remove();
    log.prepend(h("li", null, time(ev.timestamp), " ", entityLink(d.id || ""), " ",
      h("span", null, d.type || ""), " ", badge(ev.type === "entity.degraded" ? "degraded" : (d.status || ev.type.replace("entity.", "")))));
    while (log.children.length > 30) log.lastChild.remove();
    soon();
  };
  const listeners = {};
  for (const k of FEED_KINDS) listeners[k] = onEvent;
  listeners.lagged = () => soon();
  let polling = null;
  const sub = subscribe("/v1/events", listeners, s => {
    showLive(s);
    // Without the stream, the counts are read again now and then instead.
    if (s === "unavailable" && !polling) polling = setInterval(refresh, 10000);
    if (s === "live" && polling) { clearInterval(polling); polling = null; }
  });
  view.cleanups.push(() => { sub.close(); clearInterval(polling); });
  refresh();
}

/** A bar per bucket, oldest first, with a title per bar and a text summary around it. */
function bars(kind, values, seconds) {
  const w = 300, hgt = 60, n = values.length, max = Math.max(1, ...values), bw = w / n;
  return h("figure", {class: "rate"},
    h("figcaption", null, `${kind} per ${seconds} s (peak ${Math.max(0, ...values)})`),
    h("svg", {class: "bars", viewBox: `0 0 ${w} ${hgt}`, preserveAspectRatio: "none", role: "img",
      "aria-label": `${kind} per ${seconds} seconds, oldest first: ${values.join(", ")}`, "data-kind": kind},
      h("line", {class: "axis", x1: 0, y1: hgt - 0.5, x2: w, y2: hgt - 0.5}),
      values.map((v, i) => {
        const bh = v === 0 ? 0 : Math.max(2, (v / max) * (hgt - 4));
        return h("rect", {class: kind, x: (i * bw + 1).toFixed(1), y: (hgt - bh).toFixed(1), width: Math.max(1, bw - 2).toFixed(1), height: bh.toFixed(1)},
          h("title", null, `${v} ${kind}, ${(n - 1 - i) * seconds} s ago`));
      })));
}

// ---- The entity list

/** Cursors of the pages before this one, per filter, for "Newer". */
const pageTrail = {filters: "", cursors: []};
const LIST_PARAMS = ["type", "status", "degraded", "created_after", "created_before", "q", "limit"];

function entityList(view, params) {
  document.title = "Entities · Ripen";
  const p = Object.fromEntries(LIST_PARAMS.map(k => [k, params.get(k) || ""]));
  const after = params.get("after") || "";
  const filtersKey = LIST_PARAMS.map(k => p[k]).join("\u0001");
  if (pageTrail.filters !== filtersKey) { pageTrail.filters = filtersKey; pageTrail.cursors = []; }
  if (!after) pageTrail.cursors = [];
  const limit = Math.min(1000, Math.max(1, parseInt(p.limit, 10) || 20));

  const typeSelect = h("select", {name: "type", id: "f-type"}, h("option", {value: ""}, "any"));
  const opt = (value, label, sel) => h("option", {value, selected: sel === value}, label);
  const localInput = (name, v) => h("input", {type: "datetime-local", step: 1, name, id: `f-${name}`, value: v ? toLocal(v) : ""});
  const form = h("form", {class: "filters", role: "search", "aria-label": "Filter entities"},
    h("label", {for: "f-type"}, "type", typeSelect),
    h("label", {for: "f-status"}, "status", h("select", {name: "status", id: "f-status"},
      opt("", "any", p.status), STATUSES.map(s => opt(s, s, p.status)))),
    h("label", {for: "f-degraded"}, "degraded", h("select", {name: "degraded", id: "f-degraded"},
      opt("", "any", p.degraded), opt("true", "degraded only", p.degraded), opt("false", "not degraded", p.degraded))),
    h("label", {for: "f-created_after"}, "created after", localInput("created_after", p.created_after)),
    h("label", {for: "f-created_before"}, "created before", localInput("created_before", p.created_before)),
    h("label", {for: "f-q"}, "id or idempotency key", h("input", {type: "search", name: "q", id: "f-q", value: p.q, autocomplete: "off"})),
    h("button", {type: "submit", class: "primary"}, "Apply"),
    h("a", {href: "#/entities"}, "Clear"));
  form.addEventListener("submit", ev => {
    ev.preventDefault();
    const f = new FormData(form), out = new URLSearchParams();
    for (const k of ["type", "status", "degraded", "q"]) if (f.get(k)) out.set(k, String(f.get(k)).trim());
    for (const k of ["created_after", "created_before"]) {
      const d = f.get(k) ? new Date(String(f.get(k))) : null;
      if (d && !isNaN(d)) out.set(k, d.toISOString());
    }
    if (p.limit) out.set("limit", p.limit);
    const next = `#/entities${out.toString() ? "?" + out : ""}`;
    if (location.hash === next) route(false); else location.hash = next;
  });

  const results = h("div", {id: "results", "aria-live": "polite"}, h("p", {class: "muted"}, "Loading…"));
  const bulk = h("div", {class: "actions"});
  fill(main, h("h1", null, "Entities"), h("section", null, form), bulk, h("section", {"aria-label": "Results"}, results));

  api("/v1/types").then(t => {
    for (const item of t.items) typeSelect.append(opt(item.type, item.type, p.type));
    if (p.type && !t.items.some(i => i.type === p.type)) typeSelect.append(opt(p.type, p.type, p.type));
    view.types = t.items.map(i => i.type);
  }).catch(() => { if (p.type) typeSelect.append(opt(p.type, p.type, p.type)); });

  const query = extra => {
    const q = new URLSearchParams();
    for (const k of ["type", "status", "degraded", "created_after", "created_before"]) if (p[k]) q.set(k, p[k]);
    for (const [k, v] of Object.entries(extra)) q.set(k, v);
    return `/v1/entities?${q}`;
  };

  const load = async () => {
    let items = [], next = null, note = null;
    try {
      if (p.q && UUID.test(p.q)) {
        note = `The entity with id ${p.q}:`;
        try { items = [await api(`/v1/entities/${encodeURIComponent(p.q)}`)]; } catch (e) { if (e.status !== 404) throw e; }
      } else if (p.q) {
        let types = p.type ? [p.type] : view.types;
        if (!types) types = (await api("/v1/types")).items.map(i => i.type);
        note = `Entities created with the idempotency key “${p.q}”${p.type ? ` (type ${p.type})` : ""}:`;
        const pages = await Promise.all(types.map(t => api(query({type: t, key: p.q, limit: 1}))));
        items = pages.flatMap(pg => pg.items);
      } else {
        const page = await api(query(Object.assign({limit: String(limit)}, after ? {after} : {})));
        items = page.items; next = page.next;
      }
    } catch (e) {
      if (view.alive) fill(results, h("p", null, `The list could not be read: ${e.message}`));
      return;
    }
    if (!view.alive) return;
    const rows = items.map(e => h("tr", {"data-id": e.id},
      h("td", {"data-label": "id"}, entityLink(e.id)),
      h("td", {"data-label": "type"}, e.type),
      h("td", {"data-label": "status"}, badge(e.status), e.degraded ? [" ", badge("degraded")] : null),
      h("td", {"data-label": "steps"}, `${e.steps.filter(s => s.status === "succeeded").length}/${e.steps.length} succeeded`),
      h("td", {"data-label": "created"}, time(e.created_at))));
    const pager = h("nav", {class: "pager", "aria-label": "Pages"});
    if (after) {
      pager.append(h("button", {type: "button", id: "newer", onclick: () => {
        const prev = pageTrail.cursors.pop();
        go(prev ? {after: prev} : {});
      }}, pageTrail.cursors.length ? "← Newer" : "← Newest"));
    }
    if (next) {
      pager.append(h("button", {type: "button", id: "older", onclick: () => {
        if (after) pageTrail.cursors.push(after);
        go({after: next});
      }}, "Older →"));
    }
    fill(results,
      note ? h("p", null, note) : null,
      items.length === 0 ? h("p", {id: "empty"}, "No entity matches.") :
        h("table", {class: "cards", id: "entities"},
          h("caption", null, `${items.length} entit${items.length === 1 ? "y" : "ies"}${after ? ", older page" : ", newest first"}`),
          h("thead", null, h("tr", null, ["id", "type", "status", "steps", "created"].map(c => h("th", {scope: "col"}, c)))),
          h("tbody", null, rows)),
      pager);
  };
  const go = extra => {
    const q = new URLSearchParams();
    for (const k of LIST_PARAMS) if (p[k]) q.set(k, p[k]);
    if (extra.after) q.set("after", extra.after);
    location.hash = `#/entities?${q}`;
  };

  if (p.status === "failed" && !p.q) {
    bulk.append(h("button", {type: "button", class: "danger", id: "bulk-retry", onclick: ev => bulkRetry(ev.target, query, view, load)},
      "Retry every failed entity of this filter (up to 1,000)"));
  }

  const reload = throttle(load, 2000);
  view.cleanups.push(reload.cancel);
  const listeners = {};
  for (const k of FEED_KINDS) listeners[k] = () => reload();
  const sub = subscribe("/v1/events", listeners, showLive);
  view.cleanups.push(() => sub.close());
  load();
}

/** Retries the failed entities the filter selects: their ids, read with the filter, per type. */
async function bulkRetry(button, query, view, reload) {
  button.disabled = true;
  try {
    const page = await api(query({status: "failed", limit: "1000"}));
    const byType = {};
    for (const e of page.items) (byType[e.type] = byType[e.type] || []).push(e.id);
    let requeued = 0;
    for (const [type, ids] of Object.entries(byType)) {
      requeued += (await api("/v1/entities:retry", {json: {type, ids}})).requeued;
    }
    if (view.alive) {
      say(`Retry accepted: ${requeued} of ${page.items.length} failed entit${page.items.length === 1 ? "y" : "ies"} re-queued.`);
      reload();
    }
  } catch (e) {
    if (view.alive) warn(`The bulk retry was refused: ${e.message}`);
  } finally {
    button.disabled = false;
  }
}

/** An RFC 3339 time as the value of a datetime-local input (local time). */
function toLocal(t) {
  const d = new Date(t);
  if (isNaN(d)) return "";
  const pad = n => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

// ---- One entity

function entityPage(view, id) {
  document.title = `Entity ${id} · Ripen`;
  const head = h("div", null, h("p", {class: "muted"}, "Loading…"));
  const actions = h("div", {class: "actions", id: "actions"});
  const pipeline = h("section", {"aria-labelledby": "h-pipeline"});
  const timeline = h("section", {"aria-labelledby": "h-timeline"});
  const history = h("section", {"aria-labelledby": "h-history"});
  const data = h("section", {"aria-labelledby": "h-data"});
  fill(main, h("h1", null, "Entity ", h("code", {class: "mono"}, id)), head, actions, pipeline, timeline, history, data);
  let entity = null, shownStatus = null, stream = null;
  const events = new Map();
  let historyError = null;

  const drawAll = () => {
    drawHead(head, entity);
    if (shownStatus !== entity.status) {
      shownStatus = entity.status;
      drawActions();
      drawData();
    }
    drawPipeline(pipeline, entity);
    const list = [...events.values()].sort((a, b) => a.seq - b.seq);
    drawTimeline(timeline, entity, list, historyError);
    drawHistory(history, list, historyError);
  };

  const fetchEntity = async () => {
    try {
      const e = await api(`/v1/entities/${encodeURIComponent(id)}`);
      if (!view.alive) return;
      entity = e;
      drawAll();
      if (stream && settled(entity)) { stream.close(); stream = null; showLive(""); }
    } catch (e) {
      if (!view.alive) return;
      if (e.status === 404) fill(head, h("p", {id: "missing"}, `No entity has the id ${id}.`));
      else fill(head, h("p", null, `The entity could not be read: ${e.message}`));
    }
  };
  const refresh = throttle(fetchEntity, 250);
  view.cleanups.push(refresh.cancel);

  const follow = () => {
    if (stream) stream.close();
    const listeners = {};
    for (const k of STEP_KINDS) listeners[k] = ev => { events.set(ev.seq, ev); refresh(); };
    stream = subscribe(`/v1/entities/${encodeURIComponent(id)}/events`, listeners, showLive);
  };
  view.cleanups.push(() => { if (stream) stream.close(); });

  const act = async (verb, button) => {
    button.disabled = true;
    try {
      const e = await api(`/v1/entities/${encodeURIComponent(id)}/${verb}`, {method: "POST"});
      if (!view.alive) return;
      say(verb === "retry" ? "Retry accepted: the entity is pending again and its failed steps are queued."
        : "Cancel accepted: the entity is cancelled.");
      entity = e; drawAll();
      if (verb === "retry") follow();
    } catch (err) {
      if (!view.alive) return;
      warn(`${verb === "retry" ? "Retry" : "Cancel"} refused: ${err.message}`);
      button.disabled = false;
      fetchEntity();
    }
  };

  const drawActions = () => {
    actions.replaceChildren();
    if (entity.status === "failed") actions.append(h("button", {type: "button", class: "primary", id: "retry", onclick: ev => act("retry", ev.target)}, "Retry failed steps"));
    if (entity.status === "pending") actions.append(h("button", {type: "button", class: "danger", id: "cancel", onclick: ev => act("cancel", ev.target)}, "Cancel entity"));
    if (!actions.children.length) actions.append(h("span", {class: "muted"}, `No action applies to a ${entity.status} entity.`));
  };

  const drawData = async () => {
    fill(data, h("h2", {id: "h-data"}, "Payload and outputs"), h("p", {class: "muted"}, "Loading…"));
    if (entity.status !== "ready") {
      const why = {pending: "it is still pending", failed: "it failed (retry it to run its failed steps again)", cancelled: "it was cancelled"}[entity.status];
      fill(data, h("h2", {id: "h-data"}, "Payload and outputs"), h("p", {id: "data-why"}, `The payload and the step outputs are served once the entity is ready; ${why}.`));
      return;
    }
    try {
      const d = await api(`/v1/entities/${encodeURIComponent(id)}/data`);
      if (!view.alive) return;
      const block = (label, value, open) => h("details", {open}, h("summary", null, label), h("pre", null, JSON.stringify(value, null, 2)));
      fill(data, h("h2", {id: "h-data"}, "Payload and outputs"),
        block("payload", d.payload, true),
        Object.keys(d.outputs).length === 0 ? h("p", {class: "muted"}, "No step returned an output.") :
          Object.entries(d.outputs).map(([step, out]) => block(`output of ${step}`, out, false)));
    } catch (e) {
      if (view.alive) fill(data, h("h2", {id: "h-data"}, "Payload and outputs"), h("p", null, `The data could not be read: ${e.message}`));
    }
  };

  (async () => {
    await fetchEntity();
    if (!entity || !view.alive) return;
    try {
      for (const ev of await api(`/v1/entities/${encodeURIComponent(id)}/events`)) events.set(ev.seq, ev);
    } catch (e) { historyError = e.message; }
    if (!view.alive) return;
    drawAll();
    if (!settled(entity)) follow();
  })();
}

function drawHead(box, e) {
  fill(box, h("section", {"aria-label": "Summary"}, h("dl", {class: "facts"},
    h("dt", null, "status"), h("dd", {id: "status"}, badge(e.status), e.degraded ? [" ", badge("degraded"), ` (${(e.degraded_steps || []).join(", ")} failed)`] : null),
    h("dt", null, "type"), h("dd", null, h("a", {href: `#/entities?type=${encodeURIComponent(e.type)}`}, e.type), ` version ${e.version}`),
    h("dt", null, "created"), h("dd", null, time(e.created_at)),
    h("dt", null, "updated"), h("dd", null, time(e.updated_at)),
    h("dt", null, "ready"), h("dd", null, time(e.ready_at)),
    (e.dependencies || []).length ? [h("dt", null, "depends on"), h("dd", {id: "dependencies"}, e.dependencies.map((d, i) => [i ? ", " : null,
      h("a", {href: `#/entities/${encodeURIComponent(d.entity_id)}`}, `${d.type} ${d.entity_id}`), ` (${d.field}, ${d.status})`]))] : null,
    e.failure ? [h("dt", null, "failure"), h("dd", {id: "failure"}, `${e.failure.cause}: ${e.failure.type} ${e.failure.entity_id} ${e.failure.status}`)] : null,
    e.compensation ? [h("dt", null, "compensation"), h("dd", {id: "compensation"}, badge(e.compensation.status))] : null)));
}

function drawPipeline(box, e) {
  fill(box, h("h2", {id: "h-pipeline"}, "Pipeline"),
    dag(e.steps, s => s.status, s => `${s.name}: ${s.status}${s.critical ? "" : " (non-critical)"}, ${s.attempts} attempt${s.attempts === 1 ? "" : "s"}`),
    h("div", {class: "wide"}, h("table", {class: "cards", id: "steps"},
      h("thead", null, h("tr", null, ["step", "status", "attempts", "runs on", "next attempt", "last error"].map(c => h("th", {scope: "col"}, c)))),
      h("tbody", null, e.steps.map(s => h("tr", {"data-step": s.name},
        h("td", {"data-label": "step"}, s.name, s.critical ? null : h("span", {class: "muted"}, " (non-critical)")),
        h("td", {"data-label": "status"}, badge(s.status), s.reason ? h("div", {class: "muted reason"}, s.reason) : null),
        h("td", {"data-label": "attempts", class: "num"}, s.attempts),
        h("td", {"data-label": "runs on"}, s.executor || "—", s.worker ? ` (${s.worker})` : null),
        h("td", {"data-label": "next attempt"}, time(s.next_attempt_at)),
        h("td", {"data-label": "last error", class: "mono"}, s.last_error || "—")))))),
    e.compensation ? [
      h("h3", {id: "h-compensation"}, `Compensation: ${e.compensation.status}`),
      h("p", {class: "muted"}, "The succeeded steps are undone, the last first."),
      h("div", {class: "wide"}, h("table", {class: "cards", id: "compensation-steps", "aria-labelledby": "h-compensation"},
        h("thead", null, h("tr", null, ["undo", "status", "attempts", "runs on", "next attempt", "last error"].map(c => h("th", {scope: "col"}, c)))),
        h("tbody", null, e.compensation.steps.map(s => h("tr", {"data-step": s.name},
          h("td", {"data-label": "undo"}, s.name),
          h("td", {"data-label": "status"}, badge(s.status)),
          h("td", {"data-label": "attempts", class: "num"}, s.attempts),
          h("td", {"data-label": "runs on"}, s.executor || "—", s.worker ? ` (${s.worker})` : null),
          h("td", {"data-label": "next attempt"}, time(s.next_attempt_at)),
          h("td", {"data-label": "last error", class: "mono"}, s.last_error || "—"))))))] : null);
}

/** Each attempt from the history: when it started, how long it took, how it ended, what came next. */
function attempts(list) {
  const out = [], open = new Map();
  for (const ev of list) {
    const key = `${ev.step}#${ev.attempt}`;
    if (ev.kind === "step_started") {
      const a = {step: ev.step, attempt: ev.attempt, started: ev.at, worker: ev.worker, outcome: "running", error: null, next: null, end: null};
      out.push(a); open.set(key, a);
    } else if (ev.kind === "step_succeeded" && open.has(key)) {
      Object.assign(open.get(key), {outcome: "succeeded", end: ev.at});
    } else if (ev.kind === "attempt_failed" && open.has(key)) {
      Object.assign(open.get(key), {outcome: ev.lost ? `lost (${ev.lost})` : (ev.retryable ? "failed, retryable" : "failed"), error: ev.error, end: ev.at});
    } else if (ev.kind === "retry_scheduled") {
      const prev = open.get(`${ev.step}#${ev.attempt - 1}`);
      if (prev) prev.next = ev.due_at;
    } else if (ev.kind === "step_skipped" || ev.kind === "step_requeued") {
      for (const a of out) if (a.step === ev.step && a.outcome === "running") Object.assign(a, {outcome: "skipped", end: ev.at});
    }
  }
  return out;
}

function drawTimeline(box, e, list, error) {
  const executor = Object.fromEntries(e.steps.map(s => [s.name, s.executor]));
  const rows = attempts(list).map(a => h("tr", {"data-step": a.step, "data-attempt": a.attempt},
    h("td", {"data-label": "step"}, a.step),
    h("td", {"data-label": "attempt", class: "num"}, a.attempt),
    h("td", {"data-label": "started"}, time(a.started)),
    h("td", {"data-label": "duration"}, a.end ? ms((micros(a.end) - micros(a.started)) / 1000) : "running"),
    h("td", {"data-label": "outcome"}, a.outcome),
    h("td", {"data-label": "next retry"}, time(a.next)),
    h("td", {"data-label": "runs on"}, a.worker ? `worker ${a.worker}` : (executor[a.step] || "—")),
    h("td", {"data-label": "error", class: "mono"}, a.error || "—")));
  fill(box, h("h2", {id: "h-timeline"}, "Attempts"),
    error ? h("p", null, `The history could not be read: ${error}`) :
      rows.length === 0 ? h("p", {class: "muted"}, "No attempt has started yet.") :
        h("table", {class: "cards", id: "timeline"},
          h("thead", null, h("tr", null, ["step", "attempt", "started", "duration", "outcome", "next retry", "runs on", "error"].map(c => h("th", {scope: "col"}, c)))),
          h("tbody", null, rows)));
}

function drawHistory(box, list, error) {
  const detail = ev => {
    if (ev.kind === "status_changed") return `${ev.from} → ${ev.to}`;
    if (ev.kind === "attempt_failed") return ev.error;
    if (ev.kind === "retry_scheduled") return `due ${ev.due_at}`;
    if (ev.kind === "step_started") return ev.worker ? `worker ${ev.worker}` : "";
    return "";
  };
  fill(box, h("details", {open: true}, h("summary", {id: "h-history"}, `History (${list.length} events)`),
    error ? h("p", null, `The history could not be read: ${error}`) :
      h("table", {class: "cards", id: "history"},
        h("thead", null, h("tr", null, ["#", "at", "event", "step", "attempt", "detail"].map(c => h("th", {scope: "col"}, c)))),
        h("tbody", null, list.map(ev => h("tr", {"data-kind": ev.kind},
          h("td", {"data-label": "#", class: "num"}, ev.seq),
          h("td", {"data-label": "at"}, time(ev.at)),
          h("td", {"data-label": "event"}, ev.kind),
          h("td", {"data-label": "step"}, ev.step || "—"),
          h("td", {"data-label": "attempt"}, ev.attempt == null ? "—" : ev.attempt),
          h("td", {"data-label": "detail", class: "mono"}, detail(ev) || "—")))))));
}

/** The pipeline as a DAG: layers by `needs`, left to right (top to bottom
 *  on a narrow screen); each node names its step and its status in text. */
function dag(steps, statusOf, describe) {
  const byName = new Map(steps.map((s, i) => [s.name, i]));
  const layer = new Array(steps.length).fill(-1);
  const depth = (i, seen) => {
    if (layer[i] >= 0) return layer[i];
    if (seen.has(i)) return 0;
    seen.add(i);
    const needs = (steps[i].needs || []).map(n => byName.get(n)).filter(n => n !== undefined);
    layer[i] = needs.length ? 1 + Math.max(...needs.map(n => depth(n, seen))) : 0;
    return layer[i];
  };
  steps.forEach((_, i) => depth(i, new Set()));
  const columns = [];
  steps.forEach((s, i) => (columns[layer[i]] = columns[layer[i]] || []).push(i));
  const vertical = main.clientWidth < 600;
  const W = 150, H = 46, GAP_LAYER = vertical ? 34 : 46, GAP = 12;
  const pos = [];
  columns.forEach((col, l) => col.forEach((i, k) => {
    pos[i] = vertical ? {x: k * (W + GAP), y: l * (H + GAP_LAYER)} : {x: l * (W + GAP_LAYER), y: k * (H + GAP)};
  }));
  const width = Math.max(...pos.map(p => p.x)) + W + 2, height = Math.max(...pos.map(p => p.y)) + H + 2;
  const edges = [];
  steps.forEach((s, i) => (s.needs || []).forEach(n => {
    const j = byName.get(n);
    if (j === undefined) return;
    const a = pos[j], b = pos[i];
    const d = vertical
      ? `M${a.x + W / 2},${a.y + H} C${a.x + W / 2},${a.y + H + 20} ${b.x + W / 2},${b.y - 20} ${b.x + W / 2},${b.y}`
      : `M${a.x + W},${a.y + H / 2} C${a.x + W + 24},${a.y + H / 2} ${b.x - 24},${b.y + H / 2} ${b.x},${b.y + H / 2}`;
    edges.push(h("path", {class: "edge", d}));
  }));
  const cut = t => (t.length > 19 ? t.slice(0, 18) + "…" : t);
  const nodes = steps.map((s, i) => {
    const st = statusOf(s) || "none";
    return h("g", {class: `node st-${st}${s.critical === false ? " nc" : ""}`, "data-step": s.name, "data-status": st,
      transform: `translate(${pos[i].x + 1},${pos[i].y + 1})`},
      h("title", null, describe(s)),
      h("rect", {width: W, height: H, rx: 6}),
      h("text", {class: "name", x: 10, y: 19}, cut(s.name)),
      h("text", {class: "status", x: 10, y: 37}, cut(st)));
  });
  return h("div", {class: "wide"}, h("svg", {class: "dag", viewBox: `0 0 ${width} ${height}`, width, height, role: "img",
    "aria-label": `Pipeline of ${steps.length} steps: ${steps.map(describe).join("; ")}`}, edges, nodes));
}

// ---- Types

function typesPage(view) {
  document.title = "Types · Ripen";
  fill(main, h("h1", null, "Entity types"), h("p", {class: "muted"}, "Loading…"));
  api("/v1/types").then(t => {
    if (!view.alive) return;
    fill(main, h("h1", null, "Entity types"),
      t.items.length === 0 ? h("p", null, "No entity type is configured.") :
        t.items.map(type => h("section", {"aria-labelledby": `t-${type.type}`, "data-type": type.type},
          h("h2", {id: `t-${type.type}`}, type.type, h("span", {class: "muted"}, ` version ${type.latest_version}`)),
          h("p", null, h("a", {href: `#/entities?type=${encodeURIComponent(type.type)}`}, `Entities of ${type.type}`)),
          dag(type.steps, s => s.executor, s => `${s.name}: runs on ${s.executor}${s.critical ? "" : ", non-critical"}${s.needs.length ? `, needs ${s.needs.join(", ")}` : ""}`),
          h("div", {class: "wide"}, h("table", {class: "cards"},
            h("thead", null, h("tr", null, ["step", "needs", "runs on", "queue", "critical", "timeout", "attempts"].map(c => h("th", {scope: "col"}, c)))),
            h("tbody", null, type.steps.map(s => h("tr", {"data-step": s.name},
              h("td", {"data-label": "step"}, s.name),
              h("td", {"data-label": "needs"}, s.needs.join(", ") || "—"),
              h("td", {"data-label": "runs on"}, s.executor),
              h("td", {"data-label": "queue"}, s.queue),
              h("td", {"data-label": "critical"}, s.critical ? "yes" : "no"),
              h("td", {"data-label": "timeout", class: "num"}, ms(s.timeout_ms)),
              h("td", {"data-label": "attempts", class: "num"}, s.max_attempts)))))))));
  }).catch(e => { if (view.alive) fill(main, h("h1", null, "Entity types"), h("p", null, `The types could not be read: ${e.message}`)); });
}

showKey();
route(false);
