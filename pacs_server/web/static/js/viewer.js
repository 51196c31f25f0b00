// The viewer page: series switcher, 1×1 / 1×2 / 2×2 layouts, toolbar, keyboard shortcuts, cine.
// Timings (first image drawn, all frames loaded) are published on window.macpacsViewer for the
// tests and bench/, in ms since the page started loading (performance.now()).

import { TAG, num, studySeries, thumbnailUrl, val } from "./dicomweb.js";
import { SeriesStack } from "./series.js";
import { PRESETS, Viewport } from "./viewport.js";

const root = document.getElementById("viewer");
const study = root.dataset.study;
const startSeries = root.dataset.series || "";
const grid = document.getElementById("viewports");
const template = document.getElementById("viewport-template");
const seriesList = document.getElementById("series-list");
const banner = document.getElementById("viewer-message");

const stacks = new Map(); // series UID → SeriesStack
const t0 = performance.now();
const stats = { start: t0, firstImageMs: null, allLoadedMs: null, metadataMs: null, total: 0, loaded: 0 };

const viewer = {
  tool: "wl",
  viewports: [],
  active: null,
  series: [],
  cine: null,
  stats,

  activate(vp) {
    if (this.active === vp) return;
    if (this.active) this.active.el.classList.remove("active");
    this.active = vp;
    vp.el.classList.add("active");
    highlightSeries();
  },

  onRendered(vp) {
    if (stats.firstImageMs === null && vp.current && vp.current.pixels) {
      stats.firstImageMs = performance.now();
    }
    syncToolbar();
  },

  /** Test and benchmark hooks (the same operations as the toolbar and keyboard). */
  snapshot() {
    return this.active ? this.active.snapshot() : null;
  },
};
window.macpacsViewer = viewer;

function showBanner(text, isError = true) {
  banner.textContent = text;
  banner.hidden = !text;
  banner.classList.toggle("error", isError);
}

function stackFor(seriesUid) {
  if (!stacks.has(seriesUid)) {
    const stack = new SeriesStack(study, seriesUid);
    stack.subscribe((event) => {
      if (event === "metadata" && stats.metadataMs === null) stats.metadataMs = performance.now();
      if (event === "done" && stats.allLoadedMs === null && stack === stacks.get(startSeriesUid())) {
        stats.allLoadedMs = performance.now();
      }
      if (stack === stacks.get(startSeriesUid())) {
        stats.total = stack.frames.length;
        stats.loaded = stack.loaded;
      }
      if (event === "error" && stack.error) {
        showBanner(stack.error.message);
        if (stack.error.status === 401) location.assign(`/login?next=${encodeURIComponent(location.pathname + location.search)}&expired=1`);
      }
    });
    stacks.set(seriesUid, stack);
  }
  return stacks.get(seriesUid);
}

let firstSeries = startSeries;
const startSeriesUid = () => firstSeries;

function load(vp, seriesUid) {
  vp.show(stackFor(seriesUid));
  highlightSeries();
}

function setLayout(name) {
  const [cols, rows] = name.split("x").map(Number);
  const wanted = cols * rows;
  grid.style.gridTemplateColumns = `repeat(${cols}, 1fr)`;
  grid.style.gridTemplateRows = `repeat(${rows}, 1fr)`;
  while (viewer.viewports.length < wanted) {
    const el = template.content.firstElementChild.cloneNode(true);
    grid.appendChild(el);
    const vp = new Viewport(el, viewer);
    viewer.viewports.push(vp);
    // A new viewport shows the next series of the study (side by side comparison).
    const n = viewer.viewports.length - 1;
    let uid = viewer.series.length ? viewer.series[Math.min(n, viewer.series.length - 1)].uid : null;
    if (n === 0 && firstSeries) uid = firstSeries;
    if (uid) load(vp, uid);
  }
  while (viewer.viewports.length > wanted) {
    const vp = viewer.viewports.pop();
    vp.el.remove();
    if (viewer.active === vp) viewer.active = null;
  }
  if (!viewer.active) viewer.activate(viewer.viewports[0]);
  document.querySelectorAll("[data-layout]").forEach((b) => b.classList.toggle("on", b.dataset.layout === name));
  viewer.viewports.forEach((vp) => vp.requestRender());
}

function highlightSeries() {
  const current = viewer.active && viewer.active.stack ? viewer.active.stack.series : null;
  seriesList.querySelectorAll("[data-series]").forEach((el) => el.classList.toggle("on", el.dataset.series === current));
}

async function loadSeriesList() {
  let rows;
  try {
    rows = await studySeries(study);
  } catch (err) {
    showBanner(err.message);
    return;
  }
  viewer.series = rows
    .map((ds) => ({
      uid: val(ds, TAG.SeriesInstanceUID),
      number: num(ds, TAG.SeriesNumber, 0, 0),
      description: val(ds, TAG.SeriesDescription) || "",
      modality: val(ds, TAG.Modality) || "",
      count: num(ds, TAG.NumberOfSeriesRelatedInstances, 0, 0),
    }))
    .sort((a, b) => a.number - b.number);
  if (!viewer.series.length) {
    showBanner("This study has no series in the archive (deleted meanwhile?).");
    return;
  }
  seriesList.replaceChildren(
    ...viewer.series.map((s) => {
      const item = document.createElement("button");
      item.type = "button";
      item.className = "series-item";
      item.dataset.series = s.uid;
      item.title = "Show this series in the active viewport";
      const img = document.createElement("img");
      img.loading = "lazy";
      img.alt = "";
      img.src = thumbnailUrl(study, s.uid, 96);
      img.onerror = () => img.classList.add("missing");
      const label = document.createElement("span");
      label.textContent = `${s.modality} ${s.number}: ${s.description}\n${s.count} images`;
      item.append(img, label);
      item.addEventListener("click", () => load(viewer.active, s.uid));
      return item;
    }),
  );
  highlightSeries();
}

// -- toolbar ---------------------------------------------------------------------------------
const toolButtons = document.querySelectorAll("[data-tool]");
const presetSelect = document.getElementById("preset");
const cineButton = document.getElementById("cine");
const fpsInput = document.getElementById("fps");

function setTool(tool) {
  viewer.tool = tool;
  toolButtons.forEach((b) => b.classList.toggle("on", b.dataset.tool === tool));
}

function syncToolbar() {
  cineButton.classList.toggle("on", !!viewer.cine);
  cineButton.textContent = viewer.cine ? "❚❚ Stop" : "▶ Cine";
}

function command(name) {
  const vp = viewer.active;
  if (!vp) return;
  if (name === "fit") vp.fit();
  else if (name === "invert") vp.toggleInvert();
  else if (name === "reset") vp.resetView();
  else if (name === "clear") vp.clearAnnotations();
  else if (name === "cine") toggleCine();
}

function toggleCine() {
  if (viewer.cine) {
    cancelAnimationFrame(viewer.cine.raf);
    viewer.cine = null;
  } else {
    const cine = { last: performance.now(), raf: 0 };
    const step = (now) => {
      const vp = viewer.active;
      const fps = Math.max(1, Math.min(60, Number(fpsInput.value) || 10));
      if (vp && vp.stack && now - cine.last >= 1000 / fps - 1) {
        cine.last = now;
        const n = vp.stack.frames.length;
        vp.setIndex((vp.index + 1) % n);
      }
      cine.raf = requestAnimationFrame(step);
    };
    cine.raf = requestAnimationFrame(step);
    viewer.cine = cine;
  }
  syncToolbar();
}

toolButtons.forEach((b) => b.addEventListener("click", () => setTool(b.dataset.tool)));
document.querySelectorAll("[data-command]").forEach((b) => b.addEventListener("click", () => command(b.dataset.command)));
document.querySelectorAll("[data-layout]").forEach((b) => b.addEventListener("click", () => setLayout(b.dataset.layout)));
presetSelect.addEventListener("change", () => {
  if (presetSelect.value && viewer.active) viewer.active.applyPreset(presetSelect.value);
  presetSelect.value = "";
});

// -- keyboard ------------------------------------------------------------------------------
const PRESET_KEYS = { 1: "brain", 2: "lung", 3: "bone", 4: "abdomen", 0: "file" };
const TOOL_KEYS = { w: "wl", p: "pan", z: "zoom", l: "length", e: "ellipse", t: "rect" };

document.addEventListener("keydown", (e) => {
  if (e.target.closest("input, select, textarea") && e.target.type !== "range") return;
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const vp = viewer.active;
  if (!vp) return;
  const key = e.key;
  let handled = true;
  if (key === "ArrowDown" || key === "ArrowRight") vp.scroll(1);
  else if (key === "ArrowUp" || key === "ArrowLeft") vp.scroll(-1);
  else if (key === "PageDown") vp.scroll(10);
  else if (key === "PageUp") vp.scroll(-10);
  else if (key === "Home") vp.setIndex(0);
  else if (key === "End") vp.setIndex(Infinity);
  else if (key === " ") toggleCine();
  else if (key === "i") vp.toggleInvert();
  else if (key === "r") vp.resetView();
  else if (key === "f") vp.fit();
  else if (key === "Delete" || key === "Backspace") vp.clearAnnotations();
  else if (key in PRESET_KEYS) vp.applyPreset(PRESET_KEYS[key]);
  else if (key in TOOL_KEYS) setTool(TOOL_KEYS[key]);
  else if (key === "]" || key === "[") {
    const i = viewer.series.findIndex((s) => vp.stack && s.uid === vp.stack.series);
    const next = viewer.series[(i + (key === "]" ? 1 : -1) + viewer.series.length) % viewer.series.length];
    if (next) load(vp, next.uid);
  } else if (key === "?") document.getElementById("help").toggleAttribute("hidden");
  else handled = false;
  if (handled) e.preventDefault();
});

// Preset menu and help are generated from the same tables the keys use.
for (const [key, name] of Object.entries(PRESET_KEYS)) {
  const option = document.createElement("option");
  option.value = name;
  option.textContent = name === "file" ? `File VOI (${key})` : `${PRESETS[name].label} ${PRESETS[name].width}/${PRESETS[name].center} (${key})`;
  presetSelect.appendChild(option);
}

// -- start -------------------------------------------------------------------------------------
(async () => {
  await loadSeriesList();
  if (!firstSeries && viewer.series.length) firstSeries = viewer.series[0].uid;
  setLayout("1x1");
  if (firstSeries && !viewer.viewports[0].stack) load(viewer.viewports[0], firstSeries);
  setTool("wl");
})();

// A start series is known from the URL: begin loading before the series list arrives.
if (startSeries) stackFor(startSeries).start(0).catch(() => {});
