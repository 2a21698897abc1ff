// The page's plumbing for its module views (runs.js): the API key from the header's form, requests
// with it, errors in plain words, and a small element builder. The arena (arena.js, a classic script
// older than these modules) still has its own copies of them.
"use strict";

export const $ = (id) => document.getElementById(id);

export function key() { return $("api-key").value.trim(); }

// The API's errors are {"error": {code, message, param}}; say what happened in plain words.
function plainError(code, error) {
  const message = (error && error.message) || "";
  if (code === 401) return "Your API key was not accepted (missing, invalid or revoked). Enter a valid key at the top of the page.";
  if (code === 403) return "Your API key's role may not do this" + (message ? ": " + message : ".");
  if (code === 404) return "Not found: " + (message || "the server does not know this.");
  if (code === 409) return "Conflict: " + message;
  if (code === 429) return "The server is busy; try again in a moment. " + message;
  if (code >= 500) return "The server failed (" + code + "): " + (message || "see the server log") + ".";
  return message || ("Unexpected response " + code + ".");
}

export class ApiError extends Error {
  constructor(code, error) { super(plainError(code, error)); this.code = code; }
}

async function request(method, path, body) {
  const headers = {"Authorization": "Bearer " + key()};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  try {
    return await fetch(path, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
  } catch (e) {
    throw new Error("Could not reach the Beaver server. Is it running?");
  }
}

// A JSON answer, or an ApiError.
export async function api(method, path, body) {
  const response = await request(method, path, body);
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, data && data.error);
  return data;
}

// A file the API serves only with the key (a job's plot): as a blob: URL an <img> or <a> can use.
export async function blobUrl(path) {
  const response = await request("GET", path);
  if (!response.ok) throw new ApiError(response.status, (await response.json().catch(() => null) || {}).error);
  return URL.createObjectURL(await response.blob());
}

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === undefined || v === null) continue;
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}
