// vggnet serve's page: upload / drop / paste an image -> one POST predict?explain=1 (NDJSON: the top 5, then the
// top class's Grad-CAM); another class or layer -> POST explain. Before any upload: each model's state and classes
// (repository index, V2 metadata) and the server's limits (static/limits.json), checked in the browser.
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
    limitsText: $("limits"), modelState: $("model-state"), stateWord: $("state-word"), stateText: $("state-text"),
    tagline: document.querySelector(".tagline"), warnings: $("warnings"), camera: $("camera"), cameraInput: $("camera-input"), toCam: $("to-cam"),
    dropTitle: $("drop-title"), dropMore: $("drop-more"), camCard: $("h-cam"), crop: $("crop"), cropNote: $("crop-note"), stateDetails: $("state-details"), stateReason: $("state-reason"), classes: $("classes"),
    busy: $("busy"), bars: $("bars"), barsEmpty: $("bars-empty"), barsHint: $("bars-hint"),
    meta: $("meta"), metaModel: $("meta-model"), metaVersion: $("meta-version"), metaTime: $("meta-time"),
    camBusy: $("cam-busy"), overlay: $("overlay"), camEmpty: $("cam-empty"), camCaption: $("cam-caption"),
    feedback: $("feedback"), feedbackYes: $("feedback-yes"), feedbackLabel: $("feedback-label"),
    feedbackSend: $("feedback-send"), feedbackStatus: $("feedback-status"),
  };
  const CAM_HINT = ui.camEmpty.textContent;
  const state = {
    file: null, previewUrl: null, overlayUrl: null,
    models: new Map(), // name -> [{version, state, reason}]
    predictRun: null, explainRun: null, // AbortControllers of the requests in flight
    answer: null, // {model, version, predictions}
    limits: {}, // static/limits.json: max_upload_bytes, max_image_pixels, image_types
    poll: null, // timer re-reading the index while a model loads
    metadata: new Map(), // "name/version" -> the V2 model metadata (classes, image size)
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
    if (status === 503 && context === "predict") {
      const shown = selectedState();
      if (shown.state === "failed") return shown.visitor;
      if (shown.state === "loading") return shown.visitor;
    }
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

  /** POST an upload and read the answer as newline-delimited JSON, calling onLine(object) for each line as it
   * arrives (the bars before the heat map). The timeout covers the whole answer; a timeout or a lost connection
   * after a line has arrived is thrown as ShownError with `partial` set. */
  async function callLines(url, { body, signal, context = "", onLine }) {
    const controller = new AbortController();
    let timedOut = false;
    let lines = 0;
    const timer = setTimeout(() => { timedOut = true; controller.abort(); }, TIMEOUT_MS);
    const cancel = () => controller.abort();
    if (signal) signal.addEventListener("abort", cancel, { once: true });
    const started = performance.now();
    try {
      const response = await fetch(url, {
        method: "POST", body, headers: authHeaders(), signal: controller.signal, cache: "no-store",
      });
      if (!response.ok) throw new ShownError(await describe(response, context), response.status);
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let text = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (value) text += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = text.indexOf("\n")) >= 0) {
          const line = text.slice(0, cut);
          text = text.slice(cut + 1);
          if (line.trim()) { lines += 1; onLine(JSON.parse(line), performance.now() - started); }
        }
        if (done) break;
      }
    } catch (err) {
      if (err instanceof ShownError) { err.partial = lines > 0; throw err; }
      if (signal && signal.aborted) throw new Superseded();
      let shown;
      if (timedOut) {
        shown = new ShownError("No answer from the server within " + TIMEOUT_MS / 1000 + " s; it may be "
          + "overloaded. Try again in a moment.", 0);
      } else if (err instanceof SyntaxError) {
        shown = new ShownError("The server sent an answer this page cannot read.", 0);
      } else {
        shown = new ShownError("Could not reach the server (network error). Is it still running?", 0);
      }
      shown.partial = lines > 0;
      throw shown;
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
  /** 69 -> "69 bytes", 1536 -> "1.5 KB", 36e6 -> "34.3 MB": never a small file shown as "1 KB". */
  function formatBytes(n) {
    if (n < 1024) return n + (n === 1 ? " byte" : " bytes");
    if (n < 1024 * 1024) return (n / 1024).toFixed(n < 10 * 1024 ? 1 : 0) + " KB";
    return (n / (1024 * 1024)).toFixed(1) + " MB";
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
    showState();
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

  /** The state of what an upload would reach now (the picked version, or the best of the model's versions when
   * the server routes): {state: "ready" | "loading" | "failed" | "unknown", visitor, reason, version}. */
  function selectedState() {
    const versions = state.models.get(ui.model.value) || [];
    const picked = ui.version.value ? versions.filter((v) => v.version === ui.version.value) : versions;
    const ready = picked.find((v) => v.state === "READY");
    if (ready) {
      const verb = window.matchMedia("(pointer: coarse)").matches ? "Choose a photo" : "Drop an image";
      return { state: "ready", visitor: verb + " to see what it recognises.", version: ready };
    }
    const loading = picked.find((v) => v.state === "LOADING");
    if (loading) {
      return { state: "loading", version: loading,
        visitor: "This model is still loading; it will take images in a moment (this page checks again by itself)." };
    }
    const failed = picked[0];
    if (failed) {
      return { state: "failed", version: failed, reason: failed.reason || failed.state,
        visitor: "This model cannot answer right now: it failed to load. Try another model if there is one, "
          + "or tell whoever runs this server." };
    }
    return { state: "unknown", visitor: "" };
  }

  const STATE_WORDS = { ready: "Ready.", loading: "Loading…", failed: "Not available." };

  /** Show the picked model's state before any upload; re-read the index every 2 s while it loads. */
  function showState() {
    const shown = selectedState();
    ui.modelState.hidden = shown.state === "unknown";
    ui.modelState.dataset.state = shown.state;
    ui.stateWord.textContent = STATE_WORDS[shown.state] || "";
    ui.stateText.textContent = shown.visitor;
    ui.stateReason.textContent = shown.reason || "";
    ui.stateDetails.hidden = !shown.reason;
    clearTimeout(state.poll);
    state.poll = null;
    if (shown.state === "loading") state.poll = setTimeout(loadModels, 2000);
    if (shown.state === "ready") showClasses(ui.model.value, shown.version.version);
    else ui.classes.hidden = true;
  }

  /** The classes the model knows (all of them when few, else how many and a sample), from its V2 metadata. */
  async function showClasses(name, version) {
    const key = name + "/" + version;
    let meta = state.metadata.get(key);
    if (!meta) {
      try {
        ({ data: meta } = await call(apiUrl("v2/models/" + encodeURIComponent(name) + "/versions/"
          + encodeURIComponent(version)), { context: "metadata" }));
      } catch (_) {
        return; // the metadata is a nicety: the page works without it
      }
      state.metadata.set(key, meta);
    }
    const prep = (meta.parameters && meta.parameters.preprocessing) || {};
    if (selectedState().version?.version !== version || ui.model.value !== name) return;
    state.prep = prep;
    drawCrop();
    const classes = Array.isArray(prep.classes) ? prep.classes : [];
    if (!classes.length) { ui.classes.hidden = true; return; }
    const few = classes.length <= 20;
    ui.classes.textContent = "It recognises " + (few ? "these " + classes.length + " classes only: "
      + classes.join(", ") : classes.length + " classes, e.g. " + classes.slice(0, 12).join(", ") + ", …")
      + ". Anything else gets one of these labels anyway.";
    ui.classes.hidden = false;
  }

  // --- one image: predict, then explain the top class ----------------------------------------------------

  /** Show the file in the drop zone; resolves to its decoded size ({width, height}), or null if undecodable. */
  function showPreview(file) {
    if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
    state.previewUrl = URL.createObjectURL(file);
    const shown = new Promise((resolve) => {
      ui.preview.onload = () => {
        ui.preview.classList.toggle("pixelated", ui.preview.naturalWidth < 160);
        resolve({ width: ui.preview.naturalWidth, height: ui.preview.naturalHeight });
      };
      ui.preview.onerror = () => {
        ui.preview.hidden = true; ui.dropText.hidden = false; ui.drop.classList.remove("filled");
        resolve(null); // the server says why it cannot read it
      };
    });
    ui.preview.src = state.previewUrl;
    ui.preview.hidden = false;
    ui.dropText.hidden = true;
    ui.drop.classList.add("filled");
    ui.fileName.textContent = (file.name || "pasted image") + " · " + formatBytes(file.size);
    ui.fileName.hidden = false;
    return shown;
  }

  /** A refused image leaves no preview behind (it was not sent). */
  function clearPreview() {
    if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
    state.previewUrl = null;
    ui.preview.onload = null;
    ui.preview.onerror = null;
    ui.preview.removeAttribute("src");
    ui.preview.hidden = true;
    ui.dropText.hidden = false;
    ui.drop.classList.remove("filled");
    ui.fileName.textContent = "";
    ui.fileName.hidden = true;
    state.imageSize = null;
    drawCrop();
  }

  /** A layer in words for a visitor (the expert name is shown beside it): what its units respond to, and how
   * fine its grid of positions is. */
  function layerWords(layer, shape) {
    const match = /block(\d)/.exec(layer || "");
    const block = match ? Number(match[1]) : 5;
    const what = block >= 5 ? "whole objects" : block === 4 ? "object parts" : block === 3 ? "textures"
      : "edges and colours";
    const side = shape && shape.length ? Math.min(...shape) : 0;
    const fine = !side ? "" : side <= 2 ? ", a very coarse grid" : side <= 4 ? ", a coarse grid"
      : side <= 8 ? ", a medium grid" : ", a fine grid";
    return "evidence for " + what + fine;
  }

  /** Outline on the preview the centre square the network sees (resized so the shorter side is test_scale,
   * then the image_size crop), so the heat map's frame is not a surprise. */
  function drawCrop() {
    const size = state.imageSize;
    const prep = state.prep;
    if (!size || !prep || !prep.image_size || ui.preview.hidden) {
      ui.crop.hidden = true;
      ui.cropNote.hidden = true;
      return;
    }
    const scale = prep.test_scale || prep.image_size;
    const side = Math.min(size.width, size.height) * prep.image_size / scale; // in the image's pixels
    const fit = Math.max(size.width, size.height); // the drop zone is square; the preview is contained in it
    const pct = (v) => (100 * v / fit).toFixed(3) + "%";
    const left = (fit - size.width) / 2 + (size.width - side) / 2;
    const top = (fit - size.height) / 2 + (size.height - side) / 2;
    Object.assign(ui.crop.style, { left: pct(left), top: pct(top), width: pct(side), height: pct(side) });
    const whole = side >= size.width - 0.5 && side >= size.height - 0.5;
    ui.crop.hidden = whole;
    ui.cropNote.hidden = whole;
  }

  /** The overlay's text alternative says where the heat is, not only that there is a heat map. */
  function overlayAlt(label, where) {
    return "Grad-CAM heat map of " + label + " over the image" + (where ? ": the evidence is strongest " + where
      : "") + ".";
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
    ui.feedback.hidden = true;
    ui.warnings.replaceChildren();
    ui.bars.replaceChildren();
    ui.toCam.hidden = true;
    ui.barsEmpty.hidden = false;
    ui.barsHint.hidden = true;
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
      button.setAttribute("aria-describedby", "bars-hint");
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
    ui.toCam.hidden = items.length === 0;
    ui.barsEmpty.hidden = items.length > 0;
    ui.barsHint.hidden = items.length === 0;
  }

  function markExplained(index) {
    for (const button of ui.bars.querySelectorAll(".bar")) {
      const on = button.dataset.index === String(index);
      button.classList.toggle("active", on);
      button.setAttribute("aria-pressed", on ? "true" : "false");
    }
  }

  /** Why this file is refused before any upload (type, bytes, then pixels once decoded), or "" if it is fine. */
  function refusal(file) {
    const limits = state.limits;
    const types = limits.image_types || [];
    if (file.type && types.length && !types.includes(file.type)) {
      return "This kind of file (" + file.type + ") is not accepted: use a JPEG, PNG, WebP, BMP or GIF image.";
    }
    if (!file.type && !/\.(jpe?g|png|webp|bmp|gif)$/i.test(file.name || "")) {
      return "This file does not look like an image: use a JPEG, PNG, WebP, BMP or GIF image.";
    }
    if (limits.max_upload_bytes && file.size > limits.max_upload_bytes) {
      return "This file is too large (" + formatBytes(file.size) + "): this server accepts images up to "
        + formatBytes(limits.max_upload_bytes) + ". Use a smaller image.";
    }
    return "";
  }

  /** The decoded preview's size, checked against the server's pixel limit (the browser decodes it anyway). */
  function pixelRefusal(width, height) {
    const most = state.limits.max_image_pixels;
    if (!most || width * height <= most) return "";
    return "This image is too large (" + width + "×" + height + ", " + (width * height / 1e6).toFixed(1)
      + " megapixels): "
      + "this server accepts up to " + (most / 1e6).toFixed(1) + " megapixels. Use a smaller image.";
  }

  function refuse(message) {
    state.file = null;
    clearResults();
    clearPreview();
    showError(message);
  }

  /** Why the answer may mean little: an image far smaller than the crop, or one unlike the training data. */
  function showWarnings(data) {
    const items = [];
    const size = state.imageSize;
    const crop = state.prep && state.prep.image_size;
    if (size && crop && Math.min(size.width, size.height) < crop / 2) {
      items.push("This image is " + size.width + "×" + size.height + " pixels, far smaller than the " + crop + "×"
        + crop + " the model looks at: it is blown up to that size, so the answer means little.");
    }
    const ood = data.ood;
    if (ood && ood.unusual) {
      items.push("This image does not look like what the model was trained on: its top class gets "
        + formatPercent(ood.score) + ", less than " + Math.round(100 * (1 - ood.false_alarm)) + " % of the "
        + "validation images get (" + formatPercent(ood.threshold) + "). The labels below are probably "
        + "meaningless.");
    }
    ui.warnings.replaceChildren(...items.map((text) => {
      const li = document.createElement("li");
      li.textContent = text;
      return li;
    }));
  }

  const ONE_COLUMN = window.matchMedia("(max-width: 620px)");
  const TOUCH = window.matchMedia("(pointer: coarse)");

  function showAnswer(data, ms) {
    showWarnings(data);
    // one column (a phone): the answer is below the photo, out of sight; bring it up
    if (ONE_COLUMN.matches) ui.bars.closest("section").scrollIntoView({ block: "start" });
    const predictions = Array.isArray(data.predictions) ? data.predictions : [];
    state.answer = { model: data.model_name, version: data.model_version, predictions, id: data.id };
    renderBars(predictions);
    offerFeedback(predictions);
    ui.metaModel.textContent = data.model_name;
    ui.metaVersion.textContent = data.model_version + (ui.version.value || ui.versionField.hidden ? "" : " (routed)");
    ui.metaTime.textContent = formatMs(ms);
    ui.meta.hidden = false;
    if (predictions.length) {
      markExplained(predictions[0].index);
      ui.camBusy.hidden = false;
      ui.camCaption.textContent = "Computing the Grad-CAM of " + predictions[0].label + "…";
    }
  }

  // --- "Is this right?": the visitor's label, stored as a user report (the server needs --store) ----------

  function offerFeedback(predictions) {
    if (!state.answer || !state.answer.id || !predictions.length) { ui.feedback.hidden = true; return; }
    const classes = Array.isArray(state.prep && state.prep.classes) && state.prep.classes.length
      ? state.prep.classes : predictions.map((p) => p.label);
    ui.feedbackLabel.replaceChildren(...classes.map((c) => new Option(c, c)),
      new Option("none of these", ""));
    ui.feedbackLabel.value = predictions.length > 1 ? predictions[1].label : classes[0];
    for (const control of [ui.feedbackYes, ui.feedbackLabel, ui.feedbackSend]) control.disabled = false;
    ui.feedbackStatus.textContent = "";
    ui.feedback.hidden = false;
  }

  async function sendFeedback(label) {
    const answer = state.answer;
    if (!answer) return;
    for (const control of [ui.feedbackYes, ui.feedbackLabel, ui.feedbackSend]) control.disabled = true;
    ui.feedbackStatus.textContent = "Sending…";
    try {
      await call(apiUrl("v2/models/" + encodeURIComponent(answer.model) + "/feedback"), {
        method: "POST", body: JSON.stringify({ id: answer.id, label }), context: "feedback" });
      ui.feedbackStatus.textContent = "Thank you: recorded" + (label === null ? " as none of these." : " as "
        + label + ".");
    } catch (err) {
      ui.feedbackStatus.textContent = err.status === 501
        ? "This server does not keep feedback (it runs without a prediction store)."
        : (err.message || "The feedback was not recorded.");
      if (err.status !== 501) {
        for (const control of [ui.feedbackYes, ui.feedbackLabel, ui.feedbackSend]) control.disabled = false;
      }
    }
  }

  ui.feedbackYes.addEventListener("click", () => {
    if (state.answer && state.answer.predictions.length) sendFeedback(state.answer.predictions[0].label);
  });
  ui.feedback.addEventListener("submit", (event) => {
    event.preventDefault();
    sendFeedback(ui.feedbackLabel.value === "" ? null : ui.feedbackLabel.value);
  });

  /** One upload per image: POST predict?explain=1 answers the bars first, then the top class's heat map. */
  async function classify(file) {
    if (state.predictRun) state.predictRun.abort();
    if (state.explainRun) state.explainRun.abort();
    clearError();
    const refused = refusal(file);
    if (refused) { refuse(refused); return; }
    const run = new AbortController();
    state.predictRun = run;
    state.file = file;
    clearResults();
    const size = await showPreview(file);
    state.imageSize = size;
    drawCrop();
    if (state.predictRun !== run) return;
    const tooBig = size && pixelRefusal(size.width, size.height);
    if (tooBig) { state.predictRun = null; refuse(tooBig); return; }
    ui.busy.hidden = false;
    try {
      const url = apiUrl("predict", { topk: 5, model: ui.model.value, version: ui.version.value, explain: 1,
        layer: ui.layer.value });
      await callLines(url, { body: imageForm(file), signal: run.signal, context: "predict", onLine: (line, ms) => {
        if (line.predictions) {
          showAnswer(line, ms);
          ui.busy.hidden = true;
        } else if (line.explain) {
          showOverlay(line.explain, ms);
        } else if (line.explain_error) {
          ui.camBusy.hidden = true;
          clearOverlay(line.explain_error.error);
          ui.overlay.dataset.explained = "";
        }
      } });
    } catch (err) {
      if (err instanceof Superseded) return;
      if (err.partial) {
        clearOverlay(err.message);
        ui.overlay.dataset.explained = "";
      } else {
        showError(err.message);
      }
    } finally {
      if (state.predictRun === run) {
        ui.busy.hidden = true;
        ui.camBusy.hidden = true;
        state.predictRun = null;
      }
    }
  }

  /** A heat map from /predict?explain=1 (a data: URL in the answer). */
  function showOverlay(explained, ms) {
    if (state.overlayUrl) URL.revokeObjectURL(state.overlayUrl);
    state.overlayUrl = null;
    const index = explained.class.index;
    const prediction = state.answer && state.answer.predictions.find((p) => p.index === index);
    const label = prediction ? prediction.label : explained.class.label;
    ui.overlay.src = explained.overlay;
    ui.overlay.alt = overlayAlt(label, explained.where);
    ui.overlay.hidden = false;
    ui.overlay.dataset.explained = String(index);
    ui.camEmpty.hidden = true;
    ui.camBusy.hidden = true;
    const grid = explained.layer_shape ? explained.layer_shape.join("×") : "";
    ui.camCaption.textContent = label + (prediction ? " " + formatPercent(prediction.probability) : "")
      + " · " + layerWords(explained.layer, explained.layer_shape) + " · " + explained.layer
      + (grid ? " (" + grid + ")" : "") + " · " + formatMs(ms);
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
      ui.overlay.alt = overlayAlt(label, response.headers.get("x-heat-where"));
      ui.overlay.hidden = false;
      ui.overlay.dataset.explained = String(index);
      ui.camEmpty.hidden = true;
      const layer = response.headers.get("x-layer");
      const grid = (response.headers.get("x-layer-shape") || "").replace("x", "×");
      const shape = grid ? grid.split("×").map(Number) : null;
      ui.camCaption.textContent = label + (prediction ? " " + formatPercent(prediction.probability) : "")
        + (layer ? " · " + layerWords(layer, shape) + " · " + layer + (grid ? " (" + grid + ")" : "") : "")
        + " · " + formatMs(ms);
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

  for (const input of [ui.file, ui.cameraInput]) {
    input.addEventListener("change", () => {
      const file = firstFile(input.files);
      if (file) classify(file);
      input.value = ""; // the same file chosen again is a new upload
    });
  }

  ui.toCam.addEventListener("click", () => {
    ui.camCard.scrollIntoView({ block: "start" });
    ui.camCard.focus({ preventScroll: true }); // a screen reader continues from the heat map
  });

  /** A touch screen cannot drop a file: say "choose a photo" there, and offer the camera. */
  function touchWording() {
    const touch = TOUCH.matches;
    ui.dropTitle.textContent = touch ? "Choose a photo" : "Drop an image here";
    ui.dropMore.replaceChildren(...(touch ? ["from this device"] : ["or paste one, or ", Object.assign(
      document.createElement("span"), { className: "link", textContent: "choose a file" })]));
    ui.camera.hidden = !touch;
    ui.tagline.textContent = (touch ? "Choose a photo" : "Drop an image") + ": the model's top five classes, and "
      + "where it looked.";
  }
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
    showState();
    if (state.file) classify(state.file);
  });
  ui.version.addEventListener("change", () => {
    showState();
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

  async function loadLimits() {
    try {
      ({ data: state.limits } = await call(apiUrl("static/limits.json"), { context: "limits" }));
    } catch (_) {
      state.limits = {}; // an older server: it checks the upload itself
    }
    const limits = state.limits;
    if (limits.max_upload_bytes) {
      ui.limitsText.textContent = "JPEG, PNG, WebP, BMP or GIF, up to " + formatBytes(limits.max_upload_bytes)
        + (limits.max_image_pixels ? " and " + (limits.max_image_pixels / 1e6).toFixed(0) + " megapixels" : "")
        + ".";
      ui.limitsText.hidden = false;
    }
  }

  touchWording();
  TOUCH.addEventListener("change", touchWording);
  loadLimits();
  loadModels();
})();
