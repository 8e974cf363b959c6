// The service's HTTP API: JSON calls, problem+json errors, the bearer token, server-sent events.
//
// Every URL is relative to the page, so the dashboard works behind a reverse proxy's path prefix.

const API = new URL("v1/", document.baseURI);
const TOKEN_KEY = "maxbatch.token";

/** An HTTP error carrying the service's RFC 9457 problem object (or a stand-in for one). */
export class ApiError extends Error {
  constructor(status, problem) {
    const title = (problem && (problem.detail || problem.title)) || `HTTP ${status}`;
    super(title);
    this.status = status;
    this.problem = problem || { title: `HTTP ${status}`, status };
  }
}

export function apiUrl(path) {
  return new URL(path, API);
}

export function getToken() {
  return sessionStorage.getItem(TOKEN_KEY) || localStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(token, remember) {
  sessionStorage.setItem(TOKEN_KEY, token);
  if (remember) localStorage.setItem(TOKEN_KEY, token);
  else localStorage.removeItem(TOKEN_KEY);
  document.dispatchEvent(new CustomEvent("maxbatch:token"));
}

export function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
  localStorage.removeItem(TOKEN_KEY);
  document.dispatchEvent(new CustomEvent("maxbatch:token"));
}

let pendingPrompt = null;

/** Ask for a token once, however many calls were refused at the same time; null when cancelled. */
function promptForToken(problem, hadToken) {
  if (pendingPrompt) return pendingPrompt;
  const dialog = document.getElementById("token-dialog");
  const input = document.getElementById("token-input");
  const reason = document.getElementById("token-reason");
  reason.textContent = hadToken
    ? "The service refused the token you gave. Enter another one."
    : (problem && problem.detail) || "This service requires a bearer token.";
  input.value = "";
  pendingPrompt = new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      pendingPrompt = null;
      const token = input.value.trim();
      if (dialog.returnValue === "ok" && token) {
        setToken(token, document.getElementById("token-remember").checked);
        resolve(token);
      } else {
        resolve(null);
      }
    }, { once: true });
    dialog.returnValue = "";
    dialog.showModal();
    input.focus();
  });
  return pendingPrompt;
}

function headersFor(extra) {
  const headers = { Accept: "application/json, application/problem+json", ...extra };
  const token = getToken();
  if (token) headers.Authorization = `Bearer ${token}`;
  return headers;
}

async function readBody(response) {
  const text = await response.text();
  if (!text) return null;
  try {
    return JSON.parse(text);
  } catch {
    return { title: text.slice(0, 200) };
  }
}

/**
 * Call the API. Resolves to {status, data, headers}; rejects with ApiError.
 * A 401 asks for a token (one prompt shared by every refused call) and retries with it.
 */
export async function api(path, { method = "GET", body, headers = {}, signal } = {}) {
  for (;;) {
    const init = { method, headers: headersFor(headers), signal };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const hadToken = Boolean(getToken());
    const response = await fetch(apiUrl(path), init);
    const data = await readBody(response);
    if (response.status === 401) {
      const token = await promptForToken(data, hadToken);
      if (token === null) throw new ApiError(401, data);
      continue;
    }
    if (!response.ok) throw new ApiError(response.status, data);
    return { status: response.status, data, headers: response.headers };
  }
}

/**
 * Follow a server-sent-events stream with fetch (EventSource cannot send the Authorization header).
 * Calls onEvent({event, data, id}) per message, `data` parsed as JSON when it is JSON.
 * Resolves when the server ends the stream; rejects on HTTP errors or when `signal` aborts.
 */
export async function followEvents(path, onEvent, signal) {
  const response = await fetch(apiUrl(path), {
    headers: headersFor({ Accept: "text/event-stream" }),
    signal,
  });
  if (!response.ok || !response.body) throw new ApiError(response.status, await readBody(response));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let message = { event: "message", data: [], id: null };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const lines = buffer.split(/\r\n|\r|\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (line === "") {
        if (message.data.length) {
          const text = message.data.join("\n");
          let data = text;
          try { data = JSON.parse(text); } catch { /* plain text event */ }
          onEvent({ event: message.event, data, id: message.id });
        }
        message = { event: "message", data: [], id: null };
        continue;
      }
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let text = colon < 0 ? "" : line.slice(colon + 1);
      if (text.startsWith(" ")) text = text.slice(1);
      if (field === "event") message.event = text;
      else if (field === "data") message.data.push(text);
      else if (field === "id") message.id = text;
    }
  }
}

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
