// Catalogue jobs on the page: hand over an archive or URLs, watch the progress. Uses api(), $() and
// refreshCatalogueViews() from app.js (loaded after this file, called later).
"use strict";

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
    lastJobs = list;
    const box = $("jobs");
    box.innerHTML = "";
    if (!list.length) box.innerHTML = '<p class="muted">No jobs yet.</p>';
    list.forEach((job) => box.appendChild(jobCard(job)));
    if (list.some((job) => !["succeeded", "failed", "cancelled"].includes(job.state))) {
      jobsTimer = setTimeout(loadJobs, 1000); // live while a job runs
    } else if (list.length) {
      refreshCatalogueViews();
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

