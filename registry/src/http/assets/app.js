// The registry dashboard: follows /events (server-sent events fed by the
// registry's own watch) and shows services, the selected service's
// instances and the latest changes. Lists are virtualized (only the rows
// in view are in the DOM) and redrawn at most once per animation frame, so
// 1 000 services and 10 000 instances stay smooth.
"use strict";

const ROW = 28;              // px, the height of every list row (style.css --row)
const FEED_SHOWN = 200;      // changes kept in the feed

const state = {
  services: new Map(),       // name -> Map(id -> instance)
  revision: 0,
  offset: 0,                 // server clock - browser clock, ms
  feed: [],                  // newest last
  selected: decodeURIComponent(location.hash.slice(1)) || null,
  fresh: new Set(),          // "service/id" changed in the last moments
};

const $ = (id) => document.getElementById(id);
const collator = new Intl.Collator(undefined, { numeric: true });

function esc(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;",
  })[c]);
}

function age(since) {
  if (since == null) return "";
  const s = Math.max(0, Math.floor((Date.now() + state.offset - since) / 1000));
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m " + (s % 60) + "s";
  if (s < 86400) return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m";
  return Math.floor(s / 86400) + "d " + Math.floor((s % 86400) / 3600) + "h";
}

function clock(ms) {
  return new Date(ms - state.offset).toLocaleTimeString();
}

function address(i) {
  return i.host.includes(":") ? `[${i.host}]:${i.port}` : `${i.host}:${i.port}`;
}

// A list whose rows are all ROW px high: only those in view are built.
class VirtualList {
  constructor(el, renderRow) {
    this.el = el;
    this.renderRow = renderRow;
    this.items = [];
    this.html = "";
    this.spacer = document.createElement("div");
    this.spacer.className = "spacer";
    this.rows = document.createElement("div");
    this.rows.className = "rows";
    this.spacer.appendChild(this.rows);
    el.appendChild(this.spacer);
    el.addEventListener("scroll", () => this.draw());
  }
  setItems(items) {
    this.items = items;
    this.draw();
  }
  draw() {
    const top = this.el.scrollTop;
    const height = this.el.clientHeight || 600;
    const first = Math.max(0, Math.floor(top / ROW) - 10);
    const last = Math.min(this.items.length, Math.ceil((top + height) / ROW) + 10);
    this.spacer.style.height = this.items.length * ROW + "px";
    this.rows.style.transform = `translateY(${first * ROW}px)`;
    let html = "";
    for (let n = first; n < last; n++) html += this.renderRow(this.items[n]);
    // Rows left alone when nothing in view changed: a click in progress
    // keeps its element.
    if (html !== this.html) {
      this.html = html;
      this.rows.innerHTML = html;
    }
  }
}

const serviceList = new VirtualList($("services"), (name) => {
  const count = state.services.get(name)?.size ?? 0;
  const sel = name === state.selected ? " selected" : "";
  return `<div class="service-row${sel}" data-service="${esc(name)}">` +
    `<span class="name">${esc(name)}</span><span class="count">${count}</span></div>`;
});

const instanceList = new VirtualList($("instances"), (i) => {
  const tags = Object.entries(i.metadata || {}).sort()
    .map(([k, v]) => `<span class="tag">${esc(k)}=${esc(v)}</span>`).join("");
  const fresh = state.fresh.has(i.service + "/" + i.id) ? " fresh" : "";
  return `<div class="instance-row${fresh}" data-instance="${esc(i.id)}">` +
    `<span class="addr" title="${esc(i.id)}">${esc(address(i))}</span>` +
    (i.drained
      ? `<span class="weight drained" title="drained: listed, no new calls">0 drained</span>`
      : `<span class="weight">${i.weight}</span>`) +
    `<span class="meta">${tags}</span>` +
    `<span class="lease" title="lease ${i.lease}">${age(i.leaseSince)}</span>` +
    `<span class="changed" title="${esc(clock(i.changed))}">${age(i.changed)} ago</span></div>`;
});

$("services").addEventListener("click", (e) => {
  const row = e.target.closest(".service-row");
  if (!row) return;
  state.selected = row.dataset.service;
  history.replaceState(null, "", "#" + encodeURIComponent(state.selected));
  dirty.services = dirty.instances = true;
  schedule();
});
window.addEventListener("hashchange", () => {
  state.selected = decodeURIComponent(location.hash.slice(1)) || null;
  dirty.services = dirty.instances = true;
  schedule();
});
$("service-filter").addEventListener("input", () => { dirty.services = true; schedule(); });
$("instance-filter").addEventListener("input", () => { dirty.instances = true; schedule(); });

// Redraws are batched: many changes in one frame cost one redraw.
const dirty = { services: true, instances: true, feed: true, counts: true };
let sortedNames = null;      // cache, dropped when a service appears or goes
let frame = 0;
function schedule() {
  if (!frame) frame = requestAnimationFrame(draw);
}

function draw() {
  frame = 0;
  if (!sortedNames) {
    sortedNames = [...state.services.keys()].sort();
    dirty.services = dirty.counts = true;
  }
  if (state.selected == null && sortedNames.length) {
    state.selected = sortedNames[0];
    dirty.instances = true;
  }
  if (dirty.counts) {
    let instances = 0;
    for (const m of state.services.values()) instances += m.size;
    $("service-count").textContent = state.services.size;
    $("instance-count").textContent = instances;
    $("revision").textContent = state.revision;
  }
  if (dirty.services) {
    const filter = $("service-filter").value.trim().toLowerCase();
    const names = filter ? sortedNames.filter((n) => n.toLowerCase().includes(filter)) : sortedNames;
    serviceList.setItems(names);
    $("services-shown").textContent = filter
      ? `${names.length} of ${sortedNames.length} services match`
      : `${sortedNames.length} services`;
  }
  if (dirty.instances) drawInstances();
  if (dirty.feed) drawFeed();
  dirty.services = dirty.instances = dirty.feed = dirty.counts = false;
}

function drawInstances() {
  const name = state.selected;
  const instances = name != null ? state.services.get(name) : null;
  $("selected").textContent = name == null ? "no service selected"
    : instances ? `${name}: ${instances.size} instance${instances.size === 1 ? "" : "s"}`
    : `${name}: no instance`;
  const filter = $("instance-filter").value.trim().toLowerCase();
  let list = instances ? [...instances.values()] : [];
  if (filter) {
    list = list.filter((i) => (address(i) + " " + i.id + " " +
      Object.entries(i.metadata || {}).map(([k, v]) => k + "=" + v).join(" "))
      .toLowerCase().includes(filter));
  }
  // Numbers in addresses compare as numbers: 10.0.0.9 before 10.0.0.10.
  list.sort((a, b) => collator.compare(address(a), address(b)));
  instanceList.setItems(list);
  $("instances-shown").textContent = filter && instances
    ? `${list.length} of ${instances.size} shown` : "";
}

function drawFeed() {
  const items = state.feed.slice(-FEED_SHOWN).reverse();
  $("feed").innerHTML = items.length ? items.map((c) =>
    `<li class="${esc(c.kind)}"><span class="when">${esc(clock(c.at))}</span>` +
    `<span class="kind">${esc(c.kind)}</span>${esc(c.instance.service)} ` +
    `<span class="addr">${esc(address(c.instance))}</span>` +
    `<span class="reason">${esc(c.reason)}</span></li>`).join("")
    : `<li class="empty">no change yet</li>`;
}

function applySnapshot(snap) {
  state.offset = snap.now - Date.now();
  state.services = new Map();
  for (const i of snap.instances) put(i);
  state.revision = snap.revision;
  state.feed = snap.feed;
  sortedNames = null;
  dirty.services = dirty.instances = dirty.feed = dirty.counts = true;
  schedule();
}

function put(i) {
  let m = state.services.get(i.service);
  if (!m) {
    m = new Map();
    state.services.set(i.service, m);
    sortedNames = null;
  }
  m.set(i.id, i);
}

function applyChanges(changes) {
  for (const c of changes) {
    // After a fresh snapshot, changes it already holds may still arrive.
    if (c.revision <= state.revision) continue;
    state.revision = c.revision;
    const i = c.instance;
    if (c.kind === "removed") {
      const m = state.services.get(i.service);
      if (m) {
        m.delete(i.id);
        if (!m.size) {
          state.services.delete(i.service);
          sortedNames = null;
        }
      }
    } else {
      put(i);
      const key = i.service + "/" + i.id;
      state.fresh.add(key);
      setTimeout(() => state.fresh.delete(key), 1500);
    }
    state.feed.push(c);
    if (i.service === state.selected) dirty.instances = true;
  }
  if (state.feed.length > FEED_SHOWN * 2) state.feed = state.feed.slice(-FEED_SHOWN);
  dirty.services = dirty.feed = dirty.counts = true;
  schedule();
}

function connect() {
  const status = $("status");
  const events = new EventSource("events");
  events.addEventListener("snapshot", (e) => {
    status.textContent = "live";
    status.className = "status live";
    applySnapshot(JSON.parse(e.data));
  });
  events.addEventListener("changes", (e) => applyChanges(JSON.parse(e.data)));
  events.onerror = () => {
    if (events.readyState === EventSource.CLOSED) {
      // Refused (no token, or too many dashboards): say so, retry slowly.
      status.textContent = "disconnected: reload, or open /?token=READ_TOKEN";
      status.className = "status down";
      setTimeout(connect, 5000);
    } else {
      status.textContent = "reconnecting…";
      status.className = "status";
    }
  };
}

// Ages tick without any request: only the rows in view are redrawn.
setInterval(() => instanceList.draw(), 1000);
window.addEventListener("resize", () => { serviceList.draw(); instanceList.draw(); });
draw();
connect();
