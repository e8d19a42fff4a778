// mm's live page: one event stream (/mm/api/events, read through fetch so that it can carry the
// API key) brings the status every 2 s and every request, switch and state change as it happens.
// Plain JS, no build step, nothing fetched from anywhere but this mm.
"use strict";

const WINDOW_S = 3600; // what the daemon keeps and the page holds
const S = {
  span: Number(localStorage.getItem("mm.span")) || 0, // what the timeline shows; 0: auto
  status: null, events: [], key: sessionStorage.getItem("mm.key") || "",
  pending: {}, logFor: null, logChosen: null, resultsLoaded: false, keyWaiters: [],
};
const $ = (sel) => document.querySelector(sel);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

// --- formatting -----------------------------------------------------------------------------------
function fmtMiB(mib) {
  if (mib == null) return "–";
  return mib >= 1024 ? `${(mib / 1024).toFixed(1)} GiB` : `${Math.round(mib)} MiB`;
}
function fmtS(s) {
  if (s == null) return "–";
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 60) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
  return fmtAge(s);
}
function fmtAge(s) {
  if (s == null) return "–";
  s = Math.max(0, s);
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}
function fmtCount(n) {
  return n >= 10000 ? `${(n / 1000).toFixed(0)}k` : n >= 1000 ? `${(n / 1000).toFixed(1)}k` : String(n);
}
function clock(t) {
  return new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}
function median(xs) {
  if (!xs.length) return null;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor((s.length - 1) / 2)];
}
const now = () => Date.now() / 1000;

// --- API with the key -----------------------------------------------------------------------------
function headers(extra) {
  return S.key ? { ...extra, authorization: `Bearer ${S.key}` } : { ...extra };
}
async function api(path, opts = {}) {
  for (;;) {
    const res = await fetch(path, { ...opts, headers: headers(opts.headers) });
    if (res.status !== 401) return res;
    await askKey(S.key ? "That key was not accepted." : "");
  }
}
function askKey(message) {
  const dialog = $("#key-dialog");
  $("#key-error").textContent = message || "";
  if (!dialog.open) dialog.showModal();
  $("#key-input").focus();
  return new Promise((resolve) => S.keyWaiters.push(resolve));
}
$("#key-form").addEventListener("submit", () => {
  S.key = $("#key-input").value.trim();
  sessionStorage.setItem("mm.key", S.key);
  const waiters = S.keyWaiters.splice(0);
  waiters.forEach((w) => w());
});
$("#key-dialog").addEventListener("cancel", (e) => e.preventDefault());

// --- the event stream -----------------------------------------------------------------------------
function setLive(state, text) {
  $("#conn-dot").className = `dot ${state}`;
  $("#conn-text").textContent = text;
}
async function stream() {
  let delay = 500;
  for (;;) {
    try {
      const res = await api("/mm/api/events");
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      setLive("live", "live");
      delay = 500;
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          handle(buf.slice(0, i));
          buf = buf.slice(i + 2);
        }
      }
    } catch (e) {
      console.warn("event stream:", e);
    }
    setLive("down", "reconnecting…");
    await new Promise((r) => setTimeout(r, delay));
    delay = Math.min(delay * 2, 10000);
  }
}
function handle(raw) {
  let event = "message";
  const data = [];
  for (const line of raw.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
  }
  if (!data.length) return;
  const doc = JSON.parse(data.join("\n"));
  if (event === "snapshot") {
    S.events = doc.events;
    onStatus(doc.status);
  } else if (event === "events") {
    S.events.push(...doc);
    doc.filter((e) => e.kind === "action").forEach(onActionDone);
    prune();
    renderTimeline();
    renderSummary();
  } else if (event === "status") {
    onStatus(doc);
  }
}
function prune() {
  const cut = now() - WINDOW_S - 60;
  if (S.events.length && S.events[0].t < cut) S.events = S.events.filter((e) => e.t >= cut);
}
function onStatus(status) {
  S.status = status;
  renderHeader();
  renderSummary();
  renderServers();
  renderTimeline();
  renderLogChoices();
}

// --- actions --------------------------------------------------------------------------------------
async function act(action, profile) {
  S.pending[profile] = action;
  renderServers();
  try {
    const res = await api(`/mm/api/${action}/${encodeURIComponent(profile)}`, { method: "POST" });
    if (res.status !== 202) delete S.pending[profile]; // 202: still working, its event ends it
    if (res.status >= 400 && res.status !== 409) toast(`${action} ${profile}: HTTP ${res.status}`, true);
  } catch (e) {
    delete S.pending[profile];
    toast(`${action} ${profile}: ${e}`, true);
  }
  renderServers();
}
function onActionDone(e) {
  delete S.pending[e.model];
  if (!e.ok) toast(`${e.action} ${e.model}: ${e.error}`, true);
  renderServers();
}
function toast(text, bad) {
  const el = document.createElement("div");
  el.className = `toast${bad ? " bad" : ""}`;
  el.textContent = text;
  $("#toasts").append(el);
  setTimeout(() => el.remove(), bad ? 12000 : 5000);
}
document.addEventListener("click", (e) => {
  const pick = e.target.closest("button[data-span]");
  if (pick) setSpan(Number(pick.dataset.span));
  const b = e.target.closest("button[data-action]");
  if (b && !b.disabled) act(b.dataset.action, b.dataset.profile);
});

// --- derived figures ------------------------------------------------------------------------------
function servers() {
  return S.status ? S.status.servers : [];
}
function profiles() {
  return S.status ? S.status.profiles : [];
}
function profileInfo(name) {
  return profiles().find((p) => p.name === name) || {};
}
function lastHour(model) {
  const reqs = S.events.filter((e) => e.kind === "request" && e.model === model && e.t >= now() - WINDOW_S);
  const ok = reqs.filter((e) => !e.error && e.ttft != null);
  return {
    requests: reqs.length,
    errors: reqs.filter((e) => e.error).length,
    ttft: median(ok.map((e) => e.ttft)),
    tokensOut: reqs.reduce((n, e) => n + (e.tokens_out || 0), 0),
    tokensIn: reqs.reduce((n, e) => n + (e.tokens_in || 0), 0),
  };
}
const ORDER = { awake: 0, waking: 1, starting: 2, "falling asleep": 3, stopping: 3, asleep: 4, checkpointed: 4, failed: 5, stopped: 6 };
function sortedServers() {
  return [...servers()].sort((a, b) => (ORDER[a.state] - ORDER[b.state]) || a.profile.localeCompare(b.profile));
}
function card() {
  return (S.status && S.status.card) || null; // {name, total_mib, budget_mib} once the daemon reports it
}

// --- header and summary ---------------------------------------------------------------------------
function renderHeader() {
  const d = S.status.daemon || {};
  $("#endpoint").textContent = `${d.proxy || ""}/v1  ·  daemon pid ${d.pid ?? "?"}  ·  up ${fmtAge(now() - (d.started_at || now()))}`;
}
function renderSummary() {
  if (!S.status) return;
  const list = servers();
  const awake = list.filter((s) => s.state === "awake");
  const reqs = S.events.filter((e) => e.kind === "request" && e.t >= now() - WINDOW_S);
  const errors = reqs.filter((e) => e.error).length;
  const switches = S.events.filter((e) => e.kind === "switch" && e.t >= now() - WINDOW_S);
  const waiting = Object.values(S.status.waiting || {}).reduce((a, b) => a + b, 0);
  const inFlight = list.reduce((n, s) => n + (s.in_flight || 0), 0);
  $("#summary").innerHTML = `
    <div class="stat">${budgetHtml(list)}</div>
    <div class="stat"><div class="k">awake</div><div class="v">${awake.length}<small> of ${list.length} servers</small></div></div>
    <div class="stat"><div class="k">requests, last hour</div><div class="v">${fmtCount(reqs.length)}<small>${errors ? ` · <span style="color:var(--failed)">${errors} failed</span>` : " · none failed"}</small></div></div>
    <div class="stat"><div class="k">now</div><div class="v">${inFlight}<small> in flight · </small>${waiting}<small> waiting</small></div></div>
    <div class="stat"><div class="k">switches, last hour</div><div class="v">${switches.length}<small>${switches.length ? ` · median ${fmtS(median(switches.map((e) => e.seconds)))}` : ""}</small></div></div>`;
}
function severalCards() {
  const cards = (S.status && S.status.cards) || [];
  return cards.length > 1 ? cards : null; // each {index, name, total, free, capacity, servers: [{profile, state, gpu_mib}]}
}
function cardsHtml(cards) {
  // a machine of several GPUs: one bar per card, its servers' memory on it
  return cards.map((c) => {
    const total = c.total / 1048576;
    const on = (c.servers || []).filter((s) => s.gpu_mib != null);
    const segs = on.map((s) => `<span class="${s.state}" style="width:${(100 * s.gpu_mib) / total}%" title="${esc(s.profile)} ${s.state} ${fmtMiB(s.gpu_mib)}"></span>`).join("");
    const names = (c.servers || []).map((s) => esc(s.profile)).join(", ") || "no server";
    return `<div class="k">GPU ${c.index} · ${esc(c.name)}</div><div class="budget">${segs}</div>
      <div class="small muted">${fmtMiB(c.free / 1048576)} free of ${fmtMiB(total)} · ${names}</div>`;
  }).join("");
}
function budgetHtml(list) {
  const c = card();
  const live = list.filter((s) => ["awake", "asleep", "checkpointed", "starting", "waking"].includes(s.state));
  const cards = severalCards();
  if (cards) return cardsHtml(cards);
  if (c && c.total_mib) {
    const total = c.total_mib;
    const parts = live.filter((s) => s.memory && s.memory.gpu_mib != null);
    const used = parts.reduce((n, s) => n + s.memory.gpu_mib, 0);
    const segs = parts.map((s) => `<span class="${s.state}" style="width:${(100 * s.memory.gpu_mib) / total}%" title="${esc(s.profile)} ${s.state} ${fmtMiB(s.memory.gpu_mib)}"></span>`).join("");
    const budget = c.budget_mib ? ` · budget ${fmtMiB(c.budget_mib)}` : "";
    return `<div class="k">GPU${c.name ? ` · ${esc(c.name)}` : ""}</div><div class="budget">${segs}</div>
      <div class="small muted">${fmtMiB(used)} held by mm's servers of ${fmtMiB(total)}${budget}</div>`;
  }
  // No card figures: show what the scheduler itself counts, each awake server's declared share.
  const awake = live.filter((s) => ["awake", "starting", "waking"].includes(s.state));
  const shares = awake.map((s) => ({ s, share: profileInfo(s.profile).memory_share ?? 0.9 }));
  const sum = shares.reduce((n, x) => n + x.share, 0);
  const segs = shares.map(({ s, share }) => `<span class="${s.state}" style="width:${Math.min(100, 100 * share)}%" title="${esc(s.profile)}: ${share.toFixed(2)}"></span>`).join("");
  const noGpu = list.some((s) => s.memory && s.memory.gpu === "no GPU");
  const names = shares.map(({ s, share }) => `${esc(s.profile)} ${share.toFixed(2)}`).join(" + ") || "nothing awake";
  return `<div class="k">GPU budget (gpu_memory_utilization of awake servers)${noGpu ? " · no GPU here: memory below is RAM" : ""}</div>
    <div class="budget">${segs}</div><div class="small muted">${names} = ${sum.toFixed(2)} of 1.00</div>`;
}

// --- server cards ---------------------------------------------------------------------------------
function renderServers() {
  if (!S.status) return;
  const list = sortedServers();
  const fp = S.status.footprints || {};
  const c = card();
  const gpuOf = (s) => s.memory && s.memory.gpu_mib;
  const peakGpu = c && c.total_mib ? c.total_mib : Math.max(1, ...list.map((s) => Math.max(gpuOf(s) || 0, fp[s.profile]?.awake?.gpu_mib || 0)));
  const peakRam = Math.max(1, ...list.map((s) => Math.max(s.memory?.ram_mib || s.memory?.rss_mib || 0, fp[s.profile]?.awake?.rss_mib || 0, fp[s.profile]?.asleep?.rss_mib || 0)));
  const html = list.map((s) => serverCard(s, fp[s.profile] || {}, peakGpu, peakRam)).join("");
  if ($("#servers").dataset.html !== html) {
    $("#servers").innerHTML = html || `<div class="muted">No server has run yet: wake a profile below, or send a request to the proxy.</div>`;
    $("#servers").dataset.html = html;
  }
  renderOthers(new Set(list.map((s) => s.profile)));
}
function memRow(label, now_, other, peak, state, otherState) {
  if (now_ == null && other == null) return "";
  const w = now_ == null ? 0 : Math.min(100, (100 * now_) / peak);
  const marker = other != null ? `<b style="left:${Math.min(99.5, (100 * other) / peak)}%" title="${otherState}: ${fmtMiB(other)}"></b>` : "";
  const text = `${fmtMiB(now_)}${other != null ? ` <span title="when ${otherState}">(${otherState} ${fmtMiB(other)})</span>` : ""}`;
  return `<span>${label}</span><div class="bar"><i class="${state}" style="width:${w}%"></i>${marker}</div><span class="num">${text}</span>`;
}
function serverCard(s, fp, peakGpu, peakRam) {
  const p = profileInfo(s.profile);
  const other = ["asleep", "checkpointed"].includes(s.state) ? "awake" : "asleep";
  const m = s.memory || {};
  const gpu = memRow("GPU", m.gpu_mib, fp[other]?.gpu_mib, peakGpu, s.state, other);
  const ram = memRow("RAM", m.ram_mib ?? m.rss_mib, fp[other]?.rss_mib, peakRam, s.state, other);
  const h = lastHour(s.profile);
  const waiting = (S.status.waiting || {})[s.profile] || 0;
  // The names clients use, where they are not just the profile's own name.
  const names = [s.served_model_name, ...(s.aliases || [])].filter((n) => n && n !== s.profile).join(", ");
  const facts = [
    `<span class="${s.in_flight ? "hot" : ""}"><b>${s.in_flight || 0}</b> in flight</span>`,
    `<span class="${waiting ? "hot" : ""}"><b>${waiting}</b> waiting</span>`,
    `<span>last hour <b>${fmtCount(h.requests)}</b> req${h.errors ? ` · <b style="color:var(--failed)">${h.errors}</b> failed` : ""}</span>`,
    h.ttft != null ? `<span>TTFT p50 <b>${fmtS(h.ttft)}</b></span>` : "",
    h.tokensOut ? `<span><b>${fmtCount(h.tokensOut)}</b> tok out</span>` : "",
    `<span>${esc(s.switch)}${s.last_switch_s != null ? ` <b>${fmtS(s.last_switch_s)}</b>` : ""}</span>`,
    s.uptime_s != null ? `<span>up <b>${fmtAge(s.uptime_s)}</b></span>` : "",
    s.port && s.pid ? `<span>port ${s.port}</span>` : "",
    severalCards() && s.pid && s.gpus ? `<span>GPU <b>${s.gpus.join(",")}</b>${s.parallel ? ` ${esc(s.parallel)} parallel` : ""}</span>` : "",
    s.restarts ? `<span>restarts <b>${s.restarts}</b></span>` : "",
    p.share_gpu ? `<span>share ${(p.memory_share ?? 0).toFixed(2)}</span>` : "",
  ].filter(Boolean).join("");
  const busy = S.pending[s.profile];
  const live = ["awake", "asleep", "checkpointed", "starting", "waking"].includes(s.state);
  const wakeLabel = ["asleep", "checkpointed", "awake", "waking"].includes(s.state) ? "Wake" : "Start";
  const btn = (action, label, enabled, primary) =>
    `<button data-action="${action}" data-profile="${esc(s.profile)}" class="${primary ? "primary" : ""}${busy === action ? " busy" : ""}" ${enabled && !busy ? "" : "disabled"}>${busy === action ? `${label}…` : label}</button>`;
  const actions = [
    btn("wake", wakeLabel, s.state !== "awake" && s.state !== "stopping", ["asleep", "checkpointed"].includes(s.state)),
    btn("sleep", "Sleep", s.state === "awake", false),
    btn("stop", "Stop", live || s.state === "failed", false),
  ].join("");
  const error = s.state === "failed" && s.error ? `<div class="error-text">${esc(s.error)}${(s.error_log || []).length ? "\n" + esc(s.error_log.slice(-3).join("\n")) : ""}</div>` : "";
  return `<div class="card ${s.state}" data-profile="${esc(s.profile)}">
    <div class="card-head"><span class="name" title="${esc(p.description || s.profile)}">${esc(s.profile)}</span>
      <span class="pill ${s.state}" data-state="${s.state}">${s.state}</span><span class="actions">${actions}</span></div>
    <div class="model" title="${esc(s.model)}">${esc(s.model)}${names ? ` · as <span class="mono">${esc(names)}</span>` : ""}</div>
    ${gpu || ram ? `<div class="mem">${gpu}${ram}</div>` : ""}
    <div class="facts">${facts}</div>${error}</div>`;
}
function renderOthers(running) {
  const rest = profiles().filter((p) => !running.has(p.name));
  if (!rest.length) {
    $("#others").innerHTML = "";
    return;
  }
  const chip = (p) => {
    const busy = S.pending[p.name];
    const what = p.stack.length ? `stack: ${p.stack.join(" + ")}` : p.model || "";
    return `<span class="chip" data-profile="${esc(p.name)}" title="${esc(p.description || "")}"><b>${esc(p.name)}</b>
      <span class="muted">${esc(what)}</span>
      <button data-action="wake" data-profile="${esc(p.name)}" ${busy ? "disabled" : ""}>${busy ? "Starting…" : p.stack.length ? "Wake" : "Start"}</button></span>`;
  };
  const html = `<span class="label">stopped:</span>${rest.map(chip).join("")}`;
  if ($("#others").dataset.html !== html) {
    $("#others").innerHTML = html;
    $("#others").dataset.html = html;
  }
}

// --- timeline -------------------------------------------------------------------------------------
function setSpan(span) {
  S.span = span;
  localStorage.setItem("mm.span", String(span));
  document.querySelectorAll("button[data-span]").forEach((b) => b.classList.toggle("sel", Number(b.dataset.span) === span));
  renderTimeline();
}
// Auto: the daemon's whole life while it is younger than an hour (there is nothing before it),
// on a round scale; the last hour after that.
const SPANS = [30, 60, 120, 300, 600, 900, 1800, 3600];
const TICK_S = { 30: 5, 60: 15, 120: 30, 300: 60, 600: 120, 900: 300, 1800: 300, 3600: 600 };
function spanNow() {
  if (S.span) return S.span;
  const age = now() - ((S.status && S.status.daemon && S.status.daemon.started_at) || now() - WINDOW_S);
  return SPANS.find((s) => s >= age) || WINDOW_S;
}
function stateBands(model, current, t0, t1) {
  const changes = S.events.filter((e) => e.kind === "state" && e.model === model && e.t >= t0);
  let state = changes.length ? changes[0].was : current;
  let from = t0;
  const out = [];
  for (const e of changes) {
    out.push([from, e.t, state]);
    state = e.state;
    from = e.t;
  }
  out.push([from, t1, state]);
  return out.filter(([a, b, st]) => b > a && st !== "stopped");
}
function renderTimeline() {
  if (!S.status) return;
  const el = $("#timeline");
  const width = Math.max(500, el.clientWidth || 900);
  const span = spanNow();
  $("#timeline-title").textContent = span === WINDOW_S ? "Last hour" : span < 60 ? `Last ${span} seconds`
    : span < 120 ? "Last minute" : `Last ${span / 60} minutes`;
  const t1 = now(), t0 = t1 - span;
  const binS = span / 120, tick = TICK_S[span] || span / 6;
  const known = sortedServers().map((s) => s.profile);
  const seen = new Set(known);
  for (const e of S.events) if (e.model && e.t >= t0 && !seen.has(e.model) && e.kind !== "action") { seen.add(e.model); known.push(e.model); }
  const labelW = 150, laneH = 26, top = 8, axisH = 20;
  const plotW = width - labelW - 10;
  const x = (t) => labelW + ((t - t0) / span) * plotW;
  const height = top + Math.max(1, known.length) * laneH + axisH;
  const parts = [];
  for (let at = 0; at <= span; at += tick) {
    const xx = x(t0 + at);
    parts.push(`<line class="grid" x1="${xx}" x2="${xx}" y1="${top}" y2="${height - axisH}"/>`);
    const ago = span - at, label = ago === 0 ? "now" : ago < 60 ? `−${ago} s` : `−${ago / 60} min`;
    parts.push(`<text class="axis" x="${xx}" y="${height - 5}" text-anchor="${at === 0 ? "start" : ago === 0 ? "end" : "middle"}">${label}</text>`);
  }
  const bins = 120;
  known.forEach((model, i) => {
    const y = top + i * laneH;
    const server = servers().find((s) => s.profile === model);
    parts.push(`<text class="lane-label" x="0" y="${y + laneH / 2 + 4}">${esc(model.length > 20 ? model.slice(0, 19) + "…" : model)}</text>`);
    parts.push(`<line class="grid" x1="${labelW}" x2="${labelW + plotW}" y1="${y + laneH}" y2="${y + laneH}"/>`);
    for (const [a, b, st] of stateBands(model, server ? server.state : "stopped", t0, t1)) {
      parts.push(`<rect class="band-${st}" x="${x(a)}" y="${y + 3}" width="${Math.max(1, x(b) - x(a))}" height="${laneH - 6}" rx="2"><title>${esc(model)} ${st} ${clock(a)}–${clock(b)}</title></rect>`);
    }
    const counts = new Array(bins).fill(0), errs = new Array(bins).fill(0);
    for (const e of S.events) {
      if (e.kind !== "request" || e.model !== model || e.t < t0) continue;
      const k = Math.min(bins - 1, Math.floor((e.t - t0) / binS));
      counts[k] += 1;
      if (e.error) errs[k] += 1;
    }
    const peak = Math.max(1, ...counts);
    const bw = Math.max(1.5, (plotW / bins) - 1.5);
    counts.forEach((n, k) => {
      if (!n) return;
      const hgt = Math.max(3, (laneH - 8) * Math.sqrt(n / peak));
      const cls = errs[k] ? "errbar" : "reqbar";
      parts.push(`<rect class="${cls}" x="${x(t0 + k * binS) + 0.75}" y="${y + laneH - 4 - hgt}" width="${bw}" height="${hgt}"><title>${clock(t0 + k * binS)}: ${n} request${n > 1 ? "s" : ""}${errs[k] ? `, ${errs[k]} failed` : ""}</title></rect>`);
    });
  });
  for (const e of S.events) {
    if (e.kind !== "switch" || e.t < t0) continue;
    const xx = x(e.t);
    const label = `${clock(e.t)} switch ${(e.from || []).join("+") || "none"} → ${(e.to || []).join("+")} in ${fmtS(e.seconds)}`;
    parts.push(`<line class="switch" x1="${xx}" x2="${xx}" y1="${top - 4}" y2="${height - axisH}"><title>${esc(label)}</title></line>`);
    parts.push(`<path class="switch" d="M${xx - 4},${top - 6} L${xx + 4},${top - 6} L${xx},${top}" fill="var(--switch)"><title>${esc(label)}</title></path>`);
  }
  if (!known.length) parts.push(`<text class="empty" x="${labelW}" y="${top + 16}">Nothing ran in this time.</text>`);
  el.innerHTML = `<svg viewBox="0 0 ${width} ${height}" height="${height}" role="img" aria-label="timeline of the last hour">${parts.join("")}</svg>`;
  renderRecent();
}
function renderRecent() {
  const items = S.events.filter((e) => e.t >= now() - spanNow()).filter((e) => e.kind === "switch" || (e.kind === "state" && e.state === "failed") ||
    e.kind === "action" || (e.kind === "request" && e.error)).slice(-8).reverse();
  $("#recent").innerHTML = items.map((e) => {
    let text, bad = false;
    if (e.kind === "switch") text = `switch ${(e.from || []).join("+") || "none"} → ${(e.to || []).join("+")} in ${fmtS(e.seconds)}`;
    else if (e.kind === "state") { text = `${e.model} failed`; bad = true; }
    else if (e.kind === "action") { text = `${e.action} ${e.model} from this page${e.ok ? "" : `: ${e.error}`}`; bad = !e.ok; }
    else { text = `${e.model}: request answered ${e.code}${e.stream ? " (stream)" : ""}`; bad = true; }
    return `<li class="${bad ? "bad" : ""}"><span class="t">${clock(e.t)}</span>${esc(text)}</li>`;
  }).join("") || `<li>No switches or failures in this time.</li>`;
}

// --- logs -----------------------------------------------------------------------------------------
function renderLogChoices() {
  const names = sortedServers().map((s) => s.profile);
  const sel = $("#log-select");
  const have = [...sel.options].map((o) => o.value).join("\n");
  if (have !== names.join("\n")) {
    sel.innerHTML = names.map((n) => `<option value="${esc(n)}">${esc(n)}</option>`).join("");
  }
  // Follow the active server until the user picks one.
  const follow = S.logChosen && names.includes(S.logChosen) ? S.logChosen : (S.status.active || [])[0] || names[0] || null;
  if (follow !== S.logFor) {
    S.logFor = follow;
    if (S.logFor) setTimeout(() => refreshLog(true));
  }
  if (S.logFor) sel.value = S.logFor;
}
$("#log-select").addEventListener("change", (e) => {
  S.logFor = S.logChosen = e.target.value;
  refreshLog(true);
});
async function refreshLog(force) {
  if (!S.logFor || $("#tab-servers").hidden || document.hidden) return;
  const name = S.logFor;
  try {
    const res = await api(`/mm/api/logs/${encodeURIComponent(name)}?lines=200`);
    const doc = res.ok ? await res.json() : { lines: [], path: "" };
    if (name !== S.logFor) return;
    const pre = $("#log");
    const atEnd = force || pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 8;
    const html = doc.lines.map((l) => {
      const cls = /\b(ERROR|CRITICAL|Traceback|Error:)/.test(l) ? "err" : /\bWARN(ING)?\b/.test(l) ? "warn" : "";
      return cls ? `<span class="${cls}">${esc(l)}</span>` : esc(l);
    }).join("\n");
    if (pre.dataset.html !== html) {
      pre.innerHTML = html || `<span class="muted">(empty)</span>`;
      pre.dataset.html = html;
    }
    $("#log-path").textContent = doc.path || "";
    if (atEnd) pre.scrollTop = pre.scrollHeight;
  } catch (e) {
    console.warn("log:", e);
  }
}

// --- results --------------------------------------------------------------------------------------
async function loadResults() {
  const res = await api("/mm/api/results");
  const doc = await res.json();
  $("#results-root").textContent = doc.root;
  const groups = {};
  for (const f of doc.files) {
    const dir = f.path.includes("/") ? f.path.slice(0, f.path.lastIndexOf("/")) : "";
    (groups[dir] = groups[dir] || []).push(f);
  }
  const dirs = Object.keys(groups).sort((a, b) => (a === "" ? -1 : b === "" ? 1 : a.localeCompare(b)));
  $("#results-list").innerHTML = dirs.map((dir) => (dir ? `<li class="dir">${esc(dir)}</li>` : "") +
    groups[dir].sort((a, b) => (a.path.endsWith(".md") ? -1 : 0) - (b.path.endsWith(".md") ? -1 : 0) || b.mtime - a.mtime)
      .map((f) => `<li><a href="#results" data-result="${esc(f.path)}"><span>${esc(f.path.slice(dir ? dir.length + 1 : 0))}</span><span>${fmtSize(f.size)}</span></a></li>`).join("")).join("")
    || `<li class="muted">No results yet: <code>mm bench</code> and <code>mm eval</code> write them.</li>`;
  S.resultsLoaded = true;
  const summary = doc.files.find((f) => f.path === "summary.md");
  if (summary && !$("#result-view").dataset.path) showResult(summary.path);
}
function fmtSize(n) {
  return n >= 1048576 ? `${(n / 1048576).toFixed(1)} MB` : n >= 1024 ? `${Math.round(n / 1024)} kB` : `${n} B`;
}
async function blobUrl(path) {
  const res = await api(`/mm/results/${path.split("/").map(encodeURIComponent).join("/")}`);
  return res.ok ? URL.createObjectURL(await res.blob()) : "";
}
async function showResult(path) {
  const view = $("#result-view");
  view.dataset.path = path;
  document.querySelectorAll("#results-list a").forEach((a) => a.classList.toggle("sel", a.dataset.result === path));
  const enc = path.split("/").map(encodeURIComponent).join("/");
  if (path.endsWith(".md")) {
    const res = await api(`/mm/api/results/html/${enc}`);
    const doc = await res.json();
    view.innerHTML = doc.html || `<p class="error">${esc(doc.error)}</p>`;
    for (const img of view.querySelectorAll("img[data-result]")) img.src = await blobUrl(img.dataset.result);
  } else if (/\.(png|svg)$/.test(path)) {
    view.innerHTML = `<h2>${esc(path)}</h2><img alt="${esc(path)}">`;
    view.querySelector("img").src = await blobUrl(path);
  } else {
    const res = await api(`/mm/results/${enc}`);
    let text = await res.text();
    if (path.endsWith(".json")) { try { text = JSON.stringify(JSON.parse(text), null, 2); } catch (e) { /* shown as is */ } }
    view.innerHTML = `<h2>${esc(path)}</h2><pre>${esc(text)}</pre>`;
  }
}
document.addEventListener("click", (e) => {
  const a = e.target.closest("a[data-result]");
  if (a) { e.preventDefault(); showResult(a.dataset.result); }
});

// --- tabs and timers ------------------------------------------------------------------------------
function showTab() {
  const tab = location.hash === "#results" ? "results" : "servers";
  document.querySelectorAll(".tab").forEach((a) => a.classList.toggle("active", a.dataset.tab === tab));
  $("#tab-servers").hidden = tab !== "servers";
  $("#tab-results").hidden = tab !== "results";
  if (tab === "results" && !S.resultsLoaded) loadResults();
  if (tab === "servers") { renderTimeline(); refreshLog(true); }
}
window.addEventListener("hashchange", showTab);
window.addEventListener("resize", () => renderTimeline());
setInterval(() => { prune(); renderTimeline(); if (S.status) renderHeader(); }, 5000);
setInterval(() => refreshLog(false), 3000);
setSpan(S.span);
showTab();
stream();
