// Entry point: hash routing (#/, #/new, #/jobs/ID), the banner, the token button, error capture.

import { forgetToken, getToken } from "./api.js";
import { formView } from "./form.js";
import { jobView } from "./job.js";
import { jobsView } from "./jobs.js";

const FLASH_KEY = "maxbatch.flash";

// Uncaught errors are shown, not swallowed; tests read window.__maxbatchErrors.
window.__maxbatchErrors = [];
function report(message) {
  window.__maxbatchErrors.push(message);
  showBanner(`Something went wrong in the dashboard: ${message}`, "error");
}
window.addEventListener("error", (event) => {
  // Chromium reports a benign notice as an error event when layout settles late; it is no bug.
  if (String(event.message).startsWith("ResizeObserver loop")) return;
  report(event.message || String(event.error));
});
// A Content-Security-Policy refusal means the page tried to load or run something it should not.
// Recorded for the tests, not shown: a browser extension's injections can trigger it too.
document.addEventListener("securitypolicyviolation", (event) => {
  const message = `blocked by the content security policy: ${event.violatedDirective} ${event.blockedURI || ""}`;
  window.__maxbatchErrors.push(message.trim());
  console.warn(message);
});
window.addEventListener("unhandledrejection", (event) => {
  const reason = event.reason;
  if (reason && reason.name === "AbortError") return;
  report(reason && reason.message ? reason.message : String(reason));
});

function showBanner(text, kind = "info") {
  const banner = document.getElementById("banner");
  banner.textContent = text;
  banner.className = `banner ${kind}`;
  banner.hidden = false;
}

function hideBanner() {
  document.getElementById("banner").hidden = true;
}

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/";
  const [path, search = ""] = raw.split("?");
  return { path, query: new URLSearchParams(search) };
}

let cleanup = null;

function route() {
  if (cleanup) cleanup();
  cleanup = null;
  hideBanner();
  const flash = sessionStorage.getItem(FLASH_KEY);
  if (flash) {
    sessionStorage.removeItem(FLASH_KEY);
    showBanner(flash);
  }
  const root = document.getElementById("view");
  const { path, query } = parseHash();
  const job = /^\/jobs\/([^/]+)$/.exec(path);
  let section = "jobs";
  if (job) {
    cleanup = jobView(root, decodeURIComponent(job[1]));
    section = "job";
    document.title = `Probe ${decodeURIComponent(job[1])} · maxbatch`;
  } else if (path === "/new") {
    cleanup = formView(root, query);
    section = "new";
    document.title = "New probe · maxbatch";
  } else {
    cleanup = jobsView(root, query);
    document.title = "Probes · maxbatch";
  }
  for (const link of document.querySelectorAll("[data-nav]")) {
    if (link.dataset.nav === section) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  // Move focus to the new view for keyboard and screen-reader users, except on the first load.
  if (routed) root.focus({ preventScroll: true });
  window.scrollTo(0, 0);
  routed = true;
}
let routed = false;

function syncTokenButton() {
  document.getElementById("forget-token").hidden = !getToken();
}

document.getElementById("forget-token").addEventListener("click", () => {
  forgetToken();
  showBanner("The token is forgotten in this browser.");
});
document.addEventListener("maxbatch:token", syncTokenButton);
window.addEventListener("hashchange", route);
syncTokenButton();
route();
