// vggnet serve's review page: GET v2/review/queue (what needs a person, the random sample first), then one
// POST v2/review/label per answer. One key per class (1-9, 0, then letters; n and s are taken), n "none of these",
// s skip (stored nowhere: the input stays queued for someone else, this tab just moves on). Plain JavaScript, no
// dependencies, relative URLs; every call carries the key typed in (kept in this tab's sessionStorage, shared with
// the main page). Errors end as words on the page; a key press while a label is being stored is ignored.
"use strict";

(function () {
  const TIMEOUT_MS = Number(window.vggnetTimeoutMs) || 30000;
  const KEY_STORE = "vggnet.apiKey";
  const NAME_STORE = "vggnet.reviewer";
  const FETCH = 50; // queue entries read at a time
  const KEYS = "1234567890abcdefghijklmopqrtuvwxyz".split(""); // n and s are "none of these" and skip
  const $ = (id) => document.getElementById(id);
  const ui = {
    auth: $("auth"), key: $("api-key"), name: $("reviewer"), error: $("error"), status: $("status"),
    model: $("model"), reviewed: $("reviewed"), queued: $("queued"), item: $("item"), empty: $("empty"),
    reload: $("reload"), reasons: $("reasons"), itemModel: $("item-model"), itemTime: $("item-time"),
    itemId: $("item-id"), predictions: $("predictions"), classes: $("classes"), none: $("none"), skip: $("skip"),
    inputBox: $("input-box"),
  };
  const REASON_TEXT = {
    random: "random sample", low_confidence: "low confidence", user_report: "user report",
    disagreement: "versions disagree",
  };
  const state = {
    key: "", queue: [], current: null, classes: {}, passed: new Set(), // passed: labelled or skipped in this tab
    reviewed: 0, queued: null, busy: false,
  };

  function stored(name) {
    try { return sessionStorage.getItem(name) || ""; } catch (_) { return ""; }
  }
  function keep(name, value) {
    try { sessionStorage.setItem(name, value); } catch (_) { /* storage blocked: kept in memory only */ }
  }
  const idOf = (entry) => entry.model + "\u0000" + entry.id + "\u0000" + entry.item;

  function showError(message) {
    ui.error.textContent = message;
    ui.error.hidden = !message;
  }
  function say(message) { ui.status.textContent = message; }

  async function call(path, { method = "GET", params, body } = {}) {
    const url = new URL(path, document.baseURI);
    for (const [name, value] of Object.entries(params || {})) {
      if (value !== "" && value !== undefined && value !== null) url.searchParams.set(name, String(value));
    }
    const headers = { Authorization: "Bearer " + state.key };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), TIMEOUT_MS);
    let response;
    try {
      response = await fetch(url, { method, headers, cache: "no-store", signal: controller.signal,
        body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (_) {
      throw new Error(controller.signal.aborted ? "No answer from the server within " + TIMEOUT_MS / 1000 + " s."
        : "The server cannot be reached; check the connection and try again.");
    } finally {
      clearTimeout(timer);
    }
    let data = null;
    try { data = await response.json(); } catch (_) { /* not JSON: the status says enough */ }
    if (response.ok) return data;
    const detail = data && typeof data.error === "string" ? data.error : response.status + " " + response.statusText;
    if (response.status === 401) {
      ui.auth.hidden = false;
      if (state.key) ui.key.focus();
      throw Object.assign(new Error(state.key ? "The API key was not accepted: check it and enter it again."
        : "Enter this server's API key to start."), { status: 401 });
    }
    throw Object.assign(new Error(detail), { status: response.status });
  }

  // --- the queue ---------------------------------------------------------------------------------------

  async function loadQueue() {
    const data = await call("v2/review/queue", {
      params: { model: ui.model.value, limit: Math.min(200, FETCH + state.passed.size) },
    });
    Object.assign(state.classes, data.classes || {});
    for (const name of Object.keys(data.classes || {})) {
      if (![...ui.model.options].some((o) => o.value === name)) ui.model.add(new Option(name, name));
    }
    state.queue = (data.items || []).filter((entry) => !state.passed.has(idOf(entry)));
    state.queued = data.queued;
    showCounter();
  }

  function showCounter() {
    ui.reviewed.textContent = String(state.reviewed);
    ui.queued.textContent = state.queued === null ? "–" : String(Math.max(0, state.queued));
  }

  async function next() {
    if (!state.queue.length) await loadQueue();
    state.current = state.queue.shift() || null;
    if (!state.current) {
      ui.item.hidden = true;
      ui.empty.hidden = false;
      return;
    }
    ui.empty.hidden = true;
    ui.item.hidden = false;
    render(state.current);
  }

  // --- one entry -----------------------------------------------------------------------------------------

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function bars(topk) {
    const list = element("ol", "bars");
    for (const [label, probability] of topk) {
      const row = element("li", "bar");
      const head = element("span", "bar-row");
      head.append(element("span", "bar-label", label), element("span", "bar-value", (100 * probability).toFixed(1) + " %"));
      const track = element("span", "bar-track");
      const fill = element("span", "bar-fill");
      fill.style.width = Math.max(0, Math.min(100, 100 * probability)) + "%";
      track.append(fill);
      row.append(head, track);
      list.append(row);
    }
    return list;
  }

  /** The kept crop (an <img> cannot send the key: fetched with it, shown from a blob URL), else the note. */
  async function showInput(path, entry) {
    const image = $("input-image");
    const note = $("input-note");
    if (image.src) URL.revokeObjectURL(image.src);
    image.removeAttribute("src");
    image.hidden = true;
    note.hidden = false;
    if (!path) return;
    try {
      const response = await fetch(new URL("v2/review/input/" + path, document.baseURI),
        { headers: { Authorization: "Bearer " + state.key }, cache: "no-store" });
      if (!response.ok || state.current !== entry) return; // gone, or the reviewer moved on meanwhile
      image.src = URL.createObjectURL(await response.blob());
      image.alt = "the image as the network saw it (" + entry.model + ", request " + entry.id + ")";
      image.hidden = false;
      note.hidden = true;
    } catch (_) { /* no image: the note stays */ }
  }

  /** Each class's key: 1-9, 0, then letters in class order; but when every class is one distinct digit (the
   * digits model), its own digit, so that 7 is "7" and not the eighth key. */
  function keysFor(classes) {
    const names = classes.map(String);
    const digits = names.length > 0 && names.every((c) => /^[0-9]$/.test(c)) && new Set(names).size === names.length;
    return digits ? names : KEYS.slice(0, classes.length);
  }

  function render(entry) {
    ui.reasons.replaceChildren(...entry.reasons.flatMap((reason, i) => {
      const chip = element("span", "reason", REASON_TEXT[reason] || reason);
      chip.dataset.reason = reason;
      return i ? [" ", chip] : [chip]; // a space between: read as words, not one run-on word
    }));
    ui.itemModel.textContent = entry.model;
    const when = new Date(entry.created_at);
    ui.itemTime.textContent = isNaN(when) ? entry.created_at : when.toLocaleString();
    ui.itemId.textContent = entry.id + (entry.item ? " · image " + entry.item : "");
    const kept = (entry.predictions.find((p) => p.input_path) || {}).input_path || "";
    ui.inputBox.dataset.inputPath = kept;
    showInput(kept, entry);
    ui.predictions.replaceChildren(...entry.predictions.map((p) => {
      const block = element("div", "version");
      block.append(element("h3", "", "Version " + p.version + " · " + p.role + ": " + p.predicted), bars(p.topk));
      return block;
    }));
    const classes = state.classes[entry.model] || [];
    const keys = keysFor(classes);
    ui.classes.replaceChildren(...classes.map((name, i) => {
      const button = element("button");
      button.type = "button";
      button.dataset.label = name;
      const key = keys[i];
      if (key) {
        button.append(element("kbd", "", key), " ");
        button.setAttribute("aria-keyshortcuts", key);
      }
      button.append(element("span", "", name));
      button.addEventListener("click", () => answer({ label: name }));
      return button;
    }));
    setBusy(false);
  }

  function setBusy(busy) {
    state.busy = busy;
    for (const button of [...ui.classes.querySelectorAll("button"), ui.none, ui.skip]) button.disabled = busy;
  }

  async function answer(choice) {
    const entry = state.current;
    if (!entry || state.busy) return;
    setBusy(true);
    showError("");
    try {
      const body = { id: entry.id, item: entry.item, model: entry.model, reviewer: ui.name.value.trim() };
      await call("v2/review/label", { method: "POST", body: choice.skip ? { ...body, skip: true }
        : { ...body, label: choice.label } });
      state.passed.add(idOf(entry));
      if (choice.skip) {
        say("Skipped request " + entry.id + "; it stays queued for someone else.");
      } else {
        state.reviewed += 1;
        state.queued = state.queued === null ? null : state.queued - 1;
        say("Stored " + (choice.label === null ? "none of these" : choice.label) + " for request " + entry.id + ".");
      }
      showCounter();
      await next();
    } catch (err) {
      showError(err.message);
      setBusy(false);
    }
  }

  // --- keys and controls ---------------------------------------------------------------------------------

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
    if (event.target.closest && event.target.closest("input, select, textarea")) return;
    if (!state.current || ui.item.hidden) return;
    const key = event.key.toLowerCase();
    let choice = null;
    if (key === "s") choice = { skip: true };
    else if (key === "n") choice = { label: null };
    else {
      const classes = state.classes[state.current.model] || [];
      const index = keysFor(classes).indexOf(key);
      if (index >= 0 && index < classes.length) choice = { label: classes[index] };
    }
    if (!choice) return;
    event.preventDefault();
    answer(choice);
  });
  ui.none.addEventListener("click", () => answer({ label: null }));
  ui.skip.addEventListener("click", () => answer({ skip: true }));

  async function start() {
    showError("");
    say("Reading the queue…");
    try {
      state.queue = [];
      await next();
      ui.auth.hidden = true;
      say(state.current ? "" : "Nothing needs a review right now.");
    } catch (err) {
      say("");
      showError(err.message);
    }
  }

  ui.auth.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = ui.key.value.trim();
    if (!key) return;
    state.key = key;
    keep(KEY_STORE, key);
    keep(NAME_STORE, ui.name.value.trim());
    ui.key.value = "";
    ui.key.blur();
    start();
  });
  ui.model.addEventListener("change", start);
  ui.reload.addEventListener("click", start);

  ui.name.value = stored(NAME_STORE);
  state.key = stored(KEY_STORE);
  if (state.key) {
    start();
  } else {
    // without a key the server says whether it takes one at all: a server without keys refuses review (403)
    call("v2/review/queue", { params: { limit: 1 } }).catch((err) => {
      if (err.status === 403) {
        ui.auth.hidden = true;
        showError(err.message);
      }
    });
  }
})();
