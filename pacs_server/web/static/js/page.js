// Helpers for the light pages: the CSRF token, JSON calls to /api/ui with clear error messages.

import { check } from "./dicomweb.js";

export const csrfToken = () => document.querySelector('meta[name="csrf-token"]')?.content || "";

/** Call a JSON endpoint; state-changing methods carry the CSRF token. Throws HttpError. */
export async function api(method, url, body) {
  const headers = { Accept: "application/json" };
  if (method !== "GET") headers["X-CSRF-Token"] = csrfToken();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  await check(response, method === "GET" ? "loading" : "request");
  return response.status === 204 ? null : response.json();
}

export function show(el, text, kind = "") {
  el.textContent = text;
  el.className = `msg ${kind}`;
}

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key in node) node[key] = value;
    else node.setAttribute(key, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

/** Send the browser to the login page when the session is gone, keeping where it was. */
export function loginIfExpired(err) {
  if (err && err.status === 401) {
    location.assign(`/login?expired=1&next=${encodeURIComponent(location.pathname + location.search)}`);
    return true;
  }
  return false;
}
