// The faceparse demo page: upload -> POST /v1/jobs (multipart) -> poll GET /v1/jobs/{id} ->
// fetch mask.png and overlay.png -> recolour the image on a canvas, one toggle per label.
//
// Label colours are the worker's own: taken from the summary when it carries them (`color`),
// else recovered from overlay.png, which the worker blends as overlay = (image + colour) / 2 on
// every non-background pixel. The page never keeps a copy of the palette.
"use strict";

(() => {
  const KEY_STORAGE = "faceparse.apiKey";
  const OUTPUTS = "mask,overlay,summary";
  const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
  const ALPHA = 0.5; // the worker's OVERLAY_ALPHA
  const BACKGROUND = 0; // never blended by the worker
  const SAMPLES_PER_LABEL = 4096;
  // Decode pixels exactly as stored: no colour-profile conversion, no premultiplied alpha.
  const RAW = { colorSpaceConversion: "none", premultiplyAlpha: "none", imageOrientation: "from-image" };

  const $ = (id) => document.getElementById(id);
  const state = { run: 0, image: null, mask: null, colours: new Map(), enabled: new Set(), width: 0, height: 0 };

  // --- the API key ------------------------------------------------------------------------
  const authOn = document.body.dataset.auth === "on";
  const keyInput = $("api-key");
  if (authOn) {
    $("key-section").hidden = false;
    keyInput.value = localStorage.getItem(KEY_STORAGE) || "";
    keyInput.addEventListener("input", () => localStorage.setItem(KEY_STORAGE, keyInput.value.trim()));
  }

  function authHeaders() {
    const key = keyInput.value.trim();
    return authOn && key ? { Authorization: `Bearer ${key}` } : {};
  }

  async function api(path, options = {}) {
    const resp = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
    const body = await resp.json().catch(() => null);
    if (!resp.ok) {
      const err = (body && body.error) || { code: `http_${resp.status}`, message: resp.statusText };
      throw Object.assign(new Error(err.message), { code: err.code });
    }
    return body;
  }

  // An output file: our own /v1/files/... links need the key; presigned S3 URLs must not get it
  // (a second credential makes S3 refuse the request), and need CORS on the bucket.
  async function fetchOutput(url) {
    const absolute = new URL(url, window.location.href);
    const sameOrigin = absolute.origin === window.location.origin;
    const resp = await fetch(absolute, { headers: sameOrigin ? authHeaders() : {} });
    if (!resp.ok) throw new Error(`could not fetch ${absolute.pathname}: HTTP ${resp.status}`);
    return resp.blob();
  }

  async function pixels(source, width, height) {
    const bitmap = await createImageBitmap(source, RAW);
    const canvas = new OffscreenCanvas(width || bitmap.width, height || bitmap.height);
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    bitmap.close();
    return ctx.getImageData(0, 0, canvas.width, canvas.height);
  }

  // --- status ---------------------------------------------------------------------------
  function setStatus(status, text) {
    const el = $("status");
    el.dataset.status = status;
    el.textContent = text;
  }

  function showError(message) {
    $("error").textContent = message;
    $("error").hidden = !message;
  }

  function showWarning(message) {
    $("warning").textContent = message ? `⚠ ${message}` : "";
    $("warning").hidden = !message;
  }

  // --- submit and poll --------------------------------------------------------------------
  async function submit(file) {
    const run = ++state.run;
    showError("");
    showWarning("");
    $("result").hidden = true;
    $("result").dataset.ready = "false";
    setStatus("uploading", `Uploading ${file.name}…`);
    const form = new FormData();
    form.append("image", file, file.name);
    form.append("outputs", OUTPUTS);
    try {
      let job = await api("/v1/jobs", { method: "POST", body: form });
      let delay = 300;
      while (!TERMINAL.has(job.status)) {
        if (run !== state.run) return; // a newer upload took over
        setStatus(job.status, `Job ${job.id}: ${job.status}…`);
        await new Promise((r) => setTimeout(r, delay));
        delay = Math.min(2000, delay * 1.5);
        job = await api(`/v1/jobs/${encodeURIComponent(job.id)}`);
      }
      if (run !== state.run) return;
      if (job.status !== "succeeded") {
        setStatus(job.status, `Job ${job.id}: ${job.status}`);
        if (job.error) showError(`${job.error.code}: ${job.error.message}`);
        return;
      }
      setStatus("rendering", `Job ${job.id}: succeeded, drawing…`);
      await show(job, file, run);
      if (run !== state.run) return;
      const ms = job.metrics && job.metrics.total_ms;
      setStatus("succeeded", `Job ${job.id}: succeeded${ms ? ` in ${Math.round(ms)} ms` : ""}`);
    } catch (err) {
      if (run !== state.run) return;
      setStatus("error", "The job could not be run.");
      showError(err.code ? `${err.code}: ${err.message}` : String(err.message || err));
    }
  }

  // --- result -----------------------------------------------------------------------------
  async function show(job, file, run) {
    const summary = job.summary || { labels: [] };
    showWarning(summary.warning || "");
    const [maskBlob, overlayBlob] = await Promise.all([
      fetchOutput(job.outputs.mask.url || job.outputs.mask.key),
      fetchOutput(job.outputs.overlay.url || job.outputs.overlay.key),
    ]);
    const mask = await pixels(maskBlob);
    const { width, height } = mask;
    // The mask has the input's size after EXIF orientation; the browser applies it too.
    const [image, overlay] = await Promise.all([pixels(file, width, height), pixels(overlayBlob, width, height)]);
    if (run !== state.run) return;
    const labels = new Uint8Array(width * height);
    for (let i = 0; i < labels.length; i++) labels[i] = mask.data[i * 4]; // grey: label id = red
    Object.assign(state, { image, mask: labels, width, height });
    state.colours = labelColours(summary.labels, labels, image, overlay);
    state.enabled = new Set(summary.labels.map((l) => l.id));
    legend(summary.labels);
    downloads(job, maskBlob, overlayBlob);
    render();
    $("result").hidden = false;
    $("result").dataset.ready = "true";
  }

  function labelColours(entries, labels, image, overlay) {
    const colours = new Map();
    const wanted = new Map();
    for (const entry of entries) {
      if (Array.isArray(entry.color)) colours.set(entry.id, entry.color.slice(0, 3));
      else if (entry.id !== BACKGROUND) wanted.set(entry.id, [[], [], []]);
    }
    if (wanted.size === 0) return colours;
    // colour = (overlay - (1 - a) * image) / a, per pixel; the median over samples absorbs the
    // worker's rounding and small decoder differences.
    const stride = Math.max(1, Math.floor(labels.length / (SAMPLES_PER_LABEL * wanted.size)));
    for (let i = 0; i < labels.length; i += stride) {
      const samples = wanted.get(labels[i]);
      if (!samples || samples[0].length >= SAMPLES_PER_LABEL) continue;
      for (let c = 0; c < 3; c++) {
        const v = (overlay.data[i * 4 + c] - (1 - ALPHA) * image.data[i * 4 + c]) / ALPHA;
        samples[c].push(Math.max(0, Math.min(255, Math.round(v))));
      }
    }
    for (const [id, samples] of wanted) {
      if (samples[0].length) colours.set(id, samples.map(median));
    }
    return colours;
  }

  function median(values) {
    const sorted = Float64Array.from(values).sort();
    return sorted[Math.floor(sorted.length / 2)];
  }

  function legend(entries) {
    const body = $("legend").querySelector("tbody");
    body.replaceChildren();
    for (const entry of entries) {
      const row = document.createElement("tr");
      row.dataset.label = entry.name;
      row.dataset.labelId = entry.id;
      const colour = state.colours.get(entry.id);
      const toggle = document.createElement("input");
      toggle.type = "checkbox";
      toggle.checked = true;
      toggle.setAttribute("aria-label", `show ${entry.name}`);
      toggle.disabled = entry.id === BACKGROUND || !colour; // the worker never colours background
      toggle.addEventListener("change", () => {
        if (toggle.checked) state.enabled.add(entry.id);
        else state.enabled.delete(entry.id);
        render();
      });
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      if (colour) swatch.style.background = `rgb(${colour.join(",")})`;
      else swatch.classList.add("none");
      row.append(cell(toggle), cell(swatch, document.createTextNode(` ${entry.name}`)),
        cell(document.createTextNode(`${(entry.fraction * 100).toFixed(2)} %`), "num"),
        cell(document.createTextNode(entry.pixels.toLocaleString("en")), "num"));
      body.append(row);
    }
  }

  function cell(...parts) {
    const td = document.createElement("td");
    for (const part of parts) {
      if (typeof part === "string") td.className = part;
      else td.append(part);
    }
    return td;
  }

  function downloads(job, maskBlob, overlayBlob) {
    const links = [["overlay.png", overlayBlob], ["mask.png", maskBlob]].map(([name, blob]) => {
      const a = document.createElement("a");
      a.href = URL.createObjectURL(blob);
      a.download = `${job.id}-${name}`;
      a.textContent = name;
      return a;
    });
    $("downloads").replaceChildren(document.createTextNode("Download: "), links[0], document.createTextNode(" · "), links[1]);
  }

  // The worker's blend, for the labels switched on: out = (1 - a) * image + a * colour.
  function render() {
    const { width, height, image, mask, colours, enabled } = state;
    const canvas = $("view");
    canvas.width = width;
    canvas.height = height;
    const out = new ImageData(new Uint8ClampedArray(image.data), width, height);
    const lut = new Array(256).fill(null);
    for (const id of enabled) if (id !== BACKGROUND && colours.has(id)) lut[id] = colours.get(id);
    for (let i = 0; i < mask.length; i++) {
      const colour = lut[mask[i]];
      if (!colour) continue;
      const p = i * 4;
      for (let c = 0; c < 3; c++) out.data[p + c] = Math.round((1 - ALPHA) * image.data[p + c] + ALPHA * colour[c]);
    }
    canvas.getContext("2d").putImageData(out, 0, 0);
  }

  function setAll(on) {
    for (const toggle of $("legend").querySelectorAll("input[type=checkbox]:not(:disabled)")) {
      toggle.checked = on;
      const id = Number(toggle.closest("tr").dataset.labelId);
      if (on) state.enabled.add(id);
      else state.enabled.delete(id);
    }
    render();
  }

  // --- input ------------------------------------------------------------------------------
  const drop = $("drop");
  $("file").addEventListener("change", (e) => e.target.files[0] && submit(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (file) submit(file);
  });
  $("all-on").addEventListener("click", () => setAll(true));
  $("all-off").addEventListener("click", () => setAll(false));
})();
