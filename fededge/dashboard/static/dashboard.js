// The fededge dashboard: polls /api/state every second and renders it. Text goes in through
// textContent only (device ids and rejection reasons come from devices, not from us).
"use strict";

const POLL_MS = 1000;
const token = new URLSearchParams(location.search).get("token");
const headers = token ? { Authorization: "Bearer " + token } : {};
const charts = { acc: null, accKey: "", bytes: null };

function $(id) { return document.getElementById(id); }

function pct(v) { return v === null || v === undefined ? "—" : (100 * v).toFixed(1) + "%"; }

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i === 0 ? n.toFixed(0) + " B" : n.toFixed(1) + " " + units[i];
}

function duration(s) {
  if (s === null || s === undefined) return "—";
  s = Math.round(s);
  if (s < 60) return s + " s";
  const m = Math.floor(s / 60);
  return m < 60 ? m + " min " + (s % 60) + " s" : Math.floor(m / 60) + " h " + (m % 60) + " min";
}

function ago(at, now) { return at ? duration(Math.max(0, now - at)) + " ago" : "—"; }

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
}

function renderHeader(s) {
  const c = s.config || {};
  const name = c.federation || s.source.federation || "";
  $("title").textContent = [name, c.strategy, c.aggregator].filter(Boolean).join(" · ");
  $("status").textContent = s.status;
  $("status").className = "badge " + s.status;
  $("source").textContent = s.source.kind + " " + s.source.path;
  $("updated").textContent = new Date(s.time * 1000).toLocaleTimeString();
  const p = s.progress;
  if (!p) {
    $("round-label").textContent = s.status === "preparing" ? "preparing data" : "round —";
    $("progress-detail").textContent = "waiting for the server to start";
    return;
  }
  const shown = p.round === null ? p.completed : p.round;
  $("round-label").textContent = "round " + shown + " of " + p.rounds;
  $("bar-fill").style.width = (100 * p.completed / Math.max(1, p.rounds)) + "%";
  $("eta").textContent = p.phase === "finished" ? "done in " + duration(p.elapsed_s)
    : "ETA " + duration(p.eta_s);
  const parts = [p.phase, p.completed + " completed", "elapsed " + duration(p.elapsed_s)];
  if (p.round !== null) {
    parts.push("round " + p.round + (p.attempt > 1 ? " attempt " + p.attempt : "") + ": " +
               p.uploads + " of " + p.expected + " uploads");
  }
  $("progress-detail").textContent = parts.join(" · ");
}

function renderDevices(s) {
  const body = $("devices").querySelector("tbody");
  body.replaceChildren();
  for (const d of s.devices) {
    const row = document.createElement("tr");
    row.dataset.device = d.id;
    cell(row, d.id);
    cell(row, d.profile || "—");
    cell(row, d.student || "—");
    cell(row, d.params === null ? "—" : d.params.toLocaleString("en"), "num");
    cell(row, d.status, d.status);
    cell(row, ago(d.last_seen, s.time));
    cell(row, pct(d.accuracy) + (d.accuracy_round === null ? "" :
              d.accuracy_round === 0 ? " (warm-up)" : " (r" + d.accuracy_round + ")"), "num");
    cell(row, bytes(d.bytes_up), "num");
    cell(row, bytes(d.bytes_down), "num");
    cell(row, String(d.rejected), "num");
    body.appendChild(row);
  }
}

function renderRejections(s) {
  $("rejected-total").textContent = "(" + s.rejected_total + " in all)";
  const body = $("rejections").querySelector("tbody");
  body.replaceChildren();
  if (!s.rejections.length) {
    const row = document.createElement("tr");
    cell(row, "none", "muted");
    body.appendChild(row);
  }
  for (const r of s.rejections) {
    const row = document.createElement("tr");
    cell(row, ago(r.at, s.time));
    cell(row, r.device || r.topic);
    cell(row, r.round === null ? "—" : String(r.round), "num");
    cell(row, r.reason || "", "reason");
    body.appendChild(row);
  }
}

function chartWidth(id) { return Math.max(280, $(id).clientWidth || 520); }

const roundAxis = {
  label: "round (0 = after warm-up)", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000],
  values: (u, splits) => splits.map(v => String(v)),
};

function padded(u, min, max) { return [Math.floor(min) - 0.6, Math.ceil(max) + 0.6]; }

function accuracyChart(s) {
  const rows = s.rounds.filter(r => r.mean_accuracy !== null);
  const ref = s.references;
  const x = rows.map(r => r.round);
  const line = v => x.map(() => v === null ? null : 100 * v);
  const data = [x, rows.map(r => 100 * r.mean_accuracy), rows.map(r => 100 * r.min_accuracy),
                rows.map(r => 100 * r.max_accuracy), line(ref.local_only), line(ref.centralized)];
  const key = [ref.local_only === null, ref.centralized === null].join();
  if (charts.acc && charts.accKey === key) { charts.acc.setData(data); return; }
  if (charts.acc) charts.acc.destroy();
  const series = [
    { label: "round" },
    { label: "mean", stroke: "#2f6fdf", width: 2, points: { show: true, size: 5 } },
    { label: "min", stroke: "rgba(47,111,223,0.35)", width: 1, points: { show: false } },
    { label: "max", stroke: "rgba(47,111,223,0.35)", width: 1, points: { show: false } },
    { label: "local-only" + (ref.local_only === null ? " (not yet known)" : ""),
      stroke: "#e67e22", width: 1.5, dash: [6, 4], show: ref.local_only !== null,
      points: { show: false } },
    { label: "centralized" + (ref.centralized === null ? " (not yet known)" : ""),
      stroke: "#555", width: 1.5, dash: [2, 3], show: ref.centralized !== null,
      points: { show: false } },
  ];
  charts.accKey = key;
  charts.acc = new uPlot({
    width: chartWidth("acc-chart"), height: 260, series, legend: { live: false },
    bands: [{ series: [3, 2], fill: "rgba(47,111,223,0.12)" }],
    scales: { x: { time: false, range: padded },
              y: { range: (u, lo, hi) => [Math.max(0, Math.floor((lo - 5) / 10) * 10), 100] } },
    axes: [roundAxis, { label: "%" }],
  }, data, $("acc-chart"));
}

function trafficChart(s) {
  const rows = s.rounds.filter(r => r.round >= 1);
  const data = [rows.map(r => r.round), rows.map(r => r.bytes_up / 1024),
                rows.map(r => r.bytes_down / 1024)];
  if (charts.bytes) { charts.bytes.setData(data); return; }
  const bars = align => uPlot.paths.bars({ size: [0.4, 40], align });
  charts.bytes = new uPlot({
    width: chartWidth("bytes-chart"), height: 260, legend: { live: false },
    series: [{ label: "round" },
             { label: "up", stroke: "#2f6fdf", fill: "rgba(47,111,223,0.6)", paths: bars(-1),
               points: { show: false } },
             { label: "down", stroke: "#1f8a4c", fill: "rgba(31,138,76,0.6)", paths: bars(1),
               points: { show: false } }],
    scales: { x: { time: false, range: padded }, y: { range: (u, lo, hi) => [0, hi * 1.1 || 1] } },
    axes: [{ ...roundAxis, label: "round" }, { label: "KiB" }],
  }, data, $("bytes-chart"));
}

function render(s) {
  renderHeader(s);
  renderDevices(s);
  renderRejections(s);
  accuracyChart(s);
  trafficChart(s);
}

async function poll() {
  try {
    const response = await fetch("api/state", { headers, cache: "no-store" });
    if (!response.ok) throw new Error(await response.text());
    render(await response.json());
  } catch (err) {
    $("status").textContent = "dashboard unreachable: last state shown";
    $("status").className = "badge offline";
  }
  setTimeout(poll, POLL_MS);
}

poll();
