// The peak-memory chart: peak memory against batch size, one series per config, drawn as plain SVG.
//
// Stable hooks for tests and styles:
//   <g class="series" data-series="32-true/off/single" data-precision="32-true" data-checkpointing="off"
//      data-strategy="single" data-name="32-true/off/single"> (the name adds " · lora" for adapters);
//   markers inside it carry data-outcome (fit, oom, over_headroom, …) and data-batch;
//   <line data-role="limit">, <line data-role="headroom"> are the device limit and limit − headroom.

import { h, s } from "./dom.js";
import { batchTicks, configLabel, formatBytes, keyOf, niceTicks, seriesName } from "./format.js";

const NO_PEAK = new Set(["oom", "error", "timeout", "crash"]);

function byteUnit(max) {
  if (max >= 2 * 1024 ** 3) return [1024 ** 3, "GiB"];
  if (max >= 2 * 1024 ** 2) return [1024 ** 2, "MiB"];
  if (max >= 2 * 1024) return [1024, "KiB"];
  return [1, "B"];
}

function peakOf(trial) {
  return trial.peak_reserved_bytes ?? trial.peak_allocated_bytes ?? null;
}

/** The points of one series' line: the highest peak measured at each batch size, in batch order. */
function linePoints(trials) {
  const best = new Map();
  for (const trial of trials) {
    const peak = peakOf(trial);
    if (peak === null || NO_PEAK.has(trial.outcome)) continue;
    best.set(trial.batch_size, Math.max(best.get(trial.batch_size) ?? 0, peak));
  }
  return [...best.entries()].sort((a, b) => a[0] - b[0]);
}

function outcomeText(outcome) {
  return {
    fit: "fits",
    oom: "out of memory",
    over_headroom: "ran, but left less than the headroom free",
    error: "error",
    timeout: "timed out",
    crash: "child process crashed",
  }[outcome] || outcome;
}

function marker(trial, x, y, name) {
  const peak = peakOf(trial);
  const where = `${name}: batch ${trial.batch_size}, ${outcomeText(trial.outcome)}`;
  const title = s("title", {}, peak !== null && !NO_PEAK.has(trial.outcome) ? `${where}, peak ${formatBytes(peak)}` : where);
  const common = { "data-outcome": trial.outcome, "data-batch": trial.batch_size, class: `marker ${trial.outcome}` };
  if (trial.outcome === "oom") {
    return s("path", { ...common, d: `M${x - 5} ${y - 5}L${x + 5} ${y + 5}M${x - 5} ${y + 5}L${x + 5} ${y - 5}` }, title);
  }
  if (NO_PEAK.has(trial.outcome)) {
    return s("path", { ...common, d: `M${x} ${y - 6}L${x + 6} ${y + 5}L${x - 6} ${y + 5}Z` }, title);
  }
  return s("circle", { ...common, cx: x, cy: y, r: 4 }, title);
}

/**
 * Draw the chart for `data` = {configs, limitBytes, headroomBytes, recommendedKey, finetuning} into `figure`.
 * configs are ConfigResult-shaped ({precision, gradient_checkpointing, strategy, trials, max_batch_size});
 * finetuning is the job's method (full, lora, qlora), named in every series that trains adapters.
 * Returns {update(data), destroy()}; the chart redraws itself when its container changes width.
 */
export function peakChart(figure, initial) {
  let data = initial;
  const hidden = new Set();
  const plot = h("div", { class: "chart-plot" });
  const legend = h("div", { class: "chart-legend", role: "group", "aria-label": "Series shown" });
  const caption = h("figcaption", {},
    "Peak memory of each trial against its batch size. ",
    "× marks a trial that ran out of memory; a hollow circle, one that left less than the headroom free. ",
    "Lines are dashed with checkpointing on, dotted for ddp, dash-dotted for fsdp.");
  figure.replaceChildren(plot, legend, caption);
  let lastWidth = 0;

  function draw() {
    const width = Math.max(300, Math.round(plot.clientWidth || 720));
    lastWidth = width;
    const narrow = width < 520;
    const height = narrow ? 260 : 340;
    const margin = { top: 18, right: 18, bottom: 44, left: narrow ? 56 : 68 };
    const inner = { w: width - margin.left - margin.right, h: height - margin.top - margin.bottom };

    const configs = data.configs.filter((c) => (c.trials || []).length);
    const allTrials = configs.flatMap((c) => c.trials);
    const peaks = allTrials.map(peakOf).filter((p) => p !== null);
    const limit = data.limitBytes || 0;
    const top = Math.max(limit, ...peaks, 1) * 1.06;
    const [unit, unitName] = byteUnit(top);
    const yTicks = niceTicks(top / unit, narrow ? 4 : 6).map((t) => t * unit);
    const yMax = yTicks[yTicks.length - 1];
    const xTicks = batchTicks(Math.max(1, ...allTrials.map((t) => t.batch_size)), narrow ? 5 : 9);
    const xMax = xTicks[xTicks.length - 1];
    const X = (batch) => margin.left + (batch / xMax) * inner.w;
    const Y = (bytes) => margin.top + inner.h - (bytes / yMax) * inner.h;

    const svg = s("svg", {
      class: "chart",
      viewBox: `0 0 ${width} ${height}`,
      width,
      height,
      role: "img",
      "aria-label": `Peak memory against batch size for ${configs.length} configs`,
    });
    const grid = s("g", { class: "grid" });
    for (const tick of yTicks) {
      grid.append(s("line", { x1: margin.left, x2: margin.left + inner.w, y1: Y(tick), y2: Y(tick) }));
      grid.append(s("text", { x: margin.left - 8, y: Y(tick), class: "tick y" },
        `${Number((tick / unit).toPrecision(6))} ${unitName}`));
    }
    for (const tick of xTicks) {
      grid.append(s("line", { class: "x", x1: X(tick), x2: X(tick), y1: margin.top, y2: margin.top + inner.h }));
      grid.append(s("text", { x: X(tick), y: margin.top + inner.h + 18, class: "tick x" }, String(tick)));
    }
    grid.append(s("text", { x: margin.left + inner.w / 2, y: height - 6, class: "axis-title" }, "batch size per device"));
    svg.append(grid);

    const guides = s("g", { class: "guides" });
    if (limit > 0) {
      guides.append(s("line", { "data-role": "limit", class: "limit", x1: margin.left, x2: margin.left + inner.w, y1: Y(limit), y2: Y(limit) }));
      if (!narrow) {
        guides.append(s("text", { x: margin.left + 6, y: Y(limit) - 6, class: "guide-label limit" },
          `device limit ${formatBytes(limit)}`));
      }
      const headroom = data.headroomBytes || 0;
      if (headroom > 0 && headroom < limit) {
        const y = Y(limit - headroom);
        guides.append(s("line", { "data-role": "headroom", class: "headroom", x1: margin.left, x2: margin.left + inner.w, y1: y, y2: y }));
        if (!narrow) {
          guides.append(s("text", { x: margin.left + 6, y: y + 14, class: "guide-label headroom" },
            `limit − headroom ${formatBytes(limit - headroom)}`));
        }
      }
    }
    svg.append(guides);

    const seriesLayer = s("g", { class: "series-layer" });
    for (const config of configs) {
      const key = keyOf(config);
      const name = seriesName(config, data.finetuning);
      const recommended = key === data.recommendedKey;
      const group = s("g", {
        class: `series${recommended ? " recommended" : ""}`,
        "data-series": key,
        "data-name": name,
        "data-precision": config.precision,
        "data-checkpointing": config.gradient_checkpointing ? "on" : "off",
        "data-strategy": config.strategy || "single",
        "data-recommended": recommended ? "true" : null,
      });
      if (hidden.has(key)) group.setAttribute("visibility", "hidden");
      const points = linePoints(config.trials);
      if (points.length) {
        const d = points.map(([b, p], i) => `${i ? "L" : "M"}${X(b).toFixed(1)} ${Y(p).toFixed(1)}`).join("");
        group.append(s("path", { class: "line", "data-role": "line", d }));
      }
      if (recommended && config.max_batch_size) {
        const peak = points.find(([b]) => b === config.max_batch_size);
        if (peak) group.append(s("circle", { class: "chosen", cx: X(peak[0]), cy: Y(peak[1]), r: 9 }));
      }
      for (const trial of config.trials) {
        const peak = peakOf(trial);
        const y = peak === null || NO_PEAK.has(trial.outcome) ? Y(limit || yMax) : Y(peak);
        group.append(marker(trial, X(trial.batch_size), y, name));
      }
      seriesLayer.append(group);
    }
    svg.append(seriesLayer);
    plot.replaceChildren(svg);
    drawLegend(configs);
  }

  function guideKeys() {
    const limit = data.limitBytes || 0;
    const headroom = data.headroomBytes || 0;
    const keys = [];
    if (limit > 0) keys.push(["limit", `device limit ${formatBytes(limit)}`]);
    if (limit > 0 && headroom > 0 && headroom < limit) keys.push(["headroom", `limit − headroom ${formatBytes(limit - headroom)}`]);
    return keys.map(([role, text]) => h("span", { class: `legend-guide ${role}` },
      s("svg", { width: 28, height: 12, "aria-hidden": "true", class: "swatch" }, s("line", { x1: 1, x2: 27, y1: 6, y2: 6 })), text));
  }

  function drawLegend(configs) {
    legend.replaceChildren(...guideKeys(), ...configs.map((config) => {
      const key = keyOf(config);
      const name = seriesName(config, data.finetuning);
      const swatch = s("svg", { width: 28, height: 12, "aria-hidden": "true", class: "swatch" },
        s("line", { x1: 1, x2: 27, y1: 6, y2: 6 }), s("circle", { cx: 14, cy: 6, r: 3.5 }));
      const best = config.max_batch_size ? ` · max ${config.max_batch_size}` : "";
      return h("button", {
        type: "button",
        class: "legend-item",
        "data-series": key,
        "data-precision": config.precision,
        "data-checkpointing": config.gradient_checkpointing ? "on" : "off",
        "data-strategy": config.strategy || "single",
        "aria-pressed": hidden.has(key) ? "false" : "true",
        title: `Show or hide ${configLabel(config.precision, config.gradient_checkpointing, config.strategy, data.finetuning)}`,
        onclick: () => {
          if (hidden.has(key)) hidden.delete(key);
          else hidden.add(key);
          draw();
          legend.querySelector(`button[data-series="${key}"]`)?.focus();
        },
      }, swatch, `${name}${best}`);
    }));
  }

  // Redraw on the next frame, not inside the observer's callback (that would loop the observer).
  let frame = 0;
  const observer = new ResizeObserver(() => {
    cancelAnimationFrame(frame);
    frame = requestAnimationFrame(() => {
      if (Math.abs((plot.clientWidth || 0) - lastWidth) > 16) draw();
    });
  });
  observer.observe(plot);
  draw();
  return {
    update(next) { data = next; draw(); },
    destroy() { observer.disconnect(); cancelAnimationFrame(frame); },
  };
}
