"""The operator's page (``GET /``): the latest decisions with their overlays, flagged parts first.

A static page (it holds no data, so it needs no key); its script polls ``/v1/decisions`` every second
and fetches each overlay once. With API keys on, it asks for a key and keeps it in the tab's
``sessionStorage`` only. No external script, font or style: the page works on an isolated line network.
"""

from __future__ import annotations

REFRESH_MS = 1000

OPERATOR_PAGE = (
    """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>spotdiff inspection</title>
<style>
body { font-family: system-ui, sans-serif; margin: 0; background: #f4f4f4; color: #111; }
header { display: flex; gap: 2em; align-items: baseline; padding: .6em 1em; background: #222; color: #fff; }
header h1 { font-size: 1.3em; margin: 0; }
#status { font-size: 1.1em; }
#key { display: none; padding: 1em; background: #fff3cd; }
#grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 12px; padding: 12px; }
.card { background: #fff; border: 6px solid #2e7d32; border-radius: 6px; padding: 6px; }
.card.anomalous { border-color: #c62828; }
.card.error { border-color: #ef6c00; }
.verdict { font-size: 1.6em; font-weight: 700; text-transform: uppercase; }
.anomalous .verdict { color: #c62828; } .normal .verdict { color: #2e7d32; } .error .verdict { color: #ef6c00; }
.card img { width: 100%; image-rendering: pixelated; display: block; margin-top: 4px; }
.meta { font-size: .85em; color: #444; word-break: break-all; }
</style></head>
<body>
<header><h1>spotdiff inspection</h1><span id="status">connecting&hellip;</span></header>
<div id="key"><label>API key: <input id="keyinput" type="password" size="40"></label>
<button id="keysave">use key</button> <span id="keymsg"></span></div>
<main id="grid"></main>
<script>
"use strict";
const grid = document.getElementById("grid"), statusEl = document.getElementById("status");
const overlays = new Map();  // request_id -> object URL, fetched once
function headers() {
  const key = sessionStorage.getItem("spotdiff-key");
  return key ? {"Authorization": "Bearer " + key} : {};
}
document.getElementById("keysave").onclick = () => {
  sessionStorage.setItem("spotdiff-key", document.getElementById("keyinput").value.trim());
  refresh();
};
async function overlayUrl(item) {
  if (!item.overlay_url) return null;
  if (!overlays.has(item.request_id)) {
    const r = await fetch(item.overlay_url, {headers: headers()});
    overlays.set(item.request_id, r.ok ? URL.createObjectURL(await r.blob()) : null);
  }
  return overlays.get(item.request_id);
}
function text(tag, cls, value) {
  const el = document.createElement(tag); el.className = cls; el.textContent = value; return el;
}
async function card(item) {
  const outcome = item.decision === "anomalous" ? "anomalous" : item.decision === "normal" ? "normal" : "error";
  const el = document.createElement("div");
  el.className = "card " + outcome; el.dataset.decision = item.decision; el.dataset.requestId = item.request_id;
  el.appendChild(text("div", "verdict", outcome === "error" ? "error" : item.decision));
  const score = item.score === null ? "no score" :
    "score " + item.score.toPrecision(4) + " (T " + item.threshold.toPrecision(4) + ")" +
    (item.normalized_score === null ? "" : ", normalised " + item.normalized_score.toFixed(3)) +
    (item.normal_percentile === null ? "" :
     ", above " + (100 * item.normal_percentile).toFixed(1) + " % of normal images");
  el.appendChild(text("div", "meta", item.model + " | " + score));
  el.appendChild(text("div", "meta", item.time + (item.error ? " | " + item.error : "")));
  const url = await overlayUrl(item);
  if (url) { const img = document.createElement("img"); img.src = url; img.alt = "overlay " + item.request_id;
             el.appendChild(img); }
  return el;
}
async function refresh() {
  try {
    const r = await fetch("/v1/decisions?limit=24", {headers: headers()});
    if (r.status === 401) {
      document.getElementById("key").style.display = "block";
      statusEl.textContent = "API key needed"; return;
    }
    document.getElementById("key").style.display = "none";
    const data = await r.json();
    const shown = new Set(data.decisions.map(d => d.request_id));
    for (const [id, url] of overlays) if (!shown.has(id)) { if (url) URL.revokeObjectURL(url); overlays.delete(id); }
    const cards = await Promise.all(data.decisions.map(card));
    grid.replaceChildren(...cards);
    statusEl.textContent = data.flagged + " flagged | " + data.shown + " shown | updated " +
      new Date().toLocaleTimeString();
    statusEl.dataset.state = "live";
  } catch (e) {
    statusEl.textContent = "service unreachable (" + e + ")";
  }
}
refresh();
setInterval(refresh, """
    + str(REFRESH_MS)
    + """);
</script></body></html>
"""
)
