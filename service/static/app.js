// clipserve demo page: plain browser JavaScript over the public HTTP API, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "clipserve.apiKey";
const THUMB_SIZE = 128;
// What the page last tried, so that fixing its cause (a key, a label, a file) retries it.
const state = { imageDataUrl: null, imageName: null, keyProblem: false };

class ApiError extends Error {
  constructor(status, type, message) {
    super(message);
    this.status = status;
    this.type = type;
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
  let response;
  try {
    response = await fetch(path, {
      method,
      headers: headers(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch {
    throw new ApiError(0, "unreachable", "");
  }
  const text = await response.text();
  let payload = null;
  try {
    payload = text ? JSON.parse(text) : null;
  } catch {
    payload = null;
  }
  if (!response.ok) {
    throw new ApiError(response.status, payload?.error?.type || "", payload?.error?.message || text || "");
  }
  return payload;
}

// The API's wording is for programs; people get what happened and what to do, never a status code.
function plain(error, subject) {
  if (!(error instanceof ApiError)) return error.message;
  const detail = error.message.replace(/^[\w.[\]]+: /, "");
  switch (error.status) {
    case 0:
      return "Cannot reach the service. Is it still running?";
    case 401:
      return $("api-key").value.trim()
        ? "That API key was not accepted. Check it and enter it again above."
        : "This service needs an API key. Enter it above.";
    case 403:
      return "That key may not do this.";
    case 400:
      return `${subject || "That file"} could not be read as an image. Choose a PNG, JPEG, WebP or GIF file.`;
    case 404:
      return detail ? `Not found: ${detail}.` : "Not found.";
    case 409:
      return `That cannot be done right now: ${detail}.`;
    case 413:
      return `${subject || "That"} is larger than this service accepts. Try a smaller file or fewer files.`;
    case 422:
      return `The service could not use that: ${detail}.`;
    case 429:
      return "The service is busy. Try again in a moment.";
    case 503:
      return "The service is not ready (still loading, or a store is out of reach). Try again in a moment.";
    default:
      return "Something went wrong on the service. Try again; if it keeps happening, tell whoever runs it.";
  }
}

function showError(id, message) {
  const box = $(id);
  box.textContent = message;
  box.hidden = !message;
}

function clearErrors() {
  for (const id of ["classify-error", "search-error"]) showError(id, "");
}

function selectedModel() {
  return $("model").value || undefined;
}

function listOf(payload, key) {
  if (Array.isArray(payload)) return payload;
  return payload?.[key] || payload?.data || [];
}

function fillSelect(select, values, firstLabel) {
  const current = select.value;
  select.replaceChildren(new Option(firstLabel, ""));
  for (const [value, label] of values) select.add(new Option(label, value));
  if ([...select.options].some((option) => option.value === current)) select.value = current;
}

async function loadModels() {
  try {
    const models = listOf(await api("GET", "/v1/models"), "data");
    fillSelect($("model"), models.map((m) => [`${m.name}@${m.version}`, `${m.name} v${m.version} (dim ${m.dim})`]), "default");
    const fallback = models.find((m) => m.default) || models[0];
    $("status").textContent = fallback ? `serving ${fallback.name} v${fallback.version}` : "no model is loaded yet";
    state.keyProblem = false;
    return true;
  } catch (error) {
    state.keyProblem = error.status === 401;
    $("status").textContent = plain(error);
    return false;
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
    $("collections").replaceChildren(...collections.map((c) => new Option(c.name)));
    const hint = $("collection-hint");
    if (!collections.length) {
      hint.textContent =
        "No collections yet. Type a name above and add images: the page creates the collection for you.";
    } else {
      const names = collections.map((c) => `${c.name} (${c.count} item${c.count === 1 ? "" : "s"})`);
      hint.textContent = `Collections: ${names.join(", ")}.`;
      if (!$("collection").value.trim()) $("collection").value = collections[0].name;
    }
  } catch {
    $("collection-hint").textContent = "";
  }
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`${file.name} could not be read.`));
    reader.readAsDataURL(file);
  });
}

function notAnImage(file) {
  return !file.type.startsWith("image/");
}

// Decoded by the browser before it is shown or sent: a file that is not really a picture never
// becomes a broken-image icon.
function decoded(dataUrl) {
  return new Promise((resolve) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => resolve(null);
    image.src = dataUrl;
  });
}

function notAnImageMessage(file) {
  return `${file.name} is not an image. Choose a PNG, JPEG, WebP or GIF file.`;
}

function forgetImage() {
  state.imageDataUrl = null;
  state.imageName = null;
  $("preview").hidden = true;
  $("preview").removeAttribute("src");
}

async function takeImage(file) {
  clearErrors();
  $("classify-results").replaceChildren();
  if (notAnImage(file)) {
    forgetImage();
    showError("classify-error", notAnImageMessage(file));
    return;
  }
  const dataUrl = await readAsDataUrl(file);
  if (!(await decoded(dataUrl))) {
    forgetImage();
    showError("classify-error", notAnImageMessage(file));
    return;
  }
  state.imageDataUrl = dataUrl;
  state.imageName = file.name;
  $("preview").src = dataUrl;
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
  if (body.labels && !body.labels.length) {
    $("classify-results").replaceChildren();
    showError("classify-error", "Type at least one label, or pick a label set.");
    return;
  }
  $("classify-button").disabled = true;
  try {
    const response = await api("POST", "/v1/classify", body);
    renderBars(response.results[0].labels);
    $("status").textContent = `classified by ${response.model} v${response.version}`;
  } catch (error) {
    $("classify-results").replaceChildren();
    if (error.status === 404 && body.labelset) {
      showError("classify-error", `The label set ${body.labelset} no longer exists. Pick another, or type labels.`);
      loadLabelsets();
    } else {
      showError("classify-error", plain(error, state.imageName));
    }
  } finally {
    $("classify-button").disabled = false;
  }
}

async function thumbnail(dataUrl) {
  const image = await decoded(dataUrl);
  if (!image) return null;
  const scale = THUMB_SIZE / Math.max(image.width, image.height, 1);
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(image.width * scale));
  canvas.height = Math.max(1, Math.round(image.height * scale));
  canvas.getContext("2d").drawImage(image, 0, 0, canvas.width, canvas.height);
  return canvas.toDataURL("image/jpeg", 0.8);
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
  clearErrors();
  const name = $("collection").value.trim();
  if (!name) {
    showError("search-error", "Type a name for the collection first (for example my-images).");
    return;
  }
  const images = [];
  const rejected = [];
  for (const file of files) {
    const dataUrl = notAnImage(file) ? null : await readAsDataUrl(file);
    const thumb = dataUrl ? await thumbnail(dataUrl) : null;
    if (thumb) images.push({ file, dataUrl, thumb });
    else rejected.push(file.name);
  }
  if (rejected.length) showError("search-error", `Not images, left out: ${rejected.join(", ")}.`);
  if (!images.length) return;
  $("search-info").textContent = `Adding ${images.length} image${images.length === 1 ? "" : "s"} to ${name}…`;
  try {
    await ensureCollection(name);
    const items = images.map(({ file, dataUrl, thumb }) => ({
      id: file.name,
      image: dataUrl,
      metadata: { filename: file.name, thumbnail: thumb },
    }));
    const response = await api("POST", `/v1/collections/${encodeURIComponent(name)}/items`, { items });
    $("search-info").textContent = `Added ${response.upserted} image${response.upserted === 1 ? "" : "s"} to ${name}.`;
    await loadCollections();
  } catch (error) {
    $("search-info").textContent = "";
    showError("search-error", plain(error, images.length === 1 ? images[0].file.name : "One of the files"));
  }
}

function thumbnailSource(metadata) {
  const candidate = metadata?.thumbnail || metadata?.url || metadata?.image;
  return typeof candidate === "string" && /^(data:image\/|https?:)/.test(candidate) ? candidate : null;
}

function renderThumbs(results) {
  const items = results.map(({ id, score, metadata }) => {
    const item = document.createElement("li");
    const source = thumbnailSource(metadata);
    let picture;
    if (source) {
      picture = document.createElement("img");
      picture.src = source;
      picture.alt = String(id);
      // a thumbnail the browser cannot show gives way to the placeholder, not a broken icon
      picture.addEventListener("error", () => picture.replaceWith(placeholder(id)));
    } else {
      picture = placeholder(id);
    }
    const caption = document.createElement("div");
    caption.className = "caption";
    const label = document.createElement("span");
    label.className = "name";
    label.textContent = String(metadata?.filename || id);
    label.title = label.textContent;
    const value = document.createElement("span");
    value.className = "score";
    value.textContent = `score ${score.toFixed(3)}`;
    caption.append(label, value);
    item.append(picture, caption);
    return item;
  });
  $("search-results").replaceChildren(...items);
}

function placeholder(id) {
  const box = document.createElement("div");
  box.className = "no-thumb";
  box.textContent = "no preview";
  box.title = String(id);
  return box;
}

async function search(event) {
  event?.preventDefault();
  clearErrors();
  const name = $("collection").value.trim();
  const text = $("query").value.trim();
  if (!name || !text) {
    showError("search-error", "Name a collection and type a sentence to search it.");
    return;
  }
  const topK = Math.max(1, Number($("search-top-k").value) || 6);
  const minScore = Number($("min-score").value);
  $("search-button").disabled = true;
  try {
    const body = { text, top_k: topK, min_score: Number.isFinite(minScore) ? minScore : 0 };
    const response = await api("POST", `/v1/collections/${encodeURIComponent(name)}/search`, body);
    renderThumbs(response.results);
    $("search-info").textContent = response.results.length
      ? `The ${response.results.length} best match${response.results.length === 1 ? "" : "es"} in ${name}.`
      : `Nothing in ${name} scores ${body.min_score} or more: lower the score, or add images above.`;
  } catch (error) {
    $("search-results").replaceChildren();
    $("search-info").textContent = "";
    if (error.status === 404 && error.type.includes("collection")) {
      showError("search-error", `There is no collection named ${name} yet. Add images to it above and the page creates it.`);
    } else {
      showError("search-error", plain(error));
    }
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
  const reachable = await loadModels();
  await Promise.all([loadLabelsets(), loadCollections()]);
  return reachable;
}

async function keyChanged() {
  sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
  clearErrors();
  if ((await refresh()) && state.imageDataUrl) await classify();
}

function main() {
  $("api-key").value = sessionStorage.getItem(KEY_STORAGE) || "";
  $("api-key").addEventListener("change", keyChanged);
  $("image-file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) takeImage(file);
  });
  $("index-files").addEventListener("change", (event) => indexFiles([...event.target.files]));
  $("classify-button").addEventListener("click", classify);
  $("search-form").addEventListener("submit", search);
  // a message about what was typed goes as soon as it is changed
  $("labels").addEventListener("input", () => showError("classify-error", ""));
  $("labelset").addEventListener("change", () => showError("classify-error", ""));
  for (const id of ["collection", "query"]) $(id).addEventListener("input", () => showError("search-error", ""));
  wireDropZone();
  refresh();
}

main();
