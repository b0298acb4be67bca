// The playground page of `adapedit serve`: posts edits to /edit as server-sent events and
// shows what comes back. Every text from a user or the server goes into the page as text
// (textContent), never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  limits: null, engine: null, image: null, result: null, running: false, lastComputed: null,
};
const FIELDS = ["source", "target", "steps", "seed", "scheduler", "edit_type", "lambda_tau",
  "lambda_s", "local_blend", "reweight", "image", "inversion", "resize"];

function text(el, value) {
  el.textContent = value;
  return el;
}

function make(tag, cls, content) {
  const el = document.createElement(tag);
  if (cls) el.className = cls;
  if (content !== undefined) el.textContent = content;
  return el;
}

// -- errors ----------------------------------------------------------------------------------

class PageError extends Error {
  constructor(message, field) {
    super(message);
    this.field = field || null;
  }
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
  for (const name of FIELDS) {
    const el = $(name);
    if (el) el.removeAttribute("aria-invalid");
  }
  if ($("drop")) $("drop").classList.remove("invalid");
}

function showError(message, field, status) {
  const box = $("error");
  box.textContent = "";
  if (field) box.append(make("strong", "field", field), ": ");
  box.append(make("span", null, message));
  if (status) box.append(make("span", "muted", ` (HTTP ${status})`));
  box.hidden = false;
  const el = field && $(field);
  if (el) el.setAttribute("aria-invalid", "true");
  if (field === "image") $("drop").classList.add("invalid");
}

// -- the engine and the limits ---------------------------------------------------------------

async function loadHealth() {
  try {
    const response = await fetch("/healthz", { headers: { Accept: "application/json" } });
    const doc = await response.json();
    state.limits = doc.limits || null;
    state.engine = doc.engine || null;
    const e = doc.engine || {};
    text($("engine"), `model ${e.model || doc.model} · backend ${e.backend} · ${e.form} UNet · ` +
      `${e.precision} · ${e.shapes} shapes · ${e.attention_limits} attention limits · ` +
      `${e.device} · ${e.width}×${e.height}`);
  } catch (err) {
    text($("engine"), "the server does not answer /healthz");
  }
}

// -- the request -----------------------------------------------------------------------------

function words(value) {
  return value.split(/[\s,]+/).filter((w) => w.length > 0);
}

function parseReweight(value) {
  const out = {};
  for (const part of value.split(",").map((p) => p.trim()).filter((p) => p.length > 0)) {
    const [word, factor, extra] = part.split("=").map((p) => p.trim());
    const number = Number(factor);
    if (!word || factor === undefined || extra !== undefined || factor === "" || !Number.isFinite(number)) {
      throw new PageError(`expected word=factor pairs separated by commas, got "${part}"`, "reweight");
    }
    out[word] = number;
  }
  return out;
}

function integer(name) {
  const value = $(name).value.trim();
  if (!/^-?\d+$/.test(value)) throw new PageError(`expected an integer, got "${value}"`, name);
  return Number(value);
}

function buildRequest() {
  const body = {
    source: $("source").value,
    target: $("target").value,
    steps: integer("steps"),
    seed: integer("seed"),
    scheduler: $("scheduler").value,
    edit_type: $("edit_type").value,
    lambda_tau: Number($("lambda_tau").value),
    lambda_s: Number($("lambda_s").value),
  };
  // the attention rule the engine folder was exported under (an older folder's is not the default)
  if (state.engine && state.engine.attention_limits) {
    body.attention_limits = state.engine.attention_limits;
  }
  const blend = words($("local_blend").value);
  if (blend.length) body.local_blend = blend;
  const reweight = parseReweight($("reweight").value);
  if (Object.keys(reweight).length) body.reweight = reweight;
  if (state.image) {
    body.image = state.image.dataUrl;
    body.inversion = $("inversion").value;
    body.resize = $("resize").value;
  }
  return body;
}

// -- the given image -------------------------------------------------------------------------

function imageLimit() {
  return state.limits ? state.limits.max_image_body : null;
}

function takeFile(file) {
  clearError();
  if (!file) return;
  const limit = imageLimit();
  const body = Math.ceil(file.size / 3) * 4 + 4096; // base64 inside the JSON, prompts beside it
  if (limit !== null && body > limit) {
    forgetImage();
    showError(`${file.name} is ${file.size} bytes; an edit of a given image may send at most ` +
      `${limit} bytes of body (base64 adds a third), expected a smaller file`, "image", 413);
    return;
  }
  if (!/^image\/(png|jpeg|webp)$/.test(file.type)) {
    forgetImage();
    showError(`${file.name} is ${file.type || "of unknown type"}, expected a PNG, JPEG or WebP file`, "image");
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    state.image = { name: file.name, dataUrl: reader.result };
    text($("image-name"), `${file.name} (${file.size} bytes)`);
    $("clear-image").hidden = false;
    $("given-img").src = reader.result;
    $("given").hidden = false;
  };
  reader.onerror = () => showError(`could not read ${file.name}`, "image");
  reader.readAsDataURL(file);
}

function forgetImage() {
  state.image = null;
  $("image").value = "";
  text($("image-name"), "");
  $("clear-image").hidden = true;
  $("given").hidden = true;
  $("given-img").removeAttribute("src");
}

// -- progress --------------------------------------------------------------------------------

function setProgress(done, total, label) {
  const bar = $("progress");
  bar.max = total;
  bar.value = done;
  text($("stage"), label);
}

function onProgress(p) {
  // one more than the UNet steps: the bar ends when the images arrive, not at the last step
  setProgress(p.done, p.total + 1, `${p.stage} ${p.step}/${p.steps}`);
}

// -- the answer ------------------------------------------------------------------------------

async function showResult(doc, started) {
  state.result = doc;
  $("source-img").src = `data:image/png;base64,${doc.source_png}`;
  $("edited-img").src = `data:image/png;base64,${doc.edited_png}`;
  await Promise.all([$("source-img").decode(), $("edited-img").decode()]);
  $("overlay").hidden = true;
  text($("edited-caption"), "edited");
  if (doc.dps_weight_png) {
    $("dps-img").src = `data:image/png;base64,${doc.dps_weight_png}`;
    $("dps").hidden = false;
  } else {
    $("dps").hidden = true;
  }
  showWords(doc);
  showTimings(doc);
  showNote(doc);
  const bar = $("progress");
  bar.value = bar.max;
  const seconds = (performance.now() - started) / 1000;
  bar.dataset.seconds = seconds.toFixed(3); // from the action to the images shown
  text($("stage"), `done in ${seconds.toFixed(2)} s`);
}

function showWords(doc) {
  const list = $("words");
  list.replaceChildren();
  const keywords = new Set(doc.keywords || []);
  for (const w of doc.tau) {
    const item = make("li");
    const button = make("button", "word");
    button.type = "button";
    const label = make("span", "label", (keywords.has(w.word) ? "★ " : "") + w.word);
    const track = make("span", "track");
    const bar = make("span", "bar");
    bar.style.width = `${Math.round(Math.max(0, Math.min(1, w.tau)) * 100)}%`;
    track.append(bar);
    button.append(label, track, make("span", "value", w.tau.toFixed(2)));
    if (keywords.has(w.word)) button.classList.add("keyword");
    button.addEventListener("click", () => showMap(w, button));
    item.append(button);
    list.append(item);
  }
  text($("tau-self"), `τ_self ${doc.tau_self.toFixed(2)} (self-attention injection)` +
    (doc.notes && doc.notes.length ? ` · ${doc.notes.join(" · ")}` : ""));
}

function showMap(word, button) {
  const maps = state.result.attention_maps || [];
  const token = word.tokens[0]; // token k of the prompt is map k - 1 (no start token)
  const map = maps[token - 1];
  for (const b of document.querySelectorAll(".word.selected")) b.classList.remove("selected");
  button.classList.add("selected");
  if (!map) return;
  const overlay = $("overlay");
  overlay.src = `data:image/png;base64,${map.png}`;
  overlay.alt = `attention map of "${word.word}"`;
  overlay.hidden = false;
  text($("edited-caption"), `edited, with the attention of "${word.word}"`);
}

function seconds(value) {
  return value === undefined ? "" : `${value.toFixed(3)} s`;
}

function showTimings(doc) {
  const body = $("timings").tBodies[0];
  body.replaceChildren();
  const rows = [];
  for (const [stage, value] of Object.entries(doc.timings_s)) {
    const note = stage === "calibration" && doc.calibration !== "computed" ? ` (${doc.calibration})` : "";
    rows.push([stage, seconds(value) + note]);
  }
  if (doc.server) {
    rows.push(["waiting for an engine", seconds(doc.server.queue_s)]);
    rows.push(["at the server, in all", seconds(doc.server.total_s)]);
  }
  for (const [name, value] of rows) {
    const row = make("tr");
    row.dataset.stage = name;
    row.append(make("th", null, name), make("td", null, value));
    body.append(row);
  }
}

function showNote(doc) {
  const note = $("note");
  const total = doc.timings_s.total;
  if (doc.calibration === "cached" && state.lastComputed !== null) {
    text(note, `The calibration was reused from the server's cache: this edit took ` +
      `${total.toFixed(2)} s against ${state.lastComputed.toFixed(2)} s for the last one that ` +
      `computed it.`);
    note.hidden = false;
  } else if (doc.calibration === "cached") {
    text(note, "The calibration was reused from the server's cache.");
    note.hidden = false;
  } else {
    note.hidden = true;
  }
  if (doc.calibration === "computed") state.lastComputed = total;
}

// -- running an edit -------------------------------------------------------------------------

function parseEvent(block) {
  let kind = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) kind = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
  }
  return { kind, doc: data.length ? JSON.parse(data.join("\n")) : null };
}

async function run() {
  if (state.running) return;
  clearError();
  let body;
  try {
    body = JSON.stringify(buildRequest());
  } catch (err) {
    showError(err.message, err.field);
    return;
  }
  state.running = true;
  $("run").disabled = true;
  $("progress").dataset.state = "running";
  setProgress(0, 1, "waiting for the server");
  const started = performance.now();
  let finished = false;
  try {
    const response = await fetch("/edit", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body,
    });
    if (!response.ok) {
      const doc = await response.json().catch(() => null);
      const e = (doc && doc.error) || { message: response.statusText, field: null };
      showError(e.message, e.field, response.status);
      finished = true;
      return;
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = parseEvent(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (event.kind === "progress") onProgress(event.doc);
        else if (event.kind === "result") {
          finished = true;
          await showResult(event.doc, started);
        }
        else if (event.kind === "error") {
          const e = event.doc.error;
          showError(e.message, e.field, e.status);
          finished = true;
        }
      }
    }
    if (!finished) {
      showError("the server closed the connection before the edit finished; is it still running?");
    }
  } catch (err) {
    if (!finished) {
      showError(`lost the connection to the server before the edit finished (${err.message}); ` +
        "is it still running?");
    }
  } finally {
    state.running = false;
    $("run").disabled = false;
    $("progress").dataset.state = $("error").hidden ? "done" : "failed";
    if (!$("error").hidden) text($("stage"), "failed");
  }
}

// -- wiring ----------------------------------------------------------------------------------

function wire() {
  $("form").addEventListener("submit", (event) => {
    event.preventDefault();
    run();
  });
  for (const name of ["lambda_tau", "lambda_s"]) {
    const slider = $(name);
    slider.addEventListener("input", () => text($(`${name}-value`), Number(slider.value).toFixed(2)));
    // an edit-side option: after a first edit, moving it edits again (the calibration is cached)
    slider.addEventListener("change", () => { if (state.result) run(); });
  }
  $("image").addEventListener("change", () => takeFile($("image").files[0]));
  $("clear-image").addEventListener("click", forgetImage);
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    takeFile(event.dataTransfer.files[0]);
  });
  loadHealth();
}

document.addEventListener("DOMContentLoaded", wire);
