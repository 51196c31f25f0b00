// One viewport: a canvas showing one frame of a SeriesStack, its window/level, zoom/pan,
// measurements and corner overlays. Pointer input goes through the viewer's current tool.

import { TAG, formatDate, personName, val } from "./dicomweb.js";
import { GrayLut, defaultWindow, distance, isColor, paint, roiStats, unitFor } from "./imaging.js";

export const PRESETS = {
  brain: { center: 40, width: 80, label: "Brain" },
  lung: { center: -600, width: 1500, label: "Lung" },
  bone: { center: 300, width: 1500, label: "Bone" },
  abdomen: { center: 50, width: 400, label: "Abdomen" },
};

function fmt(n, digits = 1) {
  return Number.isFinite(n) ? n.toFixed(digits) : "";
}

export class Viewport {
  constructor(element, viewer) {
    this.el = element;
    this.viewer = viewer;
    this.canvas = element.querySelector("canvas");
    this.ctx = this.canvas.getContext("2d");
    this.slider = element.querySelector("input[type=range]");
    this.corners = {};
    for (const c of ["tl", "tr", "bl", "br"]) this.corners[c] = element.querySelector(`.ov-${c}`);
    this.message = element.querySelector(".vp-message");
    this.stack = null;
    this.unsubscribe = null;
    this.index = 0;
    this.win = null;
    this.invert = false;
    this.zoom = 1;
    this.pan = { x: 0, y: 0 };
    this.annotations = new Map(); // frame index → [{type, p1, p2}]
    this.drag = null;
    this.lut = new GrayLut();
    this.image = null; // ImageData for the current frame size
    this.offscreen = document.createElement("canvas");
    this.pending = false;
    this.overlayTimer = null;
    this.wheelRest = 0;
    this.bind();
  }

  // -- series -----------------------------------------------------------------------------
  show(stack) {
    if (this.unsubscribe) this.unsubscribe();
    this.stack = stack;
    this.index = 0;
    this.win = null;
    this.annotations = new Map();
    this.resetView();
    this.setMessage(stack.error ? stack.error.message : "Loading series…");
    this.unsubscribe = stack.subscribe((event, i) => this.onStack(event, i));
    if (stack.frames.length) this.onStack("metadata", -1);
    stack.start(0).catch(() => {});
  }

  onStack(event, i) {
    const s = this.stack;
    if (event === "metadata") {
      this.slider.max = String(s.frames.length - 1);
      this.slider.value = String(this.index);
      this.setMessage("");
    } else if (event === "error") {
      this.setMessage(s.error.message, true);
    } else if (event === "frame" || event === "frame-error") {
      if (i !== this.index) {
        // Another slice arrived: only the "loaded" counter changes; redrawing the image for
        // each of a thousand arrivals would take the main thread from decoding them.
        this.requestOverlay();
        return;
      }
      if (event === "frame") this.setMessage("");
      else this.setMessage(`Image ${i + 1}: ${s.frames[i].error.message}`, true);
    }
    this.requestRender();
  }

  requestOverlay() {
    if (this.overlayTimer) return;
    this.overlayTimer = setTimeout(() => {
      this.overlayTimer = null;
      this.updateOverlay();
    }, 250);
  }

  get current() {
    return this.stack && this.stack.frames[this.index];
  }

  setIndex(i) {
    if (!this.stack || !this.stack.frames.length) return;
    const n = this.stack.frames.length;
    const next = Math.max(0, Math.min(n - 1, i));
    if (next === this.index && this.slider.value === String(next)) return;
    this.index = next;
    this.slider.value = String(next);
    const f = this.current;
    if (!f.pixels && !f.error) this.stack.prioritize(next);
    this.requestRender();
  }

  scroll(delta) {
    this.setIndex(this.index + delta);
  }

  // -- view state ---------------------------------------------------------------------------
  resetView() {
    this.zoom = 1;
    this.pan = { x: 0, y: 0 };
    this.invert = false;
    this.win = null;
    this.requestRender();
  }

  fit() {
    this.zoom = 1;
    this.pan = { x: 0, y: 0 };
    this.requestRender();
  }

  setWindow(center, width) {
    this.win = { center, width: Math.max(1, width) };
    this.requestRender();
  }

  applyPreset(name) {
    const f = this.current;
    if (name === "file") {
      if (f) this.win = defaultWindow(f);
    } else if (PRESETS[name]) {
      this.win = { center: PRESETS[name].center, width: PRESETS[name].width };
    }
    this.requestRender();
  }

  toggleInvert() {
    this.invert = !this.invert;
    this.requestRender();
  }

  clearAnnotations() {
    this.annotations.delete(this.index);
    this.requestRender();
  }

  // -- geometry -----------------------------------------------------------------------------
  layout() {
    const rect = this.canvas.getBoundingClientRect();
    const ratio = window.devicePixelRatio || 1;
    const w = Math.max(1, Math.round(rect.width * ratio));
    const h = Math.max(1, Math.round(rect.height * ratio));
    if (this.canvas.width !== w || this.canvas.height !== h) {
      this.canvas.width = w;
      this.canvas.height = h;
    }
    return { cw: rect.width, ch: rect.height, ratio };
  }

  transform() {
    const f = this.current;
    const { cw, ch, ratio } = this.layout();
    if (!f) return { scale: 1, ox: 0, oy: 0, ratio };
    const fitScale = Math.min(cw / f.cols, ch / f.rows);
    const scale = fitScale * this.zoom;
    return { scale, ox: cw / 2 + this.pan.x - (f.cols * scale) / 2, oy: ch / 2 + this.pan.y - (f.rows * scale) / 2, ratio };
  }

  toImage(event) {
    const rect = this.canvas.getBoundingClientRect();
    const t = this.transform();
    return { x: (event.clientX - rect.left - t.ox) / t.scale, y: (event.clientY - rect.top - t.oy) / t.scale };
  }

  // -- drawing --------------------------------------------------------------------------------
  requestRender() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.render();
    });
  }

  render() {
    const f = this.current;
    const t = this.transform();
    const ctx = this.ctx;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, this.canvas.width, this.canvas.height);
    this.updateOverlay();
    if (!f) return;
    if (!f.pixels) {
      ctx.setTransform(t.ratio, 0, 0, t.ratio, 0, 0);
      ctx.fillStyle = "#888";
      ctx.font = "14px system-ui, sans-serif";
      ctx.fillText(f.error ? `image ${this.index + 1} could not be loaded` : `loading image ${this.index + 1}…`, 12, 40);
      return;
    }
    if (!this.win) this.win = defaultWindow(f);
    if (!this.image || this.image.width !== f.cols || this.image.height !== f.rows) {
      this.image = new ImageData(f.cols, f.rows);
      this.image32 = new Uint32Array(this.image.data.buffer);
      this.offscreen.width = f.cols;
      this.offscreen.height = f.rows;
    }
    try {
      paint(f, this.image32, this.lut, this.win, this.invert);
    } catch (err) {
      this.setMessage(err.message, true);
      return;
    }
    this.offscreen.getContext("2d").putImageData(this.image, 0, 0);
    ctx.setTransform(t.ratio * t.scale, 0, 0, t.ratio * t.scale, t.ratio * t.ox, t.ratio * t.oy);
    ctx.imageSmoothingEnabled = this.zoom < 4;
    ctx.drawImage(this.offscreen, 0, 0);
    this.drawAnnotations(t);
    this.viewer.onRendered(this);
  }

  drawAnnotations(t) {
    const f = this.current;
    const list = [...(this.annotations.get(this.index) || [])];
    if (this.drag && this.drag.annotation) list.push(this.drag.annotation);
    const ctx = this.ctx;
    ctx.setTransform(t.ratio, 0, 0, t.ratio, 0, 0);
    ctx.lineWidth = 1.5;
    ctx.font = "13px system-ui, sans-serif";
    const toScreen = (p) => ({ x: t.ox + p.x * t.scale, y: t.oy + p.y * t.scale });
    for (const a of list) {
      const p1 = toScreen(a.p1), p2 = toScreen(a.p2);
      ctx.strokeStyle = "#ffd400";
      ctx.fillStyle = "#ffd400";
      ctx.beginPath();
      let label;
      if (a.type === "length") {
        ctx.moveTo(p1.x, p1.y);
        ctx.lineTo(p2.x, p2.y);
        const d = distance(f, a.p1, a.p2);
        label = `${fmt(d.value, 1)} ${d.unit}`;
      } else {
        const x = Math.min(p1.x, p2.x), y = Math.min(p1.y, p2.y);
        const w = Math.abs(p2.x - p1.x), h = Math.abs(p2.y - p1.y);
        if (a.type === "ellipse") ctx.ellipse(x + w / 2, y + h / 2, w / 2, h / 2, 0, 0, 2 * Math.PI);
        else ctx.rect(x, y, w, h);
        const s = roiStats(f, a.type, a.p1, a.p2);
        const unit = unitFor(f);
        const area = s.mm ? `${fmt(s.area, 1)} mm²` : `${fmt(s.area, 0)} px²`;
        label = `mean ${fmt(s.mean)}${unit ? " " + unit : ""}  SD ${fmt(s.sd)}  area ${area}`;
      }
      ctx.stroke();
      a.label = label;
      const lx = Math.max(p1.x, p2.x) + 6, ly = Math.max(p1.y, p2.y) + 4;
      ctx.fillStyle = "rgba(0,0,0,0.6)";
      const width = ctx.measureText(label).width;
      ctx.fillRect(lx - 2, ly - 13, width + 4, 17);
      ctx.fillStyle = "#ffd400";
      ctx.fillText(label, lx, ly);
    }
  }

  updateOverlay() {
    const f = this.current;
    const s = this.stack;
    if (!f) {
      for (const c of Object.values(this.corners)) c.textContent = "";
      return;
    }
    const ds = f.ds;
    const sex = val(ds, TAG.PatientSex) || "";
    this.corners.tl.textContent = [
      personName(ds, TAG.PatientName),
      `ID ${val(ds, TAG.PatientID) || ""}`,
      [formatDate(val(ds, TAG.PatientBirthDate)), sex].filter(Boolean).join("  "),
    ].join("\n");
    this.corners.tr.textContent = [
      val(ds, TAG.StudyDescription) || "",
      formatDate(val(ds, TAG.StudyDate)),
      `Se ${val(ds, TAG.SeriesNumber) ?? ""} ${val(ds, TAG.SeriesDescription) || ""}`.trim(),
    ].join("\n");
    const loc = f.location ?? f.sliceLocation;
    const lines = [`Im ${this.index + 1} / ${s.frames.length}`];
    if (f.frames > 1) lines.push(`Frame ${f.frame} / ${f.frames}`);
    if (Number.isFinite(loc)) lines.push(`Loc ${fmt(loc)} mm`);
    if (Number.isFinite(f.sliceThickness)) lines.push(`Thk ${fmt(f.sliceThickness)} mm`);
    if (s.loaded + s.failed < s.frames.length) lines.push(`loaded ${s.loaded} / ${s.frames.length}`);
    this.corners.bl.textContent = lines.join("\n");
    const win = this.win;
    this.corners.br.textContent = [
      win && !isColor(f) ? `WW ${Math.round(win.width)}  WL ${Math.round(win.center)}` : "",
      `Zoom ${Math.round(this.zoom * 100)}%${this.invert ? "  inverted" : ""}`,
      `${f.cols}×${f.rows}`,
    ].join("\n");
  }

  setMessage(text, isError = false) {
    this.message.textContent = text;
    this.message.hidden = !text;
    this.message.classList.toggle("error", isError);
  }

  // -- input ----------------------------------------------------------------------------------
  bind() {
    const c = this.canvas;
    c.addEventListener("contextmenu", (e) => e.preventDefault());
    c.addEventListener("pointerdown", (e) => this.onDown(e));
    c.addEventListener("pointermove", (e) => this.onMove(e));
    c.addEventListener("pointerup", (e) => this.onUp(e));
    c.addEventListener("pointercancel", (e) => this.onUp(e));
    c.addEventListener("wheel", (e) => this.onWheel(e), { passive: false });
    this.slider.addEventListener("input", () => this.setIndex(Number(this.slider.value)));
    new ResizeObserver(() => this.requestRender()).observe(this.canvas);
  }

  onDown(e) {
    this.viewer.activate(this);
    if (!this.current) return;
    this.canvas.setPointerCapture(e.pointerId);
    const tool = e.button === 1 ? "pan" : e.button === 2 ? "zoom" : this.viewer.tool;
    const start = { x: e.clientX, y: e.clientY };
    this.drag = { tool, start, last: start, win: this.win && { ...this.win }, zoom: this.zoom, pan: { ...this.pan } };
    if (["length", "ellipse", "rect"].includes(tool) && this.current.pixels) {
      const p = this.toImage(e);
      this.drag.annotation = { type: tool, p1: p, p2: { ...p } };
    }
  }

  onMove(e) {
    const d = this.drag;
    if (!d) return;
    const dx = e.clientX - d.start.x, dy = e.clientY - d.start.y;
    if (d.tool === "wl" && d.win) {
      const k = Math.max(0.5, d.win.width / 300);
      this.win = { center: d.win.center + dy * k, width: Math.max(1, d.win.width + dx * k) };
    } else if (d.tool === "pan") {
      this.pan = { x: d.pan.x + dx, y: d.pan.y + dy };
    } else if (d.tool === "zoom") {
      this.zoom = Math.min(40, Math.max(0.05, d.zoom * Math.exp(-dy / 150)));
    } else if (d.annotation) {
      d.annotation.p2 = this.toImage(e);
    }
    this.requestRender();
  }

  onUp(e) {
    const d = this.drag;
    this.drag = null;
    if (!d) return;
    if (this.canvas.hasPointerCapture(e.pointerId)) this.canvas.releasePointerCapture(e.pointerId);
    const a = d.annotation;
    if (a && Math.hypot(a.p2.x - a.p1.x, a.p2.y - a.p1.y) >= 2) {
      if (!this.annotations.has(this.index)) this.annotations.set(this.index, []);
      this.annotations.get(this.index).push(a);
    }
    this.requestRender();
    this.viewer.onRendered(this);
  }

  onWheel(e) {
    e.preventDefault();
    this.viewer.activate(this);
    if (e.ctrlKey || e.metaKey) {
      this.zoom = Math.min(40, Math.max(0.05, this.zoom * Math.exp(-e.deltaY / 300)));
      this.requestRender();
      return;
    }
    // Trackpads send many small deltas: one slice per 40 px, at least one per event.
    this.wheelRest += e.deltaMode === 1 ? e.deltaY * 40 : e.deltaY;
    let steps = Math.trunc(this.wheelRest / 40);
    if (steps === 0) steps = Math.sign(this.wheelRest);
    this.wheelRest = 0;
    this.scroll(steps);
  }

  /** What the tests and the benchmark read. */
  snapshot() {
    const f = this.current;
    return {
      index: this.index,
      total: this.stack ? this.stack.frames.length : 0,
      loaded: this.stack ? this.stack.loaded : 0,
      win: this.win,
      zoom: this.zoom,
      invert: this.invert,
      series: this.stack && this.stack.series,
      shown: !!(f && f.pixels),
      labels: (this.annotations.get(this.index) || []).map((a) => a.label),
    };
  }
}
