// Building DOM nodes without innerHTML: every value from the API lands as text, never as markup.

const SVG_NS = "http://www.w3.org/2000/svg";

function build(node, attrs, children) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      node.addEventListener(name.slice(2), value);
    } else if (name === "dataset") {
      for (const [key, data] of Object.entries(value)) {
        if (data !== null && data !== undefined) node.dataset[key] = String(data);
      }
    } else if (value === true) {
      node.setAttribute(name, "");
    } else {
      node.setAttribute(name, String(value));
    }
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** An HTML element: h("a", {href: "#/"}, "text", otherNode). */
export function h(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

/** An SVG element, same calling convention as h(). */
export function s(tag, attrs, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

/** Copy text to the clipboard; works on plain http too, where navigator.clipboard is missing. */
export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch { /* fall back below */ }
  }
  const area = h("textarea", { readonly: true, class: "offscreen" });
  area.value = text;
  document.body.append(area);
  area.select();
  let copied = false;
  try { copied = document.execCommand("copy"); } catch { copied = false; }
  area.remove();
  return copied;
}

/** A <pre> block with a Copy button that says whether the copy worked. */
export function copyBlock(text, { label, id }) {
  const status = h("span", { class: "copy-status", "aria-live": "polite" });
  const button = h("button", {
    type: "button",
    class: "copy",
    "aria-label": `Copy ${label}`,
    onclick: async () => {
      const ok = await copyText(text);
      status.textContent = ok ? "Copied" : "Select the text and copy it";
      setTimeout(() => { status.textContent = ""; }, 2500);
    },
  }, "Copy");
  return h("div", { class: "copy-block" },
    h("div", { class: "copy-head" }, h("span", { class: "copy-label" }, label), status, button),
    h("pre", { id, tabindex: 0, "aria-label": label }, h("code", {}, text)));
}

/** Put a message into the polite live region for screen readers. */
export function announce(text) {
  const live = document.getElementById("live");
  if (live) live.textContent = text;
}
