// Reading a job resource (app/schemas.py Job and JobSummary): its spec, its progress, its status badge.

import { h } from "./dom.js";
import { configKey } from "./format.js";

/** sessionStorage key of a spec the form should start from ("Edit & run again"). */
export const SPEC_DRAFT_KEY = "maxbatch.draft";

/** The request behind a job: the job's own spec, else the result's copy of it. */
export function jobSpec(job) {
  return (job && (job.spec || (job.result && job.result.spec))) || null;
}

/** {fraction (0..1 or null), text} for a job's progress object. */
export function progressOf(job) {
  const progress = job.progress || {};
  if (job.status === "queued") return { fraction: null, text: job.queued_reason || "waiting for the device" };
  const total = progress.configs_total || 0;
  const done = progress.configs_done || 0;
  const parts = [];
  if (total) parts.push(`${done}/${total} configs`);
  if (progress.trials_done) parts.push(`${progress.trials_done} trial${progress.trials_done === 1 ? "" : "s"}`);
  const current = progress.current;
  if (current && job.status === "running") {
    parts.push(`now ${configKey(current.precision, current.gradient_checkpointing, current.strategy)}${current.phase ? ` (${current.phase})` : ""}`);
  }
  return { fraction: total ? done / total : null, text: parts.join(" · ") };
}

/** A coloured status pill; the text carries the meaning, the colour only repeats it. */
export function statusBadge(status) {
  return h("span", { class: `badge status-${status}`, "data-status": status }, status);
}
