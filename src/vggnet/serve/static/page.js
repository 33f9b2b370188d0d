// vggnet serve's page: upload / drop / paste an image -> POST predict (top 5) -> POST explain (Grad-CAM PNG).
// Plain JavaScript, no dependencies, relative URLs (works behind a path prefix). Every request has a timeout
// and every error ends as words on the page; spinners are stopped in `finally`, so none is left turning.
"use strict";

(function () {
  const TIMEOUT_MS = Number(window.vggnetTimeoutMs) || 30000; // the override is for tests
  const KEY_STORE = "vggnet.apiKey";
  const $ = (id) => document.getElementById(id);
  const ui = {
    pickers: $("pickers"), modelField: $("model-field"), versionField: $("version-field"),
    model: $("model"), version: $("version"), layer: $("layer"),
    auth: $("auth"), key: $("api-key"), error: $("error"),
    drop: $("drop"), file: $("file"), preview: $("preview"), dropText: $("drop-text"), fileName: $("file-name"),
    busy: $("busy"), bars: $("bars"), barsEmpty: $("bars-empty"),
    meta: $("meta"), metaModel: $("meta-model"), metaVersion: $("meta-version"), metaTime: $("meta-time"),
    camBusy: $("cam-busy"), overlay: $("overlay"), camEmpty: $("cam-empty"), camCaption: $("cam-caption"),
  };
  const CAM_HINT = ui.camEmpty.textContent;
  const state = {
    file: null, previewUrl: null, overlayUrl: null,
    models: new Map(), // name -> [{version, state, reason}]
    predictRun: null, explainRun: null, // AbortControllers of the requests in flight
    answer: null, // {model, version, predictions}
  };

  /** An error whose message is meant for the visitor. */
  class ShownError extends Error {
    constructor(message, status) { super(message); this.status = status; }
  }
  /** A request abandoned because a newer one replaced it: nothing to show. */
  class Superseded extends Error {}

  // --- API key (only when the server asks for one) -----------------------------------------------------

  function storedKey() {
    try { return sessionStorage.getItem(KEY_STORE) || ""; } catch (_) { return ""; }
  }
  function storeKey(key) {
    try { sessionStorage.setItem(KEY_STORE, key); } catch (_) { /* storage blocked: the key lives in memory */ }
    state.key = key;
  }
  function authHeaders() {
    const key = state.key || storedKey();
    return key ? { Authorization: "Bearer " + key } : {};
  }

  // --- requests ----------------------------------------------------------------------------------------

  function apiUrl(path, params) {
    const url = new URL(path, document.baseURI);
    for (const [name, value] of Object.entries(params || {})) {
      if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, String(value));
    }
    return url.toString();
  }

  async function describe(response, context) {
    let detail = "";
    let requestId = "";
    try {
      const body = await response.json();
      if (body && typeof body.error === "string") detail = body.error;
      if (body && body.request_id) requestId = String(body.request_id);
    } catch (_) { /* not JSON (a proxy's page): the status says enough */ }
    const status = response.status;
    const more = detail ? " (" + detail + ")" : "";
    if (status === 401) {
      const had = Boolean(state.key || storedKey());
      showAuth();
      return had ? "The API key was not accepted: check it and enter it again above."
        : "This server needs an API key: enter it above.";
    }
    if (status === 413) return "The image is too large for this server" + more + ".";
    if (status === 415) return "This kind of file is not accepted: use a JPEG, PNG, WebP, BMP or GIF image" + more + ".";
    if (status === 400 && context === "predict") return "This file is not an image the server can read" + more + ".";
    if (status === 408) return "The upload was too slow, and the server stopped waiting for it" + more + ".";
    if (status === 503 || status === 429) return "The server is busy right now; try again in a moment" + more + ".";
    if (status === 501) return detail || "This is not available for this model.";
    if (status >= 500) {
      return "The server failed on this request" + (requestId ? " (request id " + requestId + ")" : "") + ".";
    }
    return detail || "The server answered " + status + " " + response.statusText + ".";
  }

  /** fetch with a timeout, the API key, and errors turned into ShownError / Superseded. */
  async function call(url, { method = "GET", body, as = "json", signal, context = "" } = {}) {
    const controller = new AbortController();
    let timedOut = false;
    const timer = setTimeout(() => { timedOut = true; controller.abort(); }, TIMEOUT_MS);
    const cancel = () => controller.abort();
    if (signal) signal.addEventListener("abort", cancel, { once: true });
    const started = performance.now();
    try {
      const response = await fetch(url, {
        method, body, headers: authHeaders(), signal: controller.signal, cache: "no-store",
      });
      if (!response.ok) throw new ShownError(await describe(response, context), response.status);
      const data = as === "blob" ? await response.blob() : await response.json();
      return { data, response, ms: performance.now() - started };
    } catch (err) {
      if (err instanceof ShownError) throw err;
      if (signal && signal.aborted) throw new Superseded();
      if (timedOut) {
        throw new ShownError("No answer from the server within " + TIMEOUT_MS / 1000 + " s; it may be "
          + "overloaded. Try again in a moment.", 0);
      }
      if (err instanceof SyntaxError) throw new ShownError("The server sent an answer this page cannot read.", 0);
      throw new ShownError("Could not reach the server (network error). Is it still running?", 0);
    } finally {
      clearTimeout(timer);
      if (signal) signal.removeEventListener("abort", cancel);
    }
  }

  function imageForm(file) {
    const form = new FormData();
    form.append("image", file, file.name || "pasted-image");
    return form;
  }

  // --- messages ----------------------------------------------------------------------------------------

  function showError(message) {
    ui.error.textContent = message;
    ui.error.hidden = false;
  }
  function clearError() {
    ui.error.hidden = true;
    ui.error.textContent = "";
  }
  function showAuth() {
    ui.auth.hidden = false;
  }
  function formatMs(ms) {
    return ms < 1000 ? Math.round(ms) + " ms" : (ms / 1000).toFixed(2) + " s";
  }
  function formatPercent(p) {
    if (p >= 0.9995) return "100%";
    if (p < 0.001) return "<0.1%";
    return (100 * p).toFixed(1) + "%";
  }

  // --- models and versions -----------------------------------------------------------------------------

  async function loadModels() {
    let index;
    try {
      ({ data: index } = await call(apiUrl("v2/repository/index"), { method: "POST", context: "index" }));
    } catch (err) {
      if (!(err instanceof Superseded)) showError(err.message);
      return;
    }
    const models = new Map();
    for (const entry of Array.isArray(index) ? index : []) {
      if (!models.has(entry.name)) models.set(entry.name, []);
      models.get(entry.name).push(entry);
    }
    state.models = models;
    const previous = ui.model.value;
    ui.model.replaceChildren(...[...models.keys()].map((name) => new Option(name, name)));
    if (models.has(previous)) ui.model.value = previous;
    fillVersions();
    const several = models.size > 1 || [...models.values()].some((versions) => versions.length > 1);
    ui.pickers.hidden = !several;
    ui.modelField.hidden = models.size <= 1;
  }

  function fillVersions() {
    const versions = state.models.get(ui.model.value) || [];
    const previous = ui.version.value;
    const options = [new Option(versions.length > 1 ? "default (routed)" : "default", "")];
    for (const v of versions) {
      const label = v.state === "READY" ? v.version : v.version + " (" + v.state.toLowerCase() + ")";
      options.push(new Option(label, v.version));
    }
    ui.version.replaceChildren(...options);
    if (versions.some((v) => v.version === previous)) ui.version.value = previous;
    ui.versionField.hidden = versions.length <= 1;
  }

  // --- one image: predict, then explain the top class ----------------------------------------------------

  function showPreview(file) {
    if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
    state.previewUrl = URL.createObjectURL(file);
    ui.preview.onload = () => ui.preview.classList.toggle("pixelated", ui.preview.naturalWidth < 160);
    ui.preview.onerror = () => { ui.preview.hidden = true; ui.dropText.hidden = false; ui.drop.classList.remove("filled"); };
    ui.preview.src = state.previewUrl;
    ui.preview.hidden = false;
    ui.dropText.hidden = true;
    ui.drop.classList.add("filled");
    ui.fileName.textContent = (file.name || "pasted image") + " · " + Math.max(1, Math.round(file.size / 1024)) + " KB";
    ui.fileName.hidden = false;
  }

  function clearOverlay(message) {
    if (state.overlayUrl) URL.revokeObjectURL(state.overlayUrl);
    state.overlayUrl = null;
    ui.overlay.hidden = true;
    ui.overlay.removeAttribute("src");
    ui.camEmpty.textContent = message || CAM_HINT;
    ui.camEmpty.hidden = false;
    ui.camCaption.textContent = "";
  }

  function clearResults() {
    state.answer = null;
    ui.bars.replaceChildren();
    ui.barsEmpty.hidden = false;
    ui.meta.hidden = true;
    clearOverlay();
  }

  function renderBars(predictions) {
    const items = predictions.map((p) => {
      const li = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "bar";
      button.dataset.index = String(p.index);
      button.title = "Show the Grad-CAM of " + p.label;
      const row = document.createElement("span");
      row.className = "bar-row";
      const label = document.createElement("span");
      label.className = "bar-label";
      label.textContent = p.label;
      const value = document.createElement("span");
      value.className = "bar-value";
      value.textContent = formatPercent(p.probability);
      row.append(label, value);
      const track = document.createElement("span");
      track.className = "bar-track";
      const fill = document.createElement("span");
      fill.className = "bar-fill";
      track.append(fill);
      button.append(row, track);
      button.addEventListener("click", () => explain(p.index));
      li.append(button);
      requestAnimationFrame(() => { fill.style.width = Math.max(0.5, 100 * p.probability).toFixed(2) + "%"; });
      return li;
    });
    ui.bars.replaceChildren(...items);
    ui.barsEmpty.hidden = items.length > 0;
  }

  function markExplained(index) {
    for (const button of ui.bars.querySelectorAll(".bar")) {
      const on = button.dataset.index === String(index);
      button.classList.toggle("active", on);
      button.setAttribute("aria-pressed", on ? "true" : "false");
    }
  }

  async function classify(file) {
    if (state.predictRun) state.predictRun.abort();
    if (state.explainRun) state.explainRun.abort();
    const run = new AbortController();
    state.predictRun = run;
    state.file = file;
    clearError();
    clearResults();
    showPreview(file);
    ui.busy.hidden = false;
    try {
      const url = apiUrl("predict", { topk: 5, model: ui.model.value, version: ui.version.value });
      const { data, ms } = await call(url, { method: "POST", body: imageForm(file), signal: run.signal,
        context: "predict" });
      const predictions = Array.isArray(data.predictions) ? data.predictions : [];
      state.answer = { model: data.model_name, version: data.model_version, predictions };
      renderBars(predictions);
      ui.metaModel.textContent = data.model_name;
      ui.metaVersion.textContent = data.model_version + (ui.version.value || ui.versionField.hidden ? "" : " (routed)");
      ui.metaTime.textContent = formatMs(ms);
      ui.meta.hidden = false;
      if (predictions.length) explain(predictions[0].index);
    } catch (err) {
      if (err instanceof Superseded) return;
      showError(err.message);
    } finally {
      if (state.predictRun === run) {
        ui.busy.hidden = true;
        state.predictRun = null;
      }
    }
  }

  async function explain(index) {
    const answer = state.answer;
    if (!answer || !state.file) return;
    if (state.explainRun) state.explainRun.abort();
    const run = new AbortController();
    state.explainRun = run;
    const prediction = answer.predictions.find((p) => p.index === index);
    const label = prediction ? prediction.label : String(index);
    markExplained(index);
    ui.camBusy.hidden = false;
    ui.camCaption.textContent = "Computing the Grad-CAM of " + label + "…";
    try {
      // the version that answered, not a fresh A/B choice: the map explains the prediction shown
      const url = apiUrl("explain", { model: answer.model, version: answer.version, class: index,
        layer: ui.layer.value });
      const { data: blob, response, ms } = await call(url, { method: "POST", body: imageForm(state.file), as: "blob",
        signal: run.signal, context: "explain" });
      if (state.overlayUrl) URL.revokeObjectURL(state.overlayUrl);
      state.overlayUrl = URL.createObjectURL(blob);
      ui.overlay.src = state.overlayUrl;
      ui.overlay.alt = "Grad-CAM heat map of " + label + " over the image";
      ui.overlay.hidden = false;
      ui.overlay.dataset.explained = String(index);
      ui.camEmpty.hidden = true;
      const layer = response.headers.get("x-layer");
      const grid = (response.headers.get("x-layer-shape") || "").replace("x", "×");
      ui.camCaption.textContent = label + (prediction ? " " + formatPercent(prediction.probability) : "")
        + (layer ? " · " + layer + (grid ? " (" + grid + ")" : "") : "") + " · " + formatMs(ms);
    } catch (err) {
      if (err instanceof Superseded) return;
      clearOverlay(err.message);
      ui.overlay.dataset.explained = "";
    } finally {
      if (state.explainRun === run) {
        ui.camBusy.hidden = true;
        state.explainRun = null;
      }
    }
  }

  // --- input: file picker, drag and drop, paste ----------------------------------------------------------

  function firstFile(list) {
    return list && list.length ? list[0] : null;
  }

  ui.file.addEventListener("change", () => {
    const file = firstFile(ui.file.files);
    if (file) classify(file);
    ui.file.value = ""; // the same file chosen again is a new upload
  });
  ui.drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    ui.drop.classList.add("over");
  });
  ui.drop.addEventListener("dragleave", () => ui.drop.classList.remove("over"));
  ui.drop.addEventListener("drop", (event) => {
    event.preventDefault();
    ui.drop.classList.remove("over");
    const file = firstFile(event.dataTransfer && event.dataTransfer.files);
    if (file) classify(file);
  });
  // a file dropped beside the zone must not navigate away from the page
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
  document.addEventListener("paste", (event) => {
    const items = event.clipboardData ? [...event.clipboardData.items] : [];
    const item = items.find((i) => i.kind === "file");
    const file = item && item.getAsFile();
    if (file) {
      event.preventDefault();
      classify(file);
    }
  });

  ui.model.addEventListener("change", () => {
    fillVersions();
    if (state.file) classify(state.file);
  });
  ui.version.addEventListener("change", () => {
    if (state.file) classify(state.file);
  });
  ui.layer.addEventListener("change", () => {
    const active = ui.bars.querySelector(".bar.active");
    if (active) explain(Number(active.dataset.index));
  });
  ui.auth.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = ui.key.value.trim();
    if (!key) return;
    storeKey(key);
    ui.key.value = "";
    ui.auth.hidden = true;
    clearError();
    loadModels().then(() => { if (state.file) classify(state.file); });
  });

  loadModels();
})();
