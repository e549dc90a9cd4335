// clipserve demo page: plain browser JavaScript over the public HTTP API, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "clipserve.apiKey";
const THUMB_SIZE = 128;
const state = { imageDataUrl: null };

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers(json) {
  const result = {};
  if (json) result["Content-Type"] = "application/json";
  const key = $("api-key").value.trim();
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let payload = null;
  try {
    payload = text ? JSON.parse(text) : null;
  } catch {
    payload = null;
  }
  if (!response.ok) {
    const message = payload?.error?.message || text || response.statusText;
    const hint = response.status === 401 ? " (enter a valid API key above)" : "";
    throw new ApiError(response.status, `${response.status}: ${message}${hint}`);
  }
  return payload;
}

function showError(id, message) {
  const box = $(id);
  box.textContent = message;
  box.hidden = !message;
}

function selectedModel() {
  return $("model").value || undefined;
}

function listOf(payload, key) {
  if (Array.isArray(payload)) return payload;
  return payload?.[key] || payload?.data || [];
}

function fillSelect(select, values, firstLabel) {
  select.replaceChildren(new Option(firstLabel, ""));
  for (const [value, label] of values) select.add(new Option(label, value));
}

async function loadModels() {
  try {
    const models = listOf(await api("GET", "/v1/models"), "data");
    const current = $("model").value;
    fillSelect($("model"), models.map((m) => [`${m.name}@${m.version}`, `${m.name} v${m.version} (dim ${m.dim})`]), "default");
    $("model").value = current;
    const fallback = models.find((m) => m.default) || models[0];
    $("status").textContent = fallback ? `serving ${fallback.name} v${fallback.version}` : "no model loaded";
  } catch (error) {
    $("status").textContent = error.message;
  }
}

async function loadLabelsets() {
  try {
    const sets = listOf(await api("GET", "/v1/labelsets"), "labelsets");
    fillSelect($("labelset"), sets.map((s) => [s.name, `${s.name} (${s.label_count} labels)`]), "(labels typed here)");
  } catch {
    // The typed labels still work; the status line already says what is wrong with the API.
  }
}

async function loadCollections() {
  try {
    const collections = listOf(await api("GET", "/v1/collections"), "collections");
    const options = collections.map((c) => new Option(typeof c === "string" ? c : c.name));
    $("collections").replaceChildren(...options);
  } catch {
    // Typing a collection name still works.
  }
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

function notAnImage(file) {
  return !file.type.startsWith("image/");
}

async function takeImage(file) {
  showError("classify-error", "");
  $("classify-results").replaceChildren();
  if (notAnImage(file)) {
    state.imageDataUrl = null;
    $("preview").hidden = true;
    showError("classify-error", `${file.name} is not an image (${file.type || "unknown type"}): choose a PNG, JPEG, WebP or GIF file.`);
    return;
  }
  state.imageDataUrl = await readAsDataUrl(file);
  $("preview").src = state.imageDataUrl;
  $("preview").alt = file.name;
  $("preview").hidden = false;
  await classify();
}

function parseLabels(text) {
  return text.split(/[\n,]/).map((label) => label.trim()).filter(Boolean);
}

function renderBars(labels) {
  const items = labels.map(({ label, score }) => {
    const item = document.createElement("li");
    item.className = "bar";
    const name = document.createElement("span");
    name.className = "label";
    name.textContent = label;
    name.title = label;
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = `${(score * 100).toFixed(1)}%`;
    fill.style.display = "block";
    track.append(fill);
    const value = document.createElement("span");
    value.className = "score";
    value.textContent = `${(score * 100).toFixed(1)}%`;
    item.append(name, track, value);
    return item;
  });
  $("classify-results").replaceChildren(...items);
}

async function classify() {
  showError("classify-error", "");
  if (!state.imageDataUrl) {
    showError("classify-error", "Choose or drop an image first.");
    return;
  }
  const body = { images: [state.imageDataUrl], top_k: Number($("top-k").value) || 5, model: selectedModel() };
  if ($("labelset").value) body.labelset = $("labelset").value;
  else body.labels = parseLabels($("labels").value);
  $("classify-button").disabled = true;
  try {
    const response = await api("POST", "/v1/classify", body);
    renderBars(response.results[0].labels);
    $("status").textContent = `classified by ${response.model} v${response.version}`;
  } catch (error) {
    $("classify-results").replaceChildren();
    showError("classify-error", error.message);
  } finally {
    $("classify-button").disabled = false;
  }
}

function thumbnail(dataUrl) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => {
      const scale = THUMB_SIZE / Math.max(image.width, image.height, 1);
      const canvas = document.createElement("canvas");
      canvas.width = Math.max(1, Math.round(image.width * scale));
      canvas.height = Math.max(1, Math.round(image.height * scale));
      canvas.getContext("2d").drawImage(image, 0, 0, canvas.width, canvas.height);
      resolve(canvas.toDataURL("image/jpeg", 0.8));
    };
    image.onerror = () => reject(new Error("the browser cannot decode this image"));
    image.src = dataUrl;
  });
}

async function ensureCollection(name) {
  try {
    await api("GET", `/v1/collections/${encodeURIComponent(name)}`);
  } catch (error) {
    if (error.status !== 404) throw error;
    await api("POST", "/v1/collections", { name, model: selectedModel() });
  }
}

async function indexFiles(files) {
  showError("search-error", "");
  const name = $("collection").value.trim();
  if (!name) {
    showError("search-error", "Name a collection first.");
    return;
  }
  const rejected = files.filter(notAnImage).map((f) => f.name);
  if (rejected.length) {
    showError("search-error", `Not images, skipped: ${rejected.join(", ")}`);
  }
  const images = files.filter((f) => !notAnImage(f));
  if (!images.length) return;
  $("search-info").textContent = `Adding ${images.length} image(s) to ${name}…`;
  try {
    await ensureCollection(name);
    const items = [];
    for (const file of images) {
      const dataUrl = await readAsDataUrl(file);
      const thumb = await thumbnail(dataUrl);
      items.push({ id: file.name, image: dataUrl, metadata: { filename: file.name, thumbnail: thumb } });
    }
    const response = await api("POST", `/v1/collections/${encodeURIComponent(name)}/items`, { items });
    $("search-info").textContent = `Added ${response.upserted} image(s) to ${name}.`;
    await loadCollections();
  } catch (error) {
    $("search-info").textContent = "";
    showError("search-error", error.message);
  }
}

function thumbnailSource(metadata) {
  const candidate = metadata?.thumbnail || metadata?.url || metadata?.image;
  return typeof candidate === "string" && /^(data:image\/|https?:)/.test(candidate) ? candidate : null;
}

function renderThumbs(results) {
  const items = results.map(({ id, score, metadata }) => {
    const item = document.createElement("li");
    const image = document.createElement("img");
    const source = thumbnailSource(metadata);
    if (source) image.src = source;
    image.alt = String(id);
    const caption = document.createElement("div");
    caption.className = "caption";
    const label = document.createElement("span");
    label.textContent = String(id);
    label.title = String(id);
    const value = document.createElement("span");
    value.textContent = score.toFixed(3);
    caption.append(label, value);
    item.append(image, caption);
    return item;
  });
  $("search-results").replaceChildren(...items);
}

async function search(event) {
  event.preventDefault();
  showError("search-error", "");
  const name = $("collection").value.trim();
  const text = $("query").value.trim();
  if (!name || !text) {
    showError("search-error", "Name a collection and type a sentence.");
    return;
  }
  $("search-button").disabled = true;
  try {
    const response = await api("POST", `/v1/collections/${encodeURIComponent(name)}/search`, { text, top_k: 12 });
    renderThumbs(response.results);
    $("search-info").textContent = response.results.length ? "" : `No items in ${name} yet: add images above.`;
  } catch (error) {
    $("search-results").replaceChildren();
    showError("search-error", error.message);
  } finally {
    $("search-button").disabled = false;
  }
}

function wireDropZone() {
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    const file = event.dataTransfer.files[0];
    if (file) takeImage(file);
  });
}

async function refresh() {
  await loadModels();
  await Promise.all([loadLabelsets(), loadCollections()]);
}

function main() {
  $("api-key").value = sessionStorage.getItem(KEY_STORAGE) || "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    refresh();
  });
  $("image-file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) takeImage(file);
  });
  $("index-files").addEventListener("change", (event) => indexFiles([...event.target.files]));
  $("classify-button").addEventListener("click", classify);
  $("search-form").addEventListener("submit", search);
  wireDropZone();
  refresh();
}

main();
