// The search page: plain JS against the JSON API, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
let queryFile = null;
let browseState = null;
let lastQuery = null; // {form} for an uploaded file or a URL, {imageId} for "more like this": what the pager repeats
let offset = 0;
let lastJobs = null;
// Replaced by the server's own bounds (GET /status, settings.bounds) as soon as the page loads.
let bounds = { limit: { min: 1, max: 50 }, top_categories: { min: 1, max: 10 }, nprobe: { min: 1, max: 100000 },
               offset: { min: 0, max: 1000 }, min_score: { min: -1, max: 1 } };

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function clampInput(input, name, round = true) {
  const lo = bounds[name].min, hi = bounds[name].max;
  const value = round ? Math.round(Number(input.value)) : Number(input.value);
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
  $("query-url").value = "";
  enableSearch();
}

function enableSearch() {
  const ready = Boolean(queryFile) || $("query-url").value.trim() !== "";
  $("search-btn").disabled = !ready;
  $("prototypes-btn").disabled = !ready;
}

// The query as a form: the URL when one is typed, else the picked file.
function queryForm() {
  const form = new FormData();
  const url = $("query-url").value.trim();
  if (url) form.append("url", url);
  else if (queryFile) form.append("file", queryFile);
  else return null;
  return form;
}

// A stored image: click it for more like it; open the original or delete it from its corner.
function card(hit, testid = "result") {
  const id = hit.image_id ?? hit.id;
  const div = document.createElement("div");
  div.className = "card";
  div.dataset.testid = testid;
  div.dataset.imageId = id;
  div.title = `image ${id}: click for more like it`;
  div.innerHTML = `<img loading="lazy" alt="">
    <div class="meta"><span class="cat"></span><span class="score"></span></div>
    <div class="actions"><a class="open" target="_blank">open</a><button class="link delete" data-testid="delete">delete</button></div>`;
  div.querySelector("img").src = hit.thumbnail_url;
  div.querySelector(".open").href = hit.url;
  div.querySelector(".cat").textContent = (hit.category ?? "—") + (hit.label_given === false ? " (predicted)" : "");
  if (hit.score !== undefined) {
    div.querySelector(".score").textContent = `#${hit.rank} · cos ${hit.score.toFixed(3)}`;
  }
  div.addEventListener("click", (ev) => {
    if (ev.target.closest(".actions")) return;
    similarTo(id, 0);
  });
  div.querySelector(".delete").addEventListener("click", () => deleteImage(id));
  return div;
}

async function deleteImage(imageId) {
  if (!window.confirm(`Delete image ${imageId} from the catalogue?`)) return;
  showError("");
  try {
    await api(`/images/${imageId}`, { method: "DELETE" });
    document.querySelectorAll(`[data-image-id="${imageId}"]`).forEach((el) => el.remove());
    refreshCatalogueViews();
  } catch (err) {
    showError(`Delete failed: ${err.message}`);
  }
}

function refreshCatalogueViews() {
  loadStatus();
  loadCategories().catch(() => {});
  Views.loadMap().catch((err) => showError(`Map failed: ${err.message}`));
  Views.loadGallery().catch((err) => showError(`Gallery failed: ${err.message}`));
}

// Stage 1's ranking as bars: the calibrated probability when a ranker is trained, else the score relative to the best.
function renderCategories(categories) {
  const list = $("categories");
  list.innerHTML = "";
  const best = Math.max(1e-6, ...categories.map((c) => c.score));
  for (const c of categories) {
    const li = document.createElement("li");
    li.className = c.searched ? "searched" : "";
    li.dataset.testid = "category";
    li.innerHTML = `<span class="name"></span><span class="bar"><span></span></span><span class="val"></span>`;
    li.querySelector(".name").textContent = c.category + (c.searched ? " ✓" : "");
    // Stage 1's calibrated probability when a ranker is trained; its score relative to the best otherwise.
    const p = c.probability;
    li.querySelector(".bar span").style.width = `${(p == null ? Math.max(0, c.score) / best : p) * 100}%`;
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
function searchParams(pageOffset) {
  const params = new URLSearchParams({
    limit: clampInput($("limit"), "limit"),
    top_categories: clampInput($("top-categories"), "top_categories"),
    nprobe: clampInput($("nprobe"), "nprobe"),
    use_prototypes: $("use-prototypes").checked,
    offset: Math.min(bounds.offset.max, Math.max(0, pageOffset)),
  });
  if ($("min-score").value.trim() !== "") params.set("min_score", clampInput($("min-score"), "min_score", false));
  document.querySelectorAll("#filter-categories input:checked").forEach((box) => params.append("categories", box.value));
  return params;
}

function showResults(data, title) {
  $("results-title").textContent = title;
  const grid = $("results");
  grid.innerHTML = "";
  if (!data.results.length) grid.innerHTML = '<p class="muted">No images found.</p>';
  data.results.forEach((hit) => grid.appendChild(card(hit)));
  renderCategories(data.categories);
  renderTimings(data.timings_ms);
  offset = data.offset;
  $("page-prev").hidden = offset === 0;
  $("page-next").hidden = data.results.length < data.limit || offset + data.limit > bounds.offset.max;
}

function describe(data) {
  const mode = data.use_prototypes ? `two-stage, top ${data.top_categories} categories` : "exact";
  const cut = data.min_score !== null ? `, cosine ≥ ${data.min_score}` : "";
  const only = data.category_filter ? `, only ${data.category_filter.join(", ")}` : "";
  const page = data.offset ? `, from #${data.offset + 1}` : "";
  return `${mode}${only}${cut}${page}; scanned ${data.vectors_scanned} of ${data.vectors_total} vectors`;
}

async function runSearch(pageOffset = 0) {
  const form = queryForm();
  if (!form) return;
  lastQuery = { form };
  showError("");
  const params = searchParams(pageOffset);
  $("results").innerHTML = '<p class="muted">Searching…</p>';
  try {
    const data = await api(`/search?${params}`, { method: "POST", body: form });
    showResults(data, `Results (${describe(data)})`);
    if (pageOffset === 0) Views.placeQuery(queryForm()).catch((err) => showError(`Map failed: ${err.message}`));
  } catch (err) {
    $("results").innerHTML = "";
    showError(`Search failed: ${err.message}`);
  }
}

function turnPage(step) {
  const next = Math.max(0, offset + step * clampInput($("limit"), "limit"));
  if (lastQuery && lastQuery.imageId !== undefined) similarTo(lastQuery.imageId, next);
  else runSearch(next);
}

async function runPrototypes() {
  const form = queryForm();
  if (!form) return;
  showError("");
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
  const filters = $("filter-categories");
  const checked = new Set([...filters.querySelectorAll("input:checked")].map((box) => box.value));
  filters.innerHTML = "";
  for (const c of cats) {
    const label = document.createElement("label");
    label.className = "chip";
    label.innerHTML = `<input type="checkbox" data-testid="filter-category"> <span></span>`;
    label.querySelector("input").value = c.name;
    label.querySelector("input").checked = checked.has(c.name);
    label.querySelector("span").textContent = c.name;
    filters.appendChild(label);
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
      grid.appendChild(card({ ...img, image_id: img.id, rank: 0 }));
    });
    browseState = { categoryId, offset: offset + page.items.length, total: page.total };
    $("browse-more").hidden = browseState.offset >= page.total;
  } catch (err) {
    showError(`Browsing failed: ${err.message}`);
  }
}

async function similarTo(imageId, pageOffset = 0) {
  lastQuery = { imageId };
  showError("");
  const params = searchParams(pageOffset);
  try {
    const data = await api(`/images/${imageId}/similar?${params}`);
    showResults(data, `Similar to image ${imageId} (${describe(data)})`);
    Views.markImage(imageId);
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
  form.append("on_near_duplicate", $("upload-near").value);
  $("upload-near-list").innerHTML = "";
  try {
    const r = await api("/upload", { method: "POST", body: form });
    const p = r.category_probability;
    const how = r.label_given
      ? ""
      : ` (predicted${p == null ? `, score ${r.category_score.toFixed(3)}` : `, probability ${(p * 100).toFixed(1)} %`})`;
    const near = r.near_duplicates.length ? ` It has ${r.near_duplicates.length} near-duplicate(s) already stored:` : "";
    $("upload-result").textContent = r.duplicate
      ? `Already stored as image ${r.image_id} (${r.category}).`
      : `Stored as image ${r.image_id} in ${r.category}${how}.${near}`;
    r.near_duplicates.forEach((hit) => $("upload-near-list").appendChild(card(hit, "near-duplicate")));
    refreshCatalogueViews();
  } catch (err) {
    showError(`Upload failed: ${err.message}`);
  }
}

async function loadStatus() {
  try {
    const s = await api("/status");
    $("status-line").textContent =
      `${s.database.images} images · ${s.database.categories.length} categories · ${s.model.id} on ${s.model.device}`;
    Views.renderStatus(s, lastJobs);
    $("use-prototypes").defaultChecked = s.settings.use_prototype_filtering;
    if (!bounds.fromServer) {
      bounds = { ...s.settings.bounds, fromServer: true };
      for (const [id, name, value] of [["limit", "limit", s.settings.default_search_limit],
                                       ["top-categories", "top_categories", s.settings.default_top_categories],
                                       ["nprobe", "nprobe", s.index.default_nprobe]]) {
        Object.assign($(id), { min: bounds[name].min, max: bounds[name].max, value });
      }
      Object.assign($("min-score"), { min: bounds.min_score.min, max: bounds.min_score.max });
    }
  } catch (err) {
    $("status-line").textContent = "status unavailable";
    showError(`Status failed: ${err.message}`);
  }
}

function init() {
  const zone = $("dropzone");
  $("query-file").addEventListener("change", (e) => setQuery(e.target.files[0]));
  ["dragenter", "dragover"].forEach((t) => zone.addEventListener(t, (e) => { e.preventDefault(); zone.classList.add("over"); }));
  ["dragleave", "drop"].forEach((t) => zone.addEventListener(t, () => zone.classList.remove("over")));
  zone.addEventListener("drop", (e) => { e.preventDefault(); setQuery(e.dataTransfer.files[0]); });
  $("search-btn").addEventListener("click", () => runSearch(0));
  $("query-url").addEventListener("input", enableSearch);
  $("page-prev").addEventListener("click", () => turnPage(-1));
  $("page-next").addEventListener("click", () => turnPage(1));
  $("filter-categories").addEventListener("change", () => {
    const n = document.querySelectorAll("#filter-categories input:checked").length;
    $("filter-summary").textContent = n ? `(${n})` : "(all)";
  });
  $("map").addEventListener("click", (ev) => { const p = Views.nearestPoint(ev); if (p) similarTo(p.image_id, 0); });
  $("duplicates-btn").addEventListener("click", () => Views.loadDuplicates(0).catch((err) => showError(`Duplicates failed: ${err.message}`)));
  $("duplicates-more").addEventListener("click", () => Views.loadDuplicates(Views.duplicatesOffset).catch((err) => showError(`Duplicates failed: ${err.message}`)));
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
  Views.loadMap().catch((err) => showError(`Map failed: ${err.message}`));
  Views.loadGallery().catch((err) => showError(`Gallery failed: ${err.message}`));
}

init();
