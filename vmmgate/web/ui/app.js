// vmmgate's operator dashboard: plain JS over the server's own JSON API.
// Everything the server sends is put in the page as text (textContent), never
// as HTML. The token, when the server wants one, is kept in sessionStorage.
"use strict";

const TOKEN_KEY = "vmmgate.token";
const CONSOLE_KEEP = 64 * 1024; // characters of console shown
const SAMPLE_MS = 5000; // metrics sample period
const SAMPLES = 60; // 5 minutes of samples
const POLL_MS = 5000; // list refresh when no event stream
const OPERATIONS = ["boot", "restore", "snapshot"];

const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  selected: null,
  vms: [],
  consoleAbort: null,
  eventsAbort: null,
  refreshTimer: null,
  samples: [],
  lastTotals: null,
  started: false,
  oneHost: false, // GET /nodes answered 404: no nodes to poll
};

const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, description) {
    super(`${status}: ${description}`);
    this.status = status;
    this.description = description;
  }
}

function headers(extra) {
  const found = { Accept: "application/json", ...(extra || {}) };
  if (state.token) found.Authorization = "Bearer " + state.token;
  return found;
}

// One API call; an error answer throws an ApiError carrying the JSON
// error's description (the original's {"error": {code, reason, description}}).
async function api(method, path, body) {
  const init = { method, headers: headers() };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch (_) {
    data = text;
  }
  if (!response.ok) {
    const description =
      data && data.error ? data.error.description || data.error.reason : String(text).slice(0, 300);
    if (response.status === 401) needToken(description);
    throw new ApiError(response.status, description);
  }
  return data;
}

function text(element, value) {
  element.textContent = value == null ? "" : String(value);
  return element;
}

function make(tag, value, className) {
  const element = document.createElement(tag);
  if (value !== undefined) text(element, value);
  if (className) element.className = className;
  return element;
}

function showError(id, error) {
  text($(id), error ? (error.description ? `${error.status}: ${error.description}` : String(error)) : "");
}

// Run an action, showing its error next to it (and clearing an earlier one).
async function act(errorId, action) {
  showError(errorId, null);
  try {
    await action();
  } catch (error) {
    showError(errorId, error);
  }
}

// Re-render without losing the keyboard focus (the same control, rebuilt).
function keepingFocus(render) {
  const focused = document.activeElement;
  const label = focused && focused.getAttribute("aria-label");
  render();
  if (label && !document.contains(focused)) {
    const again = document.querySelector(`[aria-label="${CSS.escape(label)}"]`);
    if (again) again.focus();
  }
}

function labelsText(labels) {
  return Object.entries(labels || {})
    .map(([key, value]) => (value ? `${key}=${value}` : key))
    .join(", ");
}

function ageText(seconds) {
  if (seconds == null) return "";
  const s = Math.round(seconds);
  if (s < 120) return `${s} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  return `${Math.round(s / 3600)} h`;
}

// --- the token -------------------------------------------------------------

function needToken(description) {
  state.started = false;
  if (state.eventsAbort) state.eventsAbort.abort();
  $("app").hidden = true;
  $("signin").hidden = false;
  text($("signin-error"), state.token ? `401: ${description}` : "");
  $("token").focus();
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.token = $("token").value.trim();
  sessionStorage.setItem(TOKEN_KEY, state.token);
  start();
});

$("signout").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  state.token = "";
  needToken("");
});

// --- the VM list -----------------------------------------------------------

async function refreshVms() {
  try {
    const answer = await api("GET", "/vms");
    state.vms = answer.vms;
    showError("vms-error", null);
    keepingFocus(renderVms);
    if (state.selected) {
      const vm = state.vms.find((v) => v.id === state.selected);
      if (vm) renderDetails(vm);
      else deselect();
    }
  } catch (error) {
    if (error.status !== 401) showError("vms-error", error);
  }
}

function renderVms() {
  const body = $("vms").tBodies[0];
  body.replaceChildren();
  for (const vm of state.vms) {
    const row = document.createElement("tr");
    row.dataset.vm = vm.id;
    if (vm.id === state.selected) row.className = "selected";
    const cell = document.createElement("td");
    const pick = make("button", vm.id, "link");
    pick.type = "button";
    pick.setAttribute("aria-label", `Show VM ${vm.id}`);
    pick.addEventListener("click", () => select(vm.id));
    cell.append(pick);
    row.append(
      cell,
      make("td", vm.state, `state ${vm.state}`),
      make("td", vm.kind),
      make("td", labelsText(vm.labels)),
      make("td", vm.node ? vm.node.slice(0, 12) : "—"),
      make("td", ageText(vm.uptime_s)),
    );
    body.append(row);
  }
  text($("vm-count"), `(${state.vms.length})`);
  $("vms-empty").hidden = state.vms.length > 0;
}

function scheduleRefresh() {
  if (state.refreshTimer) return;
  state.refreshTimer = setTimeout(() => {
    state.refreshTimer = null;
    refreshVms();
    refreshCatalog();
  }, 150);
}

// --- one VM ---------------------------------------------------------------

function select(id) {
  if (state.selected !== id) {
    state.selected = id;
    for (const errorId of ["vm-error", "snapshot-error", "fork-error"]) showError(errorId, null);
    const stamp = new Date().toISOString().replace(/[-:.TZ]/g, "").slice(0, 14);
    $("snap-cpu").value = `ui-${id}-${stamp}.cpu`;
    $("snap-memory").value = `ui-${id}-${stamp}.mem`;
    followConsole(id);
  }
  renderVms();
  const vm = state.vms.find((v) => v.id === id);
  if (vm) renderDetails(vm);
  $("vm").hidden = false;
}

function deselect() {
  state.selected = null;
  if (state.consoleAbort) state.consoleAbort.abort();
  $("vm").hidden = true;
}

const DETAIL_FIELDS = [
  "state", "kind", "pid", "port", "ssh_port", "node", "memory_mib", "vcpus",
  "kernel_path", "cpu_snapshot_path", "memory_snapshot_path", "created_at",
  "uptime_s", "exit_description",
];

function renderDetails(vm) {
  text($("vm-title"), `VM ${vm.id}`);
  const list = $("vm-details");
  list.replaceChildren();
  for (const key of DETAIL_FIELDS) {
    if (vm[key] == null || vm[key] === "") continue;
    list.append(make("dt", key), make("dd", vm[key]));
  }
  if (Object.keys(vm.labels || {}).length) list.append(make("dt", "labels"), make("dd", labelsText(vm.labels)));
  if (vm.ttl) list.append(make("dt", "time limit"), make("dd", ttlText(vm.ttl)));
  const live = vm.state === "running" || vm.state === "paused";
  $("act-pause").disabled = vm.state !== "running";
  $("act-resume").disabled = vm.state !== "paused";
  $("act-stop").disabled = false;
  $("act-snapshot").disabled = !live;
  $("act-fork").disabled = !live;
}

function ttlText(ttl) {
  if (ttl.expired_at) return `expired ${ttl.expired_at}: ${ttl.outcome || ""}`;
  return `${ttl.on_expiry} at ${ttl.expires_at}`;
}

async function transition(action) {
  const id = state.selected;
  await act("vm-error", async () => {
    const vm = await api("POST", `/vms/${encodeURIComponent(id)}/${action}`);
    replaceVm(vm);
  });
}

function replaceVm(vm) {
  const index = state.vms.findIndex((v) => v.id === vm.id);
  if (index >= 0) state.vms[index] = vm;
  keepingFocus(renderVms);
  if (vm.id === state.selected) renderDetails(vm);
}

$("act-pause").addEventListener("click", () => transition("pause"));
$("act-resume").addEventListener("click", () => transition("resume"));
$("act-stop").addEventListener("click", async () => {
  const id = state.selected;
  if (!confirm(`Stop VM ${id}? It is shut down and forgotten.`)) return;
  await act("vm-error", async () => {
    await api("DELETE", `/vms/${encodeURIComponent(id)}`);
    deselect();
    await refreshVms();
  });
});

$("snapshot-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const id = state.selected;
  await act("snapshot-error", async () => {
    const answer = await api("POST", `/vms/${encodeURIComponent(id)}/snapshot`, {
      cpu_snapshot_path: $("snap-cpu").value,
      memory_snapshot_path: $("snap-memory").value,
      resume: $("snap-resume").checked,
    });
    replaceVm(answer.vm);
    text($("snapshot-error"), `Snapshot ${answer.catalog_id || ""} taken.`);
    await refreshCatalog();
  });
});

$("fork-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const id = state.selected;
  await act("fork-error", async () => {
    const answer = await api("POST", `/vms/${encodeURIComponent(id)}/fork`, {
      count: Number($("fork-count").value),
      resume: $("fork-resume").checked,
    });
    text($("fork-error"), `Forked into ${answer.vms.map((v) => v.id).join(", ")}.`);
    await refreshVms();
    await refreshCatalog();
  });
});

$("restore-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  await act("restore-error", async () => {
    const answer = await api("POST", "/create", {
      cpu_snapshot_path: $("restore-cpu").value,
      memory_snapshot_path: $("restore-memory").value,
      kernel_path: "<kernel>",
      resume: true,
    });
    await refreshVms();
    select(answer.id);
  });
});

// --- the console -----------------------------------------------------------

async function followConsole(id) {
  if (state.consoleAbort) state.consoleAbort.abort();
  const abort = new AbortController();
  state.consoleAbort = abort;
  const out = $("console");
  out.textContent = "";
  const path = `/vms/${encodeURIComponent(id)}/console?follow=1&tail=200&timeout=3600`;
  try {
    const response = await fetch(path, { headers: headers({ Accept: "text/plain" }), signal: abort.signal });
    if (!response.ok) throw new ApiError(response.status, (await response.json()).error.description);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      let shown = out.textContent + decoder.decode(value, { stream: true });
      if (shown.length > CONSOLE_KEEP) shown = shown.slice(shown.length - CONSOLE_KEEP);
      const atEnd = out.scrollTop + out.clientHeight >= out.scrollHeight - 4;
      out.textContent = shown;
      if (atEnd) out.scrollTop = out.scrollHeight;
    }
  } catch (error) {
    if (abort.signal.aborted) return;
    showError("vm-error", error);
  }
}

// --- the catalog -----------------------------------------------------------

async function refreshCatalog() {
  try {
    const answer = await api("GET", "/snapshots");
    keepingFocus(() => renderCatalog(answer.snapshots));
    showError("catalog-error", null);
  } catch (error) {
    if (error.status !== 401) showError("catalog-error", error);
  }
}

function renderCatalog(entries) {
  const body = $("catalog").tBodies[0];
  body.replaceChildren();
  for (const entry of entries.slice().reverse()) {
    const row = document.createElement("tr");
    row.dataset.snapshot = entry.id;
    const actions = document.createElement("td");
    const restore = make("button", "Restore");
    restore.type = "button";
    restore.setAttribute("aria-label", `Restore snapshot ${entry.id}`);
    restore.addEventListener("click", () =>
      act("catalog-error", async () => {
        const answer = await api("POST", `/snapshots/${encodeURIComponent(entry.id)}/restore`, {});
        await refreshVms();
        select(answer.id);
      }),
    );
    const remove = make("button", "Delete…", "danger");
    remove.type = "button";
    remove.setAttribute("aria-label", `Delete snapshot ${entry.id}`);
    remove.addEventListener("click", () => {
      if (!confirm(`Delete snapshot ${entry.id} and its two files?`)) return;
      act("catalog-error", async () => {
        await api("DELETE", `/snapshots/${encodeURIComponent(entry.id)}`);
        await refreshCatalog();
      });
    });
    actions.append(restore, " ", remove);
    row.append(
      make("td", entry.id),
      make("td", entry.vm_id || "—"),
      make("td", entry.origin),
      make("td", new Date(entry.created_at).toLocaleString()),
      make("td", `${Math.round(entry.memory_bytes / 1048576)} MiB`),
      make("td", labelsText(entry.labels)),
      actions,
    );
    body.append(row);
  }
  $("catalog-empty").hidden = entries.length > 0;
}

// --- nodes, health, figures ------------------------------------------------

async function refreshNodes() {
  if (state.oneHost) return;
  try {
    const answer = await api("GET", "/nodes");
    const body = $("nodes").tBodies[0];
    body.replaceChildren();
    for (const node of answer.nodes) {
      const row = document.createElement("tr");
      row.append(
        make("td", node.id.slice(0, 12)),
        make("td", node.state, `state ${node.state}`),
        make("td", node.address),
        make("td", node.vms),
        make("td", `${node.memory_free_mib} of ${node.memory_total_mib} MiB`),
        make("td", `${node.vm_slots_free} of ${node.vm_slots_total}`),
      );
      body.append(row);
    }
    $("nodes-section").hidden = false;
  } catch (error) {
    $("nodes-section").hidden = true;
    if (error.status === 404) state.oneHost = true; // a single host has no nodes
  }
}

async function refreshHealth() {
  const badge = $("health");
  try {
    const answer = await api("GET", "/healthz");
    text(badge, `health: ${answer.status}`).className = "pill ok";
  } catch (error) {
    text(badge, `health: ${error.description || error}`).className = "pill bad";
  }
}

// Prometheus text: {name: [{labels, value}]}, for the few series shown here.
function parseMetrics(body) {
  const found = {};
  for (const line of body.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = /^([a-zA-Z_:][\w:]*)(\{([^}]*)\})?\s+(\S+)/.exec(line);
    if (!match) continue;
    const labels = {};
    for (const part of (match[3] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[part[1]] = part[2];
    (found[match[1]] = found[match[1]] || []).push({ labels, value: Number(match[4]) });
  }
  return found;
}

function metric(found, name, labels) {
  return (found[name] || [])
    .filter((s) => Object.entries(labels || {}).every(([k, v]) => s.labels[k] === v))
    .reduce((sum, s) => sum + s.value, 0);
}

async function refreshFigures() {
  let found;
  try {
    const response = await fetch("/metrics", { headers: headers({ Accept: "text/plain" }) });
    if (!response.ok) return;
    found = parseMetrics(await response.text());
  } catch (_) {
    return;
  }
  const figures = $("figures");
  figures.replaceChildren();
  for (const vmState of ["running", "paused", "starting", "exited", "failed", "lost"]) {
    const count = metric(found, "vmmgate_vms", { state: vmState });
    if (count || vmState === "running") figures.append(make("dt", `VMs ${vmState}`), make("dd", count));
  }
  const memory = metric(found, "vmmgate_live_guest_memory_bytes");
  figures.append(make("dt", "guest memory in use"), make("dd", `${Math.round(memory / 1048576)} MiB`));
  const totals = {};
  for (const operation of OPERATIONS) {
    totals[operation] = {
      sum: metric(found, "vmmgate_operation_duration_seconds_sum", { operation }),
      count: metric(found, "vmmgate_operation_duration_seconds_count", { operation }),
    };
    const { sum, count } = totals[operation];
    figures.append(
      make("dt", `${operation === "boot" ? "create (boot)" : operation} mean`),
      make("dd", count ? `${Math.round((sum / count) * 1000)} ms over ${count}` : "—"),
    );
  }
  const sample = {};
  for (const operation of OPERATIONS) {
    const before = state.lastTotals && state.lastTotals[operation];
    const count = before ? totals[operation].count - before.count : 0;
    sample[operation] = count > 0 ? ((totals[operation].sum - before.sum) / count) * 1000 : null;
  }
  state.lastTotals = totals;
  state.samples.push(sample);
  if (state.samples.length > SAMPLES) state.samples.shift();
  drawChart();
}

function drawChart() {
  const svg = $("chart");
  const ns = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  const values = state.samples.flatMap((s) => OPERATIONS.map((o) => s[o])).filter((v) => v != null);
  const top = Math.max(100, ...values);
  const axis = document.createElementNS(ns, "text");
  axis.setAttribute("x", "4");
  axis.setAttribute("y", "12");
  axis.setAttribute("class", "axis");
  axis.textContent = `${Math.round(top)} ms`;
  svg.append(axis);
  for (const operation of OPERATIONS) {
    state.samples.forEach((sample, index) => {
      const value = sample[operation];
      if (value == null) return;
      const dot = document.createElementNS(ns, "circle");
      dot.setAttribute("cx", String(10 + (index * 580) / (SAMPLES - 1)));
      dot.setAttribute("cy", String(115 - (value / top) * 100));
      dot.setAttribute("r", "3");
      dot.setAttribute("class", operation);
      const title = document.createElementNS(ns, "title");
      title.textContent = `${operation}: ${Math.round(value)} ms`;
      dot.append(title);
      svg.append(dot);
    });
  }
}

// --- live state: the event stream, else polling ------------------------------

async function followEvents() {
  let last = null;
  while (state.started) {
    const abort = new AbortController();
    state.eventsAbort = abort;
    try {
      const extra = { Accept: "text/event-stream" };
      if (last) extra["Last-Event-ID"] = last;
      const response = await fetch("/events?timeout=300", { headers: headers(extra), signal: abort.signal });
      if (!response.ok) throw new ApiError(response.status, "no event stream");
      text($("live"), "live: event stream").className = "pill ok";
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const id = /^id: (.*)$/m.exec(block);
          if (id) last = id[1];
          if (/^data: /m.test(block)) scheduleRefresh();
        }
      }
    } catch (error) {
      if (!state.started) return;
      text($("live"), "live: polling").className = "pill warn";
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    }
  }
}

async function start() {
  let first;
  try {
    first = await api("GET", "/vms");
  } catch (error) {
    if (error.status !== 401) {
      text($("signin-error"), error.description || String(error));
      $("signin").hidden = false;
    }
    return;
  }
  $("signin").hidden = true;
  $("app").hidden = false;
  $("signout").hidden = !state.token;
  if (state.started) return;
  state.started = true;
  state.vms = first.vms;
  renderVms();
  refreshCatalog();
  refreshNodes();
  refreshHealth();
  refreshFigures();
  followEvents();
}

setInterval(() => {
  if (!state.started) return;
  refreshVms(); // uptime, and a fallback should the event stream miss a beat
  refreshHealth();
  refreshNodes();
}, POLL_MS);
setInterval(() => state.started && refreshFigures(), SAMPLE_MS);

start();
