// The jobs list: every probe, newest first, refreshed while the page is open, filtered by status.

import { api, TERMINAL } from "./api.js";
import { h } from "./dom.js";
import { bytesToInput, formatAge, formatDuration, formatPlan, formatTime, modelLabel } from "./format.js";
import { jobSpec, progressOf, statusBadge } from "./jobinfo.js";

const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];
const PAGE = 50;
const REFRESH_ACTIVE_MS = 1500;
const REFRESH_IDLE_MS = 5000;

/** The items and the next cursor of a list page, whatever the envelope calls them. */
function pageOf(data) {
  const items = Array.isArray(data) ? data : data.items || data.jobs || data.data || [];
  const next = Array.isArray(data) ? null : data.next_after ?? data.next ?? null;
  return { items, next };
}

function progressCell(job) {
  const progress = progressOf(job);
  if (TERMINAL.has(job.status)) {
    const ran = (Date.parse(job.finished_at) - Date.parse(job.started_at)) / 1000;
    return h("span", { class: "muted" }, Number.isFinite(ran) ? `ran ${formatDuration(ran)}` : "–");
  }
  if (progress.fraction === null) return h("span", { class: "muted" }, progress.text || job.status);
  return h("div", { class: "progress-cell" },
    h("progress", { max: 1, value: progress.fraction, "aria-label": `progress of ${job.id}` }),
    h("span", { class: "progress-text" }, progress.text));
}

function resultCell(job, detail) {
  const rec = detail && detail.result && detail.result.recommendation;
  if (rec) {
    return h("span", {}, h("strong", {}, String(rec.plan.per_device_train_batch_size)),
      ` · ${rec.precision}${rec.gradient_checkpointing ? " · ckpt" : ""}`
        + `${rec.strategy && rec.strategy !== "single" ? ` · ${rec.strategy}` : ""}`
        + `${rec.finetuning && rec.finetuning !== "full" ? ` · ${rec.finetuning}` : ""}`,
      h("span", { class: "muted small" }, ` (${formatPlan(rec.plan)})`));
  }
  if (job.status === "failed" && job.error) {
    return h("span", { class: "error-text" }, job.error.title || job.error.code || "failed");
  }
  if (job.status === "succeeded" && detail) return h("span", { class: "muted" }, "none reaches the target");
  return h("span", { class: "muted" }, "–");
}

function row(job, detail, now) {
  const spec = jobSpec(detail) || {};
  const href = `#/jobs/${encodeURIComponent(job.id)}`;
  const memory = spec.memory_limit_bytes ? ` · ${bytesToInput(spec.memory_limit_bytes)}` : (spec.gpu ? ` · ${spec.gpu}` : "");
  return h("tr", { "data-job": job.id, "data-status": job.status },
    h("td", { "data-label": "Status" }, statusBadge(job.status)),
    h("td", { "data-label": "Model", class: "model-cell" },
      h("a", { href, class: "job-link" }, spec.model ? modelLabel(spec.model) : job.model),
      h("div", { class: "muted small mono" }, job.id)),
    h("td", { "data-label": "Seq len", class: "num" }, spec.seq_len ?? job.seq_len ?? "…"),
    h("td", { "data-label": "Device" }, `${job.device ?? spec.device ?? "?"}${memory}`),
    h("td", { "data-label": "Progress" }, progressCell(job)),
    h("td", { "data-label": "Recommended" }, resultCell(job, detail)),
    h("td", { "data-label": "Age", class: "nowrap", title: formatTime(job.created_at) }, formatAge(job.created_at, now)));
}

/** Render the list into `root`; `query` holds the hash's parameters. Returns a cleanup function. */
export function jobsView(root, query) {
  let status = STATUSES.includes(query.get("status")) ? query.get("status") : "";
  let jobs = [];
  let next = null;
  let extraPages = false;
  let timer = null;
  let stopped = false;
  const controller = new AbortController();
  // A list item carries no spec or result: fetch each job once (again when it finishes) and keep it.
  const details = new Map();
  const fetching = new Set();

  const tbody = h("tbody", {});
  const note = h("p", { class: "muted", id: "jobs-note" });
  const more = h("button", { type: "button", hidden: true, onclick: () => loadMore() }, "Load older probes");
  const filter = h("div", { class: "filter", role: "group", "aria-label": "Filter by status" },
    ["", ...STATUSES].map((value) => h("button", {
      type: "button",
      class: "chip",
      "data-status": value || "all",
      "aria-pressed": value === status ? "true" : "false",
      onclick: () => {
        location.hash = value ? `#/?status=${value}` : "#/";
      },
    }, value || "all")));

  root.replaceChildren(
    h("div", { class: "page-head" }, h("h1", {}, "Probes")),
    filter,
    h("div", { class: "table-wrap" },
      h("table", { class: "jobs responsive", id: "jobs-table" },
        h("caption", { class: "visually-hidden" }, "Probes, newest first"),
        h("thead", {}, h("tr", {},
          ...["Status", "Model", "Seq len", "Device", "Progress", "Recommended", "Age"].map((t) => h("th", { scope: "col" }, t)))),
        tbody)),
    note,
    more);

  function render() {
    const now = Date.now();
    tbody.replaceChildren(...jobs.map((job) => row(job, details.get(job.id), now)));
    if (!jobs.length) {
      note.textContent = status ? `No ${status} probes.` : "No probes yet. Start one with “New probe”.";
    } else {
      note.textContent = "";
    }
    more.hidden = !next;
  }

  async function refresh() {
    const params = new URLSearchParams({ limit: String(PAGE) });
    if (status) params.set("status", status);
    try {
      const { data } = await api(`probes?${params}`, { signal: controller.signal });
      const page = pageOf(data);
      if (extraPages && page.items.length) {
        // Keep the older pages the user loaded; the fresh first page replaces what it covers.
        const fresh = new Set(page.items.map((job) => job.id));
        const oldest = page.items[page.items.length - 1].created_at;
        jobs = page.items.concat(jobs.filter((job) => !fresh.has(job.id) && job.created_at < oldest));
      } else {
        jobs = page.items;
        next = page.next;
      }
      render();
      fetchDetails();
    } catch (error) {
      if (controller.signal.aborted) return;
      note.textContent = `Could not load probes: ${error.message}`;
    }
    schedule();
  }

  async function loadMore() {
    if (!next) return;
    const params = new URLSearchParams({ limit: String(PAGE), after: next });
    if (status) params.set("status", status);
    try {
      const { data } = await api(`probes?${params}`, { signal: controller.signal });
      const page = pageOf(data);
      const known = new Set(jobs.map((job) => job.id));
      jobs = jobs.concat(page.items.filter((job) => !known.has(job.id)));
      next = page.next;
      extraPages = true;
      render();
      fetchDetails();
    } catch (error) {
      if (!controller.signal.aborted) note.textContent = `Could not load older probes: ${error.message}`;
    }
  }

  async function fetchDetails() {
    const wanted = jobs.filter((job) => {
      const known = details.get(job.id);
      return !fetching.has(job.id) && (!known || known.status !== job.status && TERMINAL.has(job.status));
    });
    const worker = async () => {
      for (let job = wanted.shift(); job && !stopped; job = wanted.shift()) {
        fetching.add(job.id);
        try {
          const { data } = await api(`probes/${encodeURIComponent(job.id)}`, { signal: controller.signal });
          details.set(job.id, data);
        } catch { /* the row keeps its summary */ } finally {
          fetching.delete(job.id);
        }
      }
    };
    await Promise.all([worker(), worker(), worker(), worker()]);
    if (!stopped) render();
  }

  function schedule() {
    if (stopped) return;
    clearTimeout(timer);
    const active = jobs.some((job) => !TERMINAL.has(job.status));
    timer = setTimeout(() => {
      if (document.visibilityState === "hidden") schedule();
      else refresh();
    }, active ? REFRESH_ACTIVE_MS : REFRESH_IDLE_MS);
  }

  refresh();
  return () => {
    stopped = true;
    clearTimeout(timer);
    controller.abort();
  };
}
