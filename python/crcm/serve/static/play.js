// crcm play: draws the model's frames and sends the held action (world models) or the prompt
// (text-to-video models). Protocol: docs/play.md.
"use strict";

const $ = (id) => document.getElementById(id);
const canvas = $("screen");
const ctx = canvas.getContext("2d");

// Default keys by action name (Atari-style names); other actions get digit keys 1–9.
const NAMED_KEYS = {
  fire: ["Space"], up: ["ArrowUp", "KeyW"], down: ["ArrowDown", "KeyS"],
  left: ["ArrowLeft", "KeyA"], right: ["ArrowRight", "KeyD"],
};
const KEY_LABELS = { Space: "space", ArrowUp: "↑", ArrowDown: "↓", ArrowLeft: "←",
                     ArrowRight: "→", KeyW: "W", KeyA: "A", KeyS: "S", KeyD: "D" };

// What the tests (and a curious player) can read: the last frames with their checksums.
const state = window.crcmPlay = {
  ws: null, model: null, hello: null, paused: false, open: false, error: null,
  frames: [], received: 0, action: 0, seq: 0, sessions: 0,
  prompt: null, promptSeq: 0, pendingPrompt: null,  // text-to-video models
};
let keyToAction = new Map();
let held = [];  // held key codes, most recent last
const sentAt = new Map();  // input seq → performance.now() when it was sent
let lastAnswered = 0;
let latencies = [];
let serverLatencies = [];
let frameTimes = [];
let image = null;

function setStatus(text, bad = false) {
  $("status").textContent = text;
  $("status").classList.toggle("bad", bad);
}

function connect(model, steps) {
  const params = new URLSearchParams();
  if (model) params.set("model", model);
  if (steps) params.set("steps", steps);
  const proto = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${proto}://${location.host}/ws?${params}`);
  ws.binaryType = "arraybuffer";
  state.ws = ws;
  ws.onopen = () => { state.open = true; setStatus("connected"); };
  ws.onmessage = (ev) => (typeof ev.data === "string" ? onJson(JSON.parse(ev.data)) : onFrame(ev.data));
  ws.onclose = (ev) => {
    state.open = false;
    if (state.ws === ws) setStatus(`disconnected${ev.reason ? ": " + ev.reason : ""} — press reset`, true);
  };
}

function send(obj) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(obj));
}

function onJson(msg) {
  if (msg.type === "hello") {
    state.hello = msg;
    fillSelect($("model"), msg.models.map((m) => [m.name, m.label]));
    const steps = [];
    for (let k = 1; k <= msg.limits.max_steps; k++) steps.push([String(k), String(k)]);
    fillSelect($("steps"), steps);
    if (msg.limits.max_prompt_chars) $("prompt").maxLength = msg.limits.max_prompt_chars;
    $("players").textContent = `${msg.sessions} / ${msg.limits.max_sessions}`;
  } else if (msg.type === "session") {
    startSession(msg);
  } else if (msg.type === "prompt") {
    // The server took the prompt: frames from msg.from_frame on are made with it.
    state.pendingPrompt = msg;
    if (state.prompt === null) showPrompt(msg.text);
    else $("prompt-now").textContent = `${state.prompt} → switching to: ${msg.text}`;
  } else if (msg.type === "error") {
    state.error = msg;
    setStatus(`${msg.code}: ${msg.message}`, true);
  }
}

function fillSelect(select, options) {
  select.replaceChildren(...options.map(([value, label]) => new Option(label, value)));
}

function startSession(msg) {
  const m = msg.model;
  state.model = m;
  state.sessions += 1;
  state.frames = [];
  state.received = 0;
  state.action = m.idle_action;
  held = [];
  sentAt.clear();
  latencies = []; serverLatencies = []; frameTimes = [];
  $("model").value = m.name;
  $("steps").value = String(msg.steps);
  $("untrained").hidden = !m.untrained;
  const text = m.kind === "text";
  $("prompt-form").hidden = !text;
  $("keys").hidden = text;
  $("action-row").hidden = text;
  $("latency-label").textContent = text ? "prompt → frame" : "input → frame";
  $("server-latency-label").textContent = text ? "server (prompt → send)" : "server (push → send)";
  $("steps-label").textContent = text ? "steps per chunk" : "steps per frame";
  state.prompt = null;
  state.pendingPrompt = null;
  if (text) {
    state.seq = Math.max(state.seq, msg.prompt_seq || 0);
    state.promptSeq = msg.prompt_seq || 0;
    if (msg.prompt !== null && msg.prompt !== undefined) {
      showPrompt(msg.prompt);
      if (!$("prompt").value) $("prompt").value = msg.prompt;
    } else {
      $("prompt-now").textContent = "(no prompt yet)";
      $("prompt-submit").textContent = "Generate";
    }
  }
  const [h, w] = m.frame_shape;
  canvas.width = w; canvas.height = h;
  const scale = Math.max(1, Math.floor(512 / Math.max(h, w)));
  canvas.style.width = `${w * scale}px`; canvas.style.height = `${h * scale}px`;
  image = ctx.createImageData(w, h);
  buildLegend(m);
  if (!text) setStatus(`playing ${m.label}`);
  else setStatus(state.prompt === null ? `${m.label}: type a prompt` : `streaming ${m.label}`);
}

function showPrompt(text) {
  state.prompt = text;
  $("prompt-now").textContent = text;
  $("prompt-submit").textContent = "Switch";
  if (state.model) setStatus(`streaming ${state.model.label}`);
}

function sendPrompt(ev) {
  ev.preventDefault();  // a form submit (the button, or Enter in the box) never reloads
  const text = $("prompt").value.trim();
  if (!text || !state.model || state.model.kind !== "text") return;
  state.seq += 1;
  sentAt.set(state.seq, performance.now());
  if (sentAt.size > 256) sentAt.delete(sentAt.keys().next().value);
  send({ type: "prompt", text, seq: state.seq });
}

function buildLegend(m) {
  keyToAction = new Map();
  const items = [];
  let digit = 1;
  m.action_names.forEach((name, i) => {
    let keys = i === m.idle_action ? [] : NAMED_KEYS[name.toLowerCase()];
    if (keys === undefined) keys = digit <= 9 ? [`Digit${digit++}`] : [];
    keys.forEach((k) => keyToAction.set(k, i));
    const label = i === m.idle_action && keys.length === 0
      ? "(no key)" : keys.map((k) => KEY_LABELS[k] || k.replace("Digit", "")).join(" / ");
    items.push([i, label, name]);
  });
  $("legend").replaceChildren(...items.map(([i, label, name]) => {
    const li = document.createElement("li");
    li.dataset.action = i;
    li.innerHTML = `<kbd></kbd>`;
    li.firstChild.textContent = label;
    li.append(name);
    return li;
  }));
}

function currentAction() {
  return held.length ? keyToAction.get(held[held.length - 1]) : state.model.idle_action;
}

function actionChanged() {
  if (state.model.kind === "text") return;  // no actions: a prompt drives it
  const action = currentAction();
  if (action === state.action) return;
  state.action = action;
  state.seq += 1;
  sentAt.set(state.seq, performance.now());
  if (sentAt.size > 256) sentAt.delete(sentAt.keys().next().value);
  send({ type: "action", action, seq: state.seq });
  for (const li of $("legend").children) li.classList.toggle("held", Number(li.dataset.action) === action);
}

function onFrame(buf) {
  const view = new DataView(buf);
  const headerBytes = view.getUint16(0, true);
  const c = view.getUint8(2), action = view.getUint8(3);
  const h = view.getUint16(4, true), w = view.getUint16(6, true);
  const index = view.getUint32(8, true), seq = view.getUint32(12, true);
  const serverUs = view.getUint32(16, true);
  if (!image || image.width !== w || image.height !== h) return;  // a frame of an old session
  const px = new Uint8Array(buf, headerBytes, h * w * c);
  const out = image.data;
  let hash = 0x811c9dc5;  // FNV-1a of the pixels: lets tests compare frames across runs
  for (let i = 0, j = 0; i < h * w; i++, j += c) {
    const r = px[j], g = c >= 3 ? px[j + 1] : r, b = c >= 3 ? px[j + 2] : r;
    out[4 * i] = r; out[4 * i + 1] = g; out[4 * i + 2] = b; out[4 * i + 3] = 255;
  }
  for (let i = 0; i < px.length; i++) hash = Math.imul(hash ^ px[i], 16777619) >>> 0;
  ctx.putImageData(image, 0, 0);

  const now = performance.now();
  state.received += 1;
  state.frames.push({ index, action, seq, hash });
  if (state.frames.length > 600) state.frames.shift();
  const firstOfSeq = seq > lastAnswered;
  if (firstOfSeq && sentAt.has(seq)) {
    latencies.push(now - sentAt.get(seq));
    if (latencies.length > 30) latencies.shift();
  }
  lastAnswered = Math.max(lastAnswered, seq);
  // A text model's frames count from their prompt's arrival: only the first one of a prompt
  // measures its latency.
  if (state.model.kind !== "text" || firstOfSeq) {
    serverLatencies.push(serverUs / 1000);
    if (serverLatencies.length > 30) serverLatencies.shift();
  }
  const pending = state.pendingPrompt;
  if (pending && seq === pending.seq && index >= pending.from_frame) {
    state.pendingPrompt = null;
    state.promptSeq = seq;
    showPrompt(pending.text);
  }
  frameTimes.push(now);
  while (frameTimes.length && frameTimes[0] < now - 1000) frameTimes.shift();
  $("frame-index").textContent = index;
  $("action").textContent = state.model.action_names[action] ?? action;
}

const median = (xs) => (xs.length ? [...xs].sort((a, b) => a - b)[xs.length >> 1] : NaN);
const ms = (x) => (Number.isNaN(x) ? "–" : `${x.toFixed(0)} ms`);

setInterval(() => {
  $("fps").textContent = state.paused ? "paused" : frameTimes.length.toFixed(0);
  $("latency").textContent = ms(median(latencies));
  $("server-latency").textContent = ms(median(serverLatencies));
}, 250);

function togglePause() {
  state.paused = !state.paused;
  send({ type: "pause", paused: state.paused });
  $("pause").textContent = state.paused ? "resume (P)" : "pause (P)";
}

function reset() {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) {
    send({ type: "reset" });
  } else {
    connect($("model").value, $("steps").value);
  }
  if (state.paused) togglePause();
}

document.addEventListener("keydown", (ev) => {
  // Typing a prompt is not playing: P, R and the action keys are text there.
  if (ev.target instanceof HTMLSelectElement || ev.target instanceof HTMLInputElement) return;
  if (ev.code === "KeyP") { togglePause(); return; }
  if (ev.code === "KeyR") { reset(); return; }
  if (!keyToAction.has(ev.code)) return;
  ev.preventDefault();  // arrows and space would scroll the page
  if (!ev.repeat && !held.includes(ev.code)) held.push(ev.code);
  actionChanged();
});
document.addEventListener("keyup", (ev) => {
  held = held.filter((k) => k !== ev.code);
  if (state.model) actionChanged();
});
window.addEventListener("blur", () => { held = []; if (state.model) actionChanged(); });
// Controls give the focus back at once: space (FIRE) must not click a focused button.
$("pause").onclick = (ev) => { ev.currentTarget.blur(); togglePause(); };
$("reset").onclick = (ev) => { ev.currentTarget.blur(); reset(); };
$("prompt-form").onsubmit = sendPrompt;
// A new model starts at the server's steps for its kind (a text model's own, e.g. 4): a world
// model's steps do not carry over to it, so only the steps selector sends steps.
$("model").onchange = (ev) => {
  ev.currentTarget.blur();
  send({ type: "config", model: $("model").value });
};
$("steps").onchange = (ev) => {
  ev.currentTarget.blur();
  send({ type: "config", model: $("model").value, steps: Number($("steps").value) });
};

connect();
