// A multi-card predict job (the request's gpu is a list): the cards side by side, and a picker that
// chooses which card's recommendation, curves and config table the job page shows below.

import { h } from "./dom.js";
import { configLabel, formatBytes, formatPlan, keyOf } from "./format.js";

/** The cards the request compares, in its order (null for a one-card request). */
export function requestCards(spec) {
  return spec && Array.isArray(spec.gpu) && spec.gpu.length ? spec.gpu : null;
}

/** One card's part of a result, shaped as a one-card result, so the job page draws it as one. */
export function cardResult(result, gpu) {
  const cards = (result && result.cards) || [];
  const card = cards.find((c) => c.gpu === gpu) || cards[0];
  if (!card) return result;
  return { ...result, device: card.device, configs: card.configs, recommendation: card.recommendation,
    timing_note: card.timing_note, elapsed_seconds: card.elapsed_seconds };
}

/** Buttons that pick the card shown below (aria-pressed marks the one shown). */
export function cardPicker(cards, selected, onPick) {
  return h("div", { class: "card-picker", role: "group", "aria-label": "Card shown below", id: "card-picker" },
    ...cards.map((gpu) => h("button", {
      type: "button",
      id: `card-pick-${gpu}`,
      "data-card": gpu,
      "aria-pressed": gpu === selected ? "true" : "false",
      class: gpu === selected ? "selected" : null,
      onclick: () => onPick(gpu),
    }, gpu)));
}

function recommendedText(card) {
  const rec = card.recommendation;
  if (!rec) return h("span", { class: "muted" }, "no plan reaches the target");
  return [h("strong", { class: "nowrap" }, formatPlan(rec.plan)),
    h("div", { class: "muted small" }, configLabel(rec.precision, rec.gradient_checkpointing, rec.strategy, rec.finetuning))];
}

function configCell(card, key) {
  const config = card.configs.find((c) => keyOf(c) === key);
  const recommended = card.recommendation && keyOf(card.recommendation) === key;
  const attrs = { "data-card": card.gpu, "data-config": key, "data-status": config ? config.status : "", class: recommended ? "num recommended" : "num" };
  if (!config) return h("td", attrs, "–");
  if (config.status !== "ok") return h("td", { ...attrs, title: config.reason || "" }, h("span", { class: "muted" }, config.status));
  return h("td", { ...attrs, "data-value": config.max_batch_size ?? "" }, config.max_batch_size == null ? "none fits" : String(config.max_batch_size));
}

/** The cards side by side: memory, the recommendation and each config's largest batch, a column per card. */
export function cardComparison(result, selected) {
  const cards = result.cards || [];
  const keys = [];
  for (const card of cards) for (const config of card.configs) if (!keys.includes(keyOf(config))) keys.push(keyOf(config));
  const labelOf = (key) => {
    const config = cards.flatMap((c) => c.configs).find((c) => keyOf(c) === key);
    return configLabel(config.precision, config.gradient_checkpointing, config.strategy);
  };
  const head = (card) => h("th", { scope: "col", "data-card": card.gpu, class: card.gpu === selected ? "selected" : null }, card.gpu);
  const row = (title, cellOf, attrs = {}) => h("tr", attrs, h("th", { scope: "row" }, title), ...cards.map(cellOf));
  return h("div", { class: "table-wrap" },
    h("table", { class: "card-compare", id: "card-compare" },
      h("caption", {}, "The cards side by side: the recommended plan, and each config's largest batch per device"),
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Card"), ...cards.map(head))),
      h("tbody", {},
        row("Memory for tensors", (card) => h("td", { class: "num", "data-card": card.gpu },
          formatBytes(card.device.capacity_bytes || card.device.memory_limit_bytes || card.device.total_memory_bytes))),
        row("Compute capability", (card) => h("td", { class: "num", "data-card": card.gpu }, card.device.compute_capability || "–")),
        row("Recommended", (card) => h("td", { "data-card": card.gpu, "data-field": "recommendation" }, recommendedText(card)),
          { class: "recommended-row" }),
        ...keys.map((key) => row(h("span", {}, "Max batch ", h("span", { class: "muted small" }, labelOf(key))),
          (card) => configCell(card, key), { "data-config": key })),
        row("Trials run / reused", (card) => h("td", { class: "num", "data-card": card.gpu,
          title: "reused: a card with the same compute capability ran the same trial, and its peak fits this card" },
        `${card.trials_run} / ${card.trials_reused}`)))));
}
