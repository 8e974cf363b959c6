// The submit form: builds a ProbeSpec, posts it, and puts the service's validation errors next to the
// fields they concern.

import { api, ApiError } from "./api.js";
import { h } from "./dom.js";
import { bytesToInput, formatBytes, parseBytes } from "./format.js";
import { SPEC_DRAFT_KEY } from "./jobinfo.js";

const PRECISIONS = [
  ["32-true", "fp32"],
  ["16-mixed", "fp16 mixed"],
  ["bf16-mixed", "bf16 mixed"],
  ["bf16-true", "pure bf16"],
];
const STRATEGIES = [["single", "single (one process)"], ["ddp", "DDP"], ["fsdp", "FSDP2 (full shard)"]];
const OPTIMIZERS = ["adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adamw_bnb_8bit"];
const ATTENTION = [["sdpa", "sdpa (torch's kernels)"], ["eager", "eager"], ["flash_attention_2", "flash_attention_2 (CUDA, flash-attn)"]];
const FINETUNING = [["full", "full — every weight"], ["lora", "LoRA — adapters on a frozen base"],
  ["qlora", "QLoRA — adapters on a 4-bit base (bitsandbytes)"]];
const ARCHITECTURES = ["gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt_neox", "opt", "falcon"];

const DEFAULTS = {
  model: { architecture: "gpt2", config: { n_layer: 2, n_embd: 64, n_head: 2, vocab_size: 1000 } },
  seq_len: 64,
  precisions: ["32-true"],
  gradient_checkpointing: [false, true],
  target_effective_batch_size: 32,
  world_size: 1,
  device: "simulated",
  memory_limit_bytes: 64 * 1024 ** 2,
  headroom_bytes: 0,
};

/** Which form field an engine or service error code is about. */
const CODE_FIELDS = {
  "unknown-architecture": "model.architecture",
  "model-not-found": "model.name_or_path",
  "model-path-forbidden": "model.name_or_path",
  "remote-code-refused": "model.trust_remote_code",
  "sequence-too-long": "seq_len",
  "unknown-gpu": "gpu",
  "device-unavailable": "device",
  "device-busy": "device",
};

/** Field names that a model-level validation message may mention, most specific first. */
const MENTIONS = [
  ["model.architecture", "model.architecture"], ["model.name_or_path", "model.name_or_path"],
  ["sync_each_batch", "sync_each_batch"],
  ["headroom_bytes", "headroom_bytes"], ["memory_limit_bytes", "memory_limit_bytes"], ["gpu", "gpu"],
  ["precisions", "precisions"], ["gradient_checkpointing", "gradient_checkpointing"], ["seq_len", "seq_len"],
  ["world_size", "world_size"], ["target_effective_batch_size", "target_effective_batch_size"],
  ["warmup_ratio", "warmup_ratio"], ["num_train_epochs", "num_train_epochs"], ["dataset_size", "dataset_size"],
  ["strategies", "strategies"], ["lora_target_modules", "lora_target_modules"], ["lora_alpha", "lora_alpha"],
  ["lora_r", "lora_r"], ["finetuning", "finetuning"], ["optimizer", "optimizer"], ["attn_implementation", "attn_implementation"],
  ["strategy", "strategies"],
];

function newKey() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

function fieldId(name) {
  return `f-${name.replaceAll(".", "-")}`;
}

/** A labelled field: control, hint and an error slot, wired with aria-describedby. */
function field(name, label, control, hint, extra = {}) {
  const id = fieldId(name);
  control.id = control.id || id;
  const error = h("p", { class: "field-error", id: `${id}-error`, hidden: true });
  const hintNode = hint ? h("p", { class: "hint", id: `${id}-hint` }, hint) : null;
  control.setAttribute("aria-describedby", [hintNode && hintNode.id, error.id].filter(Boolean).join(" "));
  return h("div", { class: "field", "data-field": name, ...extra },
    h("label", { for: control.id }, label), control, hintNode, error);
}

/** A fieldset of checkboxes with one error slot for the group. */
function checkGroup(name, legend, options, checked, hint) {
  const id = fieldId(name);
  const error = h("p", { class: "field-error", id: `${id}-error`, hidden: true });
  return h("fieldset", { class: "field checks", "data-field": name, id, "aria-describedby": `${id}-error` },
    h("legend", {}, legend),
    h("div", { class: "check-row" }, options.map(([value, text]) => h("label", { class: "check" },
      h("input", { type: "checkbox", name, value: String(value), checked: checked.includes(value) }), text))),
    hint ? h("p", { class: "hint" }, hint) : null,
    error);
}

function numberInput(name, value, attrs = {}) {
  return h("input", { type: "number", name, inputmode: "numeric", value: value ?? "", ...attrs });
}

function textInput(name, value, attrs = {}) {
  return h("input", { type: "text", name, value: value ?? "", autocomplete: "off", spellcheck: "false", ...attrs });
}

function selectInput(name, options, value) {
  const select = h("select", { name }, options.map(([v, text]) => h("option", { value: v }, text)));
  select.value = value;
  return select;
}

/** The cards the predict table knows, from the service's own OpenAPI document (its gpu enum). */
async function knownCards(signal) {
  const response = await fetch(new URL("openapi.json", document.baseURI), { signal });
  if (!response.ok) return [];
  const gpu = (await response.json())?.components?.schemas?.ProbeSpec?.properties?.gpu;
  const named = (gpu?.anyOf || []).find((branch) => Array.isArray(branch.enum));
  return named ? named.enum : [];
}

function loadDraft() {
  const text = sessionStorage.getItem(SPEC_DRAFT_KEY);
  if (!text) return null;
  try { return JSON.parse(text); } catch { return null; }
}

/** A kind of GPU in the fleet is offered as "gpu:<type>" and sent as device "gpu" with that gpu_type. */
const GPU_TYPE_PREFIX = "gpu:";

function optionValue(entry) {
  return entry.gpu_type ? `${GPU_TYPE_PREFIX}${entry.gpu_type}` : entry.device;
}

/** Render the form into `root`; `query` may say from=draft. Returns a cleanup function. */
export function formView(root, query) {
  const start = (query.get("from") === "draft" && loadDraft()) || DEFAULTS;
  const controller = new AbortController();
  const model = start.model || {};
  const useName = Boolean(model.name_or_path);

  const formError = h("div", { class: "error-box", id: "form-error", role: "alert", hidden: true });
  const deviceSelect = h("select", { name: "device" },
    h("option", { value: "simulated" }, "simulated — CPU with a memory cap"),
    h("option", { value: "predict" }, "predict — fake tensors, no memory used"));
  const archList = h("datalist", { id: "architectures" }, ARCHITECTURES.map((a) => h("option", { value: a })));

  const sourceArch = h("input", { type: "radio", name: "source", value: "architecture", checked: !useName });
  const sourceName = h("input", { type: "radio", name: "source", value: "name_or_path", checked: useName });
  const archField = field("model.architecture", "Architecture",
    textInput("model.architecture", model.architecture || (useName ? "" : "gpt2"), { list: "architectures" }),
    "A transformers model type: gpt2, llama, mistral, qwen2, …");
  const configField = field("model.config", "Config overrides (JSON)",
    h("textarea", { name: "model.config", rows: 3, spellcheck: "false" },
      Object.keys(model.config || {}).length ? JSON.stringify(model.config) : ""),
    "Changes to the architecture's default config, e.g. {\"n_layer\": 12, \"n_embd\": 768}");
  const nameField = field("model.name_or_path", "Local path or hub id",
    textInput("model.name_or_path", model.name_or_path), "A directory with config.json (under the service's model root)");
  const trustField = h("label", { class: "check", "data-field": "model.trust_remote_code" },
    h("input", { type: "checkbox", name: "model.trust_remote_code", id: fieldId("model.trust_remote_code"), checked: Boolean(model.trust_remote_code) }),
    "Trust remote code", h("p", { class: "field-error", id: `${fieldId("model.trust_remote_code")}-error`, hidden: true }));
  const startCards = start.gpu ? [].concat(start.gpu) : [];
  const gpuSelect = h("select", { name: "gpu", multiple: true, class: "gpu-select", size: 6 },
    startCards.map((card) => h("option", { value: card, selected: true }, card)));
  const gpuField = field("gpu", "GPUs to predict for", gpuSelect,
    "A card from the predict table, or several to compare them side by side (Ctrl/⌘-click); or give a memory limit instead");
  const finetuningSelect = selectInput("finetuning", FINETUNING, start.finetuning || "full");
  const syncField = h("label", { class: "check", "data-field": "sync_each_batch" },
    h("input", { type: "checkbox", name: "sync_each_batch", id: fieldId("sync_each_batch"), checked: Boolean(start.sync_each_batch) }),
    "fsdp: reduce-scatter every micro-batch (Accelerate's sync_each_batch)",
    h("p", { class: "field-error", id: `${fieldId("sync_each_batch")}-error`, hidden: true }));
  const loraFields = h("div", { class: "grid-3", id: "lora-fields" },
    field("lora_r", "LoRA rank (r)", numberInput("lora_r", start.lora_r ?? 16, { min: 1 })),
    field("lora_alpha", "LoRA alpha", numberInput("lora_alpha", start.lora_alpha ?? 32, { min: 1 }), "scaling = alpha / r"),
    field("lora_target_modules", "Target modules",
      textInput("lora_target_modules", Array.isArray(start.lora_target_modules) ? start.lora_target_modules.join(", ")
        : start.lora_target_modules || "all-linear"),
      "all-linear, or module names separated by commas, e.g. q_proj, v_proj"));
  const deviceHint = h("span", {}, "simulated: CPU tensors under a memory cap; predict: shapes only. GPUs found by NVML are listed too.");
  const memoryHint = h("span", {}, "How much memory the probe may use, e.g. 64MiB, 24GB. Optional on a GPU.");
  const memoryField = field("memory_limit_bytes", "Memory limit",
    textInput("memory_limit_bytes", bytesToInput(start.memory_limit_bytes), { placeholder: "64MiB" }), memoryHint);

  const submit = h("button", { type: "submit", class: "primary", id: "submit-probe" }, "Start probe");
  const form = h("form", { class: "probe-form", id: "probe-form", novalidate: true },
    formError,
    h("section", { class: "card" },
      h("h2", {}, "Model"),
      h("fieldset", { class: "field radios", "data-field": "model", id: fieldId("model"), "aria-describedby": `${fieldId("model")}-error` },
        h("legend", {}, "Build the model from"),
        h("label", { class: "check" }, sourceArch, "an architecture and overrides"),
        h("label", { class: "check" }, sourceName, "a config on disk"),
        h("p", { class: "field-error", id: `${fieldId("model")}-error`, hidden: true })),
      h("div", { class: "grid-2", id: "arch-fields" }, archField, configField),
      h("div", { class: "grid-2", id: "name-fields" }, nameField, trustField),
      archList),
    h("section", { class: "card" },
      h("h2", {}, "Training shape"),
      h("div", { class: "grid-3" },
        field("seq_len", "Sequence length", numberInput("seq_len", start.seq_len, { min: 1 }), "Tokens per sample; every sample is full length"),
        field("target_effective_batch_size", "Target effective batch",
          numberInput("target_effective_batch_size", start.target_effective_batch_size, { min: 1 }), "per device × accumulation × GPUs"),
        field("world_size", "GPUs (world size)", numberInput("world_size", start.world_size ?? 1, { min: 1 }), "Data-parallel processes")),
      h("div", { class: "grid-2" },
        checkGroup("precisions", "Precisions", PRECISIONS.map(([v, t]) => [v, `${v} (${t})`]), start.precisions || [],
          "bf16 is skipped on GPUs without native bf16"),
        checkGroup("gradient_checkpointing", "Gradient checkpointing", [[false, "off"], [true, "on"]],
          start.gradient_checkpointing || [false, true]))),
    h("section", { class: "card", id: "job-fields" },
      h("h2", {}, "Training job"),
      h("div", { class: "grid-3" },
        checkGroup("strategies", "Strategies", STRATEGIES, start.strategies || [],
          "None checked: single for one GPU, ddp and fsdp above. One process measures one rank."),
        field("optimizer", "Optimizer", selectInput("optimizer", OPTIMIZERS.map((o) => [o, o]), start.optimizer || "adamw_torch"),
          "An HF optim name"),
        field("attn_implementation", "Attention kernel",
          selectInput("attn_implementation", ATTENTION, start.attn_implementation || "sdpa"))),
      h("div", { class: "grid-3" }, field("finetuning", "Fine-tuning", finetuningSelect), syncField),
      loraFields),
    h("section", { class: "card" },
      h("h2", {}, "Device"),
      h("div", { class: "grid-3" },
        field("device", "Device", deviceSelect, deviceHint),
        memoryField,
        field("headroom_bytes", "Headroom", textInput("headroom_bytes", bytesToInput(start.headroom_bytes) || "0"),
          "Memory a fitting batch must leave free, e.g. 512MiB"),
        gpuField)),
    h("details", { class: "card advanced" },
      h("summary", {}, "More options"),
      h("div", { class: "grid-3" },
        field("max_batch_size_limit", "Largest batch to try", numberInput("max_batch_size_limit", start.max_batch_size_limit, { min: 1 })),
        field("dataset_size", "Dataset size (samples)", numberInput("dataset_size", start.dataset_size, { min: 1 }), "With epochs: sets max_steps"),
        field("num_train_epochs", "Epochs", numberInput("num_train_epochs", start.num_train_epochs, { min: 0, step: "any", inputmode: "decimal" })),
        field("warmup_ratio", "Warm-up ratio", numberInput("warmup_ratio", start.warmup_ratio, { min: 0, max: 1, step: "any", inputmode: "decimal" }),
          "Sets warmup_steps"),
        field("trial_timeout_seconds", "Trial time limit (s)", numberInput("trial_timeout_seconds", start.trial_timeout_seconds, { min: 1, step: "any" })),
        field("seed", "Seed", numberInput("seed", start.seed)))),
    h("div", { class: "form-actions" }, submit, h("a", { href: "#/", class: "button" }, "Cancel")));

  root.replaceChildren(h("div", { class: "page-head" }, h("h1", {}, "New probe")), form);
  deviceSelect.value = start.device === "gpu" && start.gpu_type ? `${GPU_TYPE_PREFIX}${start.gpu_type}` : start.device || "simulated";

  function syncVisibility() {
    const byName = sourceName.checked;
    form.querySelector("#arch-fields").hidden = byName;
    form.querySelector("#name-fields").hidden = !byName;
    gpuField.hidden = deviceSelect.value !== "predict";
    loraFields.hidden = finetuningSelect.value === "full";
  }
  finetuningSelect.addEventListener("change", syncVisibility);
  sourceArch.addEventListener("change", syncVisibility);
  sourceName.addEventListener("change", syncVisibility);
  deviceSelect.addEventListener("change", () => { syncVisibility(); describeDevice(); });
  syncVisibility();

  let devices = [];
  function describeDevice() {
    const entry = devices.find((d) => optionValue(d) === deviceSelect.value);
    const cap = entry && entry.total_memory_bytes ? ` This device has ${formatBytes(entry.total_memory_bytes)}.` : "";
    memoryHint.textContent = `How much memory the probe may use, e.g. 64MiB, 24GB. Optional on a GPU.${cap}`;
    if (entry && entry.description) deviceHint.textContent = entry.description;
  }
  api("devices", { signal: controller.signal }).then(({ data }) => {
    devices = (data && data.devices) || [];
    const chosen = deviceSelect.value;
    deviceSelect.replaceChildren(...devices.map((d) => h("option", { value: optionValue(d) },
      d.gpu_type ? `${d.gpu_type} — ${d.count} in the fleet${d.free === null ? "" : `, ${d.free} free`}`
        : `${d.device}${d.gpu ? ` — ${d.gpu.name}` : ""}${d.gpu && d.gpu.busy ? " (busy)" : ""}`)));
    if (!devices.some((d) => optionValue(d) === chosen)) deviceSelect.append(h("option", { value: chosen }, chosen));
    deviceSelect.value = chosen;
    syncVisibility();
    describeDevice();
  }).catch(() => { /* the two built-in devices stay */ });
  knownCards(controller.signal).then((cards) => {
    const chosen = new Set([...gpuSelect.selectedOptions].map((option) => option.value));
    const names = [...cards, ...[...chosen].filter((card) => !cards.includes(card))];
    gpuSelect.replaceChildren(...names.map((card) => h("option", { value: card, selected: chosen.has(card) }, card)));
  }).catch(() => { /* the draft's cards stay */ });

  function clearErrors() {
    formError.hidden = true;
    formError.replaceChildren();
    for (const node of form.querySelectorAll(".field-error")) { node.hidden = true; node.textContent = ""; }
    for (const node of form.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
    for (const node of form.querySelectorAll(".field.invalid")) node.classList.remove("invalid");
  }

  /** Show `message` next to field `name`; false when the form has no such field on screen. */
  function fieldError(name, message) {
    const id = fieldId(name);
    const slot = form.querySelector(`#${CSS.escape(id)}-error`);
    if (!slot || slot.parentElement.closest("[hidden]")) return false;
    slot.hidden = false;
    slot.textContent = slot.textContent ? `${slot.textContent} ${message}` : message;
    const wrapper = slot.closest(".field") || slot.parentElement;
    wrapper.classList.add("invalid");
    const control = form.querySelector(`#${CSS.escape(id)}`);
    if (control) control.setAttribute("aria-invalid", "true");
    return true;
  }

  function formLevel(message) {
    formError.hidden = false;
    formError.append(h("p", {}, message));
  }

  /** The form field a validation error's loc (and message) concerns. */
  function fieldForError(error) {
    const loc = (error.loc || []).filter((part) => part !== "body");
    const names = loc.filter((part) => typeof part === "string");
    if (names[0] === "model" && names[1] && ["architecture", "config", "name_or_path", "trust_remote_code"].includes(names[1])) {
      return `model.${names[1]}`;
    }
    if (names.length && names[0] !== "model") return names[0];
    const message = String(error.msg || "");
    for (const [mention, name] of MENTIONS) if (message.includes(mention)) return name;
    return names[0] || null;
  }

  function showProblem(problem) {
    const errors = Array.isArray(problem.errors) ? problem.errors : [];
    let placed = 0;
    for (const error of errors) {
      const name = fieldForError(error);
      if (name && fieldError(name, error.msg)) placed += 1;
      else formLevel(error.msg || JSON.stringify(error));
    }
    if (!errors.length) {
      const name = CODE_FIELDS[problem.code];
      const known = Array.isArray(problem.known) && problem.known.length ? ` Known: ${problem.known.slice(0, 30).join(", ")}.` : "";
      if (!(name && fieldError(name, `${problem.detail || problem.title}${known}`))) {
        formLevel(`${problem.title || "Error"}: ${problem.detail || ""}`);
      } else {
        placed += 1;
      }
    }
    if (placed && formError.hidden) formLevel("Please correct the fields marked below.");
    focusFirstError();
  }

  function focusFirstError() {
    const control = form.querySelector(".field.invalid :is(input, textarea, select)");
    if (control) {
      control.focus();
      return;
    }
    formError.tabIndex = -1;
    formError.focus();
  }

  /** The spec the form describes; errors it can tell without the service go to `local`. */
  function readSpec(local) {
    const get = (name) => form.elements.namedItem(name);
    const spec = {};
    if (sourceName.checked) {
      spec.model = { name_or_path: get("model.name_or_path").value.trim() || null };
      if (get("model.trust_remote_code").checked) spec.model.trust_remote_code = true;
    } else {
      spec.model = { architecture: get("model.architecture").value.trim() || null };
      const text = get("model.config").value.trim();
      if (text) {
        try {
          const config = JSON.parse(text);
          if (!config || typeof config !== "object" || Array.isArray(config)) throw new Error("not an object");
          spec.model.config = config;
        } catch (error) {
          local.push(["model.config", `not a JSON object (${error.message}); write e.g. {"n_layer": 2}`]);
        }
      }
    }
    const integer = (name) => {
      const value = get(name).value.trim();
      if (value === "") return;
      const number = Number(value);
      spec[name] = Number.isFinite(number) ? number : value;
    };
    for (const name of ["seq_len", "target_effective_batch_size", "world_size", "max_batch_size_limit", "dataset_size",
      "num_train_epochs", "warmup_ratio", "trial_timeout_seconds", "seed"]) integer(name);
    const strategies = [...form.querySelectorAll("input[name=strategies]:checked")].map((box) => box.value);
    if (strategies.length) spec.strategies = strategies; // none: the service's default for the world size
    spec.optimizer = get("optimizer").value;
    spec.attn_implementation = get("attn_implementation").value;
    if (get("sync_each_batch").checked) spec.sync_each_batch = true;
    spec.finetuning = finetuningSelect.value;
    if (spec.finetuning !== "full") {
      integer("lora_r");
      integer("lora_alpha");
      const targets = get("lora_target_modules").value.trim();
      if (targets) spec.lora_target_modules = targets;
    }
    spec.precisions = [...form.querySelectorAll("input[name=precisions]:checked")].map((box) => box.value);
    spec.gradient_checkpointing = [...form.querySelectorAll("input[name=gradient_checkpointing]:checked")]
      .map((box) => box.value === "true");
    spec.device = deviceSelect.value;
    if (spec.device.startsWith(GPU_TYPE_PREFIX)) {
      spec.gpu_type = spec.device.slice(GPU_TYPE_PREFIX.length);
      spec.device = "gpu";
    }
    for (const name of ["memory_limit_bytes", "headroom_bytes"]) {
      const text = get(name).value.trim();
      if (!text || (name === "headroom_bytes" && text === "0")) continue;
      try { spec[name] = parseBytes(text); } catch (error) { local.push([name, error.message]); }
    }
    const cards = [...gpuSelect.selectedOptions].map((option) => option.value);
    // one card is the one-card request (a string); several are compared (a list)
    if (spec.device === "predict" && cards.length) spec.gpu = cards.length === 1 ? cards[0] : cards;
    return spec;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors();
    const local = [];
    const spec = readSpec(local);
    if (local.length) {
      for (const [name, message] of local) if (!fieldError(name, message)) formLevel(message);
      if (formError.hidden) formLevel("Please correct the fields marked below.");
      focusFirstError();
      return;
    }
    submit.disabled = true;
    submit.textContent = "Submitting…";
    try {
      const { status, data } = await api("probes", {
        method: "POST", body: spec, headers: { "Idempotency-Key": newKey() }, signal: controller.signal,
      });
      if (status === 200) {
        const why = data.cached ? "An identical probe already finished; here is its result."
          : data.coalesced ? "An identical probe is already queued or running; here it is."
            : "This request was already submitted; here is its probe.";
        sessionStorage.setItem("maxbatch.flash", why);
      }
      sessionStorage.removeItem(SPEC_DRAFT_KEY);
      location.hash = `#/jobs/${encodeURIComponent(data.id)}`;
    } catch (error) {
      if (controller.signal.aborted) return;
      if (error instanceof ApiError) {
        if (error.status === 401) formLevel("The service needs an access token to start a probe.");
        else showProblem(error.problem);
      } else {
        formLevel(`Could not reach the service: ${error.message}`);
      }
    } finally {
      submit.disabled = false;
      submit.textContent = "Start probe";
    }
  });

  return () => controller.abort();
}
