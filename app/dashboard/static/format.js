// Pure helpers: sizes, numbers, times and config names. No DOM, no network.

const UNITS = {
  "": 1, b: 1,
  k: 1e3, kb: 1e3, m: 1e6, mb: 1e6, g: 1e9, gb: 1e9, t: 1e12, tb: 1e12,
  kib: 1024, mib: 1024 ** 2, gib: 1024 ** 3, tib: 1024 ** 4,
};
const SIZE = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/;

/** Bytes named by text such as "320MiB", "80GB" or "1048576" (the rule probes/units.py uses). */
export function parseBytes(text) {
  const match = SIZE.exec(String(text));
  const unit = match ? match[2].toLowerCase() : "";
  if (!match || !Object.hasOwn(UNITS, unit)) {
    throw new Error(`cannot read "${text}" as a size; write e.g. 320MiB, 80GB or 1073741824`);
  }
  const value = Math.trunc(parseFloat(match[1]) * UNITS[unit]);
  if (value <= 0) throw new Error(`size "${text}" must be more than 0 bytes`);
  return value;
}

/** A short binary-unit rendering: "1.50 GiB" (the rule probes/units.py uses). */
export function formatBytes(count) {
  if (count === null || count === undefined) return "–";
  let size = Number(count);
  for (const unit of ["B", "KiB", "MiB", "GiB"]) {
    if (Math.abs(size) < 1024) return unit === "B" ? `${size.toFixed(0)} ${unit}` : `${size.toFixed(2)} ${unit}`;
    size /= 1024;
  }
  return `${size.toFixed(2)} TiB`;
}

/** The shortest exact spelling of a byte count for an input field: "64MiB", "80GB", "1000". */
export function bytesToInput(count) {
  if (!count) return "";
  for (const [unit, factor] of [["TiB", 1024 ** 4], ["GiB", 1024 ** 3], ["MiB", 1024 ** 2], ["KiB", 1024],
    ["TB", 1e12], ["GB", 1e9], ["MB", 1e6]]) {
    if (count >= factor && count % factor === 0) return `${count / factor}${unit}`;
  }
  return String(count);
}

/** A number with at most `digits` significant digits and thin grouping: 12 345, 3.14, 0.0123. */
export function formatNumber(value, digits = 3) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  const abs = Math.abs(value);
  if (abs >= 10 ** digits) return Math.round(value).toLocaleString("en-US");
  return Number(value.toPrecision(digits)).toLocaleString("en-US", { maximumFractionDigits: 6 });
}

/** "3.2 s", "1 min 05 s", "2 h 03 min". */
export function formatDuration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "–";
  if (seconds < 60) return `${seconds < 10 ? seconds.toFixed(1) : Math.round(seconds)} s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes} min ${String(Math.round(seconds % 60)).padStart(2, "0")} s`;
  return `${Math.floor(minutes / 60)} h ${String(minutes % 60).padStart(2, "0")} min`;
}

/** "just now", "4 min ago", "3 h ago", "2 d ago", relative to `now` (ms since the epoch). */
export function formatAge(iso, now = Date.now()) {
  const then = Date.parse(iso);
  if (Number.isNaN(then)) return "–";
  const seconds = Math.max(0, (now - then) / 1000);
  if (seconds < 10) return "just now";
  if (seconds < 60) return `${Math.floor(seconds)} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return `${Math.floor(seconds / 86400)} d ago`;
}

/** A local date and time for tooltips. */
export function formatTime(iso) {
  const then = Date.parse(iso);
  return Number.isNaN(then) ? "–" : new Date(then).toLocaleString();
}

/** The stable key of a config, as the chart and table expose it: "bf16-mixed/on/fsdp". */
export function configKey(precision, checkpointing, strategy = "single") {
  return `${precision}/${checkpointing ? "on" : "off"}/${strategy || "single"}`;
}

/** The key of a ConfigResult-, Recommendation- or event-shaped object. */
export function keyOf(config) {
  return configKey(config.precision, config.gradient_checkpointing, config.strategy);
}

/** A human label: "bf16-mixed, checkpointing on, fsdp" (", lora" when the job trains adapters). */
export function configLabel(precision, checkpointing, strategy = "single", finetuning = "full") {
  const method = finetuning && finetuning !== "full" ? `, ${finetuning}` : "";
  return `${precision}, checkpointing ${checkpointing ? "on" : "off"}, ${strategy || "single"}${method}`;
}

/** A chart series' name: its key, and the fine-tuning method when it is not full: "32-true/off/ddp · lora". */
export function seriesName(config, finetuning = "full") {
  return keyOf(config) + (finetuning && finetuning !== "full" ? ` · ${finetuning}` : "");
}

/** "lora (r 16, alpha 32, dropout 0.05, all-linear)" for a spec that trains adapters, else "full". */
export function finetuningLabel(spec) {
  const method = (spec && spec.finetuning) || "full";
  if (method === "full") return "full";
  const targets = Array.isArray(spec.lora_target_modules) ? spec.lora_target_modules.join(", ") : spec.lora_target_modules;
  return `${method} (r ${spec.lora_r}, alpha ${spec.lora_alpha}, dropout ${spec.lora_dropout}, ${targets})`;
}

/** "16 × 2 × 1 = 32" for a plan object, or "–". */
export function formatPlan(plan) {
  if (!plan) return "–";
  return `${plan.per_device_train_batch_size} × ${plan.gradient_accumulation_steps} × ${plan.world_size}`
    + ` = ${plan.effective_batch_size}`;
}

/** The model of a spec in a few words: "gpt2 (n_layer=2, n_embd=64)". */
export function modelLabel(model) {
  if (!model) return "?";
  const name = model.architecture || model.name_or_path || "?";
  const overrides = Object.entries(model.config || {});
  if (!overrides.length) return name;
  const shown = overrides.slice(0, 3).map(([key, value]) => `${key}=${JSON.stringify(value)}`);
  return `${name} (${shown.join(", ")}${overrides.length > 3 ? ", …" : ""})`;
}

/** Quote a string for a POSIX shell, inside single quotes. */
export function shellQuote(text) {
  return `'${String(text).replaceAll("'", "'\\''")}'`;
}

/** Round numbers for an axis: about `count` ticks covering [0, max]. */
export function niceTicks(max, count = 5) {
  if (!(max > 0)) return [0, 1];
  const raw = max / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * power).find((s) => s >= raw);
  const ticks = [];
  for (let value = 0; value < max + step / 2; value += step) ticks.push(Number(value.toPrecision(12)));
  if (ticks[ticks.length - 1] < max) ticks.push(Number((ticks[ticks.length - 1] + step).toPrecision(12)));
  return ticks;
}

/** Integer ticks for batch sizes: steps of 1, 2, 4, 5, 8, 10, 16, 20, 25, 32, 50, 64, … */
export function batchTicks(max, count = 8) {
  if (!(max > 0)) return [0, 1];
  const raw = max / count;
  let step = 1;
  const bases = [1, 2, 4, 5, 8];
  for (let power = 1; ; power *= 10) {
    const found = bases.map((b) => b * power).find((s) => s >= raw);
    if (found) { step = found; break; }
  }
  const ticks = [];
  for (let value = 0; value < max + step; value += step) ticks.push(value);
  return ticks;
}
