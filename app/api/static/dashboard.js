// The vkmmu dashboard: plain DOM + SVG, no library, no network beyond this service.
// History comes from the REST API; everything after that from one stream of /v1/events, read
// with fetch (EventSource cannot send the Authorization header a token needs).
"use strict";

const API = "/v1";
const SVGNS = "http://www.w3.org/2000/svg";
const LEVELS = [["4k", 4096, "--c4k"], ["2m", 2 << 20, "--c2m"], ["1g", 1 << 30, "--c1g"]];
const MAX_SAMPLES = 300;
const MAX_LOG = 60;
const POLL_MS = 2000;

const state = {
  vms: new Map(),
  selected: null,
  samples: [],
  zaps: new Map(), // seq -> zap event
  memslots: [],
};

const $ = (id) => document.getElementById(id);
const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();

function svg(tag, attrs, text) {
  const n = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) n.setAttribute(k, v);
  if (text !== undefined) n.textContent = text;
  return n;
}

function html(tag, attrs, text) {
  const n = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) n.setAttribute(k, v);
  if (text !== undefined) n.textContent = text;
  return n;
}

// The bearer token: the `vkmmu_token` cookie (the sign-in prompt sets it), or none when the
// service runs open. The API never reads the cookie itself: the page sends it as a header.
function token() {
  const m = document.cookie.match(/(?:^|;\s*)vkmmu_token=([^;]*)/);
  return m ? decodeURIComponent(m[1]) : null;
}

function withToken(headers) {
  const t = token();
  return t ? { ...headers, authorization: `Bearer ${t}` } : headers;
}

function signIn() {
  const t = window.prompt("vkmmu token (admin or tenant):");
  if (!t) return;
  const secure = location.protocol === "https:" ? "; Secure" : "";
  document.cookie = `vkmmu_token=${encodeURIComponent(t)}; path=/; SameSite=Strict${secure}`;
  location.reload();
}

async function getJSON(url) {
  const r = await fetch(url, { headers: withToken({ accept: "application/json" }) });
  if (r.status === 401) signIn();
  if (!r.ok) throw new Error(`${url}: ${r.status}`);
  return r.json();
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(n >= 100 || i === 0 ? 0 : 1)} ${units[i]}`;
}

const hex = (n) => "0x" + Number(n).toString(16);
// Times arrive as RFC 3339 strings (REST answers and the event stream alike).
const secs = (at) => (typeof at === "number" ? at : Date.parse(at) / 1000);
const clock = (at) => new Date(secs(at) * 1000).toLocaleTimeString();

// ------------------------------------------------------------------ VM list

async function loadVms() {
  let cursor = null;
  state.vms.clear();
  do {
    const q = new URLSearchParams({ limit: "500" });
    if (cursor) q.set("cursor", cursor);
    const page = await getJSON(`${API}/vms?${q}`);
    for (const vm of page.items) state.vms.set(vm.id, vm);
    cursor = page.next_cursor;
  } while (cursor);
  renderVmList();
  if (!state.selected || !state.vms.has(state.selected)) {
    const ids = [...state.vms.keys()].sort();
    if (ids.length) await select(ids[ids.length - 1]);
    else clearView();
  }
}

function renderVmList() {
  const ul = $("vm-list");
  ul.replaceChildren();
  for (const id of [...state.vms.keys()].sort().reverse()) {
    const vm = state.vms.get(id);
    const li = html("li", { "data-vm": id }, vm.name ? `${vm.name} ` : "");
    li.append(id, html("span", { class: "t" }, `${vm.vm_type_name} · ${vm.vcpus} vCPU`));
    if (id === state.selected) li.classList.add("sel");
    li.addEventListener("click", () => select(id));
    ul.append(li);
  }
}

function clearView() {
  state.selected = null;
  $("vm-title").textContent = "no VM";
  for (const id of ["mapped-chart", "counters-chart", "zap-timeline", "memslot-map"]) $(id).replaceChildren();
  for (const id of ["zap-rows", "memslot-rows"]) $(id).replaceChildren();
}

async function select(id) {
  state.selected = id;
  state.samples = [];
  state.zaps = new Map();
  state.memslots = [];
  renderVmList();
  const vm = state.vms.get(id);
  $("vm-title").textContent = `${id} — ${vm ? vm.vm_type_name : ""}`;
  await Promise.all([loadZaps(id), loadMemslots(id), sampleStats()]);
}

// ------------------------------------------------------------------ stats over time

async function sampleStats() {
  const id = state.selected;
  if (!id) return;
  let st;
  try { st = await getJSON(`${API}/vms/${id}/stats`); } catch (e) { return; }
  if (id !== state.selected) return;
  state.samples.push({ t: Date.now() / 1000, st });
  if (state.samples.length > MAX_SAMPLES) state.samples.shift();
  renderMapped();
  renderCounters();
}

function lineChart(target, series, fmt) {
  const el = $(target);
  el.replaceChildren();
  const W = 600, H = 180, L = 64, B = 20, T = 8;
  const pts = state.samples;
  if (!pts.length) return;
  const t0 = pts[0].t, t1 = Math.max(pts[pts.length - 1].t, t0 + 1);
  let max = 1;
  for (const s of series) for (const p of pts) max = Math.max(max, s.value(p.st));
  const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - 6);
  const y = (v) => H - B - (v / max) * (H - B - T);
  for (const f of [0, 0.5, 1]) {
    el.append(svg("line", { x1: L, x2: W, y1: y(max * f), y2: y(max * f), stroke: "#eef0f2" }));
    el.append(svg("text", { x: L - 6, y: y(max * f) + 4, "text-anchor": "end" }, fmt(max * f)));
  }
  el.append(svg("text", { x: L, y: H - 4 }, clock(t0)));
  el.append(svg("text", { x: W - 4, y: H - 4, "text-anchor": "end" }, clock(t1)));
  for (const s of series) {
    const d = pts.map((p, i) => `${i ? "L" : "M"}${x(p.t).toFixed(1)},${y(s.value(p.st)).toFixed(1)}`);
    if (pts.length === 1) d.push(`L${W},${y(s.value(pts[0].st)).toFixed(1)}`);
    el.append(svg("path", { d: d.join(""), fill: "none", stroke: s.color, "stroke-width": 2, "data-series": s.name }));
  }
}

function legend(target, series, last) {
  const el = $(target);
  el.replaceChildren();
  for (const s of series) {
    const span = html("span", { "data-series": s.name });
    const i = html("i");
    i.style.background = s.color;
    span.append(i, `${s.label}: ${last ? s.show(s.value(last.st)) : "–"}`);
    el.append(span);
  }
}

function renderMapped() {
  const series = LEVELS.map(([lv, size, color]) => ({
    name: lv, label: `${lv.toUpperCase()} leaves`, color: css(color),
    value: (st) => (st[`pages_${lv}`] || 0) * size, show: bytes,
  }));
  lineChart("mapped-chart", series, bytes);
  legend("mapped-legend", series, state.samples[state.samples.length - 1]);
}

function renderCounters() {
  const n = (v) => (Number.isInteger(v) ? String(v) : v.toFixed(1));
  const series = [
    { name: "refaults", label: "refaults (4K pages)", color: css("--fast"), value: (st) => st.refaults || 0, show: n },
    { name: "remote_tlb_flush", label: "remote TLB flushes", color: css("--accent"), value: (st) => st.remote_tlb_flush || 0, show: n },
  ];
  lineChart("counters-chart", series, n);
  legend("counters-legend", series, state.samples[state.samples.length - 1]);
}

// ------------------------------------------------------------------ zaps

async function loadZaps(id) {
  const page = await getJSON(`${API}/vms/${id}/zaps?limit=200`);
  if (id !== state.selected) return;
  for (const z of page.items) state.zaps.set(z.seq, z);
  renderZaps();
}

function pathColor(path) {
  if (path === "zap_all_fast") return css("--fast");
  if (path === "zap_slot_leafs") return css("--leafs");
  return css("--other");
}

function renderZaps(fresh) {
  const zaps = [...state.zaps.values()].sort((a, b) => a.seq - b.seq);
  const el = $("zap-timeline");
  el.replaceChildren();
  const W = 1200, H = 120, L = 10, R = 10;
  el.append(svg("line", { x1: L, x2: W - R, y1: 70, y2: 70, stroke: "#c9ced4" }));
  if (zaps.length) {
    const t0 = secs(zaps[0].at), t1 = Math.max(secs(zaps[zaps.length - 1].at), t0 + 1);
    const x = (t) => L + 40 + ((t - t0) / (t1 - t0)) * (W - L - R - 80);
    el.append(svg("text", { x: L, y: H - 4 }, clock(t0)));
    el.append(svg("text", { x: W - R, y: H - 4, "text-anchor": "end" }, clock(t1)));
    for (const z of zaps) {
      const r = 3 + Math.sqrt(z.sptes_zapped_total || 0);
      const c = svg("circle", {
        cx: x(secs(z.at)).toFixed(1), cy: 70, r: Math.min(r, 36).toFixed(1), fill: pathColor(z.path),
        "fill-opacity": 0.55, stroke: pathColor(z.path), "data-seq": z.seq, "data-path": z.path,
      });
      c.append(svg("title", {}, `#${z.seq} ${z.path} (${z.cause}): ${z.sptes_zapped_total} SPTEs, ${z.duration_us} µs`));
      el.append(c);
    }
    const last = zaps[zaps.length - 1];
    el.append(svg("text", { x: W - R, y: 14, "text-anchor": "end" }, `latest: ${last.path} · ${last.cause}`));
  } else {
    el.append(svg("text", { x: W / 2, y: 60, "text-anchor": "middle" }, "no zaps yet"));
  }
  const body = $("zap-rows");
  body.replaceChildren();
  for (const z of zaps.slice().reverse().slice(0, 50)) {
    const s = z.sptes_zapped || {};
    const tr = html("tr", { "data-seq": z.seq, "data-path": z.path });
    if (fresh && fresh.has(z.seq)) tr.classList.add("new");
    const cells = [
      [z.seq, true], [clock(z.at)], [z.path], [z.cause], [z.slot === null ? "–" : `${z.as_id}:${z.slot}`],
      [z.slot_zap_all ? "on" : "off"], [`${s["4k"] || 0}/${s["2m"] || 0}/${s["1g"] || 0}`, true],
      [`${z.duration_us} µs`, true], [z.tlb_flushes, true], [z.vcpu_kicks, true],
    ];
    for (const [v, num] of cells) tr.append(html("td", num ? { class: "num" } : {}, String(v)));
    body.append(tr);
  }
}

// ------------------------------------------------------------------ memslots

async function loadMemslots(id) {
  const items = [];
  let cursor = null;
  do {
    const q = new URLSearchParams({ limit: "500" });
    if (cursor) q.set("cursor", cursor);
    const page = await getJSON(`${API}/vms/${id}/memslots?${q}`);
    items.push(...page.items);
    cursor = page.next_cursor;
  } while (cursor);
  if (id !== state.selected) return;
  state.memslots = items;
  renderMemslots();
}

function renderMemslots() {
  const el = $("memslot-map");
  el.replaceChildren();
  const W = 1200, L = 40, R = 10;
  const slots = state.memslots;
  const end = Math.max(1, ...slots.map((s) => s.guest_phys_addr + s.memory_size));
  const x = (gpa) => L + (gpa / end) * (W - L - R);
  for (const as of [0, 1]) {
    const y = 8 + as * 38;
    el.append(svg("text", { x: 2, y: y + 18 }, `as ${as}`));
    el.append(svg("rect", { x: L, y, width: W - L - R, height: 26, fill: "#f3f4f6" }));
  }
  el.append(svg("text", { x: L, y: 88 }, "0x0"));
  el.append(svg("text", { x: W - R, y: 88, "text-anchor": "end" }, hex(end)));
  for (const s of slots) {
    const priv = (s.flag_names || []).includes("KVM_MEM_GUEST_MEMFD");
    const y = 8 + (s.as_id || 0) * 38;
    const w = Math.max(2, x(s.guest_phys_addr + s.memory_size) - x(s.guest_phys_addr));
    const r = svg("rect", {
      x: x(s.guest_phys_addr).toFixed(1), y, width: w.toFixed(1), height: 26,
      fill: priv ? css("--other") : css("--accent"), "fill-opacity": s.mapped && s.mapped.total ? 0.85 : 0.4,
      "data-slot": s.slot, "data-as": s.as_id || 0,
    });
    r.append(svg("title", {}, `slot ${s.slot}: ${hex(s.guest_phys_addr)}–${hex(s.guest_phys_addr + s.memory_size - 1)}`));
    el.append(r);
    if (w > 24) el.append(svg("text", { x: x(s.guest_phys_addr) + 4, y: y + 17, fill: "#fff" }, `#${s.slot}`));
  }
  const body = $("memslot-rows");
  body.replaceChildren();
  for (const s of slots) {
    const priv = (s.flag_names || []).includes("KVM_MEM_GUEST_MEMFD");
    const tr = html("tr", { "data-slot": s.slot });
    const m = s.mapped || {};
    for (const v of [
      s.as_id || 0, s.slot, `${hex(s.guest_phys_addr)}–${hex(s.guest_phys_addr + s.memory_size - 1)}`,
      bytes(s.memory_size), (s.flag_names || []).join(" | ") || "–",
      priv ? `guest_memfd ${s.guest_memfd} (private-capable)` : "shared (host memory)",
      `${m.shared || 0} / ${m.private || 0}`,
    ]) tr.append(html("td", {}, String(v)));
    body.append(tr);
  }
}

// ------------------------------------------------------------------ live events

function log(ev) {
  const li = html("li", { "data-type": ev.type }, `${clock(ev.at)} ${ev.type} ${ev.vm || ""} ${summary(ev)}`);
  const ol = $("event-log");
  ol.prepend(li);
  while (ol.children.length > MAX_LOG) ol.lastChild.remove();
}

function summary(ev) {
  const d = ev.data || {};
  switch (ev.type) {
    case "zap": return `${d.path} (${d.cause}) ${d.sptes_zapped_total} SPTEs ${d.duration_us} µs`;
    case "memslot": return `${d.change} slot ${d.slot}`;
    case "fault": return `${d.pages} pages, ${d.refaults} refaults`;
    case "exit": return d.reason || "";
    case "snapshot": return d.action || "";
    default: return "";
  }
}

let statsTimer = null;
function scheduleStats() {
  // Coalesce bursts of events into one stats read.
  if (statsTimer) return;
  statsTimer = setTimeout(() => { statsTimer = null; sampleStats(); }, 150);
}

function onEvent(ev) {
  log(ev);
  if (ev.type === "vm_created") {
    state.vms.set(ev.vm, ev.data.vm);
    renderVmList();
    if (!state.selected) select(ev.vm);
    return;
  }
  if (ev.type === "vm_deleted") {
    state.vms.delete(ev.vm);
    if (ev.vm === state.selected) { clearView(); loadVms(); } else renderVmList();
    return;
  }
  if (ev.vm !== state.selected) return;
  if (ev.type === "zap") {
    state.zaps.set(ev.data.seq, ev.data);
    renderZaps(new Set([ev.data.seq]));
  }
  if (ev.type === "memslot" || ev.type === "conversion") loadMemslots(ev.vm);
  scheduleStats();
}

const EVENT_TYPES = ["vm_created", "vm_deleted", "memslot", "zap", "fault", "exit", "conversion", "snapshot"];

// One Server-Sent Events block ("event: …\nid: …\ndata: …") as {type, id, data}.
function parseBlock(block) {
  const ev = { type: "message", id: null, data: "" };
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;  // heartbeats are comments
    const at = line.indexOf(":");
    const key = at < 0 ? line : line.slice(0, at);
    const value = at < 0 ? "" : line.slice(at + 1).replace(/^ /, "");
    if (key === "event") ev.type = value;
    else if (key === "id") ev.id = value;
    else if (key === "data") ev.data += (ev.data ? "\n" : "") + value;
  }
  return ev;
}

// The event stream over fetch, with the token; reconnects with Last-Event-ID as EventSource
// would, so a `dropped` / `end` / network error resumes where the stream stopped.
async function connect() {
  const status = $("status");
  let last = null;
  for (;;) {
    try {
      const headers = withToken({ accept: "text/event-stream" });
      if (last !== null) headers["last-event-id"] = last;
      const r = await fetch(`${API}/events`, { headers, cache: "no-store" });
      if (r.status === 401) { signIn(); return; }
      if (!r.ok || !r.body) throw new Error(`events: ${r.status}`);
      status.dataset.state = "live"; status.textContent = "live";
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let end;
        while ((end = buf.indexOf("\n\n")) >= 0) {
          const ev = parseBlock(buf.slice(0, end));
          buf = buf.slice(end + 2);
          if (ev.id !== null) last = ev.id;
          if (EVENT_TYPES.includes(ev.type)) onEvent(JSON.parse(ev.data));
          else if (["dropped", "end", "gap"].includes(ev.type)) {
            status.dataset.state = "error"; status.textContent = ev.type;
          }
        }
      }
    } catch (e) {
      console.warn("event stream:", e);
    }
    status.dataset.state = "error"; status.textContent = "reconnecting…";
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

async function main() {
  connect();
  await loadVms();
  setInterval(sampleStats, POLL_MS);
}

main();
