// The broker's status page: GET /v1/status once (the session cookie authorizes it), then live
// updates from /v1/events: `status` events (relay, chain, new requests) and signer events.
"use strict";

const MAX_POINTS = 300;
const SVG = "http://www.w3.org/2000/svg";
let requests = [];
let events = null;
let refetchTimer = null;

function $(id) { return document.getElementById(id); }
function text(id, value) { $(id).textContent = value; }
function when(unixSecs) { return unixSecs == null ? "–" : new Date(unixSecs * 1000).toLocaleString(); }
function ms(us) { return (us / 1000).toFixed(us < 10000 ? 2 : 0) + " ms"; }
function label(name, type) { return name ? name.replace(/^hsmd_/, "") : "type " + type; }

function cell(tr, value, cls) {
  const td = document.createElement("td");
  td.textContent = value;
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

function rows(tableId, items, fill) {
  const body = $(tableId).querySelector("tbody");
  body.replaceChildren();
  for (const it of items) {
    const tr = document.createElement("tr");
    fill(tr, it);
    body.appendChild(tr);
  }
}

function showSigners(s) {
  rows("signers", s.signers, (tr, g) => {
    const id = cell(tr, g.node_id, "mono node-id");
    if (g.pinned) id.title = "pinned";
    const state = g.ready ? "ready" : g.connected ? "connected" : "disconnected";
    const role = g.role && g.role !== "none" ? " · " + g.role + (g.client_id !== g.node_id ? " (" + g.client_id + ")" : "") : "";
    cell(tr, state + role + (g.pinned ? " (pinned)" : ""), "state-" + state);
    cell(tr, when(g.since));
    cell(tr, g.last_error ? g.last_error.text : "none", "mono");
  });
  if (s.signers.length === 0) {
    rows("signers", [0], (tr) => { cell(tr, "no signer has connected yet"); });
  }
}

function showRelay(r) {
  text("requests_total", r.requests_total);
  text("refusals_total", r.refusals_total);
  text("queued", r.queued);
  text("inflight", r.inflight);
  text("signer_active", r.signer_active ? "yes" : "no (requests wait)");
}

function showChain(c) {
  text("chain_phase", c.phase.replace(/_/g, " "));
  text("chain_signer", c.signer_height == null ? "unknown" : c.signer_height);
  text("chain_bitcoind", c.bitcoind_height == null ? "unknown" : c.bitcoind_height);
  text("chain_lag", c.lag == null ? "unknown" : c.lag + " blocks");
  const bar = $("catchup_bar");
  if (c.catch_up) {
    const u = c.catch_up;
    const total = u.target_height - u.from_height;
    bar.max = Math.max(total, 1);
    bar.value = Math.max(total - u.behind, 0);
    text("catchup", u.behind + " blocks behind, " + u.blocks_per_sec.toFixed(1) + " blocks/s" +
      (u.eta_secs == null ? "" : ", about " + u.eta_secs + " s left"));
  } else {
    bar.max = 1;
    bar.value = c.phase === "synced" ? 1 : 0;
    text("catchup", c.phase === "synced" ? "at bitcoind's tip" : "not catching up");
  }
  text("chain_error", c.last_error || "none");
}

function showRefusals(list) {
  rows("refusals", list.slice().reverse(), (tr, f) => {
    cell(tr, when(f.time));
    cell(tr, label(f.name, f.msg_type));
    cell(tr, f.reason);
    cell(tr, f.policy || "–", "mono");
    cell(tr, f.text, "mono");
  });
}

function addRequests(list) {
  const seen = requests.length ? requests[requests.length - 1].id : -1;
  for (const q of list) if (q.id > seen) requests.push(q);
  if (requests.length > MAX_POINTS) requests.splice(0, requests.length - MAX_POINTS);
  rows("requests", requests.slice(-15).reverse(), (tr, q) => {
    cell(tr, new Date(q.time_ms).toLocaleTimeString());
    cell(tr, label(q.name, q.msg_type));
    cell(tr, ms(q.latency_us));
    cell(tr, q.outcome);
  });
  plot();
}

// Latency of each recent request, log scale from 0.1 ms to 10 s, oldest on the left.
function plot() {
  const svg = $("plot");
  svg.replaceChildren();
  const W = 600, H = 200, L = 40, B = 15;
  const y = (us) => {
    const v = Math.log10(Math.min(Math.max(us, 100), 1e7));
    return (H - B) - (v - 2) / 5 * (H - B - 5);
  };
  for (const [us, name] of [[100, "0.1"], [1000, "1"], [10000, "10"], [100000, "100"], [1e6, "1000"], [1e7, "10000"]]) {
    const line = document.createElementNS(SVG, "line");
    line.setAttribute("x1", L); line.setAttribute("x2", W);
    line.setAttribute("y1", y(us)); line.setAttribute("y2", y(us));
    line.setAttribute("class", "axis");
    svg.appendChild(line);
    const t = document.createElementNS(SVG, "text");
    t.setAttribute("x", 2); t.setAttribute("y", y(us) + 3);
    t.textContent = name;
    svg.appendChild(t);
  }
  const n = requests.length;
  requests.forEach((q, i) => {
    const c = document.createElementNS(SVG, "circle");
    c.setAttribute("cx", L + 4 + (n <= 1 ? 0 : i * (W - L - 8) / (MAX_POINTS - 1)));
    c.setAttribute("cy", y(q.latency_us));
    c.setAttribute("r", 2.5);
    c.setAttribute("class", q.outcome);
    const title = document.createElementNS(SVG, "title");
    title.textContent = label(q.name, q.msg_type) + ": " + ms(q.latency_us) + " (" + q.outcome + ")";
    c.appendChild(title);
    svg.appendChild(c);
  });
  svg.setAttribute("data-points", n);
}

function live(on) {
  const b = $("live");
  b.textContent = on ? "live" : "offline";
  b.className = "badge " + (on ? "live" : "offline");
}

function updated() { text("updated", new Date().toLocaleTimeString()); }

async function load() {
  let r;
  try {
    r = await fetch("/v1/status", { cache: "no-store", credentials: "same-origin" });
  } catch (e) {
    live(false);
    setTimeout(load, 3000);
    return;
  }
  if (r.status === 401) {
    if (events) { events.close(); events = null; }
    $("dashboard").hidden = true;
    $("login").hidden = false;
    $("login-failed").hidden = location.hash !== "#login-failed";
    live(false);
    return;
  }
  if (!r.ok) { live(false); setTimeout(load, 3000); return; }
  const s = await r.json();
  $("login").hidden = true;
  $("dashboard").hidden = false;
  if (location.hash) history.replaceState(null, "", "/");
  text("version", s.version);
  showSigners(s);
  showRelay(s.relay);
  showChain(s.chain);
  showRefusals(s.refusals);
  addRequests(s.requests);
  updated();
  if (!events) subscribe();
}

// Signer events change the signers table: fetch the snapshot again (at most every 300 ms).
function refetch() {
  if (refetchTimer) return;
  refetchTimer = setTimeout(() => { refetchTimer = null; load(); }, 300);
}

function subscribe() {
  events = new EventSource("/v1/events");
  events.onopen = () => live(true);
  events.onerror = () => {
    live(false);
    // Closed for good (e.g. the session expired): the snapshot says whether to log in again.
    if (events && events.readyState === EventSource.CLOSED) { events = null; setTimeout(load, 2000); }
  };
  events.addEventListener("status", (e) => {
    const u = JSON.parse(e.data);
    showRelay(u.relay);
    showChain(u.chain);
    if (u.refusals) showRefusals(u.refusals);
    addRequests(u.requests);
    updated();
  });
  for (const name of ["signer-connected", "signer-ready", "signer-disconnected", "signer-error", "lagged"]) {
    events.addEventListener(name, refetch);
  }
}

load();
