/* loramill console: a client of the public API and nothing else.
 *
 * The tenant's API key lives in sessionStorage (gone when the tab closes) and leaves the page only
 * as an `Authorization: Bearer` header on /v1/ requests. Everything a tenant wrote (names, events,
 * model answers) reaches the DOM as text nodes, never through an HTML parser, so no markup from data.
 * Views: #/jobs, #/jobs/<id>, #/models, #/playground; each view polls while shown and stops when left.
 */
"use strict";

const KEY_STORAGE = "loramill.apiKey";
const JOB_POLL_MS = 1500;
const LIST_POLL_MS = 3000;
const FINISHED = new Set(["succeeded", "failed", "cancelled"]);

// ---- the API ---------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function apiKey() { return sessionStorage.getItem(KEY_STORAGE); }

async function errorMessage(response) {
  try { return (await response.json()).error.message; } catch { return `${response.status} ${response.statusText}`; }
}

/* fetch a /v1/ path with the key; JSON answers parsed, errors thrown as ApiError (401 signs out). */
async function request(path, { method = "GET", json, form, signal, raw = false } = {}) {
  const headers = { Authorization: `Bearer ${apiKey()}` };
  let body;
  if (json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(json); }
  if (form !== undefined) body = form;
  const response = await fetch(path, { method, headers, body, signal, credentials: "omit", cache: "no-store",
                                       referrerPolicy: "no-referrer" });
  if (!response.ok) {
    const message = await errorMessage(response);
    if (response.status === 401) { signOut(message); }
    throw new ApiError(response.status, message);
  }
  return raw ? response : response.json();
}

/* Every row of a paged list (newest first). */
async function listAll(path, limit = 100) {
  const rows = [];
  let after = null;
  for (;;) {
    const query = new URLSearchParams({ limit: String(limit) });
    if (after) query.set("after", after);
    const page = await request(`${path}?${query}`);
    rows.push(...page.data);
    if (!page.has_more || !page.data.length) return rows;
    after = page.last_id;
  }
}

// ---- DOM helpers (text only) -----------------------------------------------------------------

/* el("tag", {class, on: {click}, ...attributes}, ...children): strings become text nodes. */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "on") for (const [event, fn] of Object.entries(value)) node.addEventListener(event, fn);
    else if (name === "class") node.className = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const SVG_NS = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  for (const child of children.flat()) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

function replace(node, ...children) { node.replaceChildren(); return append(node, children); }

function when(seconds) { return seconds ? new Date(seconds * 1000).toLocaleString() : "—"; }
function bytes(n) {
  if (n == null) return "—";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}
function status(value) { return el("span", { class: `status ${value}`, "data-status": value }, value); }
function errorBox(error) { return el("p", { class: "error", role: "alert" }, error instanceof Error ? error.message : String(error)); }

// ---- views and routing -----------------------------------------------------------------------

const app = () => document.getElementById("app");
let leaveView = () => {};

/* Runs `tick` now and then every `ms` until the view is left or `tick` returns true (done). */
function poll(tick, ms) {
  let timer = null, stopped = false;
  const run = async () => {
    let done = false;
    try { done = await tick(); } catch (error) { if (!(error instanceof ApiError && error.status === 401)) console.error(error); }
    if (!stopped && !done) timer = setTimeout(run, ms);
  };
  run();
  return () => { stopped = true; clearTimeout(timer); };
}

function route() {
  leaveView();
  leaveView = () => {};
  const nav = document.getElementById("nav");
  if (!apiKey()) { nav.hidden = true; showSignIn(); return; }
  nav.hidden = false;
  const [, view = "jobs", id] = location.hash.replace(/^#/, "").split("/");
  for (const link of nav.querySelectorAll("a")) link.classList.toggle("active", link.dataset.view === view);
  const views = { jobs: id ? () => showJob(decodeURIComponent(id)) : showJobs, models: showModels, playground: showPlayground };
  leaveView = (views[view] || showJobs)() || (() => {});
}

function signOut(why) {
  sessionStorage.removeItem(KEY_STORAGE);
  route();
  if (why) app().querySelector(".signin")?.append(errorBox(why));
}

function showSignIn() {
  const key = el("input", { type: "password", name: "api-key", autocomplete: "off", required: true, id: "api-key" });
  const problem = el("div");
  const form = el("form", { on: { submit: async (event) => {
    event.preventDefault();
    replace(problem);
    const response = await fetch("/v1/models", { headers: { Authorization: `Bearer ${key.value.trim()}` },
                                                 credentials: "omit", cache: "no-store" });
    if (!response.ok) { replace(problem, errorBox(await errorMessage(response))); return; }
    sessionStorage.setItem(KEY_STORAGE, key.value.trim());
    if (!location.hash || location.hash === "#/") location.hash = "#/jobs"; else route();
  } } }, el("label", { for: "api-key" }, "API key", key), el("button", { type: "submit" }, "Sign in"), problem);
  replace(app(), el("section", { class: "signin" }, el("h1", {}, "Sign in"),
    el("p", { class: "muted" }, "Your tenant's API key. It is kept in this tab's session storage only."), form));
}

// ---- jobs ------------------------------------------------------------------------------------

async function baseModels() {
  return (await request("/v1/models")).data.filter((m) => m.owned_by === "system").map((m) => m.id);
}

async function uploadDataset(file) {
  const form = new FormData();
  form.append("purpose", "fine-tune");
  form.append("file", file, file.name);
  return request("/v1/files", { method: "POST", form });
}

function numberOrAuto(value, parse) { return value.trim() === "" ? "auto" : parse(value); }

function newJobForm() {
  const model = el("select", { name: "model", required: true });
  const training = el("input", { type: "file", name: "training_file", accept: ".jsonl", required: true });
  const validation = el("input", { type: "file", name: "validation_file", accept: ".jsonl" });
  const epochs = el("input", { type: "number", name: "n_epochs", min: 1, max: 50, placeholder: "auto" });
  const batch = el("input", { type: "number", name: "batch_size", min: 1, max: 256, placeholder: "auto" });
  const lrm = el("input", { type: "number", name: "learning_rate_multiplier", step: "any", min: 0, placeholder: "auto" });
  const seqLen = el("input", { type: "number", name: "max_seq_len", min: 8, placeholder: "512" });
  const suffix = el("input", { type: "text", name: "suffix", maxlength: 64, pattern: "[A-Za-z0-9_-]+" });
  const submit = el("button", { type: "submit" }, "Upload and start");
  const note = el("div");
  baseModels().then((names) => append(model, names.map((name) => el("option", { value: name }, name))))
    .catch((error) => replace(note, errorBox(error)));
  const form = el("form", { class: "grid", id: "new-job", on: { submit: async (event) => {
    event.preventDefault();
    submit.disabled = true;
    try {
      replace(note, el("span", { class: "muted" }, "Uploading…"));
      const trainingFile = await uploadDataset(training.files[0]);
      const validationFile = validation.files[0] ? await uploadDataset(validation.files[0]) : null;
      const hyperparameters = { n_epochs: numberOrAuto(epochs.value, parseInt), batch_size: numberOrAuto(batch.value, parseInt),
                                learning_rate_multiplier: numberOrAuto(lrm.value, parseFloat) };
      if (seqLen.value.trim()) hyperparameters.max_seq_len = parseInt(seqLen.value);
      const body = { model: model.value, training_file: trainingFile.id, hyperparameters };
      if (validationFile) body.validation_file = validationFile.id;
      if (suffix.value.trim()) body.suffix = suffix.value.trim();
      const job = await request("/v1/fine_tuning/jobs", { method: "POST", json: body });
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (error) {
      replace(note, errorBox(error));
    } finally {
      submit.disabled = false;
    }
  } } },
  el("label", {}, "Base model", model), el("label", {}, "Training data (.jsonl)", training),
  el("label", {}, "Validation data (optional)", validation), el("label", {}, "Epochs", epochs),
  el("label", {}, "Batch size", batch), el("label", {}, "Learning rate multiplier", lrm),
  el("label", {}, "Max sequence length", seqLen), el("label", {}, "Model name suffix", suffix), submit);
  return el("section", {}, el("h2", {}, "New fine-tuning job"), form, note);
}

function showJobs() {
  const body = el("tbody");
  const problem = el("div");
  replace(app(), el("h1", {}, "Fine-tuning jobs"), newJobForm(),
    el("section", {}, el("table", { id: "jobs" }, el("thead", {}, el("tr", {}, ["Job", "Base model", "Status", "Created",
      "Fine-tuned model"].map((h) => el("th", {}, h)))), body), problem));
  return poll(async () => {
    try {
      const jobs = await listAll("/v1/fine_tuning/jobs");
      replace(body, jobs.length ? jobs.map((job) => el("tr", { "data-job": job.id },
        el("td", {}, el("a", { href: `#/jobs/${encodeURIComponent(job.id)}`, class: "mono" }, job.id)),
        el("td", {}, job.model), el("td", {}, status(job.status)), el("td", {}, when(job.created_at)),
        el("td", { class: "mono" }, job.fine_tuned_model || "—"))) : el("tr", {}, el("td", { colspan: 5, class: "muted" }, "No jobs yet.")));
      replace(problem);
    } catch (error) { replace(problem, errorBox(error)); }
  }, LIST_POLL_MS);
}

/* A job's events, fetched incrementally: newest pages until one holds an event already seen. */
class EventLog {
  constructor(jobId) { this.jobId = jobId; this.byId = new Map(); }
  async refresh() {
    const fresh = [];
    let after = null;
    for (;;) {
      const query = new URLSearchParams({ limit: "1000" });
      if (after) query.set("after", after);
      const page = await request(`/v1/fine_tuning/jobs/${encodeURIComponent(this.jobId)}/events?${query}`);
      const unseen = page.data.filter((event) => !this.byId.has(event.id));
      fresh.push(...unseen);
      if (unseen.length < page.data.length || !page.has_more) break;
      after = page.last_id;
    }
    for (const event of fresh.reverse()) this.byId.set(event.id, event);  // oldest first
    return fresh.length;
  }
  get events() { return [...this.byId.values()]; }
  /* {train: [[step, loss]...], valid: [[step, loss]...]}, by step (a resumed attempt's rows replace a dead one's). */
  series() {
    const train = new Map(), valid = new Map();
    for (const event of this.events) {
      const data = event.type === "metrics" ? event.data : null;
      if (!data || typeof data.step !== "number") continue;
      if (typeof data.train_loss === "number") train.set(data.step, data.train_loss);
      if (typeof data.valid_loss === "number") valid.set(data.step, data.valid_loss);
    }
    const sorted = (map) => [...map.entries()].sort((a, b) => a[0] - b[0]);
    return { train: sorted(train), valid: sorted(valid) };
  }
}

function niceTicks(low, high, count = 5) {
  if (!(high > low)) high = low + 1;
  const raw = (high - low) / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * power).find((s) => s >= raw);
  const ticks = [];
  const last = Math.ceil(high / step - 1e-9) * step;  // the top tick is at or above `high`: nothing drawn off the plot
  for (let t = Math.floor(low / step + 1e-9) * step; t <= last + step * 1e-9; t += step) ticks.push(Number(t.toFixed(10)));
  return ticks;
}

/* The loss chart: an SVG with both curves, labelled axes, and the step and losses under the pointer. */
class LossChart {
  constructor() {
    this.width = 760; this.height = 300;
    this.margin = { left: 58, right: 16, top: 14, bottom: 42 };
    this.root = svg("svg", { viewBox: `0 0 ${this.width} ${this.height}`, role: "img", "aria-label": "Training and validation loss by step" });
    this.node = el("div", { class: "chart", id: "loss-chart" }, this.root,
      el("div", { class: "legend" }, el("span", { class: "train" }, "training loss"), el("span", { class: "valid" }, "validation loss")));
    this.data = { train: [], valid: [] };
    this.totalSteps = 0;
    this.root.addEventListener("pointermove", (event) => this.pointer(event));
    this.root.addEventListener("pointerleave", () => this.cursor && this.cursor.remove());
  }

  update(data, totalSteps) { this.data = data; this.totalSteps = totalSteps || 0; this.draw(); }

  draw() {
    const { width, height, margin } = this;
    const all = [...this.data.train, ...this.data.valid];
    const maxStep = Math.max(1, this.totalSteps, ...all.map((p) => p[0]));
    const losses = all.map((p) => p[1]);
    const top = losses.length ? Math.max(...losses) : 1;
    const bottom = losses.length ? Math.min(0, Math.min(...losses)) : 0;
    const xTicks = niceTicks(0, maxStep), yTicks = niceTicks(bottom, top * 1.05);
    const xMax = Math.max(maxStep, xTicks[xTicks.length - 1]), yMax = yTicks[yTicks.length - 1], yMin = yTicks[0];
    const x = (step) => margin.left + (step / xMax) * (width - margin.left - margin.right);
    const y = (loss) => height - margin.bottom - ((loss - yMin) / (yMax - yMin || 1)) * (height - margin.top - margin.bottom);
    Object.assign(this, { x, y, xMax });
    const path = (points) => points.map(([s, l], i) => `${i ? "L" : "M"}${x(s).toFixed(1)},${y(l).toFixed(1)}`).join("");
    const plotBottom = height - margin.bottom;
    this.root.replaceChildren(
      svg("g", { class: "grid" }, yTicks.map((t) => svg("line", { x1: margin.left, x2: width - margin.right, y1: y(t), y2: y(t) }))),
      svg("g", { class: "axis axis-x" }, svg("line", { x1: margin.left, x2: width - margin.right, y1: plotBottom, y2: plotBottom }),
        xTicks.map((t) => svg("g", {}, svg("line", { x1: x(t), x2: x(t), y1: plotBottom, y2: plotBottom + 4 }),
          svg("text", { x: x(t), y: plotBottom + 16, "text-anchor": "middle" }, String(t))))),
      svg("g", { class: "axis axis-y" }, svg("line", { x1: margin.left, x2: margin.left, y1: margin.top, y2: plotBottom }),
        yTicks.map((t) => svg("g", {}, svg("line", { x1: margin.left - 4, x2: margin.left, y1: y(t), y2: y(t) }),
          svg("text", { x: margin.left - 7, y: y(t) + 4, "text-anchor": "end" }, String(t))))),
      svg("text", { class: "axis-label", x: (margin.left + width - margin.right) / 2, y: height - 6, "text-anchor": "middle" }, "step"),
      svg("text", { class: "axis-label", transform: `translate(14 ${(margin.top + plotBottom) / 2}) rotate(-90)`, "text-anchor": "middle" }, "loss"),
      svg("path", { class: "series-train", d: path(this.data.train), "data-points": this.data.train.length }),
      svg("path", { class: "series-valid", d: path(this.data.valid), "data-points": this.data.valid.length }),
      svg("g", {}, this.data.valid.map(([s, l]) => svg("circle", { class: "dot-valid", cx: x(s), cy: y(l), r: 3 }))),
      svg("g", {}, this.data.train.slice(-1).map(([s, l]) => svg("circle", { class: "dot-train", cx: x(s), cy: y(l), r: 3 }))),
    );
    if (!all.length) {
      this.root.append(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle" }, "No metrics yet"));
    }
  }

  nearest(points, step) {
    let best = null;
    for (const point of points) if (!best || Math.abs(point[0] - step) < Math.abs(best[0] - step)) best = point;
    return best;
  }

  pointer(event) {
    if (!this.data.train.length || !this.x) return;
    const box = this.root.getBoundingClientRect();
    const px = ((event.clientX - box.left) / box.width) * this.width;
    const step = ((px - this.margin.left) / (this.width - this.margin.left - this.margin.right)) * this.xMax;
    const train = this.nearest(this.data.train, step);
    const valid = this.data.valid.find((p) => p[0] === train[0]);
    const lines = [`step ${train[0]}`, `training loss ${train[1].toFixed(4)}`];
    if (valid) lines.push(`validation loss ${valid[1].toFixed(4)}`);
    const cx = this.x(train[0]), cy = this.y(train[1]);
    const boxWidth = 170, boxHeight = 16 * lines.length + 8;
    const left = cx + boxWidth + 12 > this.width ? cx - boxWidth - 8 : cx + 8;
    this.cursor?.remove();
    this.cursor = svg("g", { class: "cursor", "data-step": train[0] },
      svg("line", { x1: cx, x2: cx, y1: this.margin.top, y2: this.height - this.margin.bottom }),
      svg("circle", { cx, cy, r: 4, class: "dot-train" }),
      svg("rect", { x: left, y: this.margin.top, width: boxWidth, height: boxHeight, rx: 4 }),
      lines.map((line, i) => svg("text", { x: left + 8, y: this.margin.top + 18 + 16 * i }, line)));
    this.root.append(this.cursor);
  }
}

function showJob(jobId) {
  const summary = el("dl", { class: "kv", id: "job-summary" });
  const cancel = el("button", { type: "button", class: "danger", id: "cancel-job" }, "Cancel job");
  const chart = new LossChart();
  const events = el("table", { class: "events", id: "events" });
  const checkpoints = el("tbody");
  const problem = el("div");
  const log = new EventLog(jobId);
  let job = null;
  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try { job = await request(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST" }); render(); }
    catch (error) { replace(problem, errorBox(error)); cancel.disabled = false; }
  });
  replace(app(), el("p", {}, el("a", { href: "#/jobs" }, "← all jobs")),
    el("section", {}, el("h1", { class: "mono" }, jobId), summary, el("div", { class: "row" }, cancel), problem),
    el("section", {}, el("h2", {}, "Loss"), chart.node),
    el("section", {}, el("h2", {}, "Checkpoints"), el("table", { id: "checkpoints" }, el("thead", {}, el("tr", {},
      ["Step", "Training loss", "Validation loss", "Checkpoint", "Created"].map((h) => el("th", {}, h)))), checkpoints)),
    el("section", {}, el("h2", {}, "Events"), el("div", { class: "events" }, events)));

  const loss = (value) => (typeof value === "number" ? value.toFixed(4) : "—");
  function render() {
    const hp = job.hyperparameters || {};
    const lm = job.loramill_hyperparameters || {};
    const devices = lm.devices || 1;
    const rows = [["Status", status(job.status)], ["Base model", job.model], ["Fine-tuned model", job.fine_tuned_model || "—"],
      ["Training file", job.training_file], ["Validation file", job.validation_file || "—"],
      ["Epochs / batch / LR multiplier", `${hp.n_epochs} / ${hp.batch_size} / ${hp.learning_rate_multiplier}`],
      ...(devices > 1 ? [["Devices", `${devices} (${lm.sharding})`]] : []),
      ["Trained tokens", job.trained_tokens ?? "—"], ["Created", when(job.created_at)],
      ["Estimated finish", job.estimated_finish ? when(job.estimated_finish) : "—"], ["Finished", when(job.finished_at)]];
    if (job.error && job.error.message) rows.push(["Error", el("span", { class: "error" }, job.error.message)]);
    replace(summary, rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
    cancel.disabled = FINISHED.has(job.status);
  }

  return poll(async () => {
    try {
      job = await request(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}`);
      await log.refresh();
      const ckpts = await listAll(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/checkpoints`);
      render();
      const totals = log.events.filter((e) => e.type === "metrics" && e.data && e.data.total_steps).map((e) => e.data.total_steps);
      chart.update(log.series(), totals.length ? totals[totals.length - 1] : 0);
      replace(events, [...log.events].reverse().slice(0, 500).map((e) => el("tr", { class: `level-${e.level}` },
        el("td", { class: "muted" }, when(e.created_at)), el("td", {}, e.message))));
      replace(checkpoints, ckpts.length ? ckpts.map((c) => el("tr", {}, el("td", {}, c.step_number),
        el("td", {}, loss(c.metrics && c.metrics.train_loss)), el("td", {}, loss(c.metrics && c.metrics.valid_loss)),
        el("td", { class: "mono" }, c.fine_tuned_model_checkpoint), el("td", {}, when(c.created_at))))
        : el("tr", {}, el("td", { colspan: 5, class: "muted" }, "No checkpoints yet.")));
      replace(problem);
      return FINISHED.has(job.status);
    } catch (error) {
      replace(problem, errorBox(error));
      return error instanceof ApiError && error.status === 404;
    }
  }, JOB_POLL_MS);
}

// ---- adapters and merges ---------------------------------------------------------------------

async function sha256Hex(blob) {
  const digest = await crypto.subtle.digest("SHA-256", await blob.arrayBuffer());
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/* Fetches `path` with the key (never in a URL), checks the sha256 when one is known, then saves it. */
async function download(path, filename, expectedSha256, note) {
  replace(note, "downloading…");
  try {
    const response = await request(path, { raw: true });
    const blob = await response.blob();
    const expected = expectedSha256 || response.headers.get("X-Content-Sha256");
    if (expected && globalThis.crypto && crypto.subtle) {
      const actual = await sha256Hex(blob);
      if (actual !== expected) { replace(note, errorBox(`sha256 mismatch: got ${actual}, expected ${expected}; not saved`)); return; }
      replace(note, el("span", { class: "verified" }, "sha256 verified"));
    } else {
      replace(note, "saved (sha256 not checked: this page is not a secure context)");
    }
    const url = URL.createObjectURL(blob);
    const link = el("a", { href: url, download: filename });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  } catch (error) {
    replace(note, errorBox(error));
  }
}

function fileList(files, pathOf) {
  return el("ul", { class: "files" }, files.map((f) => {
    const note = el("span");
    return el("li", {}, el("button", { type: "button", class: "secondary", "data-download": f.name,
      on: { click: () => download(pathOf(f.name), f.name, f.sha256, note) } }, f.name),
      " ", el("span", { class: "muted" }, bytes(f.bytes)), " ", el("code", { "data-sha256": f.sha256 }, `sha256:${f.sha256}`), " ", note);
  }));
}

function archiveButton(path, filename) {
  const note = el("span");
  return el("div", {}, el("button", { type: "button", class: "secondary", on: { click: () => download(path, filename, null, note) } },
    "Download all (.tar)"), " ", note);
}

function showModels() {
  const adapters = el("tbody"), merges = el("tbody"), problem = el("div");
  replace(app(), el("h1", {}, "Adapters and merged checkpoints"), problem,
    el("section", {}, el("h2", {}, "Adapters"), el("table", { id: "adapters" }, el("thead", {}, el("tr", {},
      ["Adapter", "Base model", "Rank", "Created", "Files (sha256)"].map((h) => el("th", {}, h)))), adapters)),
    el("section", {}, el("h2", {}, "Merged checkpoints"), el("table", { id: "merges" }, el("thead", {}, el("tr", {},
      ["Merge", "Base model", "Status", "Method / dtype", "Files (sha256)"].map((h) => el("th", {}, h)))), merges)));
  let shown = "";
  return poll(async () => {
    try {
      const [adapterRows, mergeRows] = await Promise.all([listAll("/v1/adapters"), listAll("/v1/merges")]);
      const fingerprint = JSON.stringify([adapterRows, mergeRows]);
      if (fingerprint === shown) return false;  // unchanged: keep the download notes where they are
      shown = fingerprint;
      replace(adapters, adapterRows.length ? adapterRows.map((a) => el("tr", { "data-adapter": a.id },
        el("td", {}, el("div", { class: "mono" }, a.fine_tuned_model || a.name), el("div", { class: "muted mono" }, a.id)),
        el("td", {}, a.base_model), el("td", {}, a.rank), el("td", {}, when(a.created_at)),
        el("td", {}, fileList(a.files || [], (name) => `/v1/adapters/${encodeURIComponent(a.id)}/files/${encodeURIComponent(name)}`),
          archiveButton(`/v1/adapters/${encodeURIComponent(a.id)}/archive`, `${a.id}.tar`))))
        : el("tr", {}, el("td", { colspan: 5, class: "muted" }, "No adapters yet.")));
      replace(merges, mergeRows.length ? mergeRows.map((m) => el("tr", { "data-merge": m.id },
        el("td", { class: "mono" }, m.id), el("td", {}, m.base_model), el("td", {}, status(m.status)),
        el("td", {}, `${m.method} / ${m.dtype}`),
        el("td", {}, m.status === "succeeded" ? [fileList(m.files, (name) => `/v1/merges/${encodeURIComponent(m.id)}/files/${encodeURIComponent(name)}`),
          archiveButton(`/v1/merges/${encodeURIComponent(m.id)}/archive`, `${m.id}.tar`)] : (m.error && m.error.message) || "—")))
        : el("tr", {}, el("td", { colspan: 5, class: "muted" }, "No merges yet.")));
      replace(problem);
    } catch (error) { replace(problem, errorBox(error)); }
    return false;
  }, LIST_POLL_MS * 2);
}

// ---- playground ------------------------------------------------------------------------------

/* Streams one chat answer into `out` (server-sent events read from the fetch body). */
async function streamChat(model, prompt, maxTokens, out, signal) {
  const response = await request("/v1/chat/completions", { method: "POST", raw: true, signal,
    json: { model, messages: [{ role: "user", content: prompt }], max_tokens: maxTokens, stream: true } });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(500, chunk.error.message);
        const text = chunk.choices && chunk.choices[0] && chunk.choices[0].delta && chunk.choices[0].delta.content;
        if (text) out.append(document.createTextNode(text));
      }
    }
  }
}

function showPlayground() {
  const prompt = el("textarea", { id: "prompt", placeholder: "Ask something…", required: true });
  const maxTokens = el("input", { type: "number", id: "max-tokens", min: 1, value: 64 });
  const send = el("button", { type: "submit", id: "send" }, "Send");
  const stop = el("button", { type: "button", class: "secondary", id: "stop", disabled: true }, "Stop");
  const compare = el("input", { type: "checkbox", id: "compare" });
  const panes = [0, 1].map((i) => ({ select: el("select", { id: `model-${i}` }), answer: el("div", { class: "answer", id: `answer-${i}`, "aria-live": "polite" }), note: el("div") }));
  const paneNodes = panes.map((p, i) => el("div", { class: "pane", id: `pane-${i}`, hidden: i === 1 },
    el("label", {}, i ? "Compare with" : "Model", p.select), p.answer, p.note));
  compare.addEventListener("change", () => { paneNodes[1].hidden = !compare.checked; });
  const problem = el("div");
  let controller = null;
  stop.addEventListener("click", () => controller && controller.abort());
  request("/v1/models").then((models) => {
    for (const pane of panes) {
      append(pane.select, models.data.map((m) => el("option", { value: m.id },
        m.owned_by === "system" ? `${m.id} (base)` : `${m.id} (fine-tuned on ${m.parent})`)));
    }
    if (models.data.length > 1) panes[1].select.selectedIndex = 1;
  }).catch((error) => replace(problem, errorBox(error)));
  const form = el("form", { class: "prompt", on: { submit: async (event) => {
    event.preventDefault();
    controller = new AbortController();
    send.disabled = true; stop.disabled = false;
    const active = compare.checked ? panes : panes.slice(0, 1);
    await Promise.all(active.map(async (pane) => {
      replace(pane.answer); replace(pane.note, el("span", { class: "muted" }, "streaming…"));
      pane.answer.dataset.state = "streaming";
      try {
        await streamChat(pane.select.value, prompt.value, parseInt(maxTokens.value) || 64, pane.answer, controller.signal);
        replace(pane.note, el("span", { class: "muted" }, `done · ${pane.select.value}`));
        pane.answer.dataset.state = "done";
      } catch (error) {
        replace(pane.note, error.name === "AbortError" ? el("span", { class: "muted" }, "stopped") : errorBox(error));
        pane.answer.dataset.state = "error";
      }
    }));
    send.disabled = false; stop.disabled = true;
  } } }, el("label", { for: "prompt" }, "Prompt"), prompt,
  el("div", { class: "row" }, el("label", {}, "Max tokens", maxTokens),
    el("label", { class: "inline" }, el("span", {}, "Side by side"), compare), send, stop));
  replace(app(), el("h1", {}, "Playground"), el("section", {}, form, problem), el("section", {}, el("div", { class: "panes" }, paneNodes)));
}

// ---- start -------------------------------------------------------------------------------------

document.getElementById("sign-out").addEventListener("click", () => signOut());
window.addEventListener("hashchange", route);
route();
