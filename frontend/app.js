// The search page: plain JS against the JSON API, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
let queryFile = null;
let browseState = null;
// Replaced by the server's own bounds (GET /status, settings.bounds) as soon as the page loads.
let bounds = { limit: { min: 1, max: 50 }, top_categories: { min: 1, max: 10 }, nprobe: { min: 1, max: 100000 } };

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

// API key: asked for when the server answers 401/403, kept in sessionStorage (gone when the tab closes).
const KEY_STORE = "imsrc-api-key";
let keyRequest = null; // one pending question, shared by every request that needs the key

function storedKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

function showKeyState() {
  $("key-state").hidden = !storedKey();
}

function askForKey(reason) {
  if (!keyRequest) {
    keyRequest = new Promise((resolve, reject) => {
      $("key-reason").textContent = reason;
      $("key-panel").hidden = false;
      $("key-input").value = "";
      $("key-input").focus();
      const done = (ok) => {
        $("key-panel").hidden = true;
        $("key-panel").onsubmit = null;
        $("key-cancel").onclick = null;
        keyRequest = null;
        ok ? resolve() : reject(new Error(reason));
      };
      $("key-panel").onsubmit = (e) => {
        e.preventDefault();
        const key = $("key-input").value.trim();
        if (!key) return;
        sessionStorage.setItem(KEY_STORE, key);
        showKeyState();
        done(true);
      };
      $("key-cancel").onclick = () => done(false);
    });
  }
  return keyRequest;
}

async function api(path, options = {}, retried = false) {
  const headers = new Headers(options.headers || {});
  if (storedKey()) headers.set("X-API-Key", storedKey());
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (err) {
    throw new Error(`server unreachable: ${err.message}`);
  }
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  const detail = (body && body.detail) || `${response.status} ${response.statusText}`;
  const keyProblem = response.status === 401 || (response.status === 403 && detail.includes("API key"));
  if (keyProblem && !retried) {
    await askForKey(`This needs an API key: ${detail}`);
    return api(path, options, true);
  }
  if (keyProblem) {
    sessionStorage.removeItem(KEY_STORE); // the key just given did not do: ask again next time
    showKeyState();
  }
  if (!response.ok) {
    throw new Error(detail);
  }
  return body;
}

function clampInput(input, name) {
  const lo = bounds[name].min, hi = bounds[name].max;
  const value = Math.round(Number(input.value));
  const clamped = Number.isFinite(value) ? Math.min(hi, Math.max(lo, value)) : lo;
  input.value = clamped;
  return clamped;
}

function setQuery(file) {
  if (!file) return;
  queryFile = file;
  const preview = $("query-preview");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("drop-hint").textContent = file.name;
  $("search-btn").disabled = false;
  $("prototypes-btn").disabled = false;
}

function card(hit) {
  const div = document.createElement("a");
  div.className = "card";
  div.href = hit.url;
  div.target = "_blank";
  div.dataset.testid = "result";
  div.innerHTML = `<img loading="lazy" alt="">
    <div class="meta"><span class="cat"></span><span class="score"></span></div>`;
  div.querySelector("img").src = hit.thumbnail_url;
  div.querySelector(".cat").textContent = (hit.category ?? "—") + (hit.label_given === false ? " (predicted)" : "");
  if (hit.score !== undefined) {
    div.querySelector(".score").textContent = `#${hit.rank} · cos ${hit.score.toFixed(3)}`;
  }
  return div;
}

function renderCategories(categories) {
  const list = $("categories");
  list.innerHTML = "";
  for (const c of categories) {
    const li = document.createElement("li");
    li.className = c.searched ? "searched" : "";
    li.dataset.testid = "category";
    li.innerHTML = `<span class="name"></span><span class="bar"><span></span></span><span class="val"></span>`;
    li.querySelector(".name").textContent = c.category + (c.searched ? " ✓" : "");
    // Stage 1's calibrated probability when a ranker is trained; its cosine score otherwise.
    const p = c.probability;
    li.querySelector(".bar span").style.width = `${Math.max(0, p ?? c.score) * 100}%`;
    li.querySelector(".val").textContent = p == null ? c.score.toFixed(3) : `${(p * 100).toFixed(1)} %`;
    li.title = `score ${c.score.toFixed(3)}` + (p == null ? "" : ` · probability ${p.toFixed(3)}`);
    list.appendChild(li);
  }
}

function renderTimings(timings, extra = "") {
  const parts = Object.entries(timings).map(([k, v]) => `${k} ${v.toFixed(1)} ms`);
  $("timings").textContent = parts.join(" · ") + extra;
}

// The search options as query parameters, each clamped to the bounds the server enforces.
function searchParams() {
  return new URLSearchParams({
    limit: clampInput($("limit"), "limit"),
    top_categories: clampInput($("top-categories"), "top_categories"),
    nprobe: clampInput($("nprobe"), "nprobe"),
    use_prototypes: $("use-prototypes").checked,
  });
}

async function runSearch() {
  if (!queryFile) return;
  showError("");
  const form = new FormData();
  form.append("file", queryFile);
  const params = searchParams();
  $("results").innerHTML = '<p class="muted">Searching…</p>';
  try {
    const data = await api(`/search?${params}`, { method: "POST", body: form });
    $("results-title").textContent =
      `Results (${data.use_prototypes ? `two-stage, top ${data.top_categories} categories` : "exact"}; ` +
      `scanned ${data.vectors_scanned} of ${data.vectors_total} vectors)`;
    const grid = $("results");
    grid.innerHTML = "";
    if (!data.results.length) grid.innerHTML = '<p class="muted">No images found.</p>';
    data.results.forEach((hit) => grid.appendChild(card(hit)));
    renderCategories(data.categories);
    renderTimings(data.timings_ms);
  } catch (err) {
    $("results").innerHTML = "";
    showError(`Search failed: ${err.message}`);
  }
}

async function runPrototypes() {
  if (!queryFile) return;
  showError("");
  const form = new FormData();
  form.append("file", queryFile);
  try {
    const data = await api("/search/prototypes", { method: "POST", body: form });
    renderCategories(data.categories);
    renderTimings(data.timings_ms);
    $("results-title").textContent = "Results (prototypes only)";
    $("results").innerHTML = '<p class="muted">Category ranking only: see the list on the left.</p>';
  } catch (err) {
    showError(`Prototype search failed: ${err.message}`);
  }
}

async function loadCategories() {
  const cats = await api("/categories");
  const select = $("upload-category");
  const chosen = select.value;
  select.length = 1;
  const chips = $("category-list");
  chips.innerHTML = "";
  for (const c of cats) {
    select.add(new Option(`${c.name} (${c.images})`, c.name));
    const chip = document.createElement("button");
    chip.className = "chip";
    chip.dataset.testid = "category-chip";
    chip.textContent = `${c.name} · ${c.images}`;
    chip.onclick = () => browse(c.id, 0);
    chips.appendChild(chip);
  }
  select.value = chosen;
}

async function browse(categoryId, offset) {
  showError("");
  try {
    const page = await api(`/categories/${categoryId}/images?offset=${offset}&limit=40`);
    const grid = $("browse");
    if (offset === 0) grid.innerHTML = "";
    page.items.forEach((img) => {
      const c = card({ ...img, rank: 0 });
      c.title = `image ${img.id}: click to search with it`;
      c.onclick = (ev) => { ev.preventDefault(); similarTo(img.id); };
      grid.appendChild(c);
    });
    browseState = { categoryId, offset: offset + page.items.length, total: page.total };
    $("browse-more").hidden = browseState.offset >= page.total;
  } catch (err) {
    showError(`Browsing failed: ${err.message}`);
  }
}

async function similarTo(imageId) {
  const params = searchParams();
  try {
    const data = await api(`/images/${imageId}/similar?${params}`);
    $("results-title").textContent = `Similar to image ${imageId}`;
    const grid = $("results");
    grid.innerHTML = "";
    data.results.forEach((hit) => grid.appendChild(card(hit)));
    renderCategories(data.categories);
    renderTimings(data.timings_ms);
    window.scrollTo({ top: 0, behavior: "smooth" });
  } catch (err) {
    showError(`Search failed: ${err.message}`);
  }
}

async function upload(event) {
  event.preventDefault();
  showError("");
  const file = $("upload-file").files[0];
  if (!file) return;
  const form = new FormData();
  form.append("file", file);
  if ($("upload-category").value) form.append("category", $("upload-category").value);
  if ($("upload-description").value) form.append("description", $("upload-description").value);
  try {
    const r = await api("/upload", { method: "POST", body: form });
    const p = r.category_probability;
    const how = r.label_given
      ? ""
      : ` (predicted${p == null ? `, score ${r.category_score.toFixed(3)}` : `, probability ${(p * 100).toFixed(1)} %`})`;
    $("upload-result").textContent = r.duplicate
      ? `Already stored as image ${r.image_id} (${r.category}).`
      : `Stored as image ${r.image_id} in ${r.category}${how}.`;
    await Promise.all([loadCategories(), loadStatus()]);
  } catch (err) {
    showError(`Upload failed: ${err.message}`);
  }
}

async function loadStatus() {
  try {
    const s = await api("/status");
    $("status-line").textContent =
      `${s.database.images} images · ${s.database.categories.length} categories · ${s.model.id} on ${s.model.device}`;
    $("status").textContent = JSON.stringify(
      { model: s.model, index: s.index, images: s.database.images, uptime_s: s.uptime_s }, null, 2);
    $("use-prototypes").defaultChecked = s.settings.use_prototype_filtering;
    if (!bounds.fromServer) {
      bounds = { ...s.settings.bounds, fromServer: true };
      for (const [id, name, value] of [["limit", "limit", s.settings.default_search_limit],
                                       ["top-categories", "top_categories", s.settings.default_top_categories],
                                       ["nprobe", "nprobe", s.index.default_nprobe]]) {
        Object.assign($(id), { min: bounds[name].min, max: bounds[name].max, value });
      }
    }
  } catch (err) {
    $("status-line").textContent = "status unavailable";
    showError(`Status failed: ${err.message}`);
  }
}

// --- catalogue jobs: hand over an archive or URLs, watch the progress --------------------------------

let jobsTimer = null;

function jobCard(job) {
  const div = document.createElement("div");
  div.className = `job ${job.state}`;
  div.dataset.testid = `job-${job.id}`;
  const pct = Math.round(job.progress * 100);
  const rate = job.images_per_s ? ` · ${job.images_per_s.toFixed(1)} images/s` : "";
  div.innerHTML = `<div class="job-head"></div><progress max="100"></progress><div class="job-counts muted"></div>`;
  div.querySelector(".job-head").textContent = `#${job.id} ${job.kind} · ${job.state} · ${pct} %`;
  const bar = div.querySelector("progress");
  bar.value = pct;
  bar.dataset.testid = `job-progress-${job.id}`;
  div.querySelector(".job-counts").textContent =
    `${job.done} / ${job.total} done: ${job.added} added, ${job.duplicates} duplicates, ${job.failed} failed` +
    (job.skipped ? `, ${job.skipped} skipped` : "") + rate + (job.message ? ` — ${job.message}` : "");
  if (job.failures.length) {
    const details = document.createElement("details");
    details.innerHTML = `<summary></summary><ul></ul>`;
    details.querySelector("summary").textContent = `${job.failures.length} failure(s)`;
    for (const f of job.failures) {
      const li = document.createElement("li");
      li.textContent = `${f.source}: ${f.reason}`;
      details.querySelector("ul").appendChild(li);
    }
    div.appendChild(details);
  }
  if (!["succeeded", "failed", "cancelled"].includes(job.state)) {
    const cancel = document.createElement("button");
    cancel.className = "link";
    cancel.textContent = "cancel";
    cancel.addEventListener("click", async () => {
      try { await api(`/jobs/${job.id}/cancel`, { method: "POST" }); loadJobs(); }
      catch (err) { showError(`Cancel failed: ${err.message}`); }
    });
    div.appendChild(cancel);
  }
  return div;
}

async function loadJobs() {
  clearTimeout(jobsTimer);
  try {
    const list = await api("/jobs");
    const box = $("jobs");
    box.innerHTML = "";
    if (!list.length) box.innerHTML = '<p class="muted">No jobs yet.</p>';
    list.forEach((job) => box.appendChild(jobCard(job)));
    if (list.some((job) => !["succeeded", "failed", "cancelled"].includes(job.state))) {
      jobsTimer = setTimeout(loadJobs, 1000); // live while a job runs
    } else if (list.length) {
      loadStatus();
      loadCategories().catch(() => {});
    }
  } catch (err) {
    showError(`Jobs failed: ${err.message}`);
  }
}

async function submitJob(event, path, body) {
  event.preventDefault();
  showError("");
  try {
    await api(path, { method: "POST", ...body });
    event.target.reset();
    loadJobs();
  } catch (err) {
    showError(`Job not started: ${err.message}`);
  }
}

function init() {
  const zone = $("dropzone");
  $("query-file").addEventListener("change", (e) => setQuery(e.target.files[0]));
  ["dragenter", "dragover"].forEach((t) => zone.addEventListener(t, (e) => { e.preventDefault(); zone.classList.add("over"); }));
  ["dragleave", "drop"].forEach((t) => zone.addEventListener(t, () => zone.classList.remove("over")));
  zone.addEventListener("drop", (e) => { e.preventDefault(); setQuery(e.dataTransfer.files[0]); });
  $("search-btn").addEventListener("click", runSearch);
  $("prototypes-btn").addEventListener("click", runPrototypes);
  $("upload-form").addEventListener("submit", upload);
  $("archive-form").addEventListener("submit", (e) => {
    const form = new FormData();
    form.append("file", $("archive-file").files[0]);
    submitJob(e, "/jobs/archive", { body: form });
  });
  $("urls-form").addEventListener("submit", (e) => {
    const form = new FormData();
    form.append("file", new Blob([$("urls-text").value], { type: "text/plain" }), "urls.txt");
    submitJob(e, "/jobs/urls", { body: form });
  });
  $("browse-more").addEventListener("click", () => browseState && browse(browseState.categoryId, browseState.offset));
  $("key-forget").addEventListener("click", () => { sessionStorage.removeItem(KEY_STORE); showKeyState(); });
  showKeyState();
  loadStatus();
  loadCategories().catch((err) => showError(`Categories failed: ${err.message}`));
  loadJobs();
}

init();
