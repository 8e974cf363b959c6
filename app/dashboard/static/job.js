// The job page: status and progress, the recommendation, the config table and the peak-memory chart.

import { api, apiUrl, followEvents, getToken, TERMINAL } from "./api.js";
import { cardComparison, cardPicker, cardResult, requestCards } from "./cards.js";
import { peakChart } from "./chart.js";
import { announce, copyBlock, h } from "./dom.js";
import {
  configKey, configLabel, finetuningLabel, formatBytes, formatDuration, formatNumber, formatPlan, formatTime, keyOf,
  modelLabel, shellQuote,
} from "./format.js";
import { jobSpec, progressOf, SPEC_DRAFT_KEY, statusBadge } from "./jobinfo.js";

const POLL_MS = 2000;

/** The spec as JSON without null members (null means "the default" for every optional field). */
export function compactSpec(spec) {
  return JSON.parse(JSON.stringify(spec, (key, value) => (value === null ? undefined : value)));
}

/** A curl command that submits the same request to this service. */
export function curlCommand(spec) {
  const lines = [
    `curl -sS -X POST ${shellQuote(apiUrl("probes").href)}`,
    "  -H 'Content-Type: application/json'",
  ];
  if (getToken()) lines.push('  -H "Authorization: Bearer $MAXBATCH_API_TOKEN"');
  lines.push(`  -d ${shellQuote(JSON.stringify(compactSpec(spec)))}`);
  return lines.join(" \\\n");
}

/**
 * The job as JSON in a new tab. With a token, a plain link would open without it (401): the page
 * reads the job with its token and opens what it got instead.
 */
function jsonLink(job) {
  const href = apiUrl(`probes/${encodeURIComponent(job.id)}`).href;
  const link = h("a", { class: "button", id: "job-json", href, target: "_blank", rel: "noopener" }, "JSON");
  link.addEventListener("click", async (event) => {
    if (!getToken()) return;
    event.preventDefault();
    const { data } = await api(`probes/${encodeURIComponent(job.id)}`);
    const blob = new Blob([JSON.stringify(data, null, 2)], { type: "application/json" });
    window.open(URL.createObjectURL(blob), "_blank", "noopener");
  });
  return link;
}

/** Text from the engine as a sentence: capital first letter. */
function sentence(text) {
  return text ? text.charAt(0).toUpperCase() + text.slice(1) : "";
}

function limitOf(result) {
  const device = result.device || {};
  return device.memory_limit_bytes || device.total_memory_bytes || 0;
}

function trialSummary(trials) {
  const counts = new Map();
  for (const trial of trials || []) counts.set(trial.outcome, (counts.get(trial.outcome) || 0) + 1);
  const others = [...counts.entries()].filter(([outcome]) => outcome !== "fit")
    .map(([outcome, count]) => `${count} ${outcome.replace("_", " ")}`);
  return [String((trials || []).length), others.length ? h("div", { class: "muted small" }, others.join(", ")) : ""];
}

/** A table cell; its content sits in one .cell-value span, so narrow screens can lay it out as a card row. */
function cell(field, value, content, attrs = {}) {
  return h("td", { "data-field": field, "data-value": value ?? "", ...attrs }, h("span", { class: "cell-value" }, content));
}

function configHead(config, recommended) {
  return h("th", { scope: "row", "data-label": "Config" },
    h("span", { class: "swatch-dot", "data-precision": config.precision, "data-checkpointing": config.gradient_checkpointing ? "on" : "off" }),
    h("span", { class: "config-name" }, config.precision),
    h("div", { class: "muted small config-ckpt" }, `checkpointing ${config.gradient_checkpointing ? "on" : "off"}`),
    recommended ? h("span", { class: "badge recommended-badge" }, "recommended") : "");
}

function failingText(config) {
  const size = config.first_failing_batch_size;
  if (!size) return config.max_batch_size ? h("span", { class: "muted" }, "none found") : "–";
  const trial = (config.trials || []).find((t) => t.batch_size === size && t.outcome !== "fit");
  return [h("span", { class: "fail-text" }, String(size)),
    trial ? h("div", { class: "muted small nowrap" }, trial.outcome.replace("_", " ")) : ""];
}

function notesOf(config) {
  const notes = [];
  if (config.status === "ok" && config.reason) notes.push(config.reason);
  for (const warning of config.warnings || []) notes.push(warning);
  if (config.plan && config.plan.note) notes.push(config.plan.note);
  return notes;
}

function strategyCell(config) {
  const strategy = config.strategy || "single";
  return cell("strategy", strategy, strategy, { "data-label": "Strategy" });
}

function configRow(config, result, recommendedKey, withNotes) {
  const key = keyOf(config);
  const recommended = key === recommendedKey;
  const limit = limitOf(result);
  const attrs = { "data-config": key, "data-status": config.status, class: recommended ? "recommended" : null };
  if (config.status !== "ok" && !(config.trials || []).length) {
    return h("tr", attrs, configHead(config, recommended), strategyCell(config),
      cell("status", config.status, statusBadge(config.status), { "data-label": "Status" }),
      cell("reason", config.reason, config.reason || "–", { colspan: withNotes ? 7 : 6, class: "notes reason", "data-label": "Reason" }));
  }
  const peakShare = config.peak_memory_bytes && limit ? ` · ${Math.round((100 * config.peak_memory_bytes) / limit)} %` : "";
  const notes = notesOf(config);
  if (config.status !== "ok" && config.reason) notes.unshift(config.reason);
  const confirmed = config.confirmed
    ? h("span", { class: "confirmed", title: "confirmed in a fresh process", "aria-label": "confirmed in a fresh process" }, " ✓")
    : "";
  return h("tr", attrs, configHead(config, recommended), strategyCell(config),
    cell("status", config.status, statusBadge(config.status), { "data-label": "Status" }),
    cell("max_batch_size", config.max_batch_size, [h("span", { class: "value" }, config.max_batch_size ?? "none fits"), confirmed],
      { class: "num strong", "data-label": "Max batch" }),
    cell("first_failing_batch_size", config.first_failing_batch_size, failingText(config), { class: "num", "data-label": "First failing" }),
    cell("plan", config.plan ? config.plan.effective_batch_size : "", config.plan ? formatPlan(config.plan) : "–",
      { class: "num nowrap", "data-label": "Plan", "data-accumulation": config.plan?.gradient_accumulation_steps }),
    cell("peak_memory_bytes", config.peak_memory_bytes,
      config.peak_memory_bytes == null ? "–" : [formatBytes(config.peak_memory_bytes), h("span", { class: "muted small" }, peakShare)],
      { class: "num nowrap", "data-label": "Peak memory" }),
    cell("samples_per_second", config.samples_per_second,
      config.samples_per_second == null ? "–" : [
        h("span", { class: "nowrap" }, `${formatNumber(config.samples_per_second)} samples/s`),
        config.tokens_per_second == null ? "" : h("div", { class: "muted small nowrap" }, `${formatNumber(config.tokens_per_second)} tokens/s`),
      ], { class: "num", "data-label": "Throughput" }),
    cell("trials", (config.trials || []).length, trialSummary(config.trials), { class: "num", "data-label": "Trials" }),
    withNotes ? cell("notes", "", notes.join(" · "), { class: "notes", "data-label": "Notes" }) : null);
}

function configTable(result) {
  const rec = result.recommendation;
  const recommendedKey = rec ? keyOf(rec) : null;
  const gpuTimes = result.device && result.device.timings_are_gpu_times;
  const withNotes = result.configs.some((config) => notesOf(config).length || (config.status !== "ok" && (config.trials || []).length));
  const heads = ["Config", "Strategy", "Status", "Max batch", "First failing",
    h("abbr", { title: "per-device batch × gradient accumulation × GPUs = effective batch" }, "Plan"), "Peak memory",
    gpuTimes ? "Throughput" : "Throughput †", "Trials", withNotes ? "Notes" : null].filter(Boolean);
  return h("div", { class: "table-wrap" },
    h("table", { class: "configs responsive", id: "config-table" },
      h("caption", {}, "Each config: the largest batch that fits (✓ confirmed in a fresh process), the first that fails, "
        + "and the plan that reaches the target"),
      h("thead", {}, h("tr", {}, ...heads.map((title) => h("th", { scope: "col" }, title)))),
      h("tbody", {}, ...result.configs.map((config) => configRow(config, result, recommendedKey, withNotes)))));
}

function recommendationCard(job, result) {
  const rec = result.recommendation;
  const spec = jobSpec(job);
  const curl = copyBlock(curlCommand(spec), { label: "curl command that repeats this probe", id: "curl-command" });
  if (!rec) {
    return h("section", { class: "card no-recommendation", id: "recommendation" },
      h("h2", {}, "No recommendation"),
      h("p", {}, `No config reached the target effective batch of ${spec.target_effective_batch_size}. `,
        "The table shows how far each one got; try gradient checkpointing, a lower precision or a shorter sequence."),
      curl);
  }
  const args = JSON.stringify(rec.training_arguments, null, 2);
  const adapters = [
    rec.peft_config ? copyBlock(JSON.stringify(rec.peft_config, null, 2), { label: "LoraConfig (JSON)", id: "peft-config" }) : null,
    rec.quantization_config
      ? copyBlock(JSON.stringify(rec.quantization_config, null, 2), { label: "BitsAndBytesConfig (JSON)", id: "quantization-config" })
      : null,
  ].filter(Boolean);
  return h("section", { class: "card recommendation", id: "recommendation", "data-config": keyOf(rec) },
    h("div", { class: "rec-head" },
      h("h2", {}, "Recommended"),
      h("p", { class: "rec-main" },
        h("span", { class: "big", id: "rec-batch" }, String(rec.plan.per_device_train_batch_size)),
        h("span", {}, " per device × ", h("strong", {}, String(rec.plan.gradient_accumulation_steps)),
          " accumulation × ", h("strong", {}, String(rec.plan.world_size)), ` GPU${rec.plan.world_size === 1 ? "" : "s"} = `,
          h("strong", {}, String(rec.plan.effective_batch_size)), " effective"),
        h("span", { class: "rec-config" }, configLabel(rec.precision, rec.gradient_checkpointing, rec.strategy, rec.finetuning))),
      h("p", { class: "why" }, sentence(rec.why)),
      rec.plan.note ? h("p", { class: "muted" }, rec.plan.note) : ""),
    h("div", { class: "copy-grid" },
      copyBlock(args, { label: "TrainingArguments (JSON)", id: "training-arguments" }),
      ...adapters,
      curl));
}

function facts(job, result) {
  const spec = jobSpec(job) || {};
  const device = (result && result.device) || {};
  const rows = [
    ["Model", modelLabel(spec.model)],
    ["Sequence length", spec.seq_len],
    ["Target effective batch", `${spec.target_effective_batch_size} on ${spec.world_size} GPU${spec.world_size === 1 ? "" : "s"}`],
    ["Device", result ? (device.name.includes(device.kind) ? device.name : `${device.name} (${device.kind})`) : job.device || spec.device],
    ...(Array.isArray(spec.gpu) ? [["Cards", spec.gpu.join(", ")]] : []),
    ["Strategies", (spec.strategies || ["single"]).join(", ")],
    ["Fine-tuning", finetuningLabel(spec)],
    ...(spec.gpu_type ? [["GPU type", spec.gpu_type]] : []),
    ...(job.node ? [["Node", job.node]] : []),
    ["Memory limit", result ? formatBytes(limitOf(result)) : formatBytes(spec.memory_limit_bytes)],
    ["Headroom", formatBytes(spec.headroom_bytes || 0)],
    ["Created", formatTime(job.created_at)],
  ];
  if (job.started_at) rows.push(["Started", formatTime(job.started_at)]);
  if (job.finished_at) rows.push(["Finished", formatTime(job.finished_at)]);
  if (result) rows.push(["Probe time", formatDuration(result.elapsed_seconds)]);
  if (job.model_facts) rows.push(["Parameters", formatNumber(job.model_facts.parameter_count)]);
  if (result && result.versions) {
    const v = result.versions;
    rows.push(["Versions", [`maxbatch ${v.maxbatch}`, v.torch && `torch ${v.torch}`, v.transformers && `transformers ${v.transformers}`,
      v.cuda && `CUDA ${v.cuda}`].filter(Boolean).join(" · ")]);
  }
  return h("dl", { class: "facts" }, rows.flatMap(([term, value]) => [h("dt", {}, term), h("dd", {}, value ?? "–")]));
}

/** The live trials' key: the config's, and the card's in a multi-card job (its events name the card). */
function liveKey(card, key) {
  return card ? `${card}|${key}` : key;
}

/** ConfigResult-shaped entries from the live events (of `card`, in a multi-card job), for the chart while the probe runs. */
function liveConfigs(spec, trialsByKey, card = null) {
  const configs = [];
  for (const precision of spec.precisions || []) {
    for (const checkpointing of spec.gradient_checkpointing || []) {
      for (const strategy of spec.strategies || ["single"]) {
        const trials = trialsByKey.get(liveKey(card, configKey(precision, checkpointing, strategy))) || [];
        const fits = trials.filter((t) => t.outcome === "fit").map((t) => t.batch_size);
        configs.push({ precision, gradient_checkpointing: checkpointing, strategy, trials,
          max_batch_size: fits.length ? Math.max(...fits) : null });
      }
    }
  }
  return configs;
}

/** Render job `id` into `root`; follows its events until it finishes. Returns a cleanup function. */
export function jobView(root, id) {
  const controller = new AbortController();
  let job = null;
  let chart = null;
  let timer = null;
  let streaming = false;
  let lastFollow = 0;
  let stopped = false;
  let renderedTerminal = false;
  let selectedCard = null; // a multi-card job: the card shown below the comparison
  const liveTrials = new Map();

  root.replaceChildren(h("p", { class: "empty" }, "Loading probe…"));

  function cancelButton() {
    return h("button", {
      type: "button",
      class: "danger",
      id: "cancel-job",
      onclick: async (event) => {
        event.currentTarget.disabled = true;
        try {
          const { data } = await api(`probes/${encodeURIComponent(id)}/cancel`, { method: "POST", signal: controller.signal });
          if (data && data.status) update(data);
          else refresh();
        } catch (error) {
          showError(error);
        }
      },
    }, "Cancel");
  }

  function rerunButton() {
    return h("button", {
      type: "button",
      onclick: () => {
        sessionStorage.setItem(SPEC_DRAFT_KEY, JSON.stringify(jobSpec(job)));
        location.hash = "#/new?from=draft";
      },
    }, "Edit & run again");
  }

  function showError(error) {
    const box = root.querySelector("#job-message");
    if (box) {
      box.hidden = false;
      box.textContent = error.message;
    }
  }

  function render() {
    // Live updates redraw the page; keep the keyboard focus where it was (Cancel, a legend button).
    const focused = document.activeElement;
    const focusSelector = focused && focused.id ? `#${CSS.escape(focused.id)}`
      : focused && focused.dataset && focused.dataset.series ? `button[data-series="${focused.dataset.series}"]` : null;
    chart?.destroy();
    chart = null;
    const spec = jobSpec(job) || {};
    const cards = requestCards(spec);
    if (cards && !cards.includes(selectedCard)) selectedCard = cards[0];
    const fullResult = job.result;
    const result = cards && fullResult && fullResult.cards ? cardResult(fullResult, selectedCard) : fullResult;
    const progress = progressOf(job);
    const active = !TERMINAL.has(job.status);
    const head = h("div", { class: "page-head" },
      h("div", {},
        h("p", { class: "crumbs" }, h("a", { href: "#/" }, "Probes"), " / ", h("span", { class: "mono" }, job.id)),
        h("h1", {}, modelLabel(spec.model), " ", h("span", { class: "muted" }, `· seq ${spec.seq_len}`))),
      h("div", { class: "head-actions" },
        statusBadge(job.status),
        active ? cancelButton() : rerunButton(),
        jsonLink(job)));

    const parts = [head, h("p", { id: "job-message", class: "error-box", role: "alert", hidden: true })];
    if (active) {
      parts.push(h("section", { class: "card", id: "progress" },
        h("h2", {}, job.status === "queued" ? "Queued" : "Running"),
        h("progress", { max: 1, value: progress.fraction ?? undefined, "aria-label": "probe progress" }),
        h("p", { class: "muted", id: "progress-text" }, progress.text || "starting")));
    }
    if (job.status === "failed" && job.error) {
      parts.push(h("section", { class: "card error-card", id: "job-error" },
        h("h2", {}, job.error.title || "Failed"),
        String(job.error.detail || "").includes("\n")
          ? h("pre", { class: "error-detail" }, job.error.detail)
          : h("p", {}, job.error.detail || ""),
        job.error.known && job.error.known.length ? h("p", { class: "muted" }, `Accepted: ${job.error.known.join(", ")}`) : "",
        h("p", { class: "muted small mono" }, job.error.code || "")));
    }
    if (job.status === "cancelled") {
      parts.push(h("p", { class: "card muted" }, "This probe was cancelled before it finished."));
    }
    if (cards) {
      const pick = (gpu) => { selectedCard = gpu; render(); };
      parts.push(h("section", { class: "card", id: "cards" },
        h("h2", {}, `${cards.length} cards compared`),
        fullResult && fullResult.cards ? cardComparison(fullResult, selectedCard) : "",
        h("p", { class: "muted small" }, "Below: the recommendation, the curves and the configs of one card."),
        cardPicker(cards, selectedCard, pick)));
    }
    if (result) parts.push(recommendationCard(job, result));

    const figure = h("figure", { class: "chart-figure", id: "peak-chart" });
    const chartData = result
      ? { configs: result.configs, limitBytes: limitOf(result), headroomBytes: result.spec.headroom_bytes,
        recommendedKey: result.recommendation ? keyOf(result.recommendation) : null, finetuning: result.spec.finetuning }
      : { configs: liveConfigs(spec, liveTrials, cards ? selectedCard : null), limitBytes: spec.memory_limit_bytes, headroomBytes: spec.headroom_bytes, recommendedKey: null,
        finetuning: spec.finetuning };
    const hasTrials = chartData.configs.some((c) => (c.trials || []).length);
    parts.push(h("section", { class: "card" }, h("h2", {}, cards ? `Peak memory by batch size · ${selectedCard}` : "Peak memory by batch size"),
      hasTrials ? figure : h("p", { class: "muted", id: "chart-empty" }, active ? "Trials appear here as they finish." : "No trials ran.")));
    if (result) {
      const gpuTimes = result.device && result.device.timings_are_gpu_times;
      parts.push(h("section", { class: "card" }, h("h2", {}, cards ? `Configs · ${selectedCard}` : "Configs"), configTable(result),
        gpuTimes ? "" : h("p", { class: "muted small" }, "† ", sentence(result.timing_note || "times on this device are not GPU times."))));
    }
    parts.push(h("section", { class: "card" }, h("h2", {}, "Request"), facts(job, result)));
    root.replaceChildren(...parts);
    if (hasTrials) chart = peakChart(figure, chartData);
    renderedTerminal = TERMINAL.has(job.status);
    if (focusSelector && root.contains(focused) === false) root.querySelector(focusSelector)?.focus();
  }

  function update(next) {
    const was = job && job.status;
    job = next;
    if (was && was !== job.status) announce(`Probe ${job.status}`);
    render();
    if (TERMINAL.has(job.status)) clearTimeout(timer);
  }

  async function refresh() {
    try {
      const { data } = await api(`probes/${encodeURIComponent(id)}`, { signal: controller.signal });
      const changed = !job || data.status !== job.status || JSON.stringify(data.progress) !== JSON.stringify(job.progress);
      if (changed || (TERMINAL.has(data.status) && !renderedTerminal)) {
        update(data);
      }
    } catch (error) {
      if (controller.signal.aborted) return;
      if (!job) {
        root.replaceChildren(h("div", { class: "card error-card" },
          h("h1", {}, error.status === 404 ? "No such probe" : "Could not load the probe"),
          h("p", {}, error.message), h("p", {}, h("a", { href: "#/" }, "Back to all probes"))));
        return;
      }
      showError(error);
    }
    if (!stopped && job && !TERMINAL.has(job.status)) {
      if (!streaming && Date.now() - lastFollow > 5000) follow();
      clearTimeout(timer);
      timer = setTimeout(refresh, streaming ? POLL_MS * 3 : POLL_MS);
    }
  }

  let refreshSoon = null;
  /** One server-sent event: a ProbeEvent (trial, config_started, config_done), or "done" with the whole job. */
  function onEvent(message) {
    const data = message.data;
    if (message.event === "done" && data && typeof data === "object" && data.id === id && data.status) {
      clearTimeout(refreshSoon);
      update(data);
      return;
    }
    if (data && typeof data === "object" && data.trial && data.precision) {
      const key = liveKey(data.gpu, keyOf(data));
      const list = liveTrials.get(key) || [];
      list.push(data.trial);
      liveTrials.set(key, list);
    }
    clearTimeout(refreshSoon);
    refreshSoon = setTimeout(refresh, 250);
  }

  async function follow() {
    streaming = true;
    lastFollow = Date.now();
    liveTrials.clear(); // the stream replays the job's history first
    try {
      await followEvents(`probes/${encodeURIComponent(id)}/events`, onEvent, controller.signal);
    } catch { /* polling carries on */ }
    streaming = false;
    if (!stopped && job && !TERMINAL.has(job.status)) refresh();
  }

  refresh();
  return () => {
    stopped = true;
    clearTimeout(timer);
    clearTimeout(refreshSoon);
    controller.abort();
    chart?.destroy();
  };
}
