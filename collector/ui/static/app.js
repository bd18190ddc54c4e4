// Dashboard core: DOM helper, JSON fetch, hash router. Pages live in pages.js.
"use strict";

/** h("div", {class: "x", onclick: fn}, child, "text", ...) -> element; text is never parsed as HTML. */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k === "style") Object.assign(el.style, v);  // CSSOM, allowed by the CSP (style attributes are not)
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

async function api(path, params) {
  const query = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) if (v !== "" && v !== null && v !== undefined) query.set(k, v);
  const url = "/ui/api/" + path + (query.toString() ? "?" + query : "");
  const response = await fetch(url, { credentials: "same-origin" });
  if (response.status === 401) { location.reload(); throw new Error("token required"); }
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function fmtDate(ms) {
  if (!ms) return "–";
  return new Date(ms).toISOString().replace("T", " ").slice(0, 19);
}

function fmtDuration(ms) {
  if (ms === null || ms === undefined) return "–";
  if (ms < 1) return (ms * 1000).toFixed(0) + " µs";
  if (ms < 1000) return ms.toFixed(1) + " ms";
  return (ms / 1000).toFixed(2) + " s";
}

function fmtBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
}

function rewardCell(value) {
  if (value === null || value === undefined) return h("span", { class: "muted" }, "–");
  return h("span", { class: value > 0 ? "reward-pos" : value < 0 ? "reward-neg" : "" }, charts.fmtNumber(value));
}

function showError(container, error) {
  container.replaceChildren(h("div", { class: "error-box" }, "Could not load: " + error.message));
}

/** The current route: {page, arg, params} from "#/page/arg?k=v". */
function route() {
  const hash = location.hash.replace(/^#\/?/, "");
  const [path, query] = hash.split("?");
  const [page, ...rest] = path.split("/");
  return { page: page || "episodes", arg: rest.map(decodeURIComponent).join("/"),
           params: Object.fromEntries(new URLSearchParams(query || "")) };
}

function navigate(page, arg, params) {
  const query = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) if (v !== "" && v !== null && v !== undefined) query.set(k, v);
  location.hash = "#/" + page + (arg ? "/" + encodeURIComponent(arg) : "") + (query.toString() ? "?" + query : "");
}

const PAGES = {};
let stopCurrent = null;

async function render() {
  if (stopCurrent) { stopCurrent(); stopCurrent = null; }
  const { page, arg, params } = route();
  const main = document.getElementById("main");
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.dataset.page === page || (page === "trace" && link.dataset.page === "episodes"));
  }
  const show = PAGES[page] || PAGES.episodes;
  try {
    stopCurrent = (await show(main, arg, params)) || null;
  } catch (error) {
    showError(main, error);
  }
}

window.addEventListener("hashchange", render);
window.addEventListener("DOMContentLoaded", render);
window.ui = { h, api, fmtDate, fmtDuration, fmtBytes, rewardCell, showError, navigate, PAGES };
