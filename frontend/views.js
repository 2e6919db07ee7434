// The page's pictures: the status panel, the prototype gallery, the catalogue map and the near-duplicate
// groups. Plain JS, no build step; uses api(), $() and card() from app.js (loaded after this file, called later).
"use strict";

const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
  "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#17becf"];

const Views = {
  map: null, // {points, bounds, colours}
  query: null, // [x, y] of the last query, or null
  duplicatesOffset: 0,

  colourOf(category) {
    const names = this.map ? this.map.names : [];
    const i = names.indexOf(category);
    return i < 0 ? "#999" : PALETTE[i % PALETTE.length];
  },

  // --- status: a readable panel -------------------------------------------------------------------

  renderStatus(s, jobs) {
    const box = $("status");
    box.innerHTML = "";
    const mb = (bytes) => `${(bytes / 2 ** 20).toFixed(1)} MB`;
    const rows = [
      ["Model", `${s.model.id} (${s.model.dim}-d) on ${s.model.device}, ${s.model.runtime}${s.model.loaded ? "" : ", not loaded"}`],
      ["Index", `${s.index.type}, ${s.index.codec}${s.index.rerank !== "none" ? ` + ${s.index.rerank} re-rank` : ""}, ${s.index.lists} lists`],
      ["State", `${s.index.loaded ? (s.index.current ? "current" : "catching up") : "not loaded"} · ${s.index.origin}`],
      ["Vectors", `${s.index.vectors} in ${s.index.categories} categories · ${mb(s.index.memory_bytes)} in memory`],
      ["Images", `${s.database.images} stored · ${s.database.server}`],
      ["Jobs", jobs === null ? "—" : `${jobs.filter((j) => !["succeeded", "failed", "cancelled"].includes(j.state)).length} running, ${jobs.length} listed`],
      ["Up", `${Math.round(s.uptime_s)} s`],
    ];
    if (s.index.retrain.length) rows.push(["Rebuild", s.index.retrain.join("; ")]);
    const table = document.createElement("dl");
    for (const [k, v] of rows) {
      const dt = document.createElement("dt");
      const dd = document.createElement("dd");
      dt.textContent = k;
      dd.textContent = v;
      table.append(dt, dd);
    }
    box.appendChild(table);
    const title = document.createElement("h3");
    title.textContent = "Images per category";
    box.appendChild(title);
    const most = Math.max(1, ...s.database.categories.map((c) => c.images));
    const list = document.createElement("ol");
    list.className = "categories counts";
    for (const c of s.database.categories) {
      const li = document.createElement("li");
      li.dataset.testid = "status-category";
      li.innerHTML = `<span class="name"></span><span class="bar"><span></span></span><span class="val"></span>`;
      li.querySelector(".name").textContent = c.name;
      li.querySelector(".bar span").style.width = `${(100 * c.images) / most}%`;
      li.querySelector(".val").textContent = c.images;
      li.title = `${c.images} images, ${c.labelled} with a given label`;
      list.appendChild(li);
    }
    box.appendChild(list);
  },

  // --- prototype gallery ---------------------------------------------------------------------------

  async loadGallery() {
    const data = await api("/prototypes/gallery?per_category=6");
    const box = $("gallery");
    box.innerHTML = "";
    if (!data.categories.length) box.innerHTML = '<p class="muted">No prototypes yet.</p>';
    for (const row of data.categories) {
      const div = document.createElement("div");
      div.className = "gallery-row";
      div.dataset.testid = "gallery-row";
      const name = document.createElement("div");
      name.className = "gallery-name";
      name.textContent = row.category;
      div.appendChild(name);
      const strip = document.createElement("div");
      strip.className = "strip";
      for (const img of row.images) {
        const c = card({ ...img, category: row.category, rank: 0, score: undefined }, "gallery-image");
        c.title = `image ${img.image_id}: cosine ${img.score.toFixed(3)} to the prototype; click for more like it`;
        strip.appendChild(c);
      }
      div.appendChild(strip);
      box.appendChild(div);
    }
  },

  // --- catalogue map -------------------------------------------------------------------------------

  async loadMap() {
    const data = await api("/map");
    const names = [...new Set(data.points.map((p) => p.category ?? "—"))].sort();
    const xs = data.points.map((p) => p.x), ys = data.points.map((p) => p.y);
    const pad = (lo, hi) => [lo - (hi - lo) * 0.05 - 1e-6, hi + (hi - lo) * 0.05 + 1e-6];
    this.map = { points: data.points, names, x: pad(Math.min(...xs), Math.max(...xs)), y: pad(Math.min(...ys), Math.max(...ys)) };
    const legend = $("map-legend");
    legend.innerHTML = "";
    for (const n of names) {
      const chip = document.createElement("span");
      chip.className = "chip";
      chip.innerHTML = `<i></i><span></span>`;
      chip.querySelector("i").style.background = this.colourOf(n);
      chip.querySelector("span").textContent = n;
      legend.appendChild(chip);
    }
    const share = data.explained.map((e) => `${Math.round(e * 100)} %`).join(" and ");
    const age = Math.round(data.age_seconds);
    $("map-note").textContent = `${data.points.length} images (a sample of the catalogue, drawn ${age} s ago); the two axes hold ${share} of the spread (PCA). Click a point for more like it.`;
    this.drawMap();
  },

  toCanvas(x, y) {
    const c = $("map");
    const m = this.map;
    return [((x - m.x[0]) / (m.x[1] - m.x[0])) * c.width, c.height - ((y - m.y[0]) / (m.y[1] - m.y[0])) * c.height];
  },

  drawMap() {
    const c = $("map");
    const ctx = c.getContext("2d");
    ctx.clearRect(0, 0, c.width, c.height);
    if (!this.map) return;
    for (const p of this.map.points) {
      const [px, py] = this.toCanvas(p.x, p.y);
      ctx.fillStyle = this.colourOf(p.category ?? "—");
      ctx.beginPath();
      ctx.arc(px, py, 2.5, 0, 2 * Math.PI);
      ctx.fill();
    }
    c.dataset.points = this.map.points.length;
    if (this.query) {
      const [qx, qy] = this.toCanvas(...this.query);
      ctx.lineWidth = 5;
      ctx.strokeStyle = "#fff";
      ctx.beginPath(); ctx.moveTo(qx - 9, qy - 9); ctx.lineTo(qx + 9, qy + 9); ctx.moveTo(qx + 9, qy - 9); ctx.lineTo(qx - 9, qy + 9); ctx.stroke();
      ctx.lineWidth = 2.5;
      ctx.strokeStyle = "#111";
      ctx.stroke();
      c.dataset.query = this.query.map((v) => v.toFixed(4)).join(",");
    }
  },

  async placeQuery(form) {
    const p = await api("/map/place", { method: "POST", body: form });
    this.query = [p.x, p.y];
    this.drawMap();
  },

  markImage(imageId) {
    const p = this.map && this.map.points.find((q) => q.image_id === imageId);
    this.query = p ? [p.x, p.y] : null;
    this.drawMap();
  },

  nearestPoint(event) {
    if (!this.map) return null;
    const c = $("map");
    const r = c.getBoundingClientRect();
    const ex = ((event.clientX - r.left) * c.width) / r.width, ey = ((event.clientY - r.top) * c.height) / r.height;
    let best = null, bestD = 64; // within 8 px
    for (const p of this.map.points) {
      const [px, py] = this.toCanvas(p.x, p.y);
      const d = (px - ex) ** 2 + (py - ey) ** 2;
      if (d < bestD) { best = p; bestD = d; }
    }
    return best;
  },

  // --- near-duplicate groups -----------------------------------------------------------------------

  async loadDuplicates(offset) {
    const page = await api(`/duplicates?offset=${offset}&limit=10`);
    const box = $("duplicates");
    if (offset === 0) box.innerHTML = "";
    $("duplicates-note").textContent =
      `${page.total} group(s) of images with a cosine of at least ${page.threshold} to another image` +
      (page.links_behind ? ` (${page.links_behind} newest image(s) not compared yet).` : ".");
    for (const g of page.groups) {
      const div = document.createElement("div");
      div.className = "dup-group";
      div.dataset.testid = "dup-group";
      const head = document.createElement("div");
      head.className = "muted";
      head.textContent = `${g.category ?? "—"} · ${g.images.length} images · cosine ${g.min_score.toFixed(3)}–${g.max_score.toFixed(3)}`;
      const strip = document.createElement("div");
      strip.className = "strip";
      g.images.forEach((img) => strip.appendChild(card({ ...img, category: g.category, rank: 0, score: undefined }, "dup-image")));
      div.append(head, strip);
      box.appendChild(div);
    }
    this.duplicatesOffset = offset + page.groups.length;
    $("duplicates-more").hidden = this.duplicatesOffset >= page.total;
  },
};
