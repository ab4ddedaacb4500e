// The status page: polls /status.json every two seconds and fills in the page.
"use strict";

const REFRESH_MS = 2000;

function text(id, value) {
  document.getElementById(id).textContent = value;
}

function when(unixSecs) {
  return new Date(unixSecs * 1000).toLocaleString();
}

function show(s) {
  const state = document.getElementById("state");
  state.textContent = s.state;
  state.className = "state " + s.state;
  text("node_id", s.node_id || "(not open yet)");
  text("network", s.network);
  text("connected", (s.connected ? "connected" : "not connected") + " since " + when(s.state_since));
  text("requests_ok", s.requests_ok);
  text("requests_failed", s.requests_failed);
  text("requests_unsent", s.requests_unsent);
  text("last_request", s.last_request_ms == null ? "none yet" : s.last_request_ms.toFixed(2) + " ms");
  text("reconnects", s.reconnects);
  text("lss", s.lss);
  text("started", when(s.started));
  text("last_error", s.last_error ? when(s.last_error.at) + "  " + s.last_error.text : "none");
  text("version", s.version);
  text("updated", new Date().toLocaleTimeString());
}

async function refresh() {
  try {
    const r = await fetch("/status.json", { cache: "no-store" });
    if (!r.ok) throw new Error("HTTP " + r.status);
    show(await r.json());
    document.getElementById("offline").hidden = true;
  } catch (e) {
    document.getElementById("offline").hidden = false;
  }
  setTimeout(refresh, REFRESH_MS);
}

refresh();
